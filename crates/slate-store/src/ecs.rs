//! The run's log as Elastic Common Schema NDJSON (`run.ecs.ndjson` in the
//! run folder): one document per event, what a log pipeline (Filebeat,
//! Logstash, Elasticsearch's `_bulk`) takes as it is. Output lines and
//! errors arrive masked, as in every other log.
//!
//! Fields: `@timestamp`, `log.level`, `message` (the line the plain log
//! has), `event.kind`/`event.action`/`event.dataset`/`event.outcome`/
//! `event.duration` (ns, on phase and target ends), `labels.run`,
//! `labels.target`, `labels.step`, `labels.provider`, `labels.image`,
//! `labels.stream`, `host.name`, `service.name`, `ecs.version`, and what
//! ECS has no field for under `slate.*` (exit code, artifact, layer).

use crate::events::{Event, EventKind, EventSink, TargetStatus};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, UNIX_EPOCH};

/// The ECS version the documents follow.
pub const ECS_VERSION: &str = "8.11.0";

/// The file name in the run folder.
pub const FILE: &str = "run.ecs.ndjson";

#[derive(Default)]
struct Targets {
    run: String,
    provider: HashMap<String, String>,
    image: HashMap<String, String>,
    /// The phase a target is in, and when it began.
    step: HashMap<String, (String, f64)>,
    started: HashMap<String, f64>,
}

/// Writes one ECS document per event.
pub struct EcsLog {
    path: PathBuf,
    host: String,
    state: Mutex<(Option<File>, Targets)>,
}

impl EcsLog {
    /// Appends to `run.ecs.ndjson` in the run folder `dir`.
    pub fn create(dir: &Path) -> std::io::Result<EcsLog> {
        let path = dir.join(FILE);
        let file = fs_err::File::options()
            .create(true)
            .append(true)
            .open(&path)?
            .into_parts()
            .0;
        let host = fs_err::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        Ok(EcsLog {
            path,
            host,
            state: Mutex::new((Some(file), Targets::default())),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl EventSink for EcsLog {
    fn event(&self, e: &Event) {
        let mut st = self.state.lock().unwrap();
        let (file, targets) = &mut *st;
        let doc = document(e, targets, &self.host);
        if let Some(f) = file {
            let mut line = doc.to_string();
            line.push('\n');
            // A full disk ends the ECS log, not the build.
            if f.write_all(line.as_bytes()).is_err() {
                *file = None;
            }
        }
    }
}

/// The ECS document of `e`, tracking what later events need to know
/// (the run, each target's provider and step).
fn document(e: &Event, t: &mut Targets, host: &str) -> Value {
    let name = e.target.clone().unwrap_or_default();
    let mut level = "info";
    let mut outcome: Option<&str> = None;
    let mut duration: Option<f64> = None;
    let mut slate = Map::new();
    let mut stream: Option<&str> = None;
    let message = match &e.kind {
        EventKind::RunStarted { run_id, targets } => {
            t.run = run_id.clone();
            format!("run {run_id} started: {}", targets.join(", "))
        }
        EventKind::BakeLayer {
            layer,
            description,
            state,
            seconds,
        } => {
            slate.insert("layer".into(), json!({"key": layer, "state": state}));
            if state == "failed" {
                level = "error";
            }
            format!(
                "layer {} {description}: {state}{}",
                &layer[..12.min(layer.len())],
                seconds.map(|s| format!(" in {s:.1}s")).unwrap_or_default()
            )
        }
        EventKind::BakeOutput { stream: s, line } | EventKind::Output { stream: s, line } => {
            stream = Some(s);
            line.clone()
        }
        EventKind::BakeFailed { error } => {
            level = "error";
            outcome = Some("failure");
            format!("bake failed: {error}")
        }
        EventKind::TargetQueued { provider, image } => {
            t.provider.insert(name.clone(), provider.clone());
            t.image.insert(name.clone(), image.clone());
            t.started.insert(name.clone(), e.time);
            format!("queued ({provider}, image {image})")
        }
        EventKind::PhaseStarted { phase } => {
            t.step.insert(name.clone(), (phase.clone(), e.time));
            phase.clone()
        }
        EventKind::PhaseEnded { phase, ok } => {
            if let Some((_, start)) = t.step.get(&name) {
                duration = Some(e.time - start);
            }
            outcome = Some(if *ok { "success" } else { "failure" });
            if !ok {
                level = "error";
            }
            format!("{phase} {}", if *ok { "done" } else { "failed" })
        }
        EventKind::Retry { attempt, error } => {
            level = "warn";
            format!("infrastructure failure, retrying (attempt {attempt}): {error}")
        }
        EventKind::Artifact { path, size, sha256 } => {
            slate.insert(
                "artifact".into(),
                json!({"path": path, "size": size, "sha256": sha256}),
            );
            format!("artifact {path} ({size} bytes, sha256 {sha256})")
        }
        EventKind::TargetFinished {
            status,
            exit_code,
            error,
        } => {
            if let Some(start) = t.started.get(&name) {
                duration = Some(e.time - start);
            }
            outcome = Some(match status {
                TargetStatus::Succeeded => "success",
                TargetStatus::Skipped | TargetStatus::Cancelled => "unknown",
                _ => "failure",
            });
            if !matches!(status, TargetStatus::Succeeded | TargetStatus::Skipped) {
                level = "error";
            }
            slate.insert("status".into(), json!(status));
            slate.insert("exit_code".into(), json!(exit_code));
            format!(
                "{}{}",
                status.as_str(),
                error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
            )
        }
        EventKind::RunFinished { succeeded, failed } => {
            outcome = Some(if *failed == 0 { "success" } else { "failure" });
            format!("run finished: {succeeded} succeeded, {failed} failed")
        }
    };
    let action = serde_json::to_value(&e.kind)
        .ok()
        .and_then(|v| v.get("event").and_then(|a| a.as_str()).map(str::to_string))
        .unwrap_or_default();
    let mut labels = Map::new();
    labels.insert("run".into(), json!(t.run));
    if e.target.is_some() {
        labels.insert("target".into(), json!(name));
        if let Some(p) = t.provider.get(&name) {
            labels.insert("provider".into(), json!(p));
        }
        if let Some(i) = t.image.get(&name) {
            labels.insert("image".into(), json!(i));
        }
        if let Some((step, _)) = t.step.get(&name) {
            labels.insert("step".into(), json!(step));
        }
    }
    if let Some(s) = stream {
        labels.insert("stream".into(), json!(s));
    }
    let mut event = Map::new();
    event.insert("kind".into(), json!("event"));
    event.insert("action".into(), json!(action));
    event.insert("dataset".into(), json!("slate.run"));
    if let Some(o) = outcome {
        event.insert("outcome".into(), json!(o));
    }
    if let Some(d) = duration {
        event.insert("duration".into(), json!((d.max(0.0) * 1e9) as u64));
    }
    let ts = UNIX_EPOCH + Duration::from_secs_f64(e.time.max(0.0));
    let mut doc = json!({
        "@timestamp": humantime::format_rfc3339_millis(ts).to_string(),
        "log": {"level": level, "logger": "slate"},
        "message": message,
        "event": event,
        "labels": labels,
        "host": {"name": host},
        "service": {"name": "slate", "version": env!("CARGO_PKG_VERSION")},
        "ecs": {"version": ECS_VERSION},
    });
    if !slate.is_empty() {
        doc["slate"] = Value::Object(slate);
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_is_one_ecs_document_with_the_targets_labels() {
        let dir = tempfile::tempdir().unwrap();
        let log = EcsLog::create(dir.path()).unwrap();
        let ev = |target: Option<&str>, kind| Event::new(target, kind);
        log.event(&ev(
            None,
            EventKind::RunStarted {
                run_id: "r1".into(),
                targets: vec!["a".into()],
            },
        ));
        log.event(&ev(
            Some("a"),
            EventKind::TargetQueued {
                provider: "ssh".into(),
                image: "img".into(),
            },
        ));
        log.event(&ev(
            Some("a"),
            EventKind::PhaseStarted {
                phase: "run: make".into(),
            },
        ));
        log.event(&ev(
            Some("a"),
            EventKind::Output {
                stream: "stderr",
                line: "cc: warning".into(),
            },
        ));
        log.event(&ev(
            Some("a"),
            EventKind::TargetFinished {
                status: TargetStatus::Failed,
                exit_code: Some(2),
                error: Some("exit 2".into()),
            },
        ));
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        let docs: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(docs.len(), 5);
        let out = &docs[3];
        assert_eq!(out["message"], "cc: warning");
        assert_eq!(out["labels"]["run"], "r1");
        assert_eq!(out["labels"]["target"], "a");
        assert_eq!(out["labels"]["provider"], "ssh");
        assert_eq!(out["labels"]["step"], "run: make");
        assert_eq!(out["labels"]["stream"], "stderr");
        assert_eq!(out["event"]["action"], "output");
        assert_eq!(out["ecs"]["version"], ECS_VERSION);
        let end = &docs[4];
        assert_eq!(end["log"]["level"], "error");
        assert_eq!(end["event"]["outcome"], "failure");
        assert_eq!(end["slate"]["exit_code"], 2);
        assert_eq!(end["message"], "failed: exit 2");
        let ts = end["@timestamp"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts}");
    }
}
