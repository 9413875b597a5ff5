//! `slate bake`.

use crate::error::{CliError, CmdResult, Exit};
use crate::{signals, Ctx};
use slate_provider::Cancel;
use slate_run::Orchestrator;

pub fn bake(ctx: &Ctx, images: &[String]) -> CmdResult {
    let project = ctx.project()?;
    let names: Vec<String> = if images.is_empty() {
        project.images.iter().map(|i| i.name.clone()).collect()
    } else {
        images.to_vec()
    };
    for n in &names {
        if project.image(n).is_none() {
            return Err(super::unknown(
                "image",
                n,
                project.images.iter().map(|i| i.name.as_str()).collect(),
            ));
        }
    }
    let store = ctx.store()?;
    let provider = ctx.sandbox(&store)?;
    let reporter = ctx.reporter();
    let cancel = Cancel::new();
    signals::install(cancel.clone(), || eprintln!("cancelling the bake"));
    let orch = Orchestrator {
        project: &project,
        store: &store,
        provider: &provider,
        sink: &reporter,
        cancel,
    };
    let results = orch.bake(&names);
    reporter.clear();
    let mut first_err: Option<CliError> = None;
    for (name, r) in results {
        match r {
            Ok(img) => ctx.say(&format!(
                "image {name}: {} ({} layers)",
                &img.digest[..12],
                img.layers.len()
            )),
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(e.into());
                }
            }
        }
    }
    let (baked, cached) = reporter.bake_counts();
    if baked == 0 {
        ctx.say(&format!("nothing to bake: all {cached} layers cached"));
    } else {
        ctx.say(&format!("{baked} layer(s) baked, {cached} cached"));
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(Exit::Ok.into()),
    }
}
