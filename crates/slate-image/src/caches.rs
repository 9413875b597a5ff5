//! Cache mounts: folders that outlive environments (`caches = [...]` on a
//! build or an image), kept in slate's cache under `caches/<project>/<id>/` and bound
//! into each environment of the project's targets that names them. Shared
//! by targets and runs of one project, never by two projects (a hostile
//! build of one must not plant files for another), never part of a layer
//! or an artifact.
//!
//! Sharing: `shared` folders are used by every environment at once;
//! `locked` ones by one at a time (the others wait: apt's archive takes a
//! lock of its own and fails when another holds it); `private` ones by one
//! at a time, the others each getting another folder (`<id>.1`, `<id>.2`…).

use sha2::Digest;
use slate_config::{CacheSpec, Sharing};
use slate_layers::lock::{lock_file, try_lock_file, Lock};
use slate_provider::Bind;
use std::path::{Path, PathBuf};

/// The caches of the project in `project_dir`.
pub fn project_dir(store_root: &Path, project_dir: &Path) -> PathBuf {
    let h = sha2::Sha256::digest(project_dir.as_os_str().as_encoded_bytes());
    let key: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
    store_root.join("caches").join(key)
}

/// apt's setting that keeps what it downloads (`apt` itself removes its
/// downloads after installing them unless told), bound beside a cache of
/// its archive.
const APT_KEEP: &str = "Binary::apt::APT::Keep-Downloaded-Packages \"true\";\nAPT::Keep-Downloaded-Packages \"true\";\n";

/// The binds for `caches`, and the locks that must be held while the
/// environment lives.
pub fn take(
    store_root: &Path,
    project: &Path,
    caches: &[CacheSpec],
) -> std::io::Result<(Vec<Bind>, Vec<Lock>)> {
    let dir = project_dir(store_root, project);
    let mut binds = Vec::new();
    let mut locks = Vec::new();
    for c in caches {
        fs_err::create_dir_all(&dir)?;
        let chosen = match c.sharing {
            Sharing::Shared => c.id.clone(),
            Sharing::Locked => {
                locks.push(lock_file(&dir.join(format!("{}.lock", c.id)))?);
                c.id.clone()
            }
            Sharing::Private => {
                let mut n = 0;
                loop {
                    let id = if n == 0 {
                        c.id.clone()
                    } else {
                        format!("{}.{n}", c.id)
                    };
                    if let Some(l) = try_lock_file(&dir.join(format!("{id}.lock")))? {
                        locks.push(l);
                        break id;
                    }
                    n += 1;
                }
            }
        };
        let host = dir.join(&chosen);
        fs_err::create_dir_all(&host)?;
        // When it was last used: what `slate gc --older-than` goes by. The
        // stamp is beside the folder, never in it: what is in it is the
        // builds', and a build could make any name there a symlink to a
        // host file.
        fs_err::write(dir.join(format!("{chosen}.used")), b"")?;
        binds.push(Bind {
            host,
            guest: c.path.clone(),
            readonly: false,
        });
        if c.path == "/var/cache/apt/archives" {
            let conf = store_root.join("caches").join("apt-keep-downloads.conf");
            if fs_err::read_to_string(&conf).ok().as_deref() != Some(APT_KEEP) {
                fs_err::write(&conf, APT_KEEP)?;
            }
            binds.push(Bind {
                host: conf,
                guest: "/etc/apt/apt.conf.d/99slate-keep-downloads".into(),
                readonly: true,
            });
        }
    }
    Ok((binds, locks))
}

/// The folders a bake of a Debian image binds at `/var/cache/apt/archives`
/// and `/var/lib/apt/lists` (`apt-<name>/archives` and `apt-<name>/lists`
/// among the project's caches), with the lock that keeps two bakes from
/// running apt on them at once.
///
/// They are the project's own, like its cache mounts: an image's steps run
/// as root with both folders writable, so a hostile step could put a forged
/// package list and a matching .deb there. Shared between projects, that
/// would be installed by another project's bake as if it came from Debian.
/// `name` says which archive (suite, mirror, arch); being a cache folder,
/// `slate images` lists it and `slate gc` prunes it.
pub fn apt_dirs(
    store_root: &Path,
    project: &Path,
    name: &str,
) -> std::io::Result<(PathBuf, PathBuf, Lock)> {
    let dir = project_dir(store_root, project);
    let id = format!("apt-{name}");
    let host = dir.join(&id);
    fs_err::create_dir_all(host.join("archives/partial"))?;
    fs_err::create_dir_all(host.join("lists/partial"))?;
    let lock = lock_file(&dir.join(format!("{id}.lock")))?;
    fs_err::write(dir.join(format!("{id}.used")), b"")?;
    Ok((host.join("archives"), host.join("lists"), lock))
}

/// The cache among `caches` that `path` (inside the environment) lies in.
pub fn holding<'a>(caches: &'a [CacheSpec], path: &str) -> Option<&'a CacheSpec> {
    caches
        .iter()
        .find(|c| path == c.path || path.starts_with(&format!("{}/", c.path)))
}

/// One cache folder on disk.
#[derive(Debug)]
pub struct CacheDir {
    pub path: PathBuf,
    pub id: String,
    pub bytes: u64,
    /// Seconds since it was last used.
    pub idle: u64,
}

/// Every cache folder of every project.
pub fn list(store_root: &Path) -> Vec<CacheDir> {
    let mut out = Vec::new();
    let Ok(projects) = fs_err::read_dir(store_root.join("caches")) else {
        return out;
    };
    for p in projects.flatten().filter(|p| p.path().is_dir()) {
        let Ok(entries) = fs_err::read_dir(p.path()) else {
            continue;
        };
        for e in entries.flatten().filter(|e| e.path().is_dir()) {
            let stamp = p
                .path()
                .join(format!("{}.used", e.file_name().to_string_lossy()));
            let used = std::fs::symlink_metadata(&stamp)
                .or_else(|_| std::fs::symlink_metadata(e.path()))
                .and_then(|m| m.modified())
                .ok();
            let idle = used
                .and_then(|t| t.elapsed().ok())
                .map_or(0, |d| d.as_secs());
            out.push(CacheDir {
                path: e.path(),
                id: e.file_name().to_string_lossy().into_owned(),
                bytes: slate_layers::store::slate_size(&e.path()),
                idle,
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Removes cache folders: every one with `all`, those unused for `idle`
/// seconds with it, none otherwise: how many, and their bytes. A folder
/// whose lock a build or a bake holds (a `locked` or `private` cache, a
/// project's apt folders) stays; its lock is held while it goes.
pub fn prune(store_root: &Path, all: bool, idle: Option<u64>) -> (usize, u64) {
    let (mut n, mut bytes) = (0, 0);
    for c in list(store_root) {
        if !(all || idle.is_some_and(|i| c.idle >= i)) {
            continue;
        }
        let lock = c.path.with_file_name(format!("{}.lock", c.id));
        let _held = if lock.exists() {
            match try_lock_file(&lock) {
                Ok(Some(l)) => Some(l),
                _ => continue,
            }
        } else {
            None
        };
        if slate_layers::store::remove_tree(&c.path).is_ok() {
            if let Some(dir) = c.path.parent() {
                let _ = std::fs::remove_file(dir.join(format!("{}.used", c.id)));
            }
            n += 1;
            bytes += c.bytes;
        }
    }
    (n, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(path: &str, sharing: Sharing) -> CacheSpec {
        CacheSpec {
            path: path.into(),
            id: "c".into(),
            sharing,
        }
    }

    #[test]
    fn private_caches_in_use_give_the_next_user_another_folder() {
        let root = tempfile::tempdir().unwrap();
        let p = Path::new("/project");
        let c = [cache("/c", Sharing::Private)];
        let (a, _held_a) = take(root.path(), p, &c).unwrap();
        let (b, held_b) = take(root.path(), p, &c).unwrap();
        assert_ne!(a[0].host, b[0].host);
        drop(held_b);
        let (again, _) = take(root.path(), p, &c).unwrap();
        assert_eq!(again[0].host, b[0].host);
        // Shared ones are the same folder for everybody.
        let s = [cache("/c", Sharing::Shared)];
        assert_eq!(
            take(root.path(), p, &s).unwrap().0[0].host,
            take(root.path(), p, &s).unwrap().0[0].host
        );
        // Another project never gets this one's.
        let other = take(root.path(), Path::new("/other"), &s).unwrap().0;
        assert_ne!(other[0].host, take(root.path(), p, &s).unwrap().0[0].host);
    }

    #[test]
    fn apt_folders_are_a_projects_own_and_listed_with_its_caches() {
        let root = tempfile::tempdir().unwrap();
        let (archives, lists, held) = apt_dirs(root.path(), Path::new("/a"), "bookworm-1").unwrap();
        assert!(archives.join("partial").is_dir() && lists.join("partial").is_dir());
        drop(held);
        let (other, ..) = apt_dirs(root.path(), Path::new("/b"), "bookworm-1").unwrap();
        assert_ne!(other, archives);
        let listed: Vec<String> = list(root.path()).into_iter().map(|c| c.id).collect();
        assert_eq!(listed, ["apt-bookworm-1", "apt-bookworm-1"]);
    }

    #[test]
    fn prune_leaves_a_cache_that_is_in_use() {
        let root = tempfile::tempdir().unwrap();
        let p = Path::new("/project");
        let locked = [CacheSpec {
            path: "/l".into(),
            id: "l".into(),
            sharing: Sharing::Locked,
        }];
        let (binds, held) = take(root.path(), p, &locked).unwrap();
        let (apt, _, apt_held) = apt_dirs(root.path(), p, "bookworm-1").unwrap();
        assert_eq!(prune(root.path(), true, None).0, 0);
        assert!(binds[0].host.is_dir() && apt.is_dir());
        drop((held, apt_held));
        assert_eq!(prune(root.path(), true, None).0, 2);
        assert!(!binds[0].host.exists() && !apt.exists());
    }

    #[test]
    fn a_path_is_in_a_cache_only_below_it() {
        let c = [cache("/src/target", Sharing::Shared)];
        assert!(holding(&c, "/src/target/release/app").is_some());
        assert!(holding(&c, "/src/target").is_some());
        assert!(holding(&c, "/src/targets/app").is_none());
    }
}
