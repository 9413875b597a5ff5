//! Elasticsearch's `_bulk` API: each batch one request of `create` actions
//! (what data streams require, and plain indices take), the ECS documents
//! as they are. A batch counts as taken when the server answers it; items
//! it refuses for good (a mapping conflict) are said, not sent again, and
//! items it asks to be sent again (429, 5xx) make the batch fail.

use crate::Settings;
use serde_json::Value;
use std::io::Read;
use std::time::Duration;

pub struct Client {
    url: String,
    index: String,
    auth: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str, index: &str, settings: &Settings) -> Result<Client, String> {
        use base64::Engine;
        let auth = match (&settings.api_key, &settings.basic) {
            (Some(k), _) => Some(format!("ApiKey {k}")),
            (None, Some((u, p))) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )),
            (None, None) => None,
        };
        let mut agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            .timeout(Duration::from_secs(15));
        if base.starts_with("https://") {
            agent = agent.tls_config(settings.tls()?);
        }
        Ok(Client {
            url: format!("{base}/_bulk"),
            index: index.to_string(),
            auth,
            agent: agent.build(),
        })
    }
}

/// The `_bulk` body for `docs` into `index`.
pub fn body(index: &str, docs: &[Value]) -> String {
    let action = serde_json::json!({"create": {"_index": index}}).to_string();
    let mut out = String::new();
    for d in docs {
        out.push_str(&action);
        out.push('\n');
        out.push_str(&d.to_string());
        out.push('\n');
    }
    out
}

/// Whether a `_bulk` answer took the batch: `Err` when an item must be sent
/// again (429 or 5xx); items refused for good are counted in `Ok`.
pub fn taken(answer: &Value) -> Result<usize, String> {
    if answer["errors"] != Value::Bool(true) {
        return Ok(0);
    }
    let mut refused = 0;
    for item in answer["items"].as_array().into_iter().flatten() {
        let r = item.as_object().and_then(|o| o.values().next());
        let status = r.and_then(|r| r["status"].as_u64()).unwrap_or(200);
        if status == 429 || status >= 500 {
            let why = r.map(|r| r["error"].to_string()).unwrap_or_default();
            return Err(format!(
                "the server asked for an item again ({status}): {why}"
            ));
        }
        if status >= 300 {
            refused += 1;
        }
    }
    Ok(refused)
}

impl crate::Batch for Client {
    fn send(&mut self, docs: &[Value]) -> Result<(), String> {
        let mut req = self
            .agent
            .post(&self.url)
            .set("content-type", "application/x-ndjson");
        if let Some(a) = &self.auth {
            req = req.set("authorization", a);
        }
        let r = req.send_string(&body(&self.index, docs));
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let mut text = String::new();
                let _ = r.into_reader().take(400).read_to_string(&mut text);
                return Err(match code {
                    401 | 403 => format!(
                        "{} refused the credentials ({code}): set SLATE_ELASTICSEARCH_API_KEY, or SLATE_ELASTICSEARCH_USER and SLATE_ELASTICSEARCH_PASSWORD",
                        self.url
                    ),
                    _ => format!("{}: {code}: {}", self.url, text.trim()),
                });
            }
            Err(e) => return Err(format!("{}: {e}", self.url)),
        };
        let mut text = String::new();
        resp.into_reader()
            .take(64 << 20)
            .read_to_string(&mut text)
            .map_err(|e| format!("{}: {e}", self.url))?;
        let answer: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a _bulk answer: {e}", self.url))?;
        let refused = taken(&answer)?;
        if refused > 0 {
            eprintln!(
                "warning: {} refused {refused} log document(s) for good (see its mapping of index `{}`)",
                self.url, self.index
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_bulk_body_is_one_create_action_per_document() {
        let b = body(
            "slate",
            &[json!({"message": "a"}), json!({"message": "b\nc"})],
        );
        let lines: Vec<&str> = b.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], r#"{"create":{"_index":"slate"}}"#);
        assert_eq!(lines[3], r#"{"message":"b\nc"}"#);
        assert!(b.ends_with('\n'));
    }

    #[test]
    fn items_to_send_again_fail_the_batch_and_refused_ones_do_not() {
        assert_eq!(taken(&json!({"errors": false, "items": []})), Ok(0));
        let again = json!({"errors": true, "items": [{"create": {"status": 201}}, {"create": {"status": 429, "error": {"type": "es_rejected_execution_exception"}}}]});
        assert!(taken(&again).is_err());
        let refused = json!({"errors": true, "items": [{"create": {"status": 400, "error": {"type": "mapper_parsing_exception"}}}]});
        assert_eq!(taken(&refused), Ok(1));
    }
}
