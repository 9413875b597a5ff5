//! The content-addressed layer store.
//!
//! Layout (versioned, so a later format can live beside this one):
//!
//! ```text
//! $CACHE/v1/layers/<key>/fs/          the layer's tree (an overlay lower dir)
//! $CACHE/v1/layers/<key>/layer.json   what made it, its size, when
//! $CACHE/v1/tmp/                      layers being built (never used as layers)
//! $CACHE/v1/locks/<key>.lock          one baker per key at a time
//! $CACHE/v1/envs/                     live environments (see slate-sandbox)
//! $CACHE/v1/apt/<suite-key>/archives/ .deb downloads, shared by the bakes
//! $CACHE/v1/apt/<suite-key>/lists/    and package lists, of one suite/mirror/arch
//! ```
//!
//! A layer becomes visible only by the rename of a complete folder, so a crash
//! mid-bake leaves junk in `tmp/`, never a half layer.

use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerMeta {
    pub key: String,
    pub parent: Option<String>,
    pub description: String,
    pub created: u64,
    pub size: u64,
    pub bake_seconds: f64,
}

pub struct LayerStore {
    root: PathBuf,
}

/// Holds an exclusive lock on one key until dropped.
pub struct KeyLock {
    _file: crate::lock::Lock,
}

impl LayerStore {
    /// The default cache: `SLATE_CACHE`, else `/var/cache/slate` as root, else
    /// `$XDG_CACHE_HOME/slate` (or `~/.cache/slate`).
    pub fn default_root() -> PathBuf {
        if let Some(p) = std::env::var_os("SLATE_CACHE") {
            return PathBuf::from(p);
        }
        if nix::unistd::geteuid().is_root() {
            return PathBuf::from("/var/cache/slate");
        }
        if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
            return PathBuf::from(x).join("slate");
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        home.join(".cache/slate")
    }

    pub fn open(cache: &Path) -> io::Result<LayerStore> {
        let root = cache.join("v1");
        for d in ["layers", "tmp", "locks", "envs"] {
            fs_err::create_dir_all(root.join(d)).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("create `{}`: {e}", root.join(d).display()),
                )
            })?;
        }
        Ok(LayerStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn envs_dir(&self) -> PathBuf {
        self.root.join("envs")
    }
    pub fn layer_dir(&self, key: &str) -> PathBuf {
        self.root.join("layers").join(key)
    }
    pub fn layer_fs(&self, key: &str) -> PathBuf {
        self.layer_dir(key).join("fs")
    }
    pub fn has(&self, key: &str) -> bool {
        self.layer_dir(key).join("layer.json").is_file()
    }

    pub fn meta(&self, key: &str) -> Option<LayerMeta> {
        let text = fs_err::read_to_string(self.layer_dir(key).join("layer.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Every complete layer in the store.
    pub fn layers(&self) -> Vec<LayerMeta> {
        let mut out: Vec<LayerMeta> = fs_err::read_dir(self.root.join("layers"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| self.meta(&e.file_name().to_string_lossy()))
            .collect();
        out.sort_by_key(|m| m.created);
        out
    }

    /// When a layer was last used by a bake or a build.
    pub fn last_used(&self, key: &str) -> Option<SystemTime> {
        fs_err::metadata(self.layer_dir(key).join("used"))
            .and_then(|m| m.modified())
            .ok()
    }

    pub fn touch_used(&self, key: &str) {
        let _ = fs_err::write(self.layer_dir(key).join("used"), b"");
    }

    /// Waits for, then holds, the lock of `key`.
    pub fn lock(&self, key: &str) -> io::Result<KeyLock> {
        let path = self.root.join("locks").join(format!("{key}.lock"));
        Ok(KeyLock {
            _file: crate::lock::lock_file(&path)?,
        })
    }

    /// A fresh staging folder; its `fs/` is where the layer is built.
    pub fn staging(&self, key: &str) -> io::Result<PathBuf> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = self
            .root
            .join("tmp")
            .join(format!("{key}-{}-{nanos}", std::process::id()));
        fs_err::create_dir_all(dir.join("fs"))?;
        Ok(dir)
    }

    /// Makes a built staging folder the layer `meta.key`, atomically.
    pub fn commit(&self, staging: &Path, mut meta: LayerMeta) -> io::Result<()> {
        meta.size = slate_size(&staging.join("fs"));
        meta.created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        fs_err::write(
            staging.join("layer.json"),
            serde_json::to_vec_pretty(&meta).map_err(io::Error::other)?,
        )?;
        fs_err::rename(staging, self.layer_dir(&meta.key))?;
        self.touch_used(&meta.key);
        Ok(())
    }

    /// Removes one layer; returns the bytes freed.
    pub fn remove(&self, key: &str) -> io::Result<u64> {
        let size = self.meta(key).map(|m| m.size).unwrap_or(0);
        let dir = self.layer_dir(key);
        // Rename first so a reader never sees a half-removed layer.
        let trash = self
            .root
            .join("tmp")
            .join(format!("trash-{key}-{}", std::process::id()));
        fs_err::rename(&dir, &trash)?;
        remove_tree(&trash)?;
        Ok(size)
    }

    /// Removes staging folders left by killed bakes; returns the bytes freed.
    pub fn clean_tmp(&self) -> u64 {
        let mut freed = 0;
        for e in fs_err::read_dir(self.root.join("tmp"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            // `<key>-<pid>-<nanos>`: skip folders whose baker is still alive.
            let pid = name.rsplit('-').nth(1).and_then(|p| p.parse::<i32>().ok());
            if let Some(pid) = pid {
                if Path::new(&format!("/proc/{pid}")).exists() && pid != std::process::id() as i32 {
                    continue;
                }
            }
            freed += slate_size(&e.path());
            let _ = remove_tree(&e.path());
        }
        freed
    }
}

/// Bytes used by a tree (apparent sizes of regular files).
pub fn slate_size(p: &Path) -> u64 {
    let Ok(m) = fs_err::symlink_metadata(p) else {
        return 0;
    };
    if m.is_dir() {
        fs_err::read_dir(p)
            .map(|rd| rd.flatten().map(|e| slate_size(&e.path())).sum())
            .unwrap_or(0)
    } else if m.is_file() {
        m.len()
    } else {
        0
    }
}

/// Removes a tree, making read-only folders writable on the way (a build
/// may leave `chmod 0500` folders behind).
pub fn remove_tree(p: &Path) -> io::Result<()> {
    match fs_err::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_writable(p);
            match fs_err::remove_dir_all(p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io::Error::new(
                    e.kind(),
                    format!("remove `{}`: {e}", p.display()),
                )),
                _ => Ok(()),
            }
        }
    }
}

fn make_writable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = fs_err::symlink_metadata(p) {
        if m.is_dir() {
            let _ = fs_err::set_permissions(p, fs::Permissions::from_mode(0o755));
            if let Ok(rd) = fs_err::read_dir(p) {
                for e in rd.flatten() {
                    make_writable(&e.path());
                }
            }
        }
    }
}
