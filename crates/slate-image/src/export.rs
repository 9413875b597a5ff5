//! Exports of baked images: an OCI image (layout folder or archive) whose
//! layers are the slate layers as OCI tar diffs, or one flat rootfs tarball.
//!
//! Output is deterministic: entries sorted by path, owners numeric, mtimes
//! clamped to `SOURCE_DATE_EPOCH` (0 when unset), layers uncompressed, JSON
//! with sorted keys — the same layers always give the same digests.

use serde_json::json;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::{BakedImage, ImagePlan};
use slate_layers::disk::write_disk;
use slate_layers::hash::HashingWriter;
pub use slate_layers::tree::clamp_from_env;
use slate_layers::tree::{kernel_in, layer_file, walk, write_flat, write_layer_diff, TarWriter};

/// A blob written into `blobs/sha256/`: (digest "sha256:…", size).
fn write_blob(
    layout: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<(String, u64)> {
    let dir = layout.join("blobs/sha256");
    fs_err::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".tmp-{}", std::process::id()));
    let mut w = HashingWriter::new(io::BufWriter::new(File::create(&tmp)?));
    write(&mut w)?;
    w.flush()?;
    let size = w.size;
    let digest = w.hex();
    fs_err::rename(&tmp, dir.join(&digest))?;
    Ok((format!("sha256:{digest}"), size))
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
    let _ = fs_err::remove_dir_all(&layout);
    fs_err::create_dir_all(&layout)?;
    let mut layers = Vec::new();
    for fs_dir in &image.layers {
        let (digest, size) =
            write_blob(&layout, |w| write_layer_diff(fs_dir, w, clamp).map(|_| ()))?;
        layers.push((digest, size));
    }
    let created = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(clamp),
    )
    .to_string();
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
    fs_err::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    fs_err::write(
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
        fs_err::rename(&tmp, dest)?;
        fs_err::remove_dir_all(&layout)?;
    }
    Ok(manifest_digest)
}

/// Writes the image as one flat rootfs tarball at `dest`.
pub fn export_tar(image: &BakedImage, dest: &Path, clamp: u64) -> io::Result<()> {
    let tmp = dest.with_extension("tmp");
    let f = io::BufWriter::new(File::create(&tmp)?);
    write_flat(&image.layers, f, clamp)?.flush()?;
    fs_err::rename(&tmp, dest)
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
                fs_err::copy(&src, &to)?;
                kernel_files.push(to);
            }
        }
    }
    Ok(kernel_files)
}

/// The formats `slate bake --export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// An OCI image: a layout folder, or an archive when the path ends in `.tar`.
    Oci,
    /// The merged tree as one tarball.
    Tar,
    /// ext4 in qcow2, with the kernel and initrd beside it when there is one.
    Disk,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "oci" => Some(Format::Oci),
            "tar" => Some(Format::Tar),
            "disk" => Some(Format::Disk),
            _ => None,
        }
    }
}

/// What an export wrote.
#[derive(Debug)]
pub enum Exported {
    Oci {
        digest: String,
    },
    Tar,
    /// The kernel files written beside the disk (none: the image has no kernel).
    Disk {
        kernel_files: Vec<PathBuf>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Plan(#[from] crate::ImageError),
    #[error("cannot write `{path}`")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image `{image}` is marked `vm = true` but has no kernel in /boot")]
    NoKernel { image: String },
    #[error("cannot stage the image for pushing")]
    Stage(#[source] io::Error),
    #[error("cannot push to `{reference}`")]
    Push {
        reference: String,
        #[source]
        source: crate::registry::RegistryError,
    },
}

/// The baked image `name` of `project`, as the store holds it, with its plan.
fn baked(
    project: &slate_config::Project,
    store: &crate::LayerStore,
    name: &str,
) -> Result<(ImagePlan, BakedImage, Option<String>), ExportError> {
    let plan = crate::plan::plan_cached(project, name, store)?;
    let image = BakedImage::from_store(&plan, store);
    let arch = project
        .image(name)
        .and_then(|i| i.arch())
        .map(str::to_string);
    Ok((plan, image, arch))
}

/// Writes the baked image `name` to `dest` in `format`, mtimes clamped to
/// `SOURCE_DATE_EPOCH`.
pub fn export_image(
    project: &slate_config::Project,
    store: &crate::LayerStore,
    name: &str,
    format: Format,
    dest: &Path,
) -> Result<Exported, ExportError> {
    let (plan, image, arch) = baked(project, store, name)?;
    let clamp = clamp_from_env();
    let write = |source| ExportError::Write {
        path: dest.to_path_buf(),
        source,
    };
    match format {
        Format::Oci => Ok(Exported::Oci {
            digest: export_oci(&plan, &image, arch.as_deref(), dest, clamp).map_err(write)?,
        }),
        Format::Tar => {
            export_tar(&image, dest, clamp).map_err(write)?;
            Ok(Exported::Tar)
        }
        Format::Disk => {
            let kernel_files = export_disk(&image, dest, clamp).map_err(write)?;
            if kernel_files.is_empty() && project.image(name).is_some_and(|i| i.vm) {
                return Err(ExportError::NoKernel { image: name.into() });
            }
            Ok(Exported::Disk { kernel_files })
        }
    }
}

/// Writes the baked image `name`, which must have a kernel (`vm = true`),
/// as a raw ext4 disk at `dest` with `free_mib` MiB to spare; its digest.
pub fn export_raw_disk(
    project: &slate_config::Project,
    store: &crate::LayerStore,
    name: &str,
    dest: &Path,
    free_mib: u64,
) -> Result<String, ExportError> {
    let (plan, image, _) = baked(project, store, name)?;
    if kernel_in(&image.layers).is_none() {
        return Err(ExportError::NoKernel { image: name.into() });
    }
    slate_layers::disk::write_raw_disk(&image.layers, dest, clamp_from_env(), free_mib).map_err(
        |source| ExportError::Write {
            path: dest.to_path_buf(),
            source,
        },
    )?;
    Ok(plan.digest().to_string())
}

/// What a push sent: the manifest's digest, bytes sent, bytes the registry
/// already had.
pub struct Pushed {
    pub digest: String,
    pub sent: u64,
    pub skipped: u64,
}

/// Pushes the baked image `name` to `reference`, through an OCI layout
/// staged in the cache (removed afterwards).
pub fn push_image(
    project: &slate_config::Project,
    store: &crate::LayerStore,
    name: &str,
    reference: &crate::registry::Reference,
    insecure: bool,
) -> Result<Pushed, ExportError> {
    let (plan, image, arch) = baked(project, store, name)?;
    let layout = store
        .staging(&format!("push-{}", plan.digest()))
        .map_err(ExportError::Stage)?;
    let oci = layout.join("oci");
    let res = export_oci(&plan, &image, arch.as_deref(), &oci, clamp_from_env())
        .map_err(ExportError::Stage)
        .and_then(|_| {
            crate::registry::Client::new(reference, insecure)
                .push_layout(&oci)
                .map_err(|source| ExportError::Push {
                    reference: reference.to_string(),
                    source,
                })
        });
    let _ = fs_err::remove_dir_all(&layout);
    let (digest, sent, skipped) = res?;
    Ok(Pushed {
        digest,
        sent,
        skipped,
    })
}
