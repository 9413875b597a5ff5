//! A small OCI distribution client: pull an image into one slate layer, push
//! an exported image. Anonymous, basic and bearer-token auth; plain http only
//! for loopback registries or with `insecure`.
//!
//! Credentials come from `SLATE_REGISTRY_USER`/`SLATE_REGISTRY_PASSWORD` or
//! from `~/.docker/config.json` (`auths.<host>.auth`); they are never printed,
//! and go to the registry's own host only: not to an upload URL that a
//! `Location` header names elsewhere, nor through a redirect.
//!
//! The registry is not trusted. Every digest it names is checked to be
//! `sha256:` and 64 hex digits before it becomes a URL or a file name; a
//! manifest fetched by digest (a pinned reference, or the platform's entry in
//! an index) must hash to that digest; a manifest may weigh 4 MiB at most and
//! a blob no more than its manifest says. Layers are unpacked by
//! [`crate::unpack`], which keeps every path inside the root.
//!
//! Why not a maintained client (`oci-client` with `oci-spec`): reqwest and
//! tokio are in the binary already (for publishing), but it would still add
//! some 26 crates — `oci-spec`'s proc-macro stacks (darling, derive_builder,
//! strum, getset, const_format), a second `sha2` — and an async runtime to
//! drive from this blocking code, for the few requests a pull and a push
//! make. It would also leave unpacking layers, where the real danger is, to
//! slate all the same. The checks above are a few dozen lines here.

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("`{reference}` is not an image reference: {why}")]
    BadReference { reference: String, why: String },
    #[error("registry `{registry}`: {what}")]
    Http { registry: String, what: String },
    #[error("registry `{registry}` wants credentials for `{repository}`")]
    Unauthorized {
        registry: String,
        repository: String,
    },
    #[error("registry `{registry}`: {what} answered 404 (not found)")]
    NotFound { registry: String, what: String },
    #[error("blob `{digest}` does not match its digest (got `{got}`)")]
    Digest { digest: String, got: String },
    #[error("the registry sent `{got}` for the manifest `{want}`")]
    ManifestDigest { want: String, got: String },
    #[error("`{digest}` is {why}")]
    BadDigest { digest: String, why: String },
    #[error("the manifest `{reference}` is larger than 4 MiB")]
    ManifestTooLarge { reference: String },
    #[error("blob `{digest}` is larger than the {size} bytes its manifest says")]
    BlobTooLarge { digest: String, size: u64 },
    #[error("cannot unpack layer `{digest}`")]
    Unpack {
        digest: String,
        #[source]
        source: Box<crate::unpack::UnpackError>,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// Checks that `d` is `sha256:` and 64 lowercase hex digits, before it
/// becomes part of a URL or a file name.
pub fn check_digest(d: &str) -> Result<&str, RegistryError> {
    let bad = |why: String| RegistryError::BadDigest {
        digest: d.chars().take(140).collect(),
        why,
    };
    match d.split_once(':') {
        Some(("sha256", hex))
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(d)
        }
        Some((alg, _))
            if alg != "sha256"
                && !alg.is_empty()
                && alg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) =>
        {
            Err(bad(format!(
                "a `{alg}` digest: slate checks only sha256 digests"
            )))
        }
        _ => Err(bad(
            "not a digest: expected `sha256:` and 64 lowercase hex digits".into(),
        )),
    }
}

/// The most a manifest or an index may weigh.
const MANIFEST_LIMIT: u64 = 4 << 20;

fn ioe(what: impl Into<String>) -> impl FnOnce(io::Error) -> RegistryError {
    let what = what.into();
    move |source| RegistryError::Io { what, source }
}

/// `registry/repository:tag` or `registry/repository@sha256:…`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    pub registry: String,
    pub repository: String,
    pub reference: String,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, RegistryError> {
        let bad = |why: &str| RegistryError::BadReference {
            reference: s.to_string(),
            why: why.into(),
        };
        let (registry, rest) = s.split_once('/').ok_or_else(|| {
            bad("name the registry, e.g. `registry.example:5000/library/debian:bookworm`")
        })?;
        if !(registry.contains('.') || registry.contains(':') || registry == "localhost") {
            return Err(bad(
                "the first part must be a registry host (with a dot or a port)",
            ));
        }
        let (repository, reference) = if let Some((r, d)) = rest.split_once('@') {
            check_digest(d).map_err(|e| bad(&e.to_string()))?;
            (r, d.to_string())
        } else {
            match rest.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r, t.to_string()),
                _ => (rest, "latest".to_string()),
            }
        };
        if repository.is_empty() || reference.is_empty() {
            return Err(bad("missing repository or tag"));
        }
        Ok(Reference {
            registry: registry.into(),
            repository: repository.into(),
            reference,
        })
    }

    fn is_loopback(&self) -> bool {
        let host = self
            .registry
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(&self.registry);
        host == "localhost" || host.starts_with("127.") || host == "[::1]"
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sep = if self.reference.starts_with("sha256:") {
            '@'
        } else {
            ':'
        };
        write!(
            f,
            "{}/{}{sep}{}",
            self.registry, self.repository, self.reference
        )
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for ch in s.bytes().filter(|b| *b != b'=') {
        let v = B64.iter().position(|&b| b == ch)? as u32;
        buf = buf << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    Some(out)
}

fn credentials(registry: &str) -> Option<(String, String)> {
    if let (Ok(u), Ok(p)) = (
        std::env::var("SLATE_REGISTRY_USER"),
        std::env::var("SLATE_REGISTRY_PASSWORD"),
    ) {
        return Some((u, p));
    }
    let home = std::env::var_os("HOME")?;
    let cfg: Value =
        serde_json::from_slice(&fs_err::read(Path::new(&home).join(".docker/config.json")).ok()?)
            .ok()?;
    let auth = cfg["auths"][registry]["auth"].as_str()?;
    let decoded = String::from_utf8(b64_decode(auth)?).ok()?;
    let (u, p) = decoded.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// What a pull brought in.
#[derive(Debug)]
pub struct Pulled {
    /// The digest of the image's manifest.
    pub digest: String,
    /// What the layers had that was left out of the image.
    pub dropped: crate::unpack::Dropped,
}

pub struct Client {
    agent: ureq::Agent,
    base: String,
    r: Reference,
    creds: Option<(String, String)>,
    auth: Option<String>,
}

/// A request body that can be sent again after an auth challenge.
pub(crate) enum Body<'a> {
    None,
    Bytes(&'a [u8]),
    File(&'a Path),
}

impl Client {
    pub fn new(r: &Reference, insecure: bool) -> Client {
        let scheme = if insecure || r.is_loopback() {
            "http"
        } else {
            "https"
        };
        Client {
            agent: ureq::AgentBuilder::new().redirects(5).build(),
            base: format!("{scheme}://{}", r.registry),
            r: r.clone(),
            creds: credentials(&r.registry),
            auth: None,
        }
    }

    pub(crate) fn http_err(&self, what: String) -> RegistryError {
        RegistryError::Http {
            registry: self.r.registry.clone(),
            what,
        }
    }

    /// Sends a request, answering one auth challenge (basic or bearer).
    pub(crate) fn send(
        &mut self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Body,
        push: bool,
    ) -> Result<ureq::Response, RegistryError> {
        // Credentials go to the registry only, never to a host that a
        // `Location` header names (redirects drop them in ureq already).
        let ours = url.starts_with(&format!("{}/", self.base));
        for attempt in 0..2 {
            let mut req = self.agent.request(method, url);
            for (k, v) in headers {
                req = req.set(k, v);
            }
            if let (Some(a), true) = (&self.auth, ours) {
                req = req.set("Authorization", a);
            }
            let res = match &body {
                Body::None => req.call(),
                Body::Bytes(b) => req.send_bytes(b),
                Body::File(p) => {
                    let f = File::open(p).map_err(ioe(format!("open `{}`", p.display())))?;
                    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                    req.set("Content-Length", &len.to_string()).send(f)
                }
            };
            match res {
                Ok(r) => return Ok(r),
                Err(ureq::Error::Status(401, _)) if !ours => {
                    return Err(self.http_err(format!(
                        "{method} {} asks for credentials; slate sends them to `{}` only",
                        url.split('?').next().unwrap_or(url),
                        self.r.registry
                    )))
                }
                Err(ureq::Error::Status(401, r)) if attempt == 0 => {
                    let challenge = r.header("WWW-Authenticate").unwrap_or("").to_string();
                    self.authenticate(&challenge, push)?;
                }
                Err(ureq::Error::Status(401, _)) => {
                    return Err(RegistryError::Unauthorized {
                        registry: self.r.registry.clone(),
                        repository: self.r.repository.clone(),
                    })
                }
                Err(ureq::Error::Status(404, _)) => {
                    return Err(RegistryError::NotFound {
                        registry: self.r.registry.clone(),
                        what: format!("{method} {}", url.split('?').next().unwrap_or(url)),
                    })
                }
                Err(ureq::Error::Status(code, r)) => {
                    let text: String = r
                        .into_string()
                        .unwrap_or_default()
                        .chars()
                        .take(300)
                        .collect();
                    return Err(self.http_err(format!(
                        "{method} {} answered {code}: {}",
                        url.split('?').next().unwrap_or(url),
                        text.trim()
                    )));
                }
                Err(e) => return Err(self.http_err(format!("{method} failed: {e}"))),
            }
        }
        unreachable!("two attempts")
    }

    fn authenticate(&mut self, challenge: &str, push: bool) -> Result<(), RegistryError> {
        let basic = self
            .creds
            .as_ref()
            .map(|(u, p)| format!("Basic {}", b64_encode(format!("{u}:{p}").as_bytes())));
        if challenge.to_ascii_lowercase().starts_with("basic") {
            self.auth = Some(basic.ok_or_else(|| RegistryError::Unauthorized {
                registry: self.r.registry.clone(),
                repository: self.r.repository.clone(),
            })?);
            return Ok(());
        }
        // Bearer realm="…",service="…",scope="…"
        let param = |name: &str| {
            challenge.split([',', ' ']).find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k.trim() == name).then(|| v.trim().trim_matches('"').to_string())
            })
        };
        let realm = param("realm")
            .ok_or_else(|| self.http_err(format!("cannot read auth challenge `{challenge}`")))?;
        let service = param("service").unwrap_or_default();
        let actions = if push { "pull,push" } else { "pull" };
        let scope = format!("repository:{}:{actions}", self.r.repository);
        let mut req = self
            .agent
            .get(&realm)
            .query("service", &service)
            .query("scope", &scope);
        if let Some(b) = &basic {
            req = req.set("Authorization", b);
        }
        let text = req
            .call()
            .map_err(|e| self.http_err(format!("token request failed: {e}")))?
            .into_string()
            .map_err(|e| self.http_err(format!("token answer unreadable: {e}")))?;
        let resp: Value = serde_json::from_str(&text)
            .map_err(|e| self.http_err(format!("token answer is not JSON: {e}")))?;
        let token = resp["token"]
            .as_str()
            .or(resp["access_token"].as_str())
            .ok_or_else(|| self.http_err("token answer has no token".into()))?;
        self.auth = Some(format!("Bearer {token}"));
        Ok(())
    }

    pub(crate) fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.r.repository)
    }

    /// Fetches the manifest or index `reference` (a tag or a checked
    /// digest), at most [`MANIFEST_LIMIT`] bytes of it. One fetched by digest
    /// must hash to that digest.
    pub(crate) fn get_manifest(
        &mut self,
        reference: &str,
        accept: &str,
    ) -> Result<(Value, String), RegistryError> {
        let url = self.url(&format!("manifests/{reference}"));
        let r = self.send("GET", &url, &[("Accept", accept)], Body::None, false)?;
        let mut bytes = Vec::new();
        r.into_reader()
            .take(MANIFEST_LIMIT + 1)
            .read_to_end(&mut bytes)
            .map_err(ioe("read manifest"))?;
        if bytes.len() as u64 > MANIFEST_LIMIT {
            return Err(RegistryError::ManifestTooLarge {
                reference: reference.into(),
            });
        }
        let digest = format!("sha256:{}", crate::plan::hex(&Sha256::digest(&bytes)));
        if reference.starts_with("sha256:") && digest != reference {
            return Err(RegistryError::ManifestDigest {
                want: reference.into(),
                got: digest,
            });
        }
        let v = serde_json::from_slice(&bytes)
            .map_err(|e| self.http_err(format!("manifest is not JSON: {e}")))?;
        Ok((v, digest))
    }

    /// Pulls the image for `os/arch` and unpacks its layers, in order, into
    /// `dest` (whiteouts applied, see [`crate::unpack`]).
    pub fn pull_into(
        &mut self,
        arch: &str,
        dest: &Path,
        tmp: &Path,
    ) -> Result<Pulled, RegistryError> {
        const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
        let reference = self.r.reference.clone();
        let (mut manifest, mut digest) = self.get_manifest(&reference, ACCEPT)?;
        if let Some(list) = manifest["manifests"].as_array() {
            for m in list {
                check_digest(m["digest"].as_str().unwrap_or_default())?;
            }
            let pick = list
                .iter()
                .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch)
                .ok_or_else(|| self.http_err(format!("`{}` has no linux/{arch} image", self.r)))?;
            let d = pick["digest"].as_str().unwrap_or_default().to_string();
            (manifest, digest) = self.get_manifest(&d, ACCEPT)?;
        }
        let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
        if layers.is_empty() {
            return Err(self.http_err(format!("`{}` has no layers", self.r)));
        }
        check_digest(manifest["config"]["digest"].as_str().unwrap_or_default())?;
        for layer in &layers {
            check_digest(layer["digest"].as_str().unwrap_or_default())?;
        }
        let mut dropped = crate::unpack::Dropped::default();
        for layer in layers {
            let d = layer["digest"].as_str().unwrap_or_default().to_string();
            let media = layer["mediaType"].as_str().unwrap_or_default().to_string();
            let size = layer["size"]
                .as_u64()
                .ok_or_else(|| self.http_err(format!("layer `{d}` has no size")))?;
            let blob = tmp.join(d.replace(':', "-"));
            self.download(&d, size, &blob)?;
            let f = File::open(&blob).map_err(ioe("open layer"))?;
            let reader: Box<dyn Read> = if media.ends_with("gzip") {
                Box::new(flate2::read::GzDecoder::new(f))
            } else if media.ends_with("zstd") {
                return Err(self.http_err(format!(
                    "layer `{d}` is zstd-compressed, which this version of slate cannot unpack"
                )));
            } else {
                Box::new(f)
            };
            let source = crate::unpack::Source::OciLayer;
            dropped.extend(
                crate::unpack::unpack(reader, dest, source).map_err(|source| {
                    RegistryError::Unpack {
                        digest: d.clone(),
                        source: Box::new(source),
                    }
                })?,
            );
            let _ = fs_err::remove_file(&blob);
        }
        Ok(Pulled { digest, dropped })
    }

    /// Downloads the blob `digest` (checked) of `size` bytes to `to`.
    fn download(&mut self, digest: &str, size: u64, to: &Path) -> Result<(), RegistryError> {
        let url = self.url(&format!("blobs/{digest}"));
        let r = self.send("GET", &url, &[], Body::None, false)?;
        let mut f = File::create(to).map_err(ioe(format!("create `{}`", to.display())))?;
        let mut h = Sha256::new();
        let mut reader = r.into_reader().take(size.saturating_add(1));
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(ioe("download blob"))?;
            if n == 0 {
                break;
            }
            got += n as u64;
            if got > size {
                return Err(RegistryError::BlobTooLarge {
                    digest: digest.into(),
                    size,
                });
            }
            h.update(&buf[..n]);
            f.write_all(&buf[..n]).map_err(ioe("write blob"))?;
        }
        let got = format!("sha256:{}", crate::plan::hex(&h.finalize()));
        if got != digest {
            return Err(RegistryError::Digest {
                digest: digest.to_string(),
                got,
            });
        }
        Ok(())
    }

    /// Uploads the blob `d` (a checked digest) unless the registry has it:
    /// whether it was sent.
    pub(crate) fn put_blob(&mut self, d: &str, body: Body) -> Result<bool, RegistryError> {
        let head = self.url(&format!("blobs/{d}"));
        if self.send("HEAD", &head, &[], Body::None, true).is_ok() {
            return Ok(false);
        }
        let start = self.url("blobs/uploads/");
        let r = self.send("POST", &start, &[("Content-Length", "0")], Body::None, true)?;
        let loc = r
            .header("Location")
            .ok_or_else(|| self.http_err("upload answer has no Location".into()))?
            .to_string();
        let loc = if loc.starts_with('/') {
            format!("{}{loc}", self.base)
        } else {
            loc
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let put = format!("{loc}{sep}digest={d}");
        self.send(
            "PUT",
            &put,
            &[("Content-Type", "application/octet-stream")],
            body,
            true,
        )?;
        Ok(true)
    }

    /// Pushes an OCI layout (as written by `export_oci`) under this reference.
    pub fn push_layout(&mut self, layout: &Path) -> Result<(String, u64, u64), RegistryError> {
        let index: Value = serde_json::from_slice(
            &fs_err::read(layout.join("index.json")).map_err(ioe("read index.json"))?,
        )
        .map_err(|e| self.http_err(e.to_string()))?;
        let mdigest =
            check_digest(index["manifests"][0]["digest"].as_str().unwrap_or_default())?.to_string();
        let blob_path = |d: &str| {
            layout
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:"))
        };
        let manifest_bytes = fs_err::read(blob_path(&mdigest)).map_err(ioe("read manifest"))?;
        let manifest: Value =
            serde_json::from_slice(&manifest_bytes).map_err(|e| self.http_err(e.to_string()))?;
        let mut blobs: Vec<String> = vec![manifest["config"]["digest"]
            .as_str()
            .unwrap_or_default()
            .to_string()];
        blobs.extend(
            manifest["layers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l["digest"].as_str().map(str::to_string)),
        );
        for d in &blobs {
            check_digest(d)?;
        }
        let (mut sent, mut skipped) = (0u64, 0u64);
        for d in blobs {
            let path = blob_path(&d);
            let size = fs_err::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if self.put_blob(&d, Body::File(&path))? {
                sent += size;
            } else {
                skipped += size;
            }
        }
        let url = self.url(&format!("manifests/{}", self.r.reference));
        self.send(
            "PUT",
            &url,
            &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
            Body::Bytes(&manifest_bytes),
            true,
        )?;
        Ok((mdigest, sent, skipped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn parses_references() {
        let r = Reference::parse("127.0.0.1:5000/slate/bb:v1").unwrap();
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.reference.as_str()
            ),
            ("127.0.0.1:5000", "slate/bb", "v1")
        );
        assert!(r.is_loopback());
        let pinned = format!("sha256:{}", "0a".repeat(32));
        let r = Reference::parse(&format!("registry.example/a/b@{pinned}")).unwrap();
        assert_eq!(r.reference, pinned);
        assert_eq!(r.to_string(), format!("registry.example/a/b@{pinned}"));
        for bad in ["sha256:abc", "sha256:../../x", "md5:00"] {
            let e = Reference::parse(&format!("registry.example/a/b@{bad}")).unwrap_err();
            assert!(e.to_string().contains("digest"), "{e}");
        }
        assert_eq!(
            Reference::parse("localhost:5000/x").unwrap().reference,
            "latest"
        );
        assert!(Reference::parse("debian:bookworm").is_err());
    }

    /// A registry on loopback that answers every request with `route` and
    /// records what it was asked, with the `Authorization` header sent.
    struct Fake {
        addr: std::net::SocketAddr,
        seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    /// Method, path and the `Authorization` header of a request.
    type Seen = (String, String, Option<String>);

    /// Status, extra headers, body.
    type Reply = (u16, Vec<(String, String)>, Vec<u8>);

    impl Fake {
        fn start(route: impl Fn(&str, &str) -> Reply + Send + 'static) -> Fake {
            use std::io::BufRead;
            use std::sync::atomic::Ordering;
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (seen2, stop2) = (seen.clone(), stop.clone());
            let thread = std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut conn) = conn else { continue };
                    let mut r = io::BufReader::new(conn.try_clone().unwrap());
                    let mut line = String::new();
                    if r.read_line(&mut line).is_err() {
                        continue;
                    }
                    let mut parts = line.split_whitespace();
                    let method = parts.next().unwrap_or("").to_string();
                    let path = parts.next().unwrap_or("").to_string();
                    let (mut len, mut auth) = (0u64, None);
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                            break;
                        }
                        let (k, v) = h.split_once(':').unwrap_or((&h, ""));
                        match k.to_ascii_lowercase().as_str() {
                            "content-length" => len = v.trim().parse().unwrap_or(0),
                            "authorization" => auth = Some(v.trim().to_string()),
                            _ => {}
                        }
                    }
                    let _ = io::copy(&mut r.take(len), &mut io::sink());
                    seen2
                        .lock()
                        .unwrap()
                        .push((method.clone(), path.clone(), auth));
                    let (code, headers, body) = route(&method, &path);
                    let mut head = format!(
                        "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                        body.len()
                    );
                    for (k, v) in headers {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str("\r\n");
                    let _ = conn.write_all(head.as_bytes());
                    if method != "HEAD" {
                        let _ = conn.write_all(&body);
                    }
                }
            });
            Fake {
                addr,
                seen,
                stop,
                thread: Some(thread),
            }
        }

        fn reference(&self, tail: &str) -> Reference {
            Reference::parse(&format!("{}/slate/victim{tail}", self.addr)).unwrap()
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = std::net::TcpStream::connect(self.addr);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn ok(body: impl Into<Vec<u8>>) -> Reply {
        (200, vec![], body.into())
    }

    fn sha(bytes: &[u8]) -> String {
        format!("sha256:{}", crate::plan::hex(&Sha256::digest(bytes)))
    }

    /// A one-file layer, uncompressed, and its manifest.
    fn image() -> (Vec<u8>, Vec<u8>) {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, "hello", &b"hi"[..]).unwrap();
        let layer = b.into_inner().unwrap();
        let manifest = manifest_with(&sha(&layer), layer.len());
        (layer, manifest)
    }

    fn manifest_with(layer_digest: &str, size: usize) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(b"{}"), "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": size}],
        }))
        .unwrap()
    }

    /// Pulls `r` into a fresh root; the folders live as long as the result.
    fn pull(r: &Reference) -> (tempfile::TempDir, Result<Pulled, RegistryError>) {
        let t = tempfile::tempdir().unwrap();
        let (dest, tmp) = (t.path().join("fs"), t.path().join("blobs"));
        fs::create_dir_all(&dest).unwrap();
        fs::create_dir_all(&tmp).unwrap();
        let res = Client::new(r, false).pull_into("amd64", &dest, &tmp);
        (t, res)
    }

    #[test]
    fn digests_that_are_not_sha256_hex_are_refused_before_any_use() {
        let outer = tempfile::tempdir().unwrap();
        let victim = outer.path().join("written-by-the-registry");
        let (layer, _) = image();
        let hex64 = "a".repeat(64);
        for (digest, why) in [
            (victim.to_str().unwrap().to_string(), "not a digest"),
            ("sha256:../../x".to_string(), "not a digest"),
            (format!("sha256:{}", hex64.to_uppercase()), "not a digest"),
            (format!("sha256:{hex64}/../x"), "not a digest"),
            (format!("sha512:{}", "a".repeat(128)), "only sha256"),
        ] {
            let manifest = manifest_with(&digest, layer.len());
            let layer = layer.clone();
            let reg = Fake::start(move |_, path| {
                if path.contains("/manifests/") {
                    ok(manifest.clone())
                } else {
                    ok(layer.clone())
                }
            });
            let (_t, res) = pull(&reg.reference(":v1"));
            assert!(
                !victim.exists(),
                "{digest}: a file named by the manifest was created"
            );
            let e = res.unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(&digest), "{digest}: {e}");
            assert!(
                reg.seen().iter().all(|(_, p, _)| !p.contains("/blobs/")),
                "{digest}: {:?}",
                reg.seen()
            );
        }
    }

    #[test]
    fn a_manifest_pulled_by_digest_must_hash_to_that_digest() {
        let (layer, manifest) = image();
        let pinned = sha(b"another manifest");
        let reg = Fake::start(move |_, path| {
            if path.contains("/manifests/") {
                ok(manifest.clone())
            } else {
                ok(layer.clone())
            }
        });
        let (_t, res) = pull(&reg.reference(&format!("@{pinned}")));
        let e = res.unwrap_err().to_string();
        assert!(e.contains(&pinned), "{e}");
        assert!(e.contains(&sha(&image().1)), "{e}");
    }

    #[test]
    fn a_platform_manifest_must_hash_to_the_digest_its_index_names() {
        let (layer, manifest) = image();
        let named = sha(b"what the index promised");
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": named, "size": 10,
                           "platform": {"os": "linux", "architecture": "amd64"}}],
        }))
        .unwrap();
        let reg = serve_index(index, manifest, layer);
        let (_t, res) = pull(&reg.reference(":v1"));
        let e = res.unwrap_err().to_string();
        assert!(e.contains(&named) && e.contains(&sha(&image().1)), "{e}");
        // The good path: the index names the manifest it serves.
        let (layer, manifest) = image();
        let index = serde_json::to_vec(&serde_json::json!({
            "manifests": [{"digest": sha(&manifest), "platform": {"os": "linux", "architecture": "amd64"}}],
        }))
        .unwrap();
        let reg = serve_index(index, manifest, layer);
        let (t, res) = pull(&reg.reference(":v1"));
        assert_eq!(res.unwrap().digest, sha(&image().1));
        assert_eq!(fs::read_to_string(t.path().join("fs/hello")).unwrap(), "hi");
    }

    /// A registry that answers `:v1` with `index`, any other manifest with
    /// `manifest` and every blob with `layer`.
    fn serve_index(index: Vec<u8>, manifest: Vec<u8>, layer: Vec<u8>) -> Fake {
        Fake::start(move |_, path| {
            if path.ends_with("/manifests/v1") {
                ok(index.clone())
            } else if path.contains("/manifests/") {
                ok(manifest.clone())
            } else {
                ok(layer.clone())
            }
        })
    }

    #[test]
    fn a_manifest_over_the_limit_is_refused() {
        let (layer, _) = image();
        let mut big: serde_json::Value = serde_json::from_slice(&image().1).unwrap();
        big["annotations"] = serde_json::json!({ "pad": "x".repeat(5 << 20) });
        let big = serde_json::to_vec(&big).unwrap();
        let reg = Fake::start(move |_, path| {
            if path.contains("/manifests/") {
                ok(big.clone())
            } else {
                ok(layer.clone())
            }
        });
        let (_t, res) = pull(&reg.reference(":v1"));
        let e = res.unwrap_err().to_string();
        assert!(e.contains("larger than 4 MiB"), "{e}");
    }

    #[test]
    fn credentials_go_to_the_registry_only() {
        // Another origin: a blob store the registry redirects to, and an
        // upload URL it names in `Location`.
        let elsewhere = Fake::start(|method, path| match (method, path) {
            ("GET", _) => ok(image().0),
            (_, p) if p.starts_with("/token") => ok(r#"{"token":"t"}"#),
            _ => (
                401,
                vec![("WWW-Authenticate".into(), "Basic realm=\"x\"".into())],
                vec![],
            ),
        });
        let other = elsewhere.addr;
        let (_, manifest) = image();
        let reg = Fake::start(move |method, path| match method {
            "GET" if path.contains("/manifests/") => ok(manifest.clone()),
            "GET" => (
                307,
                vec![("Location".into(), format!("http://{other}/blob"))],
                vec![],
            ),
            "HEAD" => (404, vec![], vec![]),
            "POST" => (
                202,
                vec![("Location".into(), format!("http://{other}/upload/1"))],
                vec![],
            ),
            _ => (201, vec![], vec![]),
        });
        let t = tempfile::tempdir().unwrap();
        let (dest, tmp) = (t.path().join("fs"), t.path().join("blobs"));
        fs::create_dir_all(&dest).unwrap();
        fs::create_dir_all(&tmp).unwrap();
        let mut c = Client::new(&reg.reference(":v1"), false);
        c.creds = Some(("user".into(), "secret".into()));
        c.auth = Some("Basic dXNlcjpzZWNyZXQ=".into());
        c.pull_into("amd64", &dest, &tmp).unwrap();
        let layout = t.path().join("layout");
        let (layer, manifest) = image();
        let blobs = layout.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        for b in [&layer, &manifest, &b"{}".to_vec()] {
            fs::write(blobs.join(&sha(b)[7..]), b).unwrap();
        }
        let index = serde_json::json!({"manifests": [{"digest": sha(&manifest)}]});
        fs::write(layout.join("index.json"), index.to_string()).unwrap();
        let pushed = c.push_layout(&layout);
        let seen = elsewhere.seen();
        assert!(seen.iter().any(|(m, _, _)| m == "PUT"), "{seen:?}");
        assert!(
            seen.iter().all(|(_, _, a)| a.is_none()),
            "credentials went to another host: {seen:?}"
        );
        assert!(pushed.is_err());
    }

    #[test]
    fn a_layout_to_push_names_its_blobs_by_checked_digests() {
        let reg = Fake::start(|_, _| (404, vec![], vec![]));
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("secret"), "private").unwrap();
        let layout = t.path().join("layout");
        let blobs = layout.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        let manifest = manifest_with("sha256:../../../secret", 7);
        fs::write(blobs.join(&sha(&manifest)[7..]), &manifest).unwrap();
        fs::write(blobs.join(&sha(b"{}")[7..]), "{}").unwrap();
        let index = serde_json::json!({"manifests": [{"digest": sha(&manifest)}]});
        fs::write(layout.join("index.json"), index.to_string()).unwrap();
        let e = Client::new(&reg.reference(":v1"), false)
            .push_layout(&layout)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`sha256:../../../secret` is not a digest"),
            "{e}"
        );
        assert!(reg.seen().is_empty(), "{:?}", reg.seen());
    }

    #[test]
    fn base64_round_trips() {
        for s in ["", "a", "ab", "abc", "user:p@ss w0rd!"] {
            assert_eq!(b64_decode(&b64_encode(s.as_bytes())).unwrap(), s.as_bytes());
        }
        assert_eq!(b64_encode(b"user:pass"), "dXNlcjpwYXNz");
    }
}
