//! `report.html`: one self-contained page per run (no network, no CDN; a
//! Content-Security-Policy that allows nothing from outside): a timeline of
//! targets and their steps, the images' layers with cache hits, each
//! target's status, artifacts with size and sha256, for a failure the log's
//! tail with the failing step marked, and a target's whole log on a click.
//!
//! Everything the build printed is data, never markup: the run is embedded
//! as JSON (every `<` escaped) and the page's script writes it with
//! `textContent` only.

use crate::record::RunRecord;
use serde_json::json;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The file name in the run folder.
pub const FILE: &str = "report.html";

/// How much of one log the page embeds (its end).
pub const LOG_CAP: u64 = 2 << 20;

/// The end of the file at `path`, at most `cap` bytes, and whether the
/// beginning was left out.
fn tail(path: &Path, cap: u64) -> Option<(String, bool)> {
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let skip = len.saturating_sub(cap);
    f.seek(SeekFrom::Start(skip)).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let mut text = String::from_utf8_lossy(&buf).into_owned();
    if skip > 0 {
        // Starts at a whole line.
        if let Some(i) = text.find('\n') {
            text.drain(..=i);
        }
    }
    Some((text, skip > 0))
}

/// The page for the run `record` whose folder (with its logs) is `dir`.
pub fn render(record: &RunRecord, dir: &Path) -> String {
    let targets: Vec<_> = record
        .targets
        .iter()
        .map(|t| {
            let (log, cut) =
                tail(&dir.join(format!("{}.log", t.name)), LOG_CAP).unwrap_or_default();
            json!({
                "name": t.name,
                "provider": t.provider,
                "image": t.image,
                "status": t.status,
                "exit_code": t.exit_code,
                "error": t.error,
                "phases": t.phases,
                "artifacts": t.artifacts,
                "log": log,
                "log_cut": cut,
            })
        })
        .collect();
    let images: Vec<_> = record
        .images
        .iter()
        .map(|i| {
            let (log, cut) =
                tail(&dir.join(format!("bake-{}.log", i.name)), LOG_CAP).unwrap_or_default();
            json!({"name": i.name, "layers": i.layers, "log": log, "log_cut": cut})
        })
        .collect();
    let data = json!({
        "run_id": record.run_id,
        "started": record.started,
        "ended": record.ended,
        "command": record.command,
        "targets": targets,
        "images": images,
    });
    // JSON inside a script element: a `<` could end it or open a comment.
    let data = data.to_string().replace('<', "\\u003c");
    let title = format!("slate run {}", record.run_id).replace('<', "&lt;");
    PAGE.replace("{{TITLE}}", &title).replace("{{DATA}}", &data)
}

const PAGE: &str = r##"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{TITLE}}</title>
<style>
:root { --ok: #2e7d32; --fail: #c62828; --infra: #ef6c00; --skip: #9e9e9e; --run: #1565c0; --bg: #fafafa; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: var(--bg); color: #222; }
header { padding: 12px 20px; background: #263238; color: #eceff1; }
header h1 { font-size: 18px; margin: 0 0 4px; }
header .sum span { margin-right: 14px; }
main { padding: 12px 20px; }
h2 { font-size: 15px; margin: 18px 0 6px; }
.row { display: flex; align-items: center; margin: 3px 0; cursor: pointer; }
.row:hover .label { text-decoration: underline; }
.row.selected .label { font-weight: bold; }
.label { width: 220px; flex: none; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.badge { display: inline-block; min-width: 70px; font-size: 11px; padding: 1px 6px; border-radius: 8px; color: #fff; margin-right: 6px; text-align: center; }
.succeeded { background: var(--ok); } .failed { background: var(--fail); } .infra_failed { background: var(--infra); }
.cancelled, .skipped, .unknown { background: var(--skip); }
.track { position: relative; flex: 1; height: 18px; background: #eceff1; border-radius: 3px; }
.bar { position: absolute; top: 0; bottom: 0; border-radius: 3px; opacity: .35; }
.seg { position: absolute; top: 3px; bottom: 3px; background: var(--run); border-right: 1px solid #fff; }
.seg.failed { background: var(--fail); }
.seg.inputs, .seg.create, .seg.destroy, .seg.artifacts { background: #78909c; }
.dur { width: 70px; flex: none; text-align: right; font-variant-numeric: tabular-nums; color: #555; }
table { border-collapse: collapse; margin: 4px 0 10px; }
td, th { padding: 2px 10px 2px 0; text-align: left; font-size: 13px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font: 12px/1.35 ui-monospace, monospace; }
pre { background: #fff; border: 1px solid #ddd; padding: 8px; overflow: auto; max-height: 60vh; white-space: pre-wrap; word-break: break-all; }
.fail-box { border-left: 4px solid var(--fail); background: #fff; padding: 6px 10px; margin: 8px 0; }
.mark { background: #ffcdd2; display: block; }
.hint { color: #666; font-size: 12px; }
</style>
</head>
<body>
<header><h1 id="title"></h1><div class="sum" id="sum"></div></header>
<main>
<h2>Targets</h2>
<div id="timeline"></div>
<div id="failures"></div>
<h2>Images</h2>
<div id="images"></div>
<h2 id="log-title">Log</h2>
<div class="hint" id="log-hint">Click a target to see its whole log.</div>
<pre id="log" hidden></pre>
<h2>Artifacts</h2>
<div id="artifacts"></div>
</main>
<script type="application/json" id="data">{{DATA}}</script>
<script>
"use strict";
const run = JSON.parse(document.getElementById("data").textContent);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
};
const secs = s => s < 60 ? s.toFixed(1) + " s" : Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
const bytes = n => n < 1024 ? n + " B" : n < 1048576 ? (n / 1024).toFixed(1) + " KiB" : (n / 1048576).toFixed(1) + " MiB";
const statusOf = t => t.status || "unknown";

document.getElementById("title").textContent = "slate run " + run.run_id;
const counts = {};
for (const t of run.targets) counts[statusOf(t)] = (counts[statusOf(t)] || 0) + 1;
const sum = document.getElementById("sum");
for (const [k, n] of Object.entries(counts)) sum.appendChild(el("span", null, n + " " + k.replace("_", " ")));
const ends = [run.ended || 0];
for (const t of run.targets) for (const p of t.phases) ends.push(p.end || p.start);
const t0 = run.started, t1 = Math.max(...ends, t0 + 0.001);
sum.appendChild(el("span", null, secs(t1 - t0) + " in all"));
sum.appendChild(el("span", null, run.command.join(" ")));
const pct = t => (100 * (t - t0) / (t1 - t0)).toFixed(3) + "%";

function showLog(name, log, cut, failing) {
  document.querySelectorAll(".row.selected").forEach(r => r.classList.remove("selected"));
  const row = document.querySelector('.row[data-target="' + CSS.escape(name) + '"]');
  if (row) row.classList.add("selected");
  document.getElementById("log-title").textContent = "Log of " + name;
  document.getElementById("log-hint").textContent = cut ? "The beginning is left out here; `slate logs " + name + " --run " + run.run_id + "` prints it whole." : "";
  const pre = document.getElementById("log");
  pre.replaceChildren();
  for (const line of log.split("\n")) {
    const marked = failing && (line === "==> " + failing + " failed" || line === "==> " + failing);
    pre.appendChild(marked ? el("span", "mark", line + "\n") : document.createTextNode(line + "\n"));
  }
  pre.hidden = false;
}

const timeline = document.getElementById("timeline");
for (const t of run.targets) {
  const row = el("div", "row");
  row.dataset.target = t.name;
  row.title = t.name + ": " + statusOf(t).replace("_", " ");
  const label = el("div", "label");
  label.appendChild(el("span", "badge " + statusOf(t), statusOf(t).replace("_", " ")));
  label.appendChild(document.createTextNode(" " + t.name));
  row.appendChild(label);
  const track = el("div", "track");
  const first = t.phases.length ? t.phases[0].start : t0;
  const last = t.phases.length ? Math.max(...t.phases.map(p => p.end || p.start)) : t0;
  const bar = el("div", "bar " + statusOf(t));
  bar.dataset.target = t.name;
  bar.style.left = pct(first);
  bar.style.width = "max(2px, calc(" + pct(last) + " - " + pct(first) + "))";
  track.appendChild(bar);
  for (const p of t.phases) {
    const kind = p.name.startsWith("run: ") ? "run" : p.name;
    const seg = el("div", "seg " + kind + (p.ok === false ? " failed" : ""));
    seg.style.left = pct(p.start);
    seg.style.width = "max(1px, calc(" + pct(p.end || p.start) + " - " + pct(p.start) + "))";
    seg.title = p.name + (p.end ? " (" + secs(p.end - p.start) + ")" : "") + (p.ok === false ? ": failed" : "");
    track.appendChild(seg);
  }
  row.appendChild(track);
  row.appendChild(el("div", "dur", secs(last - first)));
  const failing = (t.phases.find(p => p.ok === false) || {}).name;
  row.addEventListener("click", () => showLog(t.name, t.log, t.log_cut, failing));
  timeline.appendChild(row);
}

const failures = document.getElementById("failures");
for (const t of run.targets.filter(t => t.status && t.status !== "succeeded" && t.status !== "skipped")) {
  const box = el("div", "fail-box");
  const failing = (t.phases.find(p => p.ok === false) || {}).name;
  box.appendChild(el("strong", null, t.name + ": " + statusOf(t).replace("_", " ") + (t.exit_code !== null && t.exit_code !== undefined ? " (exit " + t.exit_code + ")" : "")));
  if (t.error) box.appendChild(el("div", null, t.error));
  if (failing) box.appendChild(el("div", null, "failing step: " + failing));
  const lines = t.log.split("\n").filter(l => l !== "");
  const pre = el("pre", "tail");
  for (const line of lines.slice(-25)) {
    const marked = failing && (line === "==> " + failing + " failed" || line === "==> " + failing);
    pre.appendChild(marked ? el("span", "mark", line + "\n") : document.createTextNode(line + "\n"));
  }
  box.appendChild(pre);
  failures.appendChild(box);
}

const images = document.getElementById("images");
for (const img of run.images) {
  const table = el("table");
  const head = el("tr");
  for (const h of ["image " + img.name, "layer", "state", "time"]) head.appendChild(el("th", null, h));
  table.appendChild(head);
  for (const l of img.layers) {
    const tr = el("tr");
    tr.appendChild(el("td", null, l.description));
    tr.appendChild(el("td", null, l.layer.slice(0, 12)));
    tr.appendChild(el("td", null, l.state === "cached" ? "cached (hit)" : l.state));
    tr.appendChild(el("td", "num", l.seconds === null || l.seconds === undefined ? "" : secs(l.seconds)));
    table.appendChild(tr);
  }
  images.appendChild(table);
}
if (!run.images.length) images.appendChild(el("div", "hint", "No image was baked or checked in this run."));

const arts = document.getElementById("artifacts");
const all = run.targets.flatMap(t => (t.artifacts || []).map(a => [t.name, a]));
if (all.length) {
  const table = el("table");
  const head = el("tr");
  for (const h of ["target", "path", "size", "sha256"]) head.appendChild(el("th", null, h));
  table.appendChild(head);
  for (const [name, a] of all) {
    const tr = el("tr");
    tr.appendChild(el("td", null, name));
    tr.appendChild(el("td", null, a.path));
    tr.appendChild(el("td", "num", bytes(a.size)));
    tr.appendChild(el("td", null)).appendChild(el("code", null, a.sha256));
    table.appendChild(tr);
  }
  arts.appendChild(table);
} else {
  arts.appendChild(el("div", "hint", "No artifacts."));
}
</script>
</body>
</html>
"##;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{PhaseRecord, TargetRecord};

    #[test]
    fn build_output_stays_data_and_the_page_loads_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let hostile = "</script><script>fetch('http://203.0.113.1/')</script><!-- <img src=x>";
        std::fs::write(dir.path().join("t.log"), format!("==> run: x\n{hostile}\n")).unwrap();
        let record = RunRecord {
            run_id: "r</title>".into(),
            targets: vec![TargetRecord {
                name: "t".into(),
                provider: Some("sandbox".into()),
                image: Some("img".into()),
                status: None,
                exit_code: None,
                error: Some(hostile.into()),
                phases: vec![PhaseRecord {
                    name: "run: x".into(),
                    start: 1.0,
                    end: Some(2.0),
                    ok: Some(false),
                }],
                artifacts: vec![],
            }],
            ..Default::default()
        };
        let page = render(&record, dir.path());
        // The page's own two scripts, and no third; no markup from the run.
        assert_eq!(page.matches("<script").count(), 2);
        assert_eq!(page.matches("</script>").count(), 2);
        assert!(
            !page.contains("<img"),
            "markup from the log reached the page"
        );
        assert!(!page.contains("r</title>"));
        assert!(page.contains("default-src 'none'"));
        // The data is there, escaped, and parses back.
        let start = page.find(r#"id="data">"#).unwrap() + 10;
        let end = start + page[start..].find("</script>").unwrap();
        let data: serde_json::Value = serde_json::from_str(&page[start..end]).unwrap();
        assert!(data["targets"][0]["log"]
            .as_str()
            .unwrap()
            .contains(hostile));
    }

    #[test]
    fn only_the_end_of_a_long_log_is_embedded_from_a_whole_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.log");
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &text).unwrap();
        let (t, cut) = tail(&path, 100).unwrap();
        assert!(cut);
        assert!(t.starts_with("line ") && t.ends_with("line 999\n"), "{t}");
        assert!(t.len() <= 100);
        let (t, cut) = tail(&path, 1 << 20).unwrap();
        assert!(!cut);
        assert_eq!(t, text);
    }
}
