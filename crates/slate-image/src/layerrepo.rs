//! A layer cache in an OCI registry (`oci://REGISTRY/REPOSITORY`, or
//! `oci+http://` for a registry without TLS off loopback): each baked layer
//! is an OCI artifact tagged with its content key. Its one layer is the
//! layer's tar (`application/vnd.slate.layer.v1.tar`, addressed by its
//! sha256 as every blob is); its config is slate's record of it
//! (`{key, sha256, size}`). A registry keeps a blob once however many tags
//! name it, and garbage-collects what no tag names.
//!
//! The registry is not trusted: the record must name the key it is tagged
//! with and the blob the manifest names; the tar is checked against its
//! digest and size as it arrives, and a download cut short resumes where it
//! stopped (`Range`), up to [`RESUMES`] times.

use crate::registry::{check_digest, Body, Client, Reference, RegistryError};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::io::{self, Read};
use std::path::Path;

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const ARTIFACT: &str = "application/vnd.slate.layer.v1";
const CONFIG: &str = "application/vnd.slate.layer.config.v1+json";
const TAR: &str = "application/vnd.slate.layer.v1.tar";
/// How many times a download cut short is taken up again.
pub const RESUMES: u32 = 5;

/// A repository of layers.
pub struct LayerRepo {
    registry: String,
    repository: String,
    insecure: bool,
}

/// What the registry says a layer's tar is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoEntry {
    pub sha256: String,
    pub size: u64,
}

impl LayerRepo {
    /// `oci://REGISTRY/REPOSITORY` or `oci+http://REGISTRY/REPOSITORY`.
    pub fn parse(url: &str) -> Result<LayerRepo, RegistryError> {
        let (rest, insecure) = match (url.strip_prefix("oci://"), url.strip_prefix("oci+http://")) {
            (Some(r), _) => (r, false),
            (_, Some(r)) => (r, true),
            _ => {
                return Err(RegistryError::BadReference {
                    reference: url.into(),
                    why: "a registry layer cache is oci://REGISTRY/REPOSITORY".into(),
                })
            }
        };
        let r = Reference::parse(&format!("{}:x", rest.trim_end_matches('/')))?;
        Ok(LayerRepo {
            registry: r.registry,
            repository: r.repository,
            insecure,
        })
    }

    pub fn url(&self) -> String {
        let scheme = if self.insecure { "oci+http" } else { "oci" };
        format!("{scheme}://{}/{}", self.registry, self.repository)
    }

    fn client(&self, tag: &str) -> Client {
        Client::new(
            &Reference {
                registry: self.registry.clone(),
                repository: self.repository.clone(),
                reference: tag.into(),
            },
            self.insecure,
        )
    }

    /// The registry's record of layer `key`, if it has one.
    pub fn entry(&self, key: &str) -> Result<Option<RepoEntry>, RegistryError> {
        check_key(key)?;
        let mut c = self.client(key);
        let (manifest, _) = match c.get_manifest(key, MANIFEST) {
            Ok(m) => m,
            Err(RegistryError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let bad = |why: &str| RegistryError::BadReference {
            reference: format!("{}:{key}", self.url()),
            why: format!("not a slate layer: {why}"),
        };
        let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
        let [layer] = layers.as_slice() else {
            return Err(bad("it has not exactly one layer"));
        };
        if layer["mediaType"] != TAR {
            return Err(bad("its layer is not a slate layer's tar"));
        }
        let digest = check_digest(layer["digest"].as_str().unwrap_or_default())?.to_string();
        let size = layer["size"]
            .as_u64()
            .ok_or_else(|| bad("its layer has no size"))?;
        if manifest["annotations"]["org.slate.layer.key"] != key {
            return Err(bad("it is tagged with a key it does not name"));
        }
        Ok(Some(RepoEntry {
            sha256: digest.trim_start_matches("sha256:").to_string(),
            size,
        }))
    }

    /// Sends the tar of layer `key` (unless the registry has that blob),
    /// its record, then the manifest tagged `key` that makes it visible.
    pub fn push(
        &self,
        key: &str,
        tar: &Path,
        sha256: &str,
        size: u64,
    ) -> Result<(), RegistryError> {
        check_key(key)?;
        let digest = format!("sha256:{sha256}");
        check_digest(&digest)?;
        let mut c = self.client(key);
        c.put_blob(&digest, Body::File(tar))?;
        let record = serde_json::to_vec(&json!({ "key": key, "sha256": sha256, "size": size }))
            .expect("a record serializes");
        let record_digest = format!("sha256:{}", crate::plan::hex(&Sha256::digest(&record)));
        c.put_blob(&record_digest, Body::Bytes(&record))?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "artifactType": ARTIFACT,
            "config": { "mediaType": CONFIG, "digest": record_digest, "size": record.len() },
            "layers": [{ "mediaType": TAR, "digest": digest, "size": size }],
            "annotations": { "org.slate.layer.key": key },
        });
        let bytes = serde_json::to_vec(&manifest).expect("a manifest serializes");
        let url = c.url(&format!("manifests/{key}"));
        c.send(
            "PUT",
            &url,
            &[("Content-Type", MANIFEST)],
            Body::Bytes(&bytes),
            true,
        )?;
        Ok(())
    }

    /// Layer `key`'s tar as it arrives: its end fails (`InvalidData`)
    /// unless what came has the record's size and sha256, and it never
    /// gives more than that size. `None` when the registry lacks the layer.
    pub fn reader(&self, key: &str) -> Result<Option<BlobReader>, RegistryError> {
        let Some(entry) = self.entry(key)? else {
            return Ok(None);
        };
        let mut client = self.client(key);
        let url = client.url(&format!("blobs/sha256:{}", entry.sha256));
        let body = client
            .send("GET", &url, &[], Body::None, false)?
            .into_reader();
        Ok(Some(BlobReader {
            client,
            url,
            body: Box::new(body),
            entry,
            got: 0,
            hasher: Sha256::new(),
            resumes: 0,
            ended: false,
        }))
    }
}

/// Tags are at most 128 characters of `[A-Za-z0-9_.-]`; a key is 64 hex.
fn check_key(key: &str) -> Result<(), RegistryError> {
    if key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(RegistryError::BadReference {
            reference: key.chars().take(80).collect(),
            why: "not a layer key".into(),
        })
    }
}

/// A blob as it arrives, taken up again where it stopped when the
/// connection breaks, and checked at its end.
pub struct BlobReader {
    client: Client,
    url: String,
    body: Box<dyn Read + Send + Sync>,
    entry: RepoEntry,
    got: u64,
    hasher: Sha256,
    resumes: u32,
    ended: bool,
}

impl BlobReader {
    pub fn entry(&self) -> &RepoEntry {
        &self.entry
    }

    /// How many times the download was taken up again.
    pub fn resumes(&self) -> u32 {
        self.resumes
    }

    /// Asks for the rest of the blob, from byte `got` on.
    fn resume(&mut self, why: String) -> io::Result<()> {
        if self.resumes >= RESUMES {
            return Err(io::Error::other(format!(
                "{why} (after taking the download up again {RESUMES} times)"
            )));
        }
        self.resumes += 1;
        let range = format!("bytes={}-", self.got);
        let r = self
            .client
            .send("GET", &self.url, &[("Range", &range)], Body::None, false)
            .map_err(|e| io::Error::other(format!("{why}; taking it up again: {e}")))?;
        if r.status() != 206 {
            return Err(io::Error::other(format!(
                "{why}; the registry does not resume downloads (it answered {} to a range)",
                r.status()
            )));
        }
        self.body = Box::new(r.into_reader());
        Ok(())
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use io::{Error, ErrorKind};
        if self.ended {
            return Ok(0);
        }
        loop {
            let want = buf
                .len()
                .min((self.entry.size - self.got).saturating_add(1) as usize);
            match self.body.read(&mut buf[..want.max(1)]) {
                Ok(0) if self.got < self.entry.size => {
                    self.resume(format!(
                        "the download stopped at {} of {} bytes",
                        self.got, self.entry.size
                    ))?;
                }
                Ok(0) => {
                    self.ended = true;
                    let got = crate::plan::hex(&std::mem::take(&mut self.hasher).finalize());
                    if got != self.entry.sha256 {
                        return Err(Error::new(
                            ErrorKind::InvalidData,
                            format!(
                                "its tar has sha256 {got}, the registry's record says {}: it was changed",
                                self.entry.sha256
                            ),
                        ));
                    }
                    return Ok(0);
                }
                Ok(n) => {
                    self.got += n as u64;
                    if self.got > self.entry.size {
                        return Err(Error::new(
                            ErrorKind::InvalidData,
                            format!(
                                "its tar is longer than the {} bytes the registry's record says",
                                self.entry.size
                            ),
                        ));
                    }
                    self.hasher.update(&buf[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if self.got < self.entry.size => {
                    self.resume(format!("the download broke at byte {}: {e}", self.got))?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};

    /// How the fake registry sends the blob.
    #[derive(Clone, Copy, PartialEq)]
    enum Blob {
        /// Half of it, then the connection closes; ranges are honoured.
        CutThenResume,
        /// Half of it every time; ranges answered with the whole blob (200).
        CutNoRanges,
        /// Other bytes of the same length.
        Changed,
    }

    /// A registry on loopback holding one layer `key` whose tar is `tar`.
    fn serve(key: &'static str, tagged: &'static str, tar: Vec<u8>, how: Blob) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let digest = format!("sha256:{}", crate::plan::hex(&Sha256::digest(&tar)));
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": MANIFEST, "artifactType": ARTIFACT,
            "config": { "mediaType": CONFIG, "digest": digest, "size": 1 },
            "layers": [{ "mediaType": TAR, "digest": digest, "size": tar.len() }],
            "annotations": { "org.slate.layer.key": tagged },
        }))
        .unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut r = io::BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut from = None;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        from = v.trim().trim_end_matches('-').parse::<usize>().ok();
                    }
                }
                let reply =
                    |conn: &mut std::net::TcpStream, code: &str, len: usize, body: &[u8]| {
                        let head = format!(
                            "HTTP/1.1 {code}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                        );
                        let _ = conn.write_all(head.as_bytes());
                        let _ = conn.write_all(body);
                    };
                if path.ends_with(&format!("/manifests/{key}")) {
                    reply(&mut conn, "200 OK", manifest.len(), &manifest);
                } else if path.contains("/blobs/") {
                    let half = tar.len() / 2;
                    match (how, from) {
                        (Blob::CutThenResume, Some(n)) => {
                            reply(&mut conn, "206 Partial Content", tar.len() - n, &tar[n..])
                        }
                        (Blob::Changed, _) => {
                            let other: Vec<u8> = tar.iter().map(|b| b ^ 1).collect();
                            reply(&mut conn, "200 OK", other.len(), &other)
                        }
                        _ => reply(&mut conn, "200 OK", tar.len(), &tar[..half]),
                    }
                } else {
                    reply(&mut conn, "404 Not Found", 0, b"");
                }
            }
        });
        addr
    }

    const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn tar() -> Vec<u8> {
        (0..200_000u32).map(|i| (i % 251) as u8).collect()
    }

    fn read_all(addr: &str, key: &str) -> (Result<Vec<u8>, String>, u32) {
        let repo = LayerRepo::parse(&format!("oci+http://{addr}/slate/cache")).unwrap();
        let mut r = match repo.reader(key) {
            Ok(Some(r)) => r,
            Ok(None) => return (Err("no such layer".into()), 0),
            Err(e) => return (Err(e.to_string()), 0),
        };
        let mut out = Vec::new();
        let res = r
            .read_to_end(&mut out)
            .map(|_| out)
            .map_err(|e| e.to_string());
        (res, r.resumes())
    }

    #[test]
    fn a_download_cut_short_is_taken_up_where_it_stopped() {
        let addr = serve(KEY, KEY, tar(), Blob::CutThenResume);
        let (got, resumes) = read_all(&addr, KEY);
        assert_eq!(got.unwrap(), tar());
        assert_eq!(resumes, 1);
    }

    #[test]
    fn a_registry_that_cannot_resume_fails_the_download_saying_so() {
        let addr = serve(KEY, KEY, tar(), Blob::CutNoRanges);
        let (got, _) = read_all(&addr, KEY);
        let e = got.unwrap_err();
        assert!(e.contains("does not resume downloads"), "{e}");
    }

    #[test]
    fn a_changed_tar_is_refused_at_its_end() {
        let addr = serve(KEY, KEY, tar(), Blob::Changed);
        let (got, _) = read_all(&addr, KEY);
        let e = got.unwrap_err();
        assert!(e.contains("it was changed"), "{e}");
    }

    #[test]
    fn a_layer_tagged_with_a_key_it_does_not_name_is_refused() {
        let other = "f".repeat(64);
        let addr = serve(
            KEY,
            Box::leak(other.into_boxed_str()),
            tar(),
            Blob::CutThenResume,
        );
        let repo = LayerRepo::parse(&format!("oci+http://{addr}/slate/cache")).unwrap();
        let e = repo.entry(KEY).unwrap_err().to_string();
        assert!(e.contains("tagged with a key it does not name"), "{e}");
        assert!(repo.entry(&"e".repeat(64)).unwrap().is_none());
        assert!(LayerRepo::parse("https://x/y").is_err());
        assert_eq!(
            LayerRepo::parse("oci://registry.example:5000/team/layers/")
                .unwrap()
                .url(),
            "oci://registry.example:5000/team/layers"
        );
    }
}
