//! The vm provider: each environment is a QEMU machine booted from the
//! image's own kernel, with a copy-on-write overlay over a base disk made
//! once per image, driven by slate's guest agent over virtio-serial.
//!
//! The kernel is entered through PVH (no in-guest decompression), with only
//! the devices the agent uses (`-nodefaults`, virtio on PCI): a disk,
//! the agent's port and, with `network = true`, a user-mode NIC. KVM is used
//! when a probe guest comes up under it; where /dev/kvm exists but guests do
//! not run, slate says so once and uses TCG.
//!
//! Teardown: QEMU gets SIGKILL when the slate thread that started it dies
//! (parent-death signal); the guest's writes go to QEMU's own unlinked
//! overlay; the environment's folder (socket, console log) has a lease, so
//! the next run or `slate gc` removes what a killed slate left.

pub mod agent;
pub mod boot;
pub mod jail;
mod net;
pub mod proto;

use slate_provider::lease::take_lease;
use slate_provider::*;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    pub fn parse(s: &str) -> Option<Accel> {
        match s {
            "auto" => Some(Accel::Auto),
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }
}

/// Where QEMU is.
pub fn qemu_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/usr/local/bin".into()])
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.exists())
}

/// Why the vm provider cannot run here, if it cannot.
pub fn probe() -> Result<(), String> {
    if std::env::consts::ARCH != "x86_64" {
        return Err(format!(
            "the vm provider runs x86_64 guests on x86_64 hosts; this host is {}",
            std::env::consts::ARCH
        ));
    }
    if qemu_binary().is_none() {
        return Err(
            "qemu-system-x86_64 is not installed (Debian: `apt-get install qemu-system-x86`)"
                .into(),
        );
    }
    for tool in ["qemu-img", "mkfs.ext4"] {
        let found = ["/usr/bin", "/usr/sbin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists());
        if !found {
            return Err(format!(
                "`{tool}` is not installed (Debian: qemu-utils, e2fsprogs)"
            ));
        }
    }
    Ok(())
}

pub struct VmSettings {
    pub accel: Accel,
    /// How long a guest may take to come up.
    pub boot_timeout: Duration,
}

impl Default for VmSettings {
    fn default() -> Self {
        VmSettings {
            accel: Accel::Auto,
            // A guest is up in 2-5 s under TCG on a busy host; one that is
            // not up in a minute is stuck (see `FATAL_CONSOLE`), and a new
            // one is the quickest way on.
            boot_timeout: Duration::from_secs(60),
        }
    }
}

/// Receives notes meant for the user.
pub type NoteSink = Box<dyn FnMut(&str) + Send>;

pub struct VmProvider {
    /// `v1/vm` in slate's cache: kernels, initramfs, base disks.
    cache: PathBuf,
    /// Where environments' folders go (shared with the sandbox's).
    envs: PathBuf,
    settings: VmSettings,
    qemu: PathBuf,
    agent: PathBuf,
    /// The accelerator chosen, once probed.
    accel: OnceLock<Result<&'static str, String>>,
    /// Told once, e.g. that KVM does not work here.
    notes: Mutex<NoteSink>,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl VmProvider {
    pub fn new(
        cache: PathBuf,
        envs: PathBuf,
        settings: VmSettings,
    ) -> Result<VmProvider, ProviderError> {
        probe().map_err(|why| ProviderError::Unavailable {
            provider: "vm".into(),
            why,
        })?;
        let agent = boot::find_agent().map_err(|e| ProviderError::Unavailable {
            provider: "vm".into(),
            why: e.to_string(),
        })?;
        Ok(VmProvider {
            cache,
            envs,
            settings,
            qemu: qemu_binary().expect("probed"),
            agent,
            accel: OnceLock::new(),
            notes: Mutex::new(Box::new(|_| {})),
        })
    }

    /// Where notes for the user go (the binary prints them).
    pub fn on_note(&self, f: impl FnMut(&str) + Send + 'static) {
        *self.notes.lock().unwrap() = Box::new(f);
    }

    fn note(&self, msg: &str) {
        (self.notes.lock().unwrap())(msg);
    }

    /// `kvm` or `tcg`, probing KVM once when `auto`.
    fn accel(&self, boot: &boot::BootFiles) -> Result<&'static str, String> {
        self.accel
            .get_or_init(|| {
                let chosen = self.choose_accel(boot);
                if chosen == Ok("kvm") {
                    if let Some(why) = jail::kvm_is_roots() {
                        self.note(&format!("vm: {why}"));
                    }
                }
                chosen
            })
            .clone()
    }

    fn choose_accel(&self, boot: &boot::BootFiles) -> Result<&'static str, String> {
        match self.settings.accel {
            Accel::Tcg => Ok("tcg"),
            Accel::Kvm => match self.kvm_works(boot) {
                Ok(()) => Ok("kvm"),
                Err(why) => Err(format!(
                    "`accel = \"kvm\"` but KVM does not work on this host: {why}; use `accel = \"auto\"` or `\"tcg\"` under [providers.vm]"
                )),
            },
            Accel::Auto => match self.kvm_works(boot) {
                Ok(()) => Ok("kvm"),
                Err(why) => {
                    self.note(&format!("vm: KVM does not work here ({why}); using TCG (software emulation, slower)"));
                    Ok("tcg")
                }
            },
        }
    }

    /// Whether KVM works, probed once per host boot and QEMU binary (the
    /// answer is kept in the cache).
    fn kvm_works(&self, boot: &boot::BootFiles) -> Result<(), String> {
        let boot_id = fs_err::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let qemu_time = fs_err::metadata(&self.qemu)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // "v2": answers from before QEMU ran as its own user do not count.
        let key = format!(
            "v2 {} {} {qemu_time}\n",
            boot_id.trim(),
            self.qemu.display()
        );
        let memo = self.cache.join("kvm-probe");
        if let Some(answer) = fs_err::read_to_string(&memo)
            .ok()
            .and_then(|t| t.strip_prefix(&key).map(str::to_string))
        {
            return match answer.strip_prefix("broken: ") {
                Some(why) => Err(why.trim_end().to_string()),
                None => Ok(()),
            };
        }
        let res = self.probe_kvm(boot);
        // Every answer is kept until the host reboots or QEMU changes, a
        // hang included: a working KVM boots the probe in well under a
        // second, and a KVM that hangs would otherwise cost every VM the
        // probe's whole wait.
        let answer = match &res {
            Ok(()) => "ok".to_string(),
            Err(why) => format!("broken: {why}"),
        };
        let _ = fs_err::create_dir_all(&self.cache);
        let _ = fs_err::write(&memo, format!("{key}{answer}\n"));
        res
    }

    /// Boots a probe guest under KVM: it must print its marker and power off
    /// within a few seconds (a working KVM needs well under one).
    fn probe_kvm(&self, boot: &boot::BootFiles) -> Result<(), String> {
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            return Err(format!("/dev/kvm: {e}"));
        }
        // As the machines will run: the same user, the same groups.
        let who = jail::Identity::take(&self.cache.join("ids"), true).map_err(|e| e.to_string())?;
        let kernel = jail::Handed::open(&boot.kernel).map_err(|e| e.to_string())?;
        let initramfs = jail::Handed::open(&boot.initramfs).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&self.qemu);
        cmd.args(["-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", "256"])
            .args(machine_args())
            .args(["-name", "slate-kvm-probe"])
            .arg("-kernel")
            .arg(kernel.path())
            .arg("-initrd")
            .arg(initramfs.path())
            .arg("-append")
            .arg(format!("{} slate.probe=1", kernel_cmdline()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        who.apply(&mut cmd, vec![kernel.fd(), initramfs.fd()]);
        let child = cmd.spawn().map_err(|e| format!("cannot start QEMU: {e}"))?;
        drop((kernel, initramfs));
        let deadline = Instant::now() + Duration::from_secs(5);
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(out)) => {
                if String::from_utf8_lossy(&out.stdout).contains(agent::PROBE_MARKER) {
                    Ok(())
                } else {
                    let err = String::from_utf8_lossy(&out.stderr);
                    let last = err
                        .lines()
                        .rfind(|l| !l.trim().is_empty())
                        .unwrap_or("")
                        .trim();
                    Err(format!(
                        "QEMU under KVM exited ({}){}",
                        out.status,
                        if last.is_empty() {
                            String::new()
                        } else {
                            format!(": {last}")
                        }
                    ))
                }
            }
            Ok(Err(e)) => Err(format!("QEMU: {e}")),
            Err(_) => {
                // SAFETY: killing the probe QEMU we started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                Err(format!(
                    "a probe guest made no progress under KVM in 5 s; slate asks again after a reboot, or when {} is removed",
                    self.cache.join("kvm-probe").display()
                ))
            }
        }
    }
}

/// The machine: QEMU's `pc`, entered through PVH. (`microvm` boots about
/// 0.2 s faster, but its firmware lays the ACPI tables where the initramfs
/// may land: depending on the initramfs's size the guest loses its tables,
/// hence its devices, or hangs.)
fn machine_args() -> [&'static str; 13] {
    [
        "-M",
        "pc",
        // QEMU's own seccomp filter: no obsolete system calls, no setuid,
        // no spawning processes, no scheduler or affinity changes.
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-device",
        "virtio-serial-pci",
    ]
}

/// The host's TSC frequency: given to the guest, its early calibration does
/// not fail when the host is busy.
fn tsc_khz() -> Option<u64> {
    let info = fs_err::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

fn kernel_cmdline() -> String {
    let mut c = String::from(
        "console=ttyS0 panic=-1 reboot=t quiet mitigations=off cryptomgr.notests audit=0 \
         apparmor=0 security=none ipv6.disable=1 rcupdate.rcu_expedited=1 8250.nr_uarts=1 nowatchdog",
    );
    if let Some(k) = tsc_khz() {
        c.push_str(&format!(" tsc_early_khz={k}"));
    }
    c
}

/// Closes a pidfd (if there is one) when dropped.
struct PidFd(libc::c_int);

impl Drop for PidFd {
    fn drop(&mut self) {
        if self.0 >= 0 {
            // SAFETY: closing a descriptor we opened.
            unsafe { libc::close(self.0) };
        }
    }
}

/// The folder in an environment's folder that belongs to QEMU's user.
const QEMU_DIR: &str = "q";

/// What QEMU opens, held open by slate and reached through
/// `/proc/self/fd`: QEMU's user needs no way through the cache's folders.
struct Handed {
    kernel: jail::Handed,
    initramfs: jail::Handed,
    disk: jail::Handed,
    dir: jail::Handed,
}

impl Handed {
    fn boot(boot: &boot::BootFiles, dir: &Path) -> io::Result<Handed> {
        Ok(Handed {
            kernel: jail::Handed::open(&boot.kernel)?,
            initramfs: jail::Handed::open(&boot.initramfs)?,
            disk: jail::Handed::open(&boot.disk)?,
            dir: jail::Handed::open(dir)?,
        })
    }

    fn fds(&self) -> Vec<std::os::fd::RawFd> {
        [&self.kernel, &self.initramfs, &self.disk, &self.dir]
            .iter()
            .map(|h| h.fd())
            .collect()
    }
}

/// QEMU's accelerator, CPUs, memory, machine and name.
fn add_machine_args(cmd: &mut Command, name: &str, accel: &str, cpus: u64, mem_mib: u64) {
    let accel_arg = if accel == "tcg" && cpus > 1 {
        "tcg,thread=multi".to_string()
    } else {
        accel.to_string()
    };
    cmd.args([
        "-accel",
        &accel_arg,
        "-cpu",
        if accel == "kvm" { "host" } else { "max" },
    ])
    .args(["-smp", &cpus.to_string(), "-m", &format!("{mem_mib}M")])
    .args(machine_args())
    .args(["-name", name]);
}

/// What QEMU boots: the kernel, initramfs and disk slate holds open, the
/// kernel's command line, and the agent's port.
fn add_boot_args(cmd: &mut Command, files: &Handed, append: &str) {
    cmd.arg("-kernel")
        .arg(files.kernel.path())
        .arg("-initrd")
        .arg(files.initramfs.path())
        .arg("-append")
        .arg(append)
        .arg("-drive")
        // snapshot=on: QEMU keeps the guest's writes in a temporary overlay
        // of its own, unlinked at once, so not even a kill -9 leaves it
        // behind; the base disk is opened read-only and never written.
        .arg(format!(
            "id=root,file={},if=none,format=qcow2,snapshot=on,cache=unsafe",
            files.disk.path().display()
        ))
        .args(["-device", "virtio-blk-pci,drive=root"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=agent,path={}/agent.sock,server=off",
            files.dir.path().display()
        ))
        .args(["-device", "virtserialport,chardev=agent,name=slate.agent"]);
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

impl Provider for VmProvider {
    type Env = VmEnv;

    fn name(&self) -> &'static str {
        "vm"
    }

    fn create(&self, spec: &EnvSpec) -> Result<VmEnv, ProviderError> {
        let cerr = |what: String| ProviderError::Create {
            env: spec.name.clone(),
            what,
            source: None,
        };
        if spec.upper.is_some() {
            return Err(cerr("images are baked in the sandbox, not in a VM".into()));
        }
        if spec.kind != EnvKind::Vm {
            return Err(cerr(format!(
                "the vm provider cannot make a {} environment",
                spec.kind.name()
            )));
        }
        let boot = boot::prepare(&self.cache, &spec.layers, &self.agent)
            .map_err(|e| cerr(format!("cannot prepare the VM's boot files: {e}")))?;
        let accel = self.accel(&boot).map_err(cerr)?;
        // Short: the agent's socket path must fit a Unix socket address.
        let name: String = sanitize(&spec.name).chars().take(24).collect();
        let id = format!(
            "vm-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = self.envs.join(&id);
        if dir.join(QEMU_DIR).join("agent.sock").as_os_str().len() > 100 {
            return Err(cerr(format!(
                "the path `{}` is too long for the agent's socket; set SLATE_CACHE to a shorter folder",
                dir.display()
            )));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| cerr(format!("create `{}`: {e}", dir.display())))?;
        let lease = take_lease(&dir.join("lease")).map_err(|e| cerr(format!("take lease: {e}")))?;
        let host_ca = if spec.network && spec.host_ca {
            let bundle =
                slate_provider::hostnet::host_ca_bundle().map_err(|what| ProviderError::Other {
                    env: spec.name.clone(),
                    what,
                })?;
            Some(fs_err::read(&bundle).map_err(|e| {
                cerr(format!(
                    "cannot read the host's CA bundle `{}`: {e}",
                    bundle.display()
                ))
            })?)
        } else {
            None
        };
        let mut env = VmEnv {
            id: id.clone(),
            dir: dir.clone(),
            qemu: None,
            identity: None,
            to_guest: None,
            from_guest: None,
            destroyed: false,
            _lease: lease,
            // Nothing the guest holds is larger than its disk.
            max_fetch: qcow2_size(&boot.disk).unwrap_or(MAX_FETCH_FALLBACK),
            network_env: if spec.network {
                net::guest_env(slate_provider::hostnet::env(spec.host_ca))
            } else {
                vec![]
            },
        };
        env.boot(self, spec, &boot, accel)
            .map_err(|e| cerr(format!("{e}{}", console_tail(&dir.join("console.log")))))?;
        if let Some(bundle) = host_ca {
            // The guest's /run is its own tmpfs: never part of the base disk.
            env.put_bytes(&bundle, slate_provider::hostnet::CA_PATH, 0o644)?;
        }
        Ok(env)
    }
}

/// Lines a guest that will never come up prints: fail at once instead of
/// waiting for the boot timeout.
const FATAL_CONSOLE: [&str; 4] = [
    "AE_NO_ACPI_TABLES",
    "Kernel panic",
    "reboot: System halted",
    "slate-agent: fatal",
];

/// The first fatal line in the guest's console so far, if any.
fn fatal_console(path: &Path) -> Option<String> {
    let text = fs_err::read_to_string(path).ok()?;
    text.lines()
        .find(|l| FATAL_CONSOLE.iter().any(|m| l.contains(m)))
        .map(|l| l.trim().to_string())
}

/// The last lines the guest printed, for an error message.
fn console_tail(path: &Path) -> String {
    let text = fs_err::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(8)..];
    format!("; the guest's console ended with:\n  {}", tail.join("\n  "))
}

type Frame = (u8, Vec<u8>);

pub struct VmEnv {
    id: String,
    dir: PathBuf,
    qemu: Option<Child>,
    /// The ids QEMU runs as, held while it runs.
    identity: Option<jail::Identity>,
    to_guest: Option<UnixStream>,
    from_guest: Option<Receiver<Frame>>,
    destroyed: bool,
    _lease: slate_provider::lease::Lock,
    /// The host's proxy (and CA) variables, for every command.
    network_env: Vec<(String, String)>,
    /// The most one `fetch` may copy: the guest's disk size.
    max_fetch: u64,
}

/// The cap on a fetch when the disk's size cannot be read.
const MAX_FETCH_FALLBACK: u64 = 64 << 30;

/// The virtual size of a qcow2 disk, from its header.
fn qcow2_size(path: &Path) -> Option<u64> {
    let mut head = [0u8; 32];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    (head[..4] == *b"QFI\xfb").then(|| u64::from_be_bytes(head[24..32].try_into().unwrap()))
}

/// Copies at most `cap` bytes (what the guest announced, never more than
/// its disk holds); a source with more is an error, whatever it claims.
fn copy_capped(from: &mut impl Read, to: &mut impl Write, cap: u64) -> io::Result<u64> {
    let n = io::copy(&mut from.take(cap), to)?;
    if n == cap && from.read(&mut [0u8; 1])? > 0 {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("the guest sent more than the {cap} bytes it announced; the copy was stopped"),
        ));
    }
    Ok(n)
}

struct HostFrames<'a>(&'a Receiver<Frame>);

/// Frames read ahead from the agent.
const FRAMES_IN_FLIGHT: usize = 64;
/// How long the agent may take to answer a request (or send the next
/// frame of an answer) before the VM counts as stuck.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// The largest file listing the agent may send.
const MAX_LISTING: u64 = 64 << 20;

impl proto::FrameSource for HostFrames<'_> {
    fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        match self.0.recv_timeout(REQUEST_TIMEOUT) {
            Ok(f) => Ok(Some(f)),
            Err(RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the guest's agent did not answer within {} s",
                    REQUEST_TIMEOUT.as_secs()
                ),
            )),
            Err(RecvTimeoutError::Disconnected) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the VM went away",
            )),
        }
    }
}

impl VmEnv {
    fn boot(
        &mut self,
        p: &VmProvider,
        spec: &EnvSpec,
        boot: &boot::BootFiles,
        accel: &str,
    ) -> io::Result<()> {
        let who = jail::Identity::take(&p.cache.join("ids"), accel == "kvm")?;
        let (qdir, listener) = self.agent_listener(&who)?;
        let files = Handed::boot(boot, &qdir)?;
        let mut cmd = self.qemu_command(&p.qemu, spec, accel, &files)?;
        who.apply(&mut cmd, files.fds());
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start QEMU: {e}")))?;
        drop(files);
        self.qemu = Some(child);
        self.identity = Some(who);

        let deadline = Instant::now() + p.settings.boot_timeout;
        let stream = self.accept_agent(&listener, deadline)?;
        self.connect_agent(stream)?;
        self.wait_for_hello(deadline, p.settings.boot_timeout)
    }

    /// Makes QEMU's folder and binds the agent's socket in it, both given
    /// to QEMU's user; returns the folder and the listening socket.
    fn agent_listener(&self, who: &jail::Identity) -> io::Result<(PathBuf, UnixListener)> {
        // QEMU's own folder: its socket, and the temporary overlay of
        // `snapshot=on` (TMPDIR).
        let qdir = self.dir.join(QEMU_DIR);
        std::fs::DirBuilder::new().mode(0o700).create(&qdir)?;
        jail::give(&qdir, who)?;
        let sock = qdir.join("agent.sock");
        let listener = UnixListener::bind(&sock)?;
        jail::give(&sock, who)?;
        listener.set_nonblocking(true)?;
        Ok((qdir, listener))
    }

    /// QEMU's command line for this environment, its output going to the
    /// console log.
    fn qemu_command(
        &self,
        qemu: &Path,
        spec: &EnvSpec,
        accel: &str,
        files: &Handed,
    ) -> io::Result<Command> {
        let cpus = spec
            .limits
            .cpus
            .map(|c| c.ceil().max(1.0) as u64)
            .unwrap_or(1);
        let mem_mib = spec
            .limits
            .memory
            .map(|m| (m >> 20).max(128))
            .unwrap_or(1024);
        let mut append = format!(
            "{} slate.hostname={}",
            kernel_cmdline(),
            sanitize(&spec.name)
        );
        if spec.network {
            append.push_str(" slate.net=1");
        }
        let console = std::fs::File::create(self.dir.join("console.log"))?;
        let mut cmd = Command::new(qemu);
        add_machine_args(&mut cmd, &self.id, accel, cpus, mem_mib);
        add_boot_args(&mut cmd, files, &append);
        if spec.network {
            cmd.args([
                "-netdev",
                "user,id=net",
                "-device",
                "virtio-net-pci,netdev=net",
            ]);
        }
        // QEMU gets nothing of slate's environment (credentials included).
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("TMPDIR", files.dir.path())
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console);
        Ok(cmd)
    }

    /// Waits for QEMU to connect the agent's port.
    fn accept_agent(
        &mut self,
        listener: &UnixListener,
        deadline: Instant,
    ) -> io::Result<UnixStream> {
        // Woken by the connection, or by QEMU's end (its pidfd), not by a
        // timer; without a pidfd (kernels before 5.3), every 50 ms.
        let pidfd = self.qemu.as_ref().map_or(-1, |c| {
            // SAFETY: pidfd_open on our own child's pid.
            unsafe { libc::syscall(libc::SYS_pidfd_open, c.id(), 0) as libc::c_int }
        });
        let _close = PidFd(pidfd);
        loop {
            match listener.accept() {
                Ok((s, _)) => return Ok(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.check_alive("before connecting to the agent's port")?;
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::other("QEMU did not connect the agent's port"));
                    }
                    let wait = if pidfd >= 0 {
                        left
                    } else {
                        left.min(Duration::from_millis(50))
                    };
                    let mut fds = [
                        libc::pollfd {
                            fd: listener.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: pidfd,
                            events: libc::POLLIN,
                            revents: 0,
                        },
                    ];
                    // SAFETY: poll on two pollfds we own (a negative fd is
                    // ignored by the kernel).
                    unsafe {
                        libc::poll(fds.as_mut_ptr(), 2, wait.as_millis().max(1) as libc::c_int)
                    };
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Talks to the agent over `stream`: frames are read ahead by a thread.
    fn connect_agent(&mut self, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        let mut reader = stream.try_clone()?;
        // Bounded: a guest that floods output waits for slate (TCP
        // back-pressure) instead of filling slate's memory.
        let (tx, rx) = mpsc::sync_channel(FRAMES_IN_FLIGHT);
        std::thread::spawn(move || {
            while let Ok(Some(f)) = proto::read_frame(&mut reader) {
                if tx.send(f).is_err() {
                    return;
                }
            }
        });
        // A guest that stops reading cannot hold slate forever.
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        self.to_guest = Some(stream);
        self.from_guest = Some(rx);
        Ok(())
    }

    /// Waits for the agent's hello, failing early when QEMU exits or the
    /// console shows a guest that will not come up.
    fn wait_for_hello(&mut self, deadline: Instant, timeout: Duration) -> io::Result<()> {
        loop {
            match self.recv(Duration::from_millis(100)) {
                Ok(Some((proto::HELLO, payload))) => {
                    proto::parse::<proto::Hello>(&payload)?;
                    return Ok(());
                }
                Ok(Some((k, _))) => {
                    return Err(io::Error::other(format!("the agent said {k} before hello")))
                }
                Ok(None) => {
                    self.check_alive("while booting")?;
                    if let Some(line) = fatal_console(&self.dir.join("console.log")) {
                        return Err(io::Error::other(format!(
                            "the guest failed to boot ({line})"
                        )));
                    }
                    if Instant::now() > deadline {
                        return Err(io::Error::other(format!(
                            "the guest did not come up within {} s",
                            timeout.as_secs()
                        )));
                    }
                }
                Err(e) => {
                    self.check_alive("while booting")?;
                    return Err(e);
                }
            }
        }
    }

    fn check_alive(&mut self, when: &str) -> io::Result<()> {
        if let Some(c) = &mut self.qemu {
            if let Some(st) = c.try_wait()? {
                return Err(io::Error::other(format!("QEMU exited {when} ({st})")));
            }
        }
        Ok(())
    }

    /// The next frame from the agent; `None` when `wait` passes first.
    fn recv(&self, wait: Duration) -> io::Result<Option<Frame>> {
        let rx = self
            .from_guest
            .as_ref()
            .ok_or_else(|| io::Error::other("not booted"))?;
        match rx.recv_timeout(wait) {
            Ok(f) => Ok(Some(f)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the VM went away (its agent port closed)",
            )),
        }
    }

    fn send(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        let s = self
            .to_guest
            .as_mut()
            .ok_or_else(|| io::Error::other("not booted"))?;
        proto::write_frame(s, kind, payload)
    }

    fn send_json(&mut self, kind: u8, v: &impl serde::Serialize) -> io::Result<()> {
        self.send(kind, &serde_json::to_vec(v).map_err(io::Error::other)?)
    }

    /// A request about one path.
    fn ask(&mut self, kind: u8, path: &str, mode: u32) -> io::Result<()> {
        self.send_json(
            kind,
            &proto::PathArg {
                path: path.into(),
                mode,
            },
        )
    }

    /// The agent's answers, as a source of frames (data, errors).
    fn answers(&self) -> io::Result<HostFrames<'_>> {
        self.from_guest
            .as_ref()
            .map(HostFrames)
            .ok_or_else(|| io::Error::other("not booted"))
    }

    /// A request about `path` followed by `data`, answered by OK.
    fn send_with_data(&mut self, kind: u8, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.ask(kind, path, mode)?;
        let s = self
            .to_guest
            .as_mut()
            .ok_or_else(|| io::Error::other("not booted"))?;
        proto::send_data(s, &mut &data[..])?;
        self.expect_ok()
    }

    /// Waits for OK (or the agent's error).
    fn expect_ok(&mut self) -> io::Result<()> {
        match proto::FrameSource::next_frame(&mut self.answers()?)? {
            Some((proto::OK, _)) => Ok(()),
            Some((proto::ERR, m)) => {
                Err(io::Error::other(String::from_utf8_lossy(&m).into_owned()))
            }
            Some((k, _)) => Err(io::Error::other(format!(
                "unexpected answer {k} from the agent"
            ))),
            None => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }

    fn err(&self, op: impl Into<String>, e: io::Error) -> ProviderError {
        ProviderError::op(&self.id, op, e)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.qemu.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.identity = None;
        let _ = fs_err::remove_dir_all(&self.dir);
    }
}

impl Environment for VmEnv {
    fn id(&self) -> &str {
        &self.id
    }

    fn put(&mut self, base: &Path, entries: &[PathBuf], dest: &str) -> Result<u64, ProviderError> {
        // Streamed as it is packed: the inputs are never held in memory.
        // Each entry is archived alone (a folder without its contents):
        // the list is what `exclude` and .gitignore left.
        let mut bytes = 0u64;
        let mut failed: Option<ProviderError> = None;
        let res = (|| {
            self.ask(proto::PUT_TAR, dest, 0)?;
            let s = self
                .to_guest
                .as_mut()
                .ok_or_else(|| io::Error::other("not booted"))?;
            let mut b = tar::Builder::new(proto::DataWriter::new(&mut *s));
            b.follow_symlinks(false);
            for e in entries {
                let src = base.join(e);
                let packed = fs_err::symlink_metadata(&src).and_then(|meta| {
                    if meta.is_file() {
                        bytes += meta.len();
                    }
                    b.append_path_with_name(&src, e)
                });
                if let Err(er) = packed {
                    // The guest is mid-stream: it cannot be told apart from
                    // a short archive, so the environment is not used again.
                    failed = Some(ProviderError::op(
                        &self.id,
                        format!("pack `{}`", src.display()),
                        er,
                    ));
                    return Err(io::Error::other("packing failed"));
                }
            }
            b.into_inner()?.finish()?;
            self.expect_ok()
        })();
        match (res, failed) {
            (_, Some(e)) => {
                self.stop();
                Err(e)
            }
            (Err(e), None) => Err(self.err(format!("copy into `{dest}`"), e)),
            (Ok(()), None) => Ok(bytes),
        }
    }

    fn put_bytes(&mut self, data: &[u8], dest: &str, mode: u32) -> Result<(), ProviderError> {
        self.send_with_data(proto::PUT_FILE, dest, mode, data)
            .map_err(|e| self.err(format!("write `{dest}`"), e))
    }

    fn exec(
        &mut self,
        spec: &ExecSpec,
        out: &mut dyn OutputSink,
        cancel: &Cancel,
    ) -> Result<ExecOutcome, ProviderError> {
        if spec.interactive {
            return Err(ProviderError::Other {
                env: self.id.clone(),
                what: "interactive shells are not available with the vm provider yet; use the sandbox provider for `slate shell`".into(),
            });
        }
        let what = spec.argv.first().cloned().unwrap_or_default();
        let req = proto::Exec {
            argv: spec.argv.clone(),
            env: self.network_env.iter().chain(&spec.env).cloned().collect(),
            cwd: spec.cwd.clone(),
        };
        self.send_json(proto::EXEC, &req)
            .map_err(|e| self.err(format!("run `{what}`"), e))?;
        let mut outs = [LineSplitter::default(), LineSplitter::default()];
        let mut stopped: Option<ExecOutcome> = None;
        let mut killed_at: Option<Instant> = None;
        loop {
            // Checked on every frame, not only when the guest is quiet: a
            // command that floods output still times out and is cancelled.
            match (stopped, killed_at) {
                // The guest did not answer a kill in time: the machine
                // goes, and the command with it.
                (Some(s), Some(at)) if at.elapsed() > Duration::from_secs(10) => {
                    self.stop();
                    return Ok(s);
                }
                (Some(_), _) => {}
                (None, _) => {
                    let s = if cancel.is_cancelled() {
                        Some(ExecOutcome::Cancelled)
                    } else if cancel.timed_out() {
                        Some(ExecOutcome::TimedOut)
                    } else {
                        None
                    };
                    if let Some(s) = s {
                        stopped = Some(s);
                        killed_at = Some(Instant::now());
                        if self.send(proto::KILL, b"").is_err() {
                            self.stop();
                            return Ok(s);
                        }
                    }
                }
            }
            let frame = match self.recv(Duration::from_millis(50)) {
                Ok(f) => f,
                Err(e) => {
                    let _ = self.check_alive("while a command ran");
                    return Err(self.err(format!("run `{what}`"), e));
                }
            };
            match frame {
                // After a kill, output still in flight is dropped.
                Some((proto::STDOUT | proto::STDERR, _)) if stopped.is_some() => {}
                Some((proto::STDOUT, d)) => outs[0].push(&d, |l| out.line(Stream::Stdout, l)),
                Some((proto::STDERR, d)) => outs[1].push(&d, |l| out.line(Stream::Stderr, l)),
                Some((proto::EXIT, d)) => {
                    outs[0].finish(|l| out.line(Stream::Stdout, l));
                    outs[1].finish(|l| out.line(Stream::Stderr, l));
                    if let Some(s) = stopped {
                        return Ok(s);
                    }
                    let exit: proto::Exit =
                        proto::parse(&d).map_err(|e| self.err("read the exit status", e))?;
                    return Ok(match (exit.code, exit.signal) {
                        (Some(c), _) => ExecOutcome::Exited(c),
                        (None, Some(s)) => ExecOutcome::Signaled(s),
                        _ => ExecOutcome::Exited(-1),
                    });
                }
                Some((proto::ERR, m)) => {
                    return Err(self.err(
                        format!("run `{what}`"),
                        io::Error::other(String::from_utf8_lossy(&m).into_owned()),
                    ))
                }
                Some((k, _)) => {
                    return Err(self.err(
                        format!("run `{what}`"),
                        io::Error::other(format!("unexpected frame {k}")),
                    ))
                }
                None => {}
            }
        }
    }

    fn list(&mut self, dir: &str) -> Result<Vec<String>, ProviderError> {
        let res = (|| {
            self.ask(proto::LIST, dir, 0)?;
            let mut json = Vec::new();
            let mut frames = self.answers()?;
            let mut data = proto::DataReader::new(&mut frames);
            (&mut data).take(MAX_LISTING).read_to_end(&mut json)?;
            if json.len() as u64 == MAX_LISTING {
                let _ = data.drain();
                return Err(io::Error::other(format!(
                    "the listing is larger than {} MiB",
                    MAX_LISTING >> 20
                )));
            }
            proto::parse::<Vec<String>>(&json)
        })();
        res.map_err(|e| self.err(format!("list `{dir}`"), e))
    }

    fn fetch(&mut self, src: &str, dest: &Path) -> Result<u64, ProviderError> {
        let mut overflow = false;
        let res = (|| {
            // The file first: a host-side failure must not leave the guest's
            // data unread in the stream.
            if let Some(parent) = dest.parent() {
                fs_err::create_dir_all(parent)?;
            }
            let mut f = std::fs::File::create(dest)?;
            self.ask(proto::FETCH, src, 0)?;
            let mut frames = self.answers()?;
            let size = match proto::FrameSource::next_frame(&mut frames)? {
                Some((proto::RESULT, p)) => proto::parse::<proto::FileSize>(&p)?.size,
                Some((proto::ERR, m)) => {
                    drop(f);
                    let _ = fs_err::remove_file(dest);
                    return Err(io::Error::other(String::from_utf8_lossy(&m).into_owned()));
                }
                Some((k, _)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("expected the file's size, got a frame of kind {k}"),
                    ))
                }
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
            };
            if size > self.max_fetch {
                drop(f);
                let _ = fs_err::remove_file(dest);
                // The data is on its way: the machine goes instead.
                overflow = true;
                return Err(io::Error::new(
                    io::ErrorKind::FileTooLarge,
                    format!(
                        "it is {size} bytes, more than the guest's disk holds ({} bytes), so it is mostly holes (a sparse file); shrink it in the build (compress it, or `qemu-img convert` a disk image) or use the sandbox provider",
                        self.max_fetch
                    ),
                ));
            }
            let mut data = proto::DataReader::new(&mut frames);
            let copied = copy_capped(&mut data, &mut f, size).and_then(|n| f.flush().map(|()| n));
            if let Err(e) = &copied {
                let _ = fs_err::remove_file(dest);
                // A guest sending more than its disk holds may never stop:
                // no draining, the machine goes instead.
                overflow = e.kind() == io::ErrorKind::FileTooLarge;
                if !overflow {
                    let _ = data.drain();
                }
            }
            copied
        })();
        if overflow {
            self.stop();
            if let Err(e) = res {
                return Err(ProviderError::Refused {
                    env: self.id.clone(),
                    what: format!("artifact `{src}`: {e}"),
                });
            }
        }
        res.map_err(|e| self.err(format!("copy `{src}` out"), e))
    }

    fn destroy(mut self) -> Result<(), ProviderError> {
        // Nothing in the guest outlives it (its disk is a throwaway overlay),
        // so there is no clean shutdown to wait for: QEMU just goes.
        self.destroyed = true;
        self.stop();
        Ok(())
    }
}

impl Drop for VmEnv {
    fn drop(&mut self) {
        if !self.destroyed {
            self.stop();
        }
    }
}

#[cfg(test)]
mod fetch_tests {
    use super::*;

    #[test]
    fn a_copy_stops_at_the_cap_and_says_so() {
        let mut out = Vec::new();
        let n = copy_capped(&mut &[7u8; 100][..], &mut out, 100).unwrap();
        assert_eq!((n, out.len()), (100, 100));
        let mut out = Vec::new();
        let e = copy_capped(&mut io::repeat(1), &mut out, 1000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
        assert!(e.to_string().contains("more than the 1000 bytes"), "{e}");
        assert_eq!(out.len(), 1000);
    }

    #[test]
    fn the_size_of_a_qcow2_disk_is_read_from_its_header() {
        let t = tempfile::tempdir().unwrap();
        let disk = t.path().join("d.qcow2");
        let mut head = b"QFI\xfb".to_vec();
        head.extend([0u8; 20]);
        head.extend((5u64 << 30).to_be_bytes());
        fs_err::write(&disk, &head).unwrap();
        assert_eq!(qcow2_size(&disk), Some(5 << 30));
        fs_err::write(&disk, b"not a disk at all, not qcow2 in any way").unwrap();
        assert_eq!(qcow2_size(&disk), None);
    }
}
