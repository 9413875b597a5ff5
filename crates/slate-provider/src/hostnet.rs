//! The host's network settings that environments with network take along:
//! its proxy variables, and (with `host_ca = true`) its CA bundle.
//!
//! Machines behind a TLS-inspecting proxy, or on a network with a private
//! CA, trust a certificate that a freshly bootstrapped image does not. The
//! bundle is mounted read-only at [`CA_PATH`] (a tmpfs in every
//! environment, so never part of a layer or an artifact), and the variables
//! that OpenSSL, curl, Python's requests and pip, Node, cargo, git and the
//! AWS CLI read point at it.

use std::path::{Path, PathBuf};

/// Where the host's bundle appears inside an environment.
pub const CA_PATH: &str = "/run/slate/host-ca.crt";

/// The proxy variables passed on, in both spellings tools use.
const PROXY_VARS: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "ftp_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "FTP_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
];

/// The variables that make common tools trust one bundle file.
const CA_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
    "REQUESTS_CA_BUNDLE",
    "PIP_CERT",
    "NODE_EXTRA_CA_CERTS",
    "CARGO_HTTP_CAINFO",
    "GIT_SSL_CAINFO",
    "AWS_CA_BUNDLE",
];

/// The host's CA bundle: `SSL_CERT_FILE` when set, else where Debian,
/// Fedora and Alpine keep theirs.
pub fn host_ca_bundle() -> Result<PathBuf, String> {
    if let Some(f) = std::env::var_os("SSL_CERT_FILE").filter(|f| !f.is_empty()) {
        let f = PathBuf::from(f);
        return if f.is_file() {
            Ok(f)
        } else {
            Err(format!(
                "`host_ca = true`, but SSL_CERT_FILE names `{}`, which is not a file",
                f.display()
            ))
        };
    }
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ]
    .iter()
    .map(Path::new)
    .find(|p| p.is_file())
    .map(Path::to_path_buf)
    .ok_or_else(|| {
        "`host_ca = true`, but this host has no CA bundle (looked for SSL_CERT_FILE, /etc/ssl/certs/ca-certificates.crt, /etc/pki/tls/certs/ca-bundle.crt, /etc/ssl/cert.pem)".into()
    })
}

/// Variables for a command in an environment with network: the host's
/// proxy settings as they are, and with `host_ca` the CA variables. A
/// command's own variables are set after these, so a build can override
/// any of them.
pub fn env(host_ca: bool) -> Vec<(String, String)> {
    env_from(host_ca, |k| std::env::var(k).ok())
}

fn env_from(host_ca: bool, get: impl Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = PROXY_VARS
        .iter()
        .filter_map(|k| get(k).filter(|v| !v.is_empty()).map(|v| (k.to_string(), v)))
        .collect();
    if host_ca {
        vars.extend(CA_VARS.iter().map(|k| (k.to_string(), CA_PATH.to_string())));
    }
    vars
}

/// Whether a line of a build's output says a TLS peer was not trusted, as
/// OpenSSL, GnuTLS, Python, curl, Go and Node put it.
pub fn is_untrusted_certificate(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    [
        "certificate verify failed",
        "certificate_verify_failed",
        "self-signed certificate in certificate chain",
        "self signed certificate in certificate chain",
        "unable to get local issuer certificate",
        "ssl certificate problem",
        "certificate signed by unknown authority",
        "self_signed_cert_in_chain",
        "unable_to_get_issuer_cert",
        "server certificate verification failed",
    ]
    .iter()
    .any(|m| l.contains(m))
        || (l.contains("certificate") && l.contains("is not trusted"))
}

/// The hint for a network build that failed on an untrusted certificate.
pub const HOST_CA_HINT: &str = "the build could not verify a TLS certificate: if this host reaches the network through a TLS-inspecting proxy or trusts a private CA, set `host_ca = true` under [settings] so environments with network trust the host's CA bundle";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_pass_and_ca_variables_point_inside() {
        let host = |k: &str| match k {
            "https_proxy" => Some("http://proxy.internal:3128".to_string()),
            "NO_PROXY" => Some("localhost,127.0.0.1".to_string()),
            "HTTP_PROXY" => Some(String::new()),
            _ => None,
        };
        let vars = env_from(false, host);
        assert_eq!(
            vars,
            vec![
                ("https_proxy".into(), "http://proxy.internal:3128".into()),
                ("NO_PROXY".into(), "localhost,127.0.0.1".into()),
            ]
        );
        let vars = env_from(true, host);
        assert!(vars.contains(&("SSL_CERT_FILE".into(), CA_PATH.into())));
        assert!(vars.contains(&("PIP_CERT".into(), CA_PATH.into())));
        assert!(vars.contains(&("NODE_EXTRA_CA_CERTS".into(), CA_PATH.into())));
    }

    #[test]
    fn untrusted_certificates_are_recognised_in_each_tools_words() {
        for line in [
            "curl: (60) SSL certificate problem: self-signed certificate in certificate chain",
            "ssl.SSLCertVerificationError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed",
            "x509: certificate signed by unknown authority",
            "ERROR: The certificate of 'example.org' is not trusted.",
        ] {
            assert!(is_untrusted_certificate(line), "{line}");
        }
        assert!(!is_untrusted_certificate("gcc: error: no such file"));
    }
}
