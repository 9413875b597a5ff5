//! The real binary in temp projects. Tests named `root_*` make real
//! sandboxes: they need root, so a plain `cargo test` lists them as ignored,
//! and `scripts/test.sh` runs them as root.

mod common;

use common::{processes_with, require_debian_bootstrap, require_root, require_tool, text, Project};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const IMAGE: &str = "[images.bb]\nfrom = \"tar:bb.tar.gz\"\nsteps = [\"echo one > /etc/one\", \"echo two > /etc/two\"]\n";

#[test]
fn bad_config_exits_2_naming_file_line_and_column() {
    let p = Project::config_only("[images.bb]\nfrom = \"tar:bb.tar.gz\"\n\n[builds.x]\nimage = \"bb\"\nrun = [\"true\"]\nartifact = [\"a\"]\n");
    let o = p.run(&["build"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("slate.toml:7:1: unknown field `artifact`"),
        "{err}"
    );
    assert!(err.contains("hint: did you mean `artifacts`?"), "{err}");
}

#[test]
fn hostile_build_name_is_refused_and_the_folder_beside_is_untouched() {
    // `artifacts/../victim` is the folder next to the artifacts folder: a
    // build named `../victim` once had slate empty it.
    let p = Project::config_only(
        "[images.bb]\nfrom = \"tar:bb.tar.gz\"\n\n[builds.\"../victim\"]\nimage = \"bb\"\nrun = [\"true\"]\n",
    );
    p.write("victim/keep.txt", "mine\n");
    for cmd in ["build", "check"] {
        let o = p.run(&[cmd]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains("slate.toml:4:1: target name `../victim`"),
            "{err}"
        );
        assert!(err.contains("hint: use letters, digits"), "{err}");
    }
    assert_eq!(p.read("victim/keep.txt"), "mine\n");
}

/// The provider is chosen once, before anything runs: one the config does
/// not set up is a usage error for `build` and `verify` alike, never a
/// sandbox in its place.
#[test]
fn a_provider_the_config_does_not_set_up_is_refused_before_anything_runs() {
    let p = Project::config_only(
        "[images.bb]\nfrom = \"tar:bb.tar.gz\"\n[builds.far]\nimage = \"bb\"\nprovider = \"ec2\"\nrun = [\"true\"]\n",
    );
    for args in [
        &["build"][..],
        &["build", "far"],
        &["verify", "far"],
        &["up", "far"],
    ] {
        let o = p.run(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("the ec2 provider cannot be used: [providers.ec2] names no `ami`"),
            "{args:?}: {err}"
        );
        assert!(err.contains("hint: "), "{err}");
    }
    let o = p.run(&["build", "--provider", "docker"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown provider `docker`"), "{err}");
    assert!(!p.project().join(".slate").exists(), "nothing ran");
}

#[test]
fn dangling_image_reference_exits_2() {
    let p = Project::config_only(
        "[images.bb]\nfrom = \"tar:bb.tar.gz\"\n[builds.x]\nimage = \"bbb\"\nrun = [\"true\"]\n",
    );
    let o = p.run(&["check"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("slate.toml:4:9: target `x` uses image `bbb`, which is not defined"),
        "{err}"
    );
}

#[test]
fn init_writes_a_config_that_checks() {
    // The starter config's image starts from Debian: `slate check` fails
    // where no bootstrap tool is installed.
    require_debian_bootstrap();
    let d = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_slate"))
        .arg("-C")
        .arg(d.path())
        .arg("init")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let again = Command::new(env!("CARGO_BIN_EXE_slate"))
        .arg("-C")
        .arg(d.path())
        .arg("init")
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    let o = Command::new(env!("CARGO_BIN_EXE_slate"))
        .arg("-C")
        .arg(d.path())
        .arg("check")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("targets: hello"), "{}", text(&o));
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_build_collects_checked_artifacts_and_rebakes_nothing() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.app]\nimage = \"bb\"\nmatrix = {{ flavour = [\"a\", \"b\"] }}\nrun = [\"mkdir -p dist\", \"cat /etc/one /etc/two > dist/{{flavour}}.txt; hostname >> dist/{{flavour}}.txt\"]\nartifacts = [\"dist/*.txt\"]\n"
    ));
    let o = p.run(&["build"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("images: 3 layer(s) baked, 0 cached"),
        "{}",
        text(&o)
    );
    let arts = p.project().join("artifacts");
    assert_eq!(
        std::fs::read_to_string(arts.join("app-a/a.txt")).unwrap(),
        "one\ntwo\napp-a\n"
    );
    let check = Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(&arts)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    assert_eq!(String::from_utf8_lossy(&check.stdout).lines().count(), 2);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(arts.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["targets"].as_array().unwrap().len(), 2);
    assert_eq!(manifest["targets"][0]["artifacts"][0]["size"], 14);
    // Provenance: an in-toto v1 statement with a SLSA v1 predicate whose
    // subject is the artifact.
    let prov: serde_json::Value =
        serde_json::from_slice(&std::fs::read(arts.join("app-a/provenance.json")).unwrap())
            .unwrap();
    assert_eq!(prov["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(prov["predicateType"], "https://slsa.dev/provenance/v1");
    assert_eq!(prov["subject"][0]["name"], "a.txt");
    assert_eq!(
        prov["subject"][0]["digest"]["sha256"],
        manifest["targets"][0]["artifacts"][0]["sha256"]
    );
    let def = &prov["predicate"]["buildDefinition"];
    assert_eq!(def["externalParameters"]["target"], "app-a");
    assert_eq!(def["externalParameters"]["matrix"]["flavour"], "a");
    assert_eq!(
        def["resolvedDependencies"][0]["digest"]["sha256"],
        manifest["targets"][0]["image_digest"]
    );
    assert_eq!(
        def["resolvedDependencies"][1]["digest"]["sha256"]
            .as_str()
            .unwrap()
            .len(),
        64
    );
    assert_eq!(
        prov["predicate"]["runDetails"]["metadata"]["invocationId"],
        manifest["run_id"]
    );
    assert!(prov["predicate"]["runDetails"]["builder"]["version"]["slate"].is_string());
    // Every phase is in run.json, and the whole log is on disk.
    let run_id = manifest["run_id"].as_str().unwrap();
    let run: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            p.project()
                .join(".slate/runs")
                .join(run_id)
                .join("run.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let phases: Vec<&str> = run["targets"][0]["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(phases[0], "create");
    assert_eq!(phases[phases.len() - 1], "destroy");
    assert!(phases.contains(&"artifacts"));

    let again = p.run(&["build"]);
    assert!(again.status.success());
    assert!(
        text(&again).contains("images: nothing to bake, all 3 layers cached"),
        "{}",
        text(&again)
    );
    assert_eq!(p.envs_left(), 0);
    assert!(p.mounts_left().is_empty());
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_changing_one_step_rebakes_from_that_step_only() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.app]\nimage = \"bb\"\nrun = [\"cat /etc/two\"]\n"
    ));
    assert!(p.run(&["bake"]).status.success());
    // The bake left its log in a run folder.
    let runs: Vec<_> = std::fs::read_dir(p.project().join(".slate/runs"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(runs.len(), 1);
    let log = std::fs::read_to_string(runs[0].path().join("bake-bb.log")).unwrap();
    assert!(
        log.contains("baked in") && log.contains("run: echo two > /etc/two"),
        "{log}"
    );
    p.write(
        "slate.toml",
        &format!(
            "{}[builds.app]\nimage = \"bb\"\nrun = [\"cat /etc/two\"]\n",
            IMAGE.replace("echo two", "echo TWO")
        ),
    );
    let o = p.run(&["build"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("images: 1 layer(s) baked, 2 cached"), "{t}");
    assert!(t.contains("[app] TWO"), "{t}");
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_targets_never_see_each_others_files_or_host_files() {
    require_root();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("host-secret"), "x").unwrap();
    let p = Project::new(&format!(
        "{IMAGE}[builds.writer]\nimage = \"bb\"\nrun = [\"echo w > /root/w; echo w > /tmp/w; echo w > /var/w\"]\n\
         [builds.reader]\nimage = \"bb\"\nrun = [\"for f in /root/w /tmp/w /var/w {host} /src/ignored.txt; do if test -e $f; then echo LEAK $f; exit 1; fi; done; test -e /src/kept.txt\"]\n",
        host = outside.path().join("host-secret").display()
    ));
    p.write(".gitignore", "ignored.txt\n");
    p.write("ignored.txt", "no");
    p.write("kept.txt", "yes");
    let w = p.run(&["build", "writer"]);
    assert!(w.status.success(), "{}", text(&w));
    let r = p.run(&["build", "reader"]);
    assert!(r.status.success(), "{}", text(&r));
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_no_network_cannot_reach_the_hosts_loopback() {
    require_root();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let p = Project::new(&format!(
        "{IMAGE}[builds.net]\nimage = \"bb\"\nrun = [\"if nc -w 2 127.0.0.1 {port} </dev/null; then echo REACHED; exit 1; fi; echo unreachable\"]\n"
    ));
    let o = p.run(&["build"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("[net] unreachable"), "{}", text(&o));
    assert!(
        listener.accept().is_err(),
        "the sandbox connected to the host"
    );
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_failing_script_exits_1_and_timeout_leaves_nothing() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.fails]\nimage = \"bb\"\nrun = [\"mkdir -p dist; touch dist/x.txt; exit 3\"]\nartifacts = [\"dist/*.txt\"]\n\
         [builds.slow]\nimage = \"bb\"\nrun = [\"sleep 4242 & sleep 4343\"]\ntimeout = \"1s\"\n"
    ));
    let o = p.run(&["build"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("`run: mkdir -p dist; touch dist/x.txt; exit 3` exited with code 3"),
        "{t}"
    );
    assert!(t.contains("timed out after 1s"), "{t}");
    assert!(
        !p.project().join("artifacts/fails").exists(),
        "a failed target left artifacts"
    );
    assert!(processes_with("sleep 4242").is_empty() && processes_with("sleep 4343").is_empty());
    assert_eq!(p.envs_left(), 0);
    assert!(p.mounts_left().is_empty(), "{:?}", p.mounts_left());
    let logs = p.run(&["logs", "fails"]);
    assert!(text(&logs).contains("==> failed"), "{}", text(&logs));
}

/// Starts `slate build` of a target that sleeps, and waits until its command runs.
fn start_sleeper(p: &Project, marker: &str) -> std::process::Child {
    let child = common::spawn_until_printed(p.cmd(&["build"]), "started-sleeping");
    // The marker is printed just before the command starts: wait for it (bounded).
    let running = common::settle(|| processes_with(marker), |l| !l.is_empty());
    assert!(!running.is_empty(), "the build's process is running");
    child
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_ctrl_c_stops_cleanly_and_exits_nonzero() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.sleepy]\nimage = \"bb\"\nrun = [\"echo started-sleeping; sleep 4545\"]\n"
    ));
    let mut child = start_sleeper(&p, "sleep 4545");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let st = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(st.code(), Some(130), "{err}");
    assert!(processes_with("sleep 4545").is_empty());
    assert_eq!(p.envs_left(), 0);
    assert!(p.mounts_left().is_empty());
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_sigkill_of_slate_kills_the_build_and_gc_reaps_the_rest() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.sleepy]\nimage = \"bb\"\nrun = [\"echo started-sleeping; sleep 4646\"]\n"
    ));
    let mut child = start_sleeper(&p, "sleep 4646");
    child.kill().unwrap();
    child.wait().unwrap();
    // The parent-death signal is delivered as slate dies; wait for the
    // namespace's processes to be gone (bounded).
    let left = common::settle(|| processes_with("sleep 4646"), |l| l.is_empty());
    assert!(left.is_empty(), "{left:?}");
    assert!(p.mounts_left().is_empty());
    assert_eq!(
        p.envs_left(),
        1,
        "the killed run's environment folder is left for gc"
    );
    let gc = p.run(&["gc"]);
    assert!(gc.status.success(), "{}", text(&gc));
    assert!(
        text(&gc).contains("removed 1 leftover environment(s)"),
        "{}",
        text(&gc)
    );
    assert_eq!(p.envs_left(), 0);
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_environment_that_cannot_be_made_exits_3() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.app]\nimage = \"bb\"\nrun = [\"true\"]\n"
    ));
    assert!(p.run(&["bake"]).status.success());
    // Break the baked layers under slate's feet: the overlay cannot be mounted.
    for e in std::fs::read_dir(p.cache.join("v1/layers"))
        .unwrap()
        .flatten()
    {
        std::fs::remove_dir_all(e.path().join("fs")).unwrap();
    }
    let o = p.run(&["build"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("infrastructure failure"), "{t}");
    assert!(
        t.contains("environment failed (attempt 2 of 3), retrying"),
        "{t}"
    );
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_run_passes_exit_codes_and_json_events_parse() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.app]\nimage = \"bb\"\nrun = [\"echo hi\"]\n"
    ));
    let o = p.run(&["run", "bb", "--", "sh", "-c", "cat /etc/two; exit 5"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "two\n");
    // Each run is fresh, and leaves nothing on disk or mounted.
    assert!(p
        .run(&[
            "run",
            "bb",
            "--",
            "sh",
            "-c",
            "echo x > /root/f; echo y > /var/f"
        ])
        .status
        .success());
    assert_eq!(
        p.run(&[
            "run",
            "bb",
            "--",
            "sh",
            "-c",
            "test -e /root/f || test -e /var/f"
        ])
        .status
        .code(),
        Some(1)
    );
    assert_eq!(p.envs_left(), 0);
    assert!(p.mounts_left().is_empty());
    let o = p.run(&["--log-format", "json", "build"]);
    assert!(o.status.success());
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events
        .iter()
        .any(|e| e["event"] == "output" && e["line"] == "hi"));
    assert_eq!(events.last().unwrap()["event"], "run_finished");
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_limits_are_enforced_by_cgroups() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.many]\nimage = \"bb\"\npids = 16\nmemory = \"256MiB\"\ncpus = 0.5\nrun = [\"i=0; while [ $i -lt 40 ]; do sleep 1000 & i=$((i+1)); done; echo forked-all\"]\n\
         [builds.few]\nimage = \"bb\"\npids = 64\nrun = [\"i=0; while [ $i -lt 40 ]; do sleep 1000 & i=$((i+1)); done; echo forked-all\"]\n"
    ));
    let o = p.run(&["build", "many"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(!text(&o).contains("[many] forked-all"), "{}", text(&o));
    // The same script within its limit succeeds, so the limit is what stopped it.
    let o = p.run(&["build", "few"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("[few] forked-all"), "{}", text(&o));
    assert!(processes_with("sleep 1000").is_empty());
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_shell_is_interactive_in_the_targets_workdir_and_thrown_away() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.app]\nimage = \"bb\"\nworkdir = \"/work\"\nrun = [\"true\"]\n"
    ));
    p.write("input.txt", "from-host");
    assert!(p.run(&["bake"]).status.success());
    // On a real terminal, as a person's shell would have.
    let o = p.on_terminal(
        "shell app",
        b"echo \"in=$(pwd):$(cat input.txt):$(hostname)\"; echo left > /root/mark; exit 7\n",
        &[],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(7), "{out}");
    assert!(out.contains("in=/work:from-host:app"), "{out}");
    assert_eq!(
        p.run(&["run", "bb", "--", "test", "-e", "/root/mark"])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(p.envs_left(), 0);
}

/// A target whose image is baked starts while another image still bakes:
/// the slow image's bake waits on the test (an HTTP request it makes)
/// until the quick target has finished, so without the overlap the run
/// could not go on.
#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_a_target_builds_while_another_targets_image_still_bakes() {
    use std::io::Write;
    require_root();
    let gate = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = gate.local_addr().unwrap().port();
    let p = Project::new(&format!(
        "{IMAGE}[images.slow]\nfrom = \"image:bb\"\nsteps = [\"wget -q -O /got http://127.0.0.1:{port}/\"]\n\
         [builds.quick]\nimage = \"bb\"\nrun = [\"cat /etc/two\"]\n\
         [builds.late]\nimage = \"slow\"\nrun = [\"cat /got\"]\n"
    ));
    let mut slate = p
        .cmd(&["--progress", "plain", "build", "-j", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = slate.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout).lines() {
            let _ = tx.send(l.unwrap());
        }
    });
    // The slow image's bake step is waiting for an answer now.
    let (mut conn, _) = gate.accept().unwrap();
    let mut seen = Vec::new();
    let quick_done = loop {
        match rx.recv_timeout(std::time::Duration::from_secs(120)) {
            Ok(l) => {
                let done = l.starts_with("[quick] ✓ succeeded");
                seen.push(l);
                if done {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let mut request = [0u8; 1024];
    let _ = conn.read(&mut request);
    conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
        .unwrap();
    drop(conn);
    let status = slate.wait().unwrap();
    seen.extend(rx.try_iter());
    let out = seen.join("\n");
    assert!(
        quick_done,
        "the quick target did not finish while the slow image baked: {out}"
    );
    assert!(status.success(), "{out}");
    assert!(out.contains("[quick] two"), "{out}");
    assert!(out.contains("[late] ok"), "{out}");
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_concurrent_bakes_of_one_image_bake_each_layer_once() {
    require_root();
    // Slow steps, so that the two bakes really overlap.
    let p = Project::new("[images.bb]\nfrom = \"tar:bb.tar.gz\"\nsteps = [\"sleep 0.3; echo 1 > /one\", \"sleep 0.3; echo 2 > /two\"]\n[images.other]\nfrom = \"image:bb\"\nsteps = [\"cat /one /two > /both\"]\n");
    let a = p
        .cmd(&["bake", "bb"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let b = p.cmd(&["bake"]).stdout(Stdio::piped()).spawn().unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        text(&a),
        text(&b)
    );
    let all = format!("{}{}", text(&a), text(&b));
    let baked = |what: &str| {
        all.lines()
            .filter(|l| l.contains("baked in") && l.contains(what))
            .count()
    };
    assert_eq!(baked("unpack"), 1, "{all}");
    assert_eq!(baked("echo 1"), 1, "{all}");
    assert_eq!(baked("echo 2"), 1, "{all}");
    assert_eq!(baked("cat /one"), 1, "{all}");
    let o = p.run(&["run", "other", "--", "cat", "/both"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "1\n2\n");
    assert_eq!(
        std::fs::read_dir(p.cache.join("v1/tmp")).unwrap().count(),
        0,
        "no staging folder is left"
    );
}

#[test]
#[ignore = "needs root, skopeo and umoci: scripts/test.sh runs it"]
fn root_oci_export_is_deterministic_and_read_by_skopeo_and_umoci() {
    require_root();
    require_tool("skopeo", "skopeo");
    require_tool("umoci", "umoci");
    let p = Project::new(
        "[images.bb]\nfrom = \"tar:bb.tar.gz\"\nsteps = [\"echo one > /etc/one; mkdir -p /var/x; echo old > /var/x/old\", \"echo two > /etc/two; rm /etc/one; rm -rf /var/x; mkdir /var/x; echo new > /var/x/new\"]\n",
    );
    let out = p.path().join("bb.oci.tar");
    let o = p.run(&["bake", "bb", "--export", "oci", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let printed = text(&o);
    let digest = printed
        .split("manifest ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap()
        .to_string();
    // skopeo reads the archive and agrees on the manifest digest.
    let inspect = Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci-archive:{}:bb", out.display()))
        .output()
        .unwrap();
    assert!(inspect.status.success(), "{}", text(&inspect));
    let info: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(info["Digest"], digest.as_str());
    assert_eq!(info["Layers"].as_array().unwrap().len(), 3);
    // umoci applies the layers, whiteouts and opaque folder included.
    let layout = p.path().join("layout");
    assert!(p
        .run(&["bake", "bb", "--export", "oci", layout.to_str().unwrap()])
        .status
        .success());
    let rootfs = p.path().join("unpacked");
    let st = Command::new("umoci")
        .args(["raw", "unpack", "--image"])
        .arg(format!("{}:bb", layout.display()))
        .arg(&rootfs)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", text(&st));
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/two")).unwrap(),
        "two\n"
    );
    assert!(!rootfs.join("etc/one").exists());
    let var_x: Vec<_> = std::fs::read_dir(rootfs.join("var/x"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(var_x, ["new"]);
    // The same recipe baked again, from nothing, gives the same image.
    let other_cache = p.path().join("cache2");
    let out2 = p.path().join("bb2.oci.tar");
    let o = p
        .cmd(&["bake", "bb", "--export", "oci", out2.to_str().unwrap()])
        .env("SLATE_CACHE", &other_cache)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("2 layer(s) baked, 1 cached") || text(&o).contains("3 layer(s) baked"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
    // The flat export is the merged view.
    let flat = p.path().join("flat.tar");
    assert!(p
        .run(&["bake", "bb", "--export", "tar", flat.to_str().unwrap()])
        .status
        .success());
    let list = Command::new("tar").arg("-tf").arg(&flat).output().unwrap();
    let names = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(
        names.lines().any(|l| l == "etc/two")
            && !names.lines().any(|l| l == "etc/one" || l == "var/x/old"),
        "{names}"
    );
}

/// Bytes of regular files under a folder.
fn bytes_under(p: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        if m.is_dir() {
            total += bytes_under(&e.path());
        } else if m.is_file() {
            total += m.len();
        }
    }
    total
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_gc_frees_what_it_says_and_keeps_what_the_project_uses() {
    require_root();
    let config = |step: &str| {
        format!("[images.bb]\nfrom = \"tar:bb.tar.gz\"\nsteps = [\"echo one > /etc/one\", \"{step}\"]\n")
    };
    let p = Project::new(&config("head -c 7000 /dev/zero > /etc/big"));
    assert!(p.run(&["bake"]).status.success());
    // Change the last step: its old (7000-byte) layer is no longer used.
    p.write("slate.toml", &config("echo small > /etc/big"));
    assert!(p.run(&["bake"]).status.success());
    let before = bytes_under(&p.cache.join("v1/layers"));
    // Recently used layers survive --older-than.
    let o = p.run(&["gc", "--older-than", "1h"]);
    assert!(text(&o).contains("removed 0 layer(s)"), "{}", text(&o));
    let o = p.run(&["gc"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("removed 1 layer(s)"), "{}", text(&o));
    let after = bytes_under(&p.cache.join("v1/layers"));
    let said: u64 = text(&o)
        .split("layer(s): ")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    // What it says it freed is what left the layer store, but for the
    // layer's own small metadata file.
    assert!(said >= 7000, "said {said}");
    assert!(
        before - after >= said && before - after - said < 1024,
        "said {said}, freed {}",
        before - after
    );
    // Everything the project uses is still there: nothing to bake.
    let o = p.run(&["bake"]);
    assert!(
        text(&o).contains("nothing to bake: all 3 layers cached"),
        "{}",
        text(&o)
    );
    assert_eq!(
        String::from_utf8_lossy(&p.run(&["run", "bb", "--", "cat", "/etc/big"]).stdout),
        "small\n"
    );
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_verify_passes_reproducible_targets_and_names_what_differs() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.same]\nimage = \"bb\"\nrun = [\"mkdir -p dist; cat /etc/two > dist/x.txt; echo $SOURCE_DATE_EPOCH > dist/epoch.txt\"]\nartifacts = [\"dist/*\"]\n\
         [builds.noisy]\nimage = \"bb\"\nrun = [\"mkdir -p dist; echo stable > dist/ok.txt; cat /proc/sys/kernel/random/uuid > dist/x.txt; hostname > dist/host.txt\"]\nartifacts = [\"dist/*\"]\n"
    ));
    let o = p.run(&["verify", "same"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("same: reproducible: 2 artifact(s) identical"),
        "{}",
        text(&o)
    );
    let o = p.run(&["verify", "noisy"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("NOT reproducible; 2 file(s) differ"), "{t}");
    assert!(
        t.contains("x.txt: contents differ") && t.contains("host.txt: contents differ"),
        "{t}"
    );
    assert!(!t.contains("ok.txt: contents differ"), "{t}");
}

/// Every regular file under `dir`, recursively.
fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            out.extend(all_files(&e.path()));
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
    out
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_secrets_never_reach_output_or_files_slate_writes() {
    require_root();
    let secret = "s3cr3t-7f1e9a-value";
    let len = secret.len();
    let p = Project::new(&format!(
        "{IMAGE}[builds.app]\nimage = \"bb\"\nsecrets = [\"DEPLOY_TOKEN\"]\nrun = [\"echo token is $DEPLOY_TOKEN; echo $DEPLOY_TOKEN >&2; test ${{#DEPLOY_TOKEN}} = {len}\", \"mkdir -p dist; echo ok > dist/a.txt\"]\nartifacts = [\"dist/*\"]\n"
    ));
    for format in ["text", "json"] {
        let o = p
            .cmd(&["--log-format", format, "build"])
            .env("DEPLOY_TOKEN", secret)
            .output()
            .unwrap();
        let printed = text(&o);
        assert!(
            o.status.success(),
            "the secret reached the build: {printed}"
        );
        assert!(printed.contains("token is ***"), "{printed}");
        assert!(!printed.contains(secret), "printed: {printed}");
    }
    let written: Vec<PathBuf> = all_files(&p.project().join(".slate"))
        .into_iter()
        .chain(all_files(&p.project().join("artifacts")))
        .collect();
    assert!(
        written.iter().any(|f| f.ends_with("provenance.json"))
            && written.iter().any(|f| f.ends_with("run.json"))
    );
    // The ECS log has the line, masked like every other log.
    let ecs = written
        .iter()
        .find(|f| f.ends_with("run.ecs.ndjson"))
        .expect("an ECS log");
    assert!(std::fs::read_to_string(ecs)
        .unwrap()
        .contains("\"message\":\"token is ***\""));
    for f in written {
        let data = std::fs::read(&f).unwrap();
        assert!(
            !String::from_utf8_lossy(&data).contains(secret),
            "{} holds the secret",
            f.display()
        );
    }
}

#[test]
#[ignore = "needs root and docker-registry: scripts/test.sh runs it"]
fn root_image_pushed_to_a_registry_is_pulled_back_as_an_oci_base() {
    require_root();
    let p = Project::new(
        "[images.bb]\nfrom = \"tar:bb.tar.gz\"\nsteps = [\"echo one > /etc/one; mkdir -p /var/x; echo old > /var/x/old\", \"echo two > /etc/two; rm /etc/one; rm -rf /var/x; mkdir /var/x; echo new > /var/x/new\"]\n",
    );
    let reg = common::Registry::start(p.path());
    let reference = format!("{}/slate/bb:v1", reg.addr);
    let o = p.run(&["bake", "bb", "--push", &reference]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("0 already there"), "{}", text(&o));
    // Pushing again sends nothing.
    let o = p.run(&["bake", "bb", "--push", &reference]);
    assert!(text(&o).contains("; 0 bytes sent"), "{}", text(&o));
    // Another project, another cache: the image comes from the registry.
    let q = Project::new(&format!("[images.pulled]\nfrom = \"oci:{reference}\"\nsteps = [\"echo on-top > /etc/three\"]\n[builds.app]\nimage = \"pulled\"\nrun = [\"cat /etc/two /etc/three /var/x/new; test ! -e /etc/one; test ! -e /var/x/old\"]\n"));
    let o = q.run(&["build"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains(&format!("pull {reference}")), "{t}");
    assert!(
        t.contains("[app] two") && t.contains("[app] on-top") && t.contains("[app] new"),
        "{t}"
    );
    // A reference without a registry host is refused with a hint.
    let bad = Project::new("[images.x]\nfrom = \"oci:debian:bookworm\"\n");
    let o = bad.run(&["check"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o)
            .contains("slate.toml:2:8: image `x`: `oci:debian:bookworm` does not name a registry"),
        "{}",
        text(&o)
    );
}

#[test]
#[ignore = "needs root, qemu-img, debugfs and zstd: scripts/test.sh runs it"]
fn root_disk_export_is_a_qcow2_with_the_merged_ext4_root() {
    require_root();
    require_tool("qemu-img", "qemu-utils");
    require_tool("debugfs", "e2fsprogs");
    require_tool("zstd", "zstd");
    // A zstd-compressed base, so that `tar:` bases in .zst are covered too.
    let p = Project::new(
        "[images.bb]\nfrom = \"tar:bb.tar.zst\"\nsteps = [\"echo one > /etc/one\", \"echo two > /etc/two; rm /etc/one\"]\n",
    );
    let zst = Command::new("sh")
        .arg("-c")
        .arg("gzip -dc bb.tar.gz | zstd -q -o bb.tar.zst")
        .current_dir(p.project())
        .status()
        .unwrap();
    assert!(zst.success());
    let disk = p.path().join("bb.qcow2");
    let o = p.run(&["bake", "bb", "--export", "disk", disk.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("no kernel in the image"), "{}", text(&o));
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&disk)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    let raw = p.path().join("bb.raw");
    assert!(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&disk)
        .arg(&raw)
        .status()
        .unwrap()
        .success());
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&raw)
        .output()
        .unwrap();
    assert!(fsck.status.success(), "{}", text(&fsck));
    let cat = Command::new("debugfs")
        .args(["-R", "cat /etc/two"])
        .arg(&raw)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "two\n");
    let gone = Command::new("debugfs")
        .args(["-R", "stat /etc/one"])
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("File not found"),
        "{}",
        text(&gone)
    );
}

/// The run id in a project's artifacts folder.
fn artifacts_run_id(p: &Project) -> String {
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(p.project().join("artifacts/manifest.json")).unwrap(),
    )
    .unwrap();
    m["run_id"].as_str().unwrap().to_string()
}

#[test]
#[ignore = "needs root and s3s-fs: scripts/test.sh runs it"]
fn root_build_publishes_to_s3_multipart_and_publishing_again_sends_nothing() {
    require_root();
    require_tool("sha256sum", "coreutils");
    let w = tempfile::tempdir().unwrap();
    let s3 = common::S3Server::start(w.path(), "rel");
    // 200 MiB of random data: multipart; a small file: a plain put.
    let p = Project::new(
        "[settings]\npublish = \"s3://rel/team/app\"\n[images.bb]\nfrom = \"tar:bb.tar.gz\"\n[builds.app]\nimage = \"bb\"\nrun = [\"mkdir -p out && echo hello > out/small.txt && head -c 209715200 /dev/urandom > out/big.bin\"]\nartifacts = [\"out/*\"]\n",
    );
    let o = p.cmd(&["build"]).envs(s3.env()).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let run = artifacts_run_id(&p);
    assert!(
        text(&o).contains(&format!(
            "published run {run} to s3://rel/team/app/{run}/: 5 file(s) sent"
        )),
        "{}",
        text(&o)
    );
    // An independent client fetches the run back; SHA256SUMS checks it.
    let got = w.path().join("got");
    let cp = s3.aws(&[
        "s3",
        "cp",
        "--recursive",
        &format!("s3://rel/team/app/{run}/"),
        got.to_str().unwrap(),
    ]);
    assert!(cp.status.success(), "{}", text(&cp));
    let check = Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(&got)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    assert!(text(&check).contains("app/big.bin: OK"), "{}", text(&check));
    assert!(got.join("app/provenance.json").is_file());
    assert!(got.join("manifest.json").is_file());
    // Multipart: S3 gives such objects an ETag ending in -<parts>.
    let head = s3.aws(&[
        "s3api",
        "head-object",
        "--bucket",
        "rel",
        "--key",
        &format!("team/app/{run}/app/big.bin"),
    ]);
    let head: serde_json::Value = serde_json::from_slice(&head.stdout).unwrap();
    assert!(head["ETag"].as_str().unwrap().ends_with("-25\""), "{head}");
    let latest = s3.aws(&["s3", "cp", "s3://rel/team/app/latest", "-"]);
    assert_eq!(String::from_utf8_lossy(&latest.stdout), format!("{run}\n"));

    let again = p
        .cmd(&["publish", "--run", &run])
        .envs(s3.env())
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("0 file(s) sent (0 B, 0 B), 5 already there"),
        "{}",
        text(&again)
    );
}

#[test]
#[ignore = "needs root and s3s-fs: scripts/test.sh runs it"]
fn root_wrong_secret_key_fails_with_exit_3_and_publishes_no_manifest() {
    require_root();
    let w = tempfile::tempdir().unwrap();
    let s3 = common::S3Server::start(w.path(), "rel");
    let p = Project::new(
        "[images.bb]\nfrom = \"tar:bb.tar.gz\"\n[builds.app]\nimage = \"bb\"\nrun = [\"echo hi > a.txt\"]\nartifacts = [\"a.txt\"]\n",
    );
    let o = p.run(&["build"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = p
        .cmd(&["publish", "--to", "s3://rel/team"])
        .envs(s3.env())
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret-key")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("hint: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        "{out}"
    );
    assert!(!out.contains("not-the-secret-key"), "{out}");
    let ls = s3.aws(&["s3", "ls", "--recursive", "s3://rel/"]);
    assert!(!text(&ls).contains("manifest.json"), "{}", text(&ls));
    // The artifacts are still there to publish later.
    assert!(p.project().join("artifacts/app/a.txt").is_file());
}

#[test]
#[ignore = "needs root and openssl: scripts/test.sh runs it"]
fn root_signed_provenance_verifies_against_its_artifact_and_openssl_agrees() {
    require_root();
    require_tool("openssl", "openssl");
    let p = Project::new(
        "[settings]\nsigning_key = \"keys/release.pem\"\n[images.bb]\nfrom = \"tar:bb.tar.gz\"\n[builds.app]\nimage = \"bb\"\nrun = [\"echo hello > app.txt\"]\nartifacts = [\"app.txt\"]\n",
    );
    // A key made by openssl: slate reads the usual PKCS#8 PEM.
    std::fs::create_dir_all(p.project().join("keys")).unwrap();
    let key = p.project().join("keys/release.pem");
    let pubkey = p.project().join("keys/release.pub");
    for args in [
        vec![
            "genpkey",
            "-algorithm",
            "ed25519",
            "-out",
            key.to_str().unwrap(),
        ],
        vec![
            "pkey",
            "-in",
            key.to_str().unwrap(),
            "-pubout",
            "-out",
            pubkey.to_str().unwrap(),
        ],
    ] {
        assert!(Command::new("openssl")
            .args(&args)
            .status()
            .unwrap()
            .success());
    }
    let o = p.run(&["build"]);
    assert!(o.status.success(), "{}", text(&o));
    let art = p.project().join("artifacts/app/app.txt");
    let envelope = p.project().join("artifacts/app/provenance.dsse.json");
    let o = p.run(&[
        "provenance",
        "verify",
        art.to_str().unwrap(),
        "--key",
        pubkey.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("OK: app.txt (sha256 "), "{}", text(&o));

    // openssl checks the signature over DSSE's pre-authentication encoding.
    let env: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&envelope).unwrap()).unwrap();
    let b64 = |s: &str| {
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s '{s}' | base64 -d"))
            .output()
            .unwrap();
        o.stdout
    };
    let payload = b64(env["payload"].as_str().unwrap());
    let statement: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(statement["subject"][0]["name"], "app.txt");
    let mut pae = format!("DSSEv1 28 application/vnd.in-toto+json {} ", payload.len()).into_bytes();
    pae.extend_from_slice(&payload);
    std::fs::write(p.path().join("pae"), &pae).unwrap();
    std::fs::write(
        p.path().join("sig"),
        b64(env["signatures"][0]["sig"].as_str().unwrap()),
    )
    .unwrap();
    let v = Command::new("openssl")
        .args(["pkeyutl", "-verify", "-pubin", "-rawin", "-inkey"])
        .arg(&pubkey)
        .arg("-in")
        .arg(p.path().join("pae"))
        .arg("-sigfile")
        .arg(p.path().join("sig"))
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", text(&v));

    // A changed artifact, or another key, fails with exit 1 and says why.
    std::fs::write(&art, "tampered\n").unwrap();
    let o = p.run(&[
        "provenance",
        "verify",
        art.to_str().unwrap(),
        "--key",
        pubkey.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("does not match its signed provenance"),
        "{}",
        text(&o)
    );
    let other = p.path().join("other.pem");
    let o = p.run(&["provenance", "keygen", other.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let o = p.run(&[
        "provenance",
        "verify",
        art.to_str().unwrap(),
        "--key",
        &format!("{}.pub", other.display()),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("no signature in the envelope was made by the key"),
        "{}",
        text(&o)
    );
}

/// The layer cache is shared: `slate gc` in one project keeps what another
/// project uses, for as long as that project's config exists (when it
/// cannot be read, the layers it used when it last ran count).
#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_gc_keeps_another_projects_layers_until_that_project_is_gone() {
    require_root();
    let config = |name: &str| {
        format!("[images.bb]\nfrom = \"tar:bb.tar.gz\"\nsteps = [\"echo {name} > /etc/{name}\"]\n")
    };
    let a = Project::new(&config("mine"));
    let mut b = Project::new(&config("theirs"));
    b.cache = a.cache.clone();
    assert!(a.run(&["bake"]).status.success());
    assert!(b.run(&["bake"]).status.success());
    let layers = || {
        std::fs::read_dir(a.cache.join("v1/layers"))
            .unwrap()
            .flatten()
            .count()
    };
    let all = layers();
    let gc = |args: &[&str]| {
        let o = a.run(&[&["gc"], args].concat());
        assert!(o.status.success(), "{}", text(&o));
        text(&o)
    };
    let out = gc(&[]);
    assert!(out.contains("removed 0 layer(s)"), "{out}");
    assert!(out.contains("that 1 other project(s) use"), "{out}");
    assert_eq!(layers(), all);
    // Asked for: everything idle but this project's, listed, not removed.
    let out = gc(&["--dry-run", "--older-than", "0s"]);
    assert!(out.contains("would remove layer"), "{out}");
    assert!(out.contains("echo theirs > /etc/theirs"), "{out}");
    assert!(!out.contains("echo mine > /etc/mine"), "{out}");
    assert!(out.contains("nothing was removed"), "{out}");
    assert_eq!(layers(), all);
    // A config being edited: what it used when it last ran is kept.
    b.write("slate.toml", "[images.bb\n");
    let out = gc(&[]);
    assert!(out.contains("warning: cannot read"), "{out}");
    assert!(out.contains("removed 0 layer(s)"), "{out}");
    // The other project is gone: forgotten, and its layers go.
    std::fs::remove_dir_all(b.project()).unwrap();
    let out = gc(&[]);
    assert!(out.contains("forgot `"), "{out}");
    assert!(!out.contains("removed 0 layer(s)"), "{out}");
    assert!(layers() < all, "{out}");
    let o = a.run(&["bake"]);
    assert!(text(&o).contains("nothing to bake"), "{}", text(&o));
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_gc_removes_vm_disks_and_boot_files_of_removed_layers_only() {
    require_root();
    let p = Project::new("[images.bb]\nfrom = \"tar:bb.tar.gz\"\n");
    assert!(p.run(&["bake"]).status.success());
    let layer = std::fs::read_dir(p.cache.join("v1/layers"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .unwrap();
    // What the vm provider leaves in the cache: a base disk per layer set,
    // boot files per kernel (each naming what it was made from).
    let vm = p.cache.join("v1/vm");
    std::fs::create_dir_all(vm.join("disks")).unwrap();
    for (name, source) in [
        ("live", layer.clone()),
        ("dead", PathBuf::from("/gone/layer")),
    ] {
        std::fs::write(vm.join(format!("disks/{name}.qcow2")), vec![1u8; 8192]).unwrap();
        std::fs::write(
            vm.join(format!("disks/{name}.layers")),
            source.display().to_string(),
        )
        .unwrap();
        let k = vm.join(format!("kernels/{name}"));
        std::fs::create_dir_all(&k).unwrap();
        std::fs::write(k.join("source"), source.display().to_string()).unwrap();
        std::fs::write(k.join("vmlinux"), vec![2u8; 8192]).unwrap();
    }
    let o = p.run(&["gc"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(
            "removed 2 VM disk(s), boot file set(s) and saved machine(s) of removed layers"
        ),
        "{}",
        text(&o)
    );
    assert!(vm.join("disks/live.qcow2").exists() && vm.join("kernels/live/vmlinux").exists());
    assert!(!vm.join("disks/dead.qcow2").exists() && !vm.join("kernels/dead").exists());
    // With --all the layer goes, and so does what was made from it.
    let o = p.run(&["gc", "--all"]);
    assert!(text(&o).contains("removed 2 VM disk(s)"), "{}", text(&o));
    assert!(!vm.join("disks/live.qcow2").exists() && !vm.join("kernels/live").exists());
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_a_63_character_image_name_bakes_and_runs() {
    common::require_root();
    // Bake steps run as `bake-NAME`: 68 bytes here, more than a hostname
    // may have; the sandbox cuts it rather than failing the bake.
    let name = "i".repeat(63);
    let p = Project::new(&format!(
        "[images.{name}]\nfrom = \"tar:bb.tar.gz\"\nsteps = [\"hostname > /etc/baked-as\"]\n"
    ));
    let o = p.run(&[
        "run",
        &name,
        "--",
        "sh",
        "-c",
        "cat /etc/baked-as; hostname",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let baked_as = format!("bake-{name}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("{}\n{name}\n", &baked_as[..64])
    );
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_a_setuid_artifact_lands_without_its_setuid_bit() {
    common::require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.suid]\nimage = \"bb\"\nrun = [\"mkdir -p out\", \"cp /bin/busybox out/x\", \"chmod 6755 out/x\"]\nartifacts = [\"out/x\"]\n"
    ));
    let o = p.run(&["build"]);
    assert!(o.status.success(), "{}", text(&o));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(p.project().join("artifacts/suid/x"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755, "mode {mode:o}");
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_an_artifact_named_like_slates_provenance_is_refused() {
    common::require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.prov]\nimage = \"bb\"\nrun = [\"echo forged > provenance.json\"]\nartifacts = [\"provenance.json\"]\n"
    ));
    let o = p.run(&["build"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("named like slate's own `provenance.json`"),
        "{out}"
    );
    assert!(!p.project().join("artifacts/prov/provenance.json").exists());
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_an_image_symlink_at_a_mount_point_cannot_create_a_host_file() {
    common::require_root();
    // The image points /etc/resolv.conf at a host path; a network build
    // binds the host's resolv.conf there. Followed from the host's root,
    // the link once created the host file.
    let bait = format!("/etc/slate-escape-{}", std::process::id());
    let p = Project::new(
        "[images.evil]\nfrom = \"tar:evil.tar.gz\"\n\n[builds.net]\nimage = \"evil\"\nnetwork = true\nrun = [\"true\"]\n",
    );
    let tree = p.path().join("evil");
    std::fs::create_dir_all(&tree).unwrap();
    let sh = |script: &str| {
        let o = std::process::Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(p.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
    };
    sh(&format!(
        "tar -xzf project/bb.tar.gz -C evil && rm -f evil/etc/resolv.conf && ln -s {bait} evil/etc/resolv.conf && tar -czf project/evil.tar.gz -C evil ."
    ));
    let o = p.run(&["build"]);
    let out = text(&o);
    let created = std::path::Path::new(&bait).exists();
    let _ = std::fs::remove_file(&bait);
    assert!(!created, "the build created {bait} on the host: {out}");
    assert_eq!(o.status.code(), Some(3), "{out}");
    assert!(
        out.contains("symlink in the image where slate mounts"),
        "{out}"
    );
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_targets_of_one_run_never_trip_over_each_others_artifacts() {
    common::require_root();
    // A build without `inputs` copies the project folder; artifacts/ (and
    // the run's staging folder in it) changes under that walk as the other
    // targets finish (two at a time, so walks overlap commits). 3 runs in
    // 20 once ended in an infrastructure failure.
    let p = Project::new(&format!(
        "{IMAGE}[builds.t]\nimage = \"bb\"\nmatrix = {{ n = [\"1\", \"2\", \"3\", \"4\", \"5\", \"6\", \"7\", \"8\", \"9\", \"10\", \"11\", \"12\", \"13\", \"14\", \"15\", \"16\"] }}\nrun = [\"mkdir -p out\", \"echo {{n}} > out/n\"]\nartifacts = [\"out/n\"]\n"
    ));
    for round in 0..20 {
        let o = p.run(&["build", "-j", "2"]);
        assert!(o.status.success(), "round {round}: {}", text(&o));
    }
    assert_eq!(p.read("artifacts/t-8/n"), "8\n");
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_commands_start_with_default_signals_sigint_and_sigpipe_included() {
    common::require_root();
    let p = Project::new(IMAGE);
    // `slate run` ignores Ctrl-C itself while the command owns the
    // terminal; the command must not inherit that.
    let o = p.run(&["run", "bb", "--", "sh", "-c", "kill -INT $$; echo survived"]);
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    assert!(!text(&o).contains("survived"), "{}", text(&o));
    // Rust ignores SIGPIPE in slate; a pipeline's writer must still die of it.
    let o = p.run(&[
        "run",
        "bb",
        "--",
        "sh",
        "-c",
        "(yes; echo \"yes exited $?\" >&2) | head -n 1 >/dev/null",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("yes exited 141"), "{}", text(&o));
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_a_second_run_into_the_same_artifacts_folder_is_refused_while_the_first_runs() {
    common::require_root();
    use std::io::Read;
    // The first run's build holds a connection to this listener: while it
    // is open, that run is surely in progress.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let p = Project::new(&format!(
        "{IMAGE}[builds.hold]\nimage = \"bb\"\nnetwork = true\nrun = [\"mkdir -p out\", \"nc 127.0.0.1 {port} > out/said\"]\nartifacts = [\"out/said\"]\n"
    ));
    let first = p
        .cmd(&["build"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    // The second run's own build would not wait for anything.
    p.write(
        "slate.toml",
        &format!("{IMAGE}[builds.hold]\nimage = \"bb\"\nrun = [\"true\"]\n"),
    );
    let second = p.run(&["build"]);
    let err = String::from_utf8_lossy(&second.stderr).to_string();
    assert_eq!(second.status.code(), Some(2), "{err}");
    assert!(
        err.contains("another slate run is writing the artifacts folder"),
        "{err}"
    );
    std::io::Write::write_all(&mut conn, b"first\n").unwrap();
    drop(conn);
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success());
    let mut said = String::new();
    std::fs::File::open(p.project().join("artifacts/hold/said"))
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    assert_eq!(said, "first\n");
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_a_multi_line_secret_is_masked_line_by_line_in_output_and_logs() {
    require_root();
    let body = "MC4CAQAwBQYDK2VwBCIEIFX0Xq8wBHnVcWz1";
    let key = format!("-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----");
    let p = Project::new(&format!(
        "{IMAGE}[builds.app]\nimage = \"bb\"\nsecrets = [\"SIGNING_KEY\"]\nrun = [\"echo \\\"$SIGNING_KEY\\\"\"]\n"
    ));
    let o = p.cmd(&["build"]).env("SIGNING_KEY", &key).output().unwrap();
    let printed = text(&o);
    assert!(o.status.success(), "{printed}");
    assert!(!printed.contains(body), "printed: {printed}");
    assert!(printed.contains("[app] ***"), "{printed}");
    for f in all_files(&p.project().join(".slate")) {
        let data = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).to_string();
        assert!(!data.contains(body), "{} holds the key", f.display());
    }
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_one_inputs_symlink_cannot_carry_anothers_files_onto_the_host() {
    require_root();
    // Input `a` holds `l -> <host folder>`, input `b` holds `l/x`: copied
    // into one workdir, b's file went through a's link onto the host.
    let p = Project::new(&format!(
        "{IMAGE}[builds.app]\nimage = \"bb\"\ninputs = [\"a\", \"b\"]\nrun = [\"test ! -L l\", \"grep -q planted l/x\"]\n"
    ));
    let victim = p.path().join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::create_dir_all(p.project().join("a")).unwrap();
    std::os::unix::fs::symlink(&victim, p.project().join("a/l")).unwrap();
    p.write("b/l/x", "planted\n");
    let o = p.run(&["build"]);
    let out = text(&o);
    assert!(
        !victim.join("x").exists(),
        "an input was written on the host: {out}"
    );
    // The later input's folder takes the place of the earlier one's link.
    assert!(o.status.success(), "{out}");
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_gc_removes_every_leftover_it_can_and_names_the_one_it_cannot() {
    require_root();
    let p = Project::new(IMAGE);
    let envs = p.cache.join("v1/envs");
    for i in 0..5 {
        std::fs::create_dir_all(envs.join(format!("dead-{i}/root"))).unwrap();
        std::fs::write(envs.join(format!("dead-{i}/root/f")), "x").unwrap();
        // A lease nobody holds: its slate process is gone.
        std::fs::write(envs.join(format!("dead-{i}/lease")), "").unwrap();
    }
    // A leftover with something mounted in it cannot be removed.
    let busy = envs.join("busy-0/m");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(envs.join("busy-0/lease"), "").unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "none"])
        .arg(&busy)
        .status()
        .unwrap();
    assert!(mounted.success());
    let o = p.run(&["gc"]);
    let _ = std::process::Command::new("umount").arg(&busy).status();
    let out = text(&o);
    assert_eq!(o.status.code(), Some(3), "{out}");
    assert!(out.contains("removed 5 leftover environment(s)"), "{out}");
    assert!(
        out.contains("could not remove 1 item(s)") && out.contains("busy-0"),
        "{out}"
    );
    for i in 0..5 {
        assert!(
            !envs.join(format!("dead-{i}")).exists(),
            "dead-{i} left: {out}"
        );
    }
}

/// `slate completions bash` completes commands and their options in a real
/// bash, as the completion function bash calls would.
#[test]
fn bash_completion_completes_commands_and_options() {
    let complete = |words: &str, cword: usize| {
        let script = format!(
            "source <(\"$SLATE\" completions bash); COMP_WORDS=({words}); COMP_CWORD={cword}; \
             _slate slate \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\""
        );
        let o = Command::new("bash")
            .args(["-c", &script])
            .env("SLATE", env!("CARGO_BIN_EXE_slate"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(complete("slate bu", 1), "build\n");
    assert_eq!(complete("slate build --ju", 2), "--junit\n");
    assert!(complete("slate g", 1).lines().any(|l| l == "gc"));
}

/// `slate man` is a manual page groff renders without a warning, with a
/// section per command.
#[test]
#[ignore = "needs groff: scripts/test.sh runs it"]
fn the_manual_page_renders_with_every_command() {
    common::require_tool("groff", "groff-base");
    let page = Command::new(env!("CARGO_BIN_EXE_slate"))
        .arg("man")
        .output()
        .unwrap();
    assert!(page.status.success(), "{}", text(&page));
    let render = |extra: &[&str]| {
        let mut c = Command::new("groff");
        c.args(["-man", "-Tutf8"]).args(extra);
        c.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&page.stdout).unwrap();
        child.wait_with_output().unwrap()
    };
    let warnings = render(&["-ww", "-z"]);
    assert!(warnings.stderr.is_empty(), "{}", text(&warnings));
    let shown = String::from_utf8_lossy(&render(&[]).stdout).into_owned();
    for cmd in [
        "slate-build",
        "slate-bake",
        "slate-gc",
        "slate-verify",
        "slate-completions",
    ] {
        assert!(shown.contains(cmd), "{cmd} is not in the page");
    }
}

/// An ssh target with no hosts to go to is refused before anything runs,
/// saying where to name them.
#[test]
fn an_ssh_target_without_hosts_is_refused_naming_the_section() {
    let p = Project::config_only(
        "[images.bb]\nfrom = \"tar:bb.tar.gz\"\n[builds.far]\nimage = \"bb\"\nprovider = \"ssh\"\nrun = [\"true\"]\n",
    );
    let o = p.run(&["build"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("[providers.ssh] names no hosts"), "{err}");
    assert!(err.contains("hosts = ["), "{err}");
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_every_run_writes_its_log_as_ecs_ndjson() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.ok]\nimage = \"bb\"\nrun = [\"echo built fine\"]\n\
         [builds.bad]\nimage = \"bb\"\nrun = [\"echo about to fail >&2; exit 4\"]\n"
    ));
    let o = p.run(&["build"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let (run_id, run) = p.last_run();
    let text = std::fs::read_to_string(run.join("run.ecs.ndjson")).unwrap();
    let docs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for d in &docs {
        assert!(
            humantime::parse_rfc3339(d["@timestamp"].as_str().unwrap()).is_ok(),
            "{d}"
        );
        assert!(
            d["log"]["level"].is_string() && d["message"].is_string(),
            "{d}"
        );
        assert_eq!(d["labels"]["run"], run_id.as_str(), "{d}");
        assert_eq!(d["event"]["dataset"], "slate.run", "{d}");
        assert!(d["ecs"]["version"].is_string(), "{d}");
    }
    let find = |target: &str, action: &str| {
        docs.iter()
            .find(|d| d["labels"]["target"] == target && d["event"]["action"] == action)
            .unwrap_or_else(|| panic!("no {action} of {target} in {text}"))
    };
    let line = find("ok", "output");
    assert_eq!(line["message"], "built fine");
    assert_eq!(line["labels"]["provider"], "sandbox");
    assert_eq!(line["labels"]["image"], "bb");
    assert!(
        line["labels"]["step"]
            .as_str()
            .unwrap()
            .contains("echo built fine"),
        "{line}"
    );
    let err = docs
        .iter()
        .find(|d| d["labels"]["target"] == "bad" && d["message"] == "about to fail")
        .unwrap();
    assert_eq!(err["labels"]["stream"], "stderr");
    let end = find("bad", "target_finished");
    assert_eq!(end["log"]["level"], "error");
    assert_eq!(end["event"]["outcome"], "failure");
    assert_eq!(end["slate"]["exit_code"], 4);
    assert!(end["event"]["duration"].as_u64().unwrap() > 0, "{end}");
    assert_eq!(find("ok", "target_finished")["event"]["outcome"], "success");
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_logs_follow_prints_a_running_targets_log_until_it_ends() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.long]\nimage = \"bb\"\nrun = [\"echo first-line\", \"sleep 600\"]\n"
    ));
    let mut build = common::spawn_until_printed(p.cmd(&["build"]), "first-line");
    let mut follow = p
        .cmd(&["logs", "long", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(follow.stdout.take().unwrap()).lines();
    // It prints what is there while the target still runs (it sleeps for
    // ten minutes)...
    let seen: Vec<String> = lines
        .by_ref()
        .map_while(Result::ok)
        .take_while(|l| l != "first-line")
        .collect();
    assert!(
        build.try_wait().unwrap().is_none(),
        "the build ended: {seen:?}"
    );
    // ...and what comes after, and ends with the target.
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(build.id() as i32, libc::SIGINT) };
    build.wait().unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let o = follow.wait_with_output().unwrap();
    assert!(o.status.success(), "{rest:?} {}", text(&o));
    assert!(
        rest.last().is_some_and(|l| l.starts_with("==> cancelled")),
        "{rest:?}"
    );
    assert!(rest.iter().any(|l| l == "==> destroy"), "{rest:?}");
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_progress_is_live_on_a_terminal_plain_elsewhere_and_no_color_is_honoured() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.a]\nimage = \"bb\"\nrun = [\"echo from-a\"]\n\
         [builds.b]\nimage = \"bb\"\nrun = [\"echo from-b\"]\n"
    ));
    // On a terminal, with and without NO_COLOR.
    let on_tty = |args: &str, no_color: bool| {
        let env: &[(&str, &str)] = if no_color { &[("NO_COLOR", "1")] } else { &[] };
        let o = p.on_terminal(args, b"", env);
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let live = on_tty("build", false);
    // One line per running target with its step, redrawn in place, in
    // colour; finished lines scroll above it.
    assert!(live.contains("\x1b[J"), "{live:?}");
    assert!(live.contains("\x1b[36m⏵\x1b[0m a  "), "{live:?}");
    assert!(live.contains("from-a"), "{live:?}");
    // NO_COLOR: still live, no colour.
    let bare = on_tty("build", true);
    assert!(
        bare.contains("\x1b[J") && bare.contains("⏵ a  "),
        "{bare:?}"
    );
    assert!(
        !bare.contains("\x1b[36m") && !bare.contains("\x1b[2m"),
        "{bare:?}"
    );
    // --progress plain on a terminal, and any output that is not one:
    // prefixed lines and nothing else.
    let plain = on_tty("--progress plain build", true);
    assert!(
        plain.contains("[b] from-b") && !plain.contains("\x1b[J"),
        "{plain:?}"
    );
    let piped = p.run(&["build"]);
    let out = String::from_utf8_lossy(&piped.stdout);
    assert!(out.contains("[b] from-b"), "{out}");
    assert!(!out.contains('\x1b'), "{out:?}");
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_keep_failed_keeps_a_failed_environment_to_enter_as_it_was() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.broken]\nimage = \"bb\"\nworkdir = \"/work\"\n\
         run = [\"echo from-the-build > /root/evidence\", \"rm /etc/two\", \"exit 3\"]\n\
         [builds.fine]\nimage = \"bb\"\nrun = [\"echo ok > /root/evidence\"]\n"
    ));
    let o = p.run(&["build", "--keep-failed"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let hint = out
        .lines()
        .find(|l| l.starts_with("kept broken's environment"))
        .unwrap_or_else(|| panic!("no kept environment said: {out}"));
    let id = hint
        .split('`')
        .nth(1)
        .and_then(|c| c.strip_prefix("slate shell --keep "))
        .unwrap()
        .to_string();
    assert!(id.ends_with("/broken"), "{hint}");
    assert!(
        !out.contains("kept fine's"),
        "a target that succeeded was kept: {out}"
    );
    // No live environment is left: only the kept folder.
    assert_eq!(p.envs_left(), 0);
    let runs = text(&p.run(&["runs"]));
    assert!(
        runs.contains(&format!("kept {id}: `slate shell --keep {id}`")),
        "{runs}"
    );

    // Entered on a terminal: the file the build wrote is there, the one it
    // removed is gone, the working folder is the target's.
    let enter = |input: &[u8]| p.enter_kept(&id, input);
    let seen = enter(
        b"echo \"at=$(pwd) has=$(cat /root/evidence) two=$(test -e /etc/two && echo yes || echo no)\"; echo changed > /root/evidence; exit\n",
    );
    assert!(
        seen.contains("at=/work has=from-the-build two=no"),
        "{seen}"
    );
    // What a shell changes is thrown away: the kept state stays as it was.
    let again = enter(b"echo \"has=$(cat /root/evidence)\"; exit\n");
    assert!(again.contains("has=from-the-build"), "{again}");

    // Within its 24 h gc keeps it; `gc --all` removes it.
    let o = p.run(&["gc"]);
    assert!(
        text(&o).contains("removed 0 kept environment(s)"),
        "{}",
        text(&o)
    );
    let o = p.run(&["gc", "--all"]);
    assert!(
        text(&o).contains("removed 1 kept environment(s)"),
        "{}",
        text(&o)
    );
    let o = p.run(&["shell", "--keep", &id]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("no kept environment"), "{}", text(&o));
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_a_cache_mount_is_seen_by_the_next_target_and_never_in_artifacts_or_layers() {
    require_root();
    let config = format!(
        "{IMAGE}[builds.first]\nimage = \"bb\"\ncaches = [\"/root/.cache/dl\"]\n\
         run = [\"test ! -e /root/.cache/dl/fetched\", \"echo payload > /root/.cache/dl/fetched\", \"mkdir -p out; echo made > out/a\"]\n\
         artifacts = [\"out/*\"]\n\
         [builds.second]\nimage = \"bb\"\ncaches = [{{ path = \"/root/.cache/dl\", sharing = \"locked\" }}]\n\
         run = [\"mkdir -p out; cat /root/.cache/dl/fetched > out/b\"]\nartifacts = [\"out/*\"]\n\
         [builds.leak]\nimage = \"bb\"\nworkdir = \"/src\"\ncaches = [\"/src/target\"]\n\
         run = [\"mkdir -p target; echo x > target/app\"]\nartifacts = [\"target/app\"]\n\
         [images.withcache]\nfrom = \"image:bb\"\ncaches = [\"/var/cache/dl\"]\n\
         steps = [\"echo from-a-bake > /var/cache/dl/baked; echo built > /etc/built\"]\n\
         [builds.reads]\nimage = \"withcache\"\ncaches = [\"/var/cache/dl\"]\n\
         run = [\"mkdir -p out; cat /var/cache/dl/baked /etc/built > out/c\"]\nartifacts = [\"out/*\"]\n"
    );
    let p = Project::new(&config);
    let o = p.run(&["build", "first"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = p.run(&["build", "second"]);
    assert!(o.status.success(), "{}", text(&o));
    // The second target saw what the first left in the cache.
    assert_eq!(p.read("artifacts/second/b"), "payload\n");
    // Not an artifact, not in any layer: only in the cache's own folder.
    let sums = p.read("artifacts/SHA256SUMS");
    assert!(!sums.contains("fetched"), "{sums}");
    let holding: Vec<PathBuf> = all_files(&p.cache)
        .into_iter()
        .filter(|f| f.ends_with("fetched"))
        .collect();
    assert_eq!(holding.len(), 1, "{holding:?}");
    assert!(
        holding[0].to_string_lossy().contains("/caches/"),
        "{holding:?}"
    );
    let images = text(&p.run(&["images"]));
    assert!(images.contains("cache root-.cache-dl"), "{images}");
    // An image's bake steps use caches too: what a step leaves there is in
    // no layer, and a target naming the cache sees it.
    let o = p.run(&["build", "reads"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(p.read("artifacts/reads/c"), "from-a-bake\nbuilt\n");
    let baked: Vec<PathBuf> = all_files(&p.cache)
        .into_iter()
        .filter(|f| f.ends_with("baked"))
        .collect();
    assert_eq!(baked.len(), 1, "{baked:?}");
    assert!(baked[0].to_string_lossy().contains("/caches/"), "{baked:?}");
    // An artifact inside a cache is refused, saying why.
    let o = p.run(&["build", "leak"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("lies in the cache mount `/src/target`"),
        "{}",
        text(&o)
    );

    // Another project with the same cache path starts from an empty one.
    let mut other = Project::new(&config);
    other.cache = p.cache.clone();
    let o = other.run(&["build", "first"]);
    assert!(
        o.status.success(),
        "another project saw this one's cache: {}",
        text(&o)
    );

    // gc keeps caches; gc --all removes them.
    assert!(text(&p.run(&["gc"])).contains("removed 0 cache mount(s)"));
    let o = p.run(&["gc", "--all"]);
    assert!(
        text(&o).contains("removed 4 cache mount(s)"),
        "{}",
        text(&o)
    );
    assert!(all_files(&p.cache).iter().all(|f| !f.ends_with("fetched")));
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_privileges_packages_lets_a_build_change_owners_and_nothing_more() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.plain]\nimage = \"bb\"\nrun = [\"touch f; chown 1:1 f\"]\n\
         [builds.pkg]\nimage = \"bb\"\nprivileges = \"packages\"\n\
         run = [\"touch f; chown 1:1 f\", \"if mknod /dev/x c 1 3 2>/dev/null; then exit 9; fi\", \"if mount -t tmpfs t /mnt 2>/dev/null; then exit 10; fi\"]\n"
    ));
    // Root by name only: owners cannot change.
    let o = p.run(&["build", "plain"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    // With a package manager's privileges they can; devices and mounts
    // stay out of reach.
    let o = p.run(&["build", "pkg"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
#[ignore = "needs root and s3s-fs: scripts/test.sh runs it"]
fn root_layers_sent_with_cache_to_are_pulled_whole_and_a_corrupt_one_is_refused_and_rebaked() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let s3 = common::S3Server::start(dir.path(), "layers");
    let objects = s3.data.join("layers/team/layers");
    layer_cache_round_trip(
        "s3://layers/team",
        &s3.env(),
        |keys| {
            for key in keys {
                // The object has the sha256 the cache's record names.
                let rec: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(objects.join(format!("{key}.json"))).unwrap(),
                )
                .unwrap();
                let sum = Command::new("sha256sum")
                    .arg(objects.join(format!("{key}.tar")))
                    .output()
                    .unwrap();
                let sum = String::from_utf8_lossy(&sum.stdout);
                assert_eq!(
                    sum.split_whitespace().next(),
                    rec["sha256"].as_str(),
                    "{rec}"
                );
            }
        },
        |victim| objects.join(format!("{victim}.tar")),
    );
}

/// The layer cache in a real OCI registry (Debian's docker-registry): each
/// layer an artifact tagged with its key, pulled whole, and a blob changed
/// in the registry's storage refused and its layer baked.
#[test]
#[ignore = "needs root and docker-registry: scripts/test.sh runs it"]
fn root_layers_sent_to_a_registry_are_pulled_by_digest_and_a_changed_one_is_rebaked() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let reg = common::Registry::start(dir.path());
    let curl = |path: &str| -> serde_json::Value {
        let o = Command::new("curl")
            .args([
                "-sf",
                "-H",
                "Accept: application/vnd.oci.image.manifest.v1+json",
                &format!("http://{}/v2/team/layers/{path}", reg.addr),
            ])
            .output()
            .unwrap();
        serde_json::from_slice(&o.stdout).unwrap()
    };
    layer_cache_round_trip(
        &format!("oci://{}/team/layers", reg.addr),
        &[],
        |keys| {
            // Each layer is a manifest tagged with its key (read with curl,
            // not slate).
            let mut listed: Vec<String> = curl("tags/list")["tags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect();
            listed.sort();
            assert_eq!(listed, keys);
        },
        |victim| {
            let manifest = curl(&format!("manifests/{victim}"));
            let hex = manifest["layers"][0]["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string();
            dir.path()
                .join("regdata/docker/registry/v2/blobs/sha256")
                .join(&hex[..2])
                .join(&hex)
                .join("data")
        },
    );
}

/// A layer cache at `url` (reached with `env`), for real: three layers sent
/// once; a machine with an empty cache pulls them, each identical to what
/// was baked (`stored` checks the cache's own side, given the sorted
/// keys); then one byte of the `echo two` layer's tar is changed where the
/// cache keeps it (`tar_of` names that file) and the next machine refuses
/// that layer, bakes it, and pulls the others.
fn layer_cache_round_trip(
    url: &str,
    env: &[(&'static str, String)],
    stored: impl Fn(&[String]),
    tar_of: impl Fn(&str) -> PathBuf,
) {
    let a = Project::new(&format!(
        "{IMAGE}[builds.app]\nimage = \"bb\"\nrun = [\"cat /etc/two\"]\n"
    ));
    let slate = |p: &Project, args: &[&str]| {
        let o = p
            .cmd(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        text(&o)
    };
    let out = slate(&a, &["bake", "--cache-to", url]);
    assert!(out.contains("sent 3 layer(s)"), "{out}");
    // Again: nothing is sent twice.
    assert!(slate(&a, &["bake", "--cache-to", url]).contains("sent 0 layer(s)"));
    let mut keys: Vec<String> = std::fs::read_dir(a.cache.join("v1/layers"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    keys.sort();
    assert_eq!(keys.len(), 3);
    stored(&keys);

    // Another machine (an empty cache, the same recipe) pulls every layer.
    let same_recipe = || {
        let p = Project::new(&a.read("slate.toml"));
        std::fs::copy(a.project().join("bb.tar.gz"), p.project().join("bb.tar.gz")).unwrap();
        p
    };
    let b = same_recipe();
    let out = slate(&b, &["bake", "--cache-from", url]);
    assert!(
        out.contains("0 layer(s) baked, 3 pulled from the layer cache"),
        "{out}"
    );
    for key in &keys {
        // What was pulled is what was baked, file for file.
        let diff = Command::new("diff")
            .arg("-r")
            .arg(a.cache.join("v1/layers").join(key).join("fs"))
            .arg(b.cache.join("v1/layers").join(key).join("fs"))
            .output()
            .unwrap();
        assert!(
            diff.status.success(),
            "layer {key} differs: {}",
            text(&diff)
        );
    }
    assert_eq!(
        text(&b.run(&["run", "bb", "--", "cat", "/etc/two"])).trim(),
        "two"
    );

    // A tar changed in the cache is refused and its layer baked here.
    let victim = keys
        .iter()
        .find(|k| {
            std::fs::read_to_string(a.cache.join("v1/layers").join(k).join("layer.json"))
                .unwrap()
                .contains("echo two")
        })
        .unwrap();
    let tar = tar_of(victim);
    let mut data = std::fs::read(&tar).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&tar, data).unwrap();
    let c = same_recipe();
    let out = slate(&c, &["bake", "--cache-from", url]);
    assert!(
        out.contains(&format!(
            "layer {} from the layer cache refused, baking it: its tar has sha256",
            &victim[..12]
        )),
        "{out}"
    );
    assert!(
        out.contains("1 layer(s) baked, 2 pulled from the layer cache"),
        "{out}"
    );
    assert_eq!(
        text(&c.run(&["run", "bb", "--", "cat", "/etc/two"])).trim(),
        "two"
    );
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn root_a_build_cannot_make_slate_write_a_host_file_through_its_cache() {
    require_root();
    let p = Project::new(&format!(
        "{IMAGE}[builds.plant]\nimage = \"bb\"\ncaches = [\"/root/.cache/dl\"]\n\
         env = {{ VICTIM = \"{victim}\" }}\n\
         run = [\"for n in .slate-used root-.cache-dl.used used lock; do ln -sfn \\\"$VICTIM\\\" /root/.cache/dl/$n; done\"]\n",
        victim = "VICTIM_PATH"
    ));
    // A host file the build knows the path of, as a hostile build could
    // guess /etc/shadow.
    let victim = p.path().join("victim");
    std::fs::write(&victim, "keep me\n").unwrap();
    let config = p
        .read("slate.toml")
        .replace("VICTIM_PATH", &victim.display().to_string());
    p.write("slate.toml", &config);
    // The first build plants symlinks in the cache; the second (and gc,
    // which reads the cache's age) make slate touch the cache again.
    for args in [&["build"][..], &["build"], &["gc", "--older-than", "300d"]] {
        let o = p.run(args);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
    }
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me\n");
}
