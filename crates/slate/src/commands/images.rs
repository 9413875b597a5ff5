//! `slate images` and `slate gc`.

use crate::error::{CliError, CmdResult, Exit};
use crate::Ctx;
use std::collections::BTreeSet;
use std::time::SystemTime;

pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

fn ago(t: Option<SystemTime>) -> String {
    let Some(t) = t else { return "never".into() };
    let s = SystemTime::now()
        .duration_since(t)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

pub fn images(ctx: &Ctx) -> CmdResult {
    let project = ctx.project()?;
    let store = ctx.store()?;
    let mut used = BTreeSet::new();
    for img in &project.images {
        match slate_image::plan::plan_cached(&project, &img.name, &store) {
            Ok(plan) => {
                let baked = plan.layers.iter().all(|l| store.has(&l.key));
                let size: u64 = plan
                    .layers
                    .iter()
                    .filter_map(|l| store.meta(&l.key))
                    .map(|m| m.size)
                    .sum();
                println!(
                    "{}  {}  {}  {}",
                    img.name,
                    &plan.digest()[..12],
                    if baked { "baked" } else { "not baked" },
                    human(size)
                );
                for l in &plan.layers {
                    used.insert(l.key.clone());
                    match store.meta(&l.key) {
                        Some(m) => println!(
                            "  {}  {:>10}  used {:<8}  {}",
                            &l.key[..12],
                            human(m.size),
                            ago(store.last_used(&l.key)),
                            l.describe()
                        ),
                        None => println!(
                            "  {}  {:>10}  {:<13}  {}",
                            &l.key[..12],
                            "-",
                            "missing",
                            l.describe()
                        ),
                    }
                }
            }
            Err(e) => println!("{}  cannot plan: {e}", img.name),
        }
    }
    let others: Vec<_> = store
        .layers()
        .into_iter()
        .filter(|m| !used.contains(&m.key))
        .collect();
    if !others.is_empty() {
        let total: u64 = others.iter().map(|m| m.size).sum();
        println!(
            "{} other layer(s) in the cache, {} (`slate gc` removes them)",
            others.len(),
            human(total)
        );
    }
    // This project's cache mounts.
    let mine = slate_run::caches::project_dir(store.root(), &project.dir);
    for c in slate_run::caches::list(store.root()) {
        if c.path.starts_with(&mine) {
            println!(
                "cache {}  {:>10}  used {}  ({})",
                c.id,
                human(c.bytes),
                ago(Some(
                    SystemTime::now() - std::time::Duration::from_secs(c.idle)
                )),
                c.path.display()
            );
        }
    }
    Ok(Exit::Ok.into())
}

/// Removes cache mounts: every one with `all`, those unused for `idle`
/// with it, none otherwise (they are kept on purpose): how many, and their
/// bytes.
fn prune_caches(store_root: &std::path::Path, all: bool, idle: Option<u64>) -> (usize, u64) {
    let (mut n, mut bytes) = slate_run::caches::prune(store_root, all, idle);
    // Where earlier versions kept apt's folders, shared by every project.
    let legacy = store_root.join("apt");
    if legacy.is_dir() {
        let size = slate_layers::store::slate_size(&legacy);
        if slate_layers::store::remove_tree(&legacy).is_ok() {
            n += 1;
            bytes += size;
        }
    }
    (n, bytes)
}

/// Removes environments kept by `build --keep-failed` once their 24 h are
/// up (all of them with `all`): how many, and their bytes.
fn prune_kept(store_root: &std::path::Path, all: bool) -> (usize, u64) {
    let now = slate_store::events::now();
    let mut n = 0;
    let mut bytes = 0;
    for (dir, k) in slate_run::kept::list(store_root) {
        if all || now - k.created > slate_run::kept::TTL.as_secs_f64() {
            let size = slate_layers::store::slate_size(&dir);
            if slate_layers::store::remove_tree(&dir).is_ok() {
                n += 1;
                bytes += size;
            }
        }
    }
    // Run folders left empty.
    if let Ok(runs) = std::fs::read_dir(store_root.join("kept")) {
        for r in runs.flatten() {
            let _ = std::fs::remove_dir(r.path());
        }
    }
    (n, bytes)
}

pub struct GcArgs<'a> {
    pub all: bool,
    pub older_than: Option<&'a str>,
    pub keep_runs: usize,
    pub dry_run: bool,
}

/// `slate gc --remote`: on every ssh host, what killed runs left there;
/// in the cloud, slate's instances whose expiry has passed.
pub fn gc_remote(ctx: &Ctx) -> CmdResult {
    let project = ctx.project()?;
    if project.ssh.hosts.is_empty() && !project.ec2.configured {
        ctx.say("no remote providers are set up ([providers.ssh] names no hosts, no [providers.ec2]): nothing to reap");
        return Ok(crate::error::Exit::Ok.into());
    }
    let ec2 = if project.ec2.configured {
        Some(gc_ec2(&project))
    } else {
        None
    };
    let ssh = if project.ssh.hosts.is_empty() {
        Ok(crate::error::Exit::Ok.into())
    } else {
        gc_ssh(ctx, &project)
    };
    match ec2 {
        Some(Err(e)) => Err(e),
        _ => ssh,
    }
}

/// Terminates slate's instances whose `slate:expires` has passed.
fn gc_ec2(project: &slate_config::Project) -> CmdResult {
    let e = &project.ec2;
    let client = slate_ec2::client(e.region.as_deref(), e.endpoint.as_deref()).map_err(|why| {
        CliError::new(
            crate::error::Exit::Infra,
            format!("cannot reap ec2 instances: {why}"),
        )
    })?;
    let reaped = slate_ec2::reap(&client, std::time::SystemTime::now()).map_err(|err| {
        CliError::new(
            crate::error::Exit::Infra,
            format!("cannot reap ec2 instances: {err}"),
        )
        .hint("`slate check` says whether the credentials and endpoint work")
    })?;
    for (id, target, expired) in &reaped.terminated {
        println!("ec2: terminated {id} (target {target}, expired {expired})");
    }
    for (id, expires) in &reaped.waiting {
        println!("ec2: kept {id}: it may still be building (expires {expires})");
    }
    if reaped.terminated.is_empty() && reaped.waiting.is_empty() {
        println!("ec2: no instances of slate's are left in {}", client.region);
    }
    Ok(crate::error::Exit::Ok.into())
}

/// On every ssh host, what killed runs left there.
fn gc_ssh(ctx: &Ctx, project: &slate_config::Project) -> CmdResult {
    let store = ctx.store()?;
    let ssh = ctx.ssh_provider(store.root(), project)?;
    let mut failed = 0;
    for (host, res) in ssh.reap() {
        match res {
            Ok(what) => println!("{host}: {what}"),
            Err(why) => {
                failed += 1;
                println!("{host}: not reaped: {why}");
            }
        }
    }
    if failed > 0 {
        return Err(CliError::new(
            crate::error::Exit::Infra,
            format!("{failed} ssh host(s) could not be reaped (see above)"),
        )
        .hint("`slate check` says why a host cannot be used"));
    }
    Ok(crate::error::Exit::Ok.into())
}

pub fn gc(ctx: &Ctx, args: GcArgs) -> CmdResult {
    use slate_image::gc::Scope;
    let min_idle = match args.older_than {
        Some(d) => Some(
            slate_config::units::parse_span(d)
                .map_err(|e| CliError::usage(format!("--older-than: {e}")))?,
        ),
        None => None,
    };
    let project = ctx.project()?;
    let store = ctx.store()?;
    let scope = match (args.all, min_idle) {
        (true, _) => Scope::Everything,
        (false, Some(_)) => Scope::AllButThisProject,
        (false, None) => Scope::Unrooted,
    };
    let plan =
        slate_image::gc::plan(&store, &project, scope, min_idle, args.dry_run).map_err(|e| {
            CliError::usage(format!("cannot tell which layers this project uses: {e}"))
                .hint("fix the config, or remove everything with `slate gc --all`")
        })?;
    say_roots(ctx, &plan);
    if args.dry_run {
        say_dry_run(ctx, &store, &plan);
        return Ok(Exit::Ok.into());
    }
    let reaped = slate_sandbox::reap(&store.envs_dir());
    let tmp = store.clean_tmp();
    let swept = slate_image::gc::sweep(&store, &plan);
    // VM base disks and boot files of layers that are gone now, and saved
    // machines unused for --older-than.
    let (vm_files, vm_bytes) = slate_vm::boot::gc(&store.root().join("vm"), min_idle);
    let (runs_removed, run_bytes) = prune_runs(&super::runs_dir(&project), args.keep_runs);
    let (kept_removed, kept_bytes) = prune_kept(store.root(), args.all);
    let (caches_removed, cache_bytes) =
        prune_caches(store.root(), args.all, min_idle.map(|d| d.as_secs()));
    ctx.say(&format!(
        "removed {} layer(s): {} ({} bytes)",
        swept.layers,
        human(swept.bytes),
        swept.bytes
    ));
    ctx.say(&format!(
        "removed {} leftover environment(s): {}; {} leftover cgroup(s)",
        reaped.environments,
        human(reaped.bytes),
        reaped.cgroups
    ));
    ctx.say(&format!(
        "removed {runs_removed} old run(s): {}",
        human(run_bytes)
    ));
    ctx.say(&format!(
        "removed {kept_removed} kept environment(s){}: {}",
        if args.all { "" } else { " older than 24 h" },
        human(kept_bytes)
    ));
    ctx.say(&format!(
        "removed {caches_removed} cache mount(s){}: {}",
        match (args.all, min_idle) {
            (true, _) => String::new(),
            (false, Some(d)) => format!(" unused for {}", humantime::format_duration(d)),
            (false, None) => " (kept: --older-than or --all remove them)".into(),
        },
        human(cache_bytes)
    ));
    ctx.say(&format!("removed unfinished layers: {}", human(tmp)));
    ctx.say(&format!(
        "removed {vm_files} VM disk(s), boot file set(s) and saved machine(s) of removed layers{}: {}",
        match min_idle {
            Some(d) => format!(" or unused for {}", humantime::format_duration(d)),
            None => String::new(),
        },
        human(vm_bytes)
    ));
    ctx.say(&format!(
        "freed {} in all",
        human(swept.bytes + reaped.bytes + run_bytes + tmp + vm_bytes + kept_bytes + cache_bytes)
    ));
    let failed: Vec<String> = reaped
        .failed
        .iter()
        .map(|(p, e)| format!("{}: {e}", p.display()))
        .chain(swept.failed)
        .collect();
    if !failed.is_empty() {
        return Err(CliError::new(
            Exit::Infra,
            format!(
                "could not remove {} item(s), the rest was removed:\n  {}",
                failed.len(),
                failed.join("\n  ")
            ),
        )
        .hint("something still uses them (a mount, an immutable file); free it and run `slate gc` again"));
    }
    Ok(Exit::Ok.into())
}

/// What the gc roots decided: other projects kept, gone ones forgotten.
fn say_roots(ctx: &Ctx, plan: &slate_image::gc::Plan) {
    for (config, why) in &plan.unreadable {
        ctx.say(&format!(
            "warning: cannot read `{}` ({why}); keeping the layers it used when it last ran",
            config.display()
        ));
    }
    for config in &plan.forgotten {
        ctx.say(&format!(
            "forgot `{}`: it is gone, so its layers are no longer kept",
            config.display()
        ));
    }
    if plan.kept_for_others > 0 {
        ctx.say(&format!(
            "kept {} layer(s) that {} other project(s) use (`--older-than` or `--all` removes them)",
            plan.kept_for_others,
            plan.projects.len()
        ));
    }
}

fn say_dry_run(ctx: &Ctx, store: &slate_image::LayerStore, plan: &slate_image::gc::Plan) {
    let total: u64 = plan.remove.iter().map(|m| m.size).sum();
    for m in &plan.remove {
        println!(
            "would remove layer {}  {:>10}  used {:<8}  {}",
            &m.key[..12],
            human(m.size),
            ago(store.last_used(&m.key)),
            m.description
        );
    }
    ctx.say(&format!(
        "dry run: {} layer(s), {}, would be removed; nothing was removed",
        plan.remove.len(),
        human(total)
    ));
}

/// Removes all but the `keep` newest run records; returns how many went
/// and their bytes.
fn prune_runs(runs_dir: &std::path::Path, keep: usize) -> (usize, u64) {
    let runs = slate_store::record::list_runs(runs_dir);
    let (mut removed, mut bytes) = (0, 0);
    for r in &runs[..runs.len().saturating_sub(keep)] {
        let p = runs_dir.join(r);
        bytes += slate_image::store::slate_size(&p);
        let _ = fs_err::remove_dir_all(&p);
        removed += 1;
    }
    (removed, bytes)
}
