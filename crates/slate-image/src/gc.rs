//! What `slate gc` keeps. The layer cache is shared by every project on
//! the machine, so each project that bakes, builds or runs registers its
//! config as a root (`$CACHE/v1/roots/<hash>.json`, as Nix keeps
//! garbage-collection roots), with the layers its images used then. `gc`
//! keeps every layer a registered project still uses: the config is read
//! again when it can be, the recorded layers count when it cannot (a config
//! being edited), and a root whose config is gone is forgotten.

use crate::store::{LayerMeta, LayerStore};
use serde::{Deserialize, Serialize};
use slate_config::Project;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

#[derive(Debug, Serialize, Deserialize)]
struct Root {
    config: PathBuf,
    layers: BTreeSet<String>,
}

fn roots_dir(store: &LayerStore) -> PathBuf {
    store.root().join("roots")
}

fn root_file(store: &LayerStore, config: &Path) -> PathBuf {
    let id = crate::plan::hash(&[config.as_os_str().as_encoded_bytes()]);
    roots_dir(store).join(format!("{}.json", &id[..32]))
}

/// The layers `project`'s images use now (those it can plan).
pub fn layers_of(store: &LayerStore, project: &Project) -> Result<BTreeSet<String>, String> {
    let mut keys = BTreeSet::new();
    for img in &project.images {
        let plan =
            crate::plan::plan_cached(project, &img.name, store).map_err(|e| e.to_string())?;
        keys.extend(plan.layers.iter().map(|l| l.key.clone()));
    }
    Ok(keys)
}

/// Registers `project` unless it already is: one `stat` when it is (for
/// commands that only use layers, on the start-up path of every `run`).
pub fn ensure_registered(store: &LayerStore, project: &Project) {
    let registered = project
        .file
        .canonicalize()
        .is_ok_and(|c| root_file(store, &c).is_file());
    if !registered {
        register(store, project);
    }
}

/// Registers `project` as a root with the layers its images use now.
/// Best effort: a cache that cannot record it only makes `gc` forget it.
pub fn register(store: &LayerStore, project: &Project) {
    let Ok(config) = project.file.canonicalize() else {
        return;
    };
    let layers = layers_of(store, project).unwrap_or_default();
    write_root(store, &Root { config, layers });
}

fn write_root(store: &LayerStore, root: &Root) {
    let file = root_file(store, &root.config);
    let Ok(json) = serde_json::to_vec_pretty(root) else {
        return;
    };
    // A rebake of an unchanged project registers what is already there:
    // reading it back is cheaper than writing and renaming it again.
    if std::fs::read(&file).is_ok_and(|old| old == json) {
        return;
    }
    let _ = fs_err::create_dir_all(roots_dir(store));
    {
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        if fs_err::write(&tmp, json).is_ok() {
            let _ = fs_err::rename(&tmp, &file);
        }
    }
}

/// Which layers a collection may remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Those no registered project uses (the default).
    Unrooted,
    /// Any but this project's (`--older-than`: idle ones only).
    AllButThisProject,
    /// Any (`--all`).
    Everything,
}

/// What a collection found.
#[derive(Debug, Default)]
pub struct Plan {
    /// Layers to remove, oldest first.
    pub remove: Vec<LayerMeta>,
    /// Layers kept because another project uses them.
    pub kept_for_others: usize,
    /// Projects whose layers were kept.
    pub projects: Vec<PathBuf>,
    /// Roots whose config is gone: forgotten.
    pub forgotten: Vec<PathBuf>,
    /// Projects that could not be read, with why: their recorded layers
    /// were kept.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// Decides what `gc` removes: layers outside `scope`'s protection, and,
/// with `min_idle`, only those not used for that long. Forgets roots
/// whose config is gone (unless `dry_run`).
pub fn plan(
    store: &LayerStore,
    project: &Project,
    scope: Scope,
    min_idle: Option<Duration>,
    dry_run: bool,
) -> Result<Plan, String> {
    let mut out = Plan::default();
    let mut keep = BTreeSet::new();
    if scope != Scope::Everything {
        keep = layers_of(store, project)?;
        register(store, project);
    }
    let this = project.file.canonicalize().ok();
    let mut others = BTreeSet::new();
    if scope == Scope::Unrooted {
        for (file, root) in roots(store) {
            if Some(&root.config) == this.as_ref() {
                continue;
            }
            if !root.config.is_file() {
                if !dry_run {
                    let _ = fs_err::remove_file(&file);
                }
                out.forgotten.push(root.config);
                continue;
            }
            let layers = match slate_config::load(
                root.config.parent().unwrap_or(Path::new("/")),
                Some(&root.config),
            )
            .map_err(|e| e.to_string())
            .and_then(|p| layers_of(store, &p))
            {
                Ok(now) => {
                    if !dry_run {
                        write_root(
                            store,
                            &Root {
                                config: root.config.clone(),
                                layers: now.clone(),
                            },
                        );
                    }
                    now
                }
                Err(why) => {
                    out.unreadable.push((root.config.clone(), why));
                    root.layers
                }
            };
            others.extend(layers.into_iter().filter(|k| !keep.contains(k)));
            out.projects.push(root.config);
        }
    }
    let now = SystemTime::now();
    for m in store.layers() {
        if keep.contains(&m.key) {
            continue;
        }
        if others.contains(&m.key) {
            out.kept_for_others += 1;
            continue;
        }
        if let Some(idle) = min_idle {
            let used = store.last_used(&m.key).unwrap_or(SystemTime::UNIX_EPOCH);
            if now.duration_since(used).unwrap_or_default() < idle {
                continue;
            }
        }
        out.remove.push(m);
    }
    Ok(out)
}

/// Every registered root, with its file.
fn roots(store: &LayerStore) -> Vec<(PathBuf, Root)> {
    let mut out: Vec<(PathBuf, Root)> = fs_err::read_dir(roots_dir(store))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            let root = serde_json::from_slice(&fs_err::read(e.path()).ok()?).ok()?;
            Some((e.path(), root))
        })
        .collect();
    out.sort_by(|a, b| a.1.config.cmp(&b.1.config));
    out
}

/// What removing a plan's layers did.
#[derive(Debug, Default)]
pub struct Swept {
    pub layers: usize,
    pub bytes: u64,
    /// What could not be removed, and why.
    pub failed: Vec<String>,
}

/// Removes the layers `plan` names, each under its lock (a bake of the same
/// key waits); a layer that cannot be removed is noted, the rest go on.
pub fn sweep(store: &LayerStore, plan: &Plan) -> Swept {
    let mut out = Swept::default();
    for m in &plan.remove {
        let res = store.lock(&m.key).and_then(|_lock| store.remove(&m.key));
        match res {
            Ok(bytes) => {
                out.bytes += bytes;
                out.layers += 1;
            }
            Err(e) => out.failed.push(format!("layer {}: {e}", m.key)),
        }
    }
    out
}
