//! A run as JUnit XML, so CI servers (Jenkins, GitLab, GitHub Actions) show
//! targets as tests: one `testsuite` per run, one `testcase` per target. A
//! build that failed is a `failure`, an infrastructure failure an `error`,
//! a cancelled or skipped target `skipped`; each case carries the tail of
//! its log (masked, as every log is) in `system-out`.

use crate::events::TargetStatus;
use crate::record::{RunRecord, TargetRecord};
use std::fmt::Write as _;
use std::path::Path;

/// How many lines of a target's log its case carries.
pub const LOG_TAIL: usize = 200;

/// The JUnit XML of `record`, with log tails read from `run_dir`.
pub fn render(record: &RunRecord, run_dir: &Path) -> String {
    let count = |f: &dyn Fn(Option<TargetStatus>) -> bool| {
        record.targets.iter().filter(|t| f(t.status)).count()
    };
    let failures = count(&|s| s == Some(TargetStatus::Failed));
    let errors = count(&|s| s == Some(TargetStatus::InfraFailed));
    let skipped = count(&|s| {
        !matches!(
            s,
            Some(TargetStatus::Succeeded | TargetStatus::Failed | TargetStatus::InfraFailed)
        )
    });
    let total = record.ended.unwrap_or(record.started) - record.started;
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"slate\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\" time=\"{total:.3}\">",
        record.targets.len()
    );
    let _ = writeln!(
        x,
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\" time=\"{total:.3}\" timestamp=\"{}\">",
        escape(&format!("slate run {}", record.run_id)),
        record.targets.len(),
        timestamp(record.started)
    );
    for t in &record.targets {
        case(&mut x, t, run_dir);
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}

fn case(x: &mut String, t: &TargetRecord, run_dir: &Path) {
    let start = t.phases.first().map(|p| p.start);
    let end = t
        .phases
        .iter()
        .filter_map(|p| p.end)
        .fold(None, |m: Option<f64>, e| Some(m.map_or(e, |m| m.max(e))));
    let time = match (start, end) {
        (Some(s), Some(e)) => (e - s).max(0.0),
        _ => 0.0,
    };
    let _ = writeln!(
        x,
        "    <testcase name=\"{}\" classname=\"slate\" time=\"{time:.3}\">",
        escape(&t.name)
    );
    let message = escape(t.error.as_deref().unwrap_or(""));
    match t.status {
        Some(TargetStatus::Succeeded) => {}
        Some(TargetStatus::Failed) => {
            let code = t
                .exit_code
                .map(|c| format!(" (exit code {c})"))
                .unwrap_or_default();
            let _ = writeln!(
                x,
                "      <failure type=\"build failed{code}\" message=\"{message}\"/>"
            );
        }
        Some(TargetStatus::InfraFailed) => {
            let _ = writeln!(
                x,
                "      <error type=\"infrastructure failure\" message=\"{message}\"/>"
            );
        }
        _ => {
            let _ = writeln!(x, "      <skipped message=\"{message}\"/>");
        }
    }
    let log = fs_err::read_to_string(run_dir.join(format!("{}.log", t.name))).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n");
    let _ = writeln!(x, "      <system-out>{}</system-out>", escape(&tail));
    x.push_str("    </testcase>\n");
}

/// `secs` since the epoch, as JUnit's `timestamp` wants it (no zone).
fn timestamp(secs: f64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0.0) as u64);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .trim_end_matches('Z')
        .to_string()
}

/// Text as XML character data or an attribute value. Characters XML 1.0
/// cannot hold (control characters a build may print) become U+FFFD.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::PhaseRecord;

    #[test]
    fn statuses_become_failures_errors_and_skips_and_text_is_escaped() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(
            t.path().join("bad.log"),
            "==> run: make\n<oops> & \u{1b}[31mred\n",
        )
        .unwrap();
        let target = |name: &str, status, error: Option<&str>| TargetRecord {
            name: name.into(),
            provider: None,
            image: None,
            status,
            exit_code: Some(2),
            error: error.map(str::to_string),
            artifacts: vec![],
            phases: vec![PhaseRecord {
                name: "create".into(),
                start: 100.0,
                end: Some(101.5),
                ok: Some(true),
            }],
        };
        let record = RunRecord {
            run_id: "r1".into(),
            started: 99.0,
            ended: Some(103.0),
            command: vec![],
            pid: None,
            targets: vec![
                target("good", Some(TargetStatus::Succeeded), None),
                target(
                    "bad",
                    Some(TargetStatus::Failed),
                    Some("`run: make` exited with code 2"),
                ),
                target("infra", Some(TargetStatus::InfraFailed), Some("no \"VM\"")),
                target("late", Some(TargetStatus::Skipped), None),
            ],
            images: vec![],
        };
        let x = render(&record, t.path());
        assert!(
            x.contains(r#"tests="4" failures="1" errors="1" skipped="1" time="4.000""#),
            "{x}"
        );
        assert!(
            x.contains(r#"<testcase name="good" classname="slate" time="1.500">"#),
            "{x}"
        );
        assert!(x.contains(r#"<failure type="build failed (exit code 2)" message="`run: make` exited with code 2"/>"#), "{x}");
        assert!(
            x.contains(r#"<error type="infrastructure failure" message="no &quot;VM&quot;"/>"#),
            "{x}"
        );
        assert!(x.contains("&lt;oops&gt; &amp; \u{fffd}[31mred"), "{x}");
        assert!(x.contains(r#"timestamp="1970-01-01T00:01:39""#), "{x}");
    }
}
