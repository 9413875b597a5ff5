//! `slate bake`.

use crate::error::{CliError, CmdResult, Exit};
use crate::Ctx;
use slate_image::export::{ExportError, Exported, Format};
use slate_run::Orchestrator;
use slate_store::events::{Event, EventKind, EventSink, Tee};

pub fn bake(
    ctx: &Ctx,
    images: &[String],
    export: Option<&[String]>,
    push: Option<&str>,
    insecure: bool,
) -> CmdResult {
    let project = ctx.project()?;
    let push_ref = push
        .map(|r| {
            one_image(
                images,
                "--push",
                "slate bake builder --push registry.example:5000/team/builder:v1",
            )?;
            slate_image::registry::Reference::parse(r)
                .map_err(|e| CliError::from_error(Exit::Usage, &e))
        })
        .transpose()?;
    let export = export
        .map(|ex| {
            one_image(
                images,
                "--export",
                "slate bake builder --export oci builder.oci.tar",
            )?;
            let format = Format::parse(&ex[0]).ok_or_else(|| {
                CliError::usage(format!("unknown export format `{}`", ex[0]))
                    .hint("use `oci`, `tar` or `disk`")
            })?;
            Ok::<_, CliError>((format, ctx.cwd.join(&ex[1])))
        })
        .transpose()?;
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
    let store = ctx.store_for(&project)?;
    bake_images(ctx, &project, &store, &names)?;
    if let Some(r) = push_ref {
        let name = &images[0];
        let p = slate_image::export::push_image(&project, &store, name, &r, insecure)
            .map_err(export_error)?;
        ctx.say(&format!(
            "pushed {name} to {r} (manifest {}; {} bytes sent, {} already there)",
            p.digest, p.sent, p.skipped
        ));
    }
    if let Some((format, dest)) = export {
        let name = &images[0];
        let said = match slate_image::export::export_image(&project, &store, name, format, &dest).map_err(export_error)? {
            Exported::Oci { digest } => format!("as OCI to {} (manifest {digest}, ref name `{name}`)", dest.display()),
            Exported::Tar => format!("as a rootfs tarball to {}", dest.display()),
            Exported::Disk { kernel_files } if kernel_files.is_empty() => format!(
                "as a qcow2 disk (ext4) to {} (no kernel in the image: set `vm = true` to install one)",
                dest.display()
            ),
            Exported::Disk { kernel_files } => format!(
                "as a qcow2 disk (ext4) to {}; kernel: {}",
                dest.display(),
                kernel_files.iter().map(|k| k.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        };
        ctx.say(&format!("exported {name} {said}"));
    }
    Ok(Exit::Ok.into())
}

fn one_image(images: &[String], flag: &str, example: &str) -> Result<(), CliError> {
    if images.len() == 1 {
        return Ok(());
    }
    Err(CliError::usage(format!("`{flag}` needs exactly one image"))
        .hint(format!("e.g. `{example}`")))
}

/// Bakes `names`, logging to a run folder like builds do (bake-IMAGE.log).
fn bake_images(
    ctx: &Ctx,
    project: &slate_config::Project,
    store: &slate_image::LayerStore,
    names: &[String],
) -> Result<(), CliError> {
    let provider = ctx.providers(store, project, Default::default())?;
    let reporter = ctx.reporter();
    let run = super::start_run(project, || eprintln!("cancelling the bake"))?;
    let tee = Tee(vec![&run.recorder, &reporter]);
    let orch = Orchestrator {
        project,
        store,
        provider: &provider,
        sink: &tee,
        cancel: run.cancel.clone(),
    };
    let results = orch.bake(names);
    run.recorder.event(&Event::new(
        None,
        EventKind::RunFinished {
            succeeded: 0,
            failed: 0,
        },
    ));
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
                first_err.get_or_insert(e.into());
            }
        }
    }
    let (baked, cached) = reporter.bake_counts();
    if baked == 0 {
        ctx.say(&format!("nothing to bake: all {cached} layers cached"));
    } else {
        ctx.say(&format!("{baked} layer(s) baked, {cached} cached"));
    }
    first_err.map_or(Ok(()), Err)
}

fn export_error(e: ExportError) -> CliError {
    match e {
        ExportError::Plan(e) => e.into(),
        ExportError::Write { ref path, .. } => {
            let hint = format!("could not write `{}`", path.display());
            CliError::from_error(Exit::Infra, &e).hint(hint)
        }
        ExportError::Push { .. } => CliError::from_error(Exit::Infra, &e).hint(
            "check the registry address, and credentials in SLATE_REGISTRY_USER/SLATE_REGISTRY_PASSWORD or ~/.docker/config.json",
        ),
        e => CliError::from_error(Exit::Infra, &e),
    }
}
