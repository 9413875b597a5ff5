//! The run folder: `run.json`, one whole log per target (and per baked
//! image), and the same as ECS NDJSON ([`crate::ecs`]).

use crate::events::{Event, EventKind, EventSink, TargetStatus};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RunRecord {
    pub run_id: String,
    pub started: f64,
    pub ended: Option<f64>,
    pub command: Vec<String>,
    /// The slate process making the run (`slate logs -f` stops following
    /// when it is gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub targets: Vec<TargetRecord>,
    pub images: Vec<ImageRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetRecord {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub status: Option<TargetStatus>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub phases: Vec<PhaseRecord>,
    /// What it collected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<ArtifactRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArtifactRecord {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseRecord {
    pub name: String,
    pub start: f64,
    pub end: Option<f64>,
    pub ok: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    pub layers: Vec<LayerRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerRecord {
    /// When its bake began (cached layers have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<f64>,
    pub layer: String,
    pub description: String,
    pub state: String,
    pub seconds: Option<f64>,
}

impl<'de> Deserialize<'de> for TargetStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "succeeded" => TargetStatus::Succeeded,
            "failed" => TargetStatus::Failed,
            "infra_failed" => TargetStatus::InfraFailed,
            "cancelled" => TargetStatus::Cancelled,
            _ => TargetStatus::Skipped,
        })
    }
}

struct Inner {
    record: RunRecord,
    logs: HashMap<String, Log>,
}

/// How much command output one log file keeps. Past it, output lines are
/// counted instead of written (slate's own `==>` lines still are), so a
/// build printing without end cannot fill the disk through its log.
pub const MAX_LOG_OUTPUT: u64 = 256 << 20;

struct Log {
    file: File,
    output: u64,
    /// Output lines and bytes left out since the last note about them.
    dropped: (u64, u64),
}

/// Writes the run folder from the event stream.
pub struct RunRecorder {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Output bytes kept per log ([`MAX_LOG_OUTPUT`]).
    log_cap: u64,
    /// `run.ecs.ndjson`, when it could be opened.
    ecs: Option<crate::ecs::EcsLog>,
}

impl RunRecorder {
    pub fn create(
        runs_dir: &Path,
        run_id: &str,
        command: Vec<String>,
    ) -> std::io::Result<RunRecorder> {
        let dir = runs_dir.join(run_id);
        std::fs::create_dir_all(&dir).map_err(|e| {
            std::io::Error::new(e.kind(), format!("create `{}`: {e}", dir.display()))
        })?;
        let rec = RunRecorder {
            log_cap: MAX_LOG_OUTPUT,
            ecs: crate::ecs::EcsLog::create(&dir).ok(),
            dir,
            inner: Mutex::new(Inner {
                record: RunRecord {
                    run_id: run_id.to_string(),
                    started: crate::events::now(),
                    command,
                    pid: Some(std::process::id()),
                    ..Default::default()
                },
                logs: HashMap::new(),
            }),
        };
        rec.save(&rec.inner.lock().unwrap().record);
        Ok(rec)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn save(&self, r: &RunRecord) {
        let tmp = self.dir.join("run.json.tmp");
        if let Ok(data) = serde_json::to_vec_pretty(r) {
            if fs_err::write(&tmp, data).is_ok() {
                let _ = fs_err::rename(&tmp, self.dir.join("run.json"));
            }
        }
    }

    fn log<'a>(&self, inner: &'a mut Inner, file: &str) -> &'a mut Log {
        inner.logs.entry(file.to_string()).or_insert_with(|| Log {
            file: File::options()
                .create(true)
                .append(true)
                .open(self.dir.join(file))
                .unwrap_or_else(|_| File::open("/dev/null").unwrap()),
            output: 0,
            dropped: (0, 0),
        })
    }

    /// A line of slate's own (a phase, an artifact, a failure): always kept,
    /// after a note of any output left out before it.
    fn log_line(&self, inner: &mut Inner, file: &str, line: &str) {
        let cap = self.log_cap;
        let log = self.log(inner, file);
        if log.dropped.0 > 0 {
            let (lines, bytes) = std::mem::take(&mut log.dropped);
            let _ = writeln!(
                log.file,
                "==> {lines} output line(s), {bytes} bytes, left out of this log (it keeps {} MiB of output)",
                cap >> 20
            );
        }
        let _ = writeln!(log.file, "{line}");
    }

    /// A line of the command's output, kept while the log is under its cap.
    fn log_output(&self, inner: &mut Inner, file: &str, line: &str) {
        let size = line.len() as u64 + 1;
        let cap = self.log_cap;
        let log = self.log(inner, file);
        if log.output + size > cap {
            if log.output <= cap {
                log.output = cap + 1;
                let _ = writeln!(
                    log.file,
                    "==> this log keeps {} MiB of output: what follows is left out (the terminal still shows it)",
                    cap >> 20
                );
            }
            log.dropped.0 += 1;
            log.dropped.1 += size;
            return;
        }
        log.output += size;
        let _ = writeln!(log.file, "{line}");
    }

    /// Writes what `kind` says to the log of the target or image `name`.
    fn log_event(&self, inner: &mut Inner, name: &str, kind: &EventKind) {
        let log = format!("{name}.log");
        let bake_log = format!("bake-{name}.log");
        match kind {
            EventKind::BakeLayer {
                layer,
                description,
                state,
                seconds,
            } => {
                let line = format!(
                    "==> layer {} {description}: {state}{}",
                    &layer[..12.min(layer.len())],
                    seconds.map(|s| format!(" in {s:.1}s")).unwrap_or_default()
                );
                self.log_line(inner, &bake_log, &line);
            }
            EventKind::BakeOutput { line, .. } => self.log_output(inner, &bake_log, line),
            EventKind::BakeFailed { error } => {
                self.log_line(inner, &bake_log, &format!("==> bake failed: {error}"))
            }
            EventKind::PhaseStarted { phase } => {
                self.log_line(inner, &log, &format!("==> {phase}"))
            }
            EventKind::PhaseEnded { phase, ok } => {
                if !ok {
                    self.log_line(inner, &log, &format!("==> {phase} failed"));
                }
            }
            EventKind::Output { line, .. } => self.log_output(inner, &log, line),
            EventKind::Retry { attempt, error } => self.log_line(
                inner,
                &log,
                &format!("==> infrastructure failure, retrying (attempt {attempt}): {error}"),
            ),
            EventKind::Artifact { path, size, sha256 } => self.log_line(
                inner,
                &log,
                &format!("==> artifact {path} ({size} bytes, sha256 {sha256})"),
            ),
            EventKind::TargetFinished { status, error, .. } => {
                let line = format!(
                    "==> {}{}",
                    status.as_str(),
                    error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
                );
                self.log_line(inner, &log, &line);
            }
            EventKind::RunStarted { .. }
            | EventKind::TargetQueued { .. }
            | EventKind::RunFinished { .. } => {}
        }
    }

    /// Notes what `kind` says about the target or image `name` in the run
    /// record; saves `run.json` when the run starts or finishes and when a
    /// phase or target ends.
    fn record_event(&self, inner: &mut Inner, name: &str, time: f64, kind: &EventKind) {
        match kind {
            EventKind::RunStarted { targets, .. } => {
                for t in targets {
                    target(&mut inner.record, t);
                }
                let r = inner.record.clone();
                self.save(&r);
            }
            EventKind::BakeLayer {
                layer,
                description,
                state,
                seconds,
            } => set_layer(
                &mut inner.record,
                name,
                layer,
                description,
                state,
                *seconds,
                time,
            ),
            EventKind::Artifact { path, size, sha256 } => {
                target(&mut inner.record, name)
                    .artifacts
                    .push(ArtifactRecord {
                        path: path.clone(),
                        size: *size,
                        sha256: sha256.clone(),
                    });
            }
            EventKind::PhaseStarted { phase } => {
                target(&mut inner.record, name).phases.push(PhaseRecord {
                    name: phase.clone(),
                    start: time,
                    end: None,
                    ok: None,
                });
            }
            EventKind::PhaseEnded { phase, ok } => {
                end_phase(target(&mut inner.record, name), phase, *ok, time);
                let r = inner.record.clone();
                self.save(&r);
            }
            EventKind::TargetFinished {
                status,
                exit_code,
                error,
            } => {
                let t = target(&mut inner.record, name);
                t.status = Some(*status);
                t.exit_code = *exit_code;
                t.error = error.clone();
                let r = inner.record.clone();
                self.save(&r);
            }
            EventKind::RunFinished { .. } => {
                inner.record.ended = Some(time);
                let r = inner.record.clone();
                self.save(&r);
            }
            EventKind::TargetQueued { provider, image } => {
                let t = target(&mut inner.record, name);
                t.provider = Some(provider.clone());
                t.image = Some(image.clone());
            }
            EventKind::BakeOutput { .. }
            | EventKind::BakeFailed { .. }
            | EventKind::Output { .. }
            | EventKind::Retry { .. } => {}
        }
    }
}

fn target<'a>(r: &'a mut RunRecord, name: &str) -> &'a mut TargetRecord {
    if let Some(i) = r.targets.iter().position(|t| t.name == name) {
        return &mut r.targets[i];
    }
    r.targets.push(TargetRecord {
        name: name.to_string(),
        provider: None,
        image: None,
        status: None,
        exit_code: None,
        error: None,
        phases: vec![],
        artifacts: vec![],
    });
    r.targets.last_mut().unwrap()
}

/// Marks the latest phase `phase` of `t` as ended at `time`.
fn end_phase(t: &mut TargetRecord, phase: &str, ok: bool, time: f64) {
    if let Some(p) = t.phases.iter_mut().rev().find(|p| p.name == phase) {
        p.end = Some(time);
        p.ok = Some(ok);
    }
}

/// Records the state of `layer` of the image `name`, adding either when new.
fn set_layer(
    r: &mut RunRecord,
    name: &str,
    layer: &str,
    description: &str,
    state: &str,
    seconds: Option<f64>,
    time: f64,
) {
    let images = &mut r.images;
    let img = match images.iter().position(|i| i.name == name) {
        Some(i) => &mut images[i],
        None => {
            images.push(ImageRecord {
                name: name.to_string(),
                layers: vec![],
            });
            images.last_mut().unwrap()
        }
    };
    match img.layers.iter_mut().find(|l| l.layer == layer) {
        Some(l) => {
            l.state = state.to_string();
            l.seconds = seconds;
        }
        None => img.layers.push(LayerRecord {
            start: (state == "baking").then_some(time),
            layer: layer.to_string(),
            description: description.to_string(),
            state: state.to_string(),
            seconds,
        }),
    }
}

impl EventSink for RunRecorder {
    fn event(&self, e: &Event) {
        let mut inner = self.inner.lock().unwrap();
        let name = e.target.clone().unwrap_or_default();
        self.log_event(&mut inner, &name, &e.kind);
        self.record_event(&mut inner, &name, e.time, &e.kind);
        drop(inner);
        if let Some(ecs) = &self.ecs {
            ecs.event(e);
        }
    }
}

/// Reads a run's record.
pub fn read_record(runs_dir: &Path, run_id: &str) -> std::io::Result<RunRecord> {
    let text = fs_err::read_to_string(runs_dir.join(run_id).join("run.json"))?;
    serde_json::from_str(&text).map_err(std::io::Error::other)
}

/// Run ids, oldest first (ids sort by time).
pub fn list_runs(runs_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs_err::read_dir(runs_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("run.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(target: &str, line: &str) -> Event {
        Event::new(
            Some(target),
            EventKind::Output {
                stream: "stdout",
                line: line.to_string(),
            },
        )
    }

    #[test]
    fn a_log_keeps_its_cap_of_output_and_says_what_it_left_out() {
        let t = tempfile::tempdir().unwrap();
        let mut rec = RunRecorder::create(t.path(), "r1", vec![]).unwrap();
        rec.log_cap = 3 << 20;
        let line = "x".repeat(1 << 20);
        for _ in 0..10 {
            rec.event(&output("t", &line));
        }
        rec.event(&Event::new(
            Some("t"),
            EventKind::PhaseStarted {
                phase: "artifacts".into(),
            },
        ));
        let log = std::fs::read_to_string(t.path().join("r1/t.log")).unwrap();
        assert!(log.len() < (3 << 20) + 1000, "{} bytes", log.len());
        let notes: Vec<&str> = log.lines().filter(|l| l.starts_with("==>")).collect();
        assert_eq!(
            notes,
            [
                "==> this log keeps 3 MiB of output: what follows is left out (the terminal still shows it)",
                "==> 8 output line(s), 8388616 bytes, left out of this log (it keeps 3 MiB of output)",
                "==> artifacts",
            ]
        );
    }
}
