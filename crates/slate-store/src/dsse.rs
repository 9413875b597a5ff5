//! Signed provenance: the in-toto statement in a DSSE envelope
//! (<https://github.com/secure-systems-lab/dsse>), signed with Ed25519.
//!
//! Keys are PKCS#8 PEM files, the format `openssl genpkey -algorithm ed25519`
//! writes, so keys made elsewhere work and slate's keys work elsewhere.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier, VerifyingKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use slate_layers::hash::hex;
use std::path::{Path, PathBuf};

/// The payload type of an in-toto statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// The envelope's name in each target's folder, beside `provenance.json`.
pub const ENVELOPE: &str = "provenance.dsse.json";

#[derive(Debug, thiserror::Error)]
pub enum DsseError {
    #[error("cannot read the key `{}`", path.display())]
    ReadKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{}` is not an Ed25519 {kind} key in PKCS#8 PEM", path.display())]
    BadKey { path: PathBuf, kind: &'static str },
    #[error("cannot write the key `{}`", path.display())]
    WriteKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the envelope is not DSSE: {0}")]
    BadEnvelope(String),
    #[error("no signature in the envelope was made by the key {keyid}")]
    BadSignature { keyid: String },
}

/// The id of a public key: the sha256 of its SubjectPublicKeyInfo (DER).
pub fn keyid(key: &VerifyingKey) -> String {
    let der = key
        .to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .unwrap_or_else(|_| key.as_bytes().to_vec());
    format!("sha256:{}", hex(&Sha256::digest(der)))
}

/// Signs statements.
pub struct Signer {
    key: SigningKey,
    keyid: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.keyid)
    }
}

impl Signer {
    /// Loads a private key from a PKCS#8 PEM file.
    pub fn load(path: &Path) -> Result<Signer, DsseError> {
        let pem = fs_err::read_to_string(path).map_err(|source| DsseError::ReadKey {
            path: path.into(),
            source,
        })?;
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|_| DsseError::BadKey {
            path: path.into(),
            kind: "private",
        })?;
        let keyid = keyid(&key.verifying_key());
        Ok(Signer { key, keyid })
    }

    pub fn keyid(&self) -> &str {
        &self.keyid
    }

    /// The statement, signed, as a DSSE envelope.
    pub fn envelope(&self, statement: &Value) -> Value {
        let payload = serde_json::to_vec(statement).expect("a JSON value serializes");
        let sig = self.key.sign(&pae(PAYLOAD_TYPE, &payload));
        json!({
            "payloadType": PAYLOAD_TYPE,
            "payload": B64.encode(&payload),
            "signatures": [{ "keyid": self.keyid, "sig": B64.encode(sig.to_bytes()) }],
        })
    }
}

/// Writes a new key pair: the private key at `private` (mode 0600) and the
/// public key at `private.pub`. Returns the public key's path and id.
pub fn generate(private: &Path) -> Result<(PathBuf, String), DsseError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut seed = [0u8; 32];
    let read = |source| DsseError::ReadKey {
        path: "/dev/urandom".into(),
        source,
    };
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_err(read)?,
        &mut seed,
    )
    .map_err(read)?;
    let key = SigningKey::from_bytes(&seed);
    let write = |path: &Path, source| DsseError::WriteKey {
        path: path.into(),
        source,
    };
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| write(private, std::io::Error::other(e.to_string())))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(private)
        .and_then(|mut f| f.write_all(pem.as_bytes()))
        .map_err(|e| write(private, e))?;
    let public = PathBuf::from(format!("{}.pub", private.display()));
    let vk = key.verifying_key();
    let pub_pem = vk
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| write(&public, std::io::Error::other(e.to_string())))?;
    fs_err::write(&public, pub_pem).map_err(|e| write(&public, e))?;
    Ok((public, keyid(&vk)))
}

/// Loads a public key from a PEM file (SubjectPublicKeyInfo), or the public
/// half of a private key file.
pub fn load_public(path: &Path) -> Result<VerifyingKey, DsseError> {
    let pem = fs_err::read_to_string(path).map_err(|source| DsseError::ReadKey {
        path: path.into(),
        source,
    })?;
    VerifyingKey::from_public_key_pem(&pem)
        .or_else(|_| SigningKey::from_pkcs8_pem(&pem).map(|k| k.verifying_key()))
        .map_err(|_| DsseError::BadKey {
            path: path.into(),
            kind: "public",
        })
}

/// Checks the envelope's signature with `key` and returns the statement.
pub fn open(envelope: &[u8], key: &VerifyingKey) -> Result<Value, DsseError> {
    let bad = |m: &str| DsseError::BadEnvelope(m.to_string());
    let env: Value = serde_json::from_slice(envelope).map_err(|e| bad(&e.to_string()))?;
    let ptype = env["payloadType"]
        .as_str()
        .ok_or_else(|| bad("no payloadType"))?;
    if ptype != PAYLOAD_TYPE {
        return Err(bad(&format!(
            "payloadType is `{ptype}`, not `{PAYLOAD_TYPE}`"
        )));
    }
    let payload = env["payload"]
        .as_str()
        .and_then(|p| B64.decode(p).ok())
        .ok_or_else(|| bad("no base64 payload"))?;
    let message = pae(ptype, &payload);
    let sigs = env["signatures"]
        .as_array()
        .ok_or_else(|| bad("no signatures"))?;
    let good = sigs.iter().any(|s| {
        s["sig"]
            .as_str()
            .and_then(|b| B64.decode(b).ok())
            .and_then(|b| Signature::from_slice(&b).ok())
            .is_some_and(|sig| key.verify(&message, &sig).is_ok())
    });
    if !good {
        return Err(DsseError::BadSignature { keyid: keyid(key) });
    }
    serde_json::from_slice(&payload).map_err(|e| bad(&format!("the payload is not JSON: {e}")))
}

/// DSSE's pre-authentication encoding: what is actually signed.
fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut m = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    m.extend_from_slice(payload);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_the_specification() {
        // The example of the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
    }

    #[test]
    fn signed_envelopes_open_with_the_key_and_only_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        let (public, id) = generate(&k).unwrap();
        let signer = Signer::load(&k).unwrap();
        assert_eq!(signer.keyid(), id);
        let st = json!({"_type": "https://in-toto.io/Statement/v1", "subject": []});
        let env = serde_json::to_vec(&signer.envelope(&st)).unwrap();
        let vk = load_public(&public).unwrap();
        assert_eq!(open(&env, &vk).unwrap(), st);

        let other = dir.path().join("other");
        let (other_pub, _) = generate(&other).unwrap();
        let e = open(&env, &load_public(&other_pub).unwrap()).unwrap_err();
        assert!(matches!(e, DsseError::BadSignature { .. }), "{e}");

        // A payload changed after signing fails.
        let mut v: Value = serde_json::from_slice(&env).unwrap();
        v["payload"] = json!(B64.encode(br#"{"_type":"x"}"#));
        let e = open(&serde_json::to_vec(&v).unwrap(), &vk).unwrap_err();
        assert!(matches!(e, DsseError::BadSignature { .. }), "{e}");
        // Private keys are not world-readable; a key is never overwritten.
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&k).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(generate(&k).is_err());
    }
}
