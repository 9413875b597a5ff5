//! One module per verb.

pub mod bake;
pub mod build;
pub mod check;
pub mod images;
pub mod layercache;
pub mod provenance;
pub mod publish;
pub mod remote;
pub mod run;
pub mod runs;
pub mod verify;

use crate::error::CliError;
use slate_config::Project;

/// A new run id: UTC time, then a short random part (ids sort by time).
pub fn new_run_id() -> String {
    let now = std::time::SystemTime::now();
    let nanos = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    // `2026-12-02T18:45:07Z` → `20261202-184507`
    let stamp: String = humantime::format_rfc3339_seconds(now)
        .to_string()
        .chars()
        .filter_map(|c| match c {
            '0'..='9' => Some(c),
            'T' => Some('-'),
            _ => None,
        })
        .collect();
    let salt = (nanos ^ std::process::id().rotate_left(16)) & 0xffff;
    format!("{stamp}-{salt:04x}")
}

/// What every run (`build`, `bake`, `verify`) starts with: an id, a run
/// record under `.slate/runs`, and a cancel flag that Ctrl-C sets
/// (`on_cancel` says so to the user).
pub struct Run {
    pub id: String,
    pub recorder: slate_store::record::RunRecorder,
    pub cancel: slate_provider::Cancel,
}

pub fn start_run(
    project: &Project,
    on_cancel: impl Fn() + Send + 'static,
) -> Result<Run, CliError> {
    let id = new_run_id();
    let recorder = slate_store::record::RunRecorder::create(
        &runs_dir(project),
        &id,
        std::env::args().collect(),
    )
    .map_err(|e| {
        CliError::from_error(crate::error::Exit::Infra, &e)
            .hint("slate writes run records under `.slate/runs` next to slate.toml")
    })?;
    let cancel = slate_provider::Cancel::new();
    crate::signals::install(cancel.clone(), on_cancel);
    Ok(Run {
        id,
        recorder,
        cancel,
    })
}

/// An unknown target or image name, with the closest known one as a hint.
pub fn unknown(kind: &str, name: &str, known: Vec<&str>) -> CliError {
    let mut e = CliError::usage(format!("no {kind} named `{name}`"));
    if let Some(best) = slate_config::diag::did_you_mean(name, known.iter().copied()) {
        e = e.hint(format!("did you mean `{best}`?"));
    } else if !known.is_empty() {
        e = e.hint(format!("known {kind}s: {}", known.join(", ")));
    }
    e
}

pub fn runs_dir(p: &Project) -> std::path::PathBuf {
    p.dir.join(".slate/runs")
}

#[cfg(test)]
mod tests {
    #[test]
    fn run_ids_are_utc_time_then_a_salt() {
        let id = super::new_run_id();
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(parts.len(), 3, "{id}");
        assert_eq!(
            (parts[0].len(), parts[1].len(), parts[2].len()),
            (8, 6, 4),
            "{id}"
        );
        assert!(parts[0].starts_with("20"), "{id}");
    }
}
