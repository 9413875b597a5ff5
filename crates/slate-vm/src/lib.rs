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
mod qmp;
pub mod snapshot;

use slate_provider::lease::take_lease;
use slate_provider::session::{self, Carrier, Session};
use slate_provider::wire;
use slate_provider::*;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
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
    /// Start machines by restoring one saved after its boot (see
    /// [`snapshot`]) instead of booting each.
    pub snapshots: bool,
}

impl Default for VmSettings {
    fn default() -> Self {
        VmSettings {
            accel: Accel::Auto,
            // A guest is up in 2-5 s under TCG on a busy host; one that is
            // not up in a minute is stuck (see `FATAL_CONSOLE`), and a new
            // one is the quickest way on.
            boot_timeout: Duration::from_secs(60),
            snapshots: true,
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
    /// What [`VmProvider::note_once`] has said.
    noted: Mutex<std::collections::HashSet<String>>,
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
            noted: Mutex::new(Default::default()),
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
    /// A kept disk to start from, over `disk`.
    start: Option<jail::Handed>,
}

impl Handed {
    fn boot(boot: &boot::BootFiles, dir: &Path, start: Option<&Path>) -> io::Result<Handed> {
        Ok(Handed {
            kernel: jail::Handed::open(&boot.kernel)?,
            initramfs: jail::Handed::open(&boot.initramfs)?,
            disk: jail::Handed::open(&boot.disk)?,
            dir: jail::Handed::open(dir)?,
            start: start.map(jail::Handed::open).transpose()?,
        })
    }

    fn fds(&self) -> Vec<std::os::fd::RawFd> {
        [&self.kernel, &self.initramfs, &self.disk, &self.dir]
            .into_iter()
            .chain(self.start.as_ref())
            .map(|h| h.fd())
            .collect()
    }
}

/// Where a VM's disk writes go.
#[derive(Clone, Copy, PartialEq)]
enum Disk {
    /// QEMU's throwaway overlay over the base disk.
    Throwaway,
    /// A disk file of the environment's own over the base disk
    /// (`q/disk.qcow2`), kept by `keep`.
    Own,
    /// QEMU's throwaway overlay over a kept disk over the base disk.
    FromKept,
}

/// Copies QEMU's disk file `from` (in QEMU's folder, which QEMU's user
/// owns and could have changed) to `to` as slate's own (root's, 0600). Only
/// the plain file QEMU's user owns, with no other name, is taken: a
/// symlink or a hard link to a host file is refused, never followed, and
/// nothing is changed through it.
fn take_disk(from: &Path, to: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let src = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(from);
    let refused = || {
        io::Error::other(
            "the VM's disk file is not the plain file slate made for QEMU (a link, or another owner's); it was not kept",
        )
    };
    let mut src = match src {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(refused()),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("open the VM's disk file: {e}"),
            ))
        }
    };
    let m = src.metadata()?;
    if !m.is_file() || m.nlink() != 1 || owner.is_some_and(|(uid, _)| m.uid() != uid) {
        return Err(refused());
    }
    let mut dst = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    io::copy(&mut src, &mut dst)?;
    dst.sync_all()
}

/// Makes `path`, an empty qcow2 overlay over `base`, for QEMU's user.
fn make_overlay(base: &Path, path: &Path, who: &jail::Identity) -> io::Result<()> {
    let size = qcow2_size(base)
        .ok_or_else(|| io::Error::other(format!("`{}` is not a qcow2 disk", base.display())))?;
    slate_layers::disk::run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-u", "-b"])
            .arg(base)
            .arg(path)
            .arg(size.to_string()),
        "qemu-img create",
    )?;
    jail::give(path, who)
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
fn add_boot_args(cmd: &mut Command, files: &Handed, append: &str, disk: Disk) {
    // snapshot=on: QEMU keeps the guest's writes in a temporary overlay of
    // its own, unlinked at once, so not even a kill -9 leaves it behind;
    // the base disk is opened read-only and never written. An overlay file
    // names its backing file by a path QEMU's user cannot reach: it is
    // given the base disk's descriptor instead.
    let backing = format!(
        "backing.driver=qcow2,backing.file.driver=file,backing.file.filename={}",
        files.disk.path().display()
    );
    let drive = match (disk, &files.start) {
        (Disk::Own, _) => format!(
            "id=root,file={}/disk.qcow2,if=none,format=qcow2,cache=unsafe,{backing}",
            files.dir.path().display()
        ),
        (Disk::FromKept, Some(start)) => format!(
            "id=root,file={},if=none,format=qcow2,snapshot=on,cache=unsafe,{backing}",
            start.path().display()
        ),
        _ => format!(
            "id=root,file={},if=none,format=qcow2,snapshot=on,cache=unsafe",
            files.disk.path().display()
        ),
    };
    cmd.arg("-kernel")
        .arg(files.kernel.path())
        .arg("-initrd")
        .arg(files.initramfs.path())
        .arg("-append")
        .arg(append)
        .arg("-drive")
        .arg(drive)
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
        // A kept disk is not the disk the saved machine read: it boots.
        let saved = match spec.start_disk {
            Some(_) => None,
            None => self.saved_machine(spec, &boot, accel),
        };
        let mut env = match saved {
            Some(Ok(state)) => match self.start(spec, &boot, accel, Start::Restore(&state)) {
                Ok(env) => env,
                Err(e) => {
                    // Whatever is wrong with it, the next start saves it anew.
                    let _ = fs_err::remove_file(&state.path);
                    self.note_once(&format!(
                        "vm: a saved machine could not be restored ({}); booting instead",
                        first_line(&e.to_string())
                    ));
                    self.start(spec, &boot, accel, Start::Boot)?
                }
            },
            Some(Err(why)) => {
                self.note_once(&format!(
                    "vm: cannot save a booted machine to restore ({why}); every VM boots its kernel"
                ));
                self.start(spec, &boot, accel, Start::Boot)?
            }
            None => self.start(spec, &boot, accel, Start::Boot)?,
        };
        if let Some(bundle) = host_ca {
            // The guest's /run is its own tmpfs: never part of the base disk.
            env.put_bytes(&bundle, slate_provider::hostnet::CA_PATH, 0o644)?;
        }
        Ok(env)
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// How an environment's machine comes up.
enum Start<'a> {
    /// The kernel boots.
    Boot,
    /// The kernel boots; at the agent's `READY` the machine is saved into
    /// the file, and the environment is good for nothing else.
    Save(&'a std::fs::File),
    /// Restored from a saved machine.
    Restore(&'a snapshot::Saved),
}

impl VmProvider {
    /// Says `msg` unless it was said before by this provider.
    fn note_once(&self, msg: &str) {
        if self.noted.lock().unwrap().insert(msg.to_string()) {
            self.note(msg);
        }
    }

    /// The saved machine for environments like `spec`, saved now if there
    /// is none yet: `None` when machines are not saved (turned off).
    fn saved_machine(
        &self,
        spec: &EnvSpec,
        boot: &boot::BootFiles,
        accel: &'static str,
    ) -> Option<Result<snapshot::Saved, String>> {
        if !self.settings.snapshots {
            return None;
        }
        let (cpus, mem_mib) = machine_size(spec);
        let key = snapshot::Key {
            qemu: &self.qemu,
            accel,
            cpus,
            mem_mib,
            network: spec.network,
            cmdline: &guest_cmdline(spec),
            boot,
        };
        Some(snapshot::find_or_save(&self.cache, &key, |out| {
            self.start(spec, boot, accel, Start::Save(out))
                .map(drop)
                .map_err(|e| e.to_string())
        }))
    }

    /// Makes an environment's folder and brings its machine up `how`.
    fn start(
        &self,
        spec: &EnvSpec,
        boot: &boot::BootFiles,
        accel: &str,
        how: Start,
    ) -> Result<VmEnv, ProviderError> {
        let cerr = |what: String| ProviderError::Create {
            env: spec.name.clone(),
            what,
            source: None,
        };
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
        let mut session = Session::new(&id, "the guest's agent");
        // Nothing the guest holds is larger than its disk.
        session.max_fetch = qcow2_size(&boot.disk).unwrap_or(MAX_FETCH_FALLBACK);
        session.oversize = oversize;
        session.interactive = true;
        if spec.network {
            // The host's proxy (and CA) variables, for every command.
            session.base_env = net::guest_env(slate_provider::hostnet::env(spec.host_ca));
        }
        let mut env = VmEnv {
            session,
            machine: Machine {
                dir: dir.clone(),
                qemu: None,
                identity: None,
                _lease: lease,
            },
            destroyed: false,
            disk: match (&spec.start_disk, spec.keepable) {
                (Some(_), _) => Disk::FromKept,
                (None, true) => Disk::Own,
                (None, false) => Disk::Throwaway,
            },
        };
        env.boot(self, spec, boot, accel, how)
            .map_err(|e| cerr(format!("{e}{}", console_tail(&dir.join("console.log")))))?;
        Ok(env)
    }
}

/// The CPUs and memory (MiB) of a machine for `spec`.
fn machine_size(spec: &EnvSpec) -> (u64, u64) {
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
    (cpus, mem_mib)
}

/// The guest kernel's command line: the same for every environment of one
/// image and network setting (what differs goes in `START`), so a saved
/// machine fits them all.
fn guest_cmdline(spec: &EnvSpec) -> String {
    let mut append = kernel_cmdline();
    if spec.network {
        append.push_str(" slate.net=1");
    }
    append
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

pub struct VmEnv {
    session: Session,
    machine: Machine,
    destroyed: bool,
    disk: Disk,
}

/// What carries a VM's session: QEMU, the ids it runs as, its folder.
struct Machine {
    dir: PathBuf,
    qemu: Option<Child>,
    /// The ids QEMU runs as, held while it runs.
    identity: Option<jail::Identity>,
    _lease: slate_provider::lease::Lock,
}

impl Carrier for Machine {
    fn stop(&mut self) {
        if let Some(mut c) = self.qemu.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.identity = None;
        let _ = fs_err::remove_dir_all(&self.dir);
    }

    fn check_alive(&mut self, when: &str) -> io::Result<()> {
        if let Some(c) = &mut self.qemu {
            if let Some(st) = c.try_wait()? {
                return Err(io::Error::other(format!("QEMU exited {when} ({st})")));
            }
        }
        Ok(())
    }
}

/// The cap on a fetch when the disk's size cannot be read.
const MAX_FETCH_FALLBACK: u64 = 64 << 30;

/// The virtual size of a qcow2 disk, from its header.
fn qcow2_size(path: &Path) -> Option<u64> {
    let mut head = [0u8; 32];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    (head[..4] == *b"QFI\xfb").then(|| u64::from_be_bytes(head[24..32].try_into().unwrap()))
}

/// Why an artifact larger than the guest's disk is refused.
fn oversize(size: u64, cap: u64) -> String {
    format!(
        "it is {size} bytes, more than the guest's disk holds ({cap} bytes), so it is mostly holes (a sparse file); shrink it in the build (compress it, or `qemu-img convert` a disk image) or use the sandbox provider"
    )
}

impl VmEnv {
    fn boot(
        &mut self,
        p: &VmProvider,
        spec: &EnvSpec,
        boot: &boot::BootFiles,
        accel: &str,
        how: Start,
    ) -> io::Result<()> {
        let who = jail::Identity::take(&p.cache.join("ids"), accel == "kvm")?;
        let qdir = self.qemu_dir(&who)?;
        let listener = listen(&qdir, "agent.sock", &who)?;
        let monitor = match how {
            Start::Boot => None,
            Start::Save(_) | Start::Restore(_) => Some(listen(&qdir, "qmp.sock", &who)?),
        };
        if self.disk == Disk::Own {
            make_overlay(&boot.disk, &qdir.join("disk.qcow2"), &who)?;
        }
        if let Some(start) = &spec.start_disk {
            jail::grant_read(start)?;
        }
        let files = Handed::boot(boot, &qdir, spec.start_disk.as_deref())?;
        let mut cmd = self.qemu_command(&p.qemu, spec, accel, &files)?;
        let mut keep = files.fds();
        if monitor.is_some() {
            cmd.arg("-chardev")
                .arg(format!(
                    "socket,id=qmp,path={}/qmp.sock,server=off",
                    files.dir.path().display()
                ))
                .args(["-mon", "chardev=qmp,mode=control"]);
        }
        match how {
            Start::Boot | Start::Save(_) => {}
            Start::Restore(saved) => {
                cmd.args(["-incoming", "defer"]);
                keep.push(saved.file.as_raw_fd());
            }
        }
        who.apply(&mut cmd, keep);
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start QEMU: {e}")))?;
        drop(files);
        self.machine.qemu = Some(child);
        self.machine.identity = Some(who);

        let deadline = Instant::now() + p.settings.boot_timeout;
        let stream = self.accept(&listener, deadline, "the agent's port")?;
        self.connect_agent(stream)?;
        match how {
            Start::Boot => {
                self.wait_for(wire::READY, deadline, p.settings.boot_timeout)?;
                self.send_start(spec)?;
            }
            Start::Save(out) => {
                let monitor = monitor.expect("made for saving");
                let stream = self.accept(&monitor, deadline, "its monitor")?;
                self.wait_for(wire::READY, deadline, p.settings.boot_timeout)?;
                return qmp::Qmp::open(stream, deadline)?.save_to(out);
            }
            Start::Restore(saved) => {
                let monitor = monitor.expect("made for restoring");
                let stream = self.accept(&monitor, deadline, "its monitor")?;
                // Once it runs, the saved agent waits for its start.
                qmp::Qmp::open(stream, deadline)?.restore_from(saved.file.as_raw_fd())?;
                self.send_start(spec)?;
            }
        }
        self.wait_for(wire::HELLO, deadline, p.settings.boot_timeout)
            .map(drop)
    }

    /// What makes this guest unlike any other: its name, the host's clock
    /// and fresh random bytes.
    fn send_start(&mut self, spec: &EnvSpec) -> io::Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut seed = vec![0u8; 64];
        getrandom(&mut seed)?;
        self.session.send_json(
            wire::START,
            &wire::Start {
                hostname: sanitize(&spec.name),
                secs: now.as_secs() as i64,
                nanos: now.subsec_nanos(),
                seed,
            },
        )
    }

    /// Makes QEMU's folder, given to QEMU's user: its sockets, and the
    /// temporary overlay of `snapshot=on` (TMPDIR).
    fn qemu_dir(&self, who: &jail::Identity) -> io::Result<PathBuf> {
        let qdir = self.machine.dir.join(QEMU_DIR);
        std::fs::DirBuilder::new().mode(0o700).create(&qdir)?;
        jail::give(&qdir, who)?;
        Ok(qdir)
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
        let (cpus, mem_mib) = machine_size(spec);
        let console = std::fs::File::create(self.machine.dir.join("console.log"))?;
        let mut cmd = Command::new(qemu);
        add_machine_args(&mut cmd, self.session.id(), accel, cpus, mem_mib);
        add_boot_args(&mut cmd, files, &guest_cmdline(spec), self.disk);
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

    /// Waits for QEMU to connect `what` (a socket of QEMU's folder).
    fn accept(
        &mut self,
        listener: &UnixListener,
        deadline: Instant,
        what: &str,
    ) -> io::Result<UnixStream> {
        // Woken by the connection, or by QEMU's end (its pidfd), not by a
        // timer; without a pidfd (kernels before 5.3), every 50 ms.
        let pidfd = self.machine.qemu.as_ref().map_or(-1, |c| {
            // SAFETY: pidfd_open on our own child's pid.
            unsafe { libc::syscall(libc::SYS_pidfd_open, c.id(), 0) as libc::c_int }
        });
        let _close = PidFd(pidfd);
        loop {
            match listener.accept() {
                Ok((s, _)) => return Ok(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.machine
                        .check_alive(&format!("before connecting {what}"))?;
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::other(format!("QEMU did not connect {what}")));
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
        let reader = stream.try_clone()?;
        // A guest that stops reading cannot hold slate forever.
        stream.set_write_timeout(Some(session::REQUEST_TIMEOUT))?;
        self.session.connect(reader, stream);
        Ok(())
    }

    /// Waits for the agent's frame `want` (`READY`, `HELLO`), failing
    /// early when QEMU exits or the console shows a guest that will not
    /// come up.
    fn wait_for(&mut self, want: u8, deadline: Instant, timeout: Duration) -> io::Result<Vec<u8>> {
        loop {
            match self.session.recv(Duration::from_millis(100)) {
                Ok(Some((k, payload))) if k == want => {
                    if k == wire::HELLO {
                        wire::parse::<wire::Hello>(&payload)?;
                    }
                    return Ok(payload);
                }
                Ok(Some((k, _))) => {
                    return Err(io::Error::other(format!(
                        "the agent said {k} when {want} was due"
                    )))
                }
                Ok(None) => {
                    self.machine.check_alive("while booting")?;
                    if let Some(line) = fatal_console(&self.machine.dir.join("console.log")) {
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
                    self.machine.check_alive("while booting")?;
                    return Err(e);
                }
            }
        }
    }
}

/// Binds the socket `name` in QEMU's folder `qdir`, given to QEMU's user.
fn listen(qdir: &Path, name: &str, who: &jail::Identity) -> io::Result<UnixListener> {
    let sock = qdir.join(name);
    let listener = UnixListener::bind(&sock)?;
    jail::give(&sock, who)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Fills `buf` from the kernel's generator.
fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most the rest of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl Environment for VmEnv {
    fn id(&self) -> &str {
        self.session.id()
    }

    fn put(&mut self, base: &Path, entries: &[PathBuf], dest: &str) -> Result<u64, ProviderError> {
        self.session.put(&mut self.machine, base, entries, dest)
    }

    fn put_bytes(&mut self, data: &[u8], dest: &str, mode: u32) -> Result<(), ProviderError> {
        self.session.put_bytes(data, dest, mode)
    }

    fn exec(
        &mut self,
        spec: &ExecSpec,
        out: &mut dyn OutputSink,
        cancel: &Cancel,
    ) -> Result<ExecOutcome, ProviderError> {
        self.session.exec(&mut self.machine, spec, out, cancel)
    }

    fn list(&mut self, dir: &str) -> Result<Vec<String>, ProviderError> {
        self.session.list(dir)
    }

    fn fetch(&mut self, src: &str, dest: &Path) -> Result<u64, ProviderError> {
        self.session.fetch(&mut self.machine, src, dest)
    }

    fn keep(mut self, dest: &Path) -> Result<(), ProviderError> {
        let id = self.session.id().to_string();
        if self.disk != Disk::Own {
            self.destroyed = true;
            self.machine.stop();
            return Err(ProviderError::Other {
                env: self.session.id().to_string(),
                what: "this VM wrote to a throwaway overlay; it was destroyed".into(),
            });
        }
        // What the guest has not written to its disk yet goes there first
        // (a guest that does not answer in 30 s is kept as its disk is).
        let sync = ExecSpec {
            argv: vec!["sync".into()],
            env: vec![],
            cwd: "/".into(),
            interactive: false,
        };
        let mut none = |_: Stream, _: &str| {};
        let cancel = Cancel::new().with_timeout(Some(Duration::from_secs(30)));
        let _ = self
            .session
            .exec(&mut self.machine, &sync, &mut none, &cancel);
        if let Some(mut c) = self.machine.qemu.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let disk = self.machine.dir.join(QEMU_DIR).join("disk.qcow2");
        let owner = self.machine.identity.as_ref().and_then(|i| i.owner());
        let kept = fs_err::create_dir_all(dest)
            .and_then(|()| take_disk(&disk, &dest.join("disk.qcow2"), owner));
        if kept.is_err() {
            let _ = fs_err::remove_dir_all(dest);
        }
        self.destroyed = true;
        self.machine.stop();
        kept.map_err(|e| {
            ProviderError::op(&id, format!("keep its disk in `{}`", dest.display()), e)
        })
    }

    fn destroy(mut self) -> Result<(), ProviderError> {
        // Nothing in the guest outlives it (its disk is a throwaway overlay),
        // so there is no clean shutdown to wait for: QEMU just goes.
        self.destroyed = true;
        self.machine.stop();
        Ok(())
    }
}

impl Drop for VmEnv {
    fn drop(&mut self) {
        if !self.destroyed {
            self.machine.stop();
        }
    }
}

#[cfg(test)]
mod fetch_tests {
    use super::*;

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
