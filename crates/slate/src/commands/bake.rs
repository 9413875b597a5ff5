//! `slate bake`.

use crate::error::{CliError, CmdResult, Exit};
use crate::{signals, Ctx};
use slate_provider::Cancel;
use slate_run::Orchestrator;
use slate_store::events::{Event, EventKind, EventSink, Tee};
use slate_store::record::RunRecorder;

pub fn bake(
    ctx: &Ctx,
    images: &[String],
    export: Option<&[String]>,
    push: Option<&str>,
    insecure: bool,
) -> CmdResult {
    let project = ctx.project()?;
    let push_ref = match push {
        Some(r) => {
            if images.len() != 1 {
                return Err(CliError::usage("`--push` needs exactly one image").hint(
                    "e.g. `slate bake builder --push registry.example:5000/team/builder:v1`",
                ));
            }
            Some(
                slate_image::registry::Reference::parse(r)
                    .map_err(|e| CliError::from_error(Exit::Usage, &e))?,
            )
        }
        None => None,
    };
    if let Some(ex) = export {
        if images.len() != 1 {
            return Err(CliError::usage("`--export` needs exactly one image")
                .hint("e.g. `slate bake builder --export oci builder.oci.tar`"));
        }
        if !["oci", "tar", "disk"].contains(&ex[0].as_str()) {
            return Err(
                CliError::usage(format!("unknown export format `{}`", ex[0]))
                    .hint("use `oci`, `tar` or `disk`"),
            );
        }
    }
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
    let provider = ctx.sandbox(&store)?;
    let reporter = ctx.reporter();
    // Bake logs go to a run folder, like build logs: bake-<image>.log.
    let run_id = super::new_run_id();
    let recorder = RunRecorder::create(
        &super::runs_dir(&project),
        &run_id,
        std::env::args().collect(),
    )
    .map_err(|e| CliError::from_error(Exit::Infra, &e))?;
    let tee = Tee(vec![&recorder, &reporter]);
    let cancel = Cancel::new();
    signals::install(cancel.clone(), || eprintln!("cancelling the bake"));
    let orch = Orchestrator {
        project: &project,
        store: &store,
        provider: &provider,
        sink: &tee,
        cancel,
    };
    let results = orch.bake(&names);
    recorder.event(&Event::new(
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
                if first_err.is_none() {
                    first_err = Some(e.into());
                }
            }
        }
    }
    let (baked, cached) = reporter.bake_counts();
    if baked == 0 {
        ctx.say(&format!("nothing to bake: all {cached} layers cached"));
    } else {
        ctx.say(&format!("{baked} layer(s) baked, {cached} cached"));
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    if let Some(r) = push_ref {
        let name = &images[0];
        let plan = slate_image::plan(&project, name)?;
        let image = slate_image::BakedImage::from_store(&plan, &store);
        let layout = store
            .staging(&format!("push-{}", plan.digest()))
            .map_err(|e| CliError::from_error(Exit::Infra, &e))?;
        let arch = project
            .image(name)
            .and_then(|i| i.arch())
            .map(str::to_string);
        let res = slate_image::export::export_oci(&plan, &image, arch.as_deref(), &layout.join("oci"), slate_image::export::clamp_from_env())
            .map_err(|e| CliError::from_error(Exit::Infra, &e))
            .and_then(|_| {
                slate_image::registry::Client::new(&r, insecure)
                    .push_layout(&layout.join("oci"))
                    .map_err(|e| CliError::from_error(Exit::Infra, &e).hint("check the registry address, and credentials in SLATE_REGISTRY_USER/SLATE_REGISTRY_PASSWORD or ~/.docker/config.json"))
            });
        let _ = std::fs::remove_dir_all(&layout);
        let (digest, sent, skipped) = res?;
        ctx.say(&format!(
            "pushed {name} to {r} (manifest {digest}; {sent} bytes sent, {skipped} already there)"
        ));
    }
    if let Some(ex) = export {
        let name = &images[0];
        let plan = slate_image::plan(&project, name)?;
        let image = slate_image::BakedImage::from_store(&plan, &store);
        let dest = ctx.cwd.join(&ex[1]);
        let clamp = slate_image::export::clamp_from_env();
        let arch = project
            .image(name)
            .and_then(|i| i.arch())
            .map(str::to_string);
        let fail = |e: std::io::Error| {
            CliError::from_error(Exit::Infra, &e)
                .hint(format!("could not write `{}`", dest.display()))
        };
        if ex[0] == "oci" {
            let digest =
                slate_image::export::export_oci(&plan, &image, arch.as_deref(), &dest, clamp)
                    .map_err(fail)?;
            ctx.say(&format!(
                "exported {name} as OCI to {} (manifest {digest}, ref name `{name}`)",
                dest.display()
            ));
        } else if ex[0] == "disk" {
            let vm = project.image(name).is_some_and(|i| i.vm);
            let kernel = slate_image::export::export_disk(&image, &dest, clamp).map_err(fail)?;
            if vm && kernel.is_empty() {
                return Err(CliError::new(
                    Exit::Infra,
                    format!("image `{name}` is marked `vm = true` but has no kernel in /boot"),
                ));
            }
            let beside: Vec<String> = kernel.iter().map(|k| k.display().to_string()).collect();
            ctx.say(&format!(
                "exported {name} as a qcow2 disk (ext4) to {}{}",
                dest.display(),
                if beside.is_empty() {
                    " (no kernel in the image: set `vm = true` to install one)".to_string()
                } else {
                    format!("; kernel: {}", beside.join(", "))
                }
            ));
        } else {
            slate_image::export::export_tar(&image, &dest, clamp).map_err(fail)?;
            ctx.say(&format!(
                "exported {name} as a rootfs tarball to {}",
                dest.display()
            ));
        }
    }
    Ok(Exit::Ok.into())
}
