//! Images: recipes planned into content-addressed layers, baked once, reused.

pub mod binfmt;
pub mod export;
pub mod gc;
pub mod layerrepo;
pub mod plan;
pub mod registry;
pub use slate_layers::{store, unpack};
pub mod caches;

pub use plan::{plan, ImagePlan, LayerKind, LayerPlan};
pub use store::{LayerMeta, LayerStore};

use slate_provider::{
    Bind, Cancel, EnvSpec, Environment, ExecOutcome, ExecSpec, Provider, ProviderError, Stream,
};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image `{name}` is not defined")]
    Unknown { name: String },
    #[error("image `{image}`: {what}")]
    Unsupported { image: String, what: String },
    #[error("cannot read `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image `{image}`: layer `{layer}` failed ({outcome})")]
    StepFailed {
        image: String,
        layer: String,
        outcome: String,
    },
    #[error("image `{image}`: {why}")]
    ForeignArch { image: String, why: String },
    #[error("image `{image}`: no bootstrap tool found")]
    NoBootstrapper { image: String },
    #[error("image `{image}`: bootstrapping `{suite}` failed ({outcome})")]
    Bootstrap {
        image: String,
        suite: String,
        outcome: String,
    },
    #[error("image `{image}`: layer store operation `{op}` failed")]
    Store {
        image: String,
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("image `{image}`: cannot pull `{reference}`")]
    Pull {
        image: String,
        reference: String,
        #[source]
        source: registry::RegistryError,
    },
    #[error("image `{image}`: cannot unpack `{}`", path.display())]
    Unpack {
        image: String,
        path: PathBuf,
        #[source]
        source: unpack::UnpackError,
    },
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("image `{image}`: baking was cancelled")]
    Cancelled { image: String },
}

impl ImageError {
    /// A fix the user can apply, when there is one.
    pub fn hint(&self) -> Option<String> {
        match self {
            ImageError::NoBootstrapper { .. } => Some("install one: `apt-get install mmdebstrap` (or `debootstrap`)".into()),
            ImageError::Bootstrap { .. } => Some("check that the Debian mirror is reachable; set `mirror = \"http://…\"` on the image to use another".into()),
            ImageError::StepFailed { .. } => Some("the bake log above shows the step's output; fix the step and run `slate bake` again (earlier layers are kept)".into()),
            _ => None,
        }
    }

    /// Whether the failure is the recipe's own (exit 1) rather than the infrastructure's (exit 3).
    pub fn is_recipe_failure(&self) -> bool {
        matches!(self, ImageError::StepFailed { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LayerState {
    Cached,
    Started,
    Built(Duration),
    /// Fetched from a layer cache instead of baked.
    Pulled(Duration),
}

/// Where a layer missing here may be fetched instead of baked: another
/// machine's bakes (`--cache-from`).
pub trait LayerSource: Sync {
    /// Puts layer `key` into `store` (whose lock on `key` the caller
    /// holds) when the source has it: `Ok(true)`. `Ok(false)` when it does
    /// not; `Err` when what it has cannot be used (the caller bakes the
    /// layer, saying why).
    fn fetch(&self, store: &LayerStore, key: &str) -> Result<bool, String>;
}

/// Progress of a bake, drawn by whoever owns the terminal.
pub trait BakeReporter: Sync {
    fn layer(&self, image: &str, layer: &LayerPlan, state: LayerState);
    fn output(&self, image: &str, stream: Stream, line: &str);
}

/// A baked image: what an environment is made from.
#[derive(Debug, Clone)]
pub struct BakedImage {
    pub name: String,
    pub digest: String,
    pub layers: Vec<PathBuf>,
    pub env: Vec<(String, String)>,
}

impl BakedImage {
    /// The image as the store holds it (whether or not every layer is there).
    pub fn from_store(plan: &ImagePlan, store: &LayerStore) -> BakedImage {
        BakedImage {
            name: plan.name.clone(),
            digest: plan.digest().to_string(),
            layers: plan.layers.iter().map(|l| store.layer_fs(&l.key)).collect(),
            env: plan.env.clone(),
        }
    }
}

pub struct Baker<'a, P: Provider> {
    pub store: &'a LayerStore,
    pub provider: &'a P,
    pub reporter: &'a dyn BakeReporter,
    pub cancel: Cancel,
    /// Steps trust the host's CA bundle (`host_ca = true`).
    pub host_ca: bool,
    /// Where missing layers are fetched from before they are baked.
    pub source: Option<&'a dyn LayerSource>,
    /// The project whose images these are: its images' cache mounts.
    pub project: &'a slate_config::Project,
}

/// Layers at once fetched from a layer cache.
const FETCHES_AT_ONCE: usize = 4;

impl<P: Provider> Baker<'_, P> {
    /// Fetches every layer of `plan` missing here from the layer cache, up
    /// to [`FETCHES_AT_ONCE`] at a time (each under the store's lock on its
    /// key): what each fetch took, or why the cache's copy was refused.
    /// Layers the cache lacks are not in the answer.
    fn prefetch(
        &self,
        plan: &ImagePlan,
    ) -> std::collections::HashMap<String, Result<Duration, String>> {
        let out = std::sync::Mutex::new(std::collections::HashMap::new());
        let Some(src) = self.source else {
            return out.into_inner().unwrap();
        };
        let queue: std::sync::Mutex<Vec<&LayerPlan>> = std::sync::Mutex::new(
            plan.layers
                .iter()
                .filter(|l| !self.store.has(&l.key))
                .rev()
                .collect(),
        );
        std::thread::scope(|s| {
            for _ in 0..FETCHES_AT_ONCE {
                s.spawn(|| loop {
                    let Some(layer) = queue.lock().unwrap().pop() else {
                        return;
                    };
                    if self.cancel.is_cancelled() {
                        return;
                    }
                    let Ok(_lock) = self.store.lock(&layer.key) else {
                        continue;
                    };
                    if self.store.has(&layer.key) {
                        continue;
                    }
                    let started = Instant::now();
                    let res = match src.fetch(self.store, &layer.key) {
                        Ok(true) => Ok(started.elapsed()),
                        Ok(false) => continue,
                        Err(why) => Err(why),
                    };
                    out.lock().unwrap().insert(layer.key.clone(), res);
                });
            }
        });
        out.into_inner().unwrap()
    }

    /// Bakes whatever layers of `plan` are missing.
    pub fn bake(&self, plan: &ImagePlan) -> Result<BakedImage, ImageError> {
        // A foreign image needs its emulator registered, baked or not.
        if let Some(LayerKind::Debian {
            arch: Some(arch), ..
        }) = plan.layers.first().map(|l| &l.kind)
        {
            binfmt::ensure(arch).map_err(|why| ImageError::ForeignArch {
                image: plan.name.clone(),
                why,
            })?;
        }
        let serr = |op: &str, source| ImageError::Store {
            image: plan.name.clone(),
            op: op.into(),
            source,
        };
        let fetched = self.prefetch(plan);
        for (i, layer) in plan.layers.iter().enumerate() {
            if self.store.has(&layer.key) {
                self.store.touch_used(&layer.key);
                let state = match fetched.get(&layer.key) {
                    Some(Ok(took)) => LayerState::Pulled(*took),
                    _ => LayerState::Cached,
                };
                self.reporter.layer(&plan.name, layer, state);
                continue;
            }
            let _lock = self.store.lock(&layer.key).map_err(|e| serr("lock", e))?;
            // Another slate may have baked it while we waited for the lock.
            if self.store.has(&layer.key) {
                self.reporter.layer(&plan.name, layer, LayerState::Cached);
                continue;
            }
            if self.cancel.is_cancelled() {
                return Err(ImageError::Cancelled {
                    image: plan.name.clone(),
                });
            }
            if let Some(src) = self.source {
                let started = Instant::now();
                // Fetched (or refused) already, all at once, above.
                let first = match fetched.get(&layer.key) {
                    Some(Err(why)) => Err(why.clone()),
                    Some(Ok(_)) => Ok(false),
                    None => src.fetch(self.store, &layer.key),
                };
                match first {
                    Ok(true) if self.store.has(&layer.key) => {
                        self.reporter.layer(
                            &plan.name,
                            layer,
                            LayerState::Pulled(started.elapsed()),
                        );
                        continue;
                    }
                    Ok(_) => {}
                    Err(why) => self.reporter.output(
                        &plan.name,
                        Stream::Stderr,
                        &format!(
                            "layer {} from the layer cache refused, baking it: {why}",
                            &layer.key[..12]
                        ),
                    ),
                }
            }
            self.reporter.layer(&plan.name, layer, LayerState::Started);
            let started = Instant::now();
            let staging = self
                .store
                .staging(&layer.key)
                .map_err(|e| serr("create staging folder", e))?;
            let below: Vec<PathBuf> = plan.layers[..i]
                .iter()
                .map(|l| self.store.layer_fs(&l.key))
                .collect();
            let res = self.build_layer(plan, layer, &below, &staging.join("fs"));
            if let Err(e) = res {
                let _ = store::remove_tree(&staging);
                return Err(e);
            }
            let meta = LayerMeta {
                key: layer.key.clone(),
                parent: layer.parent.clone(),
                description: layer.describe(),
                created: 0,
                size: 0,
                bake_seconds: started.elapsed().as_secs_f64(),
            };
            self.store
                .commit(&staging, meta)
                .map_err(|e| serr("commit layer", e))?;
            self.reporter
                .layer(&plan.name, layer, LayerState::Built(started.elapsed()));
        }
        Ok(self.baked(plan))
    }

    /// The image as it is in the store, if every layer is there.
    pub fn baked(&self, plan: &ImagePlan) -> BakedImage {
        BakedImage::from_store(plan, self.store)
    }

    fn build_layer(
        &self,
        plan: &ImagePlan,
        layer: &LayerPlan,
        below: &[PathBuf],
        fs: &Path,
    ) -> Result<(), ImageError> {
        match &layer.kind {
            LayerKind::Debian {
                suite,
                mirror,
                variant,
                arch,
            } => self.bootstrap(plan, suite, mirror.as_deref(), variant, arch.as_deref(), fs),
            LayerKind::Tar { path } => {
                let dropped =
                    unpack::unpack_tar_base(path, fs).map_err(|source| ImageError::Unpack {
                        image: plan.name.clone(),
                        path: path.clone(),
                        source,
                    })?;
                if let Some(what) = dropped.describe() {
                    let line = format!(
                        "warning: `{}`: {what}: `tar:` bases keep no device nodes, fifos, setuid or setgid bits",
                        path.display()
                    );
                    self.reporter.output(&plan.name, Stream::Stderr, &line);
                }
                Ok(())
            }
            LayerKind::Oci {
                reference,
                insecure,
            } => {
                let perr = |source| ImageError::Pull {
                    image: plan.name.clone(),
                    reference: reference.clone(),
                    source,
                };
                let r = registry::Reference::parse(reference).map_err(perr)?;
                let mut client = registry::Client::new(&r, *insecure);
                let tmp = fs.with_file_name("blobs");
                fs_err::create_dir_all(&tmp).map_err(|source| ImageError::Store {
                    image: plan.name.clone(),
                    op: "create download folder".into(),
                    source,
                })?;
                let arch = export::oci_arch(None).0;
                let pulled = client.pull_into(arch, fs, &tmp).map_err(perr)?;
                let _ = fs_err::remove_dir_all(&tmp);
                self.reporter.output(
                    &plan.name,
                    Stream::Stdout,
                    &format!("pulled {r} ({})", pulled.digest),
                );
                if let Some(what) = pulled.dropped.describe() {
                    let line = format!(
                        "warning: `{r}`: {what}: image layers keep no device nodes or fifos"
                    );
                    self.reporter.output(&plan.name, Stream::Stderr, &line);
                }
                Ok(())
            }
            LayerKind::Files(files) => {
                for (host, dest) in files {
                    let to = fs.join(dest.trim_start_matches('/'));
                    let res = (|| {
                        if let Some(p) = to.parent() {
                            fs_err::create_dir_all(p)?;
                        }
                        fs_err::copy(host, &to).map(|_| ())
                    })();
                    res.map_err(|source| ImageError::Read {
                        path: host.clone(),
                        source,
                    })?;
                }
                Ok(())
            }
            LayerKind::Packages(pkgs) => {
                let script = format!(
                    "set -e\napt-get update -q\nDEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {}\n",
                    pkgs.join(" ")
                );
                self.run_in_sandbox(plan, layer, below, fs, &script, &[])
            }
            LayerKind::Step { command, env } => {
                self.run_in_sandbox(plan, layer, below, fs, command, env)
            }
        }
    }

    fn run_in_sandbox(
        &self,
        plan: &ImagePlan,
        layer: &LayerPlan,
        below: &[PathBuf],
        fs: &Path,
        script: &str,
        env: &[(String, String)],
    ) -> Result<(), ImageError> {
        // A project's Debian images share apt's downloads and package lists
        // through its caches (per suite, mirror and arch), so they stay out
        // of the layers and nothing is downloaded twice.
        let mut binds = Vec::new();
        let mut _apt_lock = None;
        let mut script = script.to_string();
        let apt_scratch = fs.with_file_name("apt-cache");
        if let Some(name) = apt_cache_name(plan) {
            let serr = |source| ImageError::Store {
                image: plan.name.clone(),
                op: "prepare apt cache".into(),
                source,
            };
            let (archives, lists, lock) =
                caches::apt_dirs(self.store.root(), &self.project.dir, &name).map_err(serr)?;
            _apt_lock = Some(lock);
            // apt's binary caches (`pkgcache.bin`, `srcpkgcache.bin`: about
            // 45 MB each) are built from the lists, which are not in the
            // layer: in a layer they would only be stale bytes to store and
            // move. They go to a folder of this bake's own, dropped after.
            store::remove_tree(&apt_scratch).map_err(serr)?;
            fs_err::create_dir_all(&apt_scratch).map_err(serr)?;
            binds.push(Bind {
                host: apt_scratch.clone(),
                guest: "/var/cache/apt".into(),
                readonly: false,
            });
            binds.push(Bind {
                host: archives,
                guest: "/var/cache/apt/archives".into(),
                readonly: false,
            });
            // The lists are not in the layers: a step of an image whose
            // packages layer was baked by another project (or pulled from a
            // layer cache) would find none, and apt would know no package.
            if matches!(layer.kind, LayerKind::Step { .. }) && !has_package_lists(&lists) {
                self.reporter.output(
                    &plan.name,
                    Stream::Stdout,
                    "slate: no apt package lists for this image's suite in this project yet: `apt-get update` first",
                );
                script = format!("apt-get update -q\n{script}");
            }
            binds.push(Bind {
                host: lists,
                guest: "/var/lib/apt/lists".into(),
                readonly: false,
            });
        }
        // The image's own cache mounts, but where slate's apt cache is.
        let caches: Vec<_> = self
            .project
            .image(&layer.image)
            .map(|i| i.caches.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|c| !binds.iter().any(|b: &Bind| b.guest == c.path))
            .collect();
        let (cache_binds, _cache_locks) =
            caches::take(self.store.root(), &self.project.dir, &caches).map_err(|source| {
                ImageError::Store {
                    image: plan.name.clone(),
                    op: "prepare cache mounts".into(),
                    source,
                }
            })?;
        binds.extend(cache_binds);
        let spec = EnvSpec {
            name: format!("bake-{}", plan.name),
            layers: below.to_vec(),
            upper: Some(fs.to_path_buf()),
            network: true,
            host_ca: self.host_ca,
            limits: Default::default(),
            binds,
            ephemeral: false,
            kind: slate_provider::EnvKind::Sandbox,
            // apt and dpkg set owners and switch users; devices, mounts and
            // kernel settings stay out of reach as in builds.
            privileges: slate_provider::Privileges::Packages,
            ..Default::default()
        };
        let mut envir = self.provider.create(&spec)?;
        let mut sink = |s: Stream, l: &str| self.reporter.output(&plan.name, s, l);
        let exec = ExecSpec {
            argv: vec!["/bin/sh".into(), "-ec".into(), script],
            env: env.to_vec(),
            cwd: "/".into(),
            interactive: false,
        };
        let res = envir.exec(&exec, &mut sink, &self.cancel);
        let destroyed = envir.destroy();
        let _ = store::remove_tree(&apt_scratch);
        let outcome = res?;
        destroyed?;
        match outcome {
            ExecOutcome::Exited(0) => Ok(()),
            ExecOutcome::Cancelled => Err(ImageError::Cancelled {
                image: plan.name.clone(),
            }),
            o => Err(ImageError::StepFailed {
                image: plan.name.clone(),
                layer: layer.describe(),
                outcome: describe(o),
            }),
        }
    }

    fn bootstrap(
        &self,
        plan: &ImagePlan,
        suite: &str,
        mirror: Option<&str>,
        variant: &str,
        arch: Option<&str>,
        fs: &Path,
    ) -> Result<(), ImageError> {
        let opts = host_apt_options();
        let mut cmd = if which("mmdebstrap") {
            let mut c = tree_command("mmdebstrap");
            c.arg(format!("--variant={variant}"));
            if let Some(a) = arch {
                c.arg(format!("--architectures={a}"));
            }
            for o in &opts {
                c.arg(format!("--aptopt={o}"));
            }
            c.arg(suite).arg(fs);
            c
        } else if which("debootstrap") {
            let mut c = tree_command("debootstrap");
            let v = if variant == "minbase" || variant == "buildd" {
                variant
            } else {
                "minbase"
            };
            c.arg(format!("--variant={v}"));
            if let Some(a) = arch {
                c.arg(format!("--arch={a}"));
            }
            c.arg(suite).arg(fs);
            c
        } else {
            return Err(ImageError::NoBootstrapper {
                image: plan.name.clone(),
            });
        };
        if let Some(m) = mirror {
            cmd.arg(m);
        }
        self.host_command(plan, cmd, "bootstrap")
            .map_err(|outcome| {
                if self.cancel.is_cancelled() {
                    ImageError::Cancelled {
                        image: plan.name.clone(),
                    }
                } else {
                    ImageError::Bootstrap {
                        image: plan.name.clone(),
                        suite: suite.to_string(),
                        outcome,
                    }
                }
            })?;
        // Carry the host's apt settings that bootstrapping needed into the
        // image, and drop host-specific files the bootstrapper copied in.
        let conf: String = opts.iter().map(|o| format!("{o};\n")).collect();
        let w = |rel: &str, data: &str| {
            fs_err::write(fs.join(rel), data).map_err(|source| ImageError::Read {
                path: fs.join(rel),
                source,
            })
        };
        if !conf.is_empty() {
            w("etc/apt/apt.conf.d/99slate-host", &conf)?;
        }
        w("etc/resolv.conf", "")?;
        w("etc/hostname", "slate\n")?;
        Ok(())
    }

    /// Runs a host tool, streaming its output as bake output, until it ends
    /// or the bake is cancelled (then the tool is killed, with its whole
    /// tree when it came from [`tree_command`]).
    fn host_command(&self, plan: &ImagePlan, mut cmd: Command, what: &str) -> Result<(), String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {what}: {e}"))?;
        let stderr = child.stderr.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let st = std::thread::scope(|s| {
            s.spawn(|| {
                for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                    self.reporter.output(&plan.name, Stream::Stderr, &l);
                }
            });
            s.spawn(|| {
                for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                    self.reporter.output(&plan.name, Stream::Stdout, &l);
                }
            });
            loop {
                match child.try_wait() {
                    Ok(Some(st)) => return Ok(st),
                    Ok(None) => {}
                    Err(e) => return Err(e.to_string()),
                }
                if self.cancel.is_cancelled() {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("{what} cancelled"));
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        })?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("{what} {st}"))
        }
    }
}

/// `tool` run as PID 1 of a PID namespace of its own (util-linux's
/// `unshare --pid --fork --kill-child`), which is tied to slate by a
/// parent-death signal: killing it, or slate dying however it dies, ends
/// the tool and every process it started (apt, dpkg, maintainer scripts).
fn tree_command(tool: &str) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--pid", "--fork", "--kill-child=SIGKILL", "--", tool]);
    // SAFETY: prctl is async-signal-safe and touches no shared state.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

/// Whether apt's list folder holds a package index (`..._Packages`, maybe
/// compressed).
fn has_package_lists(lists: &Path) -> bool {
    fs_err::read_dir(lists).is_ok_and(|d| {
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
    })
}

/// Which apt archive a Debian image's packages come from, as a cache
/// folder's name: `<suite>-<arch>-<digest of suite, mirror and arch>`;
/// `None` for images not bootstrapped from Debian.
fn apt_cache_name(plan: &ImagePlan) -> Option<String> {
    match &plan.layers.first()?.kind {
        LayerKind::Debian {
            suite,
            mirror,
            arch,
            ..
        } => {
            let arch = arch.as_deref().unwrap_or(binfmt::host_arch());
            let id = format!("{suite}\n{}\n{arch}", mirror.as_deref().unwrap_or(""));
            let key = plan::hex(&<sha2::Sha256 as sha2::Digest>::digest(id.as_bytes()));
            let plain = |s: &str| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            };
            Some(if plain(suite) && plain(arch) {
                format!("{suite}-{arch}-{}", &key[..12])
            } else {
                key[..32].to_string()
            })
        }
        _ => None,
    }
}

pub fn describe(o: ExecOutcome) -> String {
    match o {
        ExecOutcome::Exited(c) => format!("exit code {c}"),
        ExecOutcome::Signaled(s) => format!("killed by signal {s}"),
        ExecOutcome::TimedOut => "timed out".into(),
        ExecOutcome::Cancelled => "cancelled".into(),
    }
}

pub fn which(tool: &str) -> bool {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .any(|d| Path::new(d).join(tool).is_file())
}

/// The host's apt options that decide whether the archive can be reached at
/// all: proxies, and `Check-Valid-Until` for snapshot mirrors.
fn host_apt_options() -> Vec<String> {
    let Ok(out) = Command::new("apt-config").arg("dump").output() else {
        return vec![];
    };
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| {
            let key = l.split_whitespace().next().unwrap_or("");
            [
                "Acquire::Check-Valid-Until",
                "Acquire::Check-Date",
                "Acquire::http::Proxy",
                "Acquire::https::Proxy",
            ]
            .contains(&key)
        })
        .map(|l| l.trim_end_matches(';').to_string())
        .collect()
}
