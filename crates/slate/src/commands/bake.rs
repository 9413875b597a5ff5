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
    (cache_from, cache_to): (Option<&str>, Option<&str>),
) -> CmdResult {
    let project = ctx.project()?;
    let layer_cache = project.settings.layer_cache.as_deref();
    let open = |url: &str| super::layercache::Remote::open(url, &ctx.cwd);
    let from = cache_from.or(layer_cache).map(open).transpose()?;
    let to = cache_to.or(layer_cache).map(open).transpose()?;
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
    let ami = match export {
        Some([format, name]) if format == "ami" => {
            one_image(
                images,
                "--export",
                "slate bake builder --export ami builder",
            )?;
            Some(ami_name(name)?)
        }
        _ => None,
    };
    let export = export
        .filter(|_| ami.is_none())
        .map(|ex| {
            one_image(
                images,
                "--export",
                "slate bake builder --export oci builder.oci.tar",
            )?;
            let format = Format::parse(&ex[0]).ok_or_else(|| {
                CliError::usage(format!("unknown export format `{}`", ex[0]))
                    .hint("use `oci`, `tar`, `disk` or `ami`")
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
    bake_images(ctx, &project, &store, &names, from.as_ref())?;
    if let Some(to) = &to {
        push_layers(ctx, &project, &store, &names, to)?;
    }
    if let Some(r) = push_ref {
        let name = &images[0];
        let p = slate_image::export::push_image(&project, &store, name, &r, insecure)
            .map_err(export_error)?;
        ctx.say(&format!(
            "pushed {name} to {r} (manifest {}; {} bytes sent, {} already there)",
            p.digest, p.sent, p.skipped
        ));
    }
    if let Some(ami) = ami {
        export_ami(ctx, &project, &store, &images[0], &ami)?;
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

/// An AMI name as EC2 takes it (3 to 128 of letters, digits and `()[]
/// ./-'@_`), with room for the digest slate appends.
fn ami_name(name: &str) -> Result<String, CliError> {
    let ok = (3..=110).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c));
    if !ok {
        return Err(CliError::usage(format!("`{name}` is not an AMI name")).hint(
            "use 3 to 110 letters, digits and ( ) [ ] . / - ' @ _ (slate appends the image digest)",
        ));
    }
    Ok(name.to_string())
}

/// Registers the baked image `name` as an AMI named `ami-NAME-DIGEST`
/// through `[providers.ec2]`'s region and credentials, unless its digest
/// has one already.
fn export_ami(
    ctx: &Ctx,
    project: &slate_config::Project,
    store: &slate_image::LayerStore,
    name: &str,
    ami_name: &str,
) -> Result<(), CliError> {
    let e = &project.ec2;
    let infra = |what: String| {
        CliError::new(Exit::Infra, what)
            .hint("`slate check` says whether the ec2 credentials, region and endpoint work")
    };
    let client = slate_ec2::client(e.region.as_deref(), e.endpoint.as_deref())
        .map_err(|why| infra(format!("cannot export to EC2: {why}")))?;
    let plan = slate_image::plan::plan_cached(project, name, store)
        .map_err(|err| CliError::from_error(Exit::Usage, &err))?;
    let digest = plan.digest().to_string();
    if let Some(ami) = slate_ec2::ami::find(&client, &digest)
        .map_err(|err| infra(format!("cannot export to EC2: {err}")))?
    {
        ctx.say(&format!(
            "exported {name} as AMI {ami} in {}: registered before for this recipe, nothing uploaded",
            client.region
        ));
        return Ok(());
    }
    let work = store
        .staging(&format!("ami-{digest}"))
        .map_err(|err| CliError::from_error(Exit::Infra, &err))?;
    let disk = work.join("disk.raw");
    let res = (|| {
        slate_image::export::export_raw_disk(project, store, name, &disk, 2048)
            .map_err(export_error)?;
        let full = format!("{ami_name}-{}", &digest[..12]);
        let mut last = 0u64;
        let quiet = ctx.cli.quiet;
        let mut progress = |done: u64, all: u64| {
            // Every 10% of the disk.
            let step = all / 10 + 1;
            if !quiet && done / step > last / step {
                eprintln!(
                    "uploading {name}'s disk: {} of {} MiB",
                    done >> 20,
                    all >> 20
                );
            }
            last = done;
        };
        slate_ec2::ami::export(&client, &disk, name, &full, &digest, &mut progress)
            .map_err(|why| infra(format!("cannot export {name} as an AMI: {why}")))
            .map(|x| (x, full))
    })();
    let _ = fs_err::remove_dir_all(&work);
    let (x, full) = res?;
    ctx.say(&format!(
        "exported {name} as AMI {} (`{full}`) in {}: snapshot {}, {} block(s), {} bytes sent",
        x.ami,
        client.region,
        x.snapshot.as_deref().unwrap_or("-"),
        x.blocks,
        x.bytes
    ));
    Ok(())
}

/// Sends the layers of `names` the layer cache `to` lacks.
fn push_layers(
    ctx: &Ctx,
    project: &slate_config::Project,
    store: &slate_image::LayerStore,
    names: &[String],
    to: &super::layercache::Remote,
) -> Result<(), CliError> {
    let mut keys: Vec<String> = Vec::new();
    for n in names {
        let plan = slate_image::plan::plan_cached(project, n, store)
            .map_err(|e| CliError::from_error(Exit::Usage, &e))?;
        for l in plan.layers {
            if !keys.contains(&l.key) {
                keys.push(l.key);
            }
        }
    }
    let (sent, bytes, there) = to.push(store, &keys).map_err(|why| {
        CliError::new(
            Exit::Infra,
            format!("cannot send layers to the layer cache {}: {why}", to.url()),
        )
        .hint("the layers stay baked here; `slate bake --cache-to URL` sends them later")
    })?;
    ctx.say(&format!(
        "layer cache {}: sent {sent} layer(s), {bytes} bytes; {there} already there",
        to.url()
    ));
    Ok(())
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
    from: Option<&super::layercache::Remote>,
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
        layer_source: from.map(|r| r as &dyn slate_image::LayerSource),
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
    let (baked, cached, pulled) = reporter.bake_counts();
    if pulled > 0 {
        ctx.say(&format!(
            "{baked} layer(s) baked, {pulled} pulled from the layer cache, {cached} cached"
        ));
    } else if baked == 0 {
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
