//! `--cache-from` / `--cache-to` (and `[settings] layer_cache`): baked
//! layers shared between machines through an S3 bucket, a folder or an OCI
//! registry.

use crate::error::{CliError, Exit};
use slate_image::layerrepo::LayerRepo;
use slate_image::{LayerSource, LayerStore};
use slate_publish::layers::LayerCache;
use std::path::Path;
use std::process::{Command, Stdio};

/// A layer cache to fetch missing layers from.
pub enum Remote {
    /// A bucket or a folder.
    Store(LayerCache),
    /// An OCI registry's repository.
    Registry(LayerRepo),
}

/// What a layer cache says a layer's tar is: sha256 and size.
type Record = (String, u64);

impl Remote {
    pub fn open(url: &str, base_dir: &Path) -> Result<Remote, CliError> {
        if url.starts_with("oci://") || url.starts_with("oci+http://") {
            return LayerRepo::parse(url).map(Remote::Registry).map_err(|e| {
                CliError::from_error(Exit::Usage, &e).hint(
                    "use oci://REGISTRY/REPOSITORY, e.g. oci://registry.example:5000/team/layers",
                )
            });
        }
        let dest = slate_publish::Destination::parse(url, base_dir, None).map_err(|e| {
            let hint = e.hint();
            let mut err = CliError::from_error(Exit::Usage, &e);
            err.hint = hint.or(Some(
                "use s3://BUCKET/PREFIX, oci://REGISTRY/REPOSITORY or file://PATH".into(),
            ));
            err
        })?;
        let cache = LayerCache::new(dest).map_err(|e| CliError::from_error(Exit::Infra, &e))?;
        Ok(Remote::Store(cache))
    }

    pub fn url(&self) -> String {
        match self {
            Remote::Store(c) => c.url(),
            Remote::Registry(r) => r.url(),
        }
    }

    /// The cache's record of layer `key`, if it holds it.
    fn entry(&self, key: &str) -> Result<Option<Record>, String> {
        match self {
            Remote::Store(c) => c
                .entry(key)
                .map(|e| e.map(|e| (e.sha256, e.size)))
                .map_err(|e| e.to_string()),
            Remote::Registry(r) => r
                .entry(key)
                .map(|e| e.map(|e| (e.sha256, e.size)))
                .map_err(|e| e.to_string()),
        }
    }

    fn send(&self, key: &str, tar: &Path, sha256: &str, size: u64) -> Result<(), String> {
        match self {
            Remote::Store(c) => c.push(key, tar, sha256, size).map_err(|e| e.to_string()),
            Remote::Registry(r) => r.push(key, tar, sha256, size).map_err(|e| e.to_string()),
        }
    }

    /// Sends the layers `keys` the cache lacks: `(sent, bytes, already
    /// there)`.
    pub fn push(&self, store: &LayerStore, keys: &[String]) -> Result<(usize, u64, usize), String> {
        let (mut sent, mut bytes, mut there) = (0, 0, 0);
        for key in keys {
            if self.entry(key)?.is_some() {
                there += 1;
                continue;
            }
            let dir = store
                .staging(&format!("push-{key}"))
                .map_err(|e| e.to_string())?;
            let tar = dir.join("layer.tar");
            let res = pack(&store.layer_dir(key), &tar).and_then(|()| {
                let (sha, size) =
                    slate_layers::hash::sha256_file(&tar).map_err(|e| e.to_string())?;
                self.send(key, &tar, &sha, size)?;
                Ok(size)
            });
            let _ = slate_layers::store::remove_tree(&dir);
            bytes += res?;
            sent += 1;
        }
        Ok((sent, bytes, there))
    }
}

/// A tar of a layer folder (its `fs` and record), as GNU tar writes what
/// an overlay layer holds.
fn pack(layer: &Path, to: &Path) -> Result<(), String> {
    let out = Command::new("tar")
        .args(slate_ssh::serve::TAR_FLAGS)
        .arg("-C")
        .arg(layer)
        .arg("-cf")
        .arg(to)
        .args(["fs", "layer.json"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run tar: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "tar of `{}` failed: {}",
            layer.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl LayerSource for Remote {
    fn fetch(&self, store: &LayerStore, key: &str) -> Result<bool, String> {
        // Unpacked as it arrives; the stream's end checks the tar against
        // the cache's record, and the layer takes its name only after that.
        let received = match self {
            Remote::Store(c) => match c.reader(key).map_err(|e| e.to_string())? {
                Some(reader) => slate_ssh::serve::receive_layer_locked(store, key, reader),
                None => return Ok(false),
            },
            Remote::Registry(r) => match r.reader(key).map_err(|e| e.to_string())? {
                Some(reader) => slate_ssh::serve::receive_layer_locked(store, key, reader),
                None => return Ok(false),
            },
        };
        received.map_err(|e| e.to_string())?;
        Ok(true)
    }
}
