//! The wire between slate and an agent that runs commands for it (the
//! guest agent over a VM's virtio-serial port, a slate on an ssh host over
//! the connection):
//! frames of `kind: u8`, `len: u32` (little endian), then `len` bytes.
//! Requests go one at a time; bulk data follows a request as `DATA` frames
//! ended by an empty one. A VM's port has no end of its own (the host sees
//! EOF only when QEMU exits), so every answer is framed; slate ends a
//! session by ending what carries it (QEMU, the ssh connection).

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// One frame: its kind and its payload.
pub type Frame = (u8, Vec<u8>);

// Host to guest.
pub const EXEC: u8 = 1;
pub const KILL: u8 = 2;
pub const PUT_TAR: u8 = 3;
pub const PUT_FILE: u8 = 4;
pub const DATA: u8 = 5;
pub const LIST: u8 = 6;
pub const FETCH: u8 = 7;
/// The environment to make, to a slate serving one over ssh (its first frame).
pub const CREATE: u8 = 8;
/// What makes a VM's guest this environment's (`Start`): the answer to
/// `READY`. A guest restored from a saved machine gets it after the restore.
pub const START: u8 = 9;
/// Keys typed into an interactive command's terminal (empty: its input
/// ended).
pub const STDIN: u8 = 10;
/// The terminal of an interactive command changed size (`Tty`).
pub const RESIZE: u8 = 11;
// Guest to host.
pub const HELLO: u8 = 20;
pub const STDOUT: u8 = 21;
pub const STDERR: u8 = 22;
pub const EXIT: u8 = 23;
pub const OK: u8 = 24;
pub const ERR: u8 = 25;
/// Before a fetch's data: the file's size (`FileSize`).
pub const RESULT: u8 = 26;
/// A VM's agent is up, its disk not yet mounted: the point at which a
/// machine is saved, and at which it waits for `START`.
pub const READY: u8 = 27;

/// Frames larger than this are refused (a corrupt stream, not a big file:
/// files travel in many frames).
pub const MAX_FRAME: usize = 16 << 20;
/// The size of the `DATA` frames slate and the agent send.
pub const CHUNK: usize = 256 << 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Exec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    /// Run on a terminal of this size (an interactive command): its output
    /// comes as STDOUT frames, raw, and its input as STDIN frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<Tty>,
}

/// A terminal's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tty {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub kernel: String,
    pub cpus: usize,
}

/// What no two VMs share, even two restored from one saved machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Start {
    pub hostname: String,
    /// The host's clock: seconds and nanoseconds since the epoch.
    pub secs: i64,
    pub nanos: u32,
    /// Fresh random bytes for the guest kernel's pool, credited, after
    /// which the kernel reseeds its generator.
    pub seed: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileSize {
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathArg {
    pub path: String,
    #[serde(default)]
    pub mode: u32,
}

pub fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()
}

pub fn write_json(w: &mut impl Write, kind: u8, v: &impl Serialize) -> io::Result<()> {
    write_frame(w, kind, &serde_json::to_vec(v).map_err(io::Error::other)?)
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "a frame of {len} bytes (kind {}): the stream is corrupt",
                head[0]
            ),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((head[0], payload)))
}

pub fn parse<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> io::Result<T> {
    serde_json::from_slice(payload).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Sends everything `r` yields as `DATA` frames, then the empty one.
pub fn send_data(w: &mut impl Write, r: &mut impl Read) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            write_frame(w, DATA, &[])?;
            return Ok(total);
        }
        write_frame(w, DATA, &buf[..n])?;
        total += n as u64;
    }
}

/// A writer that sends what it is given as `DATA` frames of up to `CHUNK`
/// bytes; [`DataWriter::finish`] sends the rest and the empty frame. For
/// streaming a tar into the guest without holding it in memory.
pub struct DataWriter<W: Write> {
    w: W,
    buf: Vec<u8>,
}

impl<W: Write> DataWriter<W> {
    pub fn new(w: W) -> Self {
        DataWriter {
            w,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    /// Sends what is buffered and the end of the data.
    pub fn finish(mut self) -> io::Result<W> {
        self.send()?;
        write_frame(&mut self.w, DATA, &[])?;
        Ok(self.w)
    }

    fn send(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            write_frame(&mut self.w, DATA, &self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

impl<W: Write> Write for DataWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()?;
        self.w.flush()
    }
}

/// Where frames come from: a byte stream, or the agent's reader thread.
pub trait FrameSource {
    fn next_frame(&mut self) -> io::Result<Option<(u8, Vec<u8>)>>;
}

impl<R: Read> FrameSource for R {
    fn next_frame(&mut self) -> io::Result<Option<(u8, Vec<u8>)>> {
        read_frame(self)
    }
}

/// A reader over incoming `DATA` frames, ending at the empty one.
pub struct DataReader<'a, R: FrameSource> {
    inner: &'a mut R,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
}

impl<'a, R: FrameSource> DataReader<'a, R> {
    pub fn new(inner: &'a mut R) -> Self {
        DataReader {
            inner,
            buf: Vec::new(),
            pos: 0,
            done: false,
        }
    }

    /// Reads and drops what is left, so that the stream stays in step.
    pub fn drain(&mut self) -> io::Result<()> {
        let mut sink = [0u8; 8192];
        while self.read(&mut sink)? > 0 {}
        Ok(())
    }
}

impl<R: FrameSource> Read for DataReader<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            match self.inner.next_frame()? {
                Some((DATA, p)) if p.is_empty() => self.done = true,
                Some((DATA, p)) => {
                    self.buf = p;
                    self.pos = 0;
                }
                Some((ERR, p)) => {
                    self.done = true;
                    return Err(io::Error::other(String::from_utf8_lossy(&p).into_owned()));
                }
                Some((k, _)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("expected data, got a frame of kind {k}"),
                    ))
                }
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_writer_sends_what_send_data_sends() {
        let data: Vec<u8> = (0..CHUNK * 2 + 17).map(|i| i as u8).collect();
        let mut w = DataWriter::new(Vec::new());
        for piece in data.chunks(1000) {
            w.write_all(piece).unwrap();
        }
        let wire = w.finish().unwrap();
        let mut got = Vec::new();
        DataReader::new(&mut &wire[..])
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn frames_and_data_round_trip() {
        let mut wire = Vec::new();
        write_json(
            &mut wire,
            EXEC,
            &Exec {
                argv: vec!["true".into()],
                env: vec![],
                cwd: "/".into(),
                tty: None,
            },
        )
        .unwrap();
        let body: Vec<u8> = (0..(CHUNK * 2 + 7)).map(|i| i as u8).collect();
        send_data(&mut wire, &mut &body[..]).unwrap();
        write_frame(&mut wire, OK, b"").unwrap();
        let mut r = &wire[..];
        let (k, p) = read_frame(&mut r).unwrap().unwrap();
        assert_eq!(k, EXEC);
        assert_eq!(parse::<Exec>(&p).unwrap().argv, ["true"]);
        let mut got = Vec::new();
        DataReader::new(&mut r).read_to_end(&mut got).unwrap();
        assert_eq!(got, body);
        assert_eq!(read_frame(&mut r).unwrap().unwrap().0, OK);
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn an_error_ends_data_with_its_message() {
        let mut wire = Vec::new();
        write_frame(&mut wire, DATA, b"ab").unwrap();
        write_frame(&mut wire, ERR, b"no such file").unwrap();
        let mut r = &wire[..];
        let mut got = Vec::new();
        let e = DataReader::new(&mut r).read_to_end(&mut got).unwrap_err();
        assert_eq!(e.to_string(), "no such file");
    }
}
