//! `slate runs` and `slate logs`.

use crate::error::{CliError, CmdResult, Exit};
use crate::Ctx;
use slate_store::events::TargetStatus;
use slate_store::record::{list_runs, read_record};

pub fn runs(ctx: &Ctx) -> CmdResult {
    let project = ctx.project()?;
    let dir = super::runs_dir(&project);
    let ids = list_runs(&dir);
    if ids.is_empty() {
        ctx.say("no runs yet (`slate build` makes one)");
    }
    for id in ids {
        let Ok(r) = read_record(&dir, &id) else {
            continue;
        };
        let ok = r
            .targets
            .iter()
            .filter(|t| t.status == Some(TargetStatus::Succeeded))
            .count();
        let took = r
            .ended
            .map(|e| format!("{:.1}s", e - r.started))
            .unwrap_or_else(|| "unfinished".into());
        let names: Vec<&str> = r.targets.iter().map(|t| t.name.as_str()).collect();
        println!(
            "{id}  {ok}/{} succeeded  {took}  {}",
            r.targets.len(),
            names.join(" ")
        );
    }
    Ok(Exit::Ok.into())
}

pub fn logs(ctx: &Ctx, target: &str, run: Option<&str>) -> CmdResult {
    let project = ctx.project()?;
    let dir = super::runs_dir(&project);
    let id = match run {
        Some(r) => r.to_string(),
        None => list_runs(&dir)
            .into_iter()
            .rev()
            .find(|id| dir.join(id).join(format!("{target}.log")).exists())
            .ok_or_else(|| {
                CliError::usage(format!("no run has a log of `{target}`"))
                    .hint("`slate runs` lists the runs")
            })?,
    };
    let path = dir.join(&id).join(format!("{target}.log"));
    let text = fs_err::read_to_string(&path).map_err(|e| {
        CliError::from_error(Exit::Usage, &e).hint(format!(
            "no log `{}`; `slate runs` lists the runs",
            path.display()
        ))
    })?;
    print!("{text}");
    Ok(Exit::Ok.into())
}
