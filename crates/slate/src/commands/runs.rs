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
    // Environments kept by `build --keep-failed` in this project's runs.
    if let Ok(store) = ctx.store() {
        let now = slate_store::events::now();
        for (_, k) in slate_run::kept::list(store.root()) {
            if k.project != project.dir {
                continue;
            }
            let left = slate_run::kept::TTL.as_secs_f64() - (now - k.created);
            println!(
                "kept {}/{}: `slate shell --keep {}/{}` ({} left before `slate gc` removes it)",
                k.run,
                k.target,
                k.run,
                k.target,
                if left > 0.0 {
                    format!(
                        "{:.0} h {:.0} min",
                        (left / 3600.0).floor(),
                        (left % 3600.0) / 60.0
                    )
                } else {
                    "no time".into()
                }
            );
        }
    }
    Ok(Exit::Ok.into())
}

pub fn logs(ctx: &Ctx, target: &str, run: Option<&str>, follow: bool) -> CmdResult {
    let project = ctx.project()?;
    let dir = super::runs_dir(&project);
    let has = |id: &String| {
        dir.join(id).join(format!("{target}.log")).exists()
            || (follow
                && read_record(&dir, id).is_ok_and(|r| r.targets.iter().any(|t| t.name == target)))
    };
    let id = match run {
        Some(r) => r.to_string(),
        None => list_runs(&dir).into_iter().rev().find(has).ok_or_else(|| {
            CliError::usage(format!("no run has a log of `{target}`"))
                .hint("`slate runs` lists the runs")
        })?,
    };
    if follow {
        return follow_log(&dir, &id, target);
    }
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

/// `slate report`: the HTML report of a run.
pub fn report(ctx: &Ctx, run: Option<&str>, output: Option<&std::path::Path>) -> CmdResult {
    let project = ctx.project()?;
    let dir = super::runs_dir(&project);
    let id = match run {
        Some(r) => r.to_string(),
        None => list_runs(&dir)
            .pop()
            .ok_or_else(|| CliError::usage("no runs yet").hint("`slate build` makes one"))?,
    };
    let dest = output.map(|o| ctx.cwd.join(o));
    let path = write_report(&dir, &id, dest.as_deref())?;
    ctx.say(&format!("report of run {id}: {}", path.display()));
    Ok(Exit::Ok.into())
}

/// Writes run `id`'s report to `dest` (default: its run folder's
/// report.html), whole or not at all; where it went.
pub fn write_report(
    dir: &std::path::Path,
    id: &str,
    dest: Option<&std::path::Path>,
) -> Result<std::path::PathBuf, CliError> {
    let record = read_record(dir, id)
        .map_err(|e| CliError::from_error(Exit::Usage, &e).hint("`slate runs` lists the runs"))?;
    let page = slate_store::html::render(&record, &dir.join(id));
    let dest = dest
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| dir.join(id).join(slate_store::html::FILE));
    let tmp = dest.with_extension("html.tmp");
    fs_err::write(&tmp, page)
        .and_then(|()| fs_err::rename(&tmp, &dest))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            CliError::from_error(Exit::Infra, &e)
        })?;
    Ok(dest)
}

/// Prints `target`'s log in run `id` as it grows, until the target has
/// finished, the run has ended, or the slate making it is gone.
fn follow_log(dir: &std::path::Path, id: &str, target: &str) -> CmdResult {
    use std::io::{Read, Seek, SeekFrom, Write};
    let path = dir.join(id).join(format!("{target}.log"));
    let mut pos = 0u64;
    let mut out = std::io::stdout().lock();
    let mut buf = Vec::new();
    loop {
        // What decides the end is read before the log, so the lines that
        // came before it are all printed.
        let record = read_record(dir, id).map_err(|e| {
            CliError::from_error(Exit::Usage, &e).hint("`slate runs` lists the runs")
        })?;
        let done = record.ended.is_some()
            || record
                .targets
                .iter()
                .any(|t| t.name == target && t.status.is_some())
            || !record.pid.is_some_and(alive);
        if let Ok(mut f) = std::fs::File::open(&path) {
            f.seek(SeekFrom::Start(pos))
                .and_then(|_| {
                    buf.clear();
                    f.read_to_end(&mut buf)
                })
                .map_err(|e| CliError::from_error(Exit::Infra, &e))?;
            pos += buf.len() as u64;
            out.write_all(&buf)
                .and_then(|_| out.flush())
                .map_err(|e| CliError::from_error(Exit::Infra, &e))?;
        }
        if done {
            return Ok(Exit::Ok.into());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Whether process `pid` is a running slate.
fn alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("slate"))
}

/// The sinks of `[settings.logs]` and `extra` (flags), parsed.
fn sinks(
    project: &slate_config::Project,
    extra: &[String],
) -> Result<Vec<slate_ship::Sink>, CliError> {
    project
        .settings
        .ship
        .iter()
        .chain(extra)
        .map(|u| {
            slate_ship::Sink::parse(u).map_err(|why| {
                CliError::usage(why).hint("fix `ship` under [settings.logs], or the --ship flag")
            })
        })
        .collect()
}

/// A shipper for a run's log in `run_dir`, when any sink is set.
pub fn shipper(
    project: &slate_config::Project,
    extra: &[String],
    run_dir: &std::path::Path,
) -> Result<Option<slate_ship::Shipper>, CliError> {
    let sinks = sinks(project, extra)?;
    if sinks.is_empty() {
        return Ok(None);
    }
    let settings = slate_ship::Settings::from_env(project.settings.ship_ca.clone());
    Ok(Some(slate_ship::Shipper::start(run_dir, &sinks, &settings)))
}

/// Tells the shipper more of the log is on disk (the run recorder, before
/// it in the same sink list, has written it).
pub struct Poke<'a>(pub Option<&'a slate_ship::Shipper>);

impl slate_store::events::EventSink for Poke<'_> {
    fn event(&self, _: &slate_store::events::Event) {
        if let Some(s) = self.0 {
            s.poke();
        }
    }
}

/// How long the end of a run waits for sinks that have been answering,
/// and for ones that have not answered yet: what a sink that never answers
/// costs a build. Batches go out while the build runs, so a sink that works
/// has usually answered long before the end; what a slow first answer
/// misses stays in the run's log for `slate logs --ship`.
const SHIP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
const SHIP_UNPROVEN: std::time::Duration = std::time::Duration::from_millis(250);

/// Gives answering sinks a moment to take the rest; says once per sink
/// what was not delivered and how to send it later.
pub fn finish_shipping(ctx: &Ctx, shipper: slate_ship::Shipper, run_id: &str) {
    let _ = ctx;
    for u in shipper.finish(SHIP_GRACE, SHIP_UNPROVEN) {
        eprintln!(
            "warning: {} log line(s) of run {run_id} were not delivered to {}: {}; `slate logs --ship {run_id}` sends them",
            u.lines, u.sink, u.why
        );
    }
}

/// `slate logs --ship RUN`: what the run's log has not yet delivered.
pub fn ship(ctx: &Ctx, run: &str, extra: &[String]) -> CmdResult {
    let project = ctx.project()?;
    let dir = super::runs_dir(&project);
    if read_record(&dir, run).is_err() {
        return Err(CliError::usage(format!("no run `{run}`")).hint("`slate runs` lists the runs"));
    }
    let sinks = sinks(&project, extra)?;
    if sinks.is_empty() {
        return Err(CliError::usage("no log sinks are set")
            .hint("name them under [settings.logs] `ship = [...]`, or with --to URL"));
    }
    let settings = slate_ship::Settings::from_env(project.settings.ship_ca.clone());
    let mut failed = 0;
    for sink in &sinks {
        match slate_ship::ship_rest(&dir.join(run), sink, &settings, 3) {
            Ok(n) => ctx.say(&format!("{sink}: sent {n} log line(s) of run {run}")),
            Err(u) => {
                failed += 1;
                eprintln!(
                    "{sink}: {} log line(s) still not delivered: {}",
                    u.lines, u.why
                );
            }
        }
    }
    if failed > 0 {
        return Err(CliError::new(
            Exit::Infra,
            format!("{failed} log sink(s) did not take run {run}'s log"),
        )
        .hint(format!("try again later with `slate logs --ship {run}`")));
    }
    Ok(Exit::Ok.into())
}
