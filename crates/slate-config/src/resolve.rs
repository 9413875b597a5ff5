//! From the file model to specs: matrix expansion, placeholders, references.

use crate::diag::{did_you_mean, ConfigError, Diagnostic};
use crate::file::{BuildConfig, ConfigFile, ImageConfig};
use crate::spec::*;
use crate::units::{parse_duration, parse_size};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// Finds `slate.toml` (or reads `file` when given) and resolves it.
pub fn load(dir: &Path, file: Option<&Path>) -> Result<Project, ConfigError> {
    let path = match file {
        Some(f) if f.is_absolute() => f.to_path_buf(),
        Some(f) => dir.join(f),
        None => find_config(dir)?,
    };
    let src = fs_err::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    load_str(&path, &src)
}

fn find_config(dir: &Path) -> Result<PathBuf, ConfigError> {
    let mut cur = Some(dir);
    while let Some(d) = cur {
        let candidate = d.join(crate::FILE_NAME);
        if candidate.is_file() {
            return Ok(candidate);
        }
        cur = d.parent();
    }
    Err(ConfigError::NotFound {
        dir: dir.to_path_buf(),
    })
}

/// Parses and resolves config text read from `path`.
pub fn load_str(path: &Path, src: &str) -> Result<Project, ConfigError> {
    let file: ConfigFile = toml::from_str(src)
        .map_err(|e| ConfigError::Invalid(vec![parse_diagnostic(path, src, &e)]))?;
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let mut r = Resolver {
        path,
        src,
        dir: &dir,
        diags: Vec::new(),
        outside_ok: file.settings.outside_sources,
    };
    let project = r.project(&file);
    if r.diags.is_empty() {
        Ok(project)
    } else {
        Err(ConfigError::Invalid(r.diags))
    }
}

fn parse_diagnostic(path: &Path, src: &str, e: &toml::de::Error) -> Diagnostic {
    let offset = e.span().map(|s| s.start).unwrap_or(0);
    let msg = e.message().trim().to_string();
    let mut d = Diagnostic::at(path, src, offset, msg.clone());
    // serde's "unknown field `x`, expected one of `a`, `b`": suggest the closest.
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some((word, expected)) = rest.split_once('`') {
            let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
            if let Some(best) = did_you_mean(word, candidates.iter().copied()) {
                d = d.with_hint(format!("did you mean `{best}`?"));
            } else if !candidates.is_empty() {
                d = d.with_hint(format!("allowed here: {}", candidates.join(", ")));
            }
        }
    }
    d
}

struct Resolver<'a> {
    path: &'a Path,
    src: &'a str,
    dir: &'a Path,
    diags: Vec<Diagnostic>,
    /// `[settings] outside_sources = true`.
    outside_ok: bool,
}

/// `path` with `.` and `..` applied to its text, without the file system.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// Whether `path` is `dir` or below it, by its text and, when both exist,
/// by where symlinks really lead.
fn inside(dir: &Path, path: &Path) -> bool {
    if !lexical(path).starts_with(lexical(dir)) {
        return false;
    }
    match (dir.canonicalize(), path.canonicalize()) {
        (Ok(d), Ok(p)) => p.starts_with(d),
        _ => true,
    }
}

impl Resolver<'_> {
    /// `rel` under the project folder. A source that leads outside it (an
    /// absolute path, `..`, a symlink out) is an error unless the config
    /// allows it: a config taken from elsewhere must not make slate read,
    /// and copy into a build, any file of the host.
    fn source<T>(&mut self, at: &Spanned<T>, rel: &str, what: &str) -> PathBuf {
        let p = self.dir.join(rel);
        if !self.outside_ok && !inside(self.dir, &p) {
            self.err(
                at,
                format!("{what} `{rel}` is outside the project folder"),
                Some("move it into the project, or set `outside_sources = true` under [settings] to allow sources outside it".into()),
            );
        }
        p
    }

    fn err<T>(&mut self, at: &Spanned<T>, message: String, hint: Option<String>) {
        let mut d = Diagnostic::at(self.path, self.src, at.span().start, message);
        d.hint = hint;
        self.diags.push(d);
    }

    fn project(&mut self, file: &ConfigFile) -> Project {
        let settings = self.settings(file);
        self.providers(file);

        let images: Vec<ImageSpec> = file
            .images
            .iter()
            .map(|(name, img)| self.image(name, img.get_ref()))
            .collect();
        self.check_image_refs(file);
        let names: Vec<&str> = file.images.keys().map(String::as_str).collect();
        let mut targets = Vec::new();
        for (name, build) in file.builds.iter() {
            self.build(name, build, &names, &mut targets);
        }
        self.check_image_names(file);
        self.check_target_names(file, &targets);
        Project {
            dir: self.dir.to_path_buf(),
            file: self.path.to_path_buf(),
            settings,
            images,
            targets,
            vm: vm_spec(file),
            ssh: ssh_spec(file, self.dir),
            ec2: ec2_spec(file, self.dir),
        }
    }

    /// `[settings]`, with defaults for what the file leaves out.
    fn settings(&mut self, file: &ConfigFile) -> Settings {
        let jobs = match &file.settings.jobs {
            Some(j) if *j.get_ref() == 0 => {
                self.err(j, "`jobs` must be at least 1".into(), None);
                1
            }
            Some(j) => *j.get_ref() as usize,
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        };
        let artifacts = file
            .settings
            .artifacts
            .as_ref()
            .map(|a| PathBuf::from(a.get_ref()))
            .unwrap_or_else(|| PathBuf::from("artifacts"));
        let publish = file.settings.publish.as_ref().map(|p| p.get_ref().clone());
        if let Some(p) = &file.settings.publish {
            let url = p.get_ref();
            if !(url.starts_with("s3://") || url.starts_with("file://")) {
                self.err(
                    p,
                    format!("`publish = \"{url}\"` is not a supported destination"),
                    Some("use `s3://BUCKET/PREFIX` or `file://PATH`".into()),
                );
            }
        }
        Settings {
            jobs,
            artifacts,
            publish,
            signing_key: file
                .settings
                .signing_key
                .as_ref()
                .map(|k| self.dir.join(k.get_ref())),
            host_ca: file.settings.host_ca,
            ship: self.ship(file),
            ship_ca: file.settings.logs.ca.as_ref().map(|c| self.dir.join(c)),
            log_format: self.log_format(file),
            layer_cache: self.layer_cache(file),
        }
    }

    fn log_format(&mut self, file: &ConfigFile) -> Option<String> {
        let f = file.settings.logs.format.as_ref()?;
        if ["text", "json"].contains(&f.get_ref().as_str()) {
            return Some(f.get_ref().clone());
        }
        self.err(
            f,
            format!("unknown log format `{}`", f.get_ref()),
            Some("use `text` (lines for people) or `json` (one event per line)".into()),
        );
        None
    }

    fn layer_cache(&mut self, file: &ConfigFile) -> Option<String> {
        let l = file.settings.layer_cache.as_ref()?;
        let url = l.get_ref();
        if ["s3://", "file://", "oci://", "oci+http://"]
            .iter()
            .any(|s| url.starts_with(s))
        {
            return Some(url.clone());
        }
        self.err(
            l,
            format!("`layer_cache = \"{url}\"` is not a supported layer cache"),
            Some("use `s3://BUCKET/PREFIX`, `oci://REGISTRY/REPOSITORY` or `file://PATH`".into()),
        );
        None
    }

    /// `[settings.logs] ship`, each checked for a known scheme.
    fn ship(&mut self, file: &ConfigFile) -> Vec<String> {
        let mut out = Vec::new();
        for s in &file.settings.logs.ship {
            let url = s.get_ref();
            let known = [
                "syslog+tcp://",
                "syslog+tls://",
                "elasticsearch+http://",
                "elasticsearch+https://",
            ];
            if known.iter().any(|k| url.starts_with(k)) {
                out.push(url.clone());
            } else {
                self.err(
                    s,
                    format!("`{url}` is not a log sink"),
                    Some("use syslog+tcp://HOST:PORT, syslog+tls://HOST:PORT or elasticsearch+https://HOST:PORT/INDEX".into()),
                );
            }
        }
        out
    }

    fn check_image_names(&mut self, file: &ConfigFile) {
        for (name, img) in file.images.iter() {
            if let Err(why) = check_name(name) {
                self.err(
                    img,
                    format!("image name `{name}` {why}"),
                    Some(NAME_HINT.into()),
                );
            }
        }
    }

    /// Target names become folder names slate writes and removes, and
    /// hostnames: a matrix value counts as much as a build's name.
    fn check_target_names(&mut self, file: &ConfigFile, targets: &[TargetSpec]) {
        let mut seen = BTreeSet::new();
        for t in targets {
            if let Err(why) = check_name(&t.name) {
                let at = &file.builds.get(&t.build).unwrap();
                self.err(
                    at,
                    format!("target name `{}` {why}", t.name),
                    Some(NAME_HINT.into()),
                );
                continue;
            }
            if !seen.insert(t.name.clone()) {
                let at = &file.builds.get(&t.build).unwrap();
                self.err(
                    at,
                    format!("two targets are both named `{}`", t.name),
                    Some("rename a build or a matrix value so that target names differ".into()),
                );
            }
        }
    }

    fn providers(&mut self, file: &ConfigFile) {
        if let Some(vm) = &file.providers.vm {
            if let Some(a) = &vm.accel {
                if !["auto", "kvm", "tcg"].contains(&a.get_ref().as_str()) {
                    self.err(
                        a,
                        format!("unknown accel `{}`", a.get_ref()),
                        Some("use `auto`, `kvm` or `tcg`".into()),
                    );
                }
            }
            if let Some(i) = &vm.init {
                if !["slate", "systemd"].contains(&i.get_ref().as_str()) {
                    self.err(
                        i,
                        format!("unknown init `{}`", i.get_ref()),
                        Some("use `slate` or `systemd`".into()),
                    );
                }
            }
        }
        if let Some(ssh) = &file.providers.ssh {
            if let Some(k) = &ssh.known_hosts {
                if !["strict", "accept-new"].contains(&k.get_ref().as_str()) {
                    self.err(
                        k,
                        format!("unknown known_hosts policy `{}`", k.get_ref()),
                        Some("use `strict` (the default) or `accept-new`".into()),
                    );
                }
            }
            if let Some(n) = &ssh.slots {
                if *n.get_ref() == 0 {
                    self.err(n, "`slots` must be at least 1".into(), None);
                }
            }
        }
        if let Some(ec2) = &file.providers.ec2 {
            self.check_ec2(ec2);
        }
    }

    fn check_ec2(&mut self, ec2: &crate::file::Ec2Config) {
        if let Some(a) = &ec2.ami {
            let a_ = a.get_ref();
            let ok = a_.strip_prefix("image:").map_or_else(
                || a_.starts_with("ami-") && a_[4..].bytes().all(|b| b.is_ascii_alphanumeric()),
                |n| !n.is_empty(),
            );
            if !ok {
                self.err(
                    a,
                    format!("`{a_}` is not an AMI"),
                    Some("use an AMI id (`ami-0abc…`) or `image:NAME` for an image of this project exported with `slate bake NAME --export ami NAME`".into()),
                );
            }
        }
        if let Some(n) = &ec2.max_instances {
            if *n.get_ref() == 0 {
                self.err(n, "`max_instances` must be at least 1".into(), None);
            }
        }
        if let Some(p) = &ec2.ssh_port {
            if !(1..=65535).contains(p.get_ref()) {
                self.err(p, "`ssh_port` must be a port (1 to 65535)".into(), None);
            }
        }
        if let Some(a) = &ec2.address {
            if !["auto", "public", "private"].contains(&a.get_ref().as_str()) {
                self.err(
                    a,
                    format!("unknown address `{}`", a.get_ref()),
                    Some("use `auto` (public when there is one), `public` or `private`".into()),
                );
            }
        }
        if let Some(e) = &ec2.endpoint {
            let e_ = e.get_ref();
            if !(e_.starts_with("https://") || e_.starts_with("http://")) {
                self.err(
                    e,
                    format!("`{e_}` is not an endpoint URL"),
                    Some("use `https://ec2.example-cloud.net`".into()),
                );
            }
        }
        if let Some(t) = &ec2.boot_timeout {
            if parse_duration(t.get_ref()).is_err() {
                self.err(
                    t,
                    format!("`{}` is not a duration", t.get_ref()),
                    Some("e.g. `5m` or `90s`".into()),
                );
            }
        }
    }

    fn image(&mut self, name: &str, img: &ImageConfig) -> ImageSpec {
        let base = self.base(name, img);
        self.check_base_options(name, img, &base);
        self.check_variant(img);
        let files = self.files(name, img);
        self.check_packages(img);
        ImageSpec {
            name: name.to_string(),
            base,
            packages: img.packages.iter().map(|p| p.get_ref().clone()).collect(),
            files,
            env: img
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            steps: img.steps.iter().map(|s| s.get_ref().clone()).collect(),
            vm: img.vm,
            caches: self.caches(&img.caches, false),
        }
    }

    /// The image's `from`.
    fn base(&mut self, name: &str, img: &ImageConfig) -> BaseSpec {
        let from = img.from.get_ref();
        match from.split_once(':') {
            Some(("debian", suite)) if !suite.is_empty() => BaseSpec::Debian {
                suite: suite.to_string(),
                mirror: img.mirror.as_ref().map(|m| m.get_ref().clone()),
                variant: img
                    .variant
                    .as_ref()
                    .map(|v| v.get_ref().clone())
                    .unwrap_or_else(|| "minbase".into()),
                arch: img.arch.as_ref().map(|a| a.get_ref().clone()),
            },
            Some(("tar", p)) if !p.is_empty() => BaseSpec::Tar {
                path: self.source(&img.from, p, "tar base"),
            },
            Some(("oci", r)) if !r.is_empty() => BaseSpec::Oci {
                reference: r.to_string(),
                insecure: img.insecure,
            },
            Some(("image", n)) if !n.is_empty() => BaseSpec::Image {
                name: n.to_string(),
            },
            _ => {
                self.err(
                    &img.from,
                    format!("image `{name}`: cannot read `from = \"{from}\"`"),
                    Some("use `debian:SUITE`, `oci:REF`, `tar:PATH` or `image:NAME`".into()),
                );
                BaseSpec::Image {
                    name: String::new(),
                }
            }
        }
    }

    /// Options that belong to one kind of base are errors with another.
    fn check_base_options(&mut self, name: &str, img: &ImageConfig, base: &BaseSpec) {
        if let BaseSpec::Oci { reference, .. } = base {
            let host = reference.split('/').next().unwrap_or("");
            if !reference.contains('/')
                || !(host.contains('.') || host.contains(':') || host == "localhost")
            {
                self.err(
                    &img.from,
                    format!("image `{name}`: `oci:{reference}` does not name a registry"),
                    Some("write the registry first, e.g. `oci:registry.example:5000/library/debian:bookworm`".into()),
                );
            }
        } else if img.insecure {
            self.err(
                &img.from,
                format!("image `{name}`: `insecure` only applies to `from = \"oci:…\"`"),
                Some("remove `insecure`".into()),
            );
        }
        if !matches!(base, BaseSpec::Debian { .. }) {
            for (field, v) in [
                ("mirror", &img.mirror),
                ("variant", &img.variant),
                ("arch", &img.arch),
            ] {
                if let Some(v) = v {
                    self.err(
                        v,
                        format!("image `{name}`: `{field}` only applies to `from = \"debian:…\"`"),
                        Some(format!("remove `{field}`")),
                    );
                }
            }
        }
    }

    fn check_variant(&mut self, img: &ImageConfig) {
        if let Some(v) = &img.variant {
            let ok = [
                "minbase",
                "buildd",
                "required",
                "important",
                "standard",
                "apt",
            ];
            if !ok.contains(&v.get_ref().as_str()) {
                self.err(
                    v,
                    format!("unknown variant `{}`", v.get_ref()),
                    Some(format!("use one of {}", ok.join(", "))),
                );
            }
        }
    }

    /// The image's `files`, as (path on the host, path in the image).
    fn files(&mut self, name: &str, img: &ImageConfig) -> Vec<(PathBuf, String)> {
        let mut files = Vec::new();
        for (host, dest) in img.files.iter() {
            if !dest.get_ref().starts_with('/') {
                self.err(
                    dest,
                    format!(
                        "image `{name}`: file destination `{}` is not an absolute path",
                        dest.get_ref()
                    ),
                    Some(format!("write it as `/{}`", dest.get_ref())),
                );
            }
            let hp = self.source(dest, host, "file");
            if !hp.exists() {
                self.err(
                    dest,
                    format!("image `{name}`: file `{host}` does not exist"),
                    Some(format!(
                        "paths in `files` are relative to `{}`",
                        self.dir.display()
                    )),
                );
            }
            files.push((hp, dest.get_ref().clone()));
        }
        files
    }

    fn check_packages(&mut self, img: &ImageConfig) {
        for p in &img.packages {
            let ok = !p.get_ref().is_empty()
                && p.get_ref()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.:=~_/".contains(c));
            if !ok {
                self.err(
                    p,
                    format!("`{}` is not a Debian package name", p.get_ref()),
                    None,
                );
            }
        }
    }

    fn check_image_refs(&mut self, file: &ConfigFile) {
        let names: Vec<&str> = file.images.keys().map(String::as_str).collect();
        for (name, img) in file.images.iter() {
            let Some(base) = img.get_ref().from.get_ref().strip_prefix("image:") else {
                continue;
            };
            if !names.contains(&base) {
                let hint = did_you_mean(base, names.iter().copied())
                    .map(|b| format!("did you mean `image:{b}`?"))
                    .unwrap_or_else(|| format!("define `[images.{base}]` or fix the name"));
                self.err(
                    &img.get_ref().from,
                    format!("image `{name}` is based on `{base}`, which is not defined"),
                    Some(hint),
                );
                continue;
            }
            // Follow the chain of bases; coming back to `name` is a cycle.
            let mut chain = vec![name.as_str()];
            let mut cur = base;
            while let Some(next) = file.images.get(cur) {
                if chain.contains(&cur) {
                    if cur == name {
                        chain.push(cur);
                        self.err(
                            &img.get_ref().from,
                            format!("images are based on each other in a cycle: {}", chain.join(" → ")),
                            Some("one image of the cycle must start from a `debian:`, `oci:` or `tar:` base".into()),
                        );
                    }
                    break;
                }
                chain.push(cur);
                match next.get_ref().from.get_ref().strip_prefix("image:") {
                    Some(n) => cur = n,
                    None => break,
                }
            }
        }
    }

    fn build(
        &mut self,
        name: &str,
        b: &Spanned<BuildConfig>,
        images: &[&str],
        out: &mut Vec<TargetSpec>,
    ) {
        let bc = b.get_ref();
        let Some(axes) = self.matrix(name, bc) else {
            return;
        };
        if !self.check_placeholders(name, bc, &axes) {
            return;
        }
        let Some(command) = self.command(name, b) else {
            return;
        };
        let provider = self.provider(bc);
        let memory = self.memory(bc);
        let timeout = self.timeout(bc);
        self.check_cpus(bc);
        let workdir = self.workdir(bc);
        self.check_artifacts(bc);
        let inputs = self.inputs(name, bc);
        self.check_secrets(bc);
        let caches = self.caches(&bc.caches, true);
        let packages = self.packages(bc);
        let parts = BuildParts {
            command,
            inputs,
            workdir,
            memory,
            timeout,
            provider,
            caches,
            packages,
        };
        for combo in combinations(&axes) {
            if let Some(t) = self.target(name, bc, images, &combo, &parts) {
                out.push(t);
            }
        }
    }

    /// The build's matrix axes, or `None` when an axis is empty or the
    /// matrix makes more than [`MAX_MATRIX_TARGETS`] targets.
    fn matrix<'b>(&mut self, name: &str, bc: &'b BuildConfig) -> Option<Vec<Axis<'b>>> {
        let axes: Vec<Axis> = bc.matrix.iter().collect();
        for (axis, values) in &axes {
            if values.get_ref().is_empty() {
                self.err(
                    *values,
                    format!("build `{name}`: matrix axis `{axis}` has no values"),
                    None,
                );
                return None;
            }
        }
        // Counted before expanding: a few lines of axes can multiply into
        // more targets than memory holds.
        let count = axes
            .iter()
            .try_fold(1usize, |n, (_, v)| n.checked_mul(v.get_ref().len()));
        if count.is_none_or(|n| n > MAX_MATRIX_TARGETS) {
            let count = count.map_or_else(|| "too many".to_string(), |n| n.to_string());
            self.err(
                axes[0].1,
                format!(
                    "build `{name}`: its matrix makes {count} targets, more than {MAX_MATRIX_TARGETS}"
                ),
                Some("split the build, or list fewer values per axis".into()),
            );
            return None;
        }
        Some(axes)
    }

    /// Whether every placeholder that must resolve, in `image` and
    /// `artifacts`, names a matrix axis; reports the first that does not.
    fn check_placeholders(&mut self, name: &str, bc: &BuildConfig, axes: &[Axis]) -> bool {
        let axis_names: Vec<&str> = axes.iter().map(|(a, _)| a.as_str()).collect();
        for c in &bc.caches {
            if let crate::file::CacheConfig::Table { id: Some(id), .. } = c.get_ref() {
                if let Some(ph) = placeholders(id)
                    .into_iter()
                    .find(|p| !axis_names.contains(&p.as_str()))
                {
                    self.err(
                        c,
                        format!(
                            "build `{name}`: cache id placeholder `{{{ph}}}` has no matrix axis"
                        ),
                        Some(if axis_names.is_empty() {
                            format!("add `matrix = {{ {ph} = [...] }}` to `[builds.{name}]`")
                        } else {
                            format!("the matrix axes are: {}", axis_names.join(", "))
                        }),
                    );
                    return false;
                }
            }
        }
        let mut strict = vec![&bc.image];
        strict.extend(bc.artifacts.iter());
        for s in strict {
            for ph in placeholders(s.get_ref()) {
                if !axis_names.contains(&ph.as_str()) {
                    let hint = if axis_names.is_empty() {
                        format!("add `matrix = {{ {ph} = [...] }}` to `[builds.{name}]`")
                    } else {
                        format!("the matrix axes are: {}", axis_names.join(", "))
                    };
                    self.err(
                        s,
                        format!("build `{name}`: placeholder `{{{ph}}}` has no matrix axis"),
                        Some(hint),
                    );
                    return false;
                }
            }
        }
        true
    }

    /// The build's `script` or `run`, or `None` when it has both or neither.
    fn command(&mut self, name: &str, b: &Spanned<BuildConfig>) -> Option<BuildCommand> {
        let bc = b.get_ref();
        match (&bc.script, &bc.run) {
            (Some(_), Some(r)) => {
                self.err(
                    r,
                    format!("build `{name}` has both `script` and `run`"),
                    Some("keep one of them".into()),
                );
                None
            }
            (None, None) => {
                self.err(
                    b,
                    format!("build `{name}` has neither `script` nor `run`"),
                    Some("add `script = \"build.sh\"` or `run = [\"make\"]`".into()),
                );
                None
            }
            (Some(s), None) => {
                let p = self.source(s, s.get_ref(), "script");
                if !p.is_file() {
                    self.err(
                        s,
                        format!("build `{name}`: script `{}` does not exist", s.get_ref()),
                        Some(format!("paths are relative to `{}`", self.dir.display())),
                    );
                }
                Some(BuildCommand::Script(p))
            }
            (None, Some(r)) => {
                if r.get_ref().is_empty() {
                    self.err(r, format!("build `{name}`: `run` is empty"), None);
                }
                Some(BuildCommand::Run(r.get_ref().clone()))
            }
        }
    }

    fn provider(&mut self, bc: &BuildConfig) -> ProviderKind {
        match &bc.provider {
            None => ProviderKind::Sandbox,
            Some(p) => match ProviderKind::parse(p.get_ref()) {
                Some(k) => k,
                None => {
                    self.err(
                        p,
                        format!("unknown provider `{}`", p.get_ref()),
                        Some("use `sandbox`, `vm`, `ssh` or `ec2`".into()),
                    );
                    ProviderKind::Sandbox
                }
            },
        }
    }

    /// `memory` in bytes.
    fn memory(&mut self, bc: &BuildConfig) -> Option<u64> {
        bc.memory
            .as_ref()
            .and_then(|m| match parse_size(m.get_ref()) {
                Ok(v) => Some(v),
                Err(e) => {
                    self.err(m, e, None);
                    None
                }
            })
    }

    fn timeout(&mut self, bc: &BuildConfig) -> Option<Duration> {
        bc.timeout
            .as_ref()
            .and_then(|t| match parse_duration(t.get_ref()) {
                Ok(v) => Some(v),
                Err(e) => {
                    self.err(t, e, None);
                    None
                }
            })
    }

    fn check_cpus(&mut self, bc: &BuildConfig) {
        if let Some(c) = &bc.cpus {
            let cpus = *c.get_ref();
            // NaN compares false to everything: test for what is valid.
            if !(cpus > 0.0 && cpus <= 1024.0) {
                self.err(
                    c,
                    format!("`cpus = {cpus}` is not a number of CPUs"),
                    Some("write a number above 0, e.g. `cpus = 2` or `cpus = 0.5`".into()),
                );
            }
        }
    }

    /// `workdir`, `/src` by default.
    fn workdir(&mut self, bc: &BuildConfig) -> String {
        let workdir = bc
            .workdir
            .as_ref()
            .map(|w| w.get_ref().clone())
            .unwrap_or_else(|| "/src".into());
        if !workdir.starts_with('/') || workdir == "/" {
            self.err(
                bc.workdir.as_ref().unwrap(),
                format!("`workdir = \"{workdir}\"` must be an absolute path below /"),
                Some("e.g. `workdir = \"/src\"`".into()),
            );
        }
        workdir
    }

    fn check_artifacts(&mut self, bc: &BuildConfig) {
        for a in &bc.artifacts {
            if a.get_ref().starts_with('/') || a.get_ref().split('/').any(|c| c == "..") {
                self.err(
                    a,
                    format!(
                        "artifact glob `{}` must be relative to workdir",
                        a.get_ref()
                    ),
                    None,
                );
            }
        }
        if bc.artifacts.is_empty() {
            // A build without artifacts is legal (a smoke test), if unusual.
        }
    }

    /// `inputs`, the whole project folder by default.
    fn inputs(&mut self, name: &str, bc: &BuildConfig) -> Vec<PathBuf> {
        match &bc.inputs {
            None => vec![self.dir.to_path_buf()],
            Some(list) => list
                .iter()
                .map(|i| {
                    let p = self.source(i, i.get_ref(), "input");
                    if !p.exists() {
                        self.err(
                            i,
                            format!("build `{name}`: input `{}` does not exist", i.get_ref()),
                            None,
                        );
                    }
                    p
                })
                .collect(),
        }
    }

    fn check_secrets(&mut self, bc: &BuildConfig) {
        for s in &bc.secrets {
            if s.get_ref().is_empty() || s.get_ref().contains('=') {
                self.err(
                    s,
                    format!("`{}` is not an environment variable name", s.get_ref()),
                    None,
                );
            }
        }
    }

    /// The target for one combination of matrix values, or `None` when the
    /// image it names is not defined.
    fn target(
        &mut self,
        name: &str,
        bc: &BuildConfig,
        images: &[&str],
        combo: &[(String, String)],
        parts: &BuildParts,
    ) -> Option<TargetSpec> {
        let subst = |s: &str| substitute(s, combo);
        let target_name = target_name(name, combo);
        let image = subst(bc.image.get_ref());
        if !images.contains(&image.as_str()) {
            let hint = did_you_mean(&image, images.iter().copied())
                .map(|b| format!("did you mean `{b}`?"))
                .unwrap_or_else(|| format!("define `[images.{image}]`"));
            self.err(
                &bc.image,
                format!("target `{target_name}` uses image `{image}`, which is not defined"),
                Some(hint),
            );
            return None;
        }
        let mut caches = parts.caches.clone();
        for c in &mut caches {
            let id = subst(&c.id);
            if !cache_id_ok(&id) {
                self.err(
                    &bc.image,
                    format!("target `{target_name}`: cache id `{id}` (from `{}`) must be letters, digits, `.`, `_` and `-`", c.id),
                    Some("use matrix values that make a valid id, or another id".into()),
                );
                return None;
            }
            c.id = id;
        }
        Some(TargetSpec {
            name: target_name,
            build: name.to_string(),
            matrix: combo.to_vec(),
            image,
            command: match &parts.command {
                BuildCommand::Run(r) => BuildCommand::Run(r.iter().map(|c| subst(c)).collect()),
                c => c.clone(),
            },
            inputs: parts.inputs.clone(),
            exclude: bc.exclude.iter().map(|e| e.get_ref().clone()).collect(),
            workdir: parts.workdir.clone(),
            artifacts: bc.artifacts.iter().map(|a| subst(a.get_ref())).collect(),
            env: bc.env.iter().map(|(k, v)| (k.clone(), subst(v))).collect(),
            secrets: bc.secrets.iter().map(|s| s.get_ref().clone()).collect(),
            network: bc.network,
            cpus: bc.cpus.as_ref().map(|c| *c.get_ref()),
            memory: parts.memory,
            pids: bc.pids.as_ref().map(|p| *p.get_ref()),
            timeout: parts.timeout,
            provider: parts.provider,
            caches,
            packages: parts.packages,
        })
    }

    /// A build's (or an image's) `caches`, checked; a build's ids may hold
    /// matrix placeholders (`{suite}`), checked with the matrix.
    fn caches(
        &mut self,
        list: &[toml::Spanned<crate::file::CacheConfig>],
        matrix: bool,
    ) -> Vec<crate::spec::CacheSpec> {
        use crate::file::CacheConfig;
        use crate::spec::{CacheSpec, Sharing};
        let mut out: Vec<CacheSpec> = Vec::new();
        for c in list {
            let (path, id, sharing) = match c.get_ref() {
                CacheConfig::Path(p) => (p.clone(), None, None),
                CacheConfig::Table { path, id, sharing } => {
                    (path.clone(), id.clone(), sharing.clone())
                }
            };
            let clean = path.trim_end_matches('/');
            let reserved = ["/proc", "/sys", "/dev", "/run", "/tmp"]
                .iter()
                .any(|r| clean == *r || clean.starts_with(&format!("{r}/")));
            if !clean.starts_with('/')
                || clean.is_empty()
                || clean.split('/').any(|p| p == ".." || p == ".")
                || reserved
            {
                self.err(
                    c,
                    format!("cache path `{path}` must be an absolute folder inside the environment"),
                    Some("e.g. \"/var/cache/apt/archives\" or \"/root/.cargo/registry\" (not /, /proc, /sys, /dev, /run or /tmp)".into()),
                );
                continue;
            }
            let id = id.unwrap_or_else(|| clean.trim_start_matches('/').replace('/', "-"));
            let bare = if matrix {
                placeholders(&id)
                    .iter()
                    .fold(id.clone(), |s, p| s.replace(&format!("{{{p}}}"), "x"))
            } else {
                id.clone()
            };
            if !cache_id_ok(&bare) {
                self.err(
                    c,
                    format!("cache id `{id}` must be letters, digits, `.`, `_` and `-`"),
                    None,
                );
                continue;
            }
            // apt takes a lock in its archive folder and fails when another
            // holds it: its caches default to one per environment at a time,
            // a second one for a target that runs meanwhile (`locked` would
            // make targets wait for each other's whole build).
            let apt = [
                "/var/cache/apt/archives",
                "/var/cache/apt",
                "/var/lib/apt/lists",
            ]
            .contains(&clean);
            let sharing = match sharing.as_deref() {
                None if apt => Sharing::Private,
                None | Some("shared") => Sharing::Shared,
                Some("locked") => Sharing::Locked,
                Some("private") => Sharing::Private,
                Some(other) => {
                    self.err(
                        c,
                        format!("unknown sharing `{other}`"),
                        Some("use `shared`, `locked` or `private`".into()),
                    );
                    continue;
                }
            };
            if out.iter().any(|o| o.path == clean) {
                self.err(c, format!("`{clean}` is named twice in `caches`"), None);
                continue;
            }
            out.push(CacheSpec {
                path: clean.to_string(),
                id,
                sharing,
            });
        }
        out
    }

    /// A build's `privileges`: whether it keeps a package manager's.
    fn packages(&mut self, bc: &BuildConfig) -> bool {
        match bc.privileges.as_ref().map(|p| (p, p.get_ref().as_str())) {
            None | Some((_, "none")) => false,
            Some((_, "packages")) => true,
            Some((p, other)) => {
                self.err(
                    p,
                    format!("unknown privileges `{other}`"),
                    Some("use `none` (the default) or `packages` (what apt and dpkg need: owners, modes, users)".into()),
                );
                false
            }
        }
    }
}

/// A matrix axis: its name and its values.
type Axis<'a> = (&'a String, &'a Spanned<Vec<String>>);

/// What every target of a build shares, checked once before the matrix is
/// expanded.
struct BuildParts {
    command: BuildCommand,
    inputs: Vec<PathBuf>,
    workdir: String,
    memory: Option<u64>,
    timeout: Option<Duration>,
    provider: ProviderKind,
    caches: Vec<crate::spec::CacheSpec>,
    packages: bool,
}

/// `build`, or `build-v1-v2…` with the values of a matrix combination.
fn target_name(build: &str, combo: &[(String, String)]) -> String {
    if combo.is_empty() {
        build.to_string()
    } else {
        format!(
            "{build}-{}",
            combo
                .iter()
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
                .join("-")
        )
    }
}

/// `[providers.vm]`, with defaults for what the file leaves out.
fn vm_spec(file: &ConfigFile) -> VmSpec {
    file.providers
        .vm
        .as_ref()
        .map(|vm| VmSpec {
            accel: vm
                .accel
                .as_ref()
                .map(|a| a.get_ref().clone())
                .unwrap_or_else(|| "auto".into()),
            init: vm
                .init
                .as_ref()
                .map(|i| i.get_ref().clone())
                .unwrap_or_else(|| "slate".into()),
            snapshots: vm.snapshots.unwrap_or(true),
        })
        .unwrap_or_default()
}

/// `[providers.ssh]`, with defaults for what the file leaves out.
fn ssh_spec(file: &ConfigFile, dir: &std::path::Path) -> SshSpec {
    let Some(ssh) = &file.providers.ssh else {
        return SshSpec {
            user: "root".into(),
            known_hosts: "strict".into(),
            slots: 4,
            ..Default::default()
        };
    };
    let path = |p: &String| {
        let p = match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
            (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
            _ => PathBuf::from(p),
        };
        dir.join(p)
    };
    SshSpec {
        hosts: ssh.hosts.clone(),
        user: ssh.user.clone().unwrap_or_else(|| "root".into()),
        identity: ssh.identity.as_ref().map(path),
        known_hosts: ssh
            .known_hosts
            .as_ref()
            .map(|k| k.get_ref().clone())
            .unwrap_or_else(|| "strict".into()),
        known_hosts_file: ssh.known_hosts_file.as_ref().map(path),
        slots: ssh
            .slots
            .as_ref()
            .map_or(4, |n| (*n.get_ref()).max(1) as usize),
    }
}

/// A path from the config: `~/` is the user's home, a relative path is
/// the project folder's.
fn config_path(dir: &std::path::Path, p: &str) -> PathBuf {
    let p = match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    };
    dir.join(p)
}

/// `[providers.ec2]`, with defaults for what the file leaves out.
fn ec2_spec(file: &ConfigFile, dir: &std::path::Path) -> crate::spec::Ec2Spec {
    let empty = crate::file::Ec2Config::default();
    let e = file.providers.ec2.as_ref().unwrap_or(&empty);
    crate::spec::Ec2Spec {
        configured: file.providers.ec2.is_some(),
        region: e.region.clone(),
        endpoint: e.endpoint.as_ref().map(|s| s.get_ref().clone()),
        ami: e
            .ami
            .as_ref()
            .map(|s| s.get_ref().clone())
            .unwrap_or_default(),
        instance_type: e
            .instance_type
            .clone()
            .unwrap_or_else(|| "t3.medium".into()),
        subnet: e.subnet.clone(),
        security_group: e.security_group.clone(),
        key_name: e.key_name.clone(),
        spot: e.spot.unwrap_or(false),
        max_instances: e
            .max_instances
            .as_ref()
            .map_or(8, |n| (*n.get_ref()).max(1) as usize),
        user: e.user.clone().unwrap_or_else(|| "root".into()),
        identity: e.identity.as_ref().map(|p| config_path(dir, p)),
        ssh_port: e.ssh_port.as_ref().map_or(22, |p| *p.get_ref() as u16),
        address: e
            .address
            .as_ref()
            .map(|s| s.get_ref().clone())
            .unwrap_or_else(|| "auto".into()),
        boot_timeout: e
            .boot_timeout
            .as_ref()
            .and_then(|t| parse_duration(t.get_ref()).ok())
            .unwrap_or(std::time::Duration::from_secs(600)),
    }
}

/// The most targets one build's matrix may make; each is built in its own
/// environment, so more is a mistake rather than a plan.
const MAX_MATRIX_TARGETS: usize = 1024;

const NAME_HINT: &str =
    "use letters, digits, `.`, `_` and `-`, starting with a letter or digit, at most 63 characters";

/// Whether `name` can be an image or target name: it becomes a folder name
/// under `artifacts/` and `.slate/`, and a hostname.
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > 63 {
        return Err("is longer than 63 characters (a hostname's limit)");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must start with a letter or a digit");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err("may hold only letters, digits, `.`, `_` and `-`");
    }
    Ok(())
}

/// Every combination of matrix values, axes in file order.
fn combinations(axes: &[Axis]) -> Vec<Vec<(String, String)>> {
    let mut out = vec![Vec::new()];
    for (axis, values) in axes {
        let mut next = Vec::new();
        for prefix in &out {
            for v in values.get_ref() {
                let mut p = prefix.clone();
                p.push(((*axis).clone(), v.clone()));
                next.push(p);
            }
        }
        out = next;
    }
    out
}

/// `{name}` placeholders in `s`; `${name}` is shell syntax, not a placeholder.
/// Whether `id` may name a cache (a folder in slate's cache).
fn cache_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 100
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

pub fn placeholders(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'{' && (i == 0 || b[i - 1] != b'$') {
            if let Some(end) = s[i + 1..].find('}') {
                let name = &s[i + 1..i + 1 + end];
                if !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    out.push(name.to_string());
                    i += end + 2;
                    continue;
                }
            }
        }
        i += 1;
    }
    out
}

fn substitute(s: &str, combo: &[(String, String)]) -> String {
    let mut out = s.to_string();
    for (k, v) in combo {
        let pat = format!("{{{k}}}");
        let mut res = String::new();
        let mut rest = out.as_str();
        while let Some(pos) = rest.find(&pat) {
            let shell = pos > 0 && rest.as_bytes()[pos - 1] == b'$';
            res.push_str(&rest[..pos]);
            res.push_str(if shell { &pat } else { v });
            rest = &rest[pos + pat.len()..];
        }
        res.push_str(rest);
        out = res;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(src: &str) -> Result<Project, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("build.sh"), "true").unwrap();
        let p = dir.path().join("slate.toml");
        load_str(&p, src)
    }

    fn diags(src: &str) -> Vec<Diagnostic> {
        match load_text(src) {
            Err(ConfigError::Invalid(d)) => d,
            other => panic!("expected diagnostics, got {other:?}"),
        }
    }

    const GOOD: &str = r#"
[images.builder-bookworm]
from = "debian:bookworm"
packages = ["build-essential"]
[images.builder-trixie]
from = "image:builder-bookworm"

[builds.agent]
image = "builder-{distro}"
matrix = { distro = ["bookworm", "trixie"] }
run = ["make {distro}", "echo ${distro}"]
artifacts = ["dist/{distro}/*.deb"]
env = { D = "{distro}" }
timeout = "30m"
memory = "2GiB"
"#;

    #[test]
    fn expands_matrix_and_substitutes() {
        let p = load_text(GOOD).unwrap();
        let names: Vec<_> = p.targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["agent-bookworm", "agent-trixie"]);
        let t = &p.targets[1];
        assert_eq!(t.image, "builder-trixie");
        assert_eq!(
            t.command,
            BuildCommand::Run(vec!["make trixie".into(), "echo ${distro}".into()])
        );
        assert_eq!(t.artifacts, ["dist/trixie/*.deb"]);
        assert_eq!(t.env, [("D".to_string(), "trixie".to_string())]);
        assert_eq!(t.memory, Some(2 << 30));
        assert_eq!(t.timeout.unwrap().as_secs(), 1800);
        assert_eq!(t.workdir, "/src");
    }

    #[test]
    fn sources_outside_the_project_are_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("p");
        std::fs::create_dir_all(&project).unwrap();
        std::fs::write(dir.path().join("outside.sh"), "true").unwrap();
        std::os::unix::fs::symlink("/etc", project.join("etc-link")).unwrap();
        let cfg = |settings: &str, build: &str| {
            format!("{settings}[images.b]\nfrom = \"debian:bookworm\"\nfiles = {{ \"etc-link/hostname\" = \"/etc/x\" }}\n[builds.t]\nimage = \"b\"\n{build}")
        };
        let load = |src: String| load_str(&project.join("slate.toml"), &src);
        for (build, what) in [
            ("script = \"../outside.sh\"\n", "script `../outside.sh`"),
            ("run = [\"true\"]\ninputs = [\"/etc\"]\n", "input `/etc`"),
            (
                "run = [\"true\"]\ninputs = [\"etc-link\"]\n",
                "input `etc-link`",
            ),
        ] {
            let Err(ConfigError::Invalid(d)) = load(cfg("", build)) else {
                panic!("{build} was accepted");
            };
            let all: Vec<String> = d.iter().map(|d| d.message.clone()).collect();
            assert!(
                all.iter()
                    .any(|m| m.contains(what) && m.contains("outside the project")),
                "{all:?}"
            );
            // The symlinked `files` source is refused too, at its line.
            assert!(
                d.iter()
                    .any(|d| d.message.contains("file `etc-link/hostname`") && d.line == 3),
                "{all:?}"
            );
            assert!(d[0]
                .hint
                .as_deref()
                .unwrap_or("")
                .contains("outside_sources = true"));
        }
        let ok = load(cfg(
            "[settings]\noutside_sources = true\n",
            "script = \"../outside.sh\"\ninputs = [\"/etc\"]\n",
        ));
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn unknown_key_suggests_fix_with_position() {
        let d = diags("[images.a]\nfrom = \"debian:bookworm\"\npakages = [\"x\"]\n");
        assert_eq!((d[0].line, d[0].col), (3, 1));
        assert!(
            d[0].message.contains("unknown field `pakages`"),
            "{}",
            d[0].message
        );
        assert_eq!(d[0].hint.as_deref(), Some("did you mean `packages`?"));
    }

    #[test]
    fn a_cache_id_may_take_matrix_values() {
        let src = "[images.a]\nfrom = \"debian:bookworm\"\n[builds.b]\nimage = \"a\"\nrun = [\"true\"]\nmatrix = { suite = [\"bookworm\", \"trixie\"] }\ncaches = [{ path = \"/var/cache/apt/archives\", id = \"apt-{suite}\" }]\n";
        let p = load_text(src).unwrap();
        let ids: Vec<&str> = p.targets.iter().map(|t| t.caches[0].id.as_str()).collect();
        assert_eq!(ids, ["apt-bookworm", "apt-trixie"]);
        let d = diags(&src.replace("apt-{suite}", "apt-{distro}"));
        assert!(
            d[0].message
                .contains("placeholder `{distro}` has no matrix axis"),
            "{}",
            d[0].message
        );
        let d = diags(&src.replace("\"trixie\"", "\"../x\""));
        assert!(
            d[0].message.contains("cache id `apt-../x`"),
            "{}",
            d[0].message
        );
        // An image has no matrix: braces are not an id there.
        let d = diags("[images.a]\nfrom = \"debian:bookworm\"\ncaches = [{ path = \"/x\", id = \"c-{suite}\" }]\n");
        assert!(
            d[0].message.contains("cache id `c-{suite}`"),
            "{}",
            d[0].message
        );
    }

    #[test]
    fn log_format_is_text_or_json() {
        let p = load_text("[settings.logs]\nformat = \"json\"\n").unwrap();
        assert_eq!(p.settings.log_format.as_deref(), Some("json"));
        assert_eq!(load_text("").unwrap().settings.log_format, None);
        let d = diags("[settings.logs]\nformat = \"xml\"\n");
        assert_eq!(d[0].line, 2);
        assert!(
            d[0].message.contains("unknown log format `xml`"),
            "{}",
            d[0].message
        );
    }

    #[test]
    fn wrong_type_is_located() {
        let d = diags("[settings]\njobs = \"four\"\n");
        assert_eq!(d[0].line, 2);
        assert!(d[0].message.contains("invalid type"), "{}", d[0].message);
    }

    #[test]
    fn dangling_image_and_placeholder() {
        let d = diags("[images.a]\nfrom = \"debian:bookworm\"\n[builds.b]\nimage = \"aa\"\nrun = [\"true\"]\n");
        assert_eq!(d[0].line, 4);
        assert!(d[0].message.contains("image `aa`"));
        assert_eq!(d[0].hint.as_deref(), Some("did you mean `a`?"));
        let d = diags("[images.a]\nfrom = \"debian:bookworm\"\n[builds.b]\nimage = \"a-{distro}\"\nrun = [\"true\"]\n");
        assert!(
            d[0].message
                .contains("placeholder `{distro}` has no matrix axis"),
            "{}",
            d[0].message
        );
        assert_eq!((d[0].line, d[0].col), (4, 9));
    }

    #[test]
    fn names_that_would_become_paths_outside_are_errors() {
        let d = diags("[images.b]\nfrom = \"tar:x.tar\"\n[builds.\"../victim\"]\nimage = \"b\"\nrun = [\"true\"]\n");
        assert!(
            d.iter()
                .any(|d| d.message.contains("target name `../victim`") && d.line == 3),
            "{d:?}"
        );
        let d = diags("[images.b]\nfrom = \"tar:x.tar\"\n[builds.t]\nimage = \"b\"\nrun = [\"true\"]\nmatrix = { v = [\"a/../../x\"] }\n");
        assert!(
            d.iter().any(|d| d.message.contains("`t-a/../../x`")),
            "{d:?}"
        );
        let long = "x".repeat(64);
        let d = diags(&format!(
            "[images.b]\nfrom = \"tar:x.tar\"\n[builds.{long}]\nimage = \"b\"\nrun = [\"true\"]\n"
        ));
        assert!(
            d.iter().any(|d| d.message.contains("longer than 63")),
            "{d:?}"
        );
        let d = diags("[images.\".hidden\"]\nfrom = \"tar:x.tar\"\n");
        assert!(
            d.iter().any(|d| d.message.contains("image name `.hidden`")),
            "{d:?}"
        );
        let d = diags("[images.b]\nfrom = \"tar:x.tar\"\n[builds.t]\nimage = \"b\"\nrun = [\"true\"]\ncpus = nan\ntimeout = \"18446744073709551615\"\n");
        assert!(
            d.iter().any(|d| d.message.contains("`cpus = NaN`")),
            "{d:?}"
        );
        assert!(
            d.iter().any(|d| d.message.contains("longer than a year")),
            "{d:?}"
        );
    }

    #[test]
    fn a_matrix_too_large_to_expand_is_an_error() {
        // 2^26 targets from 26 two-value axes: expanding them exhausted memory.
        let axes: Vec<String> = (b'a'..=b'z')
            .map(|c| format!("{} = [\"0\", \"1\"]", c as char))
            .collect();
        let d = diags(&format!(
            "[images.b]\nfrom = \"tar:x.tar\"\n[builds.t]\nimage = \"b\"\nrun = [\"true\"]\nmatrix = {{ {} }}\n",
            axes.join(", ")
        ));
        assert!(
            d.iter().any(|d| d.message
                == "build `t`: its matrix makes 67108864 targets, more than 1024"
                && d.line == 6),
            "{d:?}"
        );
        let values: Vec<String> = (0..1000).map(|i| format!("\"{i}\"")).collect();
        let v = values.join(", ");
        let d = diags(&format!(
            "[images.b]\nfrom = \"tar:x.tar\"\n[builds.t]\nimage = \"b\"\nrun = [\"true\"]\nmatrix = {{ a = [{v}], b = [{v}], c = [{v}], d = [{v}], e = [{v}], f = [{v}], g = [{v}] }}\n"
        ));
        assert!(
            d.iter()
                .any(|d| d.message.contains("makes too many targets")),
            "{d:?}"
        );
        let v = (0..1024)
            .map(|i| format!("\"{i}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let p = load_text(&format!(
            "[images.b]\nfrom = \"tar:x.tar\"\n[builds.t]\nimage = \"b\"\nrun = [\"true\"]\nmatrix = {{ a = [{v}] }}\n"
        ))
        .unwrap();
        assert_eq!(p.targets.len(), 1024);
    }

    #[test]
    fn image_cycles_are_errors() {
        let d = diags("[images.a]\nfrom = \"image:b\"\n[images.b]\nfrom = \"image:a\"\n");
        assert!(
            d.iter().any(|d| d.message.contains("cycle: a → b → a")),
            "{d:?}"
        );
    }

    #[test]
    fn placeholders_skip_shell_syntax() {
        assert_eq!(placeholders("a {x} ${y} {z}"), ["x", "z"]);
        assert_eq!(
            substitute("{x}-${x}", &[("x".into(), "1".into())]),
            "1-${x}"
        );
    }
}
