use super::*;
use std::sync::Mutex;

/// An artifacts folder as a build leaves it: one succeeded target with an
/// artifact and provenance, one failed target, the two indexes.
fn run_folder(dir: &Path, run_id: &str, big: usize) -> String {
    let a = dir.join("tool-bookworm");
    std::fs::create_dir_all(&a).unwrap();
    let data: Vec<u8> = (0..big).map(|i| (i % 251) as u8).collect();
    std::fs::write(a.join("tool.deb"), &data).unwrap();
    std::fs::write(a.join("provenance.json"), "{}").unwrap();
    let sha = hex(&Sha256::digest(&data));
    std::fs::write(
        dir.join("SHA256SUMS"),
        format!("{sha}  tool-bookworm/tool.deb\n"),
    )
    .unwrap();
    // Written through the type `slate build` writes it with.
    use slate_store::artifacts::{ArtifactRecord, Manifest, ManifestTarget};
    let target = |name: &str, status: &str, artifacts: Vec<ArtifactRecord>| ManifestTarget {
        name: name.into(),
        status: status.into(),
        image: "builder".into(),
        image_digest: "0".repeat(64),
        provider: "sandbox".into(),
        artifacts,
    };
    let manifest = Manifest {
        run_id: run_id.into(),
        slate_version: "0".into(),
        targets: vec![
            target(
                "tool-bookworm",
                "succeeded",
                vec![ArtifactRecord {
                    path: "tool-bookworm/tool.deb".into(),
                    size: big as u64,
                    sha256: sha.clone(),
                }],
            ),
            target("tool-trixie", "failed", vec![]),
        ],
    };
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    sha
}

#[derive(Default)]
struct Recorder(Mutex<Vec<(String, FileOutcome)>>);

impl PublishReporter for Recorder {
    fn file_done(&self, key: &str, outcome: FileOutcome) {
        self.0.lock().unwrap().push((key.to_string(), outcome));
    }
}

#[test]
fn publishes_every_file_then_the_indexes_then_latest() {
    let art = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    run_folder(art.path(), "r1", 1000);
    let dest = Destination::parse("file://pub", out.path(), None).unwrap();
    let rec = Recorder::default();
    let s = publish(art.path(), &dest, &PublishOptions::default(), &rec).unwrap();
    assert_eq!(
        (s.files_sent, s.bytes_sent, s.files_skipped),
        (4, s.bytes_sent, 0)
    );
    let root = out.path().join("pub");
    assert_eq!(
        std::fs::read(root.join("r1/tool-bookworm/tool.deb")).unwrap(),
        std::fs::read(art.path().join("tool-bookworm/tool.deb")).unwrap()
    );
    assert!(root.join("r1/tool-bookworm/provenance.json").is_file());
    assert!(!root.join("r1/tool-trixie").exists());
    assert_eq!(
        std::fs::read_to_string(root.join("latest")).unwrap(),
        "r1\n"
    );
    let order: Vec<String> = rec
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    assert!(order[2].ends_with("/r1/SHA256SUMS"), "{order:?}");
    assert!(order[3].ends_with("/r1/manifest.json"), "{order:?}");
}

#[test]
fn publishing_again_sends_nothing() {
    let art = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    run_folder(art.path(), "r1", 5000);
    let dest = Destination::parse("file://pub", out.path(), None).unwrap();
    publish(art.path(), &dest, &PublishOptions::default(), &()).unwrap();
    let again = publish(art.path(), &dest, &PublishOptions::default(), &()).unwrap();
    assert_eq!(again.bytes_sent, 0);
    assert_eq!(again.files_skipped, 4);
    assert!(again.bytes_skipped >= 5000);
}

#[test]
fn a_big_file_goes_in_parts() {
    let art = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let size = MULTIPART_THRESHOLD as usize + 3;
    let sha = run_folder(art.path(), "r1", size);
    let dest = Destination::parse("file://pub", out.path(), None).unwrap();
    let rec = Recorder::default();
    publish(art.path(), &dest, &PublishOptions::default(), &rec).unwrap();
    let parts = rec
        .0
        .lock()
        .unwrap()
        .iter()
        .find(|(k, _)| k.ends_with("tool.deb"))
        .map(|(_, o)| *o);
    assert_eq!(
        parts,
        Some(FileOutcome::Sent {
            bytes: size as u64,
            parts: 3
        })
    );
    let back = std::fs::read(out.path().join("pub/r1/tool-bookworm/tool.deb")).unwrap();
    assert_eq!(hex(&Sha256::digest(&back)), sha);
}

#[test]
fn a_changed_artifact_is_refused_and_nothing_becomes_visible() {
    let art = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    run_folder(art.path(), "r1", 100);
    std::fs::write(art.path().join("tool-bookworm/tool.deb"), "tampered").unwrap();
    let dest = Destination::parse("file://pub", out.path(), None).unwrap();
    let e = publish(art.path(), &dest, &PublishOptions::default(), &()).unwrap_err();
    assert!(matches!(e, PublishError::Changed { .. }), "{e}");
    assert!(!out.path().join("pub/r1/manifest.json").exists());
    assert!(!out.path().join("pub/latest").exists());
}

#[test]
fn another_run_id_is_refused() {
    let art = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    run_folder(art.path(), "r2", 10);
    let dest = Destination::parse("file://pub", out.path(), None).unwrap();
    let opts = PublishOptions {
        run_id: Some("r1".into()),
        ..Default::default()
    };
    let e = publish(art.path(), &dest, &opts, &()).unwrap_err();
    assert!(matches!(e, PublishError::OtherRun { .. }), "{e}");
    assert!(e.hint().unwrap().contains("--run r2"));
}

#[test]
fn no_run_says_build_first() {
    let art = tempfile::tempdir().unwrap();
    let dest = Destination::parse("file://pub", art.path(), None).unwrap();
    let e = publish(art.path(), &dest, &PublishOptions::default(), &()).unwrap_err();
    assert!(matches!(e, PublishError::NoManifest { .. }));
    assert_eq!(e.hint().as_deref(), Some("run `slate build` first"));
}
