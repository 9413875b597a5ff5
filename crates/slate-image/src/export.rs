//! Exports of baked images: an OCI image (layout folder or archive) whose
//! layers are the slate layers as OCI tar diffs, or one flat rootfs tarball.
//!
//! Output is deterministic: entries sorted by path, owners numeric, mtimes
//! clamped to `SOURCE_DATE_EPOCH` (0 when unset), layers uncompressed, JSON
//! with sorted keys — the same layers always give the same digests.

use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, Metadata};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{BakedImage, ImagePlan};

/// What the mtime of every entry is clamped to.
pub fn clamp_from_env() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Paths under `root`, relative, sorted so that a folder comes before its content.
fn walk(root: &Path) -> io::Result<Vec<(PathBuf, Metadata)>> {
    let mut out = Vec::new();
    walk_into(root, Path::new(""), &mut out)?;
    Ok(out)
}

fn walk_into(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, Metadata)>) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(root.join(rel))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for n in names {
        let r = rel.join(&n);
        let m = fs::symlink_metadata(root.join(&r))?;
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
struct TarWriter<W: Write> {
    b: tar::Builder<W>,
    clamp: u64,
    links: HashMap<(u64, u64), PathBuf>,
}

impl<W: Write> TarWriter<W> {
    fn new(w: W, clamp: u64) -> Self {
        let mut b = tar::Builder::new(w);
        b.mode(tar::HeaderMode::Complete);
        b.follow_symlinks(false);
        TarWriter {
            b,
            clamp,
            links: HashMap::new(),
        }
    }

    fn header(&self, m: &Metadata, kind: tar::EntryType) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(m.mode() & 0o7777);
        h.set_uid(m.uid() as u64);
        h.set_gid(m.gid() as u64);
        h.set_mtime((m.mtime().max(0) as u64).min(self.clamp));
        h.set_size(0);
        h
    }

    fn empty_file(&mut self, rel: &Path) -> io::Result<()> {
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
    fn entry(&mut self, rel: &Path, src: &Path, m: &Metadata) -> io::Result<()> {
        let ft = m.file_type();
        if ft.is_dir() {
            let mut h = self.header(m, tar::EntryType::Directory);
            return self.b.append_data(&mut h, rel, io::empty());
        }
        if ft.is_symlink() {
            let mut h = self.header(m, tar::EntryType::Symlink);
            let target = fs::read_link(src)?;
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

    fn finish(self) -> io::Result<W> {
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

/// Counts bytes and hashes them while writing.
struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
    size: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A blob written into `blobs/sha256/`: (digest "sha256:…", size).
fn write_blob(
    layout: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<(String, u64)> {
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".tmp-{}", std::process::id()));
    let mut w = HashingWriter {
        inner: io::BufWriter::new(File::create(&tmp)?),
        hash: Sha256::new(),
        size: 0,
    };
    write(&mut w)?;
    w.flush()?;
    let digest = hex(&w.hash.finalize());
    fs::rename(&tmp, dir.join(&digest))?;
    Ok((format!("sha256:{digest}"), w.size))
}

/// The OCI/Go name of a Debian architecture.
pub fn oci_arch(debian: Option<&str>) -> (&'static str, Option<&'static str>) {
    let host = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        _ => "amd64",
    };
    match debian.unwrap_or(host) {
        "amd64" => ("amd64", None),
        "arm64" => ("arm64", Some("v8")),
        "armhf" => ("arm", Some("v7")),
        "armel" => ("arm", Some("v5")),
        "i386" => ("386", None),
        "ppc64el" | "ppc64le" => ("ppc64le", None),
        "s390x" => ("s390x", None),
        "riscv64" => ("riscv64", None),
        _ => (host, None),
    }
}

/// Writes `image` as an OCI image layout at `dest` (a folder), or as an OCI
/// archive when `dest` ends in `.tar`. Returns the manifest digest.
pub fn export_oci(
    plan: &ImagePlan,
    image: &BakedImage,
    arch: Option<&str>,
    dest: &Path,
    clamp: u64,
) -> io::Result<String> {
    let archive = dest.extension().is_some_and(|e| e == "tar");
    let layout = if archive {
        dest.with_extension("tar.layout-tmp")
    } else {
        dest.to_path_buf()
    };
    let _ = fs::remove_dir_all(&layout);
    fs::create_dir_all(&layout)?;
    let mut layers = Vec::new();
    for fs_dir in &image.layers {
        let (digest, size) =
            write_blob(&layout, |w| write_layer_diff(fs_dir, w, clamp).map(|_| ()))?;
        layers.push((digest, size));
    }
    let created = rfc3339(clamp);
    let (os_arch, variant) = oci_arch(arch);
    let mut env: Vec<String> =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()];
    env.extend(image.env.iter().map(|(k, v)| format!("{k}={v}")));
    let mut config = json!({
        "architecture": os_arch,
        "os": "linux",
        "created": created,
        "config": { "Env": env, "Cmd": ["/bin/sh"] },
        "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|l| l.0.clone()).collect::<Vec<_>>() },
        "history": plan.layers.iter().map(|l| json!({ "created": created, "created_by": format!("slate: {}", l.describe()) })).collect::<Vec<_>>(),
    });
    if let Some(v) = variant {
        config["variant"] = json!(v);
    }
    let config_bytes = serde_json::to_vec(&config)?;
    let (config_digest, config_size) = write_blob(&layout, |w| w.write_all(&config_bytes))?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size },
        "layers": layers.iter().map(|(d, s)| json!({ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": s })).collect::<Vec<_>>(),
        "annotations": { "org.opencontainers.image.created": created, "dev.slate.image.digest": image.digest },
    });
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let (manifest_digest, manifest_size) = write_blob(&layout, |w| w.write_all(&manifest_bytes))?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": { "org.opencontainers.image.ref.name": image.name },
        }],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    if archive {
        let tmp = dest.with_extension("tar.tmp");
        let f = io::BufWriter::new(File::create(&tmp)?);
        let mut t = TarWriter::new(f, clamp);
        for (rel, m) in walk(&layout)? {
            t.entry(&rel, &layout.join(&rel), &m)?;
        }
        t.finish()?.flush()?;
        fs::rename(&tmp, dest)?;
        fs::remove_dir_all(&layout)?;
    }
    Ok(manifest_digest)
}

/// Writes the image as one flat rootfs tarball at `dest`.
pub fn export_tar(image: &BakedImage, dest: &Path, clamp: u64) -> io::Result<()> {
    let tmp = dest.with_extension("tmp");
    let f = io::BufWriter::new(File::create(&tmp)?);
    write_flat(&image.layers, f, clamp)?.flush()?;
    fs::rename(&tmp, dest)
}

/// `secs` since the epoch as an RFC 3339 UTC time.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let s = secs % 86400;
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// Writes the image as a VM disk: an ext4 filesystem (made without mounting,
/// `mkfs.ext4 -d`) in a qcow2 file at `dest`; when the image has a kernel in
/// `/boot`, `DEST.vmlinuz` and `DEST.initrd` beside it. Returns the kernel
/// files written.
pub fn export_disk(image: &BakedImage, dest: &Path, clamp: u64) -> io::Result<Vec<PathBuf>> {
    write_disk(&image.layers, dest, clamp, 128)?;
    let mut kernel_files = Vec::new();
    if let Some(k) = kernel_in(&image.layers) {
        let initrd = format!("boot/initrd.img-{}", k.version);
        for (src, ext) in [
            (Some(k.path), "vmlinuz"),
            (layer_file(&image.layers, &initrd), "initrd"),
        ] {
            if let Some(src) = src {
                let to = PathBuf::from(format!("{}.{ext}", dest.display()));
                fs::copy(&src, &to)?;
                kernel_files.push(to);
            }
        }
    }
    Ok(kernel_files)
}

/// Writes the merged layers as an ext4 filesystem with `free_mib` MiB to
/// spare (and a quarter of the contents' size), in a qcow2 file at `dest`.
/// The file appears only when complete.
pub fn write_disk(layers: &[PathBuf], dest: &Path, clamp: u64, free_mib: u64) -> io::Result<()> {
    let work = dest.with_extension("disk-tmp");
    let _ = fs::remove_dir_all(&work);
    let root = work.join("root");
    fs::create_dir_all(&root)?;
    let res = (|| {
        let flat = work.join("rootfs.tar");
        write_flat(layers, io::BufWriter::new(File::create(&flat)?), clamp)?.flush()?;
        let rootfs = io::BufReader::new(File::open(&flat)?);
        crate::unpack::unpack(rootfs, &root, crate::unpack::Source::Slate)
            .map_err(io::Error::other)?;
        fs::remove_file(&flat)?;
        let used = crate::store::slate_size(&root);
        let mib = (used + used / 4) / (1 << 20) + free_mib;
        let raw = work.join("disk.raw");
        run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "slate-root"])
                // Inode tables and journal are not zeroed now (a sparse file
                // reads as zeroes anyway), so free space costs nothing.
                .args(["-E", "lazy_itable_init=1,lazy_journal_init=1", "-d"])
                .arg(&root)
                .arg(&raw)
                .arg(format!("{mib}M")),
            "mkfs.ext4 (e2fsprogs)",
        )?;
        let tmp = work.join("disk.qcow2");
        run(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(&tmp),
            "qemu-img (qemu-utils)",
        )?;
        fs::rename(&tmp, dest)
    })();
    let _ = fs::remove_dir_all(&work);
    res
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
        if let Ok(m) = fs::symlink_metadata(&p) {
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
        if let Ok(rd) = fs::read_dir(l.join("boot")) {
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

fn run(cmd: &mut Command, what: &str) -> io::Result<()> {
    let out = cmd
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {what}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
