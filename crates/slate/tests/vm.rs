//! The vm provider for real: a Debian bookworm image with its distro kernel,
//! booted under QEMU (TCG where KVM does not work) with slate's agent. Needs
//! root, mmdebstrap and qemu-system-x86, so a plain `cargo test` lists these
//! tests as ignored, and `scripts/test.sh` runs them as root. The layer cache
//! is the one shared with the Debian tests.

mod common;

use common::{text, Project};
use std::io::Write;
use std::path::Path;
use std::process::Command;

/// Fails the test unless this host can bake a Debian VM image and boot it.
#[track_caller]
fn require_vm_host() {
    common::require_root();
    common::require_tool("mmdebstrap", "mmdebstrap");
    common::require_tool("qemu-system-x86_64", "qemu-system-x86");
    common::require_tool("qemu-img", "qemu-utils");
}

const IMAGE: &str = "[images.vm]\nfrom = \"debian:bookworm\"\nvm = true\n";

/// A project with the `vm` image and these targets.
fn vm_project(builds: &str) -> Project {
    Project::debian(&format!("{IMAGE}{builds}"))
}

/// QEMU processes of environments whose name contains `marker`.
fn qemus_with(marker: &str) -> Vec<String> {
    common::processes_where(|cmd| cmd.starts_with("/usr/bin/qemu-system") && cmd.contains(marker))
}

#[test]
#[ignore = "needs root, QEMU and the Debian archive: scripts/test.sh runs it"]
fn root_vm_target_runs_in_a_guest_with_its_own_kernel_cpus_and_no_network() {
    require_vm_host();
    // A server on the host's loopback: QEMU's user network reaches it as
    // 10.0.2.2, so a network = true target can talk to it.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in server.incoming().flatten() {
            let mut c = c;
            let _ = c.write_all(b"pong-from-host\n");
        }
    });
    let p = vm_project(&format!(
        "[builds.probe]\nimage = \"vm\"\nprovider = \"vm\"\ncpus = 2\nworkdir = \"/src\"\n\
         run = [\"mkdir -p out; uname -r > out/kernel.txt; nproc > out/cpus.txt; ls /sys/class/net > out/net.txt; hostname > out/host.txt\"]\n\
         artifacts = [\"out/*\"]\n\
         [builds.online]\nimage = \"vm\"\nprovider = \"vm\"\nnetwork = true\n\
         run = [\"bash -c 'ls /sys/class/net > net.txt; exec 3<>/dev/tcp/10.0.2.2/{port}; head -n1 <&3 > host.txt'\"]\n\
         artifacts = [\"*.txt\"]\n"
    ));

    let o = p.run(&["build", "-j", "1"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let kernel = p.read("artifacts/probe/kernel.txt");
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(kernel.trim(), host.trim(), "ran on the host's kernel");
    assert!(kernel.trim().ends_with("-amd64"), "{kernel}");
    assert_eq!(p.read("artifacts/probe/cpus.txt").trim(), "2");
    assert_eq!(p.read("artifacts/probe/net.txt").trim(), "lo");
    assert_eq!(p.read("artifacts/probe/host.txt").trim(), "probe");
    let net: Vec<String> = p
        .read("artifacts/online/net.txt")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(net, ["eth0", "lo"], "{out}");
    assert_eq!(p.read("artifacts/online/host.txt").trim(), "pong-from-host");
    let check = Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(p.project().join("artifacts"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        text(&check).contains("probe/kernel.txt: OK"),
        "{}",
        text(&check)
    );
    let prov = p.read("artifacts/probe/provenance.json");
    assert!(prov.contains("\"provider\": \"vm\""), "{prov}");
    assert!(qemus_with("vm-probe-").is_empty(), "a VM was left running");
}

fn start_sleeper(p: &Project) -> std::process::Child {
    common::spawn_until_printed(p.cmd(&["build"]), "guest-is-sleeping")
}

/// Waits (bounded) for the VMs named by `marker` to be gone.
fn gone(marker: &str) -> bool {
    common::settle(|| qemus_with(marker), |l| l.is_empty()).is_empty()
}

#[test]
#[ignore = "needs root, QEMU and the Debian archive: scripts/test.sh runs it"]
fn root_vm_ctrl_c_and_kill_9_leave_no_qemu_and_gc_reaps_the_overlay() {
    require_vm_host();
    for (signal, marker) in [
        (libc::SIGINT, "sleeper-int"),
        (libc::SIGKILL, "sleeper-kill"),
    ] {
        let p = vm_project(&format!(
            "[builds.{marker}]\nimage = \"vm\"\nprovider = \"vm\"\nrun = [\"echo guest-is-sleeping; sleep 600\"]\n"
        ));
        let mut child = start_sleeper(&p);
        assert_eq!(qemus_with(&format!("vm-{marker}-")).len(), 1, "one VM runs");
        // SAFETY: signalling the slate process we started.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().unwrap();
        assert!(!status.success());
        assert!(
            gone(&format!("vm-{marker}-")),
            "QEMU outlived slate ({signal})"
        );
        if signal == libc::SIGKILL {
            let left = |c: &Path| {
                std::fs::read_dir(c.join("v1/envs"))
                    .map(|r| {
                        r.flatten()
                            .filter(|e| e.file_name().to_string_lossy().contains(marker))
                            .count()
                    })
                    .unwrap_or(0)
            };
            assert_eq!(left(&p.cache), 1, "the killed run left its overlay folder");
            let o = p.run(&["gc"]);
            assert!(o.status.success(), "{}", text(&o));
            assert_eq!(left(&p.cache), 0, "gc removed it: {}", text(&o));
        }
    }
}

/// `slate verify` builds a vm target twice in VMs, as `build` would (it
/// used to build it in sandboxes and still record `vm`).
#[test]
#[ignore = "needs root, QEMU and the Debian archive: scripts/test.sh runs it"]
fn root_vm_verify_of_a_vm_target_builds_it_in_vms() {
    require_vm_host();
    let p = vm_project(
        "[builds.same]\nimage = \"vm\"\nprovider = \"vm\"\nworkdir = \"/src\"\n\
         run = [\"mkdir -p out; uname -r > out/kernel.txt\"]\nartifacts = [\"out/*\"]\n",
    );
    let o = p.run(&["verify", "same"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("same: reproducible: 1 artifact(s) identical"),
        "{out}"
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let (_, run) = p.last_run();
    for build in ["same-a", "same-b"] {
        let kernel =
            std::fs::read_to_string(run.join("verify").join(build).join("kernel.txt")).unwrap();
        assert!(
            kernel.starts_with("6.1.0-"),
            "{build} ran on kernel {kernel}"
        );
        assert_ne!(kernel, host, "{build} ran on the host's kernel");
    }
    assert!(qemus_with("vm-same-").is_empty(), "a VM was left running");
}

/// A sparse file is as large as a build says, whatever its disk holds:
/// `truncate -s 1T` in the guest must not become a terabyte on the host.
/// The agent announces the size; one larger than the guest's disk is
/// refused before a byte is copied, as the build's failure.
#[test]
#[ignore = "needs root, QEMU and the Debian archive: scripts/test.sh runs it"]
fn root_vm_an_artifact_larger_than_the_guests_disk_is_refused_before_copying() {
    require_vm_host();
    let p = vm_project(
        "[builds.sparse]\nimage = \"vm\"\nprovider = \"vm\"\nworkdir = \"/src\"\n\
         run = [\"mkdir -p out; echo small > out/a.txt; truncate -s 1T out/z.img\"]\n\
         artifacts = [\"out/*\"]\n",
    );
    let o = p.run(&["build"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "the build's failure: {out}");
    assert!(
        out.contains("artifact `/src/out/z.img`: it is 1099511627776 bytes, more than the guest's disk holds"),
        "{out}"
    );
    assert!(out.contains("sparse file"), "{out}");
    assert!(out.contains("1 failed, 0 infrastructure failures"), "{out}");
    assert!(
        !p.project().join("artifacts/sparse/z.img").exists(),
        "nothing of it is left on the host"
    );
    assert!(qemus_with("vm-sparse-").is_empty(), "a VM was left running");
}

/// QEMU parses what a hostile guest sends to its devices: it runs as a user
/// of its own from slate's range, with no capability, under its seccomp
/// filter, and still dies with slate.
#[test]
#[ignore = "needs root, QEMU and the Debian archive: scripts/test.sh runs it"]
fn root_vm_qemu_runs_as_a_user_of_its_own_without_capabilities() {
    require_vm_host();
    let marker = "unprivileged-qemu";
    let p = vm_project(&format!(
        "[builds.{marker}]\nimage = \"vm\"\nprovider = \"vm\"\nrun = [\"echo guest-is-sleeping; sleep 600\"]\n"
    ));
    let mut child = start_sleeper(&p);
    let running = qemus_with(&format!("vm-{marker}-"));
    assert_eq!(running.len(), 1, "one VM runs: {running:?}");
    let pid = running[0].split(':').next().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> Vec<String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    const ID_BASE: u32 = 0x7a00_0000;
    for ids in [field("Uid"), field("Gid")] {
        let ids: Vec<u32> = ids.iter().map(|i| i.parse().unwrap()).collect();
        assert!(
            ids.iter().all(|&i| i == ids[0] && i > ID_BASE),
            "QEMU runs as {ids:?}: {status}"
        );
    }
    for caps in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(field(caps), ["0000000000000000"], "{caps}: {status}");
    }
    assert_eq!(field("NoNewPrivs"), ["1"], "{status}");
    assert_eq!(field("Seccomp"), ["2"], "QEMU's own filter: {status}");
    // SAFETY: signalling the slate process we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    assert!(
        gone(&format!("vm-{marker}-")),
        "QEMU outlived a killed slate once it had changed user"
    );
}

#[test]
#[ignore = "needs root, QEMU and the Debian archive: scripts/test.sh runs it"]
fn root_vm_docker_image_example_saves_a_tagged_image() {
    require_vm_host();
    let p = Project::example("docker-image");
    let o = p.run(&["build"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    // dockerd ran in the guest, and the image it built runs there.
    assert!(out.contains("Successfully tagged greet:1.0.0"), "{out}");
    assert!(
        out.contains("[greet-image] hello from a scratch image, built by slate in a fresh VM"),
        "{out}"
    );
    let arts = p.project().join("artifacts");
    let check = Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(&arts)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    assert!(text(&check).contains("greet-image/greet-1.0.0.docker.tar: OK"));
    // docker save's own manifest names the tag.
    let m = Command::new("tar")
        .arg("-xOf")
        .arg(arts.join("greet-image/greet-1.0.0.docker.tar"))
        .arg("manifest.json")
        .output()
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&m.stdout).unwrap();
    assert_eq!(m[0]["RepoTags"][0], "greet:1.0.0", "{m}");
}

#[test]
#[ignore = "needs root, QEMU and the Debian archive: scripts/test.sh runs it"]
fn root_vm_accel_kvm_fails_with_the_reason_where_kvm_does_not_work() {
    require_vm_host();
    let p = vm_project(
        "[builds.k]\nimage = \"vm\"\nprovider = \"vm\"\nrun = [\"true\"]\n[providers.vm]\naccel = \"kvm\"\n",
    );
    let o = p.run(&["build"]);
    let out = text(&o);
    // The probe's answer is kept in the cache: it says which case this is.
    let probe = std::fs::read_to_string(p.cache.join("v1/vm/kvm-probe")).unwrap();
    if probe.contains("broken: ") {
        assert_eq!(o.status.code(), Some(3), "{out}");
        assert!(out.contains("but KVM does not work on this host"), "{out}");
        assert!(out.contains("use `accel = \"auto\"` or `\"tcg\"`"), "{out}");
    } else {
        assert!(o.status.success(), "{out}");
    }
}

#[test]
#[ignore = "needs root, QEMU and the Debian archive: scripts/test.sh runs it"]
fn root_vm_detached_children_do_not_hang_a_target_and_a_timeout_ends_the_vm() {
    require_vm_host();
    // `setsid` puts the sleeper outside the command's process group, still
    // holding its stdout: the target must still finish.
    let p = vm_project(
        "[builds.detached]\nimage = \"vm\"\nprovider = \"vm\"\nrun = [\"setsid sleep 600 & echo detached-started\"]\n\
         [builds.slow]\nimage = \"vm\"\nprovider = \"vm\"\ntimeout = \"5s\"\nrun = [\"echo slow-started; sleep 600\"]\n",
    );
    let o = p.run(&["build", "detached"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("[detached] detached-started"),
        "{}",
        text(&o)
    );
    let o = p.run(&["build", "slow"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("timed out"), "{}", text(&o));
    assert!(qemus_with("vm-detached-").is_empty() && qemus_with("vm-slow-").is_empty());
}

#[test]
#[ignore = "needs root, QEMU and the Debian archive: scripts/test.sh runs it"]
fn root_vm_a_command_flooding_output_still_times_out() {
    require_vm_host();
    // The guest is never quiet: the timeout must be checked between frames,
    // not only in silences.
    let p = vm_project(
        "[builds.flood]\nimage = \"vm\"\nprovider = \"vm\"\ntimeout = \"8s\"\nrun = [\"yes flood-line\"]\n",
    );
    let o = p.run(&["build", "flood"]);
    let out = text(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        &out[out.len().saturating_sub(2000)..]
    );
    assert!(
        out.contains("[flood] flood-line"),
        "the flood never started"
    );
    assert!(
        out.contains("timed out"),
        "{}",
        &out[out.len().saturating_sub(2000)..]
    );
    assert!(qemus_with("vm-flood-").is_empty());
}

#[test]
#[ignore = "needs root, QEMU and the Debian archive: scripts/test.sh runs it"]
fn root_vm_inputs_leave_out_what_exclude_and_gitignore_leave_out() {
    require_vm_host();
    let p = vm_project(
        "[builds.inputs]\nimage = \"vm\"\nprovider = \"vm\"\nexclude = [\"src/private/\"]\nrun = [\"mkdir -p out\", \"find . -path ./out -prune -o -type f -print | sort > out/files\"]\nartifacts = [\"out/files\"]\n",
    );
    p.write("src/main.c", "int main(void) { return 0; }\n");
    // Inside a folder that is an input: the folder is sent, these are not.
    p.write("src/private/key.pem", "not for the guest\n");
    p.write("src/build.log", "ignored\n");
    p.write(".gitignore", "*.log\n");
    let o = p.run(&["build", "inputs"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        p.read("artifacts/inputs/files"),
        "./.gitignore\n./slate.toml\n./src/main.c\n"
    );
}

/// The saved machines in the cache of machines with `mem_mib` of memory.
fn saved_machines(cache: &Path, mem_mib: u64) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(cache.join("v1/vm/snapshots"))
        .map(|r| {
            r.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let name = p.file_name().unwrap().to_string_lossy().into_owned();
                    name.ends_with(".vmstate") && name.contains(&format!("-{mem_mib}M"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
#[ignore = "needs root, QEMU and the Debian archive: scripts/test.sh runs it"]
fn root_vm_machines_restored_from_one_save_share_no_randomness_clock_or_writes() {
    require_vm_host();
    // A machine size of this test's own: its saved machine is its own.
    let mem_mib = 600 + u64::from(std::process::id() % 97);
    let script = "mkdir -p out; cat /proc/sys/kernel/random/boot_id > out/boot_id; \
                  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > out/random; \
                  date +%s > out/clock; hostname > out/host; \
                  if test -e /root/mark; then echo dirty; else echo clean; fi > out/before; \
                  echo \"$(hostname)\" > /root/mark";
    let builds: String = ["one", "two", "three"]
        .iter()
        .map(|n| {
            format!(
                "[builds.{n}]\nimage = \"vm\"\nprovider = \"vm\"\nmemory = \"{mem_mib}MiB\"\nrun = [{script:?}]\nartifacts = [\"out/*\"]\n"
            )
        })
        .collect();
    let p = vm_project(&builds);
    let before = saved_machines(&p.cache, mem_mib);
    let o = p.run(&["build", "one"]);
    assert!(o.status.success(), "{}", text(&o));
    let after = saved_machines(&p.cache, mem_mib);
    let new: Vec<_> = after.iter().filter(|f| !before.contains(f)).collect();
    assert_eq!(new.len(), 1, "the first VM saved one machine: {after:?}");
    let saved = new[0].clone();
    let o = p.run(&["build", "two"]);
    assert!(o.status.success(), "{}", text(&o));
    // Taken after two whole VMs ran since the save: a guest that kept the
    // saved clock would be behind it.
    let host_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let o = p.run(&["build", "three"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        !out.contains("could not be restored") && !out.contains("cannot save"),
        "{out}"
    );
    assert_eq!(
        saved_machines(&p.cache, mem_mib),
        after,
        "restored, not saved again"
    );
    let read = |t: &str, f: &str| p.read(&format!("artifacts/{t}/{f}")).trim().to_string();
    for t in ["one", "two", "three"] {
        assert_eq!(read(t, "before"), "clean", "{t} saw another VM's write");
        assert_eq!(read(t, "host"), t);
    }
    for f in ["boot_id", "random"] {
        let seen: std::collections::HashSet<String> =
            ["one", "two", "three"].iter().map(|t| read(t, f)).collect();
        assert_eq!(seen.len(), 3, "{f} repeats between VMs: {seen:?}");
    }
    let guest_secs: u64 = read("three", "clock").parse().unwrap();
    assert!(
        guest_secs >= host_secs,
        "the guest's clock ({guest_secs}) is behind the host's ({host_secs})"
    );

    // A damaged save is not used: the VM boots instead, says so, and the
    // next one saves the machine anew.
    std::fs::write(&saved, b"QEVM not really a saved machine").unwrap();
    let o = p.run(&["build", "two"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("could not be restored"), "{out}");
    assert_eq!(read("two", "before"), "clean");
    let o = p.run(&["build", "three"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        std::fs::metadata(&saved).unwrap().len() > 1 << 20,
        "saved anew"
    );
    let _ = std::fs::remove_file(&saved);
}

#[test]
#[ignore = "needs root, QEMU and the Debian archive: scripts/test.sh runs it"]
fn root_vm_shell_is_interactive_on_a_terminal_inside_the_guest() {
    require_vm_host();
    let p = vm_project(
        "[builds.inside]\nimage = \"vm\"\nprovider = \"vm\"\nworkdir = \"/work\"\nrun = [\"true\"]\n",
    );
    let o = p.on_terminal(
        "shell inside",
        b"echo \"in=$(pwd):$(hostname):$(tty):$(stty size)\"; uname -r; exit 7\n",
        &[],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(7), "{out}");
    // A terminal of its own in the guest, the size of this one.
    assert!(out.contains("in=/work:inside:/dev/pts/"), "{out}");
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(out.contains("-amd64"), "{out}");
    assert!(
        !out.lines().any(|l| l.trim() == host_kernel.trim()),
        "ran on the host's kernel: {out}"
    );
    assert!(
        qemus_with("vm-inside-").is_empty(),
        "the VM was left running"
    );
}

#[test]
#[ignore = "needs root, QEMU and the Debian archive: scripts/test.sh runs it"]
fn root_vm_keep_failed_keeps_the_guests_disk_to_enter_as_it_was() {
    require_vm_host();
    let p = vm_project(
        "[builds.sunk]\nimage = \"vm\"\nprovider = \"vm\"\nworkdir = \"/work\"\n\
         run = [\"echo from-the-build > /root/evidence\", \"rm /etc/hostname\", \"exit 3\"]\n",
    );
    let o = p.run(&["build", "--keep-failed"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let id = out
        .lines()
        .find(|l| l.starts_with("kept sunk's environment"))
        .and_then(|l| l.split('`').nth(1))
        .and_then(|c| c.strip_prefix("slate shell --keep "))
        .unwrap_or_else(|| panic!("no kept environment said: {out}"))
        .to_string();
    assert!(qemus_with("vm-sunk-").is_empty(), "the VM was left running");
    let disk = p
        .cache
        .join("v1/kept")
        .join(id.split('/').next().unwrap())
        .join("sunk/disk.qcow2");
    assert!(disk.is_file(), "no kept disk at {}", disk.display());

    let enter = |input: &[u8]| p.enter_kept(&id, input);
    let seen = enter(
        b"echo \"at=$(pwd) has=$(cat /root/evidence) host=$(test -e /etc/hostname && echo yes || echo no)\"; echo changed > /root/evidence; exit\n",
    );
    assert!(
        seen.contains("at=/work has=from-the-build host=no"),
        "{seen}"
    );
    // What a shell writes is thrown away: the next one sees the failure's
    // state again.
    let seen = enter(b"echo \"has=$(cat /root/evidence)\"; exit\n");
    assert!(seen.contains("has=from-the-build"), "{seen}");
    assert!(qemus_with("vm-sunk-").is_empty(), "a VM was left running");
}

/// Whoever runs as QEMU's user (a guest that broke out into QEMU) owns
/// QEMU's folder, so the disk file slate keeps could be swapped for a
/// symlink to a host file: keeping must neither follow it nor change the
/// host file.
#[test]
#[ignore = "needs root, QEMU and the Debian archive: scripts/test.sh runs it"]
fn root_vm_keep_failed_never_follows_a_link_planted_in_qemus_folder() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    require_vm_host();
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "host file\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    // The guest waits on this socket, so the disk file is swapped while
    // the VM runs, before the target fails.
    let gate = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = gate.local_addr().unwrap().port();
    let p = vm_project(&format!(
        "[builds.trap]\nimage = \"vm\"\nprovider = \"vm\"\nnetwork = true\n\
         run = [\"bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}; read go <&3; exit 3'\"]\n"
    ));
    let mut slate = p
        .cmd(&["build", "--keep-failed"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (mut conn, _) = gate.accept().unwrap();
    let envs: Vec<_> = std::fs::read_dir(p.cache.join("v1/envs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|d| {
            d.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vm-trap-")
        })
        .collect();
    assert_eq!(envs.len(), 1, "{envs:?}");
    let disk = envs[0].join("q/disk.qcow2");
    assert!(disk.is_file());
    std::fs::remove_file(&disk).unwrap();
    std::os::unix::fs::symlink(&victim, &disk).unwrap();
    conn.write_all(b"go\n").unwrap();
    drop(conn);
    let mut out = String::new();
    for l in BufReader::new(slate.stdout.take().unwrap()).lines() {
        out.push_str(&l.unwrap());
        out.push('\n');
    }
    let status = slate.wait().unwrap();
    let m = std::fs::metadata(&victim).unwrap();
    assert_eq!(
        m.permissions().mode() & 0o7777,
        0o644,
        "the host file's mode changed"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!((m.uid(), m.gid()), (0, 0), "the host file's owner changed");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "host file\n");
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("it was not kept"), "{out}");
    assert!(qemus_with("vm-trap-").is_empty(), "the VM was left running");
}
