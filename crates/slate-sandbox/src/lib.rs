//! The sandbox provider: a fresh environment is an overlayfs over the image's
//! layers with an empty upper folder, entered through new mount, PID, UTS, IPC
//! and (unless the build asks for network) network namespaces.
//!
//! Each `exec` is a new set of namespaces over the same upper folder, so files
//! persist from one command to the next while processes do not. The overlay is
//! mounted inside the environment's private mount namespace only: the host never
//! sees it, so no mount can outlive the environment. On disk an environment is
//! one folder with a lease file that slate holds locked while the environment
//! lives; `reap` removes the folders whose lease nobody holds (the kernel drops
//! the lock when its owner dies, however it dies).

mod cgroup;
mod child;
pub mod fsutil;
mod seccomp;

pub use cgroup::{detect as cgroup_version, CgroupVersion};

/// Whether sandboxed commands run under slate's seccomp filter (it has a
/// table for x86_64 and aarch64).
pub fn has_seccomp_filter() -> bool {
    !seccomp::program().is_empty()
}

use child::{Mount, Plan, Prep};
use slate_provider::lease::{lease_held, take_lease};
use slate_provider::*;
use std::ffi::CString;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStderr, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
/// Layers one overlay mount takes: each is named as `/proc/self/fd/N`.
const MAX_LAYERS: usize = 160;

/// What the OCI runtime spec's defaults hide (`maskedPaths`): kernel memory,
/// keys, timers, firmware. Folders get an empty read-only tmpfs, files
/// `/dev/null`.
const MASKED: [&str; 11] = [
    "proc/acpi",
    "proc/asound",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/scsi",
    "sys/firmware",
    "sys/devices/virtual/powercap",
];

/// What it makes read-only (`readonlyPaths`): kernel settings and triggers.
const READ_ONLY: [&str; 5] = [
    "proc/bus",
    "proc/fs",
    "proc/irq",
    "proc/sys",
    "proc/sysrq-trigger",
];

/// The mounts that mask and write-protect `/proc` and `/sys` paths, for the
/// ones this kernel has (the environment runs on the host's kernel, so the
/// host's `/proc` and `/sys` say which exist).
fn proc_masks(r: &dyn Fn(&str) -> CString) -> Vec<Prep> {
    let mut preps = Vec::new();
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for p in MASKED {
        let Ok(meta) = fs_err::symlink_metadata(Path::new("/").join(p)) else {
            continue;
        };
        let (source, fstype, mflags, data) = if meta.is_dir() {
            (
                "tmpfs",
                "tmpfs",
                flags | libc::MS_RDONLY,
                Some(cstr("size=0")),
            )
        } else {
            ("/dev/null", "", libc::MS_BIND, None)
        };
        preps.push(Prep::Mount(Mount {
            source: cstr(source),
            target: r(p),
            fstype: cstr(fstype),
            flags: mflags,
            data,
            optional: true,
        }));
    }
    for p in READ_ONLY {
        if fs_err::symlink_metadata(Path::new("/").join(p)).is_err() {
            continue;
        }
        preps.push(Prep::Mount(Mount {
            source: r(p),
            target: r(p),
            fstype: cstr(""),
            flags: libc::MS_BIND | libc::MS_REC,
            data: None,
            optional: false,
        }));
        preps.push(Prep::RemountRo(r(p), flags));
    }
    preps
}

pub struct SandboxProvider {
    state_dir: PathBuf,
}

impl SandboxProvider {
    /// `state_dir` holds one folder per live environment.
    pub fn new(state_dir: PathBuf) -> Self {
        SandboxProvider { state_dir }
    }

    /// Whether this host can run sandboxes, and if not, why.
    pub fn probe() -> Result<(), String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("the sandbox provider needs root (run slate with sudo)".into());
        }
        let fs = fs_err::read_to_string("/proc/filesystems").unwrap_or_default();
        if !fs.contains("overlay") {
            return Err("the kernel has no overlayfs (try `modprobe overlay`)".into());
        }
        Ok(())
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl Provider for SandboxProvider {
    type Env = SandboxEnv;

    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn create(&self, spec: &EnvSpec) -> Result<SandboxEnv, ProviderError> {
        let cerr = |what: String, source: std::io::Error| ProviderError::Create {
            env: spec.name.clone(),
            what,
            source: Some(source),
        };
        if spec.kind != EnvKind::Sandbox {
            return Err(ProviderError::Create {
                env: spec.name.clone(),
                what: format!(
                    "the sandbox provider cannot make a {} environment",
                    spec.kind.name()
                ),
                source: None,
            });
        }
        if spec.layers.is_empty() {
            return Err(ProviderError::Create {
                env: spec.name.clone(),
                what: "the image has no layers".into(),
                source: None,
            });
        }
        let id = format!(
            "{}-{}-{}",
            sanitize(&spec.name),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        if spec.ephemeral {
            // Everything lives on a tmpfs mounted over the state folder inside
            // the environment's own mount namespace: no disk, no lease, no
            // cleanup — the kernel drops it all with the namespace.
            std::fs::create_dir_all(&self.state_dir)
                .map_err(|e| cerr(format!("create `{}`", self.state_dir.display()), e))?;
            let mut env = SandboxEnv {
                id,
                dir: self.state_dir.clone(),
                upper: self.state_dir.join("upper"),
                spec: spec.clone(),
                cgroup: None,
                destroyed: false,
                _lease: None,
            };
            env.cgroup = limits_cgroup(&env.id, &spec.limits)
                .map_err(|e| cerr("set up cgroup limits".into(), e))?;
            return Ok(env);
        }
        let dir = self.state_dir.join(&id);
        std::fs::create_dir_all(dir.join("root"))
            .map_err(|e| cerr(format!("create `{}`", dir.display()), e))?;
        let lease = Some(take_lease(&dir.join("lease")).map_err(|e| cerr("take lease".into(), e))?);
        // A caller-owned upper folder (a layer being baked) outlives us.
        let upper = spec.upper.clone().unwrap_or_else(|| dir.join("upper"));
        let mut env = SandboxEnv {
            id: id.clone(),
            dir: dir.clone(),
            upper,
            spec: spec.clone(),
            cgroup: None,
            destroyed: false,
            _lease: lease,
        };
        std::fs::create_dir_all(&env.upper)
            .map_err(|e| cerr(format!("create `{}`", env.upper.display()), e))?;
        fs_err::create_dir_all(dir.join("work"))
            .map_err(|e| cerr("create overlay workdir".into(), e))?;
        env.cgroup =
            limits_cgroup(&id, &spec.limits).map_err(|e| cerr("set up cgroup limits".into(), e))?;
        Ok(env)
    }
}

/// The cgroup that enforces `limits`, if any. Without a usable hierarchy,
/// limits the user asked for fail the environment; slate's own defaults are
/// dropped, with one warning per process.
fn limits_cgroup(id: &str, limits: &Limits) -> std::io::Result<Option<cgroup::Cgroup>> {
    if limits.is_empty() {
        return Ok(None);
    }
    match cgroup::Cgroup::create(id, limits) {
        Ok(cg) => Ok(Some(cg)),
        Err(e) if limits.best_effort => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                eprintln!(
                    "warning: no usable cgroup hierarchy ({e}); environments run without slate's default pids limit (delegate cgroup v2 at /sys/fs/cgroup to enforce limits)"
                )
            });
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What `reap` removed.
#[derive(Debug, Default)]
pub struct Reaped {
    pub environments: usize,
    pub bytes: u64,
    pub cgroups: usize,
    /// Leftovers that could not be removed, with the reason; the rest were
    /// removed all the same.
    pub failed: Vec<(PathBuf, std::io::Error)>,
}

/// Removes environments whose owning slate process is gone. One that
/// cannot be removed (busy, immutable) is reported in `failed` and the
/// others are still removed.
pub fn reap(state_dir: &Path) -> Reaped {
    let mut r = Reaped::default();
    let Ok(rd) = fs_err::read_dir(state_dir) else {
        return r;
    };
    for e in rd.flatten() {
        if lease_held(&e.path().join("lease")) {
            continue;
        }
        if cgroup::reap_env(&e.file_name().to_string_lossy()) {
            r.cgroups += 1;
        }
        let bytes = fsutil::disk_usage(&e.path());
        match fsutil::remove_tree(&e.path()) {
            Ok(()) => {
                r.bytes += bytes;
                r.environments += 1;
            }
            Err(err) => r.failed.push((e.path(), err)),
        }
    }
    r.cgroups += cgroup::reap_leftovers();
    r
}

pub struct SandboxEnv {
    id: String,
    dir: PathBuf,
    upper: PathBuf,
    spec: EnvSpec,
    cgroup: Option<cgroup::Cgroup>,
    destroyed: bool,
    /// Held (locked) for the environment's lifetime; none when ephemeral.
    _lease: Option<slate_provider::lease::Lock>,
}

fn cstr(s: impl AsRef<[u8]>) -> CString {
    CString::new(s.as_ref().to_vec()).unwrap_or_else(|_| CString::new("?").unwrap())
}

fn cpath(p: &Path) -> CString {
    use std::os::unix::ffi::OsStrExt;
    cstr(p.as_os_str().as_bytes())
}

/// Namespaces a command gets: all but the network's when it has network.
fn unshare_flags(spec: &EnvSpec) -> libc::c_int {
    let mut flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWCGROUP;
    if !spec.network {
        flags |= libc::CLONE_NEWNET;
    }
    flags
}

/// Where `argv0` may be: itself when it has a slash, else each folder of
/// `path` (the command's own PATH, searched in advance).
fn exe_candidates(argv0: &str, path: &str) -> Vec<CString> {
    if argv0.contains('/') {
        vec![cstr(argv0)]
    } else {
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| cstr(format!("{d}/{argv0}")))
            .collect()
    }
}

/// The command's environment: defaults, the host's proxy variables when it
/// has network, the terminal's type when interactive, then its own.
fn command_env(env_spec: &EnvSpec, spec: &ExecSpec) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        if let Some(e) = env.iter_mut().find(|(ek, _)| ek == k) {
            e.1 = v.to_string();
        } else {
            env.push((k.to_string(), v.to_string()));
        }
    };
    set("PATH", DEFAULT_PATH);
    set("HOME", "/root");
    if env_spec.network {
        for (k, v) in hostnet::env(env_spec.host_ca) {
            set(&k, &v);
        }
    }
    if spec.interactive {
        set(
            "TERM",
            &std::env::var("TERM").unwrap_or_else(|_| "xterm".into()),
        );
    }
    for (k, v) in &spec.env {
        set(k, v);
    }
    env
}

/// `/dev`: a tmpfs holding bind mounts of the host's harmless devices, a
/// private devpts, the usual links, and `/dev/shm`.
fn dev_preps(r: &dyn Fn(&str) -> CString) -> Vec<Prep> {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV;
    let mut preps = vec![
        Prep::Mkdir(r("dev"), 0o755),
        // The device nodes below are bind mounts of the host's, which
        // keep working on a nodev tmpfs; nothing made here would.
        mount(
            "tmpfs",
            r("dev"),
            "tmpfs",
            nosuid | libc::MS_NOEXEC,
            Some("mode=0755,size=65536k"),
        ),
    ];
    for d in DEVICES {
        preps.push(Prep::Touch(r(&format!("dev/{d}"))));
        preps.push(mount(
            &format!("/dev/{d}"),
            r(&format!("dev/{d}")),
            "",
            libc::MS_BIND,
            None,
        ));
    }
    preps.extend([
        Prep::Mkdir(r("dev/pts"), 0o755),
        mount(
            "devpts",
            r("dev/pts"),
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ),
        Prep::Symlink(cstr("pts/ptmx"), r("dev/ptmx")),
        Prep::Symlink(cstr("/proc/self/fd"), r("dev/fd")),
        Prep::Symlink(cstr("/proc/self/fd/0"), r("dev/stdin")),
        Prep::Symlink(cstr("/proc/self/fd/1"), r("dev/stdout")),
        Prep::Symlink(cstr("/proc/self/fd/2"), r("dev/stderr")),
        Prep::Mkdir(r("dev/shm"), 0o1777),
        mount("tmpfs", r("dev/shm"), "tmpfs", nosuid, Some("mode=1777")),
    ]);
    preps
}

/// A mount the child makes.
fn mount(
    source: &str,
    target: CString,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Prep {
    Prep::Mount(Mount {
        source: cstr(source),
        target,
        fstype: cstr(fstype),
        flags,
        data: data.map(cstr),
        optional: false,
    })
}

/// Bind mounts of host files and folders: the spec's, and with network the
/// host's resolv.conf and (with `host_ca`) its CA bundle, read-only.
fn bind_preps(r: &dyn Fn(&str) -> CString, spec: &EnvSpec) -> Result<Vec<Prep>, String> {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV;
    let mut preps = Vec::new();
    let mut binds = spec.binds.clone();
    if spec.network && Path::new("/etc/resolv.conf").exists() {
        binds.push(Bind {
            host: PathBuf::from("/etc/resolv.conf"),
            guest: "/etc/resolv.conf".into(),
            readonly: true,
        });
    }
    if spec.network && spec.host_ca {
        // Under /run, a tmpfs in every environment: the mount point is
        // never written into a layer.
        let bundle = hostnet::host_ca_bundle()?;
        binds.push(Bind {
            host: bundle,
            guest: hostnet::CA_PATH.into(),
            readonly: true,
        });
    }
    for b in &binds {
        let guest = b.guest.trim_start_matches('/');
        let mut acc = String::new();
        let parts: Vec<&str> = guest.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            acc.push_str(part);
            preps.push(Prep::Mkdir(r(&acc), 0o755));
            acc.push('/');
        }
        if b.host.is_dir() {
            preps.push(Prep::Mkdir(r(guest), 0o755));
        } else {
            preps.push(Prep::Touch(r(guest)));
        }
        preps.push(mount(
            &b.host.display().to_string(),
            r(guest),
            "",
            libc::MS_BIND | libc::MS_REC,
            None,
        ));
        if b.readonly {
            preps.push(Prep::RemountRo(r(guest), nosuid));
        }
    }

    Ok(preps)
}

/// Everything that makes an environment's root, in order: the overlay,
/// `/proc` (masked), `/dev`, the tmpfs mounts, `/sys` and the cgroup
/// read-only, then the bind mounts. Deciding only: the child does it.
fn root_preps(dir: &Path, upper: &Path, spec: &EnvSpec) -> Result<Vec<Prep>, String> {
    let root = dir.join("root");
    let r = |p: &str| cpath(&root.join(p.trim_start_matches('/')));
    // Top first, as overlayfs wants them.
    let lower: Vec<CString> = spec.layers.iter().rev().map(|l| cpath(l)).collect();
    if lower.len() > MAX_LAYERS {
        return Err(format!(
            "the image has too many layers ({}, at most {MAX_LAYERS}) for one overlay mount",
            lower.len()
        ));
    }
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV;
    let mut preps = Vec::new();
    if spec.ephemeral {
        preps.extend([
            mount(
                "tmpfs",
                cpath(dir),
                "tmpfs",
                libc::MS_NOSUID | libc::MS_NODEV,
                Some("mode=0700"),
            ),
            Prep::Mkdir(cpath(upper), 0o755),
            Prep::Mkdir(cpath(&dir.join("work")), 0o700),
            Prep::Mkdir(cpath(&root), 0o755),
        ]);
    }
    preps.extend([
        // Everything the command can write is nosuid and nodev.
        Prep::Overlay {
            target: cpath(&root),
            lower,
            upper: cpath(upper),
            work: cpath(&dir.join("work")),
            flags: nosuid,
        },
        Prep::Mkdir(r("proc"), 0o555),
        mount("proc", r("proc"), "proc", nosuid | libc::MS_NOEXEC, None),
    ]);
    preps.extend(dev_preps(&r));
    preps.extend([
        Prep::Mkdir(r("tmp"), 0o1777),
        mount("tmpfs", r("tmp"), "tmpfs", nosuid, Some("mode=1777")),
        Prep::Mkdir(r("run"), 0o755),
        mount("tmpfs", r("run"), "tmpfs", nosuid, Some("mode=0755")),
        Prep::Mkdir(r("sys"), 0o555),
    ]);
    if let Prep::Mount(m) = mount(
        "sysfs",
        r("sys"),
        "sysfs",
        nosuid | libc::MS_NOEXEC | libc::MS_RDONLY,
        None,
    ) {
        preps.push(Prep::Mount(Mount {
            optional: true,
            ..m
        }));
    }
    // The environment's own cgroup (a cgroup namespace makes it the
    // root), read-only: limits are visible, leaving is not possible.
    preps.push(Prep::Mount(Mount {
        source: cstr("cgroup2"),
        target: r("sys/fs/cgroup"),
        fstype: cstr("cgroup2"),
        flags: nosuid | libc::MS_NOEXEC | libc::MS_RDONLY,
        data: None,
        optional: true,
    }));
    preps.extend(proc_masks(&r));
    preps.extend(bind_preps(&r, spec)?);
    Ok(preps)
}

impl SandboxEnv {
    fn err(&self, op: impl Into<String>, e: std::io::Error) -> ProviderError {
        ProviderError::op(&self.id, op, e)
    }

    /// The host path of `guest` in the upper folder, refusing paths that climb out.
    fn upper_path(&self, guest: &str) -> Result<PathBuf, ProviderError> {
        if self.spec.ephemeral {
            return Err(ProviderError::Other {
                env: self.id.clone(),
                what: format!("cannot copy `{guest}` in or out of an ephemeral environment"),
            });
        }
        let rel = guest.trim_start_matches('/');
        if rel.split('/').any(|c| c == "..") {
            return Err(ProviderError::Other {
                env: self.id.clone(),
                what: format!("path `{guest}` leaves the environment"),
            });
        }
        Ok(self.upper.join(rel))
    }

    fn plan(&self, spec: &ExecSpec, status_fd: libc::c_int) -> Result<Plan, ProviderError> {
        let other = |what: String| ProviderError::Other {
            env: self.id.clone(),
            what,
        };
        let root = self.dir.join("root");
        let preps = root_preps(&self.dir, &self.upper, &self.spec).map_err(other)?;
        let env = command_env(&self.spec, spec);
        let path_var = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or_default();
        let argv0 = spec
            .argv
            .first()
            .ok_or_else(|| other("empty command".into()))?;
        let exe_candidates = exe_candidates(argv0, path_var);
        if spec.argv.len() > child::MAX_ARGS || env.len() > child::MAX_ARGS {
            return Err(other(format!(
                "more than {} arguments or environment variables",
                child::MAX_ARGS
            )));
        }
        Ok(Plan {
            // SAFETY: getpid has no preconditions.
            parent_pid: unsafe { libc::getpid() },
            status_fd,
            cgroup_procs: self
                .cgroup
                .iter()
                .flat_map(|c| c.procs_files())
                .map(|p| cpath(&p))
                .collect(),
            unshare_flags: unshare_flags(&self.spec),
            root: cpath(&root),
            preps,
            // The kernel takes at most 64 bytes (`bake-` and a long image
            // name can exceed it).
            hostname: cstr(hostname(&self.spec.name)),
            loopback_up: !self.spec.network,
            cwd: cstr(if spec.cwd.is_empty() { "/" } else { &spec.cwd }),
            exe_candidates,
            argv: spec.argv.iter().map(cstr).collect(),
            envp: env.iter().map(|(k, v)| cstr(format!("{k}={v}"))).collect(),
            new_session: !spec.interactive,
            caps_keep: match self.spec.privileges {
                Privileges::None => 0,
                Privileges::Packages => seccomp::PACKAGE_CAPS,
            },
            seccomp: seccomp::program(),
        })
    }

    /// The status pipe, close-on-exec: the read end, and the write end the
    /// sandbox reports a failed setup step on.
    fn status_pipe(&self) -> Result<(std::fs::File, libc::c_int), ProviderError> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid two-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(self.err("create status pipe", std::io::Error::last_os_error()));
        }
        // SAFETY: pipe2 returned two fresh descriptors that we now own.
        let status_r = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        Ok((status_r, fds[1]))
    }

    /// The command that starts the sandbox: slate's own binary, which runs
    /// `child::outer` with the plan between fork and exec. `status_w` is
    /// closed when there is no plan.
    fn sandbox_command(
        &self,
        spec: &ExecSpec,
        status_w: libc::c_int,
    ) -> Result<Command, ProviderError> {
        let plan = match self.plan(spec, status_w) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: closing the descriptor we own.
                unsafe { libc::close(status_w) };
                return Err(e);
            }
        };
        let mut cmd = Command::new("/proc/self/exe");
        if spec.interactive {
            cmd.stdin(Stdio::inherit())
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit());
        } else {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
        // SAFETY: `outer` only makes async-signal-safe calls on preallocated data.
        unsafe {
            cmd.pre_exec(move || child::outer(&plan));
        }
        Ok(cmd)
    }

    /// Reads the status pipe to its end: empty when the command was started,
    /// else the failed setup step, reported once the child is gone.
    fn check_setup(
        &self,
        status_r: &mut std::fs::File,
        child: &mut std::process::Child,
    ) -> Result<(), ProviderError> {
        let mut status = Vec::new();
        let _ = status_r.read_to_end(&mut status);
        if !status.is_empty() {
            let _ = child.kill();
            let _ = child.wait();
            let (step, errno) = decode_status(&status);
            return Err(ProviderError::Create {
                env: self.id.clone(),
                what: step,
                source: errno,
            });
        }
        Ok(())
    }

    fn destroy_inner(&mut self) -> Result<(), ProviderError> {
        if self.destroyed {
            return Ok(());
        }
        self.destroyed = true;
        let mut first: Option<ProviderError> = None;
        if let Some(cg) = &self.cgroup {
            if let Err(e) = cg.destroy() {
                first = Some(self.err("remove cgroup", e));
            }
        }
        if self.spec.ephemeral {
            // Nothing on disk: the tmpfs went with the mount namespace.
        } else if let Err(e) = fsutil::remove_tree(&self.dir) {
            first.get_or_insert(self.err(format!("remove `{}`", self.dir.display()), e));
        }
        first.map_or(Ok(()), Err)
    }
}

/// One of the command's output pipes: its descriptor, its stream, its unfinished line.
type OutputPipe = (i32, Stream, LineSplitter);

/// Passes the command's output to `out` line by line until its pipes close,
/// killing it on cancel or timeout; says which stopped it.
fn relay_output(
    pid: libc::pid_t,
    stdout: Option<&ChildStdout>,
    stderr: Option<&ChildStderr>,
    out: &mut dyn OutputSink,
    cancel: &Cancel,
) -> Option<ExecOutcome> {
    let mut fds: Vec<OutputPipe> = Vec::new();
    use std::os::fd::AsRawFd;
    if let Some(s) = stdout {
        fds.push((s.as_raw_fd(), Stream::Stdout, LineSplitter::default()));
    }
    if let Some(s) = stderr {
        fds.push((s.as_raw_fd(), Stream::Stderr, LineSplitter::default()));
    }
    let mut stop: Option<ExecOutcome> = None;
    let mut buf = vec![0u8; 65536];
    while !fds.is_empty() {
        let mut pfds: Vec<libc::pollfd> = fds
            .iter()
            .map(|(fd, _, _)| libc::pollfd {
                fd: *fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: pfds is a valid array of pollfd for its length.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) };
        if n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
        read_ready(&pfds, &mut fds, &mut buf, out);
        if stop.is_none() {
            if cancel.is_cancelled() {
                stop = Some(ExecOutcome::Cancelled);
            } else if cancel.timed_out() {
                stop = Some(ExecOutcome::TimedOut);
            }
            if stop.is_some() {
                // SAFETY: signalling our own child; PDEATHSIG takes init
                // and so the whole PID namespace down with it.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    stop
}

/// Reads the pipes `poll` found ready, passing whole lines on; a pipe at
/// its end gives its last line and is dropped from `fds`.
fn read_ready(
    pfds: &[libc::pollfd],
    fds: &mut Vec<OutputPipe>,
    buf: &mut [u8],
    out: &mut dyn OutputSink,
) {
    let mut closed = Vec::new();
    for (i, p) in pfds.iter().enumerate() {
        if p.revents == 0 {
            continue;
        }
        // SAFETY: reading into our buffer from a descriptor we own.
        let r = unsafe { libc::read(p.fd, buf.as_mut_ptr().cast(), buf.len()) };
        if r <= 0 {
            closed.push(i);
            continue;
        }
        let (_, stream, splitter) = &mut fds[i];
        let stream = *stream;
        splitter.push(&buf[..r as usize], |l| out.line(stream, l));
    }
    for i in closed.into_iter().rev() {
        let (_, stream, mut splitter) = fds.remove(i);
        splitter.finish(|l| out.line(stream, l));
    }
}

/// The outcome of a command that ran to its end: a shell-style code over
/// 128 is the signal that killed it.
fn exit_outcome(st: std::process::ExitStatus) -> ExecOutcome {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) if c > 128 && c < 128 + 65 => ExecOutcome::Signaled(c - 128),
        (Some(c), _) => ExecOutcome::Exited(c),
        (None, Some(s)) => ExecOutcome::Signaled(s),
        _ => ExecOutcome::Exited(-1),
    }
}

fn decode_status(buf: &[u8]) -> (String, Option<std::io::Error>) {
    let mut parts = buf.splitn(2, |&b| b == 0);
    let step = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let errno = parts
        .next()
        .and_then(|e| std::str::from_utf8(e).ok())
        .and_then(|e| e.parse::<i32>().ok())
        .map(std::io::Error::from_raw_os_error);
    (step, errno)
}

impl Environment for SandboxEnv {
    fn id(&self) -> &str {
        &self.id
    }

    fn put(&mut self, base: &Path, entries: &[PathBuf], dest: &str) -> Result<u64, ProviderError> {
        let to = self.upper_path(dest)?;
        fsutil::copy_entries(base, entries, &to)
            .map_err(|e| self.err(format!("copy inputs into `{dest}`"), e))
    }

    fn put_bytes(&mut self, data: &[u8], dest: &str, mode: u32) -> Result<(), ProviderError> {
        use std::os::unix::fs::PermissionsExt;
        let to = self.upper_path(dest)?;
        let res = (|| {
            if let Some(p) = to.parent() {
                fs_err::create_dir_all(p)?;
            }
            fs_err::write(&to, data)?;
            fs_err::set_permissions(&to, std::fs::Permissions::from_mode(mode))
        })();
        res.map_err(|e| self.err(format!("write `{dest}`"), e))
    }

    fn exec(
        &mut self,
        spec: &ExecSpec,
        out: &mut dyn OutputSink,
        cancel: &Cancel,
    ) -> Result<ExecOutcome, ProviderError> {
        let (mut status_r, status_w) = self.status_pipe()?;
        let mut cmd = self.sandbox_command(spec, status_w)?;
        let spawned = cmd.spawn();
        // SAFETY: the child has its own copy; ours must go so EOF can arrive.
        unsafe { libc::close(status_w) };
        let mut child = spawned.map_err(|e| self.err("start sandbox process", e))?;
        self.check_setup(&mut status_r, &mut child)?;

        let pid = child.id() as libc::pid_t;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let stop = relay_output(pid, stdout.as_ref(), stderr.as_ref(), out, cancel);
        // An interactive command owns the terminal: Ctrl-C reaches it directly,
        // so we simply wait for it.
        let st = child.wait().map_err(|e| self.err("wait for sandbox", e))?;
        drop((stdout, stderr));
        if let Some(s) = stop {
            return Ok(s);
        }
        Ok(exit_outcome(st))
    }

    fn list(&mut self, dir: &str) -> Result<Vec<String>, ProviderError> {
        let base = self.upper_path(dir)?;
        fsutil::list_files(&base).map_err(|e| self.err(format!("list `{dir}`"), e))
    }

    fn fetch(&mut self, src: &str, dest: &Path) -> Result<u64, ProviderError> {
        let from = self.upper_path(src)?;
        fsutil::copy_no_follow(&self.upper, &from, dest)
            .map_err(|e| self.err(format!("copy out `{src}`"), e))
    }

    fn destroy(mut self) -> Result<(), ProviderError> {
        self.destroy_inner()
    }

    fn keep(mut self, dest: &Path) -> Result<(), ProviderError> {
        if self.spec.ephemeral {
            let _ = self.destroy_inner();
            return Err(self.err(
                "keep",
                std::io::Error::other("an ephemeral environment has nothing on disk to keep"),
            ));
        }
        // Nothing may still write to it: the cgroup's processes go first.
        if let Some(cg) = &self.cgroup {
            let _ = cg.destroy();
        }
        self.cgroup = None;
        let kept = fs_err::create_dir_all(dest)
            .and_then(|()| fs_err::rename(&self.upper, dest.join("upper")));
        let destroyed = self.destroy_inner();
        kept.map_err(|e| self.err(format!("keep it in `{}`", dest.display()), e))?;
        destroyed
    }
}

impl Drop for SandboxEnv {
    fn drop(&mut self) {
        let _ = self.destroy_inner();
    }
}

/// `name` cut to the 64 bytes a hostname may have, at a character boundary.
fn hostname(name: &str) -> &str {
    let mut end = name.len().min(64);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(c: &CString) -> &str {
        c.to_str().unwrap()
    }

    const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;

    /// The mount plan, decided without root: what every environment gets,
    /// checked where it is decided rather than only inside one.
    #[test]
    fn the_root_plan_is_nosuid_nodev_where_writable_and_read_only_where_kernel() {
        let t = tempfile::tempdir().unwrap();
        let spec = EnvSpec {
            name: "t".into(),
            layers: vec![t.path().join("l1"), t.path().join("l2")],
            ..Default::default()
        };
        let preps = root_preps(&t.path().join("env"), &t.path().join("up"), &spec).unwrap();
        let root = t.path().join("env/root");
        let at = |p: &str| root.join(p).display().to_string();
        let mut mounts = std::collections::BTreeMap::new();
        for p in &preps {
            match p {
                Prep::Overlay {
                    target,
                    lower,
                    flags,
                    ..
                } => {
                    assert_eq!(text(target), root.display().to_string());
                    // Top layer first.
                    assert_eq!(text(&lower[0]), t.path().join("l2").display().to_string());
                    assert_eq!(flags & NOSUID_NODEV, NOSUID_NODEV, "the root");
                }
                Prep::Mount(m) => {
                    mounts.insert(text(&m.target).to_string(), m);
                }
                _ => {}
            }
        }
        // Everything the build can write: nosuid and nodev.
        for p in ["dev", "dev/shm", "tmp", "run"] {
            let m = mounts[&at(p)];
            assert_eq!(text(&m.fstype), "tmpfs", "{p}");
            assert_eq!(m.flags & NOSUID_NODEV, NOSUID_NODEV, "{p}");
        }
        // The kernel's: read-only.
        for p in ["sys", "sys/fs/cgroup"] {
            assert_ne!(mounts[&at(p)].flags & libc::MS_RDONLY, 0, "{p}");
        }
        // /proc/sys and /proc/sysrq-trigger: bound over themselves, then
        // made read-only; /proc/kcore: hidden.
        let remounted: Vec<String> = preps
            .iter()
            .filter_map(|p| match p {
                Prep::RemountRo(t, _) => Some(text(t).to_string()),
                _ => None,
            })
            .collect();
        assert!(remounted.contains(&at("proc/sys")), "{remounted:?}");
        if Path::new("/proc/kcore").exists() {
            assert_eq!(text(&mounts[&at("proc/kcore")].source), "/dev/null");
        }
        // Only the harmless devices, bound from the host.
        let devices: Vec<&str> = mounts
            .values()
            .filter(|m| m.flags & libc::MS_BIND != 0 && text(&m.source).starts_with("/dev/"))
            .map(|m| text(&m.source))
            .collect();
        for d in &devices {
            assert!(
                [
                    "/dev/null",
                    "/dev/zero",
                    "/dev/full",
                    "/dev/random",
                    "/dev/urandom",
                    "/dev/tty"
                ]
                .contains(d),
                "a host device in the plan: {d}"
            );
        }
        // No network and every namespace, unless the spec asks for network.
        assert_ne!(unshare_flags(&spec) & libc::CLONE_NEWNET, 0);
        let online = EnvSpec {
            network: true,
            ..spec.clone()
        };
        assert_eq!(unshare_flags(&online) & libc::CLONE_NEWNET, 0);
        assert_ne!(unshare_flags(&online) & libc::CLONE_NEWCGROUP, 0);
    }

    /// A provider never makes another provider's kind of environment: a vm
    /// target handed to the sandbox is an error, not a sandbox.
    #[test]
    fn the_sandbox_refuses_to_stand_in_for_a_vm() {
        let t = tempfile::tempdir().unwrap();
        let spec = EnvSpec {
            name: "t".into(),
            layers: vec![t.path().to_path_buf()],
            kind: EnvKind::Vm,
            ..Default::default()
        };
        let e = SandboxProvider::new(t.path().join("envs"))
            .create(&spec)
            .err()
            .expect("refused");
        assert!(
            e.to_string().contains("cannot make a vm environment"),
            "{e}"
        );
    }
}
