//! Leases: an environment's folder holds a `lease` file that its slate
//! process keeps locked (flock) while the environment lives. The kernel drops
//! the lock however the process dies, so a folder whose lease nobody holds is
//! a leftover that the next run or `slate gc` may remove.

use std::path::Path;

/// Creates and locks the lease file; the lock lasts as long as the handle.
pub fn take_lease(path: &Path) -> std::io::Result<Lock> {
    use std::io::Write;
    let f = std::fs::File::create(path)?;
    let Some(mut lease) = slate_layers::lock::try_lock(f)? else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!("{} is held by another process", path.display()),
        ));
    };
    writeln!(lease, "{}", std::process::id())?;
    Ok(lease)
}

/// Whether some live process holds the lease at `path`.
pub fn lease_held(path: &Path) -> bool {
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
    // Taken means nobody held it; dropping the lock releases it at once.
    !matches!(slate_layers::lock::try_lock(f), Ok(Some(_)))
}

pub use slate_layers::lock::{lock_file, Lock};
