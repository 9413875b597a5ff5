//! The seam between the orchestrator and the things that make environments.
//!
//! # Contract
//!
//! - `create` returns an environment made from the spec's layers alone: nothing
//!   written in an earlier environment is visible in it.
//! - Every environment is destroyed: by `destroy`, by `Drop` when the caller
//!   forgets or unwinds, and — when slate itself dies — by the next run or
//!   `slate gc`, from a lease the provider leaves on disk.
//! - `exec` streams output while it is produced, line by line, through the sink.
//! - Errors name the environment and the operation that failed. An error from
//!   `create`, `put`, `list`/`fetch` or a failure to start a command is an
//!   infrastructure failure; a command's own non-zero exit is an `ExecOutcome`.

pub mod fake;
pub mod hostnet;
pub mod lease;
pub mod session;
pub mod wire;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to make: the layers of a baked image, plus isolation settings.
#[derive(Debug, Clone, Default)]
pub struct EnvSpec {
    /// Used as hostname and in the environment's id.
    pub name: String,
    /// Read-only layers, lowest first.
    pub layers: Vec<PathBuf>,
    /// Where writes go. `None`: a fresh folder owned (and removed) by the
    /// environment. `Some`: a caller-owned folder kept after destroy (baking).
    pub upper: Option<PathBuf>,
    pub network: bool,
    /// With network: trust the host's CA bundle ([`hostnet::host_ca_bundle`]),
    /// which the provider makes readable at [`hostnet::CA_PATH`] and names
    /// by the usual variables ([`hostnet::env`]). Never written into a layer.
    pub host_ca: bool,
    pub limits: Limits,
    /// Host paths bound into the environment.
    pub binds: Vec<Bind>,
    /// One command, nothing copied in or out (`slate run`, a shell): writes
    /// may live in memory and nothing need touch the disk. `put`, `list` and
    /// `fetch` are refused.
    pub ephemeral: bool,
    /// What makes it: a sandbox (the default; also for baking) or a VM.
    pub kind: EnvKind,
    /// What the commands may do as root inside a sandbox (a VM's guest is
    /// its own kernel and keeps its root).
    pub privileges: Privileges,
    /// The environment may be kept after a failure (`Environment::keep`):
    /// a VM then writes to a disk file of its own instead of QEMU's
    /// throwaway overlay.
    pub keepable: bool,
    /// A VM starts from this kept disk (over the image's base disk) instead
    /// of the base disk alone; what it writes is thrown away.
    pub start_disk: Option<PathBuf>,
}

/// The capabilities a sandboxed command keeps. Neither level allows device
/// nodes, mounts, new namespaces or kernel settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Privileges {
    /// None at all: root by name only, as in bubblewrap. Builds, `slate run`
    /// and `slate shell`.
    #[default]
    None,
    /// What a package manager needs (change owners and modes, switch
    /// users): bake steps.
    Packages,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EnvKind {
    /// Namespaces and overlayfs on the host's kernel.
    #[default]
    Sandbox,
    /// A virtual machine with the image's own kernel.
    Vm,
    /// A sandbox made on one of a pool of ssh hosts.
    Ssh,
    /// A sandbox made on a cloud instance of its own.
    Ec2,
}

impl EnvKind {
    pub fn name(self) -> &'static str {
        match self {
            EnvKind::Sandbox => "sandbox",
            EnvKind::Vm => "vm",
            EnvKind::Ssh => "ssh",
            EnvKind::Ec2 => "ec2",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    pub cpus: Option<f64>,
    pub memory: Option<u64>,
    pub pids: Option<u64>,
    /// The limits are slate's defaults, not the user's: a host without a
    /// usable cgroup hierarchy runs the environment without them (and says
    /// so once) instead of failing it.
    pub best_effort: bool,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.cpus.is_none() && self.memory.is_none() && self.pids.is_none()
    }
}

#[derive(Debug, Clone)]
pub struct Bind {
    pub host: PathBuf,
    pub guest: String,
    pub readonly: bool,
}

/// One command to run inside.
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    /// Hand the caller's terminal to the command (for `slate shell`).
    pub interactive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Receives a command's output as it is produced.
pub trait OutputSink: Send {
    fn line(&mut self, stream: Stream, line: &str);
}

impl<F: FnMut(Stream, &str) + Send> OutputSink for F {
    fn line(&mut self, stream: Stream, line: &str) {
        self(stream, line)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecOutcome {
    Exited(i32),
    Signaled(i32),
    TimedOut,
    Cancelled,
}

impl ExecOutcome {
    pub fn success(self) -> bool {
        self == ExecOutcome::Exited(0)
    }
}

/// Stops a running command: on request (Ctrl-C) or at a deadline.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    flag: Arc<AtomicBool>,
    deadline: Option<Instant>,
}

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    /// The same cancel flag, with a deadline `timeout` from now.
    pub fn with_timeout(&self, timeout: Option<Duration>) -> Self {
        Cancel {
            flag: self.flag.clone(),
            deadline: timeout.map(|t| Instant::now() + t),
        }
    }
    pub fn timed_out(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("cannot create environment `{env}`: {what}")]
    Create {
        env: String,
        what: String,
        #[source]
        source: Option<std::io::Error>,
    },
    #[error("environment `{env}`: {op} failed")]
    Op {
        env: String,
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("environment `{env}`: {what}")]
    Other { env: String, what: String },
    #[error("the {provider} provider is not available: {why}")]
    Unavailable { provider: String, why: String },
    /// What the build left cannot be taken (an artifact too large to
    /// copy, say): the build's fault, not the environment's.
    #[error("environment `{env}`: {what}")]
    Refused { env: String, what: String },
    /// The environment went with the machine that held it (an ssh host
    /// that went down mid-build): nothing of it is left to use, and the
    /// target may be run again in a new one.
    #[error("environment `{env}` was lost: {what}")]
    Lost { env: String, what: String },
}

impl ProviderError {
    pub fn op(env: &str, op: impl Into<String>, source: std::io::Error) -> Self {
        ProviderError::Op {
            env: env.to_string(),
            op: op.into(),
            source,
        }
    }
}

/// An error and its causes on one line: `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let cs = c.to_string();
        if !s.contains(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        cur = c.source();
    }
    s
}

/// Makes environments.
pub trait Provider: Send + Sync {
    type Env: Environment;
    fn name(&self) -> &'static str;
    fn create(&self, spec: &EnvSpec) -> Result<Self::Env, ProviderError>;
}

/// One fresh, disposable environment.
pub trait Environment: Send {
    fn id(&self) -> &str;
    /// Copies `entries` (paths relative to the host folder `base`: files,
    /// folders, symlinks) to the folder `dest` inside, keeping modes and
    /// symlinks. Returns the bytes copied.
    fn put(&mut self, base: &Path, entries: &[PathBuf], dest: &str) -> Result<u64, ProviderError>;
    /// Writes one file inside.
    fn put_bytes(&mut self, data: &[u8], dest: &str, mode: u32) -> Result<(), ProviderError>;
    fn exec(
        &mut self,
        spec: &ExecSpec,
        out: &mut dyn OutputSink,
        cancel: &Cancel,
    ) -> Result<ExecOutcome, ProviderError>;
    /// Regular files under `dir` inside, as paths relative to it.
    fn list(&mut self, dir: &str) -> Result<Vec<String>, ProviderError>;
    /// Copies the file `src` inside to `dest` on the host.
    fn fetch(&mut self, src: &str, dest: &Path) -> Result<u64, ProviderError>;
    /// Ends every process and removes every trace.
    fn destroy(self) -> Result<(), ProviderError>;
    /// Ends every process and keeps what the commands wrote (the
    /// filesystem's changes over the image) as the folder `dest/upper`,
    /// for `slate shell --keep`; the rest goes as in `destroy`. Providers
    /// that cannot keep destroy and say so.
    fn keep(self, dest: &Path) -> Result<(), ProviderError>
    where
        Self: Sized,
    {
        let _ = dest;
        let env = self.id().to_string();
        let destroyed = self.destroy();
        destroyed.and(Err(ProviderError::Other {
            env,
            what: "this provider cannot keep an environment (only the sandbox provider does); it was destroyed".into(),
        }))
    }
}

/// Splits a byte stream into lines, keeping partial lines until they end.
#[derive(Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    /// The longest line passed on whole; a longer one (a build printing
    /// megabytes without a newline) is passed on in pieces of this size, so
    /// memory stays bounded whatever the command prints.
    pub const MAX_LINE: usize = 64 * 1024;

    pub fn push(&mut self, data: &[u8], mut f: impl FnMut(&str)) {
        self.buf.extend_from_slice(data);
        // One pass and one shift per chunk: a chunk of many short lines
        // costs its length, not its length times its lines.
        let mut start = 0;
        loop {
            let rest = &self.buf[start..];
            let window = &rest[..rest.len().min(Self::MAX_LINE + 1)];
            match window.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    let line = String::from_utf8_lossy(&rest[..pos]);
                    f(line.strip_suffix('\r').unwrap_or(&line));
                    start += pos + 1;
                }
                None if rest.len() > Self::MAX_LINE => {
                    f(&String::from_utf8_lossy(&rest[..Self::MAX_LINE]));
                    start += Self::MAX_LINE;
                }
                None => break,
            }
        }
        self.buf.drain(..start);
    }

    pub fn finish(&mut self, mut f: impl FnMut(&str)) {
        if !self.buf.is_empty() {
            let line = String::from_utf8_lossy(&self.buf).into_owned();
            self.buf.clear();
            f(&line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_across_chunks() {
        let mut s = LineSplitter::default();
        let mut got = Vec::new();
        s.push(b"ab", |l| got.push(l.to_string()));
        s.push(b"c\r\nd\ne", |l| got.push(l.to_string()));
        s.finish(|l| got.push(l.to_string()));
        assert_eq!(got, ["abc", "d", "e"]);
    }

    #[test]
    fn a_line_without_end_is_passed_on_in_bounded_pieces() {
        let max = LineSplitter::MAX_LINE;
        let mut s = LineSplitter::default();
        let mut got: Vec<usize> = Vec::new();
        for _ in 0..40 {
            s.push(&vec![b'x'; 10_000], |l| got.push(l.len()));
            assert!(s.buf.len() <= max, "held {} bytes", s.buf.len());
        }
        s.push(b"\nend\n", |l| got.push(l.len()));
        assert_eq!(got.iter().sum::<usize>(), 400_000 + 3);
        assert!(got.iter().all(|&n| n <= max), "{got:?}");
        assert_eq!(got.last(), Some(&3));
    }

    #[test]
    fn cancel_shares_flag_with_timeout_copies() {
        let c = Cancel::new();
        let t = c.with_timeout(Some(Duration::from_secs(3600)));
        assert!(!t.timed_out());
        c.cancel();
        assert!(t.is_cancelled());
        assert!(c.with_timeout(Some(Duration::ZERO)).timed_out());
    }
}
