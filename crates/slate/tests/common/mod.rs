//! What slate's CLI tests share: temp projects run by the real binary, the
//! checks that fail a test whose host lacks what it needs, a process scan,
//! and real servers (an OCI registry, an S3-compatible store) on loopback.
//!
//! Tests that need root are named `root_*` and carry `#[ignore = "needs
//! root…"]`, so a plain `cargo test` lists them as ignored with the reason;
//! `scripts/test.sh` runs them as root with `--include-ignored`. A test that
//! runs gets what it needs or fails, naming what to install: it never
//! returns early and reports a pass.

// Each test binary (cli, vm, debian) uses its own subset of these helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// Fails the test unless it runs as root.
#[track_caller]
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "this test needs root; run it through scripts/test.sh as root"
    );
}

/// Fails the test unless `command` is installed, naming the Debian package
/// that has it; returns where it is.
#[track_caller]
pub fn require_tool(command: &str, package: &str) -> PathBuf {
    find_tool(command).unwrap_or_else(|| {
        panic!(
            "this test needs `{command}`: install {package} (scripts/install-deps.sh installs it)"
        )
    })
}

/// Fails the test unless a Debian bootstrap tool is installed: mmdebstrap,
/// or debootstrap (slate's slower fallback).
#[track_caller]
pub fn require_debian_bootstrap() {
    assert!(
        find_tool("mmdebstrap").is_some() || find_tool("debootstrap").is_some(),
        "this test bootstraps Debian and needs `mmdebstrap` (or `debootstrap`): install mmdebstrap (scripts/install-deps.sh installs it)"
    );
}

/// Where `command` is: on `PATH`, or in the sbin folders root's `PATH` has
/// (where slate looks too).
fn find_tool(command: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(command))
        .find(|p| p.is_file())
}

/// A project in a temp folder, run by the real `slate` binary with `-C`.
pub struct Project {
    dir: tempfile::TempDir,
    project: PathBuf,
    /// slate's cache (`SLATE_CACHE`) for this project's commands.
    pub cache: PathBuf,
}

impl Project {
    /// A project whose config may use `tar:bb.tar.gz`, a busybox rootfs (a
    /// base image that needs no network), with a cache of its own.
    pub fn new(config: &str) -> Project {
        let p = Project::config_only(config);
        busybox_tar(&p.project().join("bb.tar.gz"));
        p
    }

    /// A project of just its config, with a cache of its own: for tests
    /// that stop at the config and so need no base image.
    pub fn config_only(config: &str) -> Project {
        let dir = tempfile::tempdir().unwrap();
        let p = Project {
            project: dir.path().join("project"),
            cache: dir.path().join("cache"),
            dir,
        };
        p.write("slate.toml", config);
        p
    }

    /// A project whose images start from Debian. Its cache is the one all
    /// such tests share in this build folder, so Debian is bootstrapped and
    /// its packages installed once, not once per test.
    pub fn debian(config: &str) -> Project {
        let dir = tempfile::tempdir().unwrap();
        let p = Project {
            project: dir.path().join("project"),
            cache: shared_cache(),
            dir,
        };
        p.write("slate.toml", config);
        p
    }

    /// A copy of `examples/<name>` (its files, as shipped), in the shared
    /// Debian cache.
    pub fn example(name: &str) -> Project {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples")
            .join(name);
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join(name);
        std::fs::create_dir_all(&project).unwrap();
        for e in std::fs::read_dir(&src).unwrap().flatten() {
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), project.join(e.file_name())).unwrap();
            }
        }
        Project {
            dir,
            project,
            cache: shared_cache(),
        }
    }

    /// The same project with a new, empty cache of its own.
    pub fn with_own_cache(mut self) -> Project {
        self.cache = self.dir.path().join("cache");
        self
    }

    /// The temp folder: the project, its cache (unless shared), and room
    /// for whatever else a test makes.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The project folder, where `slate.toml` is.
    pub fn project(&self) -> PathBuf {
        self.project.clone()
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.project().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// A file of the project as text; empty when it is missing.
    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.project().join(rel)).unwrap_or_default()
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_slate"));
        c.arg("-C")
            .arg(self.project())
            .args(args)
            .env("SLATE_CACHE", &self.cache)
            .env("NO_COLOR", "1");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// The newest run's id and folder (`.slate/runs/<id>`): by the start
    /// its record names (ids of runs that start within one second sort by
    /// their random part).
    pub fn last_run(&self) -> (String, PathBuf) {
        let runs = self.project().join(".slate/runs");
        let started = |dir: &Path| -> f64 {
            std::fs::read_to_string(dir.join("run.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v["started"].as_f64())
                .unwrap_or(0.0)
        };
        let dir = std::fs::read_dir(&runs)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .max_by(|a, b| started(a).total_cmp(&started(b)))
            .expect("a run");
        let id = dir.file_name().unwrap().to_string_lossy().into_owned();
        (id, dir)
    }

    /// slate `args` (one shell word each, unquoted) on a real terminal, as
    /// a person would run it: util-linux `script` gives it a
    /// pseudo-terminal, whose input is `input`. NO_COLOR is not set
    /// unless `env` sets it.
    pub fn on_terminal(&self, args: &str, input: &[u8], env: &[(&str, &str)]) -> Output {
        let slate = format!(
            "{} -C {} {args}",
            env!("CARGO_BIN_EXE_slate"),
            self.project().display()
        );
        let mut child = Command::new(require_tool("script", "bsdutils"))
            .args(["-qec", &slate, "/dev/null"])
            .env("SLATE_CACHE", &self.cache)
            .env_remove("NO_COLOR")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    /// `slate shell --keep ID` on a terminal, typing `input`: what it
    /// printed.
    pub fn enter_kept(&self, id: &str, input: &[u8]) -> String {
        let o = self.on_terminal(&format!("shell --keep {id}"), input, &[]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Environment folders left in the cache.
    pub fn envs_left(&self) -> usize {
        std::fs::read_dir(self.cache.join("v1/envs"))
            .map(|r| r.count())
            .unwrap_or(0)
    }

    /// Mounts left under the cache.
    pub fn mounts_left(&self) -> Vec<String> {
        let cache = self.cache.display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&cache))
            .map(str::to_string)
            .collect()
    }
}

/// The cache the Debian and VM tests share, under the build folder, so
/// later runs reuse what earlier runs baked.
pub fn shared_cache() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("slate-cache")
}

/// A busybox rootfs tarball at `to`.
fn busybox_tar(to: &Path) {
    let root = to.with_extension("rootfs");
    for d in ["bin", "etc", "root", "var", "tmp", "proc", "dev", "sys"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("this test needs a static `busybox` for its base image: install busybox-static (scripts/install-deps.sh installs it)");
    std::fs::copy(bb, root.join("bin/busybox")).unwrap();
    let list = Command::new(bb).arg("--list").output().unwrap();
    for name in String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|n| *n != "busybox")
    {
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(name));
    }
    let st = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-czf")
        .arg(to)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_dir_all(&root).unwrap();
}

/// A command's stdout, then its stderr.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Running processes whose command line (its arguments joined by spaces)
/// passes `keep`, each as `pid: command line`.
pub fn processes_where(keep: impl Fn(&str) -> bool) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if keep(&cmd) {
                out.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    out
}

/// Calls `probe` until `done` holds for what it returns, or 20 s pass;
/// returns the last answer. For what the kernel does asynchronously — a
/// parent-death signal delivered as slate dies, a fork about to exec —
/// never as a stand-in for synchronisation slate owes its caller.
pub fn settle(probe: impl Fn() -> Vec<String>, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let mut last = probe();
    for _ in 0..1000 {
        if done(&last) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        last = probe();
    }
    last
}

/// Running processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<String> {
    processes_where(|cmd| cmd.contains(marker))
}

/// Starts `cmd` with its output piped and returns once it prints a line
/// containing `marker`. Its stdout is drained to the end, so it never writes
/// to a closed pipe; its stderr is left to the caller.
pub fn spawn_until_printed(mut cmd: Command, marker: &str) -> Child {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = marker.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains(&wanted) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv()
        .unwrap_or_else(|_| panic!("the command ended without printing `{marker}`"));
    child
}

/// A real OCI registry: Debian's docker-registry on a free loopback port,
/// with its own config and storage, stopped when dropped.
pub struct Registry {
    child: Child,
    pub addr: String,
}

impl Registry {
    /// Starts a registry keeping its data under `dir`; fails the test when
    /// docker-registry is not installed.
    #[track_caller]
    pub fn start(dir: &Path) -> Registry {
        let bin = require_tool("docker-registry", "docker-registry");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let cfg = dir.join("registry.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\nhttp: {{addr: {addr}}}\n",
                dir.join("regdata").display()
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let reg = Registry { child, addr };
        // Ready when /v2/ answers (bounded: 10 s).
        for _ in 0..500 {
            if reg.answers() {
                return reg;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("the registry did not start on {}", reg.addr);
    }

    fn answers(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(&self.addr) else {
            return false;
        };
        let _ = write!(s, "GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real S3-compatible server: s3s-fs (it checks SigV4 signatures) on a
/// free loopback port, serving a temp folder; stopped when dropped. Access
/// key `test`, secret key `testsecret`.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
    pub data: PathBuf,
}

impl S3Server {
    pub const ACCESS_KEY: &'static str = "test";
    pub const SECRET_KEY: &'static str = "testsecret";

    /// Starts a server with one bucket, keeping its data under `dir`; fails
    /// the test when s3s-fs, or the aws CLI the tests check it with, is
    /// missing. `scripts/test.sh` installs s3s-fs into `target/tools`.
    #[track_caller]
    pub fn start(dir: &Path, bucket: &str) -> S3Server {
        let in_target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/tools/bin/s3s-fs");
        let bin = std::env::var_os("SLATE_TEST_S3S_FS")
            .map(PathBuf::from)
            .into_iter()
            .chain([in_target])
            .find(|p| p.exists())
            .expect("this test needs s3s-fs, an S3-compatible server: scripts/test.sh installs it into target/tools (or set SLATE_TEST_S3S_FS to one)");
        require_tool("aws", "awscli");
        let data = dir.join("s3data");
        std::fs::create_dir_all(data.join(bucket)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--access-key",
                Self::ACCESS_KEY,
                "--secret-key",
                Self::SECRET_KEY,
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s = S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            data,
        };
        // Ready when it answers HTTP at all (bounded: 10 s).
        for _ in 0..500 {
            if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = write!(c, "GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
                let mut buf = String::new();
                let _ = c.read_to_string(&mut buf);
                if buf.starts_with("HTTP/") {
                    return s;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("s3s-fs did not start on {}", s.endpoint);
    }

    /// The environment an AWS client needs to talk to this server only.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", Self::ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", Self::SECRET_KEY.into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            ("AWS_DEFAULT_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
        ]
    }

    /// The aws CLI (an independent client), pointed at this server.
    pub fn aws(&self, args: &[&str]) -> std::process::Output {
        let out = Command::new("aws")
            .args(["--endpoint-url", &self.endpoint])
            .args(args)
            .envs(self.env())
            .output()
            .expect("the aws CLI runs");
        out
    }

    /// Downloads a published run with the aws CLI, file by file: `SHA256SUMS`,
    /// `manifest.json` and every file `SHA256SUMS` names. (Not `s3 cp
    /// --recursive`: s3s-fs does not escape `+` in url-encoded listings, so
    /// the CLI would turn `1.0+deb` into `1.0 deb`.)
    pub fn fetch_run(&self, url: &str, to: &Path) {
        for name in ["SHA256SUMS", "manifest.json"] {
            let o = self.aws(&[
                "s3",
                "cp",
                &format!("{url}/{name}"),
                to.join(name).to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let sums = std::fs::read_to_string(to.join("SHA256SUMS")).unwrap();
        for line in sums.lines() {
            let rel = line.split_once("  ").unwrap().1;
            let o = self.aws(&[
                "s3",
                "cp",
                &format!("{url}/{rel}"),
                to.join(rel).to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Build hosts for the ssh provider: real OpenSSH servers on free loopback
/// ports of this machine, each with its own host key and its own slate
/// cache (sshd's `SetEnv SLATE_CACHE`), so each holds what was shipped to it
/// alone. One client key logs in to all of them. Stopped when dropped.
pub struct SshHosts {
    dir: PathBuf,
    pub hosts: Vec<SshHost>,
}

pub struct SshHost {
    child: Option<Child>,
    pub port: u16,
    /// The host's slate cache.
    pub cache: PathBuf,
    config: PathBuf,
}

impl SshHosts {
    /// Starts `n` servers keeping their files under `dir`; fails the test
    /// when OpenSSH is not installed.
    #[track_caller]
    pub fn start(dir: &Path, n: usize) -> SshHosts {
        SshHosts::start_with(dir, &vec![""; n])
    }

    /// Like [`SshHosts::start`], one host per entry of `extra`, whose lines
    /// are added to that host's sshd_config.
    #[track_caller]
    pub fn start_with(dir: &Path, extra: &[&str]) -> SshHosts {
        SshHosts::start_on(dir, "127.0.0.1", extra)
    }

    /// Like [`SshHosts::start_with`], listening on `listen` (an address,
    /// or `0.0.0.0` for all of a network namespace's own).
    #[track_caller]
    pub fn start_on(dir: &Path, listen: &str, extra: &[&str]) -> SshHosts {
        let sshd = require_tool("sshd", "openssh-server");
        require_tool("ssh", "openssh-client");
        let keygen = require_tool("ssh-keygen", "openssh-client");
        std::fs::create_dir_all(dir).unwrap();
        // sshd's privilege separation folder.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let gen = |path: &Path| {
            let o = Command::new(&keygen)
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(path)
                .output()
                .unwrap();
            assert!(o.status.success(), "ssh-keygen: {}", text(&o));
        };
        gen(&dir.join("client_key"));
        let client_pub = std::fs::read_to_string(dir.join("client_key.pub")).unwrap();
        let mut known = String::new();
        let mut hosts = Vec::new();
        for (i, extra) in extra.iter().enumerate() {
            let h = dir.join(format!("host{i}"));
            std::fs::create_dir_all(&h).unwrap();
            gen(&h.join("host_key"));
            std::fs::write(h.join("authorized_keys"), &client_pub).unwrap();
            let port = free_port();
            let cache = h.join("cache");
            let config = h.join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "Port {port}\nListenAddress {listen}\nHostKey {hk}\nAuthorizedKeysFile {ak}\n\
                     PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                     StrictModes no\nPermitRootLogin prohibit-password\nPidFile {pid}\n\
                     MaxSessions 64\nMaxStartups 64\nSetEnv SLATE_CACHE={cache}\n{extra}\n",
                    hk = h.join("host_key").display(),
                    ak = h.join("authorized_keys").display(),
                    pid = h.join("sshd.pid").display(),
                    cache = cache.display(),
                    extra = extra,
                ),
            )
            .unwrap();
            let host_pub = std::fs::read_to_string(h.join("host_key.pub")).unwrap();
            let mut fields = host_pub.split_whitespace();
            known.push_str(&format!(
                "[127.0.0.1]:{port} {} {}\n",
                fields.next().unwrap(),
                fields.next().unwrap()
            ));
            let mut host = SshHost {
                child: None,
                port,
                cache,
                config,
            };
            host.start(&sshd);
            hosts.push(host);
        }
        std::fs::write(dir.join("known_hosts"), known).unwrap();
        SshHosts {
            dir: dir.to_path_buf(),
            hosts,
        }
    }

    /// The client key every host lets in.
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client_key")
    }

    /// The `[providers.ssh]` section naming these hosts.
    pub fn config(&self, slots: usize) -> String {
        let hosts: Vec<String> = self
            .hosts
            .iter()
            .map(|h| format!("\"127.0.0.1:{}\"", h.port))
            .collect();
        format!(
            "[providers.ssh]\nhosts = [{}]\nidentity = \"{}\"\nknown_hosts_file = \"{}\"\nslots = {slots}\n",
            hosts.join(", "),
            self.dir.join("client_key").display(),
            self.dir.join("known_hosts").display()
        )
    }
}

impl SshHost {
    fn start(&mut self, sshd: &Path) {
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        // Ready when the port answers with sshd's banner (bounded: 10 s).
        for _ in 0..500 {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let mut banner = [0u8; 4];
                if s.read_exact(&mut banner).is_ok() && &banner == b"SSH-" {
                    return;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("sshd did not start on port {}", self.port);
    }

    /// Processes under this host's sshd whose command line contains
    /// `marker`, as `pid: command line`.
    pub fn processes_with(&self, marker: &str) -> Vec<String> {
        let Some(sshd) = &self.child else {
            return vec![];
        };
        descendants(sshd.id())
            .into_iter()
            .filter_map(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                cmd.contains(marker).then(|| format!("{pid}: {cmd}"))
            })
            .collect()
    }

    /// The host goes down: its sshd and every process under it (the
    /// sessions, the host's slate, its sandboxes) are killed at once.
    pub fn crash(&mut self) {
        let Some(mut sshd) = self.child.take() else {
            return;
        };
        // Stopped first, so that nothing new starts, and found before any
        // dies, while each is still its parent's child.
        let all: Vec<u32> = std::iter::once(sshd.id())
            .chain(descendants(sshd.id()))
            .collect();
        for &pid in &all {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        }
        let all: Vec<u32> = std::iter::once(sshd.id())
            .chain(descendants(sshd.id()))
            .collect();
        for &pid in &all {
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = sshd.wait();
    }
}

/// Every process below `root`, from /proc's parent links.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        if let Some(ppid) = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
        {
            parent.insert(pid, ppid);
        }
    }
    let mut out = vec![];
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (&child, &pp) in &parent {
            if pp == p {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

impl Drop for SshHost {
    fn drop(&mut self) {
        // The sessions too: a master connection of slate's may keep one
        // open for a minute after its run.
        self.crash();
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
