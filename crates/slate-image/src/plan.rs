//! A recipe → an ordered list of layers, each keyed by a digest of its parent
//! and its own content, so an unchanged prefix is reused and a change reruns
//! from the changed layer on.

use crate::ImageError;
use slate_config::{BaseSpec, ImageSpec, Project};
use std::path::{Path, PathBuf};

/// Bumped when the meaning of a layer changes, so old layers are not reused.
const FORMAT: &str = "slate-layer-v1";

#[derive(Debug, Clone, PartialEq)]
pub enum LayerKind {
    Debian {
        suite: String,
        mirror: Option<String>,
        variant: String,
        arch: Option<String>,
    },
    Tar {
        path: PathBuf,
    },
    Oci {
        reference: String,
        insecure: bool,
    },
    Packages(Vec<String>),
    Files(Vec<(PathBuf, String)>),
    Step {
        command: String,
        env: Vec<(String, String)>,
    },
}

#[derive(Debug, Clone)]
pub struct LayerPlan {
    pub key: String,
    pub parent: Option<String>,
    pub kind: LayerKind,
    /// Which image of the project the layer belongs to.
    pub image: String,
}

impl LayerPlan {
    pub fn describe(&self) -> String {
        match &self.kind {
            LayerKind::Debian {
                suite,
                variant,
                arch,
                ..
            } => {
                format!(
                    "bootstrap debian:{suite} ({variant}{})",
                    arch.as_ref().map(|a| format!(", {a}")).unwrap_or_default()
                )
            }
            LayerKind::Tar { path } => format!("unpack {}", path.display()),
            LayerKind::Oci { reference, .. } => format!("pull {reference}"),
            LayerKind::Packages(p) => format!("apt-get install {}", p.join(" ")),
            LayerKind::Files(f) => format!("copy {} file(s)", f.len()),
            LayerKind::Step { command, .. } => format!("run: {command}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ImagePlan {
    pub name: String,
    pub layers: Vec<LayerPlan>,
    pub env: Vec<(String, String)>,
}

impl ImagePlan {
    /// The image's digest: the key of its top layer.
    pub fn digest(&self) -> &str {
        &self
            .layers
            .last()
            .expect("an image has at least one layer")
            .key
    }
}

pub use slate_layers::hash::{hash, hex};

/// The sha256 of a file, remembered in `digests` (when given), keyed by
/// path, size, mtime and inode, so a large `tar:` base is not hashed again
/// on every run.
pub fn file_digest(path: &Path, digests: Option<&Path>) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = fs_err::metadata(path)?;
    let id = format!(
        "{}\n{}\n{}\n{}\n{}",
        path.display(),
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ino()
    );
    let slot = digests.map(|d| d.join(hash(&[id.as_bytes()])));
    // Only a whole digest counts: anything else (a slot another slate is
    // writing, a damaged one) is recomputed.
    let cached = slot.as_ref().and_then(|s| fs_err::read_to_string(s).ok());
    if let Some(cached) = cached.filter(|c| is_sha256_hex(c)) {
        return Ok(cached);
    }
    let (d, _) = slate_layers::hash::sha256_file(path)?;
    if let Some(s) = slot {
        // Written aside and renamed, so a reader sees all of it or none.
        let tmp = s.with_extension(format!("{}.tmp", std::process::id()));
        if fs_err::write(&tmp, &d).is_ok() && fs_err::rename(&tmp, &s).is_err() {
            let _ = fs_err::remove_file(&tmp);
        }
    }
    Ok(d)
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Plans `name` and, through `image:` bases, the images below it, hashing
/// every file it reads.
pub fn plan(project: &Project, name: &str) -> Result<ImagePlan, ImageError> {
    plan_inner(project, name, 0, None)
}

/// As [`plan`], with file digests remembered in `store`'s cache.
pub fn plan_cached(
    project: &Project,
    name: &str,
    store: &crate::LayerStore,
) -> Result<ImagePlan, ImageError> {
    let digests = store.root().join("digests");
    let _ = fs_err::create_dir_all(&digests);
    plan_inner(project, name, 0, Some(&digests))
}

fn plan_inner(
    project: &Project,
    name: &str,
    depth: usize,
    digests: Option<&Path>,
) -> Result<ImagePlan, ImageError> {
    let spec: &ImageSpec = project.image(name).ok_or_else(|| ImageError::Unknown {
        name: name.to_string(),
    })?;
    if depth > 32 {
        return Err(ImageError::Unknown {
            name: name.to_string(),
        });
    }
    let mut plan = plan_base(project, name, &spec.base, depth, digests)?;
    set_env(&mut plan.env, &spec.env);
    let packages = packages_to_install(spec);
    if !packages.is_empty() {
        push_layer(
            &mut plan.layers,
            name,
            LayerKind::Packages(packages.clone()),
            format!("packages\n{}", packages.join("\n")),
        );
    }
    if !spec.files.is_empty() {
        let content = files_content(&spec.files, digests)?;
        push_layer(
            &mut plan.layers,
            name,
            LayerKind::Files(spec.files.clone()),
            content,
        );
    }
    for step in &spec.steps {
        let envs: String = plan.env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        push_layer(
            &mut plan.layers,
            name,
            LayerKind::Step {
                command: step.clone(),
                env: plan.env.clone(),
            },
            format!("step\n{envs}\n{step}"),
        );
    }
    Ok(plan)
}

/// Adds a layer of `image` on top of `layers`, keyed by its parent and
/// `content`.
fn push_layer(layers: &mut Vec<LayerPlan>, image: &str, kind: LayerKind, content: String) {
    let parent = layers.last().map(|l| l.key.clone());
    let key = hash(&[
        FORMAT.as_bytes(),
        parent.as_deref().unwrap_or("").as_bytes(),
        content.as_bytes(),
    ]);
    layers.push(LayerPlan {
        key,
        parent,
        kind,
        image: image.to_string(),
    });
}

/// The plan of `name` up to its base: one layer for a base of its own, or
/// all the layers and environment of an `image:` base.
fn plan_base(
    project: &Project,
    name: &str,
    base: &BaseSpec,
    depth: usize,
    digests: Option<&Path>,
) -> Result<ImagePlan, ImageError> {
    let (kind, content) = match base {
        BaseSpec::Debian {
            suite,
            mirror,
            variant,
            arch,
        } => {
            let content = format!(
                "debian\n{suite}\n{}\n{variant}\n{}",
                mirror.as_deref().unwrap_or(""),
                arch.as_deref().unwrap_or("")
            );
            let kind = LayerKind::Debian {
                suite: suite.clone(),
                mirror: mirror.clone(),
                variant: variant.clone(),
                arch: arch.clone(),
            };
            (kind, content)
        }
        BaseSpec::Tar { path } => {
            let digest = file_digest(path, digests).map_err(|source| ImageError::Read {
                path: path.clone(),
                source,
            })?;
            (
                LayerKind::Tar { path: path.clone() },
                format!("tar\n{digest}"),
            )
        }
        BaseSpec::Oci {
            reference,
            insecure,
        } => {
            // A tag is pulled once and kept; pin `@sha256:…` to be exact.
            let kind = LayerKind::Oci {
                reference: reference.clone(),
                insecure: *insecure,
            };
            (kind, format!("oci\n{reference}"))
        }
        BaseSpec::Image { name: base } => {
            let below = plan_inner(project, base, depth + 1, digests)?;
            return Ok(ImagePlan {
                name: name.to_string(),
                ..below
            });
        }
    };
    let mut layers: Vec<LayerPlan> = Vec::new();
    push_layer(&mut layers, name, kind, content);
    Ok(ImagePlan {
        name: name.to_string(),
        layers,
        env: Vec::new(),
    })
}

/// Sets `vars` in `env`: a variable already there keeps its place and takes
/// the new value.
fn set_env(env: &mut Vec<(String, String)>, vars: &[(String, String)]) {
    for (k, v) in vars {
        if let Some(e) = env.iter_mut().find(|(ek, _)| ek == k) {
            e.1 = v.clone();
        } else {
            env.push((k.clone(), v.clone()));
        }
    }
}

/// The packages to install, sorted and without repeats: the recipe's and,
/// for a vm image bootstrapped from Debian, a kernel and its initramfs tools.
fn packages_to_install(spec: &ImageSpec) -> Vec<String> {
    let mut packages = spec.packages.clone();
    if spec.vm {
        if let BaseSpec::Debian { arch, .. } = &spec.base {
            // The distro kernel (with its initramfs), for the vm provider.
            let arch = arch.as_deref().unwrap_or(crate::binfmt::host_arch());
            let flavour = match arch {
                "i386" => "686-pae".to_string(),
                "armhf" => "armmp".to_string(),
                "ppc64el" => "powerpc64le".to_string(),
                other => other.to_string(),
            };
            packages.push(format!("linux-image-{flavour}"));
            packages.push("initramfs-tools".into());
        }
    }
    packages.sort();
    packages.dedup();
    packages
}

/// What the layer of copied files is keyed by: each file's destination,
/// digest and mode.
fn files_content(
    files: &[(PathBuf, String)],
    digests: Option<&Path>,
) -> Result<String, ImageError> {
    let mut content = String::from("files\n");
    for (host, dest) in files {
        let d = file_digest(host, digests).map_err(|source| ImageError::Read {
            path: host.clone(),
            source,
        })?;
        use std::os::unix::fs::PermissionsExt;
        let mode = fs_err::metadata(host)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644);
        content.push_str(&format!("{dest}\n{d}\n{mode:o}\n"));
    }
    Ok(content)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(src: &str) -> Project {
        slate_config::load_str(std::path::Path::new("/nonexistent/slate.toml"), src).unwrap()
    }

    const BASE: &str = "[images.a]\nfrom = \"debian:bookworm\"\npackages = [\"make\"]\nsteps = [\"echo 1\", \"echo 2\"]\n";

    #[test]
    fn a_remembered_digest_that_is_not_whole_is_computed_again() {
        let dir = tempfile::tempdir().unwrap();
        let (file, digests) = (dir.path().join("base.tar"), dir.path().join("digests"));
        std::fs::create_dir(&digests).unwrap();
        std::fs::write(&file, b"hello").unwrap();
        let right = file_digest(&file, None).unwrap();
        assert_eq!(file_digest(&file, Some(&digests)).unwrap(), right);
        let slot = std::fs::read_dir(&digests)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        assert_eq!(std::fs::read_to_string(&slot).unwrap(), right);
        // As another slate's reader would see it while the slot is written.
        for seen in [
            "",
            &right[..20],
            "not a digest at all, but 64 characters long, padded to fit it..",
        ] {
            std::fs::write(&slot, seen).unwrap();
            assert_eq!(
                file_digest(&file, Some(&digests)).unwrap(),
                right,
                "slot {seen:?}"
            );
        }
        assert_eq!(
            std::fs::read_dir(&digests).unwrap().count(),
            1,
            "no temporary file is left"
        );
    }

    #[test]
    fn changing_a_step_changes_it_and_later_keys_only() {
        let p1 = plan(&project(BASE), "a").unwrap();
        let p2 = plan(&project(&BASE.replace("echo 2", "echo 3")), "a").unwrap();
        let p3 = plan(&project(&BASE.replace("echo 1", "echo 0")), "a").unwrap();
        let keys = |p: &ImagePlan| p.layers.iter().map(|l| l.key.clone()).collect::<Vec<_>>();
        let (k1, k2, k3) = (keys(&p1), keys(&p2), keys(&p3));
        assert_eq!(k1.len(), 4);
        assert_eq!(k1[..3], k2[..3]);
        assert_ne!(k1[3], k2[3]);
        assert_eq!(k1[..2], k3[..2]);
        assert_ne!(k1[2], k3[2]);
        assert_ne!(k1[3], k3[3]);
        assert_eq!(plan(&project(BASE), "a").unwrap().digest(), p1.digest());
    }

    #[test]
    fn image_bases_extend_the_chain_and_env() {
        let src = format!("{BASE}env = {{ A = \"1\" }}\n[images.b]\nfrom = \"image:a\"\nsteps = [\"echo b\"]\nenv = {{ B = \"2\" }}\n");
        let a = plan(&project(&src), "a").unwrap();
        let b = plan(&project(&src), "b").unwrap();
        assert_eq!(b.layers.len(), a.layers.len() + 1);
        assert_eq!(
            b.layers[..a.layers.len()]
                .iter()
                .map(|l| &l.key)
                .collect::<Vec<_>>(),
            a.layers.iter().map(|l| &l.key).collect::<Vec<_>>()
        );
        assert_eq!(
            b.env,
            [
                ("A".to_string(), "1".to_string()),
                ("B".to_string(), "2".to_string())
            ]
        );
    }
}
