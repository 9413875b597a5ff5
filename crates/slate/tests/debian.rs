//! The quickstart example for real: Debian bootstrapped from the archive,
//! packages installed, a .deb built per release. Needs root and network to
//! the Debian archive (required in CI). Its layer cache lives under the build
//! folder, so later runs reuse what earlier runs baked.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn required() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tool = ["mmdebstrap", "debootstrap"].iter().any(|t| {
        ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(t).exists())
    });
    if !(root && tool) {
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs root and mmdebstrap, and CI must run it"
        );
        eprintln!("SKIPPED: needs root and mmdebstrap (or debootstrap)");
        return false;
    }
    true
}

fn copy_example(to: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart");
    std::fs::create_dir_all(to).unwrap();
    for f in [
        "slate.toml",
        "greet.c",
        "Makefile",
        "build.sh",
        ".gitignore",
    ] {
        std::fs::copy(src.join(f), to.join(f)).unwrap();
    }
}

#[test]
fn root_debian_quickstart_builds_real_packages() {
    if !required() {
        return;
    }
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("slate-cache");
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("quickstart");
    copy_example(&project);
    let slate = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_slate"))
            .arg("-C")
            .arg(&project)
            .args(args)
            .env("SLATE_CACHE", &cache)
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    };

    let o = slate(&["build"]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{out}");
    assert!(out.contains("[greet-bookworm] hello, slate"), "{out}");
    let arts = project.join("artifacts");
    let check = Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(&arts)
        .output()
        .unwrap();
    assert!(check.status.success());
    let checked = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(
        checked.contains("greet-bookworm/greet_1.0.0+bookworm_amd64.deb: OK"),
        "{checked}"
    );
    assert!(
        checked.contains("greet-trixie/greet_1.0.0+trixie_amd64.deb: OK"),
        "{checked}"
    );
    // The package is a real .deb: the host's dpkg reads it.
    let info = Command::new("dpkg-deb")
        .arg("--field")
        .arg(arts.join("greet-trixie/greet_1.0.0+trixie_amd64.deb"))
        .arg("Version")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&info.stdout).trim(), "1.0.0+trixie");
    // Built with each release's own compiler.
    let desc = |t: &str| {
        let o = Command::new("dpkg-deb")
            .arg("--field")
            .arg(arts.join(t))
            .arg("Description")
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    assert!(desc("greet-bookworm/greet_1.0.0+bookworm_amd64.deb").contains("gcc (Debian 12."));
    assert!(!desc("greet-trixie/greet_1.0.0+trixie_amd64.deb").contains("gcc (Debian 12."));

    // Built twice in two fresh environments, the package is byte for byte the same.
    let v = slate(&["verify", "greet-bookworm"]);
    let vout = format!(
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert_eq!(v.status.code(), Some(0), "{vout}");
    assert!(
        vout.contains("greet-bookworm: reproducible: 1 artifact(s) identical"),
        "{vout}"
    );

    // Published to a real S3-compatible server and fetched back by an
    // independent client, the packages still match SHA256SUMS.
    let w = tempfile::tempdir().unwrap();
    let s3 = common::S3Server::start(w.path(), "releases").expect("s3s-fs (CI must run this)");
    let p = Command::new(env!("CARGO_BIN_EXE_slate"))
        .arg("-C")
        .arg(&project)
        .args(["publish", "--to", "s3://releases/greet"])
        .envs(s3.env())
        .output()
        .unwrap();
    let pout = format!(
        "{}{}",
        String::from_utf8_lossy(&p.stdout),
        String::from_utf8_lossy(&p.stderr)
    );
    assert!(p.status.success(), "{pout}");
    let latest = s3.aws(&["s3", "cp", "s3://releases/greet/latest", "-"]);
    let run = String::from_utf8_lossy(&latest.stdout).trim().to_string();
    let fetched = w.path().join("fetched");
    s3.fetch_run(&format!("s3://releases/greet/{run}"), &fetched);
    let check = Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(&fetched)
        .output()
        .unwrap();
    let checked = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(check.status.success(), "{checked}");
    assert!(
        checked.contains("greet-trixie/greet_1.0.0+trixie_amd64.deb: OK"),
        "{checked}"
    );

    // A target that stamps the time into an artifact is not reproducible,
    // and verify names that file, not the stable one.
    let mut cfg = std::fs::read_to_string(project.join("slate.toml")).unwrap();
    cfg.push_str("\n[builds.stamp]\nimage = \"builder-bookworm\"\nrun = [\"mkdir -p dist; date +%N > dist/stamp.txt; echo same > dist/same.txt\"]\nartifacts = [\"dist/*.txt\"]\n");
    std::fs::write(project.join("slate.toml"), cfg).unwrap();
    let v = slate(&["verify", "stamp"]);
    let vout = format!(
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert_eq!(v.status.code(), Some(1), "{vout}");
    assert!(vout.contains("stamp.txt: contents differ"), "{vout}");
    assert!(!vout.contains("same.txt: contents differ"), "{vout}");

    let again = slate(&["build"]);
    let out = String::from_utf8_lossy(&again.stdout).to_string();
    assert!(again.status.success(), "{out}");
    assert!(
        out.contains("images: nothing to bake, all 6 layers cached"),
        "{out}"
    );
}

#[test]
fn root_debian_second_image_with_the_same_packages_downloads_nothing() {
    if !required() {
        return;
    }
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("slate-cache");
    let dir = tempfile::tempdir().unwrap();
    let pkgs = "packages = [\"gcc\", \"libc6-dev\", \"make\"]";
    // `b` names the host's arch explicitly: the same system, but another
    // recipe, so it is bootstrapped and its packages installed anew.
    let arch = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .unwrap();
    let arch = String::from_utf8_lossy(&arch.stdout).trim().to_string();
    std::fs::write(
        dir.path().join("slate.toml"),
        format!("[images.a]\nfrom = \"debian:bookworm\"\n{pkgs}\n[images.b]\nfrom = \"debian:bookworm\"\narch = \"{arch}\"\n{pkgs}\n"),
    )
    .unwrap();
    let bake = |image: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_slate"))
            .arg("-C")
            .arg(dir.path())
            .args(["bake", image])
            .env("SLATE_CACHE", &cache)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "{out}");
        out
    };
    bake("a");
    // `b`'s packages layer may be in the cache from an earlier run of this
    // test: remove it (found through `slate images`) so apt runs again.
    let images = Command::new(env!("CARGO_BIN_EXE_slate"))
        .arg("-C")
        .arg(dir.path())
        .arg("images")
        .env("SLATE_CACHE", &cache)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&images.stdout).to_string();
    let b_packages = listing
        .lines()
        .skip_while(|l| !l.starts_with("b "))
        .find(|l| l.contains("apt-get install"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no packages layer listed for b:\n{listing}"))
        .to_string();
    for e in std::fs::read_dir(cache.join("v1/layers"))
        .unwrap()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with(&b_packages) {
            std::fs::remove_dir_all(e.path()).unwrap();
        }
    }
    let out = bake("b");
    // Only the packages layer of `b` is new work for apt; its output is what
    // lies between that layer's start and end lines.
    let layer: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.contains("baking apt-get install"))
        .take_while(|l| !l.contains("baked in"))
        .collect();
    assert!(
        layer.iter().any(|l| l.contains("Setting up gcc")),
        "apt installed the packages:\n{out}"
    );
    // Index files may be refreshed (the archive moves on); packages must not be.
    let index = ["InRelease", "Release", "Packages", "Translation", "Sources"];
    let fetched: Vec<&&str> = layer
        .iter()
        .filter(|l| l.contains("Get:") && !index.iter().any(|i| l.contains(i)))
        .collect();
    assert!(fetched.is_empty(), "downloaded again: {fetched:#?}");
}

#[test]
fn root_debian_arm64_image_bakes_and_runs_through_qemu_user() {
    if !required() {
        return;
    }
    if std::env::consts::ARCH != "x86_64" {
        eprintln!("SKIPPED: the foreign-arch test is written for x86_64 hosts");
        return;
    }
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("slate-cache");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("slate.toml"), "[images.arm]\nfrom = \"debian:bookworm\"\narch = \"arm64\"\nsteps = [\"uname -m > /etc/baked-on\"]\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_slate"))
        .arg("-C")
        .arg(dir.path())
        .args([
            "run",
            "arm",
            "--",
            "sh",
            "-c",
            "uname -m; cat /etc/baked-on; dpkg --print-architecture",
        ])
        .env("SLATE_CACHE", &cache)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "aarch64\naarch64\narm64\n"
    );
}

#[test]
fn root_debian_quickstart_image_round_trips_through_a_registry() {
    if !required() {
        return;
    }
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("slate-cache");
    let dir = tempfile::tempdir().unwrap();
    let Some(reg) = common::Registry::start(dir.path()) else {
        return;
    };
    let source = dir.path().join("source");
    copy_example(&source);
    let slate = |project: &Path, args: &[&str], cache: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_slate"))
            .arg("-C")
            .arg(project)
            .args(args)
            .env("SLATE_CACHE", cache)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "{out}");
        out
    };
    let reference = format!("{}/slate/builder-bookworm:v1", reg.addr);
    slate(
        &source,
        &["bake", "builder-bookworm", "--push", &reference],
        &cache,
    );
    // The quickstart again, its image now pulled from the registry, in a new cache.
    let pulled = dir.path().join("pulled");
    copy_example(&pulled);
    let config = std::fs::read_to_string(pulled.join("slate.toml")).unwrap();
    let start = config.find("[images.builder-bookworm]").unwrap();
    let end = config.find("[images.builder-trixie]").unwrap();
    let config = format!(
        "{}[images.builder-bookworm]\nfrom = \"oci:{reference}\"\n\n{}",
        &config[..start],
        &config[end..]
    );
    std::fs::write(pulled.join("slate.toml"), config).unwrap();
    let out = slate(
        &pulled,
        &["build", "greet-bookworm"],
        &dir.path().join("cache2"),
    );
    assert!(out.contains(&format!("pull {reference}")), "{out}");
    assert!(out.contains("[greet-bookworm] hello, slate"), "{out}");
    let deb = pulled.join("artifacts/greet-bookworm/greet_1.0.0+bookworm_amd64.deb");
    let info = Command::new("dpkg-deb")
        .arg("--field")
        .arg(&deb)
        .arg("Version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&info.stdout).trim(),
        "1.0.0+bookworm"
    );
}

#[test]
fn root_debian_vm_image_exports_a_disk_with_its_kernel_beside_it() {
    if !required() {
        return;
    }
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("slate-cache");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("slate.toml"),
        "[images.vm]\nfrom = \"debian:bookworm\"\nvm = true\n",
    )
    .unwrap();
    let disk = dir.path().join("vm.qcow2");
    let o = Command::new(env!("CARGO_BIN_EXE_slate"))
        .arg("-C")
        .arg(dir.path())
        .args(["bake", "vm", "--export", "disk"])
        .arg(&disk)
        .env("SLATE_CACHE", &cache)
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("apt-get install initramfs-tools linux-image-amd64"),
        "{out}"
    );
    // A bzImage kernel ("HdrS" at 0x202) and a non-empty initrd beside the disk.
    let kernel = std::fs::read(format!("{}.vmlinuz", disk.display())).unwrap();
    assert_eq!(&kernel[0x202..0x206], b"HdrS");
    assert!(
        std::fs::metadata(format!("{}.initrd", disk.display()))
            .unwrap()
            .len()
            > 1 << 20
    );
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&disk)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
}
