//! A small client for the EC2 Query API and the EBS direct API: requests
//! signed with AWS's own SigV4 signer, answers read as XML (EC2) or JSON
//! (EBS). Only what slate calls; retried on throttling and server errors.

use aws_credential_types::Credentials as AwsCredentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// The EC2 API version slate speaks.
const VERSION: &str = "2016-11-15";

/// Credentials and where they came from (said by `slate check`).
#[derive(Clone)]
pub struct Credentials {
    pub key_id: String,
    pub secret: String,
    pub token: Option<String>,
    pub source: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret, not even in a debug print.
        write!(f, "Credentials({}, from {})", self.key_id, self.source)
    }
}

/// A failed call: the service's own error code and message, or why it
/// could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{action}: {code}: {message}")]
    Service {
        action: String,
        code: String,
        message: String,
    },
    #[error("{action}: cannot reach {endpoint}: {why}")]
    Transport {
        action: String,
        endpoint: String,
        why: String,
    },
    #[error("{action}: unexpected answer: {why}")]
    Answer { action: String, why: String },
    #[error("cannot sign the request: {0}")]
    Sign(String),
}

impl ApiError {
    /// The service's error code, if it answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ApiError::Service { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// The usual AWS chain: the environment's keys, then the shared
/// credentials and config files' profile (`AWS_PROFILE`, else `default`),
/// then the instance's role (IMDSv2), unless `AWS_EC2_METADATA_DISABLED`.
pub fn credentials() -> Result<Credentials, String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let (Some(key_id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        return Ok(Credentials {
            key_id,
            secret,
            token: env("AWS_SESSION_TOKEN"),
            source: "the environment (AWS_ACCESS_KEY_ID)".into(),
        });
    }
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    for (file, section) in [
        (credentials_file(), profile.clone()),
        (config_file(), config_section(&profile)),
    ] {
        let Some(file) = file else { continue };
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let values = ini_section(&text, &section);
        let get = |k: &str| {
            values
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        if let (Some(key_id), Some(secret)) =
            (get("aws_access_key_id"), get("aws_secret_access_key"))
        {
            return Ok(Credentials {
                key_id,
                secret,
                token: get("aws_session_token"),
                source: format!("profile `{profile}` in {}", file.display()),
            });
        }
    }
    if env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Err(format!(
            "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or profile `{profile}` in ~/.aws/credentials (AWS_PROFILE names another)"
        ));
    }
    instance_role().map_err(|why| {
        format!(
            "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or profile `{profile}` in ~/.aws/credentials, or run on an instance with a role ({why})"
        )
    })
}

/// The region: as configured, else `AWS_REGION`, `AWS_DEFAULT_REGION`, the
/// profile's `region` in the config file.
pub fn region(configured: Option<&str>) -> Result<String, String> {
    if let Some(r) = configured.filter(|r| !r.is_empty()) {
        return Ok(r.to_string());
    }
    for k in ["AWS_REGION", "AWS_DEFAULT_REGION"] {
        if let Some(r) = std::env::var(k).ok().filter(|v| !v.is_empty()) {
            return Ok(r);
        }
    }
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    if let Some(text) = config_file().and_then(|f| std::fs::read_to_string(f).ok()) {
        if let Some((_, r)) = ini_section(&text, &config_section(&profile))
            .into_iter()
            .find(|(k, _)| k == "region")
        {
            return Ok(r);
        }
    }
    Err("no AWS region: set `region` under [providers.ec2], or AWS_REGION".into())
}

fn home_file(var: &str, rel: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(rel)),
    }
}

fn credentials_file() -> Option<PathBuf> {
    home_file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials")
}

fn config_file() -> Option<PathBuf> {
    home_file("AWS_CONFIG_FILE", ".aws/config")
}

/// A profile's section name in the config file.
fn config_section(profile: &str) -> String {
    if profile == "default" {
        profile.into()
    } else {
        format!("profile {profile}")
    }
}

/// The `key = value` lines of `[section]` in an INI file.
fn ini_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
            continue;
        }
        if let (true, Some((k, v))) = (inside, line.split_once('=')) {
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

/// The instance role's credentials from the instance metadata service.
fn instance_role() -> Result<Credentials, String> {
    const IMDS: &str = "http://169.254.169.254";
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(2))
        .build();
    let err = |e: ureq::Error| format!("instance metadata: {e}");
    let token = agent
        .put(&format!("{IMDS}/latest/api/token"))
        .set("X-aws-ec2-metadata-token-ttl-seconds", "300")
        .call()
        .map_err(err)?
        .into_string()
        .map_err(|e| e.to_string())?;
    let get = |path: &str| {
        agent
            .get(&format!(
                "{IMDS}/latest/meta-data/iam/security-credentials/{path}"
            ))
            .set("X-aws-ec2-metadata-token", &token)
            .call()
            .map_err(err)?
            .into_string()
            .map_err(|e| e.to_string())
    };
    let role = get("")?;
    let role = role.lines().next().unwrap_or_default().trim().to_string();
    let v: serde_json::Value =
        serde_json::from_str(&get(&role)?).map_err(|e| format!("instance metadata: {e}"))?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    match (s("AccessKeyId"), s("SecretAccessKey")) {
        (Some(key_id), Some(secret)) => Ok(Credentials {
            key_id,
            secret,
            token: s("Token"),
            source: format!("the instance role `{role}`"),
        }),
        _ => Err("instance metadata: no keys in the role's answer".into()),
    }
}

/// Percent-encodes `s` as SigV4 wants it (only `A-Za-z0-9-_.~` kept).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An EC2 (and EBS) endpoint with credentials.
pub struct Client {
    pub endpoint: String,
    ebs_endpoint: String,
    pub region: String,
    creds: Credentials,
    agent: ureq::Agent,
}

impl Client {
    /// `endpoint` overrides AWS's own (EC2-compatible clouds, test
    /// servers); the EBS direct API is then asked at the same address.
    pub fn new(endpoint: Option<&str>, region: String, creds: Credentials) -> Client {
        let (endpoint, ebs_endpoint) = match endpoint {
            Some(e) => {
                let e = e.trim_end_matches('/').to_string();
                (e.clone(), e)
            }
            None => (
                format!("https://ec2.{region}.amazonaws.com"),
                format!("https://ebs.{region}.amazonaws.com"),
            ),
        };
        Client {
            endpoint,
            ebs_endpoint,
            region,
            creds,
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(10))
                .timeout(Duration::from_secs(120))
                .build(),
        }
    }

    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// The SigV4 headers for a request.
    fn sign(
        &self,
        service: &str,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Vec<(String, String)>, ApiError> {
        let identity: Identity = AwsCredentials::new(
            &self.creds.key_id,
            &self.creds.secret,
            self.creds.token.clone(),
            None,
            "slate",
        )
        .into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(service)
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| ApiError::Sign(e.to_string()))?
            .into();
        let req = SignableRequest::new(
            method,
            url,
            headers.iter().copied(),
            SignableBody::Bytes(body),
        )
        .map_err(|e| ApiError::Sign(e.to_string()))?;
        let (instructions, _) = sign(req, &params)
            .map_err(|e| ApiError::Sign(e.to_string()))?
            .into_parts();
        Ok(instructions
            .headers()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("host"))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    /// Calls `action` with `params`; the answer's XML.
    pub fn call(&self, action: &str, params: &[(String, String)]) -> Result<Node, ApiError> {
        let mut body = format!("Action={}&Version={VERSION}", encode(action));
        for (k, v) in params {
            body.push('&');
            body.push_str(&encode(k));
            body.push('=');
            body.push_str(&encode(v));
        }
        let url = format!("{}/", self.endpoint);
        let ct = "application/x-www-form-urlencoded; charset=utf-8";
        let (status, answer) = self.send(
            action,
            "ec2",
            "POST",
            &url,
            &[("content-type", ct)],
            body.as_bytes(),
        )?;
        let xml = parse(&answer).map_err(|why| ApiError::Answer {
            action: action.into(),
            why,
        })?;
        if status >= 300 {
            let err = xml.find("Error");
            let code = err
                .and_then(|e| e.text_at(&["Code"]))
                .unwrap_or("HTTP error");
            let message = err.and_then(|e| e.text_at(&["Message"])).unwrap_or("");
            return Err(ApiError::Service {
                action: action.into(),
                code: code.to_string(),
                message: format!("{message} (HTTP {status})"),
            });
        }
        Ok(xml)
    }

    /// A call of the EBS direct API: `(status, JSON answer)`; an error
    /// answer is an [`ApiError::Service`].
    pub fn ebs(
        &self,
        action: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<serde_json::Value, ApiError> {
        let url = format!("{}{path}", self.ebs_endpoint);
        let (status, answer) = self.send(action, "ebs", method, &url, headers, body)?;
        let json: serde_json::Value = if answer.iter().all(u8::is_ascii_whitespace) {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&answer).map_err(|e| ApiError::Answer {
                action: action.into(),
                why: format!(
                    "{e}: {}",
                    String::from_utf8_lossy(&answer[..answer.len().min(200)])
                ),
            })?
        };
        if status >= 300 {
            let s = |k: &str| {
                json.get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string()
            };
            return Err(ApiError::Service {
                action: action.into(),
                code: [s("Reason"), s("__type"), format!("HTTP {status}")]
                    .into_iter()
                    .find(|c| !c.is_empty())
                    .unwrap_or_default(),
                message: s("Message"),
            });
        }
        Ok(json)
    }

    /// Sends a signed request, retrying throttling and server errors with
    /// backoff (5 tries); `(status, body)`.
    fn send(
        &self,
        action: &str,
        service: &str,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), ApiError> {
        let mut delay = Duration::from_millis(200);
        let mut tries = 0;
        loop {
            tries += 1;
            let signed = self.sign(service, method, url, headers, body)?;
            let mut req = self.agent.request(method, url);
            for (k, v) in headers {
                req = req.set(k, v);
            }
            for (k, v) in &signed {
                req = req.set(k, v);
            }
            let res = req.send_bytes(body);
            let (status, resp) = match res {
                Ok(r) => (r.status(), r),
                Err(ureq::Error::Status(code, r)) => (code, r),
                Err(ureq::Error::Transport(t)) => {
                    if tries < 5 {
                        std::thread::sleep(delay);
                        delay *= 2;
                        continue;
                    }
                    return Err(ApiError::Transport {
                        action: action.into(),
                        endpoint: if service == "ebs" {
                            self.ebs_endpoint.clone()
                        } else {
                            self.endpoint.clone()
                        },
                        why: t.to_string(),
                    });
                }
            };
            let mut answer = Vec::new();
            resp.into_reader()
                .take(16 << 20)
                .read_to_end(&mut answer)
                .map_err(|e| ApiError::Transport {
                    action: action.into(),
                    endpoint: self.endpoint.clone(),
                    why: e.to_string(),
                })?;
            let throttled = status == 503
                || status == 500
                || (status == 400
                    && [&b"RequestLimitExceeded"[..], b"Throttling"]
                        .iter()
                        .any(|c| answer.windows(c.len()).any(|w| w == *c)));
            if throttled && tries < 5 {
                std::thread::sleep(delay);
                delay *= 2;
                continue;
            }
            return Ok((status, answer));
        }
    }
}

/// An XML element: its name (without namespace), text and children.
#[derive(Debug, Default, Clone)]
pub struct Node {
    pub name: String,
    pub text: String,
    pub children: Vec<Node>,
}

impl Node {
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The text of the element at `path` below this one.
    pub fn text_at(&self, path: &[&str]) -> Option<&str> {
        let mut n = self;
        for p in path {
            n = n.child(p)?;
        }
        Some(n.text.as_str())
    }

    /// The `<item>`s of the list element `name`.
    pub fn items<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a Node> + 'a {
        self.child(name)
            .into_iter()
            .flat_map(|l| l.children.iter().filter(|c| c.name == "item"))
    }

    /// The first element named `name`, this one or below, depth first.
    pub fn find(&self, name: &str) -> Option<&Node> {
        if self.name == name {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(name))
    }

    /// A resource's tags (`tagSet`) as pairs.
    pub fn tags(&self) -> Vec<(String, String)> {
        self.items("tagSet")
            .map(|t| {
                (
                    t.text_at(&["key"]).unwrap_or_default().to_string(),
                    t.text_at(&["value"]).unwrap_or_default().to_string(),
                )
            })
            .collect()
    }
}

/// Parses an XML document into its root element.
pub fn parse(xml: &[u8]) -> Result<Node, String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut stack: Vec<Node> = vec![Node::default()];
    let mut buf = Vec::new();
    let name_of = |raw: &[u8]| String::from_utf8_lossy(raw).into_owned();
    loop {
        let ev = reader
            .read_event_into(&mut buf)
            .map_err(|e| format!("not XML: {e}"))?;
        match ev {
            Event::Start(e) => stack.push(Node {
                name: name_of(e.local_name().as_ref()),
                ..Default::default()
            }),
            Event::Empty(e) => {
                let n = Node {
                    name: name_of(e.local_name().as_ref()),
                    ..Default::default()
                };
                stack.last_mut().expect("root").children.push(n);
            }
            Event::End(_) => {
                let mut n = stack.pop().expect("an open element");
                // Trimmed whole: an entity splits the text into pieces.
                n.text = n.text.trim().to_string();
                let parent = stack.last_mut().ok_or("unbalanced XML")?;
                parent.children.push(n);
            }
            Event::Text(t) => {
                let s = t.decode().map_err(|e| format!("not UTF-8: {e}"))?;
                stack.last_mut().expect("root").text.push_str(&s);
            }
            Event::CData(t) => {
                let s = t.decode().map_err(|e| format!("not UTF-8: {e}"))?;
                stack.last_mut().expect("root").text.push_str(&s);
            }
            Event::GeneralRef(r) => {
                let s = match r.resolve_char_ref().map_err(|e| e.to_string())? {
                    Some(c) => c.to_string(),
                    None => {
                        let name = r.decode().map_err(|e| e.to_string())?;
                        quick_xml::escape::resolve_predefined_entity(&name)
                            .ok_or_else(|| format!("unknown entity `&{name};`"))?
                            .to_string()
                    }
                };
                stack.last_mut().expect("root").text.push_str(&s);
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    if stack.len() != 1 {
        return Err("the XML ends inside an element".into());
    }
    let root = stack.pop().expect("root");
    root.children
        .into_iter()
        .next()
        .ok_or_else(|| "an empty answer".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec2_answers_parse_with_lists_tags_and_entities() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <reservationSet><item><instancesSet><item>
    <instanceId>i-1</instanceId><privateIpAddress>10.0.0.4</privateIpAddress>
    <instanceState><code>16</code><name>running</name></instanceState>
    <tagSet><item><key>slate:target</key><value>a &amp; b</value></item></tagSet>
  </item></instancesSet></item></reservationSet>
</DescribeInstancesResponse>"#;
        let root = parse(xml).unwrap();
        let inst = root.find("instancesSet").unwrap().children[0].clone();
        assert_eq!(inst.text_at(&["instanceId"]), Some("i-1"));
        assert_eq!(inst.text_at(&["instanceState", "name"]), Some("running"));
        assert_eq!(inst.tags(), [("slate:target".into(), "a & b".into())]);
    }

    #[test]
    fn broken_xml_is_an_error_not_a_panic() {
        for bad in [&b"<a><b></a>"[..], b"<a>", b"", b"\xff\xfe<"] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn only_unreserved_characters_are_left_unencoded() {
        assert_eq!(encode("Tag.1.Key"), "Tag.1.Key");
        assert_eq!(encode("slate:run a/b"), "slate%3Arun%20a%2Fb");
    }

    #[test]
    fn profiles_are_read_from_their_own_section() {
        let text = "[default]\naws_access_key_id = A\n[profile ci]\nregion = eu-west-1\n# x\n[ci]\naws_access_key_id=B\n";
        assert_eq!(
            ini_section(text, "ci"),
            [("aws_access_key_id".into(), "B".into())]
        );
        assert_eq!(
            ini_section(text, &config_section("ci")),
            [("region".into(), "eu-west-1".into())]
        );
    }
}
