//! Just enough of QEMU's machine protocol (QMP) to save a machine: a JSON
//! object per line each way, commands answered in order, events in
//! between. The file the machine is saved to (or restored from) is slate's
//! own, opened by slate and handed to QEMU over the socket, so QEMU's user
//! needs no way to the cache: as a `file:/dev/fdset/N` (`add-fd`) from QEMU
//! 9.0 on, as `fd:` before (QEMU 9.1 deprecated `fd:` for plain files).

use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    deadline: Instant,
    /// Events read while waiting for an answer, oldest first.
    events: std::collections::VecDeque<Value>,
    /// QEMU's version (major, minor), from its greeting.
    version: (u64, u64),
}

/// The first QEMU whose `file:` migration opens `/dev/fdset/N`.
const FDSET_FILES: (u64, u64) = (9, 0);

impl Qmp {
    /// Takes QEMU's greeting and leaves capabilities negotiation; every
    /// later read fails once `deadline` has passed.
    pub fn open(stream: UnixStream, deadline: Instant) -> io::Result<Qmp> {
        stream.set_nonblocking(false)?;
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            deadline,
            events: Default::default(),
            version: (0, 0),
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(io::Error::other(format!(
                "QEMU's monitor did not greet: {greeting}"
            )));
        }
        let part = |p: &str| greeting.pointer(p).and_then(Value::as_u64).unwrap_or(0);
        q.version = (
            part("/QMP/version/qemu/major"),
            part("/QMP/version/qemu/minor"),
        );
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> io::Result<Value> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "QEMU's monitor did not answer in time",
            ));
        }
        self.reader.get_ref().set_read_timeout(Some(left))?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "QEMU closed its monitor",
            ));
        }
        serde_json::from_str(&line).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "QEMU's monitor sent what is not JSON ({e}): {}",
                    line.trim()
                ),
            )
        })
    }

    /// The answer to the command just sent, events before it set aside.
    fn answer(&mut self, command: &str) -> io::Result<Value> {
        loop {
            let v = self.read()?;
            if let Some(ret) = v.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = v.get("error") {
                let desc = err.get("desc").and_then(Value::as_str).unwrap_or("?");
                return Err(io::Error::other(format!(
                    "QEMU refused `{command}`: {desc}"
                )));
            }
            if v.get("event").is_some() {
                self.events.push_back(v);
            }
        }
    }

    /// The next event: one set aside, else the next QEMU sends.
    fn event(&mut self) -> io::Result<Value> {
        match self.events.pop_front() {
            Some(v) => Ok(v),
            None => self.read(),
        }
    }

    pub fn execute(&mut self, command: &str, arguments: Value) -> io::Result<Value> {
        let mut line = json!({ "execute": command, "arguments": arguments }).to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        self.answer(command)
    }

    /// Sends `command` with `fd` beside it (SCM_RIGHTS), as `getfd` wants.
    fn execute_with_fd(&mut self, command: &str, arguments: Value, fd: RawFd) -> io::Result<Value> {
        let mut line = json!({ "execute": command, "arguments": arguments }).to_string();
        line.push('\n');
        send_with_fd(&self.writer, line.as_bytes(), fd)?;
        self.answer(command)
    }

    /// `fd` (slate's) handed to QEMU as a set of its own: the `file:` URI
    /// that names it, or None for a QEMU that cannot open one.
    fn fdset_uri(&mut self, fd: RawFd) -> io::Result<Option<String>> {
        if self.version < FDSET_FILES {
            return Ok(None);
        }
        let added = self.execute_with_fd("add-fd", json!({}), fd)?;
        let set = added
            .get("fdset-id")
            .and_then(Value::as_u64)
            .ok_or_else(|| io::Error::other(format!("QEMU's `add-fd` said {added}")))?;
        Ok(Some(format!("file:/dev/fdset/{set}")))
    }

    /// Restores the machine from `fd` (also QEMU's, inherited under the same
    /// number: the machine was started with `-incoming defer`) and lets it
    /// run.
    pub fn restore_from(&mut self, fd: RawFd) -> io::Result<()> {
        self.migration_events()?;
        let uri = match self.fdset_uri(fd)? {
            Some(uri) => uri,
            None => format!("fd:{fd}"),
        };
        self.execute("migrate-incoming", json!({ "uri": uri }))?;
        self.migration_done("restoring the machine")?;
        // Saved stopped, so restored stopped.
        self.execute("cont", json!({}))?;
        Ok(())
    }

    fn migration_events(&mut self) -> io::Result<()> {
        self.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "events", "state": true }] }),
        )
        .map(drop)
    }

    /// Waits for the migration under way to complete.
    fn migration_done(&mut self, what: &str) -> io::Result<()> {
        loop {
            let v = self.event()?;
            if v.get("event").and_then(Value::as_str) != Some("MIGRATION") {
                continue;
            }
            match v.pointer("/data/status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some(s @ ("failed" | "cancelled")) => {
                    let why = self
                        .execute("query-migrate", json!({}))
                        .ok()
                        .and_then(|q| {
                            q.get("error-desc")
                                .and_then(Value::as_str)
                                .map(String::from)
                        })
                        .unwrap_or_default();
                    return Err(io::Error::other(format!("{what} {s}: {why}")));
                }
                _ => {}
            }
        }
    }

    /// Stops the machine and saves its memory and device state into `out`
    /// (opened write-only; disks are not part of it), returning once QEMU
    /// says it is complete.
    pub fn save_to(&mut self, out: &std::fs::File) -> io::Result<()> {
        self.migration_events()?;
        self.execute("stop", json!({}))?;
        let uri = match self.fdset_uri(out.as_raw_fd())? {
            Some(uri) => uri,
            None => {
                self.execute_with_fd("getfd", json!({ "fdname": "slate-save" }), out.as_raw_fd())?;
                "fd:slate-save".into()
            }
        };
        self.execute("migrate", json!({ "uri": uri }))?;
        self.migration_done("saving the machine")
    }
}

/// One `sendmsg` carrying `data` and the descriptor `fd`.
fn send_with_fd(sock: &UnixStream, data: &[u8], fd: RawFd) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE is arithmetic on a constant size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer is CMSG_SPACE(sizeof fd) bytes, so the
    // first header and its data fit in it.
    let sent = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::copy_nonoverlapping(
            (&fd as *const RawFd).cast::<u8>(),
            libc::CMSG_DATA(cmsg),
            std::mem::size_of::<RawFd>(),
        );
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != data.len() {
        return Err(io::Error::other("QEMU's monitor took part of a command"));
    }
    Ok(())
}
