//! slate's side of a session with an agent that runs commands for it over
//! a framed stream ([`crate::wire`]): the guest agent inside a VM, or a
//! slate serving an environment on an ssh host. The session is the whole
//! [`Environment`] protocol (put, exec, list, fetch) with every request
//! bounded in time and size; what carries it (QEMU, an ssh connection) is a
//! [`Carrier`] that can say whether it is still there and be ended at once.

use crate::wire::{self, Frame};
use crate::{Cancel, ExecOutcome, ExecSpec, LineSplitter, OutputSink, ProviderError, Stream};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// What carries a session: ended with it, asked about when it goes quiet.
pub trait Carrier {
    /// Ends the other side at once; the session is not used again.
    fn stop(&mut self);
    /// An error saying what happened when the other side has gone.
    fn check_alive(&mut self, when: &str) -> io::Result<()>;
}

/// Frames read ahead from the agent.
const FRAMES_IN_FLIGHT: usize = 64;
/// How long the agent may take to answer a request (or send the next
/// frame of an answer) before it counts as stuck.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// The largest file listing the agent may send.
const MAX_LISTING: u64 = 64 << 20;
/// How long a killed command's agent may take to say it ended.
const KILL_GRACE: Duration = Duration::from_secs(10);

pub struct Session {
    id: String,
    /// Who answers, for messages: "the guest's agent".
    peer: &'static str,
    /// Shared with the thread that forwards an interactive command's input.
    to: Option<Writer>,
    from: Option<Receiver<Frame>>,
    /// Variables every command gets before its own.
    pub base_env: Vec<(String, String)>,
    /// The most one `fetch` may copy.
    pub max_fetch: u64,
    /// Why a file over `max_fetch` is refused, and what to do: given its
    /// size and the cap.
    pub oversize: fn(u64, u64) -> String,
    /// The answer to an interactive command, where the agent cannot run
    /// one.
    pub no_interactive: &'static str,
    /// Whether the agent runs interactive commands on a terminal of its own.
    pub interactive: bool,
}

type Writer = std::sync::Arc<std::sync::Mutex<Box<dyn Write + Send>>>;

fn default_oversize(size: u64, cap: u64) -> String {
    format!("it is {size} bytes, more than the {cap} bytes one artifact may have here")
}

impl Session {
    /// A session not connected yet; `peer` names the other side in errors.
    pub fn new(id: &str, peer: &'static str) -> Session {
        Session {
            id: id.to_string(),
            peer,
            to: None,
            from: None,
            base_env: Vec::new(),
            max_fetch: 64 << 30,
            oversize: default_oversize,
            no_interactive: "interactive commands are not available with this provider",
            interactive: false,
        }
    }

    /// Starts reading frames from `reader` (on a thread of its own, a bounded
    /// number ahead) and writes requests to `writer`.
    pub fn connect(
        &mut self,
        mut reader: impl Read + Send + 'static,
        writer: impl Write + Send + 'static,
    ) {
        // Bounded: an agent that floods output waits for slate (the stream's
        // back-pressure) instead of filling slate's memory.
        let (tx, rx) = mpsc::sync_channel(FRAMES_IN_FLIGHT);
        std::thread::spawn(move || {
            while let Ok(Some(f)) = wire::read_frame(&mut reader) {
                if tx.send(f).is_err() {
                    return;
                }
            }
        });
        self.to = Some(std::sync::Arc::new(std::sync::Mutex::new(Box::new(writer))));
        self.from = Some(rx);
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Closes the stream to the agent (its end of input) and stops
    /// listening; the session is not used again.
    pub fn disconnect(&mut self) {
        self.to = None;
        self.from = None;
    }

    /// The next frame from the agent; `None` when `wait` passes first.
    pub fn recv(&self, wait: Duration) -> io::Result<Option<Frame>> {
        let rx = self.from.as_ref().ok_or_else(not_connected)?;
        match rx.recv_timeout(wait) {
            Ok(f) => Ok(Some(f)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} went away (its stream closed)", self.peer),
            )),
        }
    }

    pub fn send(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        let to = self.to.clone().ok_or_else(not_connected)?;
        let mut s = to.lock().unwrap();
        wire::write_frame(&mut *s, kind, payload)
    }

    pub fn send_json(&mut self, kind: u8, v: &impl serde::Serialize) -> io::Result<()> {
        self.send(kind, &serde_json::to_vec(v).map_err(io::Error::other)?)
    }

    /// A request about one path.
    fn ask(&mut self, kind: u8, path: &str, mode: u32) -> io::Result<()> {
        self.send_json(
            kind,
            &wire::PathArg {
                path: path.into(),
                mode,
            },
        )
    }

    /// The agent's answers, as a source of frames (data, errors), each
    /// within [`REQUEST_TIMEOUT`].
    fn answers(&self) -> io::Result<Answers<'_>> {
        self.from
            .as_ref()
            .map(|rx| Answers {
                rx,
                peer: self.peer,
            })
            .ok_or_else(not_connected)
    }

    /// Waits for OK (or the agent's error).
    pub fn expect_ok(&mut self) -> io::Result<()> {
        match wire::FrameSource::next_frame(&mut self.answers()?)? {
            Some((wire::OK, _)) => Ok(()),
            Some((wire::ERR, m)) => Err(io::Error::other(String::from_utf8_lossy(&m).into_owned())),
            Some((k, _)) => Err(io::Error::other(format!(
                "unexpected answer {k} from {}",
                self.peer
            ))),
            None => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }

    fn err(&self, op: impl Into<String>, e: io::Error) -> ProviderError {
        ProviderError::op(&self.id, op, e)
    }

    /// Copies `entries` (relative to `base`) into `dest`, streamed as they
    /// are packed: the inputs are never held in memory.
    pub fn put(
        &mut self,
        carrier: &mut dyn Carrier,
        base: &Path,
        entries: &[PathBuf],
        dest: &str,
    ) -> Result<u64, ProviderError> {
        // Each entry is archived alone (a folder without its contents):
        // the list is what `exclude` and .gitignore left.
        let mut bytes = 0u64;
        let mut failed: Option<ProviderError> = None;
        let id = self.id.clone();
        let res = (|| {
            self.ask(wire::PUT_TAR, dest, 0)?;
            let to = self.to.clone().ok_or_else(not_connected)?;
            let mut s = to.lock().unwrap();
            let mut b = tar::Builder::new(wire::DataWriter::new(&mut **s));
            b.follow_symlinks(false);
            for e in entries {
                let src = base.join(e);
                let packed = std::fs::symlink_metadata(&src).and_then(|meta| {
                    if meta.is_file() {
                        bytes += meta.len();
                    }
                    b.append_path_with_name(&src, e)
                });
                if let Err(er) = packed {
                    // The agent is mid-stream: it cannot be told apart from
                    // a short archive, so the environment is not used again.
                    failed = Some(ProviderError::op(
                        &id,
                        format!("pack `{}`", src.display()),
                        er,
                    ));
                    return Err(io::Error::other("packing failed"));
                }
            }
            b.into_inner()?.finish()?;
            drop(s);
            self.expect_ok()
        })();
        match (res, failed) {
            (_, Some(e)) => {
                carrier.stop();
                Err(e)
            }
            (Err(e), None) => Err(self.err(format!("copy into `{dest}`"), e)),
            (Ok(()), None) => Ok(bytes),
        }
    }

    /// Writes one file inside.
    pub fn put_bytes(&mut self, data: &[u8], dest: &str, mode: u32) -> Result<(), ProviderError> {
        let res = (|| {
            self.ask(wire::PUT_FILE, dest, mode)?;
            let to = self.to.clone().ok_or_else(not_connected)?;
            wire::send_data(&mut *to.lock().unwrap(), &mut &data[..])?;
            self.expect_ok()
        })();
        res.map_err(|e| self.err(format!("write `{dest}`"), e))
    }

    /// Runs one command, passing its output on line by line; timeouts and
    /// cancels are checked on every frame, not only when the agent is quiet,
    /// so a command that floods output still stops.
    pub fn exec(
        &mut self,
        carrier: &mut dyn Carrier,
        spec: &ExecSpec,
        out: &mut dyn OutputSink,
        cancel: &Cancel,
    ) -> Result<ExecOutcome, ProviderError> {
        if spec.interactive && !self.interactive {
            return Err(ProviderError::Other {
                env: self.id.clone(),
                what: self.no_interactive.into(),
            });
        }
        if spec.interactive {
            return self.exec_on_terminal(carrier, spec);
        }
        let what = spec.argv.first().cloned().unwrap_or_default();
        let req = wire::Exec {
            argv: spec.argv.clone(),
            env: self.base_env.iter().chain(&spec.env).cloned().collect(),
            cwd: spec.cwd.clone(),
            tty: None,
        };
        self.send_json(wire::EXEC, &req)
            .map_err(|e| self.err(format!("run `{what}`"), e))?;
        let mut outs = [LineSplitter::default(), LineSplitter::default()];
        let mut stopped: Option<ExecOutcome> = None;
        let mut killed_at: Option<Instant> = None;
        loop {
            match (stopped, killed_at) {
                // The agent did not answer a kill in time: what carries it
                // goes, and the command with it.
                (Some(s), Some(at)) if at.elapsed() > KILL_GRACE => {
                    carrier.stop();
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
                        if self.send(wire::KILL, b"").is_err() {
                            carrier.stop();
                            return Ok(s);
                        }
                    }
                }
            }
            let frame = self.command_frame(carrier, &what, Duration::from_millis(50))?;
            match frame {
                // After a kill, output still in flight is dropped.
                Some((wire::STDOUT | wire::STDERR, _)) if stopped.is_some() => {}
                Some((wire::STDOUT, d)) => outs[0].push(&d, |l| out.line(Stream::Stdout, l)),
                Some((wire::STDERR, d)) => outs[1].push(&d, |l| out.line(Stream::Stderr, l)),
                Some((wire::EXIT, d)) => {
                    outs[0].finish(|l| out.line(Stream::Stdout, l));
                    outs[1].finish(|l| out.line(Stream::Stderr, l));
                    if let Some(s) = stopped {
                        return Ok(s);
                    }
                    return self.exit_outcome(&d);
                }
                Some(f) => return Err(self.unexpected(&what, f)),
                None => {}
            }
        }
    }

    /// The agent's next frame while command `what` runs (`None` when
    /// `wait` passes first); a stream that ends is blamed on what carries
    /// it when that has gone.
    fn command_frame(
        &self,
        carrier: &mut dyn Carrier,
        what: &str,
        wait: Duration,
    ) -> Result<Option<Frame>, ProviderError> {
        self.recv(wait).map_err(|e| {
            let e = carrier
                .check_alive("while a command ran")
                .err()
                .unwrap_or(e);
            self.err(format!("run `{what}`"), e)
        })
    }

    /// What an EXIT frame says.
    fn exit_outcome(&self, d: &[u8]) -> Result<ExecOutcome, ProviderError> {
        let exit: wire::Exit = wire::parse(d).map_err(|e| self.err("read the exit status", e))?;
        Ok(match (exit.code, exit.signal) {
            (Some(c), _) => ExecOutcome::Exited(c),
            (None, Some(s)) => ExecOutcome::Signaled(s),
            _ => ExecOutcome::Exited(-1),
        })
    }

    /// The error an agent's ERR, or a frame out of turn, makes of `what`.
    fn unexpected(&self, what: &str, (k, m): Frame) -> ProviderError {
        let e = if k == wire::ERR {
            io::Error::other(String::from_utf8_lossy(&m).into_owned())
        } else {
            io::Error::other(format!("unexpected frame {k}"))
        };
        self.err(format!("run `{what}`"), e)
    }

    /// Runs one command on a terminal inside, with this process's terminal
    /// (raw while it runs) as its keyboard and screen: keys go as STDIN
    /// frames, its output comes back raw, and size changes follow.
    fn exec_on_terminal(
        &mut self,
        carrier: &mut dyn Carrier,
        spec: &ExecSpec,
    ) -> Result<ExecOutcome, ProviderError> {
        let what = spec.argv.first().cloned().unwrap_or_default();
        let mut env: Vec<(String, String)> =
            self.base_env.iter().chain(&spec.env).cloned().collect();
        if let Some(term) = std::env::var_os("TERM") {
            env.push(("TERM".into(), term.to_string_lossy().into_owned()));
        }
        let mut size = terminal::size();
        let req = wire::Exec {
            argv: spec.argv.clone(),
            env,
            cwd: spec.cwd.clone(),
            tty: Some(size),
        };
        let _raw = terminal::Raw::enter();
        self.send_json(wire::EXEC, &req)
            .map_err(|e| self.err(format!("run `{what}`"), e))?;
        // Keys, as they are typed; the thread ends with this process (a
        // read of the keyboard cannot be interrupted) and sends nothing
        // once the session is gone.
        let to = self
            .to
            .clone()
            .ok_or_else(not_connected)
            .map_err(|e| self.err("run", e))?;
        let weak = std::sync::Arc::downgrade(&to);
        drop(to);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut stdin = io::stdin();
            loop {
                let n = stdin.read(&mut buf).unwrap_or(0);
                let Some(to) = weak.upgrade() else { return };
                let sent = wire::write_frame(&mut *to.lock().unwrap(), wire::STDIN, &buf[..n]);
                if n == 0 || sent.is_err() {
                    return;
                }
            }
        });
        let mut stdout = io::stdout();
        loop {
            let frame = self.command_frame(carrier, &what, Duration::from_millis(100))?;
            match frame {
                Some((wire::STDOUT | wire::STDERR, d)) => {
                    let _ = stdout.write_all(&d);
                    let _ = stdout.flush();
                }
                Some((wire::EXIT, d)) => {
                    return self.exit_outcome(&d);
                }
                Some(f) => return Err(self.unexpected(&what, f)),
                None => {}
            }
            let now = terminal::size();
            if now != size {
                size = now;
                let _ = self.send_json(wire::RESIZE, &size);
            }
        }
    }

    /// Regular files under `dir` inside, relative to it.
    pub fn list(&mut self, dir: &str) -> Result<Vec<String>, ProviderError> {
        let res = (|| {
            self.ask(wire::LIST, dir, 0)?;
            let mut json = Vec::new();
            let mut frames = self.answers()?;
            let mut data = wire::DataReader::new(&mut frames);
            (&mut data).take(MAX_LISTING).read_to_end(&mut json)?;
            if json.len() as u64 == MAX_LISTING {
                let _ = data.drain();
                return Err(io::Error::other(format!(
                    "the listing is larger than {} MiB",
                    MAX_LISTING >> 20
                )));
            }
            wire::parse::<Vec<String>>(&json)
        })();
        res.map_err(|e| self.err(format!("list `{dir}`"), e))
    }

    /// Copies the file `src` inside to `dest`, at most `max_fetch` bytes.
    pub fn fetch(
        &mut self,
        carrier: &mut dyn Carrier,
        src: &str,
        dest: &Path,
    ) -> Result<u64, ProviderError> {
        let mut overflow = false;
        let res = (|| {
            // The file first: a failure here must not leave the agent's
            // data unread in the stream.
            if let Some(parent) = dest.parent() {
                fs_err::create_dir_all(parent)?;
            }
            let mut f = std::fs::File::create(dest)?;
            self.ask(wire::FETCH, src, 0)?;
            let mut frames = self.answers()?;
            let size = match wire::FrameSource::next_frame(&mut frames)? {
                Some((wire::RESULT, p)) => wire::parse::<wire::FileSize>(&p)?.size,
                Some((wire::ERR, m)) => {
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
                // The data is on its way: what carries it goes instead.
                overflow = true;
                return Err(io::Error::new(
                    io::ErrorKind::FileTooLarge,
                    (self.oversize)(size, self.max_fetch),
                ));
            }
            let mut data = wire::DataReader::new(&mut frames);
            let copied = copy_capped(&mut data, &mut f, size).and_then(|n| f.flush().map(|()| n));
            if let Err(e) = &copied {
                let _ = fs_err::remove_file(dest);
                // An agent sending more than it announced may never stop:
                // no draining, what carries it goes instead.
                overflow = e.kind() == io::ErrorKind::FileTooLarge;
                if !overflow {
                    let _ = data.drain();
                }
            }
            copied
        })();
        if overflow {
            carrier.stop();
            if let Err(e) = res {
                return Err(ProviderError::Refused {
                    env: self.id.clone(),
                    what: format!("artifact `{src}`: {e}"),
                });
            }
        }
        res.map_err(|e| self.err(format!("copy `{src}` out"), e))
    }
}

fn not_connected() -> io::Error {
    io::Error::other("not connected")
}

/// Frames from the reader thread, each within [`REQUEST_TIMEOUT`].
struct Answers<'a> {
    rx: &'a Receiver<Frame>,
    peer: &'static str,
}

impl wire::FrameSource for Answers<'_> {
    fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        match self.rx.recv_timeout(REQUEST_TIMEOUT) {
            Ok(f) => Ok(Some(f)),
            Err(RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} did not answer within {} s",
                    self.peer,
                    REQUEST_TIMEOUT.as_secs()
                ),
            )),
            Err(RecvTimeoutError::Disconnected) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} went away", self.peer),
            )),
        }
    }
}

/// Copies at most `cap` bytes (what the agent announced, never more than
/// allowed); a source with more is an error, whatever it claims.
pub fn copy_capped(from: &mut impl Read, to: &mut impl Write, cap: u64) -> io::Result<u64> {
    let n = io::copy(&mut from.take(cap), to)?;
    if n == cap && from.read(&mut [0u8; 1])? > 0 {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("the agent sent more than the {cap} bytes it announced; the copy was stopped"),
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
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
}

/// This process's terminal, for interactive commands.
mod terminal {
    use crate::wire::Tty;

    /// The size of the terminal on stdin (80x24 when it is not one).
    pub fn size() -> Tty {
        // SAFETY: winsize is plain data; TIOCGWINSZ fills it or fails.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let ok = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) } == 0;
        if ok && ws.ws_row > 0 && ws.ws_col > 0 {
            Tty {
                rows: ws.ws_row,
                cols: ws.ws_col,
            }
        } else {
            Tty { rows: 24, cols: 80 }
        }
    }

    /// The terminal on stdin in raw mode (keys pass as they are typed,
    /// Ctrl-C included, to the command inside) until dropped.
    pub struct Raw(Option<libc::termios>);

    impl Raw {
        pub fn enter() -> Raw {
            // SAFETY: termios is plain data; tcgetattr fills it or fails.
            let mut saved: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: as above, on fd 0.
            if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
                return Raw(None);
            }
            let mut raw = saved;
            // SAFETY: cfmakeraw edits the struct we own; tcsetattr on fd 0.
            unsafe {
                libc::cfmakeraw(&mut raw);
                libc::tcsetattr(0, libc::TCSANOW, &raw);
            }
            Raw(Some(saved))
        }
    }

    impl Drop for Raw {
        fn drop(&mut self) {
            if let Some(saved) = &self.0 {
                // SAFETY: restoring the settings read at the start.
                unsafe { libc::tcsetattr(0, libc::TCSANOW, saved) };
            }
        }
    }
}
