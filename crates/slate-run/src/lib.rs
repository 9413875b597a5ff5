//! Orchestration: bake what the targets need, build each target in a fresh
//! environment with `jobs` at once, retry infrastructure failures, collect
//! artifacts, and tell everything through events.
//!
//! Generic over the provider, so its logic is tested with the fake provider.

pub mod inputs;
pub mod targets;

use slate_config::{BuildCommand, Project, TargetSpec};
use slate_image::{BakeReporter, BakedImage, Baker, ImageError, LayerPlan, LayerState, LayerStore};
use slate_provider::*;
use slate_store::artifacts::{self, ArtifactRecord, ArtifactStore, ManifestTarget};
use slate_store::events::{self, Event, EventKind, EventSink, TargetStatus};
use slate_store::{dsse, provenance};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How many times making an environment is tried before it counts as failed.
pub const CREATE_ATTEMPTS: u32 = 3;
/// The pids limit when a build sets none (a fork bomb must not take the host).
pub const DEFAULT_PIDS: u64 = 32768;

pub use slate_image::caches;
pub mod kept;

pub struct BuildOptions {
    pub run_id: String,
    pub jobs: usize,
    pub fail_fast: bool,
    pub artifacts_dir: PathBuf,
    /// Signs every target's provenance into a DSSE envelope beside it.
    pub signer: Option<std::sync::Arc<dsse::Signer>>,
    /// A target whose build fails keeps its environment ([`kept`]).
    pub keep_failed: bool,
}

#[derive(Debug, Clone)]
pub struct TargetResult {
    pub name: String,
    pub status: TargetStatus,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub artifacts: Vec<ArtifactRecord>,
}

pub struct Orchestrator<'a, P: Provider> {
    pub project: &'a Project,
    pub store: &'a LayerStore,
    pub provider: &'a P,
    pub sink: &'a dyn EventSink,
    pub cancel: Cancel,
    /// Where missing layers are fetched from before they are baked.
    pub layer_source: Option<&'a dyn slate_image::LayerSource>,
}

/// The values of a target's secrets, as this process sees them.
fn secret_values(t: &TargetSpec) -> Vec<String> {
    t.secrets
        .iter()
        .map(|k| std::env::var(k).unwrap_or_default())
        .collect()
}

/// Replaces secret values in a line with `***`.
pub fn mask(line: &str, secrets: &[String]) -> String {
    // What a secret can look like within one line: the whole value, and
    // each line of a multi-line value (a PEM key is printed a line at a
    // time). Lines under 4 bytes are left: masking them would blank out
    // ordinary text while hiding next to nothing.
    let mut needles: Vec<&str> = Vec::new();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        needles.push(s);
        if s.contains('\n') {
            needles.extend(
                s.lines()
                    .map(|l| l.trim_end_matches('\r'))
                    .filter(|l| l.len() >= 4),
            );
        }
    }
    // Every byte any occurrence covers is hidden, so secrets that overlap
    // in the output (the tail of one is the head of another) hide together
    // instead of the first replacement leaving the other's tail readable.
    let mut hidden = vec![false; line.len()];
    for n in &needles {
        let mut from = 0;
        while let Some(at) = line[from..].find(n) {
            let start = from + at;
            hidden[start..start + n.len()]
                .iter_mut()
                .for_each(|h| *h = true);
            from = start + line[start..].chars().next().map_or(1, char::len_utf8);
        }
    }
    if !hidden.contains(&true) {
        return line.to_string();
    }
    let mut out = String::with_capacity(line.len());
    let mut in_secret = false;
    for (i, c) in line.char_indices() {
        if hidden[i] {
            if !in_secret {
                out.push_str("***");
            }
            in_secret = true;
        } else {
            out.push(c);
            in_secret = false;
        }
    }
    out
}

struct BakeEvents<'a> {
    sink: &'a dyn EventSink,
}

impl BakeReporter for BakeEvents<'_> {
    fn layer(&self, image: &str, layer: &LayerPlan, state: LayerState) {
        let (state, seconds) = match state {
            LayerState::Cached => ("cached", None),
            LayerState::Started => ("baking", None),
            LayerState::Built(d) => ("baked", Some(d.as_secs_f64())),
            LayerState::Pulled(d) => ("pulled", Some(d.as_secs_f64())),
        };
        self.sink.event(&Event::new(
            Some(image),
            EventKind::BakeLayer {
                layer: layer.key.clone(),
                description: layer.describe(),
                state: state.into(),
                seconds,
            },
        ));
    }
    fn output(&self, image: &str, stream: Stream, line: &str) {
        self.sink.event(&Event::new(
            Some(image),
            EventKind::BakeOutput {
                stream: stream_name(stream),
                line: line.to_string(),
            },
        ));
    }
}

fn stream_name(s: Stream) -> &'static str {
    match s {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    }
}

/// What went wrong with one target. Its kind decides the target's status
/// (the build's fault, the environment's, or a cancel); its text, with the
/// causes below it, is made once, in [`Orchestrator::fail`].
#[derive(Debug, thiserror::Error)]
enum TargetError {
    // The build's own doing: the target failed.
    #[error("`{phase}` exited with code {code}{hint}")]
    Exited {
        phase: String,
        code: i32,
        /// Empty, or `; hint: ...` when the log suggests a fix.
        hint: String,
    },
    #[error("`{phase}` was killed by signal {signal}")]
    Signaled { phase: String, signal: i32 },
    #[error("timed out after {secs}s (`timeout` in the build)")]
    TimedOut { secs: u64 },
    #[error("artifact glob `{pattern}` is invalid")]
    BadGlob {
        pattern: String,
        #[source]
        source: globset::Error,
    },
    #[error("artifact glob `{pattern}` matched no file under `{workdir}`")]
    NoMatch { pattern: String, workdir: String },
    #[error(
        "artifact `{rel}` is named like slate's own `{base}` beside the artifacts; rename it in the build"
    )]
    ReservedName { rel: String, base: String },
    #[error("artifact `{rel}` lies in the cache mount `{cache}`: a cache never becomes an artifact; copy the file out of it in the build")]
    InCache { rel: String, cache: String },
    #[error("`caches` need the sandbox provider (this target runs with `{0}`)")]
    CachesUnsupported(&'static str),
    #[error("cannot prepare the cache mounts")]
    Caches(#[source] std::io::Error),
    #[error("two artifacts are both named `{base}`; artifacts are stored by file name")]
    SameName { base: String },
    /// The environment refused what the build asked of it (an artifact
    /// larger than allowed).
    #[error(transparent)]
    Refused(ProviderError),

    // The environment's doing: an infrastructure failure.
    #[error("the `{0}` provider is not available in this version of slate")]
    Unavailable(&'static str),
    /// The environment could not be made or entered; nothing of the build
    /// ran, so a new one may be tried.
    #[error(transparent)]
    Setup(ProviderError),
    #[error(transparent)]
    Provider(ProviderError),
    #[error(transparent)]
    Inputs(#[from] inputs::InputError),
    #[error("cannot hash the inputs")]
    HashInputs(#[source] std::io::Error),
    #[error("cannot read script `{}`", path.display())]
    ReadScript {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the staging folder for the artifacts")]
    Staging(#[source] std::io::Error),
    #[error("artifact `{rel}`")]
    Artifact {
        rel: String,
        #[source]
        source: std::io::Error,
    },

    #[error("cancelled")]
    Cancelled,
}

impl TargetError {
    /// The target's status and the exit code it reports.
    fn status(&self) -> (TargetStatus, Option<i32>) {
        use TargetError as E;
        match self {
            E::Exited { code, .. } => (TargetStatus::Failed, Some(*code)),
            E::Signaled { signal, .. } => (TargetStatus::Failed, Some(128 + signal)),
            E::TimedOut { .. }
            | E::BadGlob { .. }
            | E::NoMatch { .. }
            | E::ReservedName { .. }
            | E::InCache { .. }
            | E::CachesUnsupported(_)
            | E::SameName { .. }
            | E::Refused(_) => (TargetStatus::Failed, None),
            E::Unavailable(_)
            | E::Setup(_)
            | E::Provider(_)
            | E::Inputs(_)
            | E::HashInputs(_)
            | E::ReadScript { .. }
            | E::Staging(_)
            | E::Caches(_)
            | E::Artifact { .. } => (TargetStatus::InfraFailed, None),
            E::Cancelled => (TargetStatus::Cancelled, None),
        }
    }

    /// From a provider: refusals are the build's, failures to create or
    /// enter the environment may be retried, the rest is infrastructure.
    fn from_provider(e: ProviderError) -> Self {
        match e {
            ProviderError::Refused { .. } => TargetError::Refused(e),
            ProviderError::Create { .. } | ProviderError::Lost { .. } => TargetError::Setup(e),
            e => TargetError::Provider(e),
        }
    }
}

impl<P: Provider> Orchestrator<'_, P> {
    /// Bakes `names` (and the images below them); returns each image or its error.
    pub fn bake(&self, names: &[String]) -> BTreeMap<String, Result<BakedImage, ImageError>> {
        let reporter = BakeEvents { sink: self.sink };
        let baker = self.baker(&reporter);
        // Independent images bake at once; images that share layers meet at
        // the store's per-layer lock, and the second finds the layer cached.
        let out = Mutex::new(BTreeMap::new());
        std::thread::scope(|s| {
            for name in names {
                let (baker, out) = (&baker, &out);
                s.spawn(move || {
                    let res = self.bake_one(baker, name);
                    out.lock().unwrap().insert(name.clone(), res);
                });
            }
        });
        out.into_inner().unwrap()
    }

    fn baker<'b>(&'b self, reporter: &'b BakeEvents<'b>) -> Baker<'b, P> {
        Baker {
            store: self.store,
            provider: self.provider,
            reporter,
            cancel: self.cancel.clone(),
            host_ca: self.project.settings.host_ca,
            source: self.layer_source,
            project: self.project,
        }
    }

    /// Plans and bakes one image, saying so when it fails.
    fn bake_one(&self, baker: &Baker<P>, name: &str) -> Result<BakedImage, ImageError> {
        let res = slate_image::plan::plan_cached(self.project, name, self.store)
            .and_then(|p| baker.bake(&p));
        if let Err(e) = &res {
            self.sink.event(&Event::new(
                Some(name),
                EventKind::BakeFailed {
                    error: error_chain(e),
                },
            ));
        }
        res
    }

    /// Builds `targets` `jobs` at a time, each as soon as its image is
    /// baked: every image bakes on a thread of its own meanwhile, so a
    /// target whose image is ready does not wait for the others'.
    pub fn build(&self, targets: &[&TargetSpec], opts: &BuildOptions) -> Vec<TargetResult> {
        self.sink.event(&Event::new(
            None,
            EventKind::RunStarted {
                run_id: opts.run_id.clone(),
                targets: targets.iter().map(|t| t.name.clone()).collect(),
            },
        ));
        let mut images: Vec<String> = targets.iter().map(|t| t.image.clone()).collect();
        images.sort();
        images.dedup();
        let store = ArtifactStore::new(opts.artifacts_dir.clone(), &opts.run_id)
            .with_signer(opts.signer.clone());
        let state = Mutex::new(Ready {
            queue: targets.iter().copied().collect(),
            baked: BTreeMap::new(),
        });
        let woken = std::sync::Condvar::new();
        let results: Mutex<Vec<TargetResult>> = Mutex::new(Vec::new());
        let failed_fast = std::sync::atomic::AtomicBool::new(false);
        for t in targets {
            self.sink.event(&Event::new(
                Some(&t.name),
                EventKind::TargetQueued {
                    provider: t.provider.name().to_string(),
                    image: t.image.clone(),
                },
            ));
        }
        let reporter = BakeEvents { sink: self.sink };
        let baker = self.baker(&reporter);
        std::thread::scope(|s| {
            for name in &images {
                let (baker, state, woken) = (&baker, &state, &woken);
                s.spawn(move || {
                    // Said to be done even if the bake panics: no target
                    // waits for it forever.
                    let mut done = Published {
                        name,
                        state,
                        woken,
                        res: None,
                    };
                    done.res = Some(self.bake_one(baker, name));
                });
            }
            for _ in 0..opts.jobs.max(1).min(targets.len().max(1)) {
                s.spawn(|| {
                    while let Some((t, img)) = next_ready(&state, &woken) {
                        let res = self.start_one(t, &img, &store, &failed_fast, opts);
                        if res.status != TargetStatus::Succeeded {
                            self.on_failure(t, &res, &img, &store, opts, &failed_fast);
                        }
                        results.lock().unwrap().push(res);
                    }
                });
            }
        });
        store.finish();
        let mut results = results.into_inner().unwrap();
        results.sort_by_key(|r| targets.iter().position(|t| t.name == r.name));
        let succeeded = results
            .iter()
            .filter(|r| r.status == TargetStatus::Succeeded)
            .count();
        self.sink.event(&Event::new(
            None,
            EventKind::RunFinished {
                succeeded,
                failed: results.len() - succeeded,
            },
        ));
        results
    }

    /// Runs one target of a build, unless the run was cancelled or failed
    /// fast, or its image did not bake.
    fn start_one(
        &self,
        t: &TargetSpec,
        baked: &Result<BakedImage, ImageError>,
        store: &ArtifactStore,
        failed_fast: &std::sync::atomic::AtomicBool,
        opts: &BuildOptions,
    ) -> TargetResult {
        if failed_fast.load(std::sync::atomic::Ordering::SeqCst) {
            return self.finish(
                t,
                TargetStatus::Skipped,
                None,
                Some("not started: an earlier target failed (--fail-fast)".into()),
                vec![],
            );
        }
        if self.cancel.is_cancelled() {
            return self.finish(
                t,
                TargetStatus::Cancelled,
                None,
                Some("not started: the run was cancelled".into()),
                vec![],
            );
        }
        match baked {
            Ok(img) => {
                let keep = opts
                    .keep_failed
                    .then(|| kept::run_dir(self.store.root(), &opts.run_id));
                self.run_target(t, img, store, keep.as_deref())
            }
            Err(e) => {
                let status = if matches!(e, ImageError::Cancelled { .. }) {
                    TargetStatus::Cancelled
                } else if e.is_recipe_failure() {
                    TargetStatus::Failed
                } else {
                    TargetStatus::InfraFailed
                };
                self.finish(
                    t,
                    status,
                    None,
                    Some(format!(
                        "image `{}` did not bake: {}",
                        t.image,
                        error_chain(e)
                    )),
                    vec![],
                )
            }
        }
    }

    /// A target that did not succeed: recorded in the manifest, and with
    /// `--fail-fast` the end of the run.
    fn on_failure(
        &self,
        t: &TargetSpec,
        res: &TargetResult,
        baked: &Result<BakedImage, ImageError>,
        store: &ArtifactStore,
        opts: &BuildOptions,
        failed_fast: &std::sync::atomic::AtomicBool,
    ) {
        let _ = store.record_failure(ManifestTarget {
            name: t.name.clone(),
            status: res.status.as_str().into(),
            image: t.image.clone(),
            image_digest: baked.as_ref().map(|b| b.digest.clone()).unwrap_or_default(),
            provider: t.provider.name().into(),
            artifacts: vec![],
        });
        if opts.fail_fast && matches!(res.status, TargetStatus::Failed | TargetStatus::InfraFailed)
        {
            failed_fast.store(true, std::sync::atomic::Ordering::SeqCst);
            // Stop the targets still running, too.
            self.cancel.cancel();
        }
    }

    /// The environment a target runs in.
    fn env_spec(&self, t: &TargetSpec, img: &BakedImage, kind: EnvKind) -> EnvSpec {
        EnvSpec {
            name: t.name.clone(),
            layers: img.layers.clone(),
            upper: None,
            network: t.network,
            host_ca: t.network && self.project.settings.host_ca,
            limits: Limits {
                cpus: t.cpus,
                memory: t.memory,
                pids: Some(t.pids.unwrap_or(DEFAULT_PIDS)),
                best_effort: t.cpus.is_none() && t.memory.is_none() && t.pids.is_none(),
            },
            binds: vec![],
            ephemeral: false,
            kind,
            privileges: if t.packages {
                slate_provider::Privileges::Packages
            } else {
                slate_provider::Privileges::None
            },
            keepable: false,
            start_disk: None,
        }
    }

    /// A built target's provenance, then its artifacts, into place.
    fn commit(
        &self,
        t: &TargetSpec,
        img: &BakedImage,
        store: &ArtifactStore,
        built: Built,
        started: f64,
    ) -> TargetResult {
        let arts = built.artifacts;
        let total = arts.len();
        let statement = provenance::statement(&provenance::Facts {
            target: t,
            image: img,
            provider: t.provider.name(),
            run_id: store.run_id(),
            started,
            finished: events::now(),
            inputs_digest: &built.inputs_digest,
            script_digest: &built.script_digest,
            artifacts: &arts,
        });
        let commit = store.write_provenance(&t.name, &statement).and_then(|()| {
            store.commit(ManifestTarget {
                name: t.name.clone(),
                status: String::new(),
                image: t.image.clone(),
                image_digest: img.digest.clone(),
                provider: t.provider.name().into(),
                artifacts: arts.clone(),
            })
        });
        match commit {
            Ok(()) => self.finish(t, TargetStatus::Succeeded, Some(0), None, arts),
            Err(e) => self.finish(
                t,
                TargetStatus::InfraFailed,
                None,
                Some(format!("could not store {total} artifact(s): {e}")),
                vec![],
            ),
        }
    }

    fn finish(
        &self,
        t: &TargetSpec,
        status: TargetStatus,
        exit_code: Option<i32>,
        error: Option<String>,
        artifacts: Vec<ArtifactRecord>,
    ) -> TargetResult {
        // Error text comes from providers too (an agent's message, a VM's
        // console): it is masked like output before it is shown or kept.
        let error = error.map(|e| mask(&e, &secret_values(t)));
        self.sink.event(&Event::new(
            Some(&t.name),
            EventKind::TargetFinished {
                status,
                exit_code,
                error: error.clone(),
            },
        ));
        TargetResult {
            name: t.name.clone(),
            status,
            exit_code,
            error,
            artifacts,
        }
    }

    fn phase<T>(
        &self,
        t: &TargetSpec,
        name: &str,
        f: impl FnOnce() -> Result<T, TargetError>,
    ) -> Result<T, TargetError> {
        self.sink.event(&Event::new(
            Some(&t.name),
            EventKind::PhaseStarted {
                phase: name.to_string(),
            },
        ));
        let r = f();
        self.sink.event(&Event::new(
            Some(&t.name),
            EventKind::PhaseEnded {
                phase: name.to_string(),
                ok: r.is_ok(),
            },
        ));
        r
    }

    /// One target from environment to artifacts; the environment is destroyed
    /// whatever happens, unless the build failed and `keep` names where
    /// failed environments of this run are kept.
    pub fn run_target(
        &self,
        t: &TargetSpec,
        img: &BakedImage,
        store: &ArtifactStore,
        keep: Option<&Path>,
    ) -> TargetResult {
        let secrets: Vec<(String, String)> = t
            .secrets
            .iter()
            .map(|k| (k.clone(), std::env::var(k).unwrap_or_default()))
            .collect();
        let secret_values = secret_values(t);
        let started = events::now();
        let Some(kind) = targets::env_kind(t.provider) else {
            return self.fail(t, TargetError::Unavailable(t.provider.name()));
        };
        let mut spec = self.env_spec(t, img, kind);
        spec.keepable = keep.is_some();
        if !t.caches.is_empty() && kind != EnvKind::Sandbox {
            return self.fail(t, TargetError::CachesUnsupported(kind.name()));
        }
        // Held until the target is done: `locked` and `private` caches are
        // one environment's at a time.
        let _cache_locks = match caches::take(self.store.root(), &self.project.dir, &t.caches) {
            Ok((binds, locks)) => {
                spec.binds.extend(binds);
                locks
            }
            Err(e) => return self.fail(t, TargetError::Caches(e)),
        };
        let mut attempt = 1;
        loop {
            let retry = |attempt: u32, error: &TargetError| {
                let error = mask(&error_chain(error), &secret_values);
                self.sink.event(&Event::new(
                    Some(&t.name),
                    EventKind::Retry { attempt, error },
                ));
            };
            let mut env = match self.phase(t, "create", || {
                self.provider.create(&spec).map_err(TargetError::Setup)
            }) {
                Ok(e) => e,
                Err(e @ TargetError::Setup(_))
                    if attempt < CREATE_ATTEMPTS && !self.cancel.is_cancelled() =>
                {
                    retry(attempt, &e);
                    attempt += 1;
                    continue;
                }
                Err(e) => return self.fail(t, e),
            };
            let result = self.in_env(t, img, &mut env, &secrets, &secret_values, store);
            let build_failed = matches!(&result, Err(e) if e.status().0 == TargetStatus::Failed);
            let destroyed = match keep {
                Some(dir) if build_failed => {
                    let kept = self.keep(t, img, env, &dir.join(&t.name));
                    // The build's failure is the target's; why its
                    // environment was not kept is said beside it.
                    if let Err(e) = &kept {
                        self.sink.event(&Event::new(
                            Some(&t.name),
                            EventKind::Output {
                                stream: "stderr",
                                line: mask(
                                    &format!(
                                        "slate: could not keep the environment: {}",
                                        error_chain(e)
                                    ),
                                    &secret_values,
                                ),
                            },
                        ));
                    }
                    kept
                }
                _ => self.phase(t, "destroy", || {
                    env.destroy().map_err(TargetError::Provider)
                }),
            };
            return match (result, destroyed) {
                // The environment could not be entered: nothing of the build ran, so try a new one.
                (Err(e @ TargetError::Setup(_)), _)
                    if attempt < CREATE_ATTEMPTS && !self.cancel.is_cancelled() =>
                {
                    retry(attempt, &e);
                    attempt += 1;
                    continue;
                }
                (Ok(built), Ok(())) => self.commit(t, img, store, built, started),
                (Err(e), _) | (Ok(_), Err(e)) => self.fail(t, e),
            };
        }
    }

    /// Keeps a failed target's environment in `dest` with what `slate
    /// shell --keep` needs to enter it; it is destroyed if it cannot be kept.
    fn keep(
        &self,
        t: &TargetSpec,
        img: &BakedImage,
        env: P::Env,
        dest: &Path,
    ) -> Result<(), TargetError> {
        self.phase(t, "keep", || {
            env.keep(dest).map_err(TargetError::Provider)?;
            let mut vars = img.env.clone();
            vars.extend(t.env.iter().cloned());
            let record = kept::Kept {
                run: dest
                    .parent()
                    .and_then(|d| d.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                target: t.name.clone(),
                image: t.image.clone(),
                project: self.project.dir.clone(),
                layers: img.layers.clone(),
                env: vars,
                workdir: t.workdir.clone(),
                network: t.network,
                created: events::now(),
                vm: t.provider == slate_config::ProviderKind::Vm,
            };
            kept::write(dest, &record).map_err(TargetError::Staging)
        })
    }

    /// Ends a target that did not build: the one place a [`TargetError`]
    /// becomes the text users see.
    fn fail(&self, t: &TargetSpec, e: TargetError) -> TargetResult {
        let (status, exit_code) = e.status();
        self.finish(t, status, exit_code, Some(error_chain(&e)), vec![])
    }

    fn in_env(
        &self,
        t: &TargetSpec,
        img: &BakedImage,
        env: &mut P::Env,
        secrets: &[(String, String)],
        secret_values: &[String],
        store: &ArtifactStore,
    ) -> Result<Built, TargetError> {
        let inputs_digest = self.phase(t, "inputs", || self.put_inputs(t, env))?;
        let script_digest = script_digest(&t.command);
        let mut vars: Vec<(String, String)> = img.env.clone();
        vars.extend(t.env.iter().cloned());
        vars.push(("SLATE_TARGET".into(), t.name.clone()));
        vars.extend(secrets.iter().cloned());
        let commands = commands(t, env, secret_values)?;
        let cancel = self.cancel.with_timeout(t.timeout);
        // A network build that fails on a certificate its image does not
        // trust gets told about `host_ca`.
        let untrusted_tls = std::sync::atomic::AtomicBool::new(false);
        let tls_hint = || {
            if t.network
                && !self.project.settings.host_ca
                && untrusted_tls.load(std::sync::atomic::Ordering::Relaxed)
            {
                format!("; hint: {}", slate_provider::hostnet::HOST_CA_HINT)
            } else {
                String::new()
            }
        };
        for (phase, argv) in commands {
            self.phase(t, &phase, || {
                let exec = ExecSpec {
                    argv,
                    env: vars.clone(),
                    cwd: t.workdir.clone(),
                    interactive: false,
                };
                let sink = self.sink;
                let name = t.name.clone();
                let mut out = |s: Stream, l: &str| {
                    if t.network && slate_provider::hostnet::is_untrusted_certificate(l) {
                        untrusted_tls.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    sink.event(&Event::new(
                        Some(&name),
                        EventKind::Output {
                            stream: stream_name(s),
                            line: mask(l, secret_values),
                        },
                    ));
                };
                let outcome = env
                    .exec(&exec, &mut out, &cancel)
                    .map_err(TargetError::from_provider)?;
                outcome_result(t, &phase, outcome, tls_hint)
            })?;
        }
        self.phase(t, "artifacts", || {
            Ok(Built {
                artifacts: self.collect_artifacts(t, env, store)?,
                inputs_digest,
                script_digest,
            })
        })
    }

    /// Copies the target's inputs into its workdir; returns their digest.
    fn put_inputs(&self, t: &TargetSpec, env: &mut P::Env) -> Result<String, TargetError> {
        let skip = vec![
            self.project.dir.join(".slate"),
            self.project.dir.join(&self.project.settings.artifacts),
        ];
        let mut sets = Vec::new();
        for input in &t.inputs {
            let set = inputs::collect(input, &t.exclude, &skip)?;
            env.put(&set.base, &set.entries, &t.workdir)
                .map_err(TargetError::from_provider)?;
            sets.push(set);
        }
        // The workdir exists even when there are no inputs.
        env.put(Path::new("/"), &[], &t.workdir)
            .map_err(TargetError::from_provider)?;
        inputs::digest(&sets).map_err(TargetError::HashInputs)
    }

    /// Fetches the files the target's `artifacts` globs match into the
    /// store's staging folder, with their sizes and checksums.
    fn collect_artifacts(
        &self,
        t: &TargetSpec,
        env: &mut P::Env,
        store: &ArtifactStore,
    ) -> Result<Vec<ArtifactRecord>, TargetError> {
        let files = env.list(&t.workdir).map_err(TargetError::from_provider)?;
        let picked = pick_artifacts(t, &files)?;
        let staging = store.staging_for(&t.name).map_err(TargetError::Staging)?;
        let mut out = Vec::new();
        for rel in picked {
            let base = rel.rsplit('/').next().unwrap_or(&rel).to_string();
            let dest = staging.join(&base);
            if base.starts_with("provenance.") && base.ends_with(".json") {
                return Err(TargetError::ReservedName { rel, base });
            }
            let inside = format!("{}/{rel}", t.workdir.trim_end_matches('/'));
            if let Some(c) = caches::holding(&t.caches, &inside) {
                return Err(TargetError::InCache {
                    rel,
                    cache: c.path.clone(),
                });
            }
            if dest.exists() {
                return Err(TargetError::SameName { base });
            }
            let size = env
                .fetch(&format!("{}/{rel}", t.workdir.trim_end_matches('/')), &dest)
                .map_err(TargetError::from_provider)?;
            let in_store = |source| TargetError::Artifact {
                rel: rel.clone(),
                source,
            };
            artifacts::make_plain(&dest).map_err(in_store)?;
            let sha256 = slate_layers::hash::sha256_file(&dest)
                .map(|(sha, _)| sha)
                .map_err(in_store)?;
            let path = format!("{}/{base}", t.name);
            self.sink.event(&Event::new(
                Some(&t.name),
                EventKind::Artifact {
                    path: path.clone(),
                    size,
                    sha256: sha256.clone(),
                },
            ));
            out.push(ArtifactRecord { path, size, sha256 });
        }
        Ok(out)
    }
}

/// The digest of what the target runs: its script's bytes, or its `run`
/// lines.
fn script_digest(command: &BuildCommand) -> String {
    match command {
        BuildCommand::Script(path) => fs_err::read(path)
            .map(|d| slate_layers::hash::sha256(&d))
            .unwrap_or_default(),
        BuildCommand::Run(lines) => slate_layers::hash::sha256(lines.join("\n").as_bytes()),
    }
}

/// The commands a target runs, each with the phase name it is logged
/// under; a script is copied into the environment first.
fn commands<E: Environment>(
    t: &TargetSpec,
    env: &mut E,
    secret_values: &[String],
) -> Result<Vec<(String, Vec<String>)>, TargetError> {
    Ok(match &t.command {
        BuildCommand::Script(path) => {
            let data = fs_err::read(path).map_err(|source| TargetError::ReadScript {
                path: path.clone(),
                source,
            })?;
            env.put_bytes(&data, "/.slate/build-script", 0o755)
                .map_err(TargetError::from_provider)?;
            let argv = if data.starts_with(b"#!") {
                vec!["/.slate/build-script".to_string()]
            } else {
                vec!["/bin/sh".into(), "-e".into(), "/.slate/build-script".into()]
            };
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            vec![(format!("script {name}"), argv)]
        }
        BuildCommand::Run(lines) => lines
            .iter()
            .map(|l| {
                (
                    mask(&format!("run: {l}"), secret_values),
                    vec!["/bin/sh".into(), "-ec".into(), l.clone()],
                )
            })
            .collect(),
    })
}

/// How one command's end counts for the target.
fn outcome_result(
    t: &TargetSpec,
    phase: &str,
    outcome: ExecOutcome,
    tls_hint: impl Fn() -> String,
) -> Result<(), TargetError> {
    match outcome {
        ExecOutcome::Exited(0) => Ok(()),
        ExecOutcome::Exited(code) => Err(TargetError::Exited {
            phase: phase.to_string(),
            code,
            hint: tls_hint(),
        }),
        ExecOutcome::Signaled(signal) => Err(TargetError::Signaled {
            phase: phase.to_string(),
            signal,
        }),
        ExecOutcome::TimedOut => Err(TargetError::TimedOut {
            secs: t.timeout.map(|d| d.as_secs()).unwrap_or(0),
        }),
        ExecOutcome::Cancelled => Err(TargetError::Cancelled),
    }
}

/// The files (relative to the workdir) the target's `artifacts` globs
/// match, sorted; a glob that matches nothing fails the target.
fn pick_artifacts(t: &TargetSpec, files: &[String]) -> Result<Vec<String>, TargetError> {
    let mut picked: Vec<String> = Vec::new();
    for pattern in &t.artifacts {
        let glob = globset::GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .map_err(|source| TargetError::BadGlob {
                pattern: pattern.clone(),
                source,
            })?
            .compile_matcher();
        let matched: Vec<&String> = files.iter().filter(|f| glob.is_match(f.as_str())).collect();
        if matched.is_empty() {
            // What a cache holds is never listed: say so rather than that
            // nothing matched.
            let inside = format!("{}/{pattern}", t.workdir.trim_end_matches('/'));
            if let Some(c) = caches::holding(&t.caches, &inside) {
                return Err(TargetError::InCache {
                    rel: pattern.clone(),
                    cache: c.path.clone(),
                });
            }
            return Err(TargetError::NoMatch {
                pattern: pattern.clone(),
                workdir: t.workdir.clone(),
            });
        }
        picked.extend(matched.into_iter().cloned());
    }
    picked.sort();
    picked.dedup();
    Ok(picked)
}

/// What a successful build produced, and what went into it.
struct Built {
    artifacts: Vec<ArtifactRecord>,
    inputs_digest: String,
    script_digest: String,
}

pub use slate_provider::error_chain;

#[cfg(test)]
mod tests;

/// The targets not started yet, and the images baked so far.
struct Ready<'t> {
    queue: VecDeque<&'t TargetSpec>,
    baked: BTreeMap<String, Arc<Result<BakedImage, ImageError>>>,
}

/// The first queued target whose image is baked, waiting until there is
/// one; `None` once none is left.
fn next_ready<'t>(
    state: &Mutex<Ready<'t>>,
    woken: &std::sync::Condvar,
) -> Option<(&'t TargetSpec, Arc<Result<BakedImage, ImageError>>)> {
    let mut st = state.lock().unwrap();
    loop {
        if st.queue.is_empty() {
            return None;
        }
        let ready = st
            .queue
            .iter()
            .position(|t| st.baked.contains_key(&t.image));
        if let Some(i) = ready {
            let t = st.queue.remove(i).expect("a position in the queue");
            let img = st.baked[&t.image].clone();
            return Some((t, img));
        }
        st = woken.wait(st).unwrap();
    }
}

/// An image's bake, published to the targets waiting for it when dropped
/// (as cancelled if the bake never finished).
struct Published<'a, 't> {
    name: &'a str,
    state: &'a Mutex<Ready<'t>>,
    woken: &'a std::sync::Condvar,
    res: Option<Result<BakedImage, ImageError>>,
}

impl Drop for Published<'_, '_> {
    fn drop(&mut self) {
        let res = self.res.take().unwrap_or_else(|| {
            Err(ImageError::Cancelled {
                image: self.name.to_string(),
            })
        });
        if let Ok(mut st) = self.state.lock() {
            st.baked.insert(self.name.to_string(), Arc::new(res));
        }
        self.woken.notify_all();
    }
}
