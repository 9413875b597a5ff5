//! A layer cache shared by machines (`slate bake --cache-to/--cache-from`,
//! `[settings] layer_cache`): each baked layer under its content key as
//! `layers/<key>.tar` (GNU tar of the layer folder) and, written last, as
//! the mark that the layer is whole, `layers/<key>.json` with the tar's
//! sha256 and size. A machine that lacks a layer fetches it and checks the
//! tar against that sha256 before using it; a download that breaks is
//! taken up where it stopped (a range request), up to [`RESUMES`] times.

use crate::{remote, upload, Destination, PublishError};
use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use slate_layers::hash::hex;
use std::path::Path;

/// How many times a download that breaks is taken up again.
pub const RESUMES: u32 = 5;

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
        let store = self.dest.shared_store();
        let size = entry.size;
        self.rt.spawn(async move {
            let mut stream = res.into_stream();
            let (mut sent, mut resumes) = (0u64, 0u32);
            loop {
                let why = match stream.next().await {
                    None => return,
                    Some(Ok(chunk)) => {
                        sent += chunk.len() as u64;
                        if tx.send(Ok(chunk.to_vec())).is_err() {
                            return;
                        }
                        continue;
                    }
                    Some(Err(e)) => format!("reading {url}: {e}"),
                };
                // Broken off: take it up where it stopped, as a range.
                if sent < size && resumes < RESUMES {
                    resumes += 1;
                    let opts = GetOptions::default().with_range(Some(GetRange::Offset(sent)));
                    if let Ok(rest) = store.get_opts(&path, opts).await {
                        stream = rest.into_stream();
                        continue;
                    }
                }
                let _ = tx.send(Err(why));
                return;
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream::BoxStream;
    use object_store::local::LocalFileSystem;
    use object_store::{
        CopyOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
        PutMultipartOptions, PutOptions, PutResult,
    };
    use std::io::Read;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// A folder whose whole-object reads break off after `cut` bytes, the
    /// first `breaks` times; ranged reads are whole.
    #[derive(Debug)]
    struct Flaky {
        inner: LocalFileSystem,
        cut: usize,
        breaks: AtomicU32,
        ranged: AtomicU32,
    }

    impl std::fmt::Display for Flaky {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Flaky")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Flaky {
        async fn put_opts(
            &self,
            l: &ObjPath,
            p: PutPayload,
            o: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.inner.put_opts(l, p, o).await
        }
        async fn put_multipart_opts(
            &self,
            l: &ObjPath,
            o: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(l, o).await
        }
        async fn get_opts(&self, l: &ObjPath, o: GetOptions) -> object_store::Result<GetResult> {
            let ranged = o.range.is_some();
            let got = self.inner.get_opts(l, o).await?;
            if ranged {
                self.ranged.fetch_add(1, Ordering::SeqCst);
                return Ok(got);
            }
            if !l.as_ref().ends_with(".tar") || self.breaks.load(Ordering::SeqCst) == 0 {
                return Ok(got);
            }
            self.breaks.fetch_sub(1, Ordering::SeqCst);
            let (meta, range, attributes) =
                (got.meta.clone(), got.range.clone(), got.attributes.clone());
            let all = got.bytes().await?;
            let head = bytes::Bytes::copy_from_slice(&all[..self.cut]);
            let stream = futures::stream::iter(vec![
                Ok(head),
                Err(object_store::Error::Generic {
                    store: "Flaky",
                    source: "connection reset".into(),
                }),
            ]);
            Ok(GetResult {
                payload: GetResultPayload::Stream(stream.boxed()),
                meta,
                range,
                attributes,
                extensions: Default::default(),
            })
        }
        fn delete_stream(
            &self,
            s: BoxStream<'static, object_store::Result<ObjPath>>,
        ) -> BoxStream<'static, object_store::Result<ObjPath>> {
            self.inner.delete_stream(s)
        }
        fn list(
            &self,
            p: Option<&ObjPath>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(p)
        }
        async fn list_with_delimiter(
            &self,
            p: Option<&ObjPath>,
        ) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(p).await
        }
        async fn copy_opts(
            &self,
            f: &ObjPath,
            t: &ObjPath,
            o: CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(f, t, o).await
        }
    }

    fn cache_over(dir: &std::path::Path, breaks: u32) -> (LayerCache, Arc<Flaky>) {
        let flaky = Arc::new(Flaky {
            inner: LocalFileSystem::new_with_prefix(dir).unwrap(),
            cut: 1000,
            breaks: AtomicU32::new(breaks),
            ranged: AtomicU32::new(0),
        });
        let dest = Destination::over(flaky.clone(), "test://flaky");
        (LayerCache::new(dest).unwrap(), flaky)
    }

    const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn a_download_that_breaks_is_taken_up_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let tar = dir.path().join("src.tar");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&tar, &data).unwrap();
        let sha = hex(&Sha256::digest(&data));
        let store = dir.path().join("store");
        std::fs::create_dir(&store).unwrap();
        let (cache, flaky) = cache_over(&store, 1);
        cache.push(KEY, &tar, &sha, data.len() as u64).unwrap();
        let mut got = Vec::new();
        cache
            .reader(KEY)
            .unwrap()
            .expect("the layer is there")
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, data);
        assert_eq!(flaky.ranged.load(Ordering::SeqCst), 1, "one ranged read");
    }
}
