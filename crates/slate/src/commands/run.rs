//! `slate run IMAGE -- CMD…` and `slate shell TARGET|IMAGE`.

use crate::error::{CliError, CmdResult, Exit};
use crate::{signals, Ctx};
use slate_image::{BakedImage, LayerStore};
use slate_provider::{Cancel, EnvSpec, Environment, ExecOutcome, ExecSpec, Provider};
use slate_run::Orchestrator;
use std::process::ExitCode;

/// The image, baking what is missing (progress on stderr: stdout is the command's).
fn image(
    ctx: &Ctx,
    project: &slate_config::Project,
    store: &LayerStore,
    provider: &slate_sandbox::SandboxProvider,
    name: &str,
) -> Result<BakedImage, CliError> {
    if project.image(name).is_none() {
        return Err(super::unknown(
            "image",
            name,
            project.images.iter().map(|i| i.name.as_str()).collect(),
        ));
    }
    let plan = slate_image::plan::plan_cached(project, name, store)?;
    if let Some(slate_config::BaseSpec::Debian {
        arch: Some(arch), ..
    }) = project.image(name).map(|i| &i.base)
    {
        slate_image::binfmt::ensure(arch)
            .map_err(|why| CliError::new(Exit::Infra, format!("image `{name}`: {why}")))?;
    }
    if plan.layers.iter().all(|l| store.has(&l.key)) {
        return Ok(BakedImage::from_store(&plan, store));
    }
    let reporter = ctx.reporter().on_stderr();
    let layer_source = ctx.layer_source(project)?;
    let orch = Orchestrator {
        project,
        store,
        provider,
        sink: &reporter,
        cancel: Cancel::new(),
        layer_source: layer_source
            .as_ref()
            .map(|r| r as &dyn slate_image::LayerSource),
    };
    let mut res = orch.bake(&[name.to_string()]);
    Ok(res.remove(name).expect("baked what was asked")?)
}

fn exit_of(o: ExecOutcome) -> ExitCode {
    match o {
        ExecOutcome::Exited(c) => ExitCode::from(c as u8),
        ExecOutcome::Signaled(s) => ExitCode::from((128 + s) as u8),
        ExecOutcome::TimedOut | ExecOutcome::Cancelled => Exit::Interrupted.into(),
    }
}

/// Runs `argv` in a fresh environment with the terminal handed over.
fn run_in<P: slate_provider::Provider>(
    provider: &P,
    spec: EnvSpec,
    exec: ExecSpec,
    setup: impl FnOnce(&mut P::Env) -> Result<(), CliError>,
) -> CmdResult {
    let mut env = provider.create(&spec)?;
    let res = setup(&mut env).and_then(|()| {
        signals::ignore_interrupts();
        let mut none = |_: slate_provider::Stream, _: &str| {};
        Ok(env.exec(&exec, &mut none, &Cancel::new())?)
    });
    let destroyed = env.destroy();
    let outcome = res?;
    destroyed?;
    Ok(exit_of(outcome))
}

pub fn run(
    ctx: &Ctx,
    name: &str,
    network: bool,
    provider: Option<&str>,
    command: &[String],
) -> CmdResult {
    let project = ctx.project()?;
    let store = ctx.store_using(&project)?;
    let kind = match provider {
        None => slate_provider::EnvKind::Sandbox,
        Some(p) => slate_config::ProviderKind::parse(p)
            .and_then(slate_run::targets::env_kind)
            .ok_or_else(|| {
                CliError::usage(format!("`slate run` cannot use the `{p}` provider"))
                    .hint("use `--provider sandbox` (the default) or `--provider vm`")
            })?,
    };
    if kind == slate_provider::EnvKind::Vm {
        return run_in_vm(ctx, &project, &store, name, network, command);
    }
    let provider = ctx.sandbox(&store)?;
    let img = image(ctx, &project, &store, &provider, name)?;
    let spec = EnvSpec {
        name: name.to_string(),
        layers: img.layers,
        network,
        host_ca: network && project.settings.host_ca,
        ephemeral: true,
        ..Default::default()
    };
    let exec = ExecSpec {
        argv: command.to_vec(),
        env: img.env,
        cwd: "/".into(),
        interactive: true,
    };
    run_in(&provider, spec, exec, |_| Ok(()))
}

/// The providers with the vm provider set up (and the sandbox, which bakes).
fn vm_providers(
    ctx: &Ctx,
    store: &LayerStore,
    project: &slate_config::Project,
) -> Result<crate::providers::Providers, CliError> {
    ctx.providers(
        store,
        project,
        slate_run::targets::Needs {
            vm: true,
            ssh: false,
            ec2: false,
        },
    )
}

/// `slate run --provider vm`: the command's output streams through the
/// agent (a VM has no terminal to hand over); Ctrl-C stops it and the VM.
fn run_in_vm(
    ctx: &Ctx,
    project: &slate_config::Project,
    store: &LayerStore,
    name: &str,
    network: bool,
    command: &[String],
) -> CmdResult {
    let providers = vm_providers(ctx, store, project)?;
    let img = image(ctx, project, store, &providers.sandbox, name)?;
    let spec = EnvSpec {
        name: name.to_string(),
        layers: img.layers,
        network,
        host_ca: network && project.settings.host_ca,
        kind: slate_provider::EnvKind::Vm,
        ..Default::default()
    };
    let exec = ExecSpec {
        argv: command.to_vec(),
        env: img.env,
        cwd: "/".into(),
        interactive: false,
    };
    let cancel = Cancel::new();
    signals::install(cancel.clone(), || {});
    // A machine that did not come up is retried, as builds retry theirs.
    let mut attempt = 1;
    let mut env = loop {
        match providers.create(&spec) {
            Ok(env) => break env,
            Err(e) if attempt < slate_run::CREATE_ATTEMPTS && !cancel.is_cancelled() => {
                if !ctx.cli.quiet {
                    eprintln!("note: attempt {attempt} failed, retrying: {e}");
                }
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let mut print = |s: slate_provider::Stream, line: &str| match s {
        slate_provider::Stream::Stdout => println!("{line}"),
        slate_provider::Stream::Stderr => eprintln!("{line}"),
    };
    let res = env.exec(&exec, &mut print, &cancel);
    let destroyed = env.destroy();
    let outcome = res?;
    destroyed?;
    Ok(exit_of(outcome))
}

/// What `slate shell` runs: bash as a login shell where the image has it,
/// else sh.
fn login_shell() -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        "if [ -x /bin/bash ]; then exec /bin/bash -l; else exec /bin/sh -l; fi".into(),
    ]
}

pub fn shell(ctx: &Ctx, name: &str) -> CmdResult {
    let project = ctx.project()?;
    let store = ctx.store_using(&project)?;
    let provider = ctx.sandbox(&store)?;
    let argv = login_shell();
    if let Some(t) = project.target(name) {
        if t.provider == slate_config::ProviderKind::Vm {
            return shell_in_vm(ctx, &project, &store, t, argv);
        }
        let img = image(ctx, &project, &store, &provider, &t.image)?;
        let mut vars = img.env.clone();
        vars.extend(t.env.iter().cloned());
        let spec = EnvSpec {
            name: t.name.clone(),
            layers: img.layers,
            network: t.network,
            host_ca: t.network && project.settings.host_ca,
            ..Default::default()
        };
        let exec = ExecSpec {
            argv,
            env: vars,
            cwd: t.workdir.clone(),
            interactive: true,
        };
        return run_in(&provider, spec, exec, |env| {
            put_target_inputs(&project, t, env)
        });
    }
    if project.image(name).is_none() {
        let mut known: Vec<&str> = project.targets.iter().map(|t| t.name.as_str()).collect();
        known.extend(project.images.iter().map(|i| i.name.as_str()));
        return Err(super::unknown("target or image", name, known));
    }
    let img = image(ctx, &project, &store, &provider, name)?;
    let spec = EnvSpec {
        name: name.to_string(),
        layers: img.layers,
        ephemeral: true,
        ..Default::default()
    };
    let exec = ExecSpec {
        argv,
        env: img.env,
        cwd: "/".into(),
        interactive: true,
    };
    run_in(&provider, spec, exec, |_| Ok(()))
}

/// `slate shell TARGET` for a target built in VMs: a fresh VM, the
/// target's inputs in its workdir, a shell on a terminal inside the guest.
fn shell_in_vm(
    ctx: &Ctx,
    project: &slate_config::Project,
    store: &LayerStore,
    t: &slate_config::TargetSpec,
    argv: Vec<String>,
) -> CmdResult {
    let providers = vm_providers(ctx, store, project)?;
    let img = image(ctx, project, store, &providers.sandbox, &t.image)?;
    let mut vars = img.env.clone();
    vars.extend(t.env.iter().cloned());
    let spec = EnvSpec {
        name: t.name.clone(),
        layers: img.layers,
        network: t.network,
        host_ca: t.network && project.settings.host_ca,
        kind: slate_provider::EnvKind::Vm,
        ..Default::default()
    };
    let exec = ExecSpec {
        argv,
        env: vars,
        cwd: t.workdir.clone(),
        interactive: true,
    };
    run_in(&providers, spec, exec, |env| {
        put_target_inputs(project, t, env)
    })
}

/// A target's inputs into its workdir (which is made even without any).
fn put_target_inputs(
    project: &slate_config::Project,
    t: &slate_config::TargetSpec,
    env: &mut impl slate_provider::Environment,
) -> Result<(), CliError> {
    let skip = vec![
        project.dir.join(".slate"),
        project.dir.join(&project.settings.artifacts),
    ];
    for input in &t.inputs {
        let set = slate_run::inputs::collect(input, &t.exclude, &skip)
            .map_err(|e| CliError::from_error(Exit::Infra, &e))?;
        env.put(&set.base, &set.entries, &t.workdir)?;
    }
    env.put(std::path::Path::new("/"), &[], &t.workdir)?;
    Ok(())
}

/// `slate shell --keep RUN/TARGET`: a shell in a kept environment as it was
/// at the failure; what the shell changes is thrown away.
pub fn shell_kept(ctx: &Ctx, id: &str) -> CmdResult {
    let store = ctx.store()?;
    let (dir, kept) = slate_run::kept::find(store.root(), id).map_err(|why| {
        CliError::usage(why)
            .hint("`slate build --keep-failed` keeps the environments of failed targets")
    })?;
    if let Some(gone) = kept.layers.iter().find(|l| !l.is_dir()) {
        return Err(CliError::usage(format!(
            "`{id}` cannot be entered: a layer of its image is gone (`{}`)",
            gone.display()
        ))
        .hint(format!("`slate bake {}` bakes it again", kept.image)));
    }
    let exec = ExecSpec {
        argv: login_shell(),
        env: kept.env.clone(),
        cwd: kept.workdir.clone(),
        interactive: true,
    };
    if kept.vm {
        return shell_kept_vm(ctx, &store, &dir, &kept, exec);
    }
    let provider = ctx.sandbox(&store)?;
    let mut layers = kept.layers.clone();
    // What the build wrote, on top of its image, read-only: the shell
    // writes to a fresh layer above it.
    layers.push(dir.join("upper"));
    let spec = EnvSpec {
        name: kept.target.clone(),
        layers,
        network: kept.network,
        ..Default::default()
    };
    run_in(&provider, spec, exec, |_| Ok(()))
}

/// A shell in a VM booted from a kept VM's disk (over its image's base
/// disk); what the shell writes goes to a throwaway overlay.
fn shell_kept_vm(
    ctx: &Ctx,
    store: &LayerStore,
    dir: &std::path::Path,
    kept: &slate_run::kept::Kept,
    exec: ExecSpec,
) -> CmdResult {
    let project = ctx
        .project()
        .or_else(|_| slate_config::load(&kept.project, None).map_err(CliError::from))?;
    let providers = vm_providers(ctx, store, &project)?;
    let spec = EnvSpec {
        name: kept.target.clone(),
        layers: kept.layers.clone(),
        network: kept.network,
        kind: slate_provider::EnvKind::Vm,
        start_disk: Some(dir.join("disk.qcow2")),
        ..Default::default()
    };
    run_in(&providers, spec, exec, |_| Ok(()))
}
