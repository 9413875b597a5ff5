//! RFC 5424 messages, octet-counted (RFC 6587) over TCP, or over TLS as
//! RFC 5425 says. Each ECS document becomes one message: its level the
//! severity, its action the MSGID, the run, target, step, provider, image
//! and stream as structured data, its message the MSG.

use serde_json::Value;
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// The structured-data id: slate's parameters under the enterprise
/// number RFC 5612 sets aside for documentation and examples.
pub const SD_ID: &str = "slate@32473";

/// Facility `user` (1).
const FACILITY: u8 = 1;

/// The RFC 5424 message for an ECS document.
pub fn format(doc: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let severity = match doc["log"]["level"].as_str() {
        Some("error") => 3,
        Some("warn") => 4,
        Some("debug") => 7,
        _ => 6,
    };
    let pri = FACILITY * 8 + severity;
    let ts = doc["@timestamp"]
        .as_str()
        .filter(|t| !t.is_empty())
        .unwrap_or("-");
    let host = header_field(&s(&doc["host"]["name"]), 255);
    let msgid = header_field(&s(&doc["event"]["action"]), 32);
    let mut sd = format!("[{SD_ID}");
    let labels = doc["labels"].as_object();
    for key in ["run", "target", "step", "provider", "image", "stream"] {
        if let Some(v) = labels.and_then(|l| l.get(key)).and_then(|v| v.as_str()) {
            sd.push_str(&format!(" {key}=\"{}\"", param_value(v)));
        }
    }
    if let Some(o) = doc["event"]["outcome"].as_str() {
        sd.push_str(&format!(" outcome=\"{}\"", param_value(o)));
    }
    if let Some(c) = doc["slate"]["exit_code"].as_i64() {
        sd.push_str(&format!(" exit_code=\"{c}\""));
    }
    sd.push(']');
    let msg = s(&doc["message"]);
    format!("<{pri}>1 {ts} {host} slate - {msgid} {sd} {msg}")
}

/// A header field: printable ASCII without spaces, at most `max`, `-`
/// when empty.
fn header_field(s: &str, max: usize) -> String {
    let f: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if f.is_empty() {
        "-".into()
    } else {
        f
    }
}

/// A PARAM-VALUE: `"`, `\` and `]` escaped.
fn param_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One connection to a syslog server, made when first needed.
pub struct Conn {
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    stream: Option<Box<dyn Write + Send>>,
}

impl Conn {
    pub fn new(host: &str, port: u16, tls: Option<Arc<rustls::ClientConfig>>) -> Conn {
        Conn {
            host: host.to_string(),
            port,
            tls,
            stream: None,
        }
    }

    fn open(&self) -> Result<Box<dyn Write + Send>, String> {
        let addr = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.host))?
            .next()
            .ok_or_else(|| format!("{} has no address", self.host))?;
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .map_err(|e| format!("cannot connect to {}:{}: {e}", self.host, self.port))?;
        tcp.set_write_timeout(Some(Duration::from_secs(5)))
            .and_then(|()| tcp.set_read_timeout(Some(Duration::from_secs(5))))
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let Some(cfg) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let name = rustls_pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| format!("`{}`: {e}", self.host))?;
        let conn =
            rustls::ClientConnection::new(cfg.clone(), name).map_err(|e| format!("TLS: {e}"))?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        // The handshake now, so a certificate that is not trusted is said
        // as such instead of as a failed write.
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| format!("TLS with {}:{}: {e}", self.host, self.port))?;
        }
        Ok(Box::new(tls))
    }
}

impl crate::Batch for Conn {
    fn send(&mut self, docs: &[Value]) -> Result<(), String> {
        if self.stream.is_none() {
            self.stream = Some(self.open()?);
        }
        let mut frames = Vec::new();
        for d in docs {
            let m = format(d);
            frames.extend_from_slice(format!("{} {m}", m.len()).as_bytes());
        }
        let w = self.stream.as_mut().expect("opened");
        let r = w.write_all(&frames).and_then(|()| w.flush());
        if let Err(e) = r {
            self.stream = None;
            return Err(format!("syslog {}:{}: {e}", self.host, self.port));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_ecs_document_becomes_one_rfc5424_message() {
        let doc = json!({
            "@timestamp": "2026-12-05T18:00:00.123Z",
            "log": {"level": "error"},
            "message": "failed: exit 2",
            "event": {"action": "target_finished", "outcome": "failure"},
            "labels": {"run": "r1", "target": "a\"b]", "step": "run: make"},
            "host": {"name": "build host"},
            "slate": {"exit_code": 2},
        });
        assert_eq!(
            format(&doc),
            "<11>1 2026-12-05T18:00:00.123Z buildhost slate - target_finished \
             [slate@32473 run=\"r1\" target=\"a\\\"b\\]\" step=\"run: make\" outcome=\"failure\" exit_code=\"2\"] failed: exit 2"
        );
        assert!(format(&json!({})).starts_with("<14>1 - - slate - - [slate@32473] "));
    }
}
