//! The ssh provider for real: OpenSSH servers on loopback ports of this
//! machine stand in for build hosts, each with its own host key and its own
//! slate cache, so everything a host needs (slate's binary, the image's
//! layers) is shipped to it over ssh. Needs root (the hosts make sandboxes)
//! and openssh-server; `scripts/test.sh` runs these tests as root.

mod common;

use common::{text, Project, SshHosts};
use std::collections::BTreeMap;

const IMAGE: &str = "[images.bb]\nfrom = \"tar:bb.tar.gz\"\nsteps = [\"echo one > /etc/one\"]\n";

/// Four targets whose artifacts depend on their input and image only.
fn four_targets(provider: &str) -> String {
    format!(
        "{IMAGE}[builds.t]\nimage = \"bb\"\nprovider = \"{provider}\"\ninputs = [\"src\"]\n\
         matrix = {{ n = [\"1\", \"2\", \"3\", \"4\"] }}\n\
         run = [\"mkdir -p out\", \"cat /etc/one data.txt > out/t-{{n}}.txt\", \"echo {{n}} >> out/t-{{n}}.txt\"]\n\
         artifacts = [\"out/t-{{n}}.txt\"]\n"
    )
}

/// `SHA256SUMS` of a run's artifacts, as `file -> sum`.
fn sums(p: &Project) -> BTreeMap<String, String> {
    p.read("artifacts/SHA256SUMS")
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(sum, file)| (file.to_string(), sum.to_string()))
        .collect()
}

#[test]
#[ignore = "needs root and openssh-server: scripts/test.sh runs it"]
fn root_ssh_four_targets_on_two_hosts_match_the_same_build_run_here() {
    common::require_root();
    let local = Project::new(&four_targets("sandbox"));
    local.write("src/data.txt", "the input\n");
    let o = local.run(&["build"]);
    assert!(o.status.success(), "{}", text(&o));
    let want = sums(&local);
    assert_eq!(want.len(), 4, "{want:?}");

    let hosts = SshHosts::start(&local.path().join("ssh"), 2);
    let remote = Project::new(&format!("{}{}", four_targets("ssh"), hosts.config(2)));
    remote.write("src/data.txt", "the input\n");
    let o = remote.run(&["build", "-j", "4"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert_eq!(sums(&remote), want, "{out}");
    // Each host was shipped slate and the image's layers, and made
    // environments; none is left on either.
    for (i, h) in hosts.hosts.iter().enumerate() {
        let bins = std::fs::read_dir(h.cache.join("bin")).map_or(0, |d| d.count());
        let layers = std::fs::read_dir(h.cache.join("v1/layers")).map_or(0, |d| d.count());
        let envs = std::fs::read_dir(h.cache.join("v1/envs")).map_or(0, |d| d.count());
        assert_eq!((bins, layers > 0, envs), (1, true, 0), "host {i}: {out}");
    }
    // The provenance says where it was built.
    let prov = remote.read("artifacts/t-1/provenance.json");
    assert!(prov.contains("\"ssh\""), "{prov}");

    // A second run ships nothing: the hosts keep what they were sent.
    let layer_time = |h: &common::SshHost| {
        let at = |rel: &str| {
            std::fs::metadata(h.cache.join(rel))
                .and_then(|m| m.modified())
                .unwrap()
        };
        (at("bin"), at("v1/layers"))
    };
    let before: Vec<_> = hosts.hosts.iter().map(layer_time).collect();
    let o = remote.run(&["build"]);
    assert!(o.status.success(), "{}", text(&o));
    let after: Vec<_> = hosts.hosts.iter().map(layer_time).collect();
    assert_eq!(before, after);
    assert_eq!(sums(&remote), want);
}

#[test]
#[ignore = "needs root and openssh-server: scripts/test.sh runs it"]
fn root_ssh_a_host_that_goes_down_mid_build_is_set_aside_and_the_target_built_on_another() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut hosts = SshHosts::start(&dir.path().join("ssh"), 2);
    let p = Project::new(&format!(
        "{IMAGE}[builds.t]\nimage = \"bb\"\nprovider = \"ssh\"\n\
         run = [\"echo started-building\", \"sleep 2\", \"mkdir -p out\", \"echo built > out/x\"]\n\
         artifacts = [\"out/x\"]\n{}",
        hosts.config(1)
    ));
    let mut child = p
        .cmd(&["build"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(l);
        }
    });
    let mut out = Vec::new();
    for l in rx.iter() {
        // The command's own line, not the phase that names it.
        let started = l.ends_with("] started-building");
        out.push(l);
        if started {
            break;
        }
    }
    // The host whose store holds the live environment goes down.
    let busy = |h: &common::SshHost| {
        std::fs::read_dir(h.cache.join("v1/envs")).map_or(0, |d| d.count()) > 0
    };
    let i = hosts
        .hosts
        .iter()
        .position(busy)
        .unwrap_or_else(|| panic!("no host holds the environment: {out:?}"));
    hosts.hosts[i].crash();
    out.extend(rx.iter());
    reader.join().unwrap();
    let o = child.wait_with_output().unwrap();
    let out = format!("{}\n{}", out.join("\n"), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{out}");
    assert_eq!(p.read("artifacts/t/x"), "built\n", "{out}");
    assert_eq!(out.matches("retrying").count(), 1, "{out}");
    let down = format!("127.0.0.1:{}", hosts.hosts[i].port);
    assert!(
        out.contains(&format!(
            "ssh host {down} is set aside for the rest of this run"
        )),
        "{out}"
    );
    // Built on the other host, which holds no environment now.
    let other = &hosts.hosts[1 - i];
    assert!(!busy(other), "{out}");
    assert!(other.cache.join("bin").is_dir(), "{out}");
}

#[test]
#[ignore = "needs root and openssh-server: scripts/test.sh runs it"]
fn root_ssh_check_says_which_hosts_work_and_why_not() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let hosts = SshHosts::start(&dir.path().join("ssh"), 1);
    // A port nothing listens on, and a host whose key is not known.
    let dead = common::free_port();
    let config = hosts.config(2).replace(
        "hosts = [",
        &format!(
            "hosts = [\"127.0.0.1:{dead}\", \"localhost:{}\", ",
            hosts.hosts[0].port
        ),
    );
    let p = Project::config_only(&format!("{IMAGE}{config}"));
    let o = p.run(&["check"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("ssh: 3 host(s), 2 slot(s) each"), "{out}");
    let line = |host: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(&format!("{host}:")))
            .unwrap_or_else(|| panic!("no line for {host}: {out}"))
            .to_string()
    };
    assert!(
        line(&format!("127.0.0.1:{}", hosts.hosts[0].port)).contains(&format!(
            "works ({}, root, overlayfs)",
            std::env::consts::ARCH
        )),
        "{out}"
    );
    assert!(
        line(&format!("127.0.0.1:{dead}")).contains("unusable: cannot reach"),
        "{out}"
    );
    // Strict host keys: a name the known_hosts file does not list is refused.
    let unknown = line(&format!("localhost:{}", hosts.hosts[0].port));
    assert!(unknown.contains("unusable: cannot reach"), "{out}");
    assert!(
        unknown.contains("verification failed") || unknown.contains("No ED25519 host key"),
        "{out}"
    );
}

/// Starts `slate build` and returns it once the target's command printed
/// `marker` (its own output line, not the phase naming it).
fn build_until(p: &Project, marker: &str) -> std::process::Child {
    let mut child = p
        .cmd(&["build"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let want = format!("] {marker}");
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if l.ends_with(&want) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv()
        .expect("the build ended before its command printed");
    child
}

#[test]
#[ignore = "needs root and openssh-server: scripts/test.sh runs it"]
fn root_ssh_a_killed_slate_leaves_nothing_on_the_host_and_gc_remote_reaps_a_killed_host_slate() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let hosts = SshHosts::start(&dir.path().join("ssh"), 1);
    let p = Project::new(&format!(
        "{IMAGE}[builds.t]\nimage = \"bb\"\nprovider = \"ssh\"\n\
         run = [\"echo waiting-here\", \"sleep 600\"]\n{}",
        hosts.config(1)
    ));
    let host = &hosts.hosts[0];
    let envs = || {
        std::fs::read_dir(host.cache.join("v1/envs"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.path().display().to_string())
                    .collect::<Vec<String>>()
            })
            .unwrap_or_default()
    };
    let served = || host.processes_with("remote env");

    // slate is killed: its connection goes, and the host's slate destroys
    // the environment and ends.
    let mut child = build_until(&p, "waiting-here");
    assert_eq!(envs().len(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let left = common::settle(|| [envs(), served()].concat(), |l: &[String]| l.is_empty());
    assert!(left.is_empty(), "left on the host: {left:?}");

    // The host's slate is killed (as in a crash of it): its environment's
    // folder stays, with a lease nobody holds, until `slate gc --remote`.
    let mut child = build_until(&p, "waiting-here");
    for pr in served() {
        let pid: i32 = pr.split(':').next().unwrap().parse().unwrap();
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let o = child.wait().unwrap();
    assert!(!o.success());
    let left = common::settle(served, |l: &[String]| l.is_empty());
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(envs().len(), 1, "{:?}", envs());
    let o = p.run(&["gc", "--remote"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(&format!(
            "127.0.0.1:{}: 1 environment(s) of killed runs removed",
            host.port
        )),
        "{out}"
    );
    assert!(envs().is_empty(), "{:?}", envs());
}

#[test]
#[ignore = "needs root, mmdebstrap and openssh-server: scripts/test.sh runs it"]
fn root_ssh_the_example_builds_the_quickstarts_debs_on_two_hosts() {
    common::require_root();
    common::require_debian_bootstrap();
    let p = Project::example("ssh-hosts");
    let hosts = SshHosts::start(&p.path().join("ssh"), 2);
    // The example's hosts, replaced by two on this machine.
    let config = p.read("slate.toml");
    let start = config.find("[providers.ssh]").unwrap();
    let end = config.find("[images.").unwrap();
    p.write(
        "slate.toml",
        &format!(
            "{}{}\n{}",
            &config[..start],
            hosts.config(2),
            &config[end..]
        ),
    );
    let o = p.run(&["build"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let sums = p.read("artifacts/SHA256SUMS");
    for distro in ["bookworm", "trixie"] {
        assert!(
            sums.contains(&format!("greet-{distro}/greet_1.0.0+{distro}_")),
            "{sums}\n{out}"
        );
    }
    let check = std::process::Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(p.project().join("artifacts"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
}

#[test]
#[ignore = "needs root and openssh-server: scripts/test.sh runs it"]
fn root_ssh_a_timeout_kills_the_command_there_and_destroys_its_environment() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let hosts = SshHosts::start(&dir.path().join("ssh"), 1);
    let p = Project::new(&format!(
        "{IMAGE}[builds.t]\nimage = \"bb\"\nprovider = \"ssh\"\ntimeout = \"2s\"\n\
         run = [\"sleep 600\"]\n{}",
        hosts.config(1)
    ));
    let o = p.run(&["build"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("timed out after 2s"), "{out}");
    // The kill reached the command there: the environment was destroyed,
    // not cut off after a grace period.
    assert!(!out.contains("could not destroy"), "{out}");
    assert!(!out.contains("did not end"), "{out}");
    let host = &hosts.hosts[0];
    // Nothing of the build is left there: no sleep, no host's slate, no
    // environment folder.
    assert!(host.processes_with("sleep 600").is_empty(), "{out}");
    assert!(host.processes_with("remote env").is_empty(), "{out}");
    let envs = std::fs::read_dir(host.cache.join("v1/envs")).map_or(0, |d| d.count());
    assert_eq!(envs, 0, "{out}");
}

#[test]
#[ignore = "needs root and openssh-server: scripts/test.sh runs it"]
fn root_ssh_a_host_that_cannot_make_environments_is_set_aside_and_the_next_one_used() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    // Host 0 logs in but runs nothing (as a host whose sudo wants a
    // password would): it must not take every retry.
    let hosts = SshHosts::start_with(&dir.path().join("ssh"), &["ForceCommand /bin/false", ""]);
    let p = Project::new(&format!(
        "{IMAGE}[builds.t]\nimage = \"bb\"\nprovider = \"ssh\"\n\
         run = [\"mkdir -p out\", \"echo built > out/x\"]\nartifacts = [\"out/x\"]\n{}",
        hosts.config(1)
    ));
    let o = p.run(&["build", "-j", "1"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert_eq!(p.read("artifacts/t/x"), "built\n", "{out}");
    let broken = format!("127.0.0.1:{}", hosts.hosts[0].port);
    assert!(
        out.contains(&format!(
            "ssh host {broken} is set aside for the rest of this run"
        )),
        "{out}"
    );
    assert_eq!(out.matches("retrying").count(), 1, "{out}");
}
