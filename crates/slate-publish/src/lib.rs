//! Publishing a run: every artifact, its provenance, `SHA256SUMS` and
//! `manifest.json` go under `PREFIX/<run-id>/` at a `file://` or `s3://`
//! destination, then `PREFIX/latest` names the run.
//!
//! Readers never see half a run: the artifacts and provenance go first (in
//! parallel, large files in parts), then `SHA256SUMS`, then the manifest, then
//! the `latest` pointer; whoever sees a manifest sees every file it names.
//! Publishing again is cheap: an object already there with the same sha256
//! (kept as `x-amz-meta-sha256` on S3, hashed on the spot for files) is not
//! sent again.

mod dest;
pub mod layers;

pub use dest::{Destination, DestinationError};

use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{
    Attribute, Attributes, GetOptions, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload,
    WriteMultipart,
};
use sha2::{Digest, Sha256};
use slate_layers::hash::hex;
use slate_store::artifacts::{Manifest, MANIFEST, PROVENANCE, SUMS};
use slate_store::dsse::ENVELOPE;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::AsyncReadExt;

/// Files at least this big go up in parts.
pub const MULTIPART_THRESHOLD: u64 = 16 << 20;
/// The size of one part of a multipart upload.
const PART_SIZE: usize = 8 << 20;
/// Parts of one file in flight at once.
const PARTS_IN_FLIGHT: usize = 4;
/// The metadata key that holds an object's sha256.
const SHA_KEY: &str = "sha256";
/// The pointer to the newest published run, under the prefix.
pub const LATEST: &str = "latest";

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("no artifacts to publish: `{}` is missing", path.display())]
    NoManifest {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{}` is not a manifest slate wrote", path.display())]
    BadManifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the artifacts folder holds run `{found}`, not run `{wanted}`")]
    OtherRun { wanted: String, found: String },
    #[error("cannot read `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`{path}` changed after the build: its sha256 is {actual}, the manifest says {expected}"
    )]
    Changed {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("cannot {op} `{url}`")]
    Remote {
        op: &'static str,
        url: String,
        #[source]
        source: RemoteError,
    },
    #[error("cannot start the upload runtime")]
    Runtime(#[source] std::io::Error),
}

/// A storage error with every credential scrubbed from its text.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    pub message: String,
    pub kind: RemoteErrorKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteErrorKind {
    /// The server refused the credentials or the key may not write there.
    Denied,
    /// The bucket or prefix does not exist.
    NotFound,
    /// Anything else: network, server errors after retries.
    Other,
}

impl PublishError {
    /// The hint a user can act on.
    pub fn hint(&self) -> Option<String> {
        match self {
            PublishError::NoManifest { .. } => Some("run `slate build` first".into()),
            PublishError::OtherRun { found, .. } => Some(format!(
                "only the newest build's artifacts are kept; publish it with `slate publish --run {found}`, or rebuild"
            )),
            PublishError::Changed { .. } => {
                Some("rebuild with `slate build` so that the artifacts match their record".into())
            }
            PublishError::Remote { source, .. } => Some(match source.kind {
                RemoteErrorKind::Denied => "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the AWS_PROFILE in ~/.aws/credentials), and that the key may write to the bucket; nothing of this run was made visible".into(),
                RemoteErrorKind::NotFound => "check that the bucket exists; nothing of this run was made visible".into(),
                RemoteErrorKind::Other => "check that the destination is reachable (AWS_ENDPOINT_URL or --endpoint for S3-compatible servers), then run `slate publish` again: what is already there is not sent twice".into(),
            }),
            _ => None,
        }
    }

    /// Whether the destination (not the local run) is at fault.
    pub fn is_remote(&self) -> bool {
        matches!(self, PublishError::Remote { .. } | PublishError::Runtime(_))
    }
}

/// What happened to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOutcome {
    Sent {
        bytes: u64,
        parts: usize,
    },
    /// Already there with the same sha256.
    Skipped {
        bytes: u64,
    },
}

/// Progress, drawn by the caller.
pub trait PublishReporter: Send + Sync {
    fn file_done(&self, key: &str, outcome: FileOutcome);
}

impl PublishReporter for () {
    fn file_done(&self, _: &str, _: FileOutcome) {}
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub run_id: String,
    /// Where the run now is, e.g. `s3://bucket/releases/<run-id>/`.
    pub location: String,
    pub files_sent: usize,
    pub bytes_sent: u64,
    pub files_skipped: usize,
    pub bytes_skipped: u64,
}

#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Files uploaded at once.
    pub jobs: usize,
    /// Publish only if the artifacts folder holds this run.
    pub run_id: Option<String>,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            jobs: 8,
            run_id: None,
        }
    }
}

/// One file to publish: its path relative to the artifacts folder, and the
/// sha256 the manifest records (none for provenance and the indexes).
#[derive(Debug, Clone)]
struct Item {
    rel: String,
    expected: Option<String>,
}

/// Reads the run in `artifacts` and lists what to publish, in order: the
/// body (artifacts, provenance), then `SHA256SUMS`, then `manifest.json`.
fn read_run(artifacts: &Path, wanted: Option<&str>) -> Result<(String, Vec<Item>), PublishError> {
    let path = artifacts.join(MANIFEST);
    let text = fs_err::read(&path).map_err(|source| PublishError::NoManifest {
        path: path.clone(),
        source,
    })?;
    let m: Manifest = serde_json::from_slice(&text)
        .map_err(|source| PublishError::BadManifest { path, source })?;
    if let Some(w) = wanted {
        if w != m.run_id {
            return Err(PublishError::OtherRun {
                wanted: w.to_string(),
                found: m.run_id,
            });
        }
    }
    let mut items = Vec::new();
    for t in m.targets.iter().filter(|t| t.status == "succeeded") {
        for a in &t.artifacts {
            items.push(Item {
                rel: a.path.clone(),
                expected: Some(a.sha256.clone()),
            });
        }
        for name in [PROVENANCE, ENVELOPE] {
            let rel = format!("{}/{name}", t.name);
            if artifacts.join(&rel).is_file() {
                items.push(Item {
                    rel,
                    expected: None,
                });
            }
        }
    }
    for rel in [SUMS, MANIFEST] {
        items.push(Item {
            rel: rel.into(),
            expected: None,
        });
    }
    Ok((m.run_id, items))
}

/// Publishes the run held in the folder `artifacts` to `dest`.
pub fn publish(
    artifacts: &Path,
    dest: &Destination,
    opts: &PublishOptions,
    reporter: &dyn PublishReporter,
) -> Result<Summary, PublishError> {
    let (run_id, items) = read_run(artifacts, opts.run_id.as_deref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.jobs.clamp(1, 4))
        .enable_all()
        .build()
        .map_err(PublishError::Runtime)?;
    let publisher = Publisher {
        dest,
        artifacts,
        run_id: &run_id,
        sent: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
        files_sent: AtomicU64::new(0),
        files_skipped: AtomicU64::new(0),
        reporter,
    };
    let (body, indexes) = items.split_at(items.len() - 2);
    rt.block_on(async {
        stream::iter(body.iter().map(|i| publisher.one(i)))
            .buffer_unordered(opts.jobs.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        // In order, so that a reader who sees the manifest sees every file.
        for i in indexes {
            publisher.one(i).await?;
        }
        publisher.latest().await
    })?;
    let summary = Summary {
        location: dest.display_key(&run_id, ""),
        run_id: run_id.clone(),
        files_sent: publisher.files_sent.load(Ordering::Relaxed) as usize,
        bytes_sent: publisher.sent.load(Ordering::Relaxed),
        files_skipped: publisher.files_skipped.load(Ordering::Relaxed) as usize,
        bytes_skipped: publisher.skipped.load(Ordering::Relaxed),
    };
    Ok(summary)
}

struct Publisher<'a> {
    dest: &'a Destination,
    artifacts: &'a Path,
    run_id: &'a str,
    sent: AtomicU64,
    skipped: AtomicU64,
    files_sent: AtomicU64,
    files_skipped: AtomicU64,
    reporter: &'a dyn PublishReporter,
}

impl Publisher<'_> {
    fn remote(&self, op: &'static str, key: &ObjPath, e: object_store::Error) -> PublishError {
        remote(self.dest, op, key, e)
    }

    async fn one(&self, item: &Item) -> Result<(), PublishError> {
        let local = self.artifacts.join(&item.rel);
        let (sha, size) = sha256_file(local.clone()).await?;
        if let Some(expected) = &item.expected {
            if *expected != sha {
                return Err(PublishError::Changed {
                    path: item.rel.clone(),
                    expected: expected.clone(),
                    actual: sha,
                });
            }
        }
        let key = self.dest.key(self.run_id, &item.rel);
        let outcome = if self.already_there(&key, &sha, size).await? {
            self.skipped.fetch_add(size, Ordering::Relaxed);
            self.files_skipped.fetch_add(1, Ordering::Relaxed);
            FileOutcome::Skipped { bytes: size }
        } else {
            let parts = upload(self.dest, &key, &local, &sha, size).await?;
            self.sent.fetch_add(size, Ordering::Relaxed);
            self.files_sent.fetch_add(1, Ordering::Relaxed);
            FileOutcome::Sent { bytes: size, parts }
        };
        self.reporter
            .file_done(&self.dest.display_key(self.run_id, &item.rel), outcome);
        Ok(())
    }

    /// Whether `key` already holds a file with this sha256.
    async fn already_there(
        &self,
        key: &ObjPath,
        sha: &str,
        size: u64,
    ) -> Result<bool, PublishError> {
        let store = self.dest.store();
        let head = GetOptions {
            head: true,
            ..Default::default()
        };
        let found = match store.get_opts(key, head).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(self.remote("look up", key, e)),
        };
        if found.meta.size != size {
            return Ok(false);
        }
        if let Some(v) = found.attributes.get(&Attribute::Metadata(SHA_KEY.into())) {
            return Ok(v.as_ref() == sha);
        }
        // No recorded checksum (a file:// destination, or an object someone
        // else put there): hash what is there.
        let got = store
            .get(key)
            .await
            .map_err(|e| self.remote("read", key, e))?;
        let mut h = Sha256::new();
        let mut body = got.into_stream();
        while let Some(chunk) = body.next().await {
            h.update(chunk.map_err(|e| self.remote("read", key, e))?);
        }
        Ok(hex(&h.finalize()) == sha)
    }

    /// Points `PREFIX/latest` at this run (its id and a newline).
    async fn latest(&self) -> Result<(), PublishError> {
        let key = self.dest.prefix_key(LATEST);
        self.dest
            .store()
            .put(&key, PutPayload::from(format!("{}\n", self.run_id)))
            .await
            .map_err(|e| self.remote("update", &key, e))?;
        Ok(())
    }
}

async fn sha256_file(path: PathBuf) -> Result<(String, u64), PublishError> {
    let p = path.clone();
    tokio::task::spawn_blocking(move || slate_layers::hash::sha256_file(&p))
        .await
        .map_err(|e| PublishError::Read {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?
        .map_err(|source| PublishError::Read { path, source })
}

#[cfg(test)]
mod tests;

/// Sends one file to `dest` under `key`, its sha256 kept as metadata where
/// the store keeps any; returns the number of parts (1 for a plain put).
pub(crate) async fn upload(
    dest: &Destination,
    key: &ObjPath,
    local: &Path,
    sha: &str,
    size: u64,
) -> Result<usize, PublishError> {
    let store = dest.store();
    let mut attributes = Attributes::new();
    if dest.keeps_metadata() {
        attributes.insert(Attribute::Metadata(SHA_KEY.into()), sha.to_string().into());
    }
    let opts = PutOptions {
        attributes: attributes.clone(),
        ..Default::default()
    };
    let read = |source| PublishError::Read {
        path: local.to_path_buf(),
        source,
    };
    if size < MULTIPART_THRESHOLD {
        let data = tokio::fs::read(local).await.map_err(read)?;
        store
            .put_opts(key, PutPayload::from(data), opts)
            .await
            .map_err(|e| remote(dest, "upload", key, e))?;
        return Ok(1);
    }
    let upload = store
        .put_multipart_opts(
            key,
            PutMultipartOptions {
                attributes,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| remote(dest, "start a multipart upload of", key, e))?;
    let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    let mut f = tokio::fs::File::open(local).await.map_err(read)?;
    let mut buf = vec![0u8; 1 << 20];
    let res: Result<(), PublishError> = async {
        loop {
            let n = f.read(&mut buf).await.map_err(read)?;
            if n == 0 {
                return Ok(());
            }
            w.wait_for_capacity(PARTS_IN_FLIGHT)
                .await
                .map_err(|e| remote(dest, "upload a part of", key, e))?;
            w.write(&buf[..n]);
        }
    }
    .await;
    if let Err(e) = res {
        let _ = w.abort().await;
        return Err(e);
    }
    w.finish()
        .await
        .map_err(|e| remote(dest, "complete the multipart upload of", key, e))?;
    Ok(size.div_ceil(PART_SIZE as u64) as usize)
}

/// A storage error on `key` of `dest`, as the user sees it.
pub(crate) fn remote(
    dest: &Destination,
    op: &'static str,
    key: &ObjPath,
    e: object_store::Error,
) -> PublishError {
    PublishError::Remote {
        op,
        url: dest.url_of(key),
        source: dest.scrub(e),
    }
}
