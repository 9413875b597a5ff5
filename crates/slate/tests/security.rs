//! Hostile builds and bake steps: each test is a real build or bake that
//! tries to reach the host and must fail. Named `root_*`: they need root,
//! so a plain `cargo test` lists them as ignored; `scripts/test.sh` runs
//! them as root.

mod common;

use common::{require_root, require_tool, text, Project};
use std::path::Path;
use std::process::Command;

const IMAGE: &str = "[images.bb]\nfrom = \"tar:bb.tar.gz\"\n";

/// Each probe prints `NAME: allowed` or `NAME: denied`. Writes to kernel
/// files only open them (nothing is written), so a probe that is allowed
/// changes nothing.
const PROBES: &str = r#"
grep CapEff /proc/self/status
probe() { name=$1; shift; if "$@" 2>/dev/null; then echo "$name: allowed"; else echo "$name: denied"; fi; }
probe mknod mknod /tmp/slate-probe-dev b 253 0
probe mount mount -t tmpfs none /tmp
probe remount-sys mount -o remount,rw /sys
probe proc-sys sh -c 'exec 3>>/proc/sys/vm/overcommit_ratio'
probe sysrq-trigger sh -c 'exec 3>>/proc/sysrq-trigger'
probe chown-other sh -c 'touch /tmp/slate-probe-f && chown 1:1 /tmp/slate-probe-f'
"#;

const DENIED: &str = "CapEff:\t0000000000000000
mknod: denied
mount: denied
remount-sys: denied
proc-sys: denied
sysrq-trigger: denied
chown-other: denied
";

#[test]
#[ignore = "needs root and bubblewrap: scripts/test.sh runs it"]
fn root_a_build_has_no_privileges_and_bubblewrap_answers_the_same() {
    require_root();
    let bwrap = require_tool("bwrap", "bubblewrap");
    let p = Project::new(&format!(
        "{IMAGE}[builds.probe]\nimage = \"bb\"\nscript = \"probe.sh\"\nartifacts = [\"out/answers\"]\n"
    ));
    p.write(
        "probe.sh",
        &format!("mkdir -p out\n{{\n{PROBES}\n}} > out/answers\n"),
    );
    let o = p.run(&["build"]);
    assert!(o.status.success(), "{}", text(&o));
    let slate = p.read("artifacts/probe/answers");
    assert_eq!(slate, DENIED, "inside a slate build");

    // The same probes in bubblewrap, run the way it is meant to be run: by
    // an unprivileged user (nobody), every namespace unshared, over the
    // same busybox root.
    let root = p.path().join("rootfs");
    std::fs::create_dir_all(&root).unwrap();
    let st = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-xzf")
        .arg(p.project().join("bb.tar.gz"))
        .status()
        .unwrap();
    assert!(st.success());
    use std::os::unix::fs::PermissionsExt;
    for d in [p.path(), &root] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let o = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(bwrap)
        .arg("--ro-bind")
        .arg(&root)
        .arg("/")
        .args([
            "--ro-bind",
            "/sys",
            "/sys",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
        ])
        .args(["--tmpfs", "/tmp", "--unshare-all", "--new-session"])
        .args(["--die-with-parent", "/bin/sh", "-c", PROBES])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let bwrap_answers = String::from_utf8_lossy(&o.stdout);
    assert_eq!(bwrap_answers, slate, "bubblewrap and slate disagree");
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_a_build_can_neither_make_namespaces_nor_see_host_paths() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.look]\nimage = \"bb\"\nrun = [\"mkdir -p out\", \"cat /proc/self/mountinfo > out/mountinfo\", \"cat /proc/self/cgroup > out/cgroup\", \"if unshare -U true; then echo allowed; else echo denied; fi > out/unshare\", \"if unshare -m true; then echo allowed; else echo denied; fi >> out/unshare\"]\nartifacts = [\"out/*\"]\n"
    ));
    let o = p.run(&["build"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(p.read("artifacts/look/unshare"), "denied\ndenied\n");
    // The overlay's folders live in slate's cache and state folders on
    // the host; the mount table inside names none of them.
    let mountinfo = p.read("artifacts/look/mountinfo");
    for host in [p.path(), &p.cache] {
        let host = host.to_string_lossy();
        assert!(
            !mountinfo.contains(host.as_ref()),
            "`{host}` shows inside:\n{mountinfo}"
        );
    }
    assert!(mountinfo.contains("lowerdir=/proc/self/fd/"), "{mountinfo}");
    // Its own cgroup is the root of what it sees.
    let cgroup = p.read("artifacts/look/cgroup");
    assert!(cgroup.lines().any(|l| l == "0::/"), "{cgroup}");
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_bake_steps_may_set_owners_but_not_make_devices() {
    require_root();
    // Owners and modes, as dpkg sets them, work in a bake step.
    let p = Project::new(
        "[images.bb]\nfrom = \"tar:bb.tar.gz\"\nsteps = [\"touch /etc/owned && chown 1:1 /etc/owned\"]\n\n[builds.see]\nimage = \"bb\"\nrun = [\"mkdir -p out\", \"stat -c %u:%g /etc/owned > out/owner\"]\nartifacts = [\"out/owner\"]\n",
    );
    let o = p.run(&["build"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(p.read("artifacts/see/owner"), "1:1\n");

    // A device node for a host disk does not.
    let p = Project::new(
        "[images.bb]\nfrom = \"tar:bb.tar.gz\"\nsteps = [\"mknod /dev-disk b 253 0\"]\n",
    );
    let o = p.run(&["bake"]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    let layers = p.cache.join("v1");
    assert!(
        !has_device(&layers),
        "a device node was written under {}",
        layers.display()
    );
}

fn has_device(dir: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.flatten().any(|e| {
        let Ok(t) = e.file_type() else { return false };
        t.is_block_device() || t.is_char_device() || (t.is_dir() && has_device(&e.path()))
    })
}

/// `slate ARGS` in a mount namespace of its own where `/sys/fs/cgroup` is an
/// empty tmpfs: a host without a usable cgroup hierarchy.
fn without_cgroups(p: &Project, args: &[&str]) -> std::process::Output {
    Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs none /sys/fs/cgroup && exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_slate"))
        .arg("-C")
        .arg(p.project())
        .args(args)
        .env("SLATE_CACHE", &p.cache)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_a_host_without_cgroups_builds_unless_limits_were_asked_for() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.plain]\nimage = \"bb\"\nrun = [\"mkdir -p out\", \"echo ok > out/ok\"]\nartifacts = [\"out/ok\"]\n\n[builds.limited]\nimage = \"bb\"\npids = 100\nrun = [\"true\"]\n"
    ));
    let o = without_cgroups(&p, &["build", "plain"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert_eq!(p.read("artifacts/plain/ok"), "ok\n");
    assert_eq!(
        out.matches("warning: no usable cgroup hierarchy").count(),
        1,
        "{out}"
    );
    // A limit the user set is not dropped in silence.
    let o = without_cgroups(&p, &["build", "limited"]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("set up cgroup limits"), "{out}");
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_artifacts_of_sudo_slate_belong_to_the_user_who_ran_sudo() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.mine]\nimage = \"bb\"\nrun = [\"mkdir -p out/sub\", \"echo a > out/sub/a\"]\nartifacts = [\"out/**\"]\n"
    ));
    let o = p
        .cmd(&["build"])
        .env("SUDO_UID", "4321")
        .env("SUDO_GID", "4322")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    use std::os::unix::fs::MetadataExt;
    let art = p.project().join("artifacts");
    for rel in [
        "",
        "mine",
        "mine/a",
        "mine/provenance.json",
        "SHA256SUMS",
        "manifest.json",
    ] {
        let m = std::fs::symlink_metadata(art.join(rel)).unwrap();
        assert_eq!((m.uid(), m.gid()), (4321, 4322), "artifacts/{rel}");
    }
}

/// `truncate -s` makes a file of any size that takes no disk: copied
/// byte by byte (as `copy_file_range` does on ext4), a build's 1 TB file
/// fills the host's disk. Holes stay holes, for artifacts and inputs alike.
#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_sparse_artifacts_and_inputs_take_no_more_host_disk_than_their_data() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.holes]\nimage = \"bb\"\n\
         run = [\"mkdir -p out\", \"stat -c %b in.sparse > out/input-blocks\", \"truncate -s 64M out/hole.img\", \"echo end >> out/hole.img\"]\n\
         artifacts = [\"out/*\"]\n"
    ));
    let input = std::fs::File::create(p.project().join("in.sparse")).unwrap();
    input.set_len(64 << 20).unwrap();
    let o = p.run(&["build"]);
    assert!(o.status.success(), "{}", text(&o));
    use std::os::unix::fs::MetadataExt;
    let art = p.project().join("artifacts/holes");
    let m = std::fs::metadata(art.join("hole.img")).unwrap();
    assert_eq!(m.len(), (64 << 20) + 4);
    assert!(
        m.blocks() * 512 < 1 << 20,
        "the artifact takes {} bytes of the host's disk",
        m.blocks() * 512
    );
    // 512-byte blocks the input's copy took inside the environment.
    let blocks: u64 = p
        .read("artifacts/holes/input-blocks")
        .trim()
        .parse()
        .unwrap();
    assert!(blocks < 2048, "the input's copy took {blocks} blocks");
    let check = Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(p.project().join("artifacts"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_a_build_printing_hundreds_of_megabytes_leaves_slates_memory_bounded() {
    require_root();
    // 300 MB without a newline, then 100 MB of 1000-byte lines.
    let p = Project::new(&format!(
        "{IMAGE}[builds.flood]\nimage = \"bb\"\nrun = [\"head -c 300000000 /dev/zero | tr '\\\\0' x\", \"yes $(head -c 999 /dev/zero | tr '\\\\0' y) | head -c 100000000\"]\n"
    ));
    // Reaped by wait4 below, which also gives its peak RSS.
    #[allow(clippy::zombie_processes)]
    let child = p
        .cmd(&["build"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    // SAFETY: waiting for our own child with valid pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "slate build failed: {status:#x}"
    );
    // Kilobytes: slate itself needs about 20 MB; before lines were capped,
    // the 300 MB line was held whole (and copied).
    let max_rss_mb = usage.ru_maxrss / 1024;
    assert!(max_rss_mb < 100, "slate's peak RSS was {max_rss_mb} MB");
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_ctrl_c_or_kill_9_during_a_bootstrap_leaves_none_of_its_processes() {
    require_root();
    for (signal, tag) in [(libc::SIGINT, "6171"), (libc::SIGKILL, "6172")] {
        let p = Project::config_only("[images.boot]\nfrom = \"debian:bookworm\"\n");
        // A bootstrapper that says it started, then waits quietly on a
        // child of its own: a real mmdebstrap is quiet like this while
        // dpkg unpacks, and its children are apt and dpkg.
        let bin = p.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let tool = bin.join("mmdebstrap");
        std::fs::write(
            &tool,
            format!("#!/bin/sh\necho \"I: bootstrapping $*\"\nsleep {tag}00 &\nwait\n"),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = p.cmd(&["bake"]);
        cmd.env("PATH", path);
        let mut child = common::spawn_until_printed(cmd, "[boot] I: bootstrapping");
        let marker = format!("sleep {tag}00");
        // Its child may still be between fork and exec: wait (bounded).
        let running = common::settle(|| common::processes_with(&marker), |l| !l.is_empty());
        assert_eq!(running.len(), 1, "{running:?}");
        // SAFETY: signalling the slate process we started.
        unsafe { libc::kill(child.id() as i32, signal) };
        assert!(!child.wait().unwrap().success());
        // Bounded wait: parent-death signals are delivered asynchronously.
        let left = common::settle(|| common::processes_with(&marker), |l| l.is_empty());
        for l in &left {
            // Do not leave it behind for the next run either.
            if let Some(pid) = l.split(':').next().and_then(|p| p.parse::<i32>().ok()) {
                // SAFETY: killing the stray test process found above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        assert!(left.is_empty(), "left after signal {signal}: {left:?}");
    }
}
