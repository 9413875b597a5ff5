//! File locks (flock): held for as long as the returned file lives.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

fn open(path: &Path) -> io::Result<File> {
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// Waits for, then holds, an exclusive lock on `path` (created if needed).
pub fn lock_file(path: &Path) -> io::Result<File> {
    let file = open(path)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Takes the exclusive lock on `path` if it is free; `None` if another
/// holds it.
pub fn try_lock_file(path: &Path) -> io::Result<Option<File>> {
    let file = open(path)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(file))
}
