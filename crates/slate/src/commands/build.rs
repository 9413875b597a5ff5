//! `slate build` and `slate up`.

use crate::cli::BuildArgs;
use crate::error::{CliError, CmdResult, Exit};
use crate::{signals, Ctx};
use slate_config::TargetSpec;
use slate_run::{BuildOptions, Orchestrator};
use slate_store::events::{EventSink, TargetStatus, Tee};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

pub fn up(ctx: &Ctx, target: &str, provider: Option<String>) -> CmdResult {
    let args = BuildArgs {
        targets: vec![target.to_string()],
        jobs: Some(1),
        provider,
        fail_fast: false,
        keep_going: false,
        junit: None,
        ship: vec![],
        keep_failed: false,
    };
    build(ctx, &args)
}

pub fn build(ctx: &Ctx, args: &BuildArgs) -> CmdResult {
    let project = ctx.project()?;
    let selected = slate_run::targets::select(&project, &args.targets, args.provider.as_deref())?;
    let needs = slate_run::targets::needs(&selected);
    let selected: Vec<&TargetSpec> = selected.iter().collect();
    let signer = super::provenance::signer(&project)?;
    let artifacts_dir = project.dir.join(&project.settings.artifacts);
    let _artifacts_lock = lock_artifacts(&artifacts_dir)?;
    let store = ctx.store_for(&project)?;
    let provider = ctx.providers(&store, &project, needs)?;
    // Environments a killed run left behind go first.
    let _ = slate_sandbox::reap(&store.envs_dir());

    let quiet = ctx.cli.quiet;
    let run = super::start_run(&project, move || {
        if !quiet {
            eprintln!("cancelling: destroying environments (Ctrl-C again to stop at once)");
        }
    })?;
    let (run_id, recorder) = (&run.id, &run.recorder);
    if let Some(ec2) = &provider.ec2 {
        ec2.set_run(run_id);
    }
    let reporter = ctx.reporter();
    let shipper = super::runs::shipper(&project, &args.ship, recorder.dir())?;
    let poke = super::runs::Poke(shipper.as_ref());
    let sinks: Vec<&dyn EventSink> = vec![recorder, &reporter, &poke];
    let tee = Tee(sinks);
    let layer_source = ctx.layer_source(&project)?;
    let orch = Orchestrator {
        project: &project,
        store: &store,
        provider: &provider,
        sink: &tee,
        cancel: run.cancel.clone(),
        layer_source: layer_source
            .as_ref()
            .map(|r| r as &dyn slate_image::LayerSource),
    };
    let opts = BuildOptions {
        run_id: run_id.clone(),
        jobs: args.jobs.unwrap_or(project.settings.jobs).max(1),
        fail_fast: args.fail_fast,
        artifacts_dir,
        signer,
        keep_failed: args.keep_failed,
    };
    let started = Instant::now();
    // The live view's clock redraws every 250 ms; the build's end stops it
    // at once (it is a wait on a channel, not a sleep).
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let results = std::thread::scope(|s| {
        if reporter.is_live() {
            let reporter = &reporter;
            s.spawn(move || {
                while let Err(RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(Duration::from_millis(250))
                {
                    reporter.tick();
                }
            });
        }
        let r = orch.build(&selected, &opts);
        drop(stop);
        r
    });
    reporter.clear();

    let exit = summarize(ctx, &project, run_id, &results, &reporter, started);
    if args.keep_failed {
        for (_, k) in slate_run::kept::list(store.root()) {
            if k.run == *run_id {
                ctx.say(&format!(
                    "kept {}'s environment: enter it with `slate shell --keep {run_id}/{}`",
                    k.target, k.target
                ));
            }
        }
    }
    if let Some(s) = shipper {
        super::runs::finish_shipping(ctx, s, run_id);
    }
    // The report is a view of the run: failing to write it fails nothing.
    match super::runs::write_report(&super::runs_dir(&project), run_id, None) {
        Ok(path) => ctx.say(&format!(
            "report: {}",
            path.strip_prefix(&ctx.cwd).unwrap_or(&path).display()
        )),
        Err(e) => eprintln!("warning: no report for run {run_id}: {}", e.message),
    }
    if let Some(path) = &args.junit {
        write_junit(&ctx.cwd.join(path), &super::runs_dir(&project), run_id)?;
    }
    if exit == Exit::Ok {
        if let Some(url) = &project.settings.publish {
            super::publish::publish_run(ctx, &project, url, Some(run_id), None, None).map_err(
                |mut e| {
                    e.hint = Some(format!(
                        "{}; the artifacts stay in {}/, publish them later with `slate publish --run {run_id}`",
                        e.hint.as_deref().unwrap_or("the build succeeded"),
                        project.settings.artifacts.display()
                    ));
                    e
                },
            )?;
        }
    }
    Ok(exit.into())
}

/// The run as JUnit XML at `path` (its record and logs are in `runs_dir`).
fn write_junit(
    path: &std::path::Path,
    runs_dir: &std::path::Path,
    run_id: &str,
) -> Result<(), CliError> {
    let fail = |e: std::io::Error| {
        CliError::from_error(Exit::Infra, &e).hint(format!(
            "the build itself is done; `{}` could not be written",
            path.display()
        ))
    };
    let record = slate_store::record::read_record(runs_dir, run_id).map_err(fail)?;
    let xml = slate_store::junit::render(&record, &runs_dir.join(run_id));
    fs_err::write(path, xml).map_err(fail)
}

/// Prints what the run did; returns the exit it ends with.
fn summarize(
    ctx: &Ctx,
    project: &slate_config::Project,
    run_id: &str,
    results: &[slate_run::TargetResult],
    reporter: &crate::report::Reporter,
    started: Instant,
) -> Exit {
    let count = |s: TargetStatus| results.iter().filter(|r| r.status == s).count();
    let (baked, cached, pulled) = reporter.bake_counts();
    if pulled > 0 {
        ctx.say(&format!(
            "images: {baked} layer(s) baked, {pulled} pulled from the layer cache, {cached} cached"
        ));
    } else if baked == 0 && cached > 0 {
        ctx.say(&format!(
            "images: nothing to bake, all {cached} layers cached"
        ));
    } else if baked > 0 {
        ctx.say(&format!("images: {baked} layer(s) baked, {cached} cached"));
    }
    let artifacts: usize = results.iter().map(|r| r.artifacts.len()).sum();
    let summary = format!(
        "run {run_id}: {} succeeded, {} failed, {} infrastructure failures, {} cancelled/skipped in {:.1}s; {artifacts} artifact(s) in {}/; logs in .slate/runs/{run_id}/",
        count(TargetStatus::Succeeded),
        count(TargetStatus::Failed),
        count(TargetStatus::InfraFailed),
        count(TargetStatus::Cancelled) + count(TargetStatus::Skipped),
        started.elapsed().as_secs_f64(),
        project.settings.artifacts.display(),
    );
    if ctx.log_format() == crate::cli::LogFormat::Text {
        println!("{summary}");
    }
    if signals::interrupted() {
        Exit::Interrupted
    } else if count(TargetStatus::InfraFailed) > 0 {
        Exit::Infra
    } else if count(TargetStatus::Failed) > 0
        || count(TargetStatus::Cancelled) + count(TargetStatus::Skipped) > 0
    {
        Exit::BuildFailed
    } else {
        Exit::Ok
    }
}

/// One run at a time writes an artifacts folder: two would interleave
/// their manifests and checksums. Held until the run ends.
fn lock_artifacts(dir: &std::path::Path) -> Result<slate_layers::lock::Lock, CliError> {
    let infra = |e: std::io::Error| {
        CliError::new(
            Exit::Infra,
            format!("cannot lock the artifacts folder `{}`: {e}", dir.display()),
        )
    };
    fs_err::create_dir_all(dir).map_err(infra)?;
    match slate_layers::lock::try_lock_file(&dir.join(".slate-lock")).map_err(infra)? {
        Some(file) => Ok(file),
        None => Err(CliError::new(
            Exit::Usage,
            format!(
                "another slate run is writing the artifacts folder `{}`",
                dir.display()
            ),
        )
        .hint("wait for it to finish, or give this run its own folder with `artifacts = \"...\"` under [settings]")),
    }
}
