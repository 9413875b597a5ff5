//! Saved machines: a guest booted once per image (and machine size, network
//! setting, accelerator and QEMU) up to the point where its agent is ready
//! and the image's disk is not yet mounted, then saved (memory and device
//! state; the disk is not part of it). Each environment restores one over
//! its own copy-on-write overlay and is then made unlike every other (its
//! name, the host's clock, fresh random bytes for its kernel: see the
//! agent's `START`).
//!
//! `v1/vm/snapshots/<disk>-<cpus>cpu-<mem>M[-net]-<key>.vmstate`, where
//! `<disk>` names the base disk it was booted with: `gc` removes it with
//! that disk.

use crate::boot::{BootFiles, Lock};
use slate_layers::hash::hash as sha_of;
use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Bumped when what is saved changes meaning.
const FORMAT: &str = "slate-vm-save-v1";

/// What a saved machine fits: a machine started differently in any of
/// these cannot be restored from it.
pub struct Key<'a> {
    pub qemu: &'a Path,
    pub accel: &'a str,
    pub cpus: u64,
    pub mem_mib: u64,
    pub network: bool,
    pub cmdline: &'a str,
    pub boot: &'a BootFiles,
}

impl Key<'_> {
    fn digest(&self) -> String {
        use std::os::unix::fs::MetadataExt;
        // Another QEMU (an upgrade) may not read what this one saved.
        let qemu = fs_err::metadata(self.qemu)
            .map(|m| format!("{} {} {}", m.len(), m.mtime(), m.mtime_nsec()))
            .unwrap_or_default();
        let text = format!(
            "{FORMAT}\n{}\n{qemu}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            self.qemu.display(),
            self.accel,
            self.cpus,
            self.mem_mib,
            self.network,
            self.cmdline,
            self.boot.kernel.display(),
            self.boot.initramfs.display(),
            self.boot.disk.display(),
        );
        sha_of(&[text.as_bytes()])
    }

    fn file_name(&self) -> String {
        let disk = self
            .boot
            .disk
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!(
            "{disk}-{}cpu-{}M{}-{}.vmstate",
            self.cpus,
            self.mem_mib,
            if self.network { "-net" } else { "" },
            &self.digest()[..16]
        )
    }
}

/// A saved machine, opened for one restore.
pub struct Saved {
    pub path: PathBuf,
    pub file: File,
}

/// Opens a saved machine for a restore, marking it used now (its
/// modification time, which `slate gc --older-than` goes by).
fn open(path: &Path) -> io::Result<Saved> {
    let file = File::open(path)?;
    let _ = file.set_modified(std::time::SystemTime::now());
    Ok(Saved {
        path: path.to_path_buf(),
        file,
    })
}

/// The saved machine for `key` under `cache` (`v1/vm`), saved first by
/// `save` (which boots a machine and saves it into the file it is given)
/// when there is none. One slate saves; others wait for it.
pub fn find_or_save(
    cache: &Path,
    key: &Key,
    save: impl FnOnce(&File) -> Result<(), String>,
) -> Result<Saved, String> {
    let dir = cache.join("snapshots");
    let path = dir.join(key.file_name());
    if let Ok(saved) = open(&path) {
        return Ok(saved);
    }
    let _lock = Lock::take(&path.with_extension("lock")).map_err(|e| e.to_string())?;
    if let Ok(saved) = open(&path) {
        return Ok(saved);
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let out = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("create `{}`: {e}", tmp.display()))?;
    let res = save(&out).and_then(|()| {
        out.sync_all()
            .and_then(|()| fs_err::rename(&tmp, &path))
            .map_err(|e| e.to_string())
    });
    if let Err(why) = res {
        let _ = fs_err::remove_file(&tmp);
        return Err(why);
    }
    open(&path).map_err(|e| e.to_string())
}

/// Removes saved machines whose base disk is gone, those not used for
/// `idle` (a new QEMU, accelerator or machine size saves under another key
/// and leaves the old save unused), and what a killed save left; returns
/// how many files and their bytes.
pub fn gc(cache: &Path, idle: Option<std::time::Duration>) -> (usize, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut n, mut bytes) = (0, 0);
    let Ok(rd) = fs_err::read_dir(cache.join("snapshots")) else {
        return (0, 0);
    };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        // `<disk>-…`: the base disk's name has no dash.
        let Some((disk, _)) = name.split_once('-') else {
            continue;
        };
        let ext = p.extension().map(|x| x.to_string_lossy().into_owned());
        let orphan = match ext.as_deref() {
            Some("vmstate") => {
                let unused = |d| {
                    fs_err::metadata(&p)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|e| e >= d)
                };
                !cache.join("disks").join(format!("{disk}.qcow2")).exists()
                    || idle.is_some_and(unused)
            }
            // A save in progress holds the lock; one that is not is dead.
            Some(x) if x.starts_with("tmp-") => {
                let lock = p.with_extension("lock");
                matches!(slate_layers::lock::try_lock_file(&lock), Ok(Some(_)))
            }
            // The lock of a save that is gone, unless a save holds it.
            Some("lock") => {
                !p.with_extension("vmstate").exists()
                    && matches!(slate_layers::lock::try_lock_file(&p), Ok(Some(_)))
            }
            _ => false,
        };
        if orphan {
            bytes += fs_err::metadata(&p).map(|m| m.blocks() * 512).unwrap_or(0);
            if fs_err::remove_file(&p).is_ok() && ext.as_deref() != Some("lock") {
                n += 1;
            }
            if ext.as_deref().is_some_and(|x| x.starts_with("tmp-")) {
                let _ = fs_err::remove_file(p.with_extension("lock"));
            }
        }
    }
    (n, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gc_removes_saves_of_gone_disks_and_dead_partial_saves_only() {
        let t = tempfile::tempdir().unwrap();
        let (disks, saves) = (t.path().join("disks"), t.path().join("snapshots"));
        fs_err::create_dir_all(&disks).unwrap();
        fs_err::create_dir_all(&saves).unwrap();
        fs_err::write(disks.join("aaaa.qcow2"), b"disk").unwrap();
        let kept = saves.join("aaaa-1cpu-1024M-0123.vmstate");
        let orphan = saves.join("bbbb-1cpu-1024M-net-4567.vmstate");
        let dead = saves.join("aaaa-2cpu-512M-89ab.tmp-999999");
        let live = saves.join("aaaa-1cpu-2048M-cdef.tmp-1");
        for f in [&kept, &orphan, &dead, &live] {
            fs_err::write(f, b"state").unwrap();
        }
        // A save in progress holds its lock.
        let _saving = Lock::take(&live.with_extension("lock")).unwrap();
        let (n, _) = gc(t.path(), None);
        assert_eq!(n, 2);
        assert!(kept.exists() && live.exists());
        assert!(!orphan.exists() && !dead.exists());
        assert!(live.with_extension("lock").exists(), "a held lock stays");
        fs_err::write(saves.join("cccc-1cpu-1024M-0000.lock"), b"").unwrap();
        gc(t.path(), None);
        assert!(
            !saves.join("cccc-1cpu-1024M-0000.lock").exists(),
            "a free lock of nothing goes"
        );
        // A save unused for longer than asked goes; a restore marks it used.
        let day = std::time::Duration::from_secs(86400);
        let last_used_two_days_ago = || {
            let old = std::time::SystemTime::now() - 2 * day;
            let f = File::options().write(true).open(&kept).unwrap();
            f.set_modified(old).unwrap();
        };
        last_used_two_days_ago();
        assert_eq!(gc(t.path(), Some(3 * day)).0, 0);
        drop(open(&kept).unwrap());
        assert_eq!(gc(t.path(), Some(day)).0, 0, "just restored");
        last_used_two_days_ago();
        assert_eq!(gc(t.path(), Some(day)).0, 1);
        assert!(!kept.exists());
    }
}
