//! Drawing events: plain prefixed lines, a live status block on a terminal, or
//! JSON lines. The only place that prints progress.

use slate_store::events::{Event, EventKind, EventSink, TargetStatus};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Plain,
    Live,
    Json,
}

struct State {
    baked: usize,
    cached: usize,
    pulled: usize,
    running: BTreeMap<String, (String, Instant)>,
    drawn: usize,
    started: BTreeMap<String, Instant>,
}

pub struct Reporter {
    mode: Mode,
    to_stderr: bool,
    quiet: bool,
    color: bool,
    state: Mutex<State>,
}

impl Reporter {
    pub fn new(mode: Mode, quiet: bool, color: bool) -> Reporter {
        Reporter {
            mode,
            to_stderr: false,
            quiet,
            color,
            state: Mutex::new(State {
                baked: 0,
                cached: 0,
                pulled: 0,
                running: BTreeMap::new(),
                drawn: 0,
                started: BTreeMap::new(),
            }),
        }
    }

    /// Progress goes to stderr (when stdout is the command's own output).
    pub fn on_stderr(mut self) -> Self {
        self.to_stderr = true;
        if self.mode == Mode::Live {
            self.mode = Mode::Plain;
        }
        self
    }

    /// Layers baked, found cached and pulled from a layer cache so far.
    pub fn bake_counts(&self) -> (usize, usize, usize) {
        let st = self.state.lock().unwrap();
        (st.baked, st.cached, st.pulled)
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }

    fn print(&self, st: &mut State, line: &str) {
        if self.to_stderr {
            eprintln!("{line}");
            return;
        }
        let mut out = std::io::stdout().lock();
        if self.mode == Mode::Live && st.drawn > 0 {
            let _ = write!(out, "\x1b[{}A\x1b[J", st.drawn);
            st.drawn = 0;
        }
        let _ = writeln!(out, "{line}");
        if self.mode == Mode::Live {
            self.draw(st, &mut out);
        }
        let _ = out.flush();
    }

    fn draw(&self, st: &mut State, out: &mut impl Write) {
        for (t, (phase, since)) in &st.running {
            let phase: String = phase.chars().take(60).collect();
            let _ = writeln!(
                out,
                "  {} {t}  {phase}  {:.1}s",
                self.paint("36", "⏵"),
                since.elapsed().as_secs_f64()
            );
        }
        st.drawn = st.running.len();
    }

    /// Whether a live block is drawn (a terminal): only then is there a
    /// clock to tick.
    pub fn is_live(&self) -> bool {
        self.mode == Mode::Live
    }

    /// Redraws the live block (elapsed times), called by a ticker.
    pub fn tick(&self) {
        if self.mode != Mode::Live {
            return;
        }
        let mut st = self.state.lock().unwrap();
        if st.drawn == 0 && st.running.is_empty() {
            return;
        }
        let mut out = std::io::stdout().lock();
        if st.drawn > 0 {
            let _ = write!(out, "\x1b[{}A\x1b[J", st.drawn);
        }
        self.draw(&mut st, &mut out);
        let _ = out.flush();
    }

    /// Clears the live block before the caller prints a summary.
    pub fn clear(&self) {
        let mut st = self.state.lock().unwrap();
        if self.mode == Mode::Live && st.drawn > 0 {
            print!("\x1b[{}A\x1b[J", st.drawn);
            st.drawn = 0;
        }
        st.running.clear();
    }
}

impl EventSink for Reporter {
    fn event(&self, e: &Event) {
        if self.mode == Mode::Json {
            if let Ok(s) = serde_json::to_string(e) {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{s}");
            }
            return;
        }
        let mut st = self.state.lock().unwrap();
        let name = e.target.clone().unwrap_or_default();
        let prefix = self.paint("2", &format!("[{name}]"));
        match &e.kind {
            EventKind::BakeLayer {
                description,
                state,
                seconds,
                ..
            } => {
                match state.as_str() {
                    "cached" => st.cached += 1,
                    "baked" => st.baked += 1,
                    "pulled" => st.pulled += 1,
                    _ => {}
                }
                if self.quiet {
                    return;
                }
                let label = match state.as_str() {
                    "cached" => self.paint("2", "cached"),
                    "baking" => self.paint("33", "baking"),
                    "pulled" => self.paint(
                        "32",
                        &format!(
                            "pulled from the layer cache in {:.1}s",
                            seconds.unwrap_or(0.0)
                        ),
                    ),
                    _ => self.paint("32", &format!("baked in {:.1}s", seconds.unwrap_or(0.0))),
                };
                self.print(&mut st, &format!("{prefix} {label} {description}"));
            }
            EventKind::BakeOutput { line, .. } | EventKind::Output { line, .. } => {
                if !self.quiet {
                    self.print(&mut st, &format!("{prefix} {line}"));
                }
            }
            EventKind::BakeFailed { error } => self.print(
                &mut st,
                &format!("{prefix} {} {error}", self.paint("31", "bake failed:")),
            ),
            EventKind::PhaseStarted { phase } => {
                let now = Instant::now();
                st.started.entry(name.clone()).or_insert(now);
                st.running.insert(name.clone(), (phase.clone(), now));
                if !self.quiet || self.mode == Mode::Live {
                    self.print(&mut st, &format!("{prefix} ==> {phase}"));
                }
            }
            EventKind::Retry { attempt, error } => self.print(
                &mut st,
                &format!(
                    "{prefix} {} {error}",
                    self.paint(
                        "33",
                        &format!(
                            "environment failed (attempt {attempt} of {}), retrying:",
                            slate_run::CREATE_ATTEMPTS
                        )
                    )
                ),
            ),
            EventKind::Artifact { path, size, .. } => {
                if !self.quiet {
                    self.print(&mut st, &format!("{prefix} artifact {path} ({size} bytes)"));
                }
            }
            EventKind::TargetFinished { status, error, .. } => {
                st.running.remove(&name);
                let took = st
                    .started
                    .get(&name)
                    .map(|s| format!(" in {:.1}s", s.elapsed().as_secs_f64()))
                    .unwrap_or_default();
                let line = match status {
                    TargetStatus::Succeeded => {
                        format!("{prefix} {}{took}", self.paint("32", "✓ succeeded"))
                    }
                    s => format!(
                        "{prefix} {}{took}{}",
                        self.paint("31", &format!("✗ {}", s.as_str())),
                        error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
                    ),
                };
                self.print(&mut st, &line);
            }
            EventKind::PhaseEnded { .. }
            | EventKind::TargetQueued { .. }
            | EventKind::RunStarted { .. }
            | EventKind::RunFinished { .. } => {}
        }
    }
}
