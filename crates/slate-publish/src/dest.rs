//! Where a run goes: a `file://` folder or an `s3://` bucket and prefix, with
//! credentials from the standard AWS variables or a profile in the shared
//! credentials file. Nothing printed from here carries a credential.

use crate::{RemoteError, RemoteErrorKind};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("`{url}` is not a destination slate can publish to")]
    Scheme { url: String },
    #[error("`{url}` names no bucket")]
    NoBucket { url: String },
    #[error("cannot create the folder `{}`", path.display())]
    Folder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no AWS credentials for `{url}`")]
    NoCredentials { url: String },
    #[error("cannot set up `{url}`: {message}")]
    Setup { url: String, message: String },
}

impl DestinationError {
    pub fn hint(&self) -> Option<String> {
        match self {
            DestinationError::Scheme { .. } | DestinationError::NoBucket { .. } => {
                Some("use `s3://BUCKET/PREFIX` or `file://PATH`".into())
            }
            DestinationError::NoCredentials { .. } => Some(
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE naming a profile in ~/.aws/credentials".into(),
            ),
            _ => None,
        }
    }
}

/// A place to publish to.
pub struct Destination {
    store: Arc<dyn ObjectStore>,
    /// Key prefix, without slashes at either end (may be empty).
    prefix: String,
    /// `s3://bucket` or `file:///abs/path`, for messages.
    base: String,
    /// Whether objects keep user metadata (S3 does, plain files do not).
    metadata: bool,
    /// Values scrubbed from every error text.
    secrets: Vec<String>,
}

impl std::fmt::Debug for Destination {
    // Not derived: the secrets it scrubs must not print either.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Destination({self})")
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "{}", self.base)
        } else {
            write!(f, "{}/{}", self.base, self.prefix)
        }
    }
}

impl Destination {
    /// Parses `url`; a relative `file://` path is taken from `base_dir`.
    /// `endpoint` (e.g. `http://127.0.0.1:9000`) points `s3://` at an
    /// S3-compatible server; else `AWS_ENDPOINT_URL` or the profile's
    /// `endpoint_url` does.
    pub fn parse(
        url: &str,
        base_dir: &Path,
        endpoint: Option<&str>,
    ) -> Result<Destination, DestinationError> {
        if let Some(path) = url.strip_prefix("file://") {
            return Destination::folder(url, base_dir.join(path));
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(DestinationError::Scheme { url: url.into() });
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(DestinationError::NoBucket { url: url.into() });
        }
        Destination::s3(url, bucket, prefix, endpoint)
    }

    /// The folder `root` of the `file://` URL `url`, created if missing.
    fn folder(url: &str, root: PathBuf) -> Result<Destination, DestinationError> {
        fs_err::create_dir_all(&root).map_err(|source| DestinationError::Folder {
            path: root.clone(),
            source,
        })?;
        let root = root.canonicalize().unwrap_or(root);
        let store =
            LocalFileSystem::new_with_prefix(&root).map_err(|e| DestinationError::Setup {
                url: url.into(),
                message: e.to_string(),
            })?;
        Ok(Destination {
            store: Arc::new(store),
            prefix: String::new(),
            base: format!("file://{}", root.display()),
            metadata: false,
            secrets: vec![],
        })
    }

    /// `prefix` in `bucket`, from the `s3://` URL `url`, with credentials from
    /// the environment or a profile.
    fn s3(
        url: &str,
        bucket: &str,
        prefix: &str,
        endpoint: Option<&str>,
    ) -> Result<Destination, DestinationError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let aws = AwsSettings::load(&env);
        let b = s3_builder(bucket, &env, &aws);
        // Every credential in reach is scrubbed from messages, used or not.
        let secrets = secrets_in_reach(&env, &aws);
        let mut b = with_credentials(b, url, &env, &aws)?;
        b = b.with_region(aws.region.as_deref().unwrap_or("us-east-1"));
        let endpoint = endpoint
            .map(str::to_string)
            .or_else(|| b.get_config_value(&AmazonS3ConfigKey::Endpoint))
            .or_else(|| {
                ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
                    .iter()
                    .find_map(|k| env.get(*k).filter(|v| !v.is_empty()).cloned())
            })
            .or(aws.endpoint);
        if let Some(e) = &endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        let store = b.build().map_err(|e| DestinationError::Setup {
            url: url.into(),
            message: scrub_text(&e.to_string(), &secrets),
        })?;
        Ok(Destination {
            store: Arc::new(store),
            prefix: prefix.trim_matches('/').to_string(),
            base: format!("s3://{bucket}"),
            metadata: true,
            secrets,
        })
    }

    pub(crate) fn store(&self) -> &dyn ObjectStore {
        self.store.as_ref()
    }

    /// A destination over `store`, for tests of what reads it.
    #[cfg(test)]
    pub(crate) fn over(store: Arc<dyn ObjectStore>, base: &str) -> Destination {
        Destination {
            store,
            prefix: String::new(),
            base: base.into(),
            metadata: false,
            secrets: Vec::new(),
        }
    }

    /// The store, for a task that outlives this borrow.
    pub(crate) fn shared_store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    pub(crate) fn keeps_metadata(&self) -> bool {
        self.metadata
    }

    fn join(&self, rest: &str) -> String {
        if self.prefix.is_empty() {
            rest.to_string()
        } else {
            format!("{}/{rest}", self.prefix)
        }
    }

    /// The key of a run's file.
    pub fn key(&self, run_id: &str, rel: &str) -> ObjPath {
        ObjPath::from_iter(self.join(&format!("{run_id}/{rel}")).split('/'))
    }

    /// A key right under the prefix (e.g. `latest`).
    pub fn prefix_key(&self, name: &str) -> ObjPath {
        ObjPath::from_iter(self.join(name).split('/'))
    }

    /// A key as a URL, for messages.
    pub fn url_of(&self, key: &ObjPath) -> String {
        format!("{}/{key}", self.base)
    }

    /// A run's file as a URL, for messages.
    pub fn display_key(&self, run_id: &str, rel: &str) -> String {
        format!("{}/{}", self.base, self.join(&format!("{run_id}/{rel}")))
    }

    /// A storage error as text a user may see: credentials scrubbed, the
    /// kind of failure classified for the hint.
    pub(crate) fn scrub(&self, e: object_store::Error) -> RemoteError {
        let mut message = e.to_string();
        let mut cur = std::error::Error::source(&e);
        while let Some(s) = cur {
            let t = s.to_string();
            if !message.contains(&t) {
                message.push_str(": ");
                message.push_str(&t);
            }
            cur = s.source();
        }
        let text = message.to_ascii_lowercase();
        let kind = match e {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => RemoteErrorKind::Denied,
            _ if [
                "signaturedoesnotmatch",
                "invalidaccesskeyid",
                "accessdenied",
                "403 forbidden",
            ]
            .iter()
            .any(|m| text.contains(m)) =>
            {
                RemoteErrorKind::Denied
            }
            object_store::Error::NotFound { .. } => RemoteErrorKind::NotFound,
            _ if text.contains("nosuchbucket") => RemoteErrorKind::NotFound,
            _ => RemoteErrorKind::Other,
        };
        RemoteError {
            message: scrub_text(&message, &self.secrets),
            kind,
        }
    }
}

/// A builder for `bucket`, with retries, and the environment's settings
/// unless keys come from a profile.
fn s3_builder(bucket: &str, env: &HashMap<String, String>, aws: &AwsSettings) -> AmazonS3Builder {
    let keys_from_env = env.get("AWS_ACCESS_KEY_ID").is_some_and(|v| !v.is_empty());
    // Keys from a profile must not meet a session token from the
    // environment: then nothing is taken from the environment wholesale.
    let base = if keys_from_env || aws.access_key.is_none() {
        AmazonS3Builder::from_env()
    } else {
        AmazonS3Builder::new()
    };
    base.with_bucket_name(bucket).with_retry(RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 5,
        retry_timeout: Duration::from_secs(180),
    })
}

/// The secret keys and session tokens in the environment and the profile.
fn secrets_in_reach(env: &HashMap<String, String>, aws: &AwsSettings) -> Vec<String> {
    let mut secrets: Vec<String> = ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]
        .iter()
        .filter_map(|k| env.get(*k).cloned())
        .collect();
    secrets.extend(aws.secret_key.iter().chain(aws.token.iter()).cloned());
    secrets
}

/// Gives `b` the keys of `aws`; without them, an error when the environment
/// rules out an instance or container role too.
fn with_credentials(
    mut b: AmazonS3Builder,
    url: &str,
    env: &HashMap<String, String>,
    aws: &AwsSettings,
) -> Result<AmazonS3Builder, DestinationError> {
    match (&aws.access_key, &aws.secret_key) {
        (Some(k), Some(s)) => {
            b = b.with_access_key_id(k).with_secret_access_key(s);
            if let Some(t) = &aws.token {
                b = b.with_token(t);
            }
        }
        _ if env
            .get("AWS_EC2_METADATA_DISABLED")
            .is_some_and(|v| v == "true")
            && !env.contains_key("AWS_WEB_IDENTITY_TOKEN_FILE")
            && !env.contains_key("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
            && !env.contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI") =>
        {
            return Err(DestinationError::NoCredentials { url: url.into() });
        }
        // Otherwise the instance or container role is asked.
        _ => {}
    }
    Ok(b)
}

fn scrub_text(text: &str, secrets: &[String]) -> String {
    let mut t = text.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        t = t.replace(s.as_str(), "***");
    }
    // S3 echoes a refused request back in its error body: the token it
    // received and the canonical request, which carries the token too.
    for tag in [
        "Token-0",
        "Token-1",
        "CanonicalRequest",
        "StringToSign",
        "StringToSignBytes",
    ] {
        let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
        let mut from = 0;
        while let Some(a) = t[from..].find(&open).map(|i| from + i + open.len()) {
            let b = t[a..].find(&close).map_or(t.len(), |i| a + i);
            t.replace_range(a..b, "***");
            from = a + 3;
        }
    }
    t
}

/// AWS settings that object_store does not read itself: a profile from the
/// shared credentials and config files. (No Debug: it holds secrets.)
#[derive(Default, PartialEq)]
struct AwsSettings {
    access_key: Option<String>,
    secret_key: Option<String>,
    token: Option<String>,
    region: Option<String>,
    endpoint: Option<String>,
}

impl AwsSettings {
    fn load(env: &HashMap<String, String>) -> AwsSettings {
        let home = env.get("HOME").map(PathBuf::from).unwrap_or_default();
        let file = |var: &str, default: &str| {
            env.get(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(default))
        };
        let creds = fs_err::read_to_string(file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"))
            .unwrap_or_default();
        let config =
            fs_err::read_to_string(file("AWS_CONFIG_FILE", ".aws/config")).unwrap_or_default();
        AwsSettings::from_sources(env, &creds, &config)
    }

    /// The environment wins over the profile; the profile is `AWS_PROFILE`
    /// or `default`.
    fn from_sources(env: &HashMap<String, String>, creds: &str, config: &str) -> AwsSettings {
        let profile = env
            .get("AWS_PROFILE")
            .map(String::as_str)
            .unwrap_or("default");
        let c = ini_section(creds, profile);
        let cfg_name = if profile == "default" {
            "default".to_string()
        } else {
            format!("profile {profile}")
        };
        let f = ini_section(config, &cfg_name);
        let pick = |var: &str, key: &str, sec: &HashMap<String, String>| {
            env.get(var)
                .filter(|v| !v.is_empty())
                .or_else(|| sec.get(key))
                .cloned()
        };
        let from_env = env.get("AWS_ACCESS_KEY_ID").is_some_and(|v| !v.is_empty());
        // Keys come as a pair: never a key id from one place and a secret from another.
        let (access_key, secret_key, token) = if from_env {
            (
                env.get("AWS_ACCESS_KEY_ID").cloned(),
                env.get("AWS_SECRET_ACCESS_KEY").cloned(),
                env.get("AWS_SESSION_TOKEN").cloned(),
            )
        } else {
            (
                c.get("aws_access_key_id").cloned(),
                c.get("aws_secret_access_key").cloned(),
                c.get("aws_session_token").cloned(),
            )
        };
        AwsSettings {
            access_key,
            secret_key,
            token,
            region: pick("AWS_REGION", "region", &f)
                .or_else(|| env.get("AWS_DEFAULT_REGION").cloned()),
            endpoint: f.get("endpoint_url").cloned(),
        }
    }
}

/// The `key = value` pairs of one `[section]` of an INI file.
fn ini_section(text: &str, name: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(sec) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = sec.trim() == name;
        } else if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const CREDS: &str = "[default]\naws_access_key_id = AKDEF\naws_secret_access_key = defsecret\n\n[ci]\naws_access_key_id=AKCI\naws_secret_access_key=cisecret\n";
    const CONFIG: &str = "[default]\nregion = eu-west-1\n[profile ci]\nregion = eu-central-1\nendpoint_url = http://127.0.0.1:9000\n";

    #[test]
    fn profile_credentials_region_and_endpoint() {
        let s = AwsSettings::from_sources(&env(&[("AWS_PROFILE", "ci")]), CREDS, CONFIG);
        assert_eq!(s.access_key.as_deref(), Some("AKCI"));
        assert_eq!(s.secret_key.as_deref(), Some("cisecret"));
        assert_eq!(s.region.as_deref(), Some("eu-central-1"));
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        let d = AwsSettings::from_sources(&env(&[]), CREDS, CONFIG);
        assert_eq!(d.access_key.as_deref(), Some("AKDEF"));
        assert_eq!(d.region.as_deref(), Some("eu-west-1"));
        assert_eq!(d.endpoint, None);
    }

    #[test]
    fn environment_keys_win_as_a_pair() {
        let s = AwsSettings::from_sources(
            &env(&[
                ("AWS_ACCESS_KEY_ID", "AKENV"),
                ("AWS_SECRET_ACCESS_KEY", "envsecret"),
                ("AWS_REGION", "us-west-2"),
            ]),
            CREDS,
            CONFIG,
        );
        assert_eq!(s.access_key.as_deref(), Some("AKENV"));
        assert_eq!(s.secret_key.as_deref(), Some("envsecret"));
        assert_eq!(s.region.as_deref(), Some("us-west-2"));
    }

    #[test]
    fn urls_and_keys() {
        let dir = tempfile::tempdir().unwrap();
        let d = Destination::parse("file://out/rel", dir.path(), None).unwrap();
        assert!(dir.path().join("out/rel").is_dir());
        assert_eq!(d.key("r1", "a/b.deb").as_ref(), "r1/a/b.deb");
        assert!(matches!(
            Destination::parse("ftp://x", dir.path(), None),
            Err(DestinationError::Scheme { .. })
        ));
        assert!(matches!(
            Destination::parse("s3:///p", dir.path(), None),
            Err(DestinationError::NoBucket { .. })
        ));
    }

    #[test]
    fn secrets_are_scrubbed() {
        assert_eq!(
            scrub_text("bad key s3cr3tvalue here", &["s3cr3tvalue".into()]),
            "bad key *** here"
        );
        let body = "<Error><Code>InvalidToken</Code><Token-0>FQoGZXIvYXdzEJr</Token-0>\
                    <CanonicalRequest>PUT\nx-amz-security-token:FQoGZXIvYXdzEJr</CanonicalRequest>\
                    <Token-0>second</Token-0></Error>";
        let t = scrub_text(body, &[]);
        assert!(
            !t.contains("FQoGZXIvYXdzEJr") && !t.contains("second"),
            "{t}"
        );
        assert!(
            t.contains("<Code>InvalidToken</Code><Token-0>***</Token-0>"),
            "{t}"
        );
    }
}
