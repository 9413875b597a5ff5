//! `slate publish`, and publishing after `slate build` when
//! `[settings] publish` is set.

use super::images::human;
use crate::error::{CliError, CmdResult, Exit};
use crate::Ctx;
use slate_config::Project;
use slate_publish::{Destination, FileOutcome, PublishOptions, PublishReporter, Summary};
use std::time::Instant;

pub fn publish(
    ctx: &Ctx,
    run: Option<&str>,
    to: Option<&str>,
    endpoint: Option<&str>,
    jobs: Option<usize>,
) -> CmdResult {
    let project = ctx.project()?;
    let Some(url) = to.or(project.settings.publish.as_deref()) else {
        return Err(CliError::usage("nowhere to publish to")
            .hint("pass `--to s3://BUCKET/PREFIX` (or `file://PATH`), or set `publish = \"…\"` under `[settings]` in slate.toml"));
    };
    publish_run(ctx, &project, url, run, endpoint, jobs)?;
    Ok(Exit::Ok.into())
}

struct Lines<'a>(&'a Ctx);

impl PublishReporter for Lines<'_> {
    fn file_done(&self, key: &str, outcome: FileOutcome) {
        if !self.0.cli.verbose {
            return;
        }
        match outcome {
            FileOutcome::Sent { bytes, parts } if parts > 1 => self
                .0
                .say(&format!("  sent {key} ({}, {parts} parts)", human(bytes))),
            FileOutcome::Sent { bytes, .. } => {
                self.0.say(&format!("  sent {key} ({})", human(bytes)))
            }
            FileOutcome::Skipped { bytes } => self.0.say(&format!(
                "  kept {key} ({}, already there with the same sha256)",
                human(bytes)
            )),
        }
    }
}

/// Publishes the run in the project's artifacts folder to `url`.
pub fn publish_run(
    ctx: &Ctx,
    project: &Project,
    url: &str,
    run: Option<&str>,
    endpoint: Option<&str>,
    jobs: Option<usize>,
) -> Result<Summary, CliError> {
    let dest = Destination::parse(url, &project.dir, endpoint).map_err(|e| {
        let mut c = CliError::from_error(Exit::Usage, &e);
        c.hint = e.hint();
        c
    })?;
    let opts = PublishOptions {
        jobs: jobs.unwrap_or(8).max(1),
        run_id: run.map(str::to_string),
    };
    let started = Instant::now();
    let artifacts = project.dir.join(&project.settings.artifacts);
    let summary = slate_publish::publish(&artifacts, &dest, &opts, &Lines(ctx)).map_err(|e| {
        let exit = if e.is_remote() {
            Exit::Infra
        } else {
            Exit::Usage
        };
        let mut c = CliError::from_error(exit, &e);
        c.hint = e.hint();
        c
    })?;
    let secs = started.elapsed().as_secs_f64();
    match ctx.log_format() {
        crate::cli::LogFormat::Json => println!(
            "{}",
            serde_json::json!({
                "event": "published",
                "run_id": summary.run_id,
                "location": summary.location,
                "files_sent": summary.files_sent,
                "bytes_sent": summary.bytes_sent,
                "files_skipped": summary.files_skipped,
                "bytes_skipped": summary.bytes_skipped,
                "seconds": secs,
            })
        ),
        crate::cli::LogFormat::Text => ctx.say(&format!(
            "published run {} to {}: {} file(s) sent ({} B, {}), {} already there ({} B) in {secs:.1}s",
            summary.run_id,
            summary.location,
            summary.files_sent,
            summary.bytes_sent,
            human(summary.bytes_sent),
            summary.files_skipped,
            summary.bytes_skipped,
        )),
    }
    Ok(summary)
}
