//! Events: the one stream the terminal, JSON lines, run record and logs read.
//! As JSON (`--log-format json`), their format is `docs/events.schema.json`.

use serde::Serialize;
use std::time::{SystemTime, UNIX_EPOCH};

/// The version of the event format (`v` in each event): what
/// `docs/events.schema.json` describes. It changes only when a field
/// changes meaning or goes; new events and fields may come without it.
pub const EVENTS_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// [`EVENTS_VERSION`].
    pub v: u32,
    /// Seconds since the Unix epoch.
    pub time: f64,
    /// The target (or, for bake events, the image) it concerns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(flatten)]
    pub kind: EventKind,
}

impl Event {
    pub fn new(target: Option<&str>, kind: EventKind) -> Event {
        Event {
            v: EVENTS_VERSION,
            time: now(),
            target: target.map(str::to_string),
            kind,
        }
    }
}

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetStatus {
    Succeeded,
    /// The target's own script failed (or timed out).
    Failed,
    /// The environment could not be made or died, after retries.
    InfraFailed,
    Cancelled,
    /// Not started because an earlier target failed (`--fail-fast`) or its image did not bake.
    Skipped,
}

impl TargetStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::InfraFailed => "infrastructure failure",
            Self::Cancelled => "cancelled",
            Self::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    RunStarted {
        run_id: String,
        targets: Vec<String>,
    },
    BakeLayer {
        layer: String,
        description: String,
        state: String,
        seconds: Option<f64>,
    },
    BakeOutput {
        stream: &'static str,
        line: String,
    },
    BakeFailed {
        error: String,
    },
    TargetQueued {
        /// The provider that makes its environment.
        provider: String,
        /// The image it is built in.
        image: String,
    },
    PhaseStarted {
        phase: String,
    },
    PhaseEnded {
        phase: String,
        ok: bool,
    },
    Output {
        stream: &'static str,
        line: String,
    },
    Retry {
        attempt: u32,
        error: String,
    },
    Artifact {
        path: String,
        size: u64,
        sha256: String,
    },
    TargetFinished {
        status: TargetStatus,
        exit_code: Option<i32>,
        error: Option<String>,
    },
    RunFinished {
        succeeded: usize,
        failed: usize,
    },
}

/// Receives events; implementations lock internally.
pub trait EventSink: Sync {
    fn event(&self, e: &Event);
}

/// Sends each event to several sinks.
pub struct Tee<'a>(pub Vec<&'a dyn EventSink>);

impl EventSink for Tee<'_> {
    fn event(&self, e: &Event) {
        for s in &self.0 {
            s.event(e);
        }
    }
}

/// Collects events in memory (tests).
#[derive(Default)]
pub struct Collect(pub std::sync::Mutex<Vec<Event>>);

impl EventSink for Collect {
    fn event(&self, e: &Event) {
        self.0.lock().unwrap().push(e.clone());
    }
}
