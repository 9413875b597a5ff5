//! `slate check`, `slate init`, and what describes slate itself:
//! `slate completions SHELL` and `slate man`.

use crate::error::{CliError, CmdResult, Exit};
use crate::Ctx;

pub fn check(ctx: &Ctx) -> CmdResult {
    let project = ctx.project()?;
    println!("config: {} is valid", project.file.display());
    println!(
        "  images: {}",
        project
            .images
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  targets: {}",
        project
            .targets
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("providers:");
    match slate_sandbox::SandboxProvider::probe() {
        Ok(()) => println!(
            "  sandbox: works (namespaces, overlayfs, {}; builds without capabilities; cgroups {:?})",
            if slate_sandbox::has_seccomp_filter() {
                "seccomp filter"
            } else {
                "no seccomp filter on this architecture"
            },
            slate_sandbox::cgroup_version()
        ),
        Err(why) => println!("  sandbox: unavailable: {why}"),
    }
    match slate_vm::probe() {
        Ok(()) => println!(
            "  vm: works (QEMU, PVH boot; accel = \"{}\": KVM when a probe guest runs under it, else TCG)",
            project.vm.accel
        ),
        Err(why) => println!("  vm: unavailable: {why}"),
    }
    check_ssh(ctx, &project);
    check_ec2(ctx, &project);
    println!("tools:");
    for (tool, what) in [
        ("mmdebstrap", "bootstraps debian: images"),
        ("debootstrap", "bootstraps debian: images (slower fallback)"),
        ("xz", "unpacks tar: images in .xz"),
        ("zstd", "unpacks tar: images in .zst"),
        ("bzip2", "unpacks tar: images in .bz2"),
    ] {
        let found = slate_image::which(tool);
        println!(
            "  {tool}: {} ({what})",
            if found { "found" } else { "missing" }
        );
    }
    let mut arches: Vec<&str> = project.images.iter().filter_map(|i| i.arch()).collect();
    arches.sort_unstable();
    arches.dedup();
    println!("architectures:");
    println!("  {}: this host's own", slate_image::binfmt::host_arch());
    for arch in arches {
        println!("  {}", slate_image::binfmt::describe(arch));
    }
    let uses_debian = project
        .images
        .iter()
        .any(|i| matches!(i.base, slate_config::BaseSpec::Debian { .. }));
    if uses_debian && !slate_image::which("mmdebstrap") && !slate_image::which("debootstrap") {
        return Err(CliError::new(
            Exit::Infra,
            "images start from `debian:` but no bootstrap tool is installed",
        )
        .hint("apt-get install mmdebstrap"));
    }
    Ok(Exit::Ok.into())
}

/// Whether each ssh host answers and can make environments.
fn check_ssh(ctx: &Ctx, project: &slate_config::Project) {
    if project.ssh.hosts.is_empty() {
        println!(
            "  ssh: no hosts (name them under [providers.ssh] `hosts = [\"host\", \"host:port\"]`)"
        );
        return;
    }
    let root = slate_image::LayerStore::default_root();
    match ctx.ssh_provider(&root, project) {
        Err(e) => println!("  ssh: unusable: {}", e.message),
        Ok(ssh) => {
            println!(
                "  ssh: {} host(s), {} slot(s) each",
                project.ssh.hosts.len(),
                project.ssh.slots
            );
            for (host, state) in ssh.check() {
                match state {
                    Ok(what) => println!("    {host}: works ({what})"),
                    Err(why) => println!("    {host}: unusable: {why}"),
                }
            }
        }
    }
}

/// Whether the ec2 provider's credentials, region and AMI work.
fn check_ec2(ctx: &Ctx, project: &slate_config::Project) {
    if !project.ec2.configured {
        println!("  ec2: not set up (name an `ami` under [providers.ec2])");
        return;
    }
    let made = ctx
        .store_for(project)
        .and_then(|store| ctx.ec2_provider(&store, project));
    match made {
        Err(e) => println!(
            "  ec2: unusable: {}{}",
            e.message
                .strip_prefix("the ec2 provider cannot be used: ")
                .unwrap_or(&e.message),
            // What to do about an AMI not yet registered.
            e.hint
                .as_deref()
                .filter(|h| h.contains("--export ami"))
                .map(|h| format!(" ({h})"))
                .unwrap_or_default()
        ),
        Ok(ec2) => match ec2.check() {
            Ok(what) => println!("  ec2: works ({what})"),
            Err(why) => println!("  ec2: unusable: {why}"),
        },
    }
}

pub fn init(ctx: &Ctx) -> CmdResult {
    let path = ctx.cwd.join(slate_config::FILE_NAME);
    if path.exists() {
        return Err(
            CliError::usage(format!("`{}` already exists", path.display()))
                .hint("edit it, or remove it first to start over"),
        );
    }
    fs_err::write(&path, slate_config::STARTER)
        .map_err(|e| CliError::from_error(Exit::Usage, &e))?;
    ctx.say(&format!(
        "wrote {}; next: `slate check`, then `slate build`",
        path.display()
    ));
    Ok(Exit::Ok.into())
}

/// The completion script for `shell`, made from the command-line definition.
pub fn completions(shell: clap_complete::Shell) -> CmdResult {
    let mut cmd = <crate::cli::Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cmd, "slate", &mut std::io::stdout());
    Ok(Exit::Ok.into())
}

/// The manual page (roff), made from the command-line definition: the
/// options, and a section per command.
pub fn man() -> CmdResult {
    let cmd = <crate::cli::Cli as clap::CommandFactory>::command();
    let mut out = std::io::stdout();
    let io = |e: std::io::Error| CliError::from_error(Exit::Infra, &e);
    clap_mangen::Man::new(cmd.clone())
        .render(&mut out)
        .map_err(io)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("slate-{}", sub.get_name());
        let page = clap_mangen::Man::new(sub.clone().name(name));
        page.render_name_section(&mut out).map_err(io)?;
        page.render_synopsis_section(&mut out).map_err(io)?;
        page.render_description_section(&mut out).map_err(io)?;
        page.render_options_section(&mut out).map_err(io)?;
    }
    Ok(Exit::Ok.into())
}
