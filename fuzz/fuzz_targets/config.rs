//! `slate.toml` text → `slate_config::load_str`: any input resolves to a
//! project or to diagnostics, never to a panic, and a project that resolves
//! keeps the promises the rest of slate relies on (names that are safe as
//! folder names and hostnames, bounded numbers).

#![no_main]

use libfuzzer_sys::fuzz_target;
use slate_config::{load_str, ConfigError, Project};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// A project folder with the files the seeds name (`build.sh`, `ci/config`),
/// so that resolution goes past its "does not exist" checks. One name for
/// every run: what it holds never changes, and no run leaves another behind.
fn project_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join("slate-fuzz-config");
        std::fs::create_dir_all(dir.join("ci")).unwrap();
        std::fs::write(dir.join("build.sh"), "#!/bin/sh\ntrue\n").unwrap();
        std::fs::write(dir.join("ci/config"), "x\n").unwrap();
        dir
    })
}

fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn check_project(p: &Project) {
    for i in &p.images {
        assert!(is_safe_name(&i.name), "image name {:?} resolved", i.name);
    }
    let mut seen = std::collections::BTreeSet::new();
    for t in &p.targets {
        assert!(is_safe_name(&t.name), "target name {:?} resolved", t.name);
        assert!(seen.insert(&t.name), "two targets named {:?}", t.name);
        assert!(p.image(&t.image).is_some(), "target uses missing image");
        assert!(t.workdir.starts_with('/') && t.workdir != "/");
        if let Some(c) = t.cpus {
            assert!(c > 0.0 && c <= 1024.0, "cpus = {c} resolved");
        }
        if let Some(d) = t.timeout {
            assert!(d > Duration::ZERO && d <= Duration::from_secs(365 * 86400));
        }
    }
    assert!(p.settings.jobs >= 1);
}

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let path = project_dir().join(slate_config::FILE_NAME);
    match load_str(&path, src) {
        Ok(project) => {
            check_project(&project);
            let _ = format!("{project:?}");
        }
        Err(ConfigError::Invalid(diags)) => {
            assert!(!diags.is_empty(), "an invalid config with no diagnostic");
            let lines = src.split('\n').count();
            for d in &diags {
                assert!(d.line >= 1 && d.line <= lines, "line {} of {lines}", d.line);
                assert!(d.col >= 1);
                let _ = d.to_string();
            }
            let _ = ConfigError::Invalid(diags).to_string();
        }
        Err(e) => panic!("load_str read no file but failed with {e:?}"),
    }
});
