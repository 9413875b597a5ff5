//! Environments kept after a failed build (`slate build --keep-failed`):
//! `<cache>/kept/<run>/<target>/` holds what the build wrote over its image
//! (`upper/`, an overlay upper folder; for a VM, `disk.qcow2`, a disk
//! overlay over the image's base disk) and `kept.json`, what `slate shell
//! --keep RUN/TARGET` needs to enter it as it was: the image's layers, the
//! environment variables, the working folder. `slate runs` lists them and
//! `slate gc` removes them after [`TTL`].

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a kept environment stays before `slate gc` removes it.
pub const TTL: Duration = Duration::from_secs(24 * 3600);

const FILE: &str = "kept.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Kept {
    pub run: String,
    pub target: String,
    pub image: String,
    /// The project folder whose run it was.
    pub project: PathBuf,
    /// The image's layers, lowest first; `upper/` goes on top of them.
    pub layers: Vec<PathBuf>,
    pub env: Vec<(String, String)>,
    pub workdir: String,
    pub network: bool,
    /// Seconds since the epoch.
    pub created: f64,
    /// A VM's: `disk.qcow2` (what the build wrote, over the image's base
    /// disk) instead of `upper/`.
    #[serde(default)]
    pub vm: bool,
}

/// Where a run's kept environments go.
pub fn run_dir(store_root: &Path, run: &str) -> PathBuf {
    store_root.join("kept").join(run)
}

pub fn write(dir: &Path, k: &Kept) -> std::io::Result<()> {
    let data = serde_json::to_vec_pretty(k).map_err(std::io::Error::other)?;
    fs_err::write(dir.join(FILE), data)
}

/// A kept environment, found by `RUN/TARGET`.
pub fn find(store_root: &Path, id: &str) -> Result<(PathBuf, Kept), String> {
    let (run, target) = id
        .split_once('/')
        .filter(|(r, t)| valid(r) && valid(t))
        .ok_or_else(|| {
            format!("`{id}` is not RUN/TARGET (`slate runs` lists kept environments)")
        })?;
    let dir = run_dir(store_root, run).join(target);
    let text = fs_err::read_to_string(dir.join(FILE))
        .map_err(|_| format!("no kept environment `{id}` (`slate runs` lists them)"))?;
    let k: Kept = serde_json::from_str(&text).map_err(|e| format!("`{id}`: {e}"))?;
    Ok((dir, k))
}

/// A run id or target name as a single folder name: nothing that climbs.
fn valid(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Every kept environment in the cache: `(folder, record)`.
pub fn list(store_root: &Path) -> Vec<(PathBuf, Kept)> {
    let mut out = Vec::new();
    let Ok(runs) = fs_err::read_dir(store_root.join("kept")) else {
        return out;
    };
    for run in runs.flatten() {
        let Ok(targets) = fs_err::read_dir(run.path()) else {
            continue;
        };
        for t in targets.flatten() {
            let Ok(text) = fs_err::read_to_string(t.path().join(FILE)) else {
                continue;
            };
            if let Ok(k) = serde_json::from_str::<Kept>(&text) {
                out.push((t.path(), k));
            }
        }
    }
    out.sort_by(|a, b| a.1.created.total_cmp(&b.1.created));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_that_would_climb_out_of_the_kept_folder_is_refused() {
        let root = tempfile::tempdir().unwrap();
        for bad in [
            "../x",
            "run/..",
            "run/../../etc",
            "a/b/c",
            "/etc/passwd",
            "run",
        ] {
            let err = find(root.path(), bad).unwrap_err();
            assert!(err.contains("RUN/TARGET"), "{bad}: {err}");
        }
        let err = find(root.path(), "r1/t").unwrap_err();
        assert!(err.contains("no kept environment"), "{err}");
    }
}
