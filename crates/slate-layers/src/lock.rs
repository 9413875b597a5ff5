//! File locks (flock): held for as long as the returned [`Lock`] lives.

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::io;
use std::path::Path;

/// An exclusive lock on an open file, released when dropped (or when the
/// process dies, however it dies).
pub type Lock = Flock<File>;

fn open(path: &Path) -> io::Result<File> {
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// Waits for, then holds, an exclusive lock on `path` (created if needed).
pub fn lock_file(path: &Path) -> io::Result<Lock> {
    Flock::lock(open(path)?, FlockArg::LockExclusive).map_err(|(_, e)| e.into())
}

/// Takes the exclusive lock on `path` if it is free; `None` if another
/// holds it.
pub fn try_lock_file(path: &Path) -> io::Result<Option<Lock>> {
    try_lock(open(path)?)
}

/// Takes the exclusive lock on the open `file` if it is free; `None` if
/// another holds it.
pub fn try_lock(file: File) -> io::Result<Option<Lock>> {
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_refused_to_a_second_taker_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let first = try_lock_file(&path).unwrap().expect("a free lock is taken");
        assert!(try_lock_file(&path).unwrap().is_none());
        drop(first);
        assert!(try_lock_file(&path).unwrap().is_some());
    }
}
