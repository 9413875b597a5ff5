//! File-tree helpers of the sandbox: copying inputs in and artifacts out.

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
    fs_err::create_dir_all(to)?;
    let mut bytes = 0;
    for rel in entries {
        let src = base.join(rel);
        let dst = to.join(rel);
        let meta = fs_err::symlink_metadata(&src)?;
        if let Some(parent) = rel.parent() {
            make_dirs_no_follow(to, parent)?;
        }
        match fs_err::symlink_metadata(&dst) {
            Ok(m) if m.file_type().is_symlink() || (m.is_file() && meta.is_dir()) => {
                fs_err::remove_file(&dst)?
            }
            _ => {}
        }
        let ft = meta.file_type();
        if ft.is_dir() {
            make_dirs_no_follow(to, rel)?;
            fs_err::set_permissions(&dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        } else if ft.is_symlink() {
            let target = fs_err::read_link(&src)?;
            let _ = fs_err::remove_file(&dst);
            std::os::unix::fs::symlink(target, &dst).map_err(|e| with_path(e, &dst))?;
        } else if ft.is_file() {
            bytes += copy_file(&src, &dst).map_err(|e| with_path(e, &src))?;
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
        match fs_err::symlink_metadata(&cur) {
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
                fs_err::create_dir(&cur)?
            }
            Err(e) => return Err(e),
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
        for e in fs_err::read_dir(base.join(&rel))? {
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
        if fs_err::symlink_metadata(&cur)?.file_type().is_symlink() {
            return Err(io::Error::other(format!(
                "`{}` is a symlink; artifacts must be regular files",
                rel.display()
            )));
        }
    }
    if let Some(p) = dest.parent() {
        fs_err::create_dir_all(p)?;
    }
    copy_file(from, dest)
}

/// Copies a regular file with its permission bits, keeping its holes:
/// `truncate -s 1T big` in a build (or an input tree) is a terabyte by
/// size and nothing on disk, and must stay that way on the host's disk.
/// Returns the file's size.
pub fn copy_file(from: &Path, dest: &Path) -> io::Result<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let src = fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(from)?;
    let meta = src.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other(format!(
            "`{}` is not a regular file",
            from.display()
        )));
    }
    let dst = fs::File::create(dest)?;
    let len = meta.len();
    let mut pos = 0u64;
    while pos < len {
        let Some((data, hole)) = next_extent(&src, pos, len)? else {
            break;
        };
        copy_range(&src, &dst, data, hole - data)?;
        pos = hole;
    }
    dst.set_len(len)?;
    dst.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    Ok(len)
}

/// The next stretch of data at or after `pos`, as (start, end); `None`
/// when only a hole is left. A filesystem that cannot tell holes has one
/// stretch: the rest of the file.
fn next_extent(f: &fs::File, pos: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open descriptor.
    let data = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some((pos, len))),
            _ => Err(e),
        };
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some((data as u64, (hole as u64).min(len))))
}

/// Copies `n` bytes at `at` from `src` to the same offset in `dst`: in the
/// kernel where it can, else through a buffer.
fn copy_range(src: &fs::File, dst: &fs::File, at: u64, n: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let (mut off_in, mut off_out) = (at as libc::loff_t, at as libc::loff_t);
    let end = at + n;
    while (off_in as u64) < end {
        let want = (end - off_in as u64).min(1 << 30) as usize;
        // SAFETY: both descriptors are open; the offsets are ours.
        let r = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        match r {
            0 => return Ok(()), // the file shrank under us
            r if r > 0 => {}
            _ => {
                let e = io::Error::last_os_error();
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP)
                ) {
                    return Err(e);
                }
                let mut buf = vec![0u8; 1 << 20];
                while (off_in as u64) < end {
                    let k = (end - off_in as u64).min(buf.len() as u64) as usize;
                    let got = src.read_at(&mut buf[..k], off_in as u64)?;
                    if got == 0 {
                        return Ok(());
                    }
                    dst.write_all_at(&buf[..got], off_in as u64)?;
                    off_in += got as libc::loff_t;
                }
                return Ok(());
            }
        }
    }
    Ok(())
}

pub use slate_layers::store::{remove_tree, slate_size as disk_usage};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_keeps_holes_and_content() {
        use std::os::unix::fs::FileExt;
        let t = tempfile::tempdir().unwrap();
        let (from, to) = (t.path().join("sparse"), t.path().join("copy"));
        let f = fs::File::create(&from).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", 1 << 30).unwrap();
        fs::set_permissions(&from, fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(copy_file(&from, &to).unwrap(), (1 << 30) + 4);
        let m = fs::metadata(&to).unwrap();
        assert_eq!(m.len(), (1 << 30) + 4);
        assert_eq!(m.mode() & 0o777, 0o640);
        // A gibibyte by size, a few blocks on disk.
        assert!(
            m.blocks() * 512 < 1 << 20,
            "{} bytes on disk",
            m.blocks() * 512
        );
        let c = fs::File::open(&to).unwrap();
        let mut buf = [0u8; 4];
        for (at, want) in [(0, b"head"), (1 << 30, b"tail"), (1 << 29, b"\0\0\0\0")] {
            c.read_exact_at(&mut buf, at).unwrap();
            assert_eq!(&buf, want, "at {at}");
        }
        // Dense files copy whole, and a file that ends in a hole keeps it.
        fs::write(&from, vec![7u8; 300_000]).unwrap();
        assert_eq!(copy_file(&from, &to).unwrap(), 300_000);
        assert_eq!(fs::read(&to).unwrap(), vec![7u8; 300_000]);
        let f = fs::File::create(&from).unwrap();
        f.write_all_at(b"x", 0).unwrap();
        f.set_len(1 << 20).unwrap();
        copy_file(&from, &to).unwrap();
        assert_eq!(fs::metadata(&to).unwrap().len(), 1 << 20);
    }

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
