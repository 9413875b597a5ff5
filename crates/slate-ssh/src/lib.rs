//! The ssh provider: each environment is made on one host of a pool of
//! existing Linux machines, by slate's own sandbox there, and driven over
//! an OpenSSH connection with the same requests a VM's guest agent answers
//! ([`slate_provider::session`]).
//!
//! What a host lacks is shipped once and by content: slate's own binary
//! (`$SLATE_CACHE/bin/slate-<sha256>` there) and the image's layers (only
//! the keys the host's store does not hold). One OpenSSH master connection
//! per host carries every session of a run (`ControlMaster`), so an
//! environment costs a new channel, not a new handshake.
//!
//! Faults: a host that cannot be reached, or whose connection ends while a
//! target runs, is set aside for the rest of the run (said once); the
//! target's environment counts as lost, which the orchestrator retries on
//! another host. When slate dies, the connection goes with it and the host's
//! slate destroys the environment (the standard input ends); a host that
//! went down mid-build keeps a leased folder that its next run (or
//! `slate gc` there) removes.

pub mod serve;

use serde::{Deserialize, Serialize};
use slate_provider::session::{Carrier, Session};
use slate_provider::wire;
use slate_provider::{
    Cancel, EnvSpec, Environment, ExecOutcome, ExecSpec, OutputSink, Provider, ProviderError,
};
use std::collections::{HashSet, VecDeque};
use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What slate asks a host's slate to make: the layers by key (the host's
/// own store holds them), the rest as in an [`EnvSpec`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteSpec {
    pub name: String,
    pub layers: Vec<String>,
    pub network: bool,
    pub host_ca: bool,
    pub cpus: Option<f64>,
    pub memory: Option<u64>,
    pub pids: Option<u64>,
    pub limits_best_effort: bool,
}

/// How host keys are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KnownHosts {
    /// Only hosts whose key is already known (OpenSSH's `yes`).
    #[default]
    Strict,
    /// A new host's key is learnt, a changed one refused.
    AcceptNew,
}

#[derive(Debug, Clone)]
pub struct SshSettings {
    /// `host`, `host:port` or `[v6-address]:port`.
    pub hosts: Vec<String>,
    pub user: String,
    pub identity: Option<PathBuf>,
    pub known_hosts: KnownHosts,
    /// In place of OpenSSH's own `~/.ssh/known_hosts`.
    pub known_hosts_file: Option<PathBuf>,
    /// Environments at once per host.
    pub slots: usize,
    /// Master connections may live in the user's own folder and outlive the
    /// run by a minute, for the next run to the same host. Off where an
    /// address may name another machine next time (cloud instances).
    pub shared_masters: bool,
}

/// One host of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddr {
    pub host: String,
    pub port: Option<u16>,
}

impl HostAddr {
    pub fn parse(s: &str) -> Result<HostAddr, String> {
        let bad = || format!("`{s}` is not a host: use `name`, `name:port` or `[address]:port`");
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(bad)?;
            match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if after.is_empty() => (h, None),
                None => return Err(bad()),
            }
        } else {
            match s.rsplit_once(':') {
                // An IPv6 address must be in brackets: `fe80::1` is not
                // host `fe80:` on port 1.
                Some((h, _)) if h.contains(':') => return Err(bad()),
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = port
            .map(|p| p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(bad))
            .transpose()?;
        let valid = !host.is_empty()
            && !host.starts_with('-')
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b));
        if !valid {
            return Err(bad());
        }
        Ok(HostAddr {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for HostAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match (self.port, self.host.contains(':')) {
            (Some(p), true) => write!(f, "[{}]:{p}", self.host),
            (Some(p), false) => write!(f, "{}:{p}", self.host),
            (None, _) => write!(f, "{}", self.host),
        }
    }
}

/// The pool's state: who is busy, who is set aside.
struct Pool {
    busy: Vec<usize>,
    down: Vec<Option<String>>,
}

/// What a host is known to hold, learnt once per run.
#[derive(Default)]
struct Shipped {
    binary: bool,
    layers: HashSet<String>,
}

struct Shared {
    settings: SshSettings,
    hosts: Vec<HostAddr>,
    pool: Mutex<Pool>,
    freed: Condvar,
    shipped: Vec<Mutex<Shipped>>,
    /// Where the master connections' sockets live.
    control_dir: PathBuf,
    /// Whether that folder is the user's own, shared by runs: masters then
    /// outlive the run by a minute, for the next one to use.
    persist: bool,
    /// The local layer store's folder, whose layers are shipped.
    layers_root: PathBuf,
    binary: OnceLock<Result<(PathBuf, String), String>>,
    note: Mutex<Option<Note>>,
}

/// Told what the user should know once.
type Note = Box<dyn FnMut(&str) + Send>;

pub struct SshProvider {
    shared: Arc<Shared>,
}

static RUNS: AtomicU64 = AtomicU64::new(0);

impl SshProvider {
    /// A pool over `settings.hosts`; layers are shipped from the store at
    /// `layers_root` (its `layers/` folder).
    pub fn new(settings: SshSettings, layers_root: &Path) -> Result<SshProvider, String> {
        if settings.hosts.is_empty() {
            return Err("[providers.ssh] names no hosts".into());
        }
        // The user goes to ssh's `-l` and into ssh_config's `%r`/`%u`.
        let user_ok = !settings.user.is_empty()
            && !settings.user.starts_with('-')
            && settings
                .user
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !user_ok {
            return Err(format!(
                "`{}` is not a user name: use letters, digits, `.`, `_` and `-`",
                settings.user
            ));
        }
        let hosts = settings
            .hosts
            .iter()
            .map(|h| HostAddr::parse(h))
            .collect::<Result<Vec<_>, _>>()?;
        let (control_dir, persist) = control_dir(settings.shared_masters)?;
        let n = hosts.len();
        Ok(SshProvider {
            shared: Arc::new(Shared {
                settings: SshSettings {
                    slots: settings.slots.max(1),
                    ..settings
                },
                hosts,
                pool: Mutex::new(Pool {
                    busy: vec![0; n],
                    down: vec![None; n],
                }),
                freed: Condvar::new(),
                shipped: (0..n).map(|_| Mutex::new(Shipped::default())).collect(),
                control_dir,
                persist,
                layers_root: layers_root.to_path_buf(),
                binary: OnceLock::new(),
                note: Mutex::new(None),
            }),
        })
    }

    /// Called with what the user should know once (a host set aside).
    pub fn on_note(&self, f: impl FnMut(&str) + Send + 'static) {
        *self.shared.note.lock().unwrap() = Some(Box::new(f));
    }

    /// Removes, on every host, what environments of killed runs left
    /// (their leases held by nobody) and half-received layers: `(host,
    /// what was removed or why not)`.
    pub fn reap(&self) -> Vec<(String, Result<String, String>)> {
        (0..self.shared.hosts.len())
            .map(|i| {
                let h = self.shared.hosts[i].to_string();
                let res = self.shared.prepare(i, &[]).and_then(|()| {
                    self.shared
                        .run(i, "exec \"$f\" remote gc", None)
                        .map(|out| String::from_utf8_lossy(&out).trim().to_string())
                });
                (h, res)
            })
            .collect()
    }

    /// Waits until the (first) host answers over ssh and can make
    /// environments, trying every 2 s until `deadline`: a machine that is
    /// still booting refuses or drops connections for a while. A host that
    /// answers but cannot be used (no root, no overlayfs) fails at once.
    pub fn wait_ready(&self, deadline: Instant, cancel: &Cancel) -> Result<String, String> {
        loop {
            match self.shared.probe(0) {
                Ok(what) => return Ok(what),
                Err(why) if why.starts_with(UNREACHABLE) => {
                    if cancel.is_cancelled() {
                        return Err("cancelled".into());
                    }
                    if Instant::now() >= deadline {
                        return Err(why);
                    }
                    std::thread::sleep(Duration::from_secs(2));
                }
                Err(why) => return Err(why),
            }
        }
    }

    /// Whether each host answers and can make environments: `(host, Ok or
    /// why not)`.
    pub fn check(&self) -> Vec<(String, Result<String, String>)> {
        (0..self.shared.hosts.len())
            .map(|i| {
                let h = self.shared.hosts[i].to_string();
                (h, self.shared.probe(i))
            })
            .collect()
    }
}

trait DirBuilderExt0700 {
    fn mode_0700(&mut self) -> &mut Self;
}

impl DirBuilderExt0700 for std::fs::DirBuilder {
    fn mode_0700(&mut self) -> &mut Self {
        use std::os::unix::fs::DirBuilderExt;
        self.mode(0o700)
    }
}

/// The folder for master connections' sockets, and whether it is the
/// user's own one shared by runs (`$XDG_RUNTIME_DIR/slate-ssh`, or
/// `/tmp/slate-ssh-<uid>`): a master there outlives its run by 60 s
/// (`ControlPersist`), as Ansible's do, so a run that follows within a
/// minute skips the handshake. A socket there is a way into the connection,
/// so the folder must be a real folder of the user's, closed to others; if
/// it is not, the run gets a folder of its own and ends its masters.
fn control_dir(want_shared: bool) -> Result<(PathBuf, bool), String> {
    use std::os::unix::fs::MetadataExt;
    let uid = nix::unistd::geteuid().as_raw();
    if want_shared {
        let shared = match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d).join("slate-ssh"),
            _ => std::env::temp_dir().join(format!("slate-ssh-{uid}")),
        };
        let _ = std::fs::DirBuilder::new().mode_0700().create(&shared);
        let private = std::fs::symlink_metadata(&shared)
            .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o077 == 0);
        if private {
            return Ok((shared, true));
        }
    }
    let own = std::env::temp_dir().join(format!(
        "slate-ssh-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode_0700()
        .create(&own)
        .map_err(|e| format!("cannot create `{}`: {e}", own.display()))?;
    Ok((own, false))
}

impl Drop for SshProvider {
    fn drop(&mut self) {
        if self.shared.persist {
            // Each master ends by itself a minute after its last session.
            return;
        }
        // Ends the master connections this run opened.
        for i in 0..self.shared.hosts.len() {
            let _ = self
                .shared
                .ssh(i)
                .args(["-O", "exit"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.shared.control_dir);
    }
}

/// The lines of a host's answer that are keys slate asked about: a host
/// cannot make slate send a path of its choosing.
fn asked_for(answer: &str, asked: &[&String]) -> Vec<String> {
    answer
        .lines()
        .filter(|k| asked.iter().any(|a| a.as_str() == *k))
        .map(str::to_string)
        .collect()
}

/// Quotes `s` for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// How a failure of ssh itself (exit 255) begins.
const UNREACHABLE: &str = "cannot reach ";

/// The last lines a command wrote to its standard error.
fn tail(text: &[u8]) -> String {
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join("; ")
}

impl Shared {
    /// `ssh` to host `i` with this pool's options, the command to follow.
    fn ssh(&self, i: usize) -> Command {
        let s = &self.settings;
        let h = &self.hosts[i];
        let mut c = Command::new("ssh");
        let check = match s.known_hosts {
            KnownHosts::Strict => "yes",
            KnownHosts::AcceptNew => "accept-new",
        };
        c.arg("-T")
            .args(["-o", "BatchMode=yes"])
            .args(["-o", &format!("StrictHostKeyChecking={check}")])
            .args(["-o", "ConnectTimeout=10"])
            .args(["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"])
            .args(["-o", "ControlMaster=auto", "-o", "ControlPersist=60"])
            .arg("-o")
            .arg(format!("ControlPath={}/%C", self.control_dir.display()))
            .args(["-o", "LogLevel=ERROR"]);
        if let Some(f) = &s.known_hosts_file {
            c.arg("-o")
                .arg(format!("UserKnownHostsFile={}", f.display()));
        }
        if let Some(id) = &s.identity {
            c.arg("-i").arg(id).args(["-o", "IdentitiesOnly=yes"]);
        }
        if let Some(p) = h.port {
            c.args(["-p", &p.to_string()]);
        }
        c.args(["-l", &s.user, "--", &h.host]);
        c
    }

    /// The remote command line that runs `script` as root there, with `c`
    /// the host's slate cache and `f` slate's binary in it.
    fn remote(&self, script: &str) -> Result<String, String> {
        let (_, sha) = self.binary()?;
        let full = format!(
            "set -e; c=\"${{SLATE_CACHE:-/var/cache/slate}}\"; f=\"$c/bin/slate-{sha}\"; {script}"
        );
        Ok(if self.settings.user == "root" {
            format!("sh -c {}", sh_quote(&full))
        } else {
            format!("sudo -n sh -c {}", sh_quote(&full))
        })
    }

    /// This slate's own binary and the start of its sha256.
    fn binary(&self) -> Result<(PathBuf, String), String> {
        self.binary_full()
            .map(|(exe, sha)| (exe, sha[..32].to_string()))
    }

    /// This slate's own binary and its whole sha256.
    fn binary_full(&self) -> Result<(PathBuf, String), String> {
        self.binary
            .get_or_init(|| {
                let exe = std::env::current_exe()
                    .map_err(|e| format!("cannot find slate's own binary: {e}"))?;
                let (sha, _) = slate_layers::hash::sha256_file(&exe)
                    .map_err(|e| format!("cannot read slate's own binary: {e}"))?;
                Ok((exe, sha))
            })
            .clone()
    }

    /// Runs `script` on host `i`, `input` on its standard input; its
    /// standard output, or why it failed.
    fn run(
        &self,
        i: usize,
        script: &str,
        input: Option<&mut (dyn Read + Send)>,
    ) -> Result<Vec<u8>, String> {
        let mut child = self
            .ssh(i)
            .arg(self.remote(script)?)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run ssh: {e}"))?;
        // Sent on a thread of its own while the output is read: a host that
        // talks before it has read everything cannot block both sides.
        let stdin = child.stdin.take();
        let (copied, out) = std::thread::scope(|scope| {
            let sender = scope.spawn(move || match (input, stdin) {
                (Some(r), Some(mut w)) => io::copy(r, &mut w).map(drop),
                _ => Ok(()),
            });
            let out = child.wait_with_output();
            (sender.join().unwrap_or(Ok(())), out)
        });
        let out = out.map_err(|e| format!("ssh: {e}"))?;
        if !out.status.success() {
            return Err(self.failed(i, out.status.code(), &out.stderr));
        }
        copied.map_err(|e| format!("sending to {}: {e}", self.hosts[i]))?;
        Ok(out.stdout)
    }

    /// What a failed ssh command says, ssh's own failures (exit 255) told
    /// apart from the command's.
    fn failed(&self, i: usize, code: Option<i32>, stderr: &[u8]) -> String {
        let h = &self.hosts[i];
        match code {
            Some(255) | None => format!("{UNREACHABLE}{h} over ssh: {}", tail(stderr)),
            Some(c) => format!("on {h}: exit {c}: {}", tail(stderr)),
        }
    }

    /// Whether host `i` answers and has what slate needs, in words.
    fn probe(&self, i: usize) -> Result<String, String> {
        let out = self.run(
            i,
            "uname -m; id -u; grep -qw overlay /proc/filesystems && echo overlay || echo none",
            None,
        )?;
        let text = String::from_utf8_lossy(&out);
        let lines: Vec<&str> = text.lines().collect();
        match lines.as_slice() {
            [arch, uid, fs, ..] => {
                if *arch != std::env::consts::ARCH {
                    return Err(format!(
                        "it is {arch}, this slate is {}",
                        std::env::consts::ARCH
                    ));
                }
                if *uid != "0" {
                    return Err("commands there do not run as root".into());
                }
                if *fs != "overlay" {
                    return Err("its kernel has no overlayfs".into());
                }
                Ok(format!("{arch}, root, overlayfs"))
            }
            _ => Err(format!("unexpected answer: {}", text.trim())),
        }
    }

    /// Ships slate's binary and the layers `keys` to host `i`, what it
    /// lacks only.
    fn prepare(&self, i: usize, keys: &[String]) -> Result<(), String> {
        let mut shipped = self.shipped[i].lock().unwrap();
        if !shipped.binary {
            let out = self.run(
                i,
                "if [ -x \"$f\" ]; then echo have; else echo need; fi",
                None,
            )?;
            if String::from_utf8_lossy(&out).trim() == "need" {
                let (exe, _) = self.binary()?;
                let mut f = std::fs::File::open(&exe)
                    .map_err(|e| format!("cannot read `{}`: {e}", exe.display()))?;
                // Checked before it takes its name: a copy cut short (slate
                // killed, the connection dropped) must never pass for slate.
                let (_, sha) = self.binary_full()?;
                self.run(
                    i,
                    &format!(
                        "mkdir -p \"$c/bin\"; t=\"$f.tmp.$$\"; cat > \"$t\"; \
                         if ! echo \"{sha}  $t\" | sha256sum -c --status -; then \
                         rm -f \"$t\"; echo \"the copy of slate arrived incomplete\" >&2; exit 1; fi; \
                         chmod 755 \"$t\"; mv -f \"$t\" \"$f\""
                    ),
                    Some(&mut f),
                )?;
            }
            shipped.binary = true;
        }
        let unknown: Vec<&String> = keys
            .iter()
            .filter(|k| !shipped.layers.contains(*k))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = unknown.iter().map(|k| sh_quote(k)).collect();
        let out = self.run(
            i,
            &format!("exec \"$f\" remote missing-layers {}", list.join(" ")),
            None,
        )?;
        let missing = asked_for(&String::from_utf8_lossy(&out), &unknown);
        for key in &missing {
            self.send_layer(i, key)?;
        }
        shipped.layers.extend(unknown.into_iter().cloned());
        Ok(())
    }

    /// Sends one layer folder with GNU tar.
    fn send_layer(&self, i: usize, key: &str) -> Result<(), String> {
        let dir = self.layers_root.join("layers").join(key);
        let mut tar = Command::new("tar")
            .args(serve::TAR_FLAGS)
            .arg("-C")
            .arg(&dir)
            .args(["-cf", "-", "fs", "layer.json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run tar: {e}"))?;
        let mut data = tar.stdout.take().expect("piped");
        // tar's complaints are read as they come: a full pipe would stop it.
        let mut err = tar.stderr.take().expect("piped");
        let complaints = std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = err.read_to_end(&mut text);
            text
        });
        let sent = self.run(
            i,
            &format!("exec \"$f\" remote receive-layer {}", sh_quote(key)),
            Some(&mut data),
        );
        drop(data);
        let status = tar.wait().map_err(|e| format!("tar: {e}"))?;
        let stderr = complaints.join().unwrap_or_default();
        if !status.success() {
            return Err(format!("cannot pack the layer `{key}`: {}", tail(&stderr)));
        }
        sent.map(drop)
    }

    /// Takes a slot on the least busy host that is not set aside, waiting
    /// while all are full.
    fn take_slot(&self) -> Result<usize, String> {
        let mut pool = self.pool.lock().unwrap();
        loop {
            let live: Vec<usize> = (0..self.hosts.len())
                .filter(|&i| pool.down[i].is_none())
                .collect();
            if live.is_empty() {
                let why: Vec<String> = (0..self.hosts.len())
                    .filter_map(|i| {
                        pool.down[i]
                            .as_ref()
                            .map(|w| format!("{}: {w}", self.hosts[i]))
                    })
                    .collect();
                return Err(format!("no ssh host is usable ({})", why.join("; ")));
            }
            let free = live
                .into_iter()
                .filter(|&i| pool.busy[i] < self.settings.slots)
                .min_by_key(|&i| pool.busy[i]);
            if let Some(i) = free {
                pool.busy[i] += 1;
                return Ok(i);
            }
            pool = self.freed.wait(pool).unwrap();
        }
    }

    fn release(&self, i: usize) {
        let mut pool = self.pool.lock().unwrap();
        pool.busy[i] = pool.busy[i].saturating_sub(1);
        self.freed.notify_all();
    }

    /// Sets host `i` aside for the rest of the run, saying so once.
    fn set_aside(&self, i: usize, why: &str) {
        let first = {
            let mut pool = self.pool.lock().unwrap();
            let first = pool.down[i].is_none();
            if first {
                pool.down[i] = Some(why.to_string());
            }
            self.freed.notify_all();
            first
        };
        if first {
            if let Some(f) = &mut *self.note.lock().unwrap() {
                f(&format!(
                    "ssh host {} is set aside for the rest of this run: {why}",
                    self.hosts[i]
                ));
            }
        }
    }
}

impl Provider for SshProvider {
    type Env = SshEnv;

    fn name(&self) -> &'static str {
        "ssh"
    }

    fn create(&self, spec: &EnvSpec) -> Result<SshEnv, ProviderError> {
        let shared = &self.shared;
        let cerr = |what: String| ProviderError::Create {
            env: spec.name.clone(),
            what,
            source: None,
        };
        let i = shared.take_slot().map_err(|w| ProviderError::Unavailable {
            provider: "ssh".into(),
            why: w,
        })?;
        let slot = Slot {
            shared: shared.clone(),
            host: i,
        };
        let keys = layer_keys(&spec.layers).map_err(cerr)?;
        let remote = RemoteSpec {
            name: spec.name.clone(),
            layers: keys.clone(),
            network: spec.network,
            host_ca: spec.host_ca,
            cpus: spec.limits.cpus,
            memory: spec.limits.memory,
            pids: spec.limits.pids,
            limits_best_effort: spec.limits.best_effort,
        };
        // A host asked for the environment straight away answers at once
        // when it holds slate and the layers (the usual case after its first
        // run); only when it says what it lacks is that shipped, and asked
        // again.
        let mut slot = Some(slot);
        let mut shipped = false;
        loop {
            let env = self.open(spec, &remote, slot.take().expect("a slot"));
            let mut env = match env {
                Ok(env) => return Ok(env),
                Err(e) => e,
            };
            let why = env.why.take().unwrap_or_default();
            slot = env.slot.take();
            match env.state {
                Opened::Lost => {
                    shared.set_aside(i, &why);
                    return Err(cerr(why));
                }
                Opened::Lacking if !shipped => {
                    if let Err(why) = shared.prepare(i, &keys) {
                        shared.set_aside(i, &why);
                        return Err(cerr(why));
                    }
                    shipped = true;
                }
                // A host that cannot make environments (sudo wants a
                // password, another architecture, lost what it was sent)
                // would take every retry: the retry goes elsewhere.
                Opened::Lacking | Opened::Failed => {
                    *shared.shipped[i].lock().unwrap() = Shipped::default();
                    shared.set_aside(i, &why);
                    return Err(cerr(why));
                }
            }
        }
    }
}

/// Why an environment was not opened on a host.
enum Opened {
    /// The host lacks slate's binary or a layer.
    Lacking,
    /// The connection failed (ssh's own exit 255).
    Lost,
    Failed,
}

/// A failed open: what went wrong, and the slot to try again with.
struct NotOpened {
    state: Opened,
    why: Option<String>,
    slot: Option<Slot>,
}

impl SshProvider {
    /// Opens an environment on the slot's host.
    fn open(&self, spec: &EnvSpec, remote: &RemoteSpec, slot: Slot) -> Result<SshEnv, NotOpened> {
        let shared = &self.shared;
        let i = slot.host;
        let link = match Link::open(shared.clone(), i) {
            Ok(l) => l,
            Err(why) => {
                return Err(NotOpened {
                    state: Opened::Failed,
                    why: Some(why),
                    slot: Some(slot),
                })
            }
        };
        let id = format!("{}@{}", spec.name, shared.hosts[i]);
        let mut env = SshEnv {
            session: Session::new(&id, "the host's slate"),
            link,
            slot: Some(slot),
            destroyed: false,
        };
        env.session.no_interactive =
            "interactive shells are not available with the ssh provider yet; use the sandbox provider for `slate shell`";
        let (stdout, stdin) = env.link.streams();
        env.session.connect(stdout, stdin);
        let Err(why) = env.start(remote) else {
            return Ok(env);
        };
        let state = if why.starts_with(serve::LACKS) {
            Opened::Lacking
        } else {
            match env.link.exit_code() {
                // The shell there found no slate of this version.
                Some(127) => Opened::Lacking,
                Some(255) | None if env.link.lost().is_some() => Opened::Lost,
                _ => Opened::Failed,
            }
        };
        let why = match (&state, env.link.lost()) {
            (Opened::Lost, Some(lost)) => lost,
            _ => why,
        };
        env.destroyed = true;
        env.link.stop();
        Err(NotOpened {
            state,
            why: Some(why),
            slot: env.slot.take(),
        })
    }
}

/// The store keys of layer folders (`…/layers/<key>/fs`).
fn layer_keys(layers: &[PathBuf]) -> Result<Vec<String>, String> {
    layers
        .iter()
        .map(|p| {
            p.parent()
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| format!("`{}` is not a layer of the store", p.display()))
        })
        .collect()
}

/// A slot on a host, given back when dropped.
struct Slot {
    shared: Arc<Shared>,
    host: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.release(self.host);
    }
}

/// The ssh connection that carries one environment's session.
struct Link {
    shared: Arc<Shared>,
    host: usize,
    child: Child,
    /// slate ended the connection itself (a refused artifact, a failed
    /// upload): its end says nothing about the host.
    stopped: bool,
    stdin: Option<ChildStdin>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Link {
    fn open(shared: Arc<Shared>, host: usize) -> Result<Link, String> {
        let mut child = shared
            .ssh(host)
            .arg(shared.remote("exec \"$f\" remote env")?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run ssh: {e}"))?;
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let lines = stderr.clone();
        let err = child.stderr.take().expect("piped");
        std::thread::spawn(move || {
            for l in io::BufReader::new(err).lines().map_while(Result::ok) {
                let mut q = lines.lock().unwrap();
                if q.len() == 8 {
                    q.pop_front();
                }
                q.push_back(l);
            }
        });
        Ok(Link {
            stdin: child.stdin.take(),
            shared,
            host,
            child,
            stopped: false,
            stderr,
        })
    }

    fn streams(&mut self) -> (impl Read + Send + 'static, impl Write + Send + 'static) {
        (
            self.child.stdout.take().expect("piped"),
            self.stdin.take().expect("piped"),
        )
    }

    fn host(&self) -> String {
        self.shared.hosts[self.host].to_string()
    }

    /// ssh's exit code once it ended (given a moment), if it did.
    fn exit_code(&mut self) -> Option<i32> {
        self.wait_briefly().and_then(|st| st.code())
    }

    /// ssh's status, waiting up to 5 s for it to end.
    fn wait_briefly(&mut self) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.child.try_wait() {
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(st) => return st,
                Err(_) => return None,
            }
        }
    }

    fn stderr_tail(&self) -> String {
        let q = self.stderr.lock().unwrap();
        q.iter().cloned().collect::<Vec<_>>().join("; ")
    }

    /// Why the connection is gone, if ssh itself failed (exit 255: the host
    /// went away or cannot be reached). Called after the stream failed: ssh
    /// is given a moment to end.
    fn lost(&mut self) -> Option<String> {
        if self.stopped {
            return None;
        }
        match self.wait_briefly() {
            Some(st) if st.code() == Some(255) || st.code().is_none() => Some(format!(
                "the connection to {} ended ({st}): {}",
                self.host(),
                self.stderr_tail()
            )),
            _ => None,
        }
    }
}

impl Carrier for Link {
    fn stop(&mut self) {
        self.stopped = true;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn check_alive(&mut self, when: &str) -> io::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            return Err(io::Error::other(format!(
                "the ssh connection to {} ended {when} ({st}): {}",
                self.host(),
                self.stderr_tail()
            )));
        }
        Ok(())
    }
}

pub struct SshEnv {
    session: Session,
    link: Link,
    /// Given back when the environment is gone.
    slot: Option<Slot>,
    destroyed: bool,
}

/// How long a host's slate may take to make an environment.
const START_TIMEOUT: Duration = Duration::from_secs(120);

impl SshEnv {
    /// Asks the host's slate for the environment and waits for its hello.
    fn start(&mut self, spec: &RemoteSpec) -> Result<(), String> {
        self.session
            .send_json(wire::CREATE, spec)
            .map_err(|e| format!("cannot reach the host's slate: {e}"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.session.recv(Duration::from_millis(100)) {
                Ok(Some((wire::HELLO, _))) => return Ok(()),
                Ok(Some((wire::ERR, m))) => return Err(String::from_utf8_lossy(&m).into_owned()),
                Ok(Some((k, _))) => return Err(format!("the host's slate said {k} before hello")),
                Ok(None) if Instant::now() > deadline => {
                    return Err(format!(
                        "the host's slate did not make the environment within {} s",
                        START_TIMEOUT.as_secs()
                    ))
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(
                        match self.link.check_alive("before the environment was made") {
                            Err(gone) => gone.to_string(),
                            Ok(()) => e.to_string(),
                        },
                    )
                }
            }
        }
    }

    /// A failed request: the environment is lost with its host when the
    /// connection went (the host is set aside; the target may run again
    /// elsewhere), else the error as it is.
    fn fault(&mut self, e: ProviderError) -> ProviderError {
        // Only a broken stream can mean a lost host; the host's own errors
        // (a file that is not there) leave the connection as it was.
        let broken = matches!(&e, ProviderError::Op { source, .. } if matches!(
            source.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ));
        let exited = matches!(self.link.child.try_wait(), Ok(Some(_)));
        if self.link.stopped || (!broken && !exited) {
            return e;
        }
        match self.link.lost() {
            Some(why) => {
                self.link.shared.set_aside(self.link.host, &why);
                ProviderError::Lost {
                    env: self.session.id().to_string(),
                    what: why,
                }
            }
            None => e,
        }
    }
}

impl Environment for SshEnv {
    fn id(&self) -> &str {
        self.session.id()
    }

    fn put(&mut self, base: &Path, entries: &[PathBuf], dest: &str) -> Result<u64, ProviderError> {
        self.session
            .put(&mut self.link, base, entries, dest)
            .map_err(|e| self.fault(e))
    }

    fn put_bytes(&mut self, data: &[u8], dest: &str, mode: u32) -> Result<(), ProviderError> {
        self.session
            .put_bytes(data, dest, mode)
            .map_err(|e| self.fault(e))
    }

    fn exec(
        &mut self,
        spec: &ExecSpec,
        out: &mut dyn OutputSink,
        cancel: &Cancel,
    ) -> Result<ExecOutcome, ProviderError> {
        self.session
            .exec(&mut self.link, spec, out, cancel)
            .map_err(|e| self.fault(e))
    }

    fn list(&mut self, dir: &str) -> Result<Vec<String>, ProviderError> {
        self.session.list(dir).map_err(|e| self.fault(e))
    }

    fn fetch(&mut self, src: &str, dest: &Path) -> Result<u64, ProviderError> {
        self.session
            .fetch(&mut self.link, src, dest)
            .map_err(|e| self.fault(e))
    }

    fn destroy(mut self) -> Result<(), ProviderError> {
        self.destroyed = true;
        // The end of its input tells the host's slate to destroy the
        // environment; it exits when it is gone.
        self.session.disconnect();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.link.child.try_wait() {
                Ok(Some(st)) if st.success() => return Ok(()),
                Ok(Some(st)) => {
                    return Err(ProviderError::Other {
                        env: self.session.id().to_string(),
                        what: format!(
                            "the host's slate could not destroy the environment ({st}): {}",
                            self.link.stderr_tail()
                        ),
                    })
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    self.link.stop();
                    return Err(ProviderError::Other {
                        env: self.session.id().to_string(),
                        what: "the host's slate did not end within 60 s; its connection was cut (its next run removes what is left)".into(),
                    });
                }
            }
        }
    }
}

impl Drop for SshEnv {
    fn drop(&mut self) {
        if !self.destroyed {
            self.link.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_parse_with_and_without_ports() {
        let h = |s: &str| HostAddr::parse(s);
        assert_eq!(
            h("build1.example.net").unwrap(),
            HostAddr {
                host: "build1.example.net".into(),
                port: None
            }
        );
        assert_eq!(h("127.0.0.1:2222").unwrap().port, Some(2222));
        assert_eq!(h("[::1]:22").unwrap().host, "::1");
        assert_eq!(h("[::1]:22").unwrap().to_string(), "[::1]:22");
        for bad in [
            "",
            "-oProxyCommand=x",
            "h:0",
            "h:99999",
            "h;rm",
            "[::1",
            "fe80::1",
        ] {
            assert!(h(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_host_cannot_name_a_layer_it_was_not_asked_about() {
        let (a, b) = ("aaa".to_string(), "bbb".to_string());
        let answer = "../../etc\nbbb\n/root/.ssh\nccc\n";
        assert_eq!(asked_for(answer, &[&a, &b]), ["bbb"]);
    }

    #[test]
    fn a_user_name_that_would_be_an_ssh_option_is_refused() {
        for user in ["-oProxyCommand=touch /tmp/pwned", "root x", "a%r", ""] {
            let settings = SshSettings {
                hosts: vec!["127.0.0.1".into()],
                user: user.into(),
                identity: None,
                known_hosts: KnownHosts::Strict,
                known_hosts_file: None,
                slots: 1,
                shared_masters: true,
            };
            let err = SshProvider::new(settings, Path::new("/nonexistent"))
                .err()
                .unwrap_or_else(|| panic!("`{user}` was accepted"));
            assert!(err.contains("is not a user name"), "{err}");
        }
    }

    #[test]
    fn quoting_keeps_a_single_quote() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }
}
