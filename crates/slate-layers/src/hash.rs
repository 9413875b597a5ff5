//! Digests, written as lowercase hex: one place for the whole workspace.

use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};
use std::path::Path;

/// The sha256 of `parts`, each prefixed by its length (so that no two
/// different lists of parts hash alike), as hex.
pub fn hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex(&h.finalize())
}

/// The sha256 of `data`, as hex.
pub fn sha256(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The sha256 of a file's contents, as hex, and its size.
pub fn sha256_file(path: &Path) -> io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    sha256_reader(&mut f)
}

/// The sha256 of everything `r` yields, as hex, and its length.
pub fn sha256_reader(r: &mut impl Read) -> io::Result<(String, u64)> {
    let mut h = HashingWriter::new(io::sink());
    let n = io::copy(r, &mut h)?;
    Ok((h.hex(), n))
}

pub fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// Counts bytes and hashes them while writing.
pub struct HashingWriter<W: Write> {
    pub inner: W,
    hash: Sha256,
    pub size: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hash: Sha256::new(),
            size: 0,
        }
    }

    /// The digest of what was written, as hex.
    pub fn hex(self) -> String {
        hex(&self.hash.finalize())
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
