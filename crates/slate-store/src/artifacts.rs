//! The artifacts folder: a target's files appear all at once, only after its
//! success and with their checksums; `SHA256SUMS` and `manifest.json` are
//! rewritten atomically as targets finish, so an interrupted run keeps what it
//! had already built.

use crate::dsse::{Signer, ENVELOPE};
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// Relative to the artifacts folder, e.g. `agent-bookworm/agent.deb`.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestTarget {
    pub name: String,
    pub status: String,
    pub image: String,
    pub image_digest: String,
    pub provider: String,
    pub artifacts: Vec<ArtifactRecord>,
}

/// `manifest.json`: what `slate build` writes and `slate publish` reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub run_id: String,
    pub slate_version: String,
    pub targets: Vec<ManifestTarget>,
}

/// The manifest's file name in the artifacts folder.
pub const MANIFEST: &str = "manifest.json";
/// The checksum list's file name in the artifacts folder.
pub const SUMS: &str = "SHA256SUMS";

/// The provenance file's name in each target's folder.
pub const PROVENANCE: &str = "provenance.json";

pub struct ArtifactStore {
    dir: PathBuf,
    run_id: String,
    staging: PathBuf,
    done: Mutex<Vec<ManifestTarget>>,
    signer: Option<Arc<Signer>>,
}

fn ioerr(e: io::Error, what: &str, p: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} `{}`: {e}", p.display()))
}

impl ArtifactStore {
    pub fn new(dir: PathBuf, run_id: &str) -> ArtifactStore {
        let staging = dir.join(format!(".slate-tmp-{run_id}"));
        ArtifactStore {
            dir,
            run_id: run_id.to_string(),
            staging,
            done: Mutex::new(Vec::new()),
            signer: None,
        }
    }

    /// Also signs every provenance into a DSSE envelope beside it.
    pub fn with_signer(mut self, signer: Option<Arc<Signer>>) -> ArtifactStore {
        self.signer = signer;
        self
    }

    /// Where a target's artifacts are fetched to before they are checked.
    pub fn staging_for(&self, target: &str) -> io::Result<PathBuf> {
        let p = self.staging.join(target);
        let _ = fs_err::remove_dir_all(&p);
        fs_err::create_dir_all(&p)?;
        Ok(p)
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Puts a target's provenance beside its staged artifacts, so that it
    /// appears with them.
    /// With a signer, its DSSE envelope goes beside it.
    pub fn write_provenance(&self, target: &str, statement: &serde_json::Value) -> io::Result<()> {
        if let Some(s) = &self.signer {
            self.write_beside(target, ENVELOPE, &s.envelope(statement))?;
        }
        self.write_beside(target, PROVENANCE, statement)
    }

    fn write_beside(&self, target: &str, name: &str, value: &serde_json::Value) -> io::Result<()> {
        let dir = self.staging.join(target);
        fs_err::create_dir_all(&dir)?;
        let path = dir.join(name);
        fs_err::write(
            &path,
            serde_json::to_vec_pretty(value).map_err(io::Error::other)?,
        )
        .map_err(|e| ioerr(e, "write", &path))
    }

    /// Moves a target's staged artifacts into place and rewrites the indexes.
    pub fn commit(&self, mut t: ManifestTarget) -> io::Result<()> {
        let staged = self.staging.join(&t.name);
        let dest = self.dir.join(&t.name);
        if dest.exists() {
            let old = self.staging.join(format!("{}.old", t.name));
            let _ = fs_err::remove_dir_all(&old);
            fs_err::rename(&dest, &old)?;
            let _ = fs_err::remove_dir_all(&old);
        }
        if staged.exists() {
            give_to_invoking_user(&staged)?;
            fs_err::rename(&staged, &dest)?;
        } else {
            fs_err::create_dir_all(&dest)?;
        }
        t.status = "succeeded".into();
        let mut done = self.done.lock().unwrap();
        done.push(t);
        self.write_indexes(&done)
    }

    /// Records a target that produced nothing (failed, skipped) in the manifest.
    pub fn record_failure(&self, t: ManifestTarget) -> io::Result<()> {
        let mut done = self.done.lock().unwrap();
        done.push(t);
        self.write_indexes(&done)
    }

    fn write_indexes(&self, done: &[ManifestTarget]) -> io::Result<()> {
        let mut sums = String::new();
        let mut sorted: Vec<&ArtifactRecord> = done.iter().flat_map(|t| &t.artifacts).collect();
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
        for a in sorted {
            sums.push_str(&format!("{}  {}\n", a.sha256, a.path));
        }
        let mut targets = done.to_vec();
        targets.sort_by(|a, b| a.name.cmp(&b.name));
        let manifest = Manifest {
            run_id: self.run_id.clone(),
            slate_version: env!("CARGO_PKG_VERSION").into(),
            targets,
        };
        if let Some((uid, gid)) = invoking_user() {
            // The folder too, when slate made it: its owner must be able
            // to remove what is in it.
            let meta = fs_err::metadata(&self.dir)?;
            if std::os::unix::fs::MetadataExt::uid(&meta) == 0 {
                std::os::unix::fs::lchown(&self.dir, Some(uid), Some(gid))
                    .map_err(|e| ioerr(e, "give to the invoking user", &self.dir))?;
            }
        }
        self.write_atomic(SUMS, sums.as_bytes())?;
        self.write_atomic(
            MANIFEST,
            &serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?,
        )
    }

    fn write_atomic(&self, name: &str, data: &[u8]) -> io::Result<()> {
        fs_err::create_dir_all(&self.staging)?;
        let tmp = self.staging.join(name);
        fs_err::write(&tmp, data)?;
        give_to_invoking_user(&tmp)?;
        fs_err::rename(&tmp, self.dir.join(name))
            .map_err(|e| ioerr(e, "move into place", &self.dir.join(name)))
    }

    /// Removes the staging folder (what failed targets fetched).
    pub fn finish(&self) {
        let _ = fs_err::remove_dir_all(&self.staging);
    }
}

/// The user who ran `sudo slate …`: artifacts are theirs, not root's.
/// `None` when slate runs as root by itself (or not as root at all).
pub fn invoking_user() -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let id = |k: &str| std::env::var(k).ok()?.parse::<u32>().ok();
    match (id("SUDO_UID")?, id("SUDO_GID")?) {
        (0, _) => None,
        (uid, gid) => Some((uid, gid)),
    }
}

/// Gives `path` and everything under it (links themselves, never what
/// they point at) to the invoking user, if there is one.
fn give_to_invoking_user(path: &Path) -> io::Result<()> {
    let Some((uid, gid)) = invoking_user() else {
        return Ok(());
    };
    let mut todo = vec![path.to_path_buf()];
    while let Some(p) = todo.pop() {
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid))
            .map_err(|e| ioerr(e, "give to the invoking user", &p))?;
        if fs_err::symlink_metadata(&p)?.is_dir() {
            for e in fs_err::read_dir(&p)? {
                todo.push(e?.path());
            }
        }
    }
    Ok(())
}

/// Makes a fetched artifact an ordinary file: no setuid, setgid or sticky
/// bit (a build could otherwise leave a root-owned setuid shell in
/// `artifacts/`).
pub fn make_plain(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs_err::symlink_metadata(path)?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let mode = meta.permissions().mode();
    if mode & 0o7000 != 0 {
        fs_err::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o777))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_names_the_path_it_is_about() {
        let t = tempfile::tempdir().unwrap();
        // The artifacts folder is a file: nothing can be made below it.
        let dir = t.path().join("artifacts");
        std::fs::write(&dir, "not a folder").unwrap();
        let store = ArtifactStore::new(dir.clone(), "run1");
        let err = store.staging_for("t").unwrap_err().to_string();
        let staging = dir.join(".slate-tmp-run1").join("t");
        assert!(err.contains(&staging.display().to_string()), "{err}");
    }
}
