//! A stack of layers as a VM disk: ext4 made without mounting
//! (`mkfs.ext4 -d`), in a qcow2 file.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Writes the merged layers as an ext4 filesystem with `free_mib` MiB to
/// spare (and a quarter of the contents' size), in a qcow2 file at `dest`.
/// The file appears only when complete.
pub fn write_disk(layers: &[PathBuf], dest: &Path, clamp: u64, free_mib: u64) -> io::Result<()> {
    write_disk_as(layers, dest, clamp, free_mib, true)
}

/// As [`write_disk`], the filesystem as a raw (sparse) file: what a cloud's
/// volume snapshot takes.
pub fn write_raw_disk(
    layers: &[PathBuf],
    dest: &Path,
    clamp: u64,
    free_mib: u64,
) -> io::Result<()> {
    write_disk_as(layers, dest, clamp, free_mib, false)
}

fn write_disk_as(
    layers: &[PathBuf],
    dest: &Path,
    clamp: u64,
    free_mib: u64,
    qcow2: bool,
) -> io::Result<()> {
    let work = dest.with_extension("disk-tmp");
    let _ = fs_err::remove_dir_all(&work);
    let root = work.join("root");
    fs_err::create_dir_all(&root)?;
    let res = (|| {
        let flat = work.join("rootfs.tar");
        crate::tree::write_flat(layers, io::BufWriter::new(File::create(&flat)?), clamp)?
            .flush()?;
        let rootfs = io::BufReader::new(File::open(&flat)?);
        crate::unpack::unpack(rootfs, &root, crate::unpack::Source::Slate)
            .map_err(io::Error::other)?;
        fs_err::remove_file(&flat)?;
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
        if !qcow2 {
            return fs_err::rename(&raw, dest);
        }
        let tmp = work.join("disk.qcow2");
        run(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(&tmp),
            "qemu-img (qemu-utils)",
        )?;
        fs_err::rename(&tmp, dest)
    })();
    let _ = fs_err::remove_dir_all(&work);
    res
}

/// Runs a tool to its end: an error naming `what` when it cannot start or
/// fails, with what it said on stderr.
pub fn run(cmd: &mut Command, what: &str) -> io::Result<()> {
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
