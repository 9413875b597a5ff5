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

    /// Layer `key`'s tar as a stream, read as it arrives: its end fails
    /// (`InvalidData`) unless what came has the size and sha256 the cache's
    /// record names, and it never gives more than that size. `None` when
    /// the cache does not hold the layer.
    pub fn reader(&self, key: &str) -> Result<Option<LayerReader>, FetchError> {
        let Some(entry) = self.entry(key)? else {
            return Ok(None);
        };
        let path = self.key(key, "tar");
        let res = self
            .rt
            .block_on(self.dest.store().get(&path))
            .map_err(|e| remote(&self.dest, "read", &path, e))?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<u8>, String>>(16);
        let url = self.dest.url_of(&path);
        self.rt.spawn(async move {
            let mut stream = res.into_stream();
            while let Some(chunk) = stream.next().await {
                let item = chunk
                    .map(|c| c.to_vec())
                    .map_err(|e| format!("reading {url}: {e}"));
                let failed = item.is_err();
                if tx.send(item).is_err() || failed {
                    return;
                }
            }
        });
        Ok(Some(LayerReader {
            rx,
            cur: Vec::new(),
            at: 0,
            hasher: Sha256::new(),
            n: 0,
            entry,
            ended: false,
        }))
    }
}

/// A layer's tar as it arrives, checked at its end.
pub struct LayerReader {
    rx: std::sync::mpsc::Receiver<Result<Vec<u8>, String>>,
    cur: Vec<u8>,
    at: usize,
    hasher: Sha256,
    n: u64,
    entry: Entry,
    ended: bool,
}

impl LayerReader {
    pub fn entry(&self) -> &Entry {
        &self.entry
    }
}

impl std::io::Read for LayerReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::{Error, ErrorKind};
        loop {
            if self.at < self.cur.len() {
                let k = buf.len().min(self.cur.len() - self.at);
                buf[..k].copy_from_slice(&self.cur[self.at..self.at + k]);
                self.at += k;
                return Ok(k);
            }
            if self.ended {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.n += chunk.len() as u64;
                    if self.n > self.entry.size {
                        return Err(Error::new(
                            ErrorKind::InvalidData,
                            format!(
                                "its tar is longer than the {} bytes the cache's record says",
                                self.entry.size
                            ),
                        ));
                    }
                    self.hasher.update(&chunk);
                    self.cur = chunk;
                    self.at = 0;
                }
                Ok(Err(why)) => return Err(Error::other(why)),
                Err(_) => {
                    self.ended = true;
                    let got = hex(&std::mem::take(&mut self.hasher).finalize());
                    if self.n != self.entry.size || got != self.entry.sha256 {
                        return Err(Error::new(
                            ErrorKind::InvalidData,
                            format!(
                                "its tar has sha256 {got} ({} bytes), the cache's record says {} ({} bytes): it was changed or cut short",
                                self.n, self.entry.sha256, self.entry.size
                            ),
                        ));
                    }
                    return Ok(0);
                }
            }
        }
    }
}
