//! Leases: an environment's folder holds a `lease` file that its slate
//! process keeps locked (flock) while the environment lives. The kernel drops
//! the lock however the process dies, so a folder whose lease nobody holds is
//! a leftover that the next run or `slate gc` may remove.

use std::path::Path;

/// Creates and locks the lease file; the lock lasts as long as the handle.
pub fn take_lease(path: &Path) -> std::io::Result<std::fs::File> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let mut f = std::fs::File::create(path)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}

/// Whether some live process holds the lease at `path`.
pub fn lease_held(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    else {
        // No lease yet: an environment being created right now, unless old.
        let age = path
            .parent()
            .and_then(|d| d.metadata().ok())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok());
        return age.is_none_or(|a| a.as_secs() < 60);
    };
    // SAFETY: flock on a descriptor we own; dropping `f` releases it.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

pub use slate_layers::lock::lock_file;
