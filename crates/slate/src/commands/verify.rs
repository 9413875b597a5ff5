//! `slate verify TARGET`: build twice in two fresh environments, with other
//! hostnames and start times, and compare the artifacts byte for byte.

use crate::error::{CliError, CmdResult, Exit};
use crate::Ctx;
use slate_run::Orchestrator;
use slate_store::artifacts::ArtifactStore;
use slate_store::events::{EventSink, TargetStatus, Tee};
use std::path::Path;

/// The newest modification time among the inputs: a SOURCE_DATE_EPOCH that
/// depends on the sources only.
fn inputs_epoch(t: &slate_config::TargetSpec, skip: &[std::path::PathBuf]) -> u64 {
    let mut newest = 0;
    for input in &t.inputs {
        if let Ok(set) = slate_run::inputs::collect(input, &t.exclude, skip) {
            for rel in &set.entries {
                if let Ok(m) = fs_err::symlink_metadata(set.base.join(rel)) {
                    use std::os::unix::fs::MetadataExt;
                    newest = newest.max(m.mtime().max(0) as u64);
                }
            }
        }
    }
    newest
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs_err::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != slate_store::artifacts::PROVENANCE)
        .collect();
    v.sort();
    v
}

pub fn verify(ctx: &Ctx, name: &str) -> CmdResult {
    let project = ctx.project()?;
    let Some(target) = project.target(name) else {
        return Err(super::unknown(
            "target",
            name,
            project.targets.iter().map(|t| t.name.as_str()).collect(),
        ));
    };
    // Through the same choice as `build`: a vm target is verified in VMs.
    let chosen = slate_run::targets::select(&project, std::slice::from_ref(&target.name), None)?;
    let target = &chosen[0];
    let store = ctx.store_for(&project)?;
    let provider = ctx.providers(&store, &project, slate_run::targets::needs(&chosen))?;
    let run = super::start_run(&project, || eprintln!("cancelling the verification"))?;
    let (run_id, runs_dir) = (&run.id, super::runs_dir(&project));
    if let Some(ec2) = &provider.ec2 {
        ec2.set_run(run_id);
    }
    let reporter = ctx.reporter();
    let tee = Tee(vec![&run.recorder as &dyn EventSink, &reporter]);
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
    let baked = orch.bake(std::slice::from_ref(&target.image));
    let img = match baked.into_values().next() {
        Some(Ok(img)) => img,
        Some(Err(e)) => return Err(e.into()),
        None => return Err(CliError::new(Exit::Infra, "nothing was baked")),
    };
    let skip = vec![
        project.dir.join(".slate"),
        project.dir.join(&project.settings.artifacts),
    ];
    let epoch = inputs_epoch(target, &skip).to_string();
    let out_dir = runs_dir.join(run_id).join("verify");
    let mut dirs = Vec::new();
    for (i, suffix) in ["a", "b"].iter().enumerate() {
        // Another hostname each time; start times differ by themselves.
        let mut t = target.clone();
        t.name = format!("{}-{suffix}", target.name);
        if !t.env.iter().any(|(k, _)| k == "SOURCE_DATE_EPOCH") {
            t.env.push(("SOURCE_DATE_EPOCH".into(), epoch.clone()));
        }
        let arts = ArtifactStore::new(out_dir.clone(), &format!("{run_id}-{i}"));
        let r = orch.run_target(&t, &img, &arts, None);
        arts.finish();
        if r.status != TargetStatus::Succeeded {
            reporter.clear();
            let exit = if r.status == TargetStatus::InfraFailed {
                Exit::Infra
            } else {
                Exit::BuildFailed
            };
            return Err(CliError::new(
                exit,
                format!(
                    "build {} of `{name}` did not succeed: {}",
                    i + 1,
                    r.error.unwrap_or_default()
                ),
            ));
        }
        dirs.push(out_dir.join(&t.name));
    }
    reporter.clear();
    let (a, b) = (&dirs[0], &dirs[1]);
    let (fa, fb) = (files(a), files(b));
    let differ = differences(a, b, &fa, &fb);
    if differ.is_empty() {
        println!(
            "{name}: reproducible: {} artifact(s) identical in two fresh environments",
            fa.len()
        );
        return Ok(Exit::Ok.into());
    }
    println!("{name}: NOT reproducible; {} file(s) differ:", differ.len());
    for d in &differ {
        println!("  {d}");
    }
    if slate_image::which("diffoscope") {
        for f in fa.iter().filter(|f| fb.contains(f)) {
            if fs_err::read(a.join(f)).ok() != fs_err::read(b.join(f)).ok() {
                diffoscope(f, &a.join(f), &b.join(f));
            }
        }
    }
    println!("both builds are kept in {}", out_dir.display());
    Ok(Exit::BuildFailed.into())
}

/// How the artifacts `fa` of folder `a` and `fb` of `b` differ, a line each.
fn differences(a: &Path, b: &Path, fa: &[String], fb: &[String]) -> Vec<String> {
    let mut differ = Vec::new();
    for f in fa.iter().chain(fb.iter().filter(|f| !fa.contains(f))) {
        let (x, y) = (fs_err::read(a.join(f)).ok(), fs_err::read(b.join(f)).ok());
        match (x, y) {
            (Some(x), Some(y)) if x == y => {}
            (Some(_), Some(_)) => differ.push(format!("{f}: contents differ")),
            (None, _) => differ.push(format!("{f}: only in the second build")),
            (_, None) => differ.push(format!("{f}: only in the first build")),
        }
    }
    differ
}

/// The first 40 lines of what diffoscope says of one artifact's two builds.
fn diffoscope(name: &str, a: &Path, b: &Path) {
    let o = std::process::Command::new("diffoscope")
        .arg("--text")
        .arg("-")
        .arg(a)
        .arg(b)
        .output();
    if let Ok(o) = o {
        println!("diffoscope {name}:");
        for l in String::from_utf8_lossy(&o.stdout).lines().take(40) {
            println!("  {l}");
        }
    }
}
