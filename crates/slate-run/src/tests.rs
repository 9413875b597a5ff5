//! The orchestrator's logic, against the scripted fake provider.

use super::*;
use slate_provider::fake::{FakeAction, FakeProvider};
use std::sync::atomic::Ordering;

struct Fixture {
    _dir: tempfile::TempDir,
    project: Project,
    store: LayerStore,
    artifacts: PathBuf,
}

fn fixture(build: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let src =
        format!("[images.img]\nfrom = \"debian:bookworm\"\n[builds.app]\nimage = \"img\"\n{build}");
    std::fs::write(dir.path().join("slate.toml"), &src).unwrap();
    std::fs::write(dir.path().join("main.c"), "int main(){}").unwrap();
    let project = slate_config::load(dir.path(), None).unwrap();
    let store = LayerStore::open(&dir.path().join("cache")).unwrap();
    let artifacts = dir.path().join("artifacts");
    Fixture {
        _dir: dir,
        project,
        store,
        artifacts,
    }
}

fn image() -> BakedImage {
    BakedImage {
        name: "img".into(),
        digest: "d1".into(),
        layers: vec![PathBuf::from("/l1")],
        env: vec![("IMG".into(), "1".into())],
    }
}

fn run(f: &Fixture, provider: &FakeProvider, sink: &events::Collect) -> TargetResult {
    let orch = Orchestrator {
        project: &f.project,
        store: &f.store,
        provider,
        sink,
        cancel: Cancel::new(),
        layer_source: None,
    };
    let store = ArtifactStore::new(f.artifacts.clone(), "run1");
    let r = orch.run_target(&f.project.targets[0], &image(), &store, None);
    store.finish();
    r
}

#[test]
fn success_collects_artifacts_with_checksums_and_destroys() {
    let f = fixture("run = [\"make\"]\nartifacts = [\"dist/*.txt\"]\n");
    let p = FakeProvider::new().on(
        "make",
        FakeAction::Write {
            path: "dist/a.txt".into(),
            content: b"hello".to_vec(),
        },
    );
    let r = run(&f, &p, &events::Collect::default());
    assert_eq!(r.status, TargetStatus::Succeeded, "{:?}", r.error);
    assert_eq!(
        std::fs::read(f.artifacts.join("app/a.txt")).unwrap(),
        b"hello"
    );
    let sums = std::fs::read_to_string(f.artifacts.join("SHA256SUMS")).unwrap();
    assert_eq!(
        sums,
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824  app/a.txt\n"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.artifacts.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["run_id"], "run1");
    assert_eq!(manifest["targets"][0]["image_digest"], "d1");
    assert_eq!(p.destroyed.load(Ordering::SeqCst), 1);
    assert!(!f.artifacts.join(".slate-tmp-run1").exists());
}

#[test]
fn glob_matching_nothing_fails_and_names_the_glob() {
    let f = fixture("run = [\"make\"]\nartifacts = [\"dist/*.deb\"]\n");
    let p = FakeProvider::new();
    let r = run(&f, &p, &events::Collect::default());
    assert_eq!(r.status, TargetStatus::Failed);
    assert!(r.error.unwrap().contains("`dist/*.deb` matched no file"));
    assert!(!f.artifacts.join("app").exists());
    assert_eq!(p.destroyed.load(Ordering::SeqCst), 1);
}

#[test]
fn script_failure_is_not_retried_and_keeps_exit_code() {
    let f = fixture("run = [\"make\", \"never\"]\n");
    let p = FakeProvider::new().on(
        "make",
        FakeAction::Exit {
            lines: vec!["boom".into()],
            code: 2,
        },
    );
    let r = run(&f, &p, &events::Collect::default());
    assert_eq!((r.status, r.exit_code), (TargetStatus::Failed, Some(2)));
    assert_eq!(p.created.load(Ordering::SeqCst), 1);
    assert!(!p.log.lock().unwrap().iter().any(|l| l.contains("never")));
    assert_eq!(p.destroyed.load(Ordering::SeqCst), 1);
}

#[test]
fn create_failures_are_retried_then_reported_as_infrastructure() {
    let f = fixture("run = [\"make\"]\n");
    let p = FakeProvider::new().failing_creates(CREATE_ATTEMPTS as usize - 1);
    let sink = events::Collect::default();
    assert_eq!(run(&f, &p, &sink).status, TargetStatus::Succeeded);
    let retries = sink
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Retry { .. }))
        .count();
    assert_eq!(retries, CREATE_ATTEMPTS as usize - 1);
    let p = FakeProvider::new().failing_creates(CREATE_ATTEMPTS as usize);
    assert_eq!(
        run(&f, &p, &events::Collect::default()).status,
        TargetStatus::InfraFailed
    );
}

#[test]
fn secrets_are_passed_but_masked_in_output() {
    std::env::set_var("SLATE_TEST_TOKEN", "s3cr3t-value");
    let f = fixture("run = [\"show\"]\nsecrets = [\"SLATE_TEST_TOKEN\"]\n");
    let p = FakeProvider::new().on(
        "show",
        FakeAction::Exit {
            lines: vec!["token=s3cr3t-value!".into()],
            code: 0,
        },
    );
    let sink = events::Collect::default();
    run(&f, &p, &sink);
    let lines: Vec<String> = sink
        .0
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Output { line, .. } => Some(line.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(lines, ["token=***!"]);
}

#[test]
fn secrets_are_masked_in_a_providers_error_text() {
    std::env::set_var("SLATE_TEST_AGENT_TOKEN", "agent-s3cr3t");
    let f = fixture("run = [\"call\"]\nsecrets = [\"SLATE_TEST_AGENT_TOKEN\"]\n");
    let p = FakeProvider::new().on(
        "call",
        FakeAction::Error("the agent said: bad token agent-s3cr3t".into()),
    );
    let sink = events::Collect::default();
    let r = run(&f, &p, &sink);
    assert_eq!(r.status, TargetStatus::InfraFailed);
    let err = r.error.unwrap_or_default();
    assert!(err.contains("bad token ***"), "{err}");
    let shown = format!("{:?}", sink.0.lock().unwrap());
    assert!(!shown.contains("agent-s3cr3t"), "{shown}");
}

#[test]
fn timeout_fails_the_target() {
    let f = fixture("run = [\"hang\"]\ntimeout = \"1s\"\n");
    let p = FakeProvider::new().on("hang", FakeAction::Hang);
    let r = run(&f, &p, &events::Collect::default());
    assert_eq!(r.status, TargetStatus::Failed);
    assert!(r.error.unwrap().contains("timed out"));
}

#[test]
fn multi_line_and_overlapping_secrets_are_masked_whole() {
    let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIFX0Xq8wBHnVcWz1\n-----END PRIVATE KEY-----\n".to_string();
    // A PEM key is printed a line at a time: every line of it is hidden.
    for l in pem.lines() {
        let out = crate::mask(&format!("key: {l}"), std::slice::from_ref(&pem));
        assert_eq!(out, "key: ***", "{l}");
    }
    // Two secrets whose occurrences overlap: nothing of either survives.
    let secrets = vec!["abcdef".to_string(), "defghi".to_string()];
    assert_eq!(crate::mask("x abcdefghi y", &secrets), "x *** y");
    assert_eq!(crate::mask("defghi then abcdef", &secrets), "*** then ***");
    // Overlapping occurrences of one secret, and text around non-ASCII.
    let one = vec!["aa".to_string()];
    assert_eq!(crate::mask("é aaa é", &one), "é *** é");
    assert_eq!(crate::mask("nothing here", &secrets), "nothing here");
}
