//! slate: arguments → settings → one command. Printing happens here only.

mod cli;
mod commands;
mod error;
mod providers;
mod report;
mod signals;

use clap::Parser;
use cli::{Cli, Color, Command, LogFormat, Progress};
use error::{CliError, Exit, Result};
use slate_config::Project;
use slate_image::LayerStore;
use slate_run::targets::Needs;
use slate_sandbox::SandboxProvider;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// What every command may need, made on demand.
pub struct Ctx {
    pub cli: Cli,
    pub cwd: PathBuf,
    /// `--log-format`, else the config's `[settings.logs] format`.
    log_format: LogFormat,
}

impl Ctx {
    pub fn project(&self) -> Result<Project> {
        Ok(slate_config::load(&self.cwd, self.cli.file.as_deref())?)
    }

    pub fn store(&self) -> Result<LayerStore> {
        let root = LayerStore::default_root();
        let store = LayerStore::open(&root).map_err(|e| {
            CliError::from_error(Exit::Infra, &e).hint(format!(
                "slate keeps its cache in `{}`; set SLATE_CACHE to use another folder",
                root.display()
            ))
        })?;
        Ok(store)
    }

    /// The cache, with `project` registered in it as a root (with the
    /// layers its images use now): `slate gc` run in another project keeps
    /// what this one uses. For commands that bake.
    pub fn store_for(&self, project: &Project) -> Result<LayerStore> {
        let store = self.store()?;
        slate_image::gc::register(&store, project);
        Ok(store)
    }

    /// The cache, with `project` registered if it is not yet: for commands
    /// that use layers (`run`, `shell`), whose start-up time counts.
    pub fn store_using(&self, project: &Project) -> Result<LayerStore> {
        let store = self.store()?;
        slate_image::gc::ensure_registered(&store, project);
        Ok(store)
    }

    pub fn sandbox(&self, store: &LayerStore) -> Result<SandboxProvider> {
        SandboxProvider::probe().map_err(|why| {
            CliError::new(
                Exit::Infra,
                format!("the sandbox provider cannot run here: {why}"),
            )
            .hint("`slate check` shows what this host supports")
        })?;
        Ok(SandboxProvider::new(store.envs_dir()))
    }

    /// The sandbox, and the vm and ssh providers when `needs` says a
    /// target asks for them.
    pub fn providers(
        &self,
        store: &LayerStore,
        project: &Project,
        needs: Needs,
    ) -> Result<providers::Providers> {
        let vm = needs.vm;
        if let Some(fake) = providers::fake_from_env().map_err(CliError::usage)? {
            eprintln!(
                "warning: {} is set: commands are scripted, nothing runs",
                providers::FAKE_VAR
            );
            return Ok(providers::Providers {
                sandbox: SandboxProvider::new(store.envs_dir()),
                vm: None,
                ssh: None,
                ec2: None,
                fake: Some(fake),
            });
        }
        // A provider the config cannot set up is refused before the host is
        // asked what it can do.
        let ssh = if needs.ssh {
            Some(self.ssh_provider(store.root(), project)?)
        } else {
            None
        };
        let ec2 = if needs.ec2 {
            let ec2 = self.ec2_provider(store, project)?;
            Some(ec2)
        } else {
            None
        };
        let sandbox = self.sandbox(store)?;
        let vm = if vm {
            if project.vm.init != "slate" {
                return Err(CliError::usage(format!(
                    "`init = \"{}\"` under [providers.vm] is not available in this version of slate",
                    project.vm.init
                ))
                .hint("use `init = \"slate\"` (the default): slate's agent boots the machine"));
            }
            let settings = slate_vm::VmSettings {
                accel: slate_vm::Accel::parse(&project.vm.accel).unwrap_or(slate_vm::Accel::Auto),
                snapshots: project.vm.snapshots,
                ..Default::default()
            };
            let vm = slate_vm::VmProvider::new(store.root().join("vm"), store.envs_dir(), settings)
                .map_err(|e| {
                    CliError::from_error(Exit::Infra, &e)
                        .hint("`slate check` shows what this host supports")
                })?;
            let quiet = self.cli.quiet;
            vm.on_note(move |m| {
                if !quiet {
                    eprintln!("note: {m}");
                }
            });
            Some(vm)
        } else {
            None
        };
        Ok(providers::Providers {
            sandbox,
            vm,
            ssh,
            ec2,
            fake: None,
        })
    }

    /// The ec2 provider as `[providers.ec2]` says, its instances' time to
    /// live the project's longest target timeout and a margin; `image:NAME`
    /// as the AMI is the one `slate bake NAME --export ami` registered.
    pub fn ec2_provider(
        &self,
        store: &LayerStore,
        project: &Project,
    ) -> Result<slate_ec2::Ec2Provider> {
        let e = &project.ec2;
        let unusable = |why: String| {
            CliError::usage(format!("the ec2 provider cannot be used: {why}")).hint(
                "set `ami`, `region` (or AWS_REGION) and credentials (AWS_ACCESS_KEY_ID, a profile, or an instance role); `slate check` says what is missing",
            )
        };
        let mut ami = e.ami.clone();
        if let Some(image) = e.ami.strip_prefix("image:") {
            let plan = slate_image::plan::plan_cached(project, image, store)
                .map_err(|err| unusable(format!("`ami = \"{}\"`: {err}", e.ami)))?;
            let client =
                slate_ec2::client(e.region.as_deref(), e.endpoint.as_deref()).map_err(unusable)?;
            ami = slate_ec2::ami::find(&client, plan.digest())
                .map_err(|err| unusable(err.to_string()))?
                .ok_or_else(|| {
                    CliError::usage(format!(
                        "the ec2 provider cannot be used: image `{image}` (digest {}) has no AMI yet",
                        &plan.digest()[..12]
                    ))
                    .hint(format!("register one with `slate bake {image} --export ami {image}`"))
                })?;
        }
        // Every instance expires after the longest a target may take, the
        // boot and a margin for inputs and artifacts.
        let longest = project
            .targets
            .iter()
            .map(|t| t.timeout.unwrap_or(slate_ec2::DEFAULT_TARGET_TTL))
            .max()
            .unwrap_or(slate_ec2::DEFAULT_TARGET_TTL);
        let settings = slate_ec2::Ec2Settings {
            region: e.region.clone(),
            endpoint: e.endpoint.clone(),
            ami,
            instance_type: e.instance_type.clone(),
            subnet: e.subnet.clone(),
            security_group: e.security_group.clone(),
            key_name: e.key_name.clone(),
            spot: e.spot,
            max_instances: e.max_instances,
            user: e.user.clone(),
            identity: e.identity.clone(),
            ssh_port: e.ssh_port,
            address: slate_ec2::AddressKind::parse(&e.address).unwrap_or_default(),
            ttl: longest + e.boot_timeout + slate_ec2::MARGIN,
            boot_timeout: e.boot_timeout,
        };
        let ec2 = slate_ec2::Ec2Provider::new(settings, store.root()).map_err(unusable)?;
        let quiet = self.cli.quiet;
        ec2.on_note(move |m| {
            if !quiet {
                eprintln!("note: {m}");
            }
        });
        Ok(ec2)
    }

    /// The layer cache of `[settings] layer_cache`, to fetch missing layers
    /// from, when there is one.
    pub fn layer_source(&self, project: &Project) -> Result<Option<commands::layercache::Remote>> {
        project
            .settings
            .layer_cache
            .as_deref()
            .map(|url| commands::layercache::Remote::open(url, &project.dir))
            .transpose()
    }

    /// The ssh provider over `[providers.ssh]`'s hosts, shipping layers
    /// from the store at `layers_root`.
    pub fn ssh_provider(
        &self,
        layers_root: &std::path::Path,
        project: &Project,
    ) -> Result<slate_ssh::SshProvider> {
        let s = &project.ssh;
        let settings = slate_ssh::SshSettings {
            hosts: s.hosts.clone(),
            user: s.user.clone(),
            identity: s.identity.clone(),
            known_hosts: if s.known_hosts == "accept-new" {
                slate_ssh::KnownHosts::AcceptNew
            } else {
                slate_ssh::KnownHosts::Strict
            },
            known_hosts_file: s.known_hosts_file.clone(),
            slots: s.slots,
            shared_masters: true,
        };
        let ssh = slate_ssh::SshProvider::new(settings, layers_root).map_err(|why| {
            CliError::usage(format!("the ssh provider cannot be used: {why}")).hint(
                "list the build hosts under [providers.ssh] `hosts = [\"host\", \"host:port\"]`",
            )
        })?;
        let quiet = self.cli.quiet;
        ssh.on_note(move |m| {
            if !quiet {
                eprintln!("note: {m}");
            }
        });
        Ok(ssh)
    }

    pub fn color(&self) -> bool {
        match self.cli.color {
            Color::Always => true,
            Color::Never => false,
            Color::Auto => {
                std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
            }
        }
    }

    /// `--log-format`, else the config's `[settings.logs] format`, else text.
    pub fn log_format(&self) -> LogFormat {
        self.log_format
    }

    pub fn reporter(&self) -> report::Reporter {
        let mode = match self.log_format() {
            LogFormat::Json => report::Mode::Json,
            LogFormat::Text if self.cli.quiet => report::Mode::Plain,
            LogFormat::Text if self.cli.progress == Progress::Live => report::Mode::Live,
            LogFormat::Text
                if self.cli.progress == Progress::Auto && std::io::stdout().is_terminal() =>
            {
                report::Mode::Live
            }
            LogFormat::Text => report::Mode::Plain,
        };
        report::Reporter::new(mode, self.cli.quiet, self.color())
    }

    /// Prints a line of the command's own output (not progress).
    pub fn say(&self, line: &str) {
        if !self.cli.quiet && self.log_format() == LogFormat::Text {
            println!("{line}");
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cwd = match &cli.dir {
        Some(d) => d.clone(),
        None => std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
    };
    let cwd = fs_err::canonicalize(&cwd).unwrap_or(cwd);
    let log_format = cli.log_format.unwrap_or_else(|| {
        // A config that does not load is reported by the command itself.
        match slate_config::load(&cwd, cli.file.as_deref())
            .ok()
            .and_then(|p| p.settings.log_format)
            .as_deref()
        {
            Some("json") => LogFormat::Json,
            _ => LogFormat::Text,
        }
    });
    let ctx = Ctx {
        cli,
        cwd,
        log_format,
    };
    let color = ctx.color()
        || (matches!(ctx.cli.color, Color::Auto)
            && std::io::stderr().is_terminal()
            && std::env::var_os("NO_COLOR").is_none());
    let res = match &ctx.cli.command {
        Command::Build(args) => commands::build::build(&ctx, args),
        Command::Up { target, provider } => commands::build::up(&ctx, target, provider.clone()),
        Command::Bake {
            images,
            export,
            push,
            insecure,
            cache_from,
            cache_to,
        } => commands::bake::bake(
            &ctx,
            images,
            export.as_deref(),
            push.as_deref(),
            *insecure,
            (cache_from.as_deref(), cache_to.as_deref()),
        ),
        Command::Images => commands::images::images(&ctx),
        Command::Gc { remote: true, .. } => commands::images::gc_remote(&ctx),
        Command::Gc {
            all,
            older_than,
            keep_runs,
            dry_run,
            remote: false,
        } => commands::images::gc(
            &ctx,
            commands::images::GcArgs {
                all: *all,
                older_than: older_than.as_deref(),
                keep_runs: *keep_runs,
                dry_run: *dry_run,
            },
        ),
        Command::Shell { name, keep } => match (name, keep) {
            (_, Some(id)) => commands::run::shell_kept(&ctx, id),
            (Some(name), None) => commands::run::shell(&ctx, name),
            (None, None) => unreachable!("clap requires a name or --keep"),
        },
        Command::Run {
            image,
            network,
            provider,
            command,
        } => commands::run::run(&ctx, image, *network, provider.as_deref(), command),
        Command::Verify { target } => commands::verify::verify(&ctx, target),
        Command::Publish {
            run,
            to,
            endpoint,
            jobs,
        } => commands::publish::publish(
            &ctx,
            run.as_deref(),
            to.as_deref(),
            endpoint.as_deref(),
            Some(*jobs),
        ),
        Command::Provenance(cli::ProvenanceCommand::Keygen { path }) => {
            commands::provenance::keygen(&ctx, path)
        }
        Command::Provenance(cli::ProvenanceCommand::Verify {
            artifact,
            key,
            envelope,
        }) => commands::provenance::verify(&ctx, artifact, key, envelope.as_deref()),
        Command::Check => commands::check::check(&ctx),
        Command::Init => commands::check::init(&ctx),
        Command::Completions { shell } => commands::check::completions(*shell),
        Command::Man => commands::check::man(),
        Command::Remote(what) => commands::remote::remote(what),
        Command::Runs => commands::runs::runs(&ctx),
        Command::Report { run, output } => {
            commands::runs::report(&ctx, run.as_deref(), output.as_deref())
        }
        Command::Logs {
            ship: Some(run),
            to,
            ..
        } => commands::runs::ship(&ctx, run, to),
        Command::Logs {
            target,
            run,
            follow,
            ..
        } => commands::runs::logs(
            &ctx,
            target.as_deref().expect("clap requires a target"),
            run.as_deref(),
            *follow,
        ),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            e.print(color);
            e.exit.into()
        }
    }
}
