//! File-tree helpers shared by the sandbox and the layer store.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Copies `entries` (relative to `base`) under `to`, creating parents; keeps
/// modes and symlinks. Returns the bytes of file content copied.
///
/// Nothing is written through a symlink: the tree under `to` is the
/// environment's, and a symlink there (one an earlier input put, say
/// `l -> /etc`) points into the host when followed from here. A symlink
/// where a folder is needed is an error; one where a file or link goes is
/// replaced, as a later input replaces an earlier one's file.
pub fn copy_entries(base: &Path, entries: &[PathBuf], to: &Path) -> io::Result<u64> {
    fs::create_dir_all(to).map_err(|e| with_path(e, to))?;
    let mut bytes = 0;
    for rel in entries {
        let src = base.join(rel);
        let dst = to.join(rel);
        let meta = fs::symlink_metadata(&src).map_err(|e| with_path(e, &src))?;
        if let Some(parent) = rel.parent() {
            make_dirs_no_follow(to, parent)?;
        }
        match fs::symlink_metadata(&dst) {
            Ok(m) if m.file_type().is_symlink() || (m.is_file() && meta.is_dir()) => {
                fs::remove_file(&dst).map_err(|e| with_path(e, &dst))?
            }
            _ => {}
        }
        let ft = meta.file_type();
        if ft.is_dir() {
            make_dirs_no_follow(to, rel)?;
            fs::set_permissions(&dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&src)?;
            let _ = fs::remove_file(&dst);
            std::os::unix::fs::symlink(target, &dst).map_err(|e| with_path(e, &dst))?;
        } else if ft.is_file() {
            bytes += fs::copy(&src, &dst).map_err(|e| with_path(e, &src))?;
        }
    }
    Ok(bytes)
}

/// Makes the folders of `rel` under `root`, one component at a time,
/// refusing to go through a symlink.
fn make_dirs_no_follow(root: &Path, rel: &Path) -> io::Result<()> {
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(io::Error::other(format!(
                    "`{}` is a symlink in the environment (from an earlier input?); inputs are never copied through symlinks",
                    cur.strip_prefix(root).unwrap_or(&cur).display()
                )))
            }
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "`{}` is a file in the environment where an input has a folder",
                    cur.strip_prefix(root).unwrap_or(&cur).display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(|e| with_path(e, &cur))?
            }
            Err(e) => return Err(with_path(e, &cur)),
        }
    }
    Ok(())
}

fn with_path(e: io::Error, p: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", p.display()))
}

/// Regular files under `base`, relative, sorted; symlinks are not followed and
/// overlay whiteouts (character devices) are skipped.
pub fn list_files(base: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    if !base.is_dir() {
        return Ok(out);
    }
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(base.join(&rel))? {
            let e = e?;
            let ft = e.file_type()?;
            let r = rel.join(e.file_name());
            if ft.is_dir() {
                stack.push(r);
            } else if ft.is_file() {
                out.push(r.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Copies `from` (inside `root`) to `dest` without following any symlink on
/// the way, so that a build cannot point an artifact at a host file.
pub fn copy_no_follow(root: &Path, from: &Path, dest: &Path) -> io::Result<u64> {
    let rel = from
        .strip_prefix(root)
        .map_err(|_| io::Error::other("path outside the environment"))?;
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        if fs::symlink_metadata(&cur)?.file_type().is_symlink() {
            return Err(io::Error::other(format!(
                "`{}` is a symlink; artifacts must be regular files",
                rel.display()
            )));
        }
    }
    if let Some(p) = dest.parent() {
        fs::create_dir_all(p)?;
    }
    fs::copy(from, dest)
}

/// Removes a tree, making read-only folders writable on the way.
pub fn remove_tree(p: &Path) -> io::Result<()> {
    match fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_writable(p);
            match fs::remove_dir_all(p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(with_path(e, p)),
                _ => Ok(()),
            }
        }
    }
}

fn make_writable(p: &Path) {
    if let Ok(m) = fs::symlink_metadata(p) {
        if m.is_dir() {
            let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o755));
            if let Ok(rd) = fs::read_dir(p) {
                for e in rd.flatten() {
                    make_writable(&e.path());
                }
            }
        }
    }
}

/// Bytes used by a tree (apparent sizes of regular files).
pub fn disk_usage(p: &Path) -> u64 {
    let Ok(m) = fs::symlink_metadata(p) else {
        return 0;
    };
    if m.is_dir() {
        fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| disk_usage(&e.path())).sum())
            .unwrap_or(0)
    } else if m.file_type().is_file() {
        m.len()
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_and_lists_without_following_links() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("a/b")).unwrap();
        fs::write(src.join("a/b/f"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", src.join("a/link")).unwrap();
        let dst = t.path().join("dst");
        let n = copy_entries(
            &src,
            &["a".into(), "a/b".into(), "a/b/f".into(), "a/link".into()],
            &dst,
        )
        .unwrap();
        assert_eq!(n, 1);
        assert_eq!(list_files(&dst).unwrap(), ["a/b/f"]);
        let out = t.path().join("out");
        assert!(copy_no_follow(&dst, &dst.join("a/link/passwd"), &out).is_err());
        assert_eq!(copy_no_follow(&dst, &dst.join("a/b/f"), &out).unwrap(), 1);
    }
}
