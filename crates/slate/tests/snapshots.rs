//! What a user sees, pinned: `build`, `bake`, `check`, `verify`, `gc` and
//! error output, run by the real binary as any user. Environments come from
//! the scripted provider (`SLATE_FAKE_PROVIDER`), so nothing needs root and
//! nothing runs; the base image is a small tarball. Paths, run ids,
//! digests and times are masked. Update with `cargo insta review` (or
//! `INSTA_UPDATE=always cargo test --test snapshots`) and read the diff.

mod common;

use common::Project;
use std::process::Output;

/// Two builds: one makes an artifact, one fails with output.
const CONFIG: &str = r#"[images.base]
from = "tar:base.tar"
steps = ["install-tools"]

[builds.app]
image = "base"
run = ["make app"]
artifacts = ["out/*"]

[builds.broken]
image = "base"
run = ["make broken"]
"#;

const RULES: &str = r#"[
  {"match": "make app", "write": "out/app.txt", "content": "built\n"},
  {"match": "make broken", "exit": 2, "lines": ["cc: error: missing.c: No such file"]},
  {"match": "install-tools", "lines": ["tools installed"]}
]"#;

fn project(config: &str) -> Project {
    let p = Project::config_only(config);
    let root = p.path().join("rootfs");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), "base\n").unwrap();
    let tar = std::process::Command::new("tar")
        .arg("-cf")
        .arg(p.project().join("base.tar"))
        .arg("-C")
        .arg(&root)
        .arg(".")
        .status()
        .unwrap();
    assert!(tar.success());
    std::fs::write(p.path().join("rules.json"), RULES).unwrap();
    p
}

fn run(p: &Project, args: &[&str]) -> Output {
    p.cmd(args)
        .env("SLATE_FAKE_PROVIDER", p.path().join("rules.json"))
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID")
        .output()
        .unwrap()
}

/// Exit code, stdout and stderr, with what differs from run to run masked.
fn seen(p: &Project, o: &Output) -> String {
    let text = format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        o.status.code().map_or("signal".into(), |c| c.to_string()),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    text.replace(&p.path().display().to_string(), "[TMP]")
}

macro_rules! snapshot {
    ($name:expr, $text:expr) => {
        insta::with_settings!({filters => vec![
            (r"\b\d{8}-\d{6}-[0-9a-f]{4}\b", "[RUN]"),
            (r"\b[0-9a-f]{64}\b", "[DIGEST]"),
            (r"\b[0-9a-f]{12}\b", "[DIGEST12]"),
            (r"\b\d+\.\d+s\b", "[T]"),
            (r"\b\d+(\.\d+)? (B|KiB|MiB|GiB)\b", "[SIZE]"),
            (r"\(\d+ bytes\)", "([N] bytes)"),
            (r"used \d+[smhd] ago +", "used [AGO] "),
            (r" +\[SIZE\]", " [SIZE]"),
        ]}, {
            insta::assert_snapshot!($name, $text);
        });
    };
}

#[test]
fn build_bakes_then_builds_and_reports_each_target() {
    let p = project(CONFIG);
    let o = run(&p, &["build", "-j", "1"]);
    snapshot!("build", seen(&p, &o));
    assert_eq!(p.read("artifacts/app/app.txt"), "built\n");
    // Everything is cached the second time.
    let o = run(&p, &["bake"]);
    snapshot!("bake_cached", seen(&p, &o));
}

/// `[settings.logs] format = "json"` is the default `--log-format`; the
/// flag still wins.
#[test]
fn the_configs_log_format_is_used_unless_the_flag_says_otherwise() {
    let p = project(&format!("[settings.logs]\nformat = \"json\"\n{CONFIG}"));
    let o = run(&p, &["build", "app"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.is_empty());
    for line in out.lines() {
        let e: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(e["event"].is_string(), "{line}");
    }
    let o = run(&p, &["--log-format", "text", "build", "app"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("[app]"), "{out}");
    assert!(
        out.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_err()),
        "{out}"
    );
}

#[test]
fn bake_reports_layers_and_digest() {
    let p = project(CONFIG);
    let o = run(&p, &["bake"]);
    snapshot!("bake", seen(&p, &o));
}

#[test]
fn check_names_images_and_targets() {
    let p = project(CONFIG);
    let o = run(&p, &["check"]);
    // What this host has differs from machine to machine: only the
    // project's part is pinned.
    let text = seen(&p, &o);
    let project_part: String = text
        .lines()
        .take_while(|l| *l != "providers:")
        .map(|l| format!("{l}\n"))
        .collect();
    snapshot!("check", project_part);
}

#[test]
fn verify_reports_a_reproducible_target() {
    let p = project(CONFIG);
    let o = run(&p, &["verify", "app"]);
    snapshot!("verify", seen(&p, &o));
}

#[test]
fn gc_reports_what_it_removed() {
    let p = project(CONFIG);
    assert!(run(&p, &["bake"]).status.success());
    p.write(
        "slate.toml",
        &CONFIG.replace("install-tools", "install-other-tools"),
    );
    let o = run(&p, &["gc", "--dry-run"]);
    snapshot!("gc_dry_run", seen(&p, &o));
    let o = run(&p, &["gc"]);
    snapshot!("gc", seen(&p, &o));
}

#[test]
fn errors_say_where_and_what_to_do() {
    let p = project(&CONFIG.replace("artifacts = [\"out/*\"]", "artifact = [\"out/*\"]"));
    let o = run(&p, &["build"]);
    snapshot!("error_config", seen(&p, &o));
    let p = project(CONFIG);
    let o = run(&p, &["build", "nope"]);
    snapshot!("error_unknown_target", seen(&p, &o));
    let o = run(&p, &["build", "--provider", "docker"]);
    snapshot!("error_unknown_provider", seen(&p, &o));
}

/// `--junit` as a CI server reads it: parsed by junitparser (Debian's
/// python3-junitparser), the consumer Jenkins-style pipelines script with.
#[test]
#[ignore = "needs python3-junitparser: scripts/test.sh runs it"]
fn junit_report_reads_as_one_test_per_target() {
    let reader = r#"
import sys
from junitparser import JUnitXml
for suite in JUnitXml.fromfile(sys.argv[1]):
    print(f"suite tests={suite.tests} failures={suite.failures} errors={suite.errors}")
    for case in suite:
        results = case.result if isinstance(case.result, list) else [case.result]
        kinds = [f"{type(r).__name__}: {r.message}" for r in results if r is not None]
        log = case.system_out or ""
        print(case.name, kinds or ["passed"], "|", "missing.c" in log, log.splitlines()[-1:])
"#;
    let has_parser = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import junitparser"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_parser,
        "python3-junitparser is missing: apt-get install python3-junitparser (scripts/install-deps.sh test)"
    );
    let p = project(CONFIG);
    let o = run(&p, &["build", "-j", "1", "--junit", "report.xml"]);
    assert_eq!(o.status.code(), Some(1), "{}", common::text(&o));
    let read = std::process::Command::new("/usr/bin/python3")
        .args(["-c", reader])
        .arg(p.project().join("report.xml"))
        .output()
        .unwrap();
    assert!(read.status.success(), "{}", common::text(&read));
    assert_eq!(
        String::from_utf8_lossy(&read.stdout),
        "suite tests=2 failures=1 errors=0\n\
         app ['passed'] | False ['==> succeeded']\n\
         broken ['Failure: `run: make broken` exited with code 2'] | True ['==> failed: `run: make broken` exited with code 2']\n"
    );
}

/// `--log-format json`: every line of stdout is an event that the
/// documented schema (docs/events.schema.json) accepts, checked by Debian's
/// python3-jsonschema; the run starts and ends once, and each target ends
/// with its status.
#[test]
#[ignore = "needs python3-jsonschema: scripts/test.sh runs it"]
fn json_events_follow_the_documented_schema() {
    let checker = r#"
import json, sys
from jsonschema import Draft202012Validator
schema = json.load(open(sys.argv[1]))
Draft202012Validator.check_schema(schema)
validator = Draft202012Validator(schema)
events = [json.loads(l) for l in open(sys.argv[2])]
for e in events:
    errors = sorted(validator.iter_errors(e), key=str)
    if errors:
        print("INVALID", json.dumps(e), errors[0].message)
kinds = [e["event"] for e in events]
print(kinds[0], kinds[-1], kinds.count("run_started"), kinds.count("run_finished"))
for e in events:
    if e["event"] == "target_finished":
        print(e["target"], e["status"], e["exit_code"])
"#;
    let has_checker = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import jsonschema"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_checker,
        "python3-jsonschema is missing: apt-get install python3-jsonschema (scripts/install-deps.sh test)"
    );
    let p = project(CONFIG);
    let o = run(&p, &["--log-format", "json", "build", "-j", "1"]);
    assert_eq!(o.status.code(), Some(1), "{}", common::text(&o));
    std::fs::write(p.path().join("events.jsonl"), &o.stdout).unwrap();
    let schema =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/events.schema.json");
    let checked = std::process::Command::new("/usr/bin/python3")
        .args(["-c", checker])
        .arg(schema)
        .arg(p.path().join("events.jsonl"))
        .output()
        .unwrap();
    assert!(checked.status.success(), "{}", common::text(&checked));
    assert_eq!(
        String::from_utf8_lossy(&checked.stdout),
        "run_started run_finished 1 1\napp succeeded 0\nbroken failed 2\n"
    );
}
