//! The sandbox for real: these tests need root, so a plain `cargo test` lists
//! them as ignored, and `scripts/test.sh` runs them as root.

use slate_provider::*;
use slate_sandbox::SandboxProvider;
use std::path::{Path, PathBuf};

/// Fails the test unless it runs as root: a test that runs never passes
/// without doing its work. (slate's CLI tests have the same check in
/// `crates/slate/tests/common`.)
#[track_caller]
fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "this test needs root; run it through scripts/test.sh as root"
    );
}

/// A rootfs of busybox's applets: no network, no bootstrap.
fn busybox_layer(dir: &Path) -> PathBuf {
    let root = dir.join("busybox-layer");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("root")).unwrap();
    std::fs::create_dir_all(root.join("var")).unwrap();
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("this test needs a static `busybox` for its rootfs: install busybox-static (scripts/install-deps.sh installs it)");
    std::fs::copy(bb, root.join("bin/busybox")).unwrap();
    let list = std::process::Command::new(bb)
        .arg("--list")
        .output()
        .unwrap();
    for name in String::from_utf8_lossy(&list.stdout).lines() {
        if name != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(name));
        }
    }
    root
}

fn run(env: &mut impl Environment, cmd: &str) -> (ExecOutcome, String) {
    let mut out = String::new();
    let mut sink = |_: Stream, l: &str| {
        out.push_str(l);
        out.push('\n');
    };
    let spec = ExecSpec {
        argv: vec!["sh".into(), "-c".into(), cmd.into()],
        env: vec![("PATH".into(), "/bin".into())],
        cwd: "/".into(),
        interactive: false,
    };
    let o = env.exec(&spec, &mut sink, &Cancel::new()).unwrap();
    (o, out)
}

fn setup() -> (tempfile::TempDir, SandboxProvider, EnvSpec) {
    let t = tempfile::tempdir().unwrap();
    let layer = busybox_layer(t.path());
    let p = SandboxProvider::new(t.path().join("envs"));
    let spec = EnvSpec {
        name: "t1".into(),
        layers: vec![layer],
        ..Default::default()
    };
    (t, p, spec)
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_sandbox_isolates_pid_hostname_and_files() {
    require_root();
    let (t, p, spec) = setup();
    let mut e = p.create(&spec).unwrap();
    let (o, out) = run(
        &mut e,
        "echo pid=$$; hostname; echo hi > /root/f; ls /proc | grep -c '^[0-9]'",
    );
    assert_eq!(o, ExecOutcome::Exited(0), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "pid=2", "{out}");
    assert_eq!(lines[1], "t1");
    // Files persist between commands of one environment...
    let (_, out) = run(&mut e, "cat /root/f");
    assert_eq!(out, "hi\n");
    e.destroy().unwrap();
    // ...and never reach the next one.
    let mut e2 = p.create(&spec).unwrap();
    let (o, _) = run(&mut e2, "test -e /root/f");
    assert_eq!(o, ExecOutcome::Exited(1));
    e2.destroy().unwrap();
    assert_eq!(std::fs::read_dir(t.path().join("envs")).unwrap().count(), 0);
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_sandbox_exit_codes_and_timeout_kill_everything() {
    require_root();
    let (_t, p, spec) = setup();
    let mut e = p.create(&spec).unwrap();
    assert_eq!(run(&mut e, "exit 7").0, ExecOutcome::Exited(7));
    let mut sink = |_: Stream, _: &str| {};
    let hang = ExecSpec {
        argv: vec!["sh".into(), "-c".into(), "sleep 1000 & sleep 1000".into()],
        cwd: "/".into(),
        ..Default::default()
    };
    let cancel = Cancel::new().with_timeout(Some(std::time::Duration::from_millis(200)));
    assert_eq!(
        e.exec(&hang, &mut sink, &cancel).unwrap(),
        ExecOutcome::TimedOut
    );
    e.destroy().unwrap();
    let ps = std::process::Command::new("pgrep")
        .args(["-f", "sleep 1000"])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "left: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_sandbox_no_network_has_only_loopback() {
    require_root();
    let (_t, p, spec) = setup();
    let mut e = p.create(&spec).unwrap();
    let (o, out) = run(
        &mut e,
        "ls /sys/class/net; cat /proc/net/dev | tail -n +3 | cut -d: -f1",
    );
    assert_eq!(o, ExecOutcome::Exited(0), "{out}");
    assert!(out.split_whitespace().all(|w| w == "lo"), "{out}");
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_sandbox_artifacts_cannot_escape_through_symlinks() {
    require_root();
    let (t, p, spec) = setup();
    let mut e = p.create(&spec).unwrap();
    run(
        &mut e,
        "mkdir -p /src/dist && echo ok > /src/dist/a && ln -s /etc /src/dist/link",
    );
    assert_eq!(e.list("/src").unwrap(), ["dist/a"]);
    let dest = t.path().join("out");
    assert_eq!(e.fetch("/src/dist/a", &dest).unwrap(), 3);
    assert!(e.fetch("/src/dist/link/hostname", &dest).is_err());
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_sandbox_gc_leaves_a_live_environments_empty_cgroup_alone() {
    require_root();
    let (t, p, mut spec) = setup();
    spec.limits.pids = Some(64);
    // Made, not yet entered: its cgroup is empty, as between two commands.
    let mut e = p.create(&spec).unwrap();
    let reaped = slate_sandbox::reap(&t.path().join("envs"));
    assert!(reaped.failed.is_empty(), "{:?}", reaped.failed);
    let (o, out) = run(&mut e, "echo still-here");
    assert_eq!(o, ExecOutcome::Exited(0), "{out}");
    assert_eq!(out, "still-here\n");
    e.destroy().unwrap();
}
