//! Reading a stack of layers (overlay folders, whiteouts included) and
//! writing it as tar: one layer's diff, or the merged tree.
//!
//! Output is deterministic: entries sorted by path, owners numeric, mtimes
//! clamped to `SOURCE_DATE_EPOCH` (0 when unset) — the same layers always
//! give the same bytes.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, Metadata};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What the mtime of every entry is clamped to.
pub fn clamp_from_env() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Paths under `root`, relative, sorted so that a folder comes before its content.
pub fn walk(root: &Path) -> io::Result<Vec<(PathBuf, Metadata)>> {
    let mut out = Vec::new();
    walk_into(root, Path::new(""), &mut out)?;
    Ok(out)
}

fn walk_into(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, Metadata)>) -> io::Result<()> {
    let mut names: Vec<_> = fs_err::read_dir(root.join(rel))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for n in names {
        let r = rel.join(&n);
        let m = fs_err::symlink_metadata(root.join(&r))?;
        let is_dir = m.is_dir();
        out.push((r.clone(), m));
        if is_dir {
            walk_into(root, &r, out)?;
        }
    }
    Ok(())
}

fn is_whiteout(m: &Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

fn is_opaque(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut buf = [0u8; 4];
    for name in [c"trusted.overlay.opaque", c"user.overlay.opaque"] {
        // SAFETY: valid C strings and a buffer of the given length.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n == 1 && buf[0] == b'y' {
            return true;
        }
    }
    false
}

/// Writes tar entries with fixed owners-as-numbers and clamped times.
pub struct TarWriter<W: Write> {
    b: tar::Builder<W>,
    clamp: u64,
    links: HashMap<(u64, u64), PathBuf>,
}

impl<W: Write> TarWriter<W> {
    pub fn new(w: W, clamp: u64) -> Self {
        let mut b = tar::Builder::new(w);
        b.mode(tar::HeaderMode::Complete);
        b.follow_symlinks(false);
        TarWriter {
            b,
            clamp,
            links: HashMap::new(),
        }
    }

    pub fn header(&self, m: &Metadata, kind: tar::EntryType) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(m.mode() & 0o7777);
        h.set_uid(m.uid() as u64);
        h.set_gid(m.gid() as u64);
        h.set_mtime((m.mtime().max(0) as u64).min(self.clamp));
        h.set_size(0);
        h
    }

    pub fn empty_file(&mut self, rel: &Path) -> io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        self.b.append_data(&mut h, rel, io::empty())
    }

    /// One filesystem entry at `src`, named `rel` in the archive.
    pub fn entry(&mut self, rel: &Path, src: &Path, m: &Metadata) -> io::Result<()> {
        let ft = m.file_type();
        if ft.is_dir() {
            let mut h = self.header(m, tar::EntryType::Directory);
            return self.b.append_data(&mut h, rel, io::empty());
        }
        if ft.is_symlink() {
            let mut h = self.header(m, tar::EntryType::Symlink);
            let target = fs_err::read_link(src)?;
            return self.b.append_link(&mut h, rel, target);
        }
        if ft.is_file() {
            if m.nlink() > 1 {
                if let Some(first) = self.links.get(&(m.dev(), m.ino())) {
                    let mut h = self.header(m, tar::EntryType::Link);
                    let first = first.clone();
                    return self.b.append_link(&mut h, rel, first);
                }
                self.links.insert((m.dev(), m.ino()), rel.to_path_buf());
            }
            let mut h = self.header(m, tar::EntryType::Regular);
            h.set_size(m.len());
            return self.b.append_data(&mut h, rel, File::open(src)?);
        }
        let kind = if ft.is_char_device() {
            tar::EntryType::Char
        } else if ft.is_block_device() {
            tar::EntryType::Block
        } else if ft.is_fifo() {
            tar::EntryType::Fifo
        } else {
            return Ok(()); // sockets do not go into images
        };
        let mut h = self.header(m, kind);
        let rdev = m.rdev();
        h.set_device_major(libc::major(rdev))?;
        h.set_device_minor(libc::minor(rdev))?;
        self.b.append_data(&mut h, rel, io::empty())
    }

    pub fn finish(self) -> io::Result<W> {
        self.b.into_inner()
    }
}

/// A layer as an OCI tar diff: overlay whiteouts become `.wh.` files, opaque
/// folders get `.wh..wh..opq`.
pub fn write_layer_diff<W: Write>(layer: &Path, out: W, clamp: u64) -> io::Result<W> {
    let mut t = TarWriter::new(out, clamp);
    for (rel, m) in walk(layer)? {
        let src = layer.join(&rel);
        if is_whiteout(&m) {
            let name = format!(
                ".wh.{}",
                rel.file_name().unwrap_or_default().to_string_lossy()
            );
            t.empty_file(&rel.with_file_name(name))?;
            continue;
        }
        t.entry(&rel, &src, &m)?;
        if m.is_dir() && is_opaque(&src) {
            t.empty_file(&rel.join(".wh..wh..opq"))?;
        }
    }
    t.finish()
}

/// The merged view of `layers` (lowest first) as one flat rootfs tarball.
pub fn write_flat<W: Write>(layers: &[PathBuf], out: W, clamp: u64) -> io::Result<W> {
    // Top-down: the first layer to name a path wins. A whiteout or a
    // non-folder hides the path and all below it in lower layers; an opaque
    // folder hides what is below it.
    let mut chosen: Vec<(PathBuf, usize, Metadata)> = Vec::new();
    let mut taken: BTreeSet<PathBuf> = BTreeSet::new();
    let mut hide_all: BTreeSet<PathBuf> = BTreeSet::new();
    let mut hide_below: BTreeSet<PathBuf> = BTreeSet::new();
    for (i, layer) in layers.iter().enumerate().rev() {
        let (mut new_all, mut new_below) = (Vec::new(), Vec::new());
        for (rel, m) in walk(layer)? {
            let hidden = rel.ancestors().any(|a| hide_all.contains(a))
                || rel.ancestors().skip(1).any(|a| hide_below.contains(a));
            if hidden {
                continue;
            }
            if is_whiteout(&m) {
                new_all.push(rel);
                continue;
            }
            if m.is_dir() && is_opaque(&layer.join(&rel)) {
                new_below.push(rel.clone());
            }
            if taken.insert(rel.clone()) {
                if !m.is_dir() {
                    new_all.push(rel.clone());
                }
                chosen.push((rel, i, m));
            }
        }
        hide_all.extend(new_all);
        hide_below.extend(new_below);
    }
    chosen.sort_by(|a, b| a.0.cmp(&b.0));
    let mut t = TarWriter::new(out, clamp);
    for (rel, i, m) in chosen {
        t.entry(&rel, &layers[i].join(&rel), &m)?;
    }
    t.finish()
}

/// A kernel found in an image's `/boot`.
#[derive(Debug, Clone, PartialEq)]
pub struct Kernel {
    pub path: PathBuf,
    /// e.g. `6.1.0-35-amd64`
    pub version: String,
}

/// The file at `rel` (no leading slash) in the merged layers, if any: the
/// topmost layer that has it wins; a whiteout there hides it.
pub fn layer_file(layers: &[PathBuf], rel: &str) -> Option<PathBuf> {
    for l in layers.iter().rev() {
        let p = l.join(rel);
        if let Ok(m) = fs_err::symlink_metadata(&p) {
            if m.file_type().is_char_device() && m.rdev() == 0 {
                return None;
            }
            return Some(p);
        }
    }
    None
}

/// The newest `/boot/vmlinuz-*` of the merged layers.
pub fn kernel_in(layers: &[PathBuf]) -> Option<Kernel> {
    let mut versions: BTreeSet<String> = BTreeSet::new();
    for l in layers {
        if let Ok(rd) = fs_err::read_dir(l.join("boot")) {
            for e in rd.flatten() {
                if let Some(v) = e.file_name().to_string_lossy().strip_prefix("vmlinuz-") {
                    versions.insert(v.to_string());
                }
            }
        }
    }
    versions.into_iter().rev().find_map(|version| {
        let path = layer_file(layers, &format!("boot/vmlinuz-{version}"))?;
        Some(Kernel { path, version })
    })
}
