//! The quickstart example for real: Debian bootstrapped from the archive,
//! packages installed, a .deb built per release. Needs root and network to
//! the Debian archive, so a plain `cargo test` lists these tests as ignored,
//! and `scripts/test.sh` runs them as root. Their layer cache is the one
//! under the build folder shared with the VM tests, so later runs reuse what
//! earlier runs baked.

mod common;

use common::{text, Project};
use std::process::Command;

/// Fails the test unless this host can bootstrap Debian images.
#[track_caller]
fn require_debian_host() {
    common::require_root();
    common::require_debian_bootstrap();
}

#[test]
#[ignore = "needs root, the Debian archive and s3s-fs: scripts/test.sh runs it"]
fn root_debian_quickstart_builds_real_packages() {
    require_debian_host();
    let p = Project::example("quickstart");
    let project = p.project();

    let o = p.run(&["build"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("[greet-bookworm] hello, slate"), "{out}");
    // The run's report, naming both targets and their .debs.
    let report = out
        .lines()
        .find_map(|l| l.strip_prefix("report: "))
        .map(|r| project.join(r))
        .unwrap_or_else(|| panic!("no report in: {out}"));
    let page = std::fs::read_to_string(&report).unwrap();
    assert!(
        page.contains("greet_1.0.0+trixie_amd64.deb"),
        "{}",
        report.display()
    );
    assert!(page.contains("\"name\":\"greet-bookworm\""));
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
    let v = p.run(&["verify", "greet-bookworm"]);
    let vout = text(&v);
    assert_eq!(v.status.code(), Some(0), "{vout}");
    assert!(
        vout.contains("greet-bookworm: reproducible: 1 artifact(s) identical"),
        "{vout}"
    );

    // Published to a real S3-compatible server and fetched back by an
    // independent client, the packages still match SHA256SUMS.
    let w = tempfile::tempdir().unwrap();
    let s3 = common::S3Server::start(w.path(), "releases");
    let o = p
        .cmd(&["publish", "--to", "s3://releases/greet"])
        .envs(s3.env())
        .output()
        .unwrap();
    let pout = text(&o);
    assert!(o.status.success(), "{pout}");
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
    let v = p.run(&["verify", "stamp"]);
    let vout = text(&v);
    assert_eq!(v.status.code(), Some(1), "{vout}");
    assert!(vout.contains("stamp.txt: contents differ"), "{vout}");
    assert!(!vout.contains("same.txt: contents differ"), "{vout}");

    let again = p.run(&["build"]);
    let out = String::from_utf8_lossy(&again.stdout).to_string();
    assert!(again.status.success(), "{out}");
    assert!(
        out.contains("images: nothing to bake, all 6 layers cached"),
        "{out}"
    );
}

#[test]
#[ignore = "needs root and the Debian archive: scripts/test.sh runs it"]
fn root_debian_second_image_with_the_same_packages_downloads_nothing() {
    require_debian_host();
    // `hello` makes the recipe this test's own: no other test's image has
    // this packages layer, so removing it below disturbs nobody.
    let pkgs = "packages = [\"gcc\", \"libc6-dev\", \"make\", \"hello\"]";
    // `b` names the host's arch explicitly: the same system, but another
    // recipe, so it is bootstrapped and its packages installed anew.
    let arch = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .unwrap();
    let arch = String::from_utf8_lossy(&arch.stdout).trim().to_string();
    let p = Project::debian(&format!("[images.a]\nfrom = \"debian:bookworm\"\n{pkgs}\n[images.b]\nfrom = \"debian:bookworm\"\narch = \"{arch}\"\n{pkgs}\n"));
    let bake = |image: &str| {
        let o = p.run(&["bake", image]);
        let out = text(&o);
        assert!(o.status.success(), "{out}");
        out
    };
    // Both packages layers may be in the cache from an earlier run of this
    // test (in another project, with apt folders of its own): remove them
    // (found through `slate images`) so apt runs for both, `a` first.
    bake("a");
    bake("b");
    let images = p.run(&["images"]);
    let listing = String::from_utf8_lossy(&images.stdout).to_string();
    let packages_layer = |image: &str| {
        listing
            .lines()
            .skip_while(|l| !l.starts_with(&format!("{image} ")))
            .find(|l| l.contains("apt-get install"))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no packages layer listed for {image}:\n{listing}"))
            .to_string()
    };
    for short in [packages_layer("a"), packages_layer("b")] {
        for e in std::fs::read_dir(p.cache.join("v1/layers"))
            .unwrap()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(&short) {
                std::fs::remove_dir_all(e.path()).unwrap();
            }
        }
    }
    bake("a");
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
#[ignore = "needs root and the Debian archive: scripts/test.sh runs it"]
fn root_debian_a_bake_cannot_plant_apt_lists_or_debs_for_another_projects_bake() {
    require_debian_host();
    // A new step each run (the nonce), so neither layer is ever cached.
    let nonce = format!(
        "{:?}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
    );
    // A hostile image step writes where apt keeps the package lists and the
    // downloads it trusts, and makes apt build its binary cache.
    let attacker = Project::debian(&format!(
        "[images.evil]\nfrom = \"debian:bookworm\"\nsteps = [\"echo {nonce} >/dev/null; apt-cache show dpkg >/dev/null; echo forged > /var/lib/apt/lists/slate-planted_Packages; echo forged > /var/cache/apt/archives/slate-planted_1.0_all.deb\"]\n"
    ));
    let o = attacker.run(&["bake", "evil"]);
    assert!(o.status.success(), "{}", text(&o));
    // Another project bakes an image of the same suite in the same cache.
    let victim = Project::debian(&format!(
        "[images.victim]\nfrom = \"debian:bookworm\"\nsteps = [\"echo {nonce} >/dev/null; ls -a /var/lib/apt/lists /var/cache/apt/archives; apt-cache show --no-all-versions make | grep ^Package\"]\n"
    ));
    let o = victim.run(&["bake", "victim"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("partial"), "the listing ran: {out}");
    // Its own lists are empty at first, so slate updates them before the
    // step: apt knows Debian's packages there.
    assert!(out.contains("`apt-get update` first"), "{out}");
    assert!(out.contains("[victim] Package: make"), "{out}");
    assert!(
        !out.contains("slate-planted"),
        "another project's bake saw what this one planted:\n{out}"
    );
    // apt's binary cache, built from lists that are not in the layer, is
    // not in the layer either.
    let layers = attacker.cache.join("v1/layers");
    let step = std::fs::read_dir(&layers)
        .unwrap()
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path().join("layer.json"))
                .is_ok_and(|m| m.contains(&nonce) && m.contains("apt-cache show"))
        })
        .expect("the attacker's step layer");
    let fs = step.path().join("fs");
    assert!(fs
        .join("var/lib/apt/lists")
        .read_dir()
        .map_or(true, |d| d.count() == 0));
    for f in ["pkgcache.bin", "srcpkgcache.bin"] {
        assert!(
            !fs.join("var/cache/apt").join(f).exists(),
            "{f} is in the layer"
        );
    }
}

#[test]
#[ignore = "needs root, the Debian archive and qemu-user-static on an x86_64 host: scripts/test.sh runs it"]
fn root_debian_arm64_image_bakes_and_runs_through_qemu_user() {
    require_debian_host();
    assert_eq!(
        std::env::consts::ARCH,
        "x86_64",
        "this test runs an arm64 image on an x86_64 host"
    );
    // slate's own registration is removed first, so the run has to make
    // it again from the static interpreter it finds, whatever the
    // distribution registered (qemu 10 ships its entries disabled).
    let binfmt = std::path::Path::new("/proc/sys/fs/binfmt_misc");
    let ours = binfmt.join("slate-qemu-aarch64");
    if ours.exists() {
        std::fs::write(&ours, "-1").unwrap();
    }
    let distro_usable = std::fs::read_to_string(binfmt.join("qemu-aarch64")).is_ok_and(|e| {
        e.starts_with("enabled")
            && e.contains("flags: ")
            && e.lines()
                .any(|l| l.starts_with("flags:") && l.contains('F'))
    });
    let p = Project::debian("[images.arm]\nfrom = \"debian:bookworm\"\narch = \"arm64\"\nsteps = [\"uname -m > /etc/baked-on\"]\n");
    let check = p.run(&["check"]);
    let said = text(&check);
    assert!(said.contains("arm64: "), "{said}");
    let o = p.run(&[
        "run",
        "arm",
        "--",
        "sh",
        "-c",
        "uname -m; cat /etc/baked-on; dpkg --print-architecture",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "aarch64\naarch64\narm64\n"
    );
    if !distro_usable {
        let entry = std::fs::read_to_string(&ours).unwrap_or_default();
        assert!(entry.starts_with("enabled"), "{entry}");
        assert!(
            entry
                .lines()
                .any(|l| l.starts_with("flags:") && l.contains('F')),
            "{entry}"
        );
        let said = text(&p.run(&["check"]));
        assert!(
            said.contains("arm64: registered as `slate-qemu-aarch64`"),
            "{said}"
        );
    }
}

#[test]
#[ignore = "needs root, the Debian archive and docker-registry: scripts/test.sh runs it"]
fn root_debian_quickstart_image_round_trips_through_a_registry() {
    require_debian_host();
    let source = Project::example("quickstart");
    let reg = common::Registry::start(source.path());
    let slate = |p: &Project, args: &[&str]| {
        let o = p.run(args);
        let out = text(&o);
        assert!(o.status.success(), "{out}");
        out
    };
    let reference = format!("{}/slate/builder-bookworm:v1", reg.addr);
    slate(&source, &["bake", "builder-bookworm", "--push", &reference]);
    // The quickstart again, its image now pulled from the registry, in a new cache.
    let pulled = Project::example("quickstart").with_own_cache();
    let config = pulled.read("slate.toml");
    let start = config.find("[images.builder-bookworm]").unwrap();
    let end = config.find("[images.builder-trixie]").unwrap();
    let config = format!(
        "{}[images.builder-bookworm]\nfrom = \"oci:{reference}\"\n\n{}",
        &config[..start],
        &config[end..]
    );
    pulled.write("slate.toml", &config);
    let out = slate(&pulled, &["build", "greet-bookworm"]);
    assert!(out.contains(&format!("pull {reference}")), "{out}");
    assert!(out.contains("[greet-bookworm] hello, slate"), "{out}");
    let deb = pulled
        .project()
        .join("artifacts/greet-bookworm/greet_1.0.0+bookworm_amd64.deb");
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
#[ignore = "needs root, the Debian archive and qemu-img: scripts/test.sh runs it"]
fn root_debian_vm_image_exports_a_disk_with_its_kernel_beside_it() {
    require_debian_host();
    common::require_tool("qemu-img", "qemu-utils");
    let p = Project::debian("[images.vm]\nfrom = \"debian:bookworm\"\nvm = true\n");
    let disk = p.path().join("vm.qcow2");
    let o = p.run(&["bake", "vm", "--export", "disk", disk.to_str().unwrap()]);
    let out = text(&o);
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

/// A CA only this test trusts, and a certificate for 127.0.0.1 signed by
/// it, made with openssl under `dir`: (ca.crt, server.crt, server.key).
fn test_ca(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let ssl = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "openssl {args:?}: {}", text(&o));
    };
    ssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=slate test CA",
    ]);
    ssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    ssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
    (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

#[test]
#[ignore = "needs root, the Debian archive and openssl: scripts/test.sh runs it"]
fn root_debian_host_ca_lets_a_network_build_trust_the_hosts_ca() {
    require_debian_host();
    common::require_tool("openssl", "openssl");
    let config = |host_ca: bool, port: u16| {
        format!(
            r#"
[settings]
host_ca = {host_ca}

[images.fetcher]
from = "debian:bookworm"
packages = ["curl", "ca-certificates"]

[builds.fetch]
image = "fetcher"
network = true
run = ["mkdir -p out", "curl -fsS https://127.0.0.1:{port}/hello.txt -o out/hello.txt"]
artifacts = ["out/hello.txt"]
"#
        )
    };
    let p = Project::debian(&config(false, 1));
    // Baked with the host's own settings, before the test's CA is in play.
    let o = p.run(&["bake"]);
    assert!(o.status.success(), "{}", text(&o));

    // An HTTPS server on loopback whose certificate only the test CA signs.
    let (ca, cert, key) = test_ca(&p.path().join("tls"));
    let www = p.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello over TLS\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new("openssl");
    server
        .args(["s_server", "-WWW", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .current_dir(&www);
    let mut server = common::spawn_until_printed(server, "ACCEPT");

    // The host trusts the test CA (SSL_CERT_FILE names the host's bundle).
    let build = |host_ca: bool| {
        p.write("slate.toml", &config(host_ca, port));
        p.cmd(&["build"])
            .env("SSL_CERT_FILE", &ca)
            .output()
            .unwrap()
    };
    let off = build(false);
    let out = text(&off);
    assert_eq!(off.status.code(), Some(1), "{out}");
    assert!(out.contains("SSL certificate problem"), "{out}");
    assert!(
        out.contains("hint: ") && out.contains("host_ca = true"),
        "{out}"
    );

    let on = build(true);
    let out = text(&on);
    assert!(on.status.success(), "{out}");
    assert_eq!(p.read("artifacts/fetch/hello.txt"), "hello over TLS\n");
    // The bundle was mounted, not copied: nothing of it is an artifact.
    let files: Vec<_> = std::fs::read_dir(p.project().join("artifacts/fetch"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("provenance"))
        .collect();
    assert_eq!(files, vec!["hello.txt".to_string()]);
    let _ = server.kill();
    let _ = server.wait();
}
