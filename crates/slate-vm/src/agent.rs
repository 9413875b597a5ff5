//! slate's guest agent: PID 1 of every VM. It loads the modules the
//! initramfs carries, mounts the image's disk as the root, and then does
//! what slate asks over the `slate.agent` virtio-serial port: run commands
//! (streaming their output), copy files in and out, power off.
//!
//! It reads its settings from the kernel command line: `slate.net=1`
//! (configure `eth0` for QEMU's user-mode network) and `slate.probe=1`
//! (print a marker and power off: the KVM probe). Once its port is open it
//! says `READY` and waits for `START` (its hostname, the clock, a random
//! seed) before it mounts the disk: slate may save the machine in between
//! and restore it for every environment of the image.

use slate_provider::wire::{self as proto, DataReader};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// What the probe prints on the console when the guest came up.
pub const PROBE_MARKER: &str = "slate-probe-ok";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn log(msg: &str) {
    // The console is the serial port: slate keeps it in the environment's log.
    let _ = writeln!(io::stderr(), "slate-agent: {msg}");
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f, d) = (cstr(src), cstr(target), cstr(fstype), cstr(data));
    // SAFETY: valid C strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            if fstype.is_empty() {
                std::ptr::null()
            } else {
                f.as_ptr()
            },
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                d.as_ptr().cast()
            },
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("mount {fstype} on {target}: {e}"),
        ));
    }
    Ok(())
}

/// Ends the machine: a reboot, which QEMU (run with `-no-reboot`) turns
/// into its exit. Unlike a power-off it needs no ACPI, so it works even when
/// the guest came up without its ACPI tables.
fn power_off() -> ! {
    // SAFETY: plain syscalls; reboot does not return on success.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    std::process::exit(0)
}

/// The agent's entry point (the `slate-agent` binary's `main`).
pub fn main() -> ! {
    if std::process::id() != 1 {
        eprintln!("slate-agent runs as PID 1 inside slate's virtual machines; there is nothing to do here");
        std::process::exit(2);
    }
    if let Err(e) = run() {
        log(&format!("fatal: {e}"));
    }
    power_off()
}

fn cmdline_value(cmdline: &str, key: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .map(str::to_string)
}

fn run() -> io::Result<()> {
    mount("proc", "/proc", "proc", 0, "")?;
    mount("sysfs", "/sys", "sysfs", 0, "")?;
    mount("devtmpfs", "/dev", "devtmpfs", 0, "")?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline_value(&cmdline, "slate.probe").is_some() {
        println!("{PROBE_MARKER}");
        power_off();
    }
    load_modules("order")?;
    if cmdline_value(&cmdline, "slate.net").is_some() {
        load_modules("order-net")?;
    }
    let mut port = find_port()?;
    wait_for(Path::new("/sys/block/vda"), "the disk /dev/vda")?;
    // Read-only until `START`: nothing is written to the disk before the
    // machine may be saved, so the disk under every restored machine is the
    // one it saw.
    mount(
        "/dev/vda",
        "/newroot",
        "ext4",
        libc::MS_RDONLY,
        "noinit_itable",
    )?;
    for d in ["proc", "sys", "dev"] {
        mount(
            &format!("/{d}"),
            &format!("/newroot/{d}"),
            "",
            libc::MS_MOVE,
            "",
        )?;
    }
    enter_root("/newroot")?;
    let _ = mount(
        "devpts",
        "/dev/pts",
        "devpts",
        0,
        "newinstance,ptmxmode=0666",
    );
    let _ = mount("tmpfs", "/dev/shm", "tmpfs", 0, "mode=1777");
    warm_page_cache();
    // Up to here every guest of one image is the same, and has run nothing
    // of the image: slate may save the machine now, and restore it for each
    // environment.
    proto::write_frame(&mut port, proto::READY, b"")?;
    let start = match proto::read_frame(&mut port)? {
        Some((proto::START, payload)) => proto::parse::<proto::Start>(&payload)?,
        Some((k, _)) => return Err(io::Error::other(format!("slate sent {k} before start"))),
        None => return Err(io::Error::other("slate closed the port before start")),
    };
    make_unique(&start)?;
    mount("", "/", "", libc::MS_REMOUNT, "noinit_itable")?;
    mount("tmpfs", "/tmp", "tmpfs", 0, "mode=1777")?;
    mount("tmpfs", "/run", "tmpfs", 0, "mode=0755")?;
    // SAFETY: a valid buffer and its length.
    unsafe { libc::sethostname(start.hostname.as_ptr().cast(), start.hostname.len()) };
    crate::net::up("lo", None)?;
    if cmdline_value(&cmdline, "slate.net").is_some() {
        crate::net::up("eth0", Some(crate::net::USER_NET))?;
        let _ = std::fs::write("/etc/resolv.conf", "nameserver 10.0.2.3\n");
    }
    serve(port)
}

/// Reads what nearly every command loads (the shell, the dynamic loader,
/// the C library) into the page cache, so that a machine saved now starts
/// its first command without going to the disk. Only regular files, and
/// only their first 32 MiB: nothing of the image runs, and no image can
/// make this wait.
fn warm_page_cache() {
    const FILES: [&str; 6] = [
        "/bin/sh",
        "/bin/bash",
        "/usr/bin/env",
        "/lib64/ld-linux-x86-64.so.2",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/x86_64-linux-gnu/libtinfo.so.6",
    ];
    use std::os::unix::fs::OpenOptionsExt;
    for path in FILES {
        let Ok(f) = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        else {
            continue;
        };
        if f.metadata().is_ok_and(|m| m.is_file()) {
            let _ = io::copy(&mut f.take(32 << 20), &mut io::sink());
        }
    }
}

/// What no two guests may share, even two restored from one saved machine:
/// the clock is set to the host's, and the kernel's random pool gets fresh
/// bytes, credited, after which its generator reseeds at once (so what a
/// restored guest draws owes nothing to the state that was saved).
fn make_unique(start: &proto::Start) -> io::Result<()> {
    let now = libc::timespec {
        tv_sec: start.secs as libc::time_t,
        tv_nsec: start.nanos as libc::c_long,
    };
    // SAFETY: a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &now) } != 0 {
        return Err(io::Error::other(format!(
            "set the clock: {}",
            io::Error::last_os_error()
        )));
    }
    const SEED: usize = 64;
    if start.seed.len() < 32 || start.seed.len() > SEED {
        return Err(io::Error::other("slate sent no usable seed"));
    }
    #[repr(C)]
    struct PoolInfo {
        entropy_count: libc::c_int,
        buf_size: libc::c_int,
        buf: [u8; SEED],
    }
    let mut info = PoolInfo {
        entropy_count: (start.seed.len() * 8) as libc::c_int,
        buf_size: start.seed.len() as libc::c_int,
        buf: [0; SEED],
    };
    info.buf[..start.seed.len()].copy_from_slice(&start.seed);
    // _IOW('R', 0x03, int[2]) and _IO('R', 0x07), from <linux/random.h>.
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let urandom = File::options().write(true).open("/dev/urandom")?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&urandom);
    // SAFETY: the ioctls of <linux/random.h> with the struct they take.
    unsafe {
        if libc::ioctl(fd, RNDADDENTROPY as _, &info) != 0 {
            return Err(io::Error::other(format!(
                "seed the kernel's random pool: {}",
                io::Error::last_os_error()
            )));
        }
        if libc::ioctl(fd, RNDRESEEDCRNG as _) != 0 {
            return Err(io::Error::other(format!(
                "reseed the kernel's generator: {}",
                io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// Loads `/modules/*.ko` in the order the list `/modules/LIST` gives
/// (dependencies first).
fn load_modules(list: &str) -> io::Result<()> {
    let order = std::fs::read_to_string(format!("/modules/{list}")).unwrap_or_default();
    for name in order.lines().filter(|l| !l.is_empty()) {
        let f = File::open(format!("/modules/{name}"))?;
        let params = cstr("");
        // SAFETY: finit_module with a descriptor we own and a C string.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                params.as_ptr(),
                0,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(io::Error::new(e.kind(), format!("load module {name}: {e}")));
            }
        }
    }
    Ok(())
}

fn wait_for(p: &Path, what: &str) -> io::Result<()> {
    for _ in 0..2000 {
        if p.exists() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("{what} did not appear"),
    ))
}

/// The `slate.agent` port's device, found by name (its number depends on
/// the order of devices).
fn find_port() -> io::Result<File> {
    for _ in 0..2000 {
        if let Ok(rd) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in rd.flatten() {
                let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if name.trim() == "slate.agent" {
                    let dev = Path::new("/dev").join(e.file_name());
                    wait_for(&dev, "the agent port")?;
                    return std::fs::OpenOptions::new().read(true).write(true).open(dev);
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no virtio-serial port named slate.agent",
    ))
}

/// Makes `new` the root: move it over `/`, then chroot into it.
fn enter_root(new: &str) -> io::Result<()> {
    std::env::set_current_dir(new)?;
    mount(".", "/", "", libc::MS_MOVE, "")?;
    let dot = cstr(".");
    // SAFETY: a valid C string.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")
}

type Out = Arc<Mutex<File>>;

fn send(out: &Out, kind: u8, payload: &[u8]) -> io::Result<()> {
    proto::write_frame(&mut *out.lock().unwrap(), kind, payload)
}

enum Msg {
    Frame(u8, Vec<u8>),
    Exited(std::process::ExitStatus),
    Gone,
}

fn serve(port: File) -> io::Result<()> {
    let out: Out = Arc::new(Mutex::new(port.try_clone()?));
    // SAFETY: utsname is plain bytes; all-zero is a valid value.
    let mut uname: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills the struct we own.
    unsafe { libc::uname(&mut uname) };
    // SAFETY: release is a NUL-terminated C string in the struct.
    let kernel = unsafe { std::ffi::CStr::from_ptr(uname.release.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    proto::write_json(
        &mut *out.lock().unwrap(),
        proto::HELLO,
        &proto::Hello { kernel, cpus },
    )?;

    // One thread reads the port, so that a KILL arrives while a command runs.
    let (tx, rx) = mpsc::channel::<Msg>();
    let reader_tx = tx.clone();
    let mut input = port;
    // Bulk data (PUT) is read inline by the main thread; the reader hands it
    // frames one by one through the channel, so the stream stays in order.
    std::thread::spawn(move || loop {
        match proto::read_frame(&mut input) {
            Ok(Some((k, p))) => {
                if reader_tx.send(Msg::Frame(k, p)).is_err() {
                    return;
                }
            }
            _ => {
                let _ = reader_tx.send(Msg::Gone);
                return;
            }
        }
    });
    let mut frames = ChannelFrames { rx: &rx };
    loop {
        let (kind, payload) = match proto::FrameSource::next_frame(&mut frames)? {
            Some(f) => f,
            None => return Ok(()),
        };
        let res = match kind {
            proto::EXEC => match exec(&out, &payload, &rx, &tx) {
                // The host is gone: nothing left to serve.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
                other => other,
            },
            proto::PUT_TAR => put_tar(&out, &payload, &mut frames),
            proto::PUT_FILE => put_file(&out, &payload, &mut frames),
            proto::LIST => list(&out, &payload),
            proto::FETCH => fetch(&out, &payload),
            // A late KILL, or the rest of a request that failed: no answer.
            proto::KILL | proto::DATA => Ok(()),
            other => send(
                &out,
                proto::ERR,
                format!("unknown request {other}").as_bytes(),
            ),
        };
        if let Err(e) = res {
            send(&out, proto::ERR, e.to_string().as_bytes())?;
        }
    }
}

/// Frames from the reader thread.
struct ChannelFrames<'a> {
    rx: &'a mpsc::Receiver<Msg>,
}

impl proto::FrameSource for ChannelFrames<'_> {
    fn next_frame(&mut self) -> io::Result<Option<(u8, Vec<u8>)>> {
        loop {
            match self.rx.recv() {
                Ok(Msg::Frame(k, p)) => return Ok(Some((k, p))),
                Ok(Msg::Exited(_)) => continue,
                Ok(Msg::Gone) | Err(_) => return Ok(None),
            }
        }
    }
}

fn exec(
    out: &Out,
    payload: &[u8],
    rx: &mpsc::Receiver<Msg>,
    tx: &mpsc::Sender<Msg>,
) -> io::Result<()> {
    let spec: proto::Exec = proto::parse(payload)?;
    let Some((prog, args)) = spec.argv.split_first() else {
        return send(out, proto::ERR, b"empty command");
    };
    let mut cmd = command(&spec, prog, args);
    // An interactive command gets a terminal: its output comes through the
    // terminal's other side.
    let terminal = match spec
        .tty
        .map(|size| open_terminal(&mut cmd, size))
        .transpose()
    {
        Ok(t) => t,
        Err(e) => {
            return send(
                out,
                proto::ERR,
                format!("cannot make a terminal: {e}").as_bytes(),
            )
        }
    };
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return send(
                out,
                proto::ERR,
                format!("cannot start `{prog}`: {e}").as_bytes(),
            );
        }
    };
    drop(cmd);
    let pid = child.id() as i32;
    let terminal_out = terminal
        .as_ref()
        .map(|t| t.try_clone().map(|f| Box::new(f) as Box<dyn Read + Send>))
        .transpose()?;
    // Output frames go only while `open`: once EXIT is sent, a pump still
    // held up by a stray descendant holding the pipe can send nothing more.
    let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (done_tx, done_rx) = mpsc::channel::<()>();
    pump(
        out,
        &open,
        &done_tx,
        terminal_out.or_else(|| {
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>)
        }),
        proto::STDOUT,
    );
    pump(
        out,
        &open,
        &done_tx,
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        proto::STDERR,
    );
    let waiter_tx = tx.clone();
    std::thread::spawn(move || {
        if let Ok(st) = child.wait() {
            let _ = waiter_tx.send(Msg::Exited(st));
        }
    });
    let (status, host_gone) = wait_for_exit(rx, terminal.as_ref());
    send_exit(out, pid, &open, &done_rx, status)?;
    if host_gone {
        return Err(io::Error::new(io::ErrorKind::BrokenPipe, "slate went away"));
    }
    Ok(())
}

/// The command a request asks for: its own process group, a clean
/// environment with the request's variables, output on pipes.
fn command(spec: &proto::Exec, prog: &str, args: &[String]) -> Command {
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/root")
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(if spec.cwd.is_empty() { "/" } else { &spec.cwd })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A group of its own, to kill with everything it started; one on a
    // terminal gets a session of its own instead (see `open_terminal`).
    if spec.tty.is_none() {
        cmd.process_group(0);
    }
    cmd
}

/// Makes a terminal of `size` for `cmd`: its input, output and error, and
/// its controlling terminal in a session of its own. Returns the other side.
fn open_terminal(cmd: &mut Command, size: proto::Tty) -> io::Result<File> {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    // SAFETY: posix_openpt returns a new descriptor or -1.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if master < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we own from here on.
    let master = unsafe { File::from_raw_fd(master) };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&master);
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: the terminal calls of <stdlib.h> on our descriptor, and a
    // buffer of the size given.
    unsafe {
        if libc::grantpt(fd) != 0
            || libc::unlockpt(fd) != 0
            || libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: ptsname_r wrote a NUL-terminated path.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let slave = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)?;
    set_size(&master, size);
    cmd.stdin(slave.try_clone()?)
        .stdout(slave.try_clone()?)
        .stderr(slave);
    // SAFETY: only raw system calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(master)
}

fn set_size(terminal: &File, size: proto::Tty) {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ with a winsize.
    unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(terminal),
            libc::TIOCSWINSZ,
            &ws,
        )
    };
}

/// Sends what `r` yields as `kind` frames, on a thread of its own, while
/// `open`; says so on `done` when it ends.
fn pump(
    out: &Out,
    open: &Arc<std::sync::atomic::AtomicBool>,
    done: &mpsc::Sender<()>,
    r: Option<Box<dyn Read + Send>>,
    kind: u8,
) {
    let (out, open, done) = (out.clone(), open.clone(), done.clone());
    std::thread::spawn(move || {
        if let Some(mut r) = r {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut w = out.lock().unwrap();
                        if !open.load(std::sync::atomic::Ordering::SeqCst)
                            || proto::write_frame(&mut *w, kind, &buf[..n]).is_err()
                        {
                            break;
                        }
                    }
                }
            }
        }
        let _ = done.send(());
    });
}

/// Waits for the command's exit status, killing everything but PID 1 on a
/// KILL request or when the host goes; the flag says whether it went.
fn wait_for_exit(
    rx: &mpsc::Receiver<Msg>,
    terminal: Option<&File>,
) -> (std::process::ExitStatus, bool) {
    let mut host_gone = false;
    let status = loop {
        match rx.recv() {
            Ok(Msg::Exited(st)) => break st,
            // Cancel or timeout: everything but PID 1 goes, also what the
            // command started in other process groups or sessions.
            // SAFETY: signals only; the agent (PID 1) is exempt from kill(-1).
            Ok(Msg::Frame(proto::KILL, _)) => unsafe {
                libc::kill(-1, libc::SIGKILL);
            },
            Ok(Msg::Frame(proto::STDIN, keys)) => {
                if let Some(mut t) = terminal {
                    // Input that ended: the terminal's end-of-file key.
                    let _ = t.write_all(if keys.is_empty() { b"\x04" } else { &keys });
                }
            }
            Ok(Msg::Frame(proto::RESIZE, size)) => {
                if let (Some(t), Ok(size)) = (terminal, proto::parse::<proto::Tty>(&size)) {
                    set_size(t, size);
                }
            }
            Ok(Msg::Frame(k, _)) => log(&format!("ignored request {k} while a command runs")),
            Ok(Msg::Gone) | Err(_) => {
                host_gone = true;
                // SAFETY: as above.
                unsafe { libc::kill(-1, libc::SIGKILL) };
            }
        }
    };
    (status, host_gone)
}

/// Sends EXIT with `status` once the output pumps are done, or after a
/// short grace.
fn send_exit(
    out: &Out,
    pid: i32,
    open: &std::sync::atomic::AtomicBool,
    done: &mpsc::Receiver<()>,
    status: std::process::ExitStatus,
) -> io::Result<()> {
    // Every byte of output goes before the exit status. The command's group
    // dies with it; a pipe still held by something outside that group gets
    // a short grace, then is abandoned.
    // SAFETY: signalling the command's process group.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    for _ in 0..2 {
        if done
            .recv_timeout(std::time::Duration::from_secs(2))
            .is_err()
        {
            break;
        }
    }
    let mut w = out.lock().unwrap();
    open.store(false, std::sync::atomic::Ordering::SeqCst);
    use std::os::unix::process::ExitStatusExt;
    proto::write_json(
        &mut *w,
        proto::EXIT,
        &proto::Exit {
            code: status.code(),
            signal: status.signal(),
        },
    )?;
    drop(w);
    Ok(())
}

/// Takes the data that follows a PUT request into `take`, then answers OK
/// or the error; the data is read to its end either way, so that the
/// stream stays in step.
fn receive(
    out: &Out,
    payload: &[u8],
    frames: &mut ChannelFrames,
    what: &str,
    take: impl FnOnce(&proto::PathArg, &mut DataReader<ChannelFrames>) -> io::Result<()>,
) -> io::Result<()> {
    let arg: proto::PathArg = proto::parse(payload).inspect_err(|_| {
        let _ = DataReader::new(&mut *frames).drain();
    })?;
    let mut data = DataReader::new(frames);
    let res = take(&arg, &mut data);
    data.drain()?;
    match res {
        Ok(()) => send(out, proto::OK, b""),
        Err(e) => send(
            out,
            proto::ERR,
            format!("{what} `{}`: {e}", arg.path).as_bytes(),
        ),
    }
}

fn put_tar(out: &Out, payload: &[u8], frames: &mut ChannelFrames) -> io::Result<()> {
    receive(out, payload, frames, "unpack into", |arg, data| {
        std::fs::create_dir_all(&arg.path)?;
        let mut ar = tar::Archive::new(data);
        ar.set_preserve_permissions(true);
        ar.set_overwrite(true);
        ar.unpack(&arg.path)
    })
}

fn put_file(out: &Out, payload: &[u8], frames: &mut ChannelFrames) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    receive(out, payload, frames, "write", |arg, data| {
        let dest = Path::new(&arg.path);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut f = File::create(dest)?;
        io::copy(data, &mut f)?;
        f.set_permissions(std::fs::Permissions::from_mode(arg.mode))
    })
}

fn list(out: &Out, payload: &[u8]) -> io::Result<()> {
    let arg: proto::PathArg = proto::parse(payload)?;
    let root = PathBuf::from(&arg.path);
    let mut files = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if d == root => {
                return send(
                    out,
                    proto::ERR,
                    format!("list `{}`: {e}", root.display()).as_bytes(),
                )
            }
            Err(_) => continue,
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                if let Ok(rel) = e.path().strip_prefix(&root) {
                    files.push(rel.to_string_lossy().into_owned());
                }
            }
        }
    }
    files.sort();
    // As data: a big tree's list may not fit one frame.
    let json = serde_json::to_vec(&files).map_err(io::Error::other)?;
    let mut w = out.lock().unwrap();
    proto::send_data(&mut *w, &mut &json[..]).map(|_| ())
}

fn fetch(out: &Out, payload: &[u8]) -> io::Result<()> {
    let arg: proto::PathArg = proto::parse(payload)?;
    let f = match File::open(&arg.path) {
        Ok(f) => f,
        Err(e) => {
            return send(
                out,
                proto::ERR,
                format!("read `{}`: {e}", arg.path).as_bytes(),
            )
        }
    };
    let size = match f.metadata() {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => {
            return send(
                out,
                proto::ERR,
                format!("`{}` is not a regular file", arg.path).as_bytes(),
            )
        }
        Err(e) => {
            return send(
                out,
                proto::ERR,
                format!("stat `{}`: {e}", arg.path).as_bytes(),
            )
        }
    };
    let mut w = out.lock().unwrap();
    proto::write_json(&mut *w, proto::RESULT, &proto::FileSize { size })?;
    // Never more than was announced, should the file grow meanwhile.
    proto::send_data(&mut *w, &mut f.take(size)).map(|_| ())
}
