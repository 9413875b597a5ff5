//! The vm provider for real: a Debian bookworm image with its distro kernel,
//! booted under QEMU (TCG where KVM does not work) with slate's agent. Needs
//! root, mmdebstrap and qemu-system-x86 (required in CI). The layer cache
//! lives under the build folder, shared with the Debian tests.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn required() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let found = |t: &str| {
        ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(t).exists())
    };
    let ok = root && found("mmdebstrap") && found("qemu-system-x86_64") && found("qemu-img");
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs root, mmdebstrap and qemu-system-x86, and CI must run it"
        );
        eprintln!("SKIPPED: needs root, mmdebstrap and qemu-system-x86");
    }
    ok
}

const IMAGE: &str = "[images.vm]\nfrom = \"debian:bookworm\"\nvm = true\n";

struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new(builds: &str) -> Project {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("slate.toml"), format!("{IMAGE}{builds}")).unwrap();
        Project { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_slate"));
        c.arg("-C")
            .arg(self.path())
            .args(args)
            .env("SLATE_CACHE", cache())
            .env("NO_COLOR", "1");
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }
    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path().join(rel)).unwrap_or_default()
    }
}

fn cache() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("slate-cache")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// QEMU processes of environments whose name contains `marker`.
fn qemus_with(marker: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.starts_with("/usr/bin/qemu-system") && cmd.contains(marker) {
                out.push(cmd);
            }
        }
    }
    out
}

#[test]
fn root_vm_target_runs_in_a_guest_with_its_own_kernel_cpus_and_no_network() {
    if !required() {
        return;
    }
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
    let p = Project::new(&format!(
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
        .current_dir(p.path().join("artifacts"))
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
    let mut child = p
        .cmd(&["build"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("guest-is-sleeping") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv().expect("the guest printed its marker");
    child
}

/// Waits (bounded: 20 s) for the VMs named by `marker` to be gone.
fn gone(marker: &str) -> bool {
    for _ in 0..400 {
        if qemus_with(marker).is_empty() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

#[test]
fn root_vm_ctrl_c_and_kill_9_leave_no_qemu_and_gc_reaps_the_overlay() {
    if !required() {
        return;
    }
    for (signal, marker) in [
        (libc::SIGINT, "sleeper-int"),
        (libc::SIGKILL, "sleeper-kill"),
    ] {
        let p = Project::new(&format!(
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
            assert_eq!(left(&cache()), 1, "the killed run left its overlay folder");
            let o = p.run(&["gc"]);
            assert!(o.status.success(), "{}", text(&o));
            assert_eq!(left(&cache()), 0, "gc removed it: {}", text(&o));
        }
    }
}

#[test]
fn root_vm_docker_image_example_saves_a_tagged_image() {
    if !required() {
        return;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/docker-image");
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "slate.toml",
        "build.sh",
        "greet.c",
        "Dockerfile",
        ".gitignore",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let o = Command::new(env!("CARGO_BIN_EXE_slate"))
        .arg("-C")
        .arg(dir.path())
        .arg("build")
        .env("SLATE_CACHE", cache())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    // dockerd ran in the guest, and the image it built runs there.
    assert!(out.contains("Successfully tagged greet:1.0.0"), "{out}");
    assert!(
        out.contains("[greet-image] hello from a scratch image, built by slate in a fresh VM"),
        "{out}"
    );
    let arts = dir.path().join("artifacts");
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
fn root_vm_accel_kvm_fails_with_the_reason_where_kvm_does_not_work() {
    if !required() {
        return;
    }
    let p = Project::new(
        "[builds.k]\nimage = \"vm\"\nprovider = \"vm\"\nrun = [\"true\"]\n[providers.vm]\naccel = \"kvm\"\n",
    );
    let o = p.run(&["build"]);
    let out = text(&o);
    // The probe's answer is kept in the cache: it says which case this is.
    let probe = std::fs::read_to_string(cache().join("v1/vm/kvm-probe")).unwrap();
    if probe.contains("broken: ") {
        assert_eq!(o.status.code(), Some(3), "{out}");
        assert!(out.contains("but KVM does not work on this host"), "{out}");
        assert!(out.contains("use `accel = \"auto\"` or `\"tcg\"`"), "{out}");
    } else {
        assert!(o.status.success(), "{out}");
    }
}

#[test]
fn root_vm_detached_children_do_not_hang_a_target_and_a_timeout_ends_the_vm() {
    if !required() {
        return;
    }
    // `setsid` puts the sleeper outside the command's process group, still
    // holding its stdout: the target must still finish.
    let p = Project::new(
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
