//! A layer cache shared by machines (`slate bake --cache-to/--cache-from`,
//! `[settings] layer_cache`): each baked layer under its content key as
//! `layers/<key>.tar` (GNU tar of the layer folder) and, written last, as
//! the mark that the layer is whole, `layers/<key>.json` with the tar's
//! sha256 and size. A machine that lacks a layer fetches it and checks the
//! tar against that sha256 before using it.

use crate::{remote, upload, Destination, PublishError};
use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use slate_layers::hash::hex;
use std::io::Write;
use std::path::Path;

/// What the cache says a layer's tar is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    pub sha256: String,
    pub size: u64,
}

pub struct LayerCache {
    dest: Destination,
    rt: tokio::runtime::Runtime,
}

/// Why a layer could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Remote(#[from] PublishError),
    #[error(
        "its tar has sha256 {got}, the cache's record says {want}: it was changed or cut short"
    )]
    Corrupt { want: String, got: String },
    #[error("the cache's record of layer {key} is not valid: {why}")]
    Record { key: String, why: String },
    #[error("cannot write `{path}`")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl LayerCache {
    pub fn new(dest: Destination) -> Result<LayerCache, PublishError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(PublishError::Runtime)?;
        Ok(LayerCache { dest, rt })
    }

    pub fn url(&self) -> String {
        self.dest.to_string()
    }

    fn key(&self, key: &str, ext: &str) -> ObjPath {
        self.dest.prefix_key(&format!("layers/{key}.{ext}"))
    }

    /// The cache's record of layer `key`, if it holds the layer whole.
    pub fn entry(&self, key: &str) -> Result<Option<Entry>, FetchError> {
        let path = self.key(key, "json");
        self.rt.block_on(async {
            let got = match self.dest.store().get(&path).await {
                Ok(g) => g,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(remote(&self.dest, "read", &path, e).into()),
            };
            let bytes = got
                .bytes()
                .await
                .map_err(|e| remote(&self.dest, "read", &path, e))?;
            let entry: Entry = serde_json::from_slice(&bytes).map_err(|e| FetchError::Record {
                key: key.into(),
                why: e.to_string(),
            })?;
            if entry.key != key || entry.sha256.len() != 64 {
                return Err(FetchError::Record {
                    key: key.into(),
                    why: "it names another layer or no sha256".into(),
                });
            }
            Ok(Some(entry))
        })
    }

    /// Sends the tar of layer `key` (with its sha256 and size), then the
    /// record that makes it visible.
    pub fn push(&self, key: &str, tar: &Path, sha256: &str, size: u64) -> Result<(), PublishError> {
        let tar_key = self.key(key, "tar");
        let json_key = self.key(key, "json");
        let entry = Entry {
            key: key.into(),
            sha256: sha256.into(),
            size,
        };
        self.rt.block_on(async {
            upload(&self.dest, &tar_key, tar, sha256, size).await?;
            let json = serde_json::to_vec(&entry).expect("an entry serializes");
            self.dest
                .store()
                .put(&json_key, PutPayload::from(json))
                .await
                .map_err(|e| remote(&self.dest, "upload", &json_key, e))?;
            Ok(())
        })
    }

    /// Fetches layer `key`'s tar into `to`, checked against the cache's
    /// record: `None` when the cache does not hold the layer.
    pub fn fetch(&self, key: &str, to: &Path) -> Result<Option<Entry>, FetchError> {
        let Some(entry) = self.entry(key)? else {
            return Ok(None);
        };
        let path = self.key(key, "tar");
        let write = |source| FetchError::Write {
            path: to.to_path_buf(),
            source,
        };
        let got = self.rt.block_on(async {
            let mut file = std::io::BufWriter::new(fs_err::File::create(to).map_err(write)?);
            let mut h = Sha256::new();
            let mut n = 0u64;
            let res = self
                .dest
                .store()
                .get(&path)
                .await
                .map_err(|e| remote(&self.dest, "read", &path, e))?;
            let mut stream = res.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| remote(&self.dest, "read", &path, e))?;
                // Never more than the record says: a cache cannot fill the disk.
                n += chunk.len() as u64;
                if n > entry.size {
                    break;
                }
                h.update(&chunk);
                file.write_all(&chunk).map_err(write)?;
            }
            file.flush().map_err(write)?;
            Ok::<_, FetchError>(if n == entry.size {
                hex(&h.finalize())
            } else {
                format!("(of {n} bytes, not {})", entry.size)
            })
        })?;
        if got != entry.sha256 {
            return Err(FetchError::Corrupt {
                want: entry.sha256,
                got,
            });
        }
        Ok(Some(entry))
    }
}
