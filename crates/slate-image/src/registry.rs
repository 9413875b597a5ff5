//! A small OCI distribution client: pull an image into one slate layer, push
//! an exported image. Anonymous, basic and bearer-token auth; plain http only
//! for loopback registries or with `insecure`.
//!
//! Credentials come from `SLATE_REGISTRY_USER`/`SLATE_REGISTRY_PASSWORD` or
//! from `~/.docker/config.json` (`auths.<host>.auth`); they are never printed.

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fs::{self, File};
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
    #[error("blob `{digest}` does not match its digest (got `{got}`)")]
    Digest { digest: String, got: String },
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
        serde_json::from_slice(&fs::read(Path::new(&home).join(".docker/config.json")).ok()?)
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
enum Body<'a> {
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

    fn http_err(&self, what: String) -> RegistryError {
        RegistryError::Http {
            registry: self.r.registry.clone(),
            what,
        }
    }

    /// Sends a request, answering one auth challenge (basic or bearer).
    fn send(
        &mut self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Body,
        push: bool,
    ) -> Result<ureq::Response, RegistryError> {
        for attempt in 0..2 {
            let mut req = self.agent.request(method, url);
            for (k, v) in headers {
                req = req.set(k, v);
            }
            if let Some(a) = &self.auth {
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

    fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.r.repository)
    }

    fn get_json(&mut self, tail: &str, accept: &str) -> Result<(Value, String), RegistryError> {
        let url = self.url(tail);
        let r = self.send("GET", &url, &[("Accept", accept)], Body::None, false)?;
        let mut bytes = Vec::new();
        r.into_reader()
            .read_to_end(&mut bytes)
            .map_err(ioe("read manifest"))?;
        let digest = format!("sha256:{}", crate::plan::hex(&Sha256::digest(&bytes)));
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
        let (mut manifest, mut digest) =
            self.get_json(&format!("manifests/{reference}"), ACCEPT)?;
        if let Some(list) = manifest["manifests"].as_array() {
            let pick = list
                .iter()
                .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch)
                .ok_or_else(|| self.http_err(format!("`{}` has no linux/{arch} image", self.r)))?;
            let d = pick["digest"].as_str().unwrap_or_default().to_string();
            (manifest, digest) = self.get_json(&format!("manifests/{d}"), ACCEPT)?;
        }
        let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
        if layers.is_empty() {
            return Err(self.http_err(format!("`{}` has no layers", self.r)));
        }
        let mut dropped = crate::unpack::Dropped::default();
        for layer in layers {
            let d = layer["digest"].as_str().unwrap_or_default().to_string();
            let media = layer["mediaType"].as_str().unwrap_or_default().to_string();
            let blob = tmp.join(d.replace(':', "-"));
            self.download(&d, &blob)?;
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
            let _ = fs::remove_file(&blob);
        }
        Ok(Pulled { digest, dropped })
    }

    fn download(&mut self, digest: &str, to: &Path) -> Result<(), RegistryError> {
        let url = self.url(&format!("blobs/{digest}"));
        let r = self.send("GET", &url, &[], Body::None, false)?;
        let mut f = File::create(to).map_err(ioe(format!("create `{}`", to.display())))?;
        let mut h = Sha256::new();
        let mut reader = r.into_reader();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = reader.read(&mut buf).map_err(ioe("download blob"))?;
            if n == 0 {
                break;
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

    /// Pushes an OCI layout (as written by `export_oci`) under this reference.
    pub fn push_layout(&mut self, layout: &Path) -> Result<(String, u64, u64), RegistryError> {
        let index: Value = serde_json::from_slice(
            &fs::read(layout.join("index.json")).map_err(ioe("read index.json"))?,
        )
        .map_err(|e| self.http_err(e.to_string()))?;
        let mdigest = index["manifests"][0]["digest"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let blob_path = |d: &str| {
            layout
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:"))
        };
        let manifest_bytes = fs::read(blob_path(&mdigest)).map_err(ioe("read manifest"))?;
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
        let (mut sent, mut skipped) = (0u64, 0u64);
        for d in blobs {
            let path = blob_path(&d);
            let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let head = self.url(&format!("blobs/{d}"));
            if self.send("HEAD", &head, &[], Body::None, true).is_ok() {
                skipped += size;
                continue;
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
                Body::File(&path),
                true,
            )?;
            sent += size;
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
        let r = Reference::parse("registry.example/a/b@sha256:abc").unwrap();
        assert_eq!(r.reference, "sha256:abc");
        assert_eq!(r.to_string(), "registry.example/a/b@sha256:abc");
        assert_eq!(
            Reference::parse("localhost:5000/x").unwrap().reference,
            "latest"
        );
        assert!(Reference::parse("debian:bookworm").is_err());
    }

    #[test]
    fn base64_round_trips() {
        for s in ["", "a", "ab", "abc", "user:p@ss w0rd!"] {
            assert_eq!(b64_decode(&b64_encode(s.as_bytes())).unwrap(), s.as_bytes());
        }
        assert_eq!(b64_encode(b"user:pass"), "dXNlcjpwYXNz");
    }
}
