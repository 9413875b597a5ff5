//! The ec2 provider for real, against moto's EC2 and EBS APIs on
//! loopback. moto launches no machines, so each test runs in a network
//! namespace of its own whose loopback answers for the subnet moto hands
//! addresses out of, with one OpenSSH server listening there: an instance
//! moto says is at 10.99.1.5 answers ssh at 10.99.1.5, and a target goes
//! API → ssh → build → artifacts → terminate end to end. What moto answers
//! is read back with boto3, not with slate's own client. Needs root and
//! moto (`scripts/test.sh` installs it into target/tools/py).

mod common;

use common::{text, Project, SshHosts};
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

const IMAGE: &str = "[images.bb]\nfrom = \"tar:bb.tar.gz\"\nsteps = [\"echo one > /etc/one\"]\n";

/// Runs `f` on a thread of its own in a new network namespace (a thread's
/// namespace is its own; what it starts inherits it), with loopback up and
/// answering for every address of 10.99.0.0/16.
fn in_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            // SAFETY: unshare has no memory preconditions; it moves this
            // thread alone into a new network namespace.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                r,
                0,
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            );
            for args in [
                &["link", "set", "lo", "up"][..],
                &[
                    "route",
                    "add",
                    "local",
                    "10.99.0.0/16",
                    "dev",
                    "lo",
                    "table",
                    "local",
                ],
            ] {
                let ip = common::require_tool("ip", "iproute2");
                let o = Command::new(ip).args(args).output().unwrap();
                assert!(o.status.success(), "ip {args:?}: {}", text(&o));
            }
            f()
        });
        match t.join() {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e),
        }
    })
}

/// moto on a loopback port, a VPC and subnet in it, one sshd for every
/// instance, stopped when dropped.
struct Cloud {
    moto: Child,
    endpoint: String,
    subnet: String,
    ami: String,
    ssh: SshHosts,
    python: PathBuf,
}

const CREDS: [(&str, &str); 4] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_REGION", "us-east-1"),
];

impl Cloud {
    #[track_caller]
    fn start(dir: &Path) -> Cloud {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/tools/py/bin");
        let server = venv.join("moto_server");
        assert!(
            server.is_file(),
            "this test needs moto, an EC2 API server: scripts/test.sh installs it into target/tools/py"
        );
        let port = common::free_port();
        let moto = Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let endpoint = format!("http://127.0.0.1:{port}");
        // Ready when its own API answers (bounded: 30 s).
        let ready = (0..1500).any(|_| {
            let answered = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
                let _ = s.write_all(b"GET /moto-api/ HTTP/1.0\r\n\r\n");
                let mut head = [0u8; 12];
                s.read_exact(&mut head).is_ok()
                    && head.starts_with(b"HTTP/1.")
                    && &head[9..12] == b"200"
            });
            if !answered {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            answered
        });
        let mut cloud = Cloud {
            moto,
            endpoint,
            subnet: String::new(),
            ami: String::new(),
            ssh: SshHosts::start_on(&dir.join("ssh"), "0.0.0.0", &[""]),
            python: venv.join("python"),
        };
        assert!(ready, "moto did not start on {}", cloud.endpoint);
        let made = cloud.py(
            "vpc = ec2.create_vpc(CidrBlock='10.99.0.0/16')['Vpc']['VpcId']\n\
             sub = ec2.create_subnet(VpcId=vpc, CidrBlock='10.99.1.0/24')['Subnet']['SubnetId']\n\
             ami = ec2.describe_images(Owners=['amazon'])['Images'][0]['ImageId']\n\
             out = {'subnet': sub, 'ami': ami}",
        );
        cloud.subnet = made["subnet"].as_str().unwrap().to_string();
        cloud.ami = made["ami"].as_str().unwrap().to_string();
        cloud
    }

    /// Runs Python with `ec2` a boto3 client of moto's; prints `out` as JSON.
    #[track_caller]
    fn py(&self, code: &str) -> serde_json::Value {
        let script = format!(
            "import boto3, json, datetime\n\
             ec2 = boto3.client('ec2', endpoint_url='{}', region_name='us-east-1')\n\
             out = None\n{code}\nprint(json.dumps(out, default=str))\n",
            self.endpoint
        );
        let o = Command::new(&self.python)
            .args(["-c", &script])
            .envs(CREDS)
            .output()
            .unwrap();
        assert!(o.status.success(), "python: {}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// Every instance moto knows: `(id, state, tags)`.
    fn instances(&self) -> Vec<(String, String, std::collections::BTreeMap<String, String>)> {
        let v = self.py(
            "out = [{'id': i['InstanceId'], 'state': i['State']['Name'], \
             'tags': {t['Key']: t['Value'] for t in i.get('Tags', [])}} \
             for r in ec2.describe_instances()['Reservations'] for i in r['Instances']]",
        );
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let tags = i["tags"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect();
                (
                    i["id"].as_str().unwrap().to_string(),
                    i["state"].as_str().unwrap().to_string(),
                    tags,
                )
            })
            .collect()
    }

    /// The `[providers.ec2]` section for this cloud, AMI `ami`.
    fn config(&self, ami: &str) -> String {
        format!(
            "[providers.ec2]\nendpoint = \"{}\"\nregion = \"us-east-1\"\nami = \"{ami}\"\n\
             instance_type = \"t3.micro\"\nsubnet = \"{}\"\naddress = \"private\"\n\
             ssh_port = {}\nidentity = \"{}\"\nmax_instances = 4\n",
            self.endpoint,
            self.subnet,
            self.ssh.hosts[0].port,
            self.ssh.client_key().display()
        )
    }

    /// slate `args` in `p` with the test credentials.
    fn slate(&self, p: &Project, args: &[&str]) -> Output {
        p.cmd(args).envs(CREDS).output().unwrap()
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.moto.kill();
        let _ = self.moto.wait();
    }
}

#[test]
#[ignore = "needs root, openssh-server and moto: scripts/test.sh runs it"]
fn root_ec2_each_target_gets_a_tagged_instance_and_every_one_is_terminated() {
    common::require_root();
    in_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let cloud = Cloud::start(dir.path());
        let p = Project::new(&format!(
            "{IMAGE}[builds.t]\nimage = \"bb\"\nprovider = \"ec2\"\ntimeout = \"20m\"\n\
             matrix = {{ n = [\"1\", \"2\"] }}\n\
             run = [\"mkdir -p out\", \"cat /etc/one > out/{{n}}.txt\"]\n\
             artifacts = [\"out/{{n}}.txt\"]\n{}",
            cloud.config(&cloud.ami)
        ));
        let started = std::time::SystemTime::now();
        let o = cloud.slate(&p, &["build"]);
        let out = text(&o);
        assert!(o.status.success(), "{out}");
        assert_eq!(p.read("artifacts/t-1/1.txt"), "one\n", "{out}");
        assert_eq!(p.read("artifacts/t-2/2.txt"), "one\n", "{out}");
        let run = out
            .lines()
            .find_map(|l| l.strip_prefix("run ").and_then(|r| r.split(':').next()))
            .unwrap_or_else(|| panic!("no run id in: {out}"))
            .to_string();

        let all = cloud.instances();
        assert_eq!(all.len(), 2, "one instance per target: {all:?}");
        let mut targets: Vec<&str> = all
            .iter()
            .map(|(_, _, tags)| tags["slate:target"].as_str())
            .collect();
        targets.sort();
        assert_eq!(targets, ["t-1", "t-2"], "{all:?}");
        for (id, state, tags) in &all {
            assert_eq!(state, "terminated", "{id} was left {state}: {out}");
            assert_eq!(tags["slate:run"], run, "{id}: {tags:?}");
            // Launch + the 20 min timeout + boot and margin: at least 20
            // minutes after the run started, within a day.
            let expires = humantime::parse_rfc3339(&tags["slate:expires"]).unwrap();
            let ttl = expires.duration_since(started).unwrap().as_secs();
            assert!(
                (20 * 60..24 * 3600).contains(&ttl),
                "{id}: expires in {ttl} s"
            );
        }
        // The artifacts' provenance names the provider.
        let prov = p.read("artifacts/t-1/provenance.json");
        assert!(prov.contains("\"ec2\""), "{prov}");
    });
}

#[test]
#[ignore = "needs root, openssh-server and moto: scripts/test.sh runs it"]
fn root_ec2_after_kill_9_gc_remote_terminates_the_instance_once_it_has_expired() {
    common::require_root();
    in_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let cloud = Cloud::start(dir.path());
        let p = Project::new(&format!(
            "{IMAGE}[builds.hang]\nimage = \"bb\"\nprovider = \"ec2\"\n\
             run = [\"echo started-building\", \"sleep 600\"]\n{}",
            cloud.config(&cloud.ami)
        ));
        let mut child = p
            .cmd(&["build"])
            .envs(CREDS)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut seen = Vec::new();
        for l in lines.by_ref().map_while(Result::ok) {
            let started = l.ends_with("] started-building");
            seen.push(l);
            if started {
                break;
            }
        }
        assert!(
            seen.last().is_some_and(|l| l.ends_with("started-building")),
            "the build never started: {seen:?}"
        );
        // slate dies with its instance running: nothing can terminate it now.
        child.kill().unwrap();
        child.wait().unwrap();
        let live = |c: &Cloud| {
            c.instances()
                .into_iter()
                .filter(|(_, state, _)| state == "running")
                .map(|(id, _, _)| id)
                .collect::<Vec<_>>()
        };
        let left = live(&cloud);
        assert_eq!(left.len(), 1, "{:?}", cloud.instances());
        // Instances that are not slate's, or whose expiry is not a time
        // slate wrote, are never the reaper's to terminate.
        let others = cloud.py(&format!(
            "a = ec2.run_instances(ImageId='{ami}', MinCount=1, MaxCount=1)['Instances'][0]['InstanceId']\n\
             b = ec2.run_instances(ImageId='{ami}', MinCount=1, MaxCount=1, TagSpecifications=[{{'ResourceType': 'instance', \
             'Tags': [{{'Key': 'slate:expires', 'Value': 'yesterday; rm -rf /'}}]}}])['Instances'][0]['InstanceId']\n\
             out = [a, b]",
            ami = cloud.ami
        ));
        let others: Vec<String> = others
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let live_slate = |c: &Cloud| {
            live(c)
                .into_iter()
                .filter(|id| !others.contains(id))
                .collect::<Vec<_>>()
        };

        // Within its time to live the reaper leaves it: it may still build.
        let o = cloud.slate(&p, &["gc", "--remote"]);
        let out = text(&o);
        assert!(o.status.success(), "{out}");
        assert!(out.contains(&format!("kept {}", left[0])), "{out}");
        assert_eq!(live_slate(&cloud), left);

        // Its expiry passes (the tag is moved back, as time would).
        cloud.py(&format!(
            "ec2.create_tags(Resources=['{}'], Tags=[{{'Key': 'slate:expires', 'Value': '2001-01-01T00:00:00Z'}}])",
            left[0]
        ));
        let o = cloud.slate(&p, &["gc", "--remote"]);
        let out = text(&o);
        assert!(o.status.success(), "{out}");
        assert!(out.contains(&format!("terminated {}", left[0])), "{out}");
        assert_eq!(live_slate(&cloud), Vec::<String>::new());
        let mut still = live(&cloud);
        still.sort();
        let mut want = others.clone();
        want.sort();
        assert_eq!(
            still, want,
            "the reaper terminated an instance not its own: {out}"
        );
        let state = cloud
            .instances()
            .into_iter()
            .find(|(id, _, _)| *id == left[0])
            .map(|(_, s, _)| s);
        assert_eq!(state.as_deref(), Some("terminated"));
    });
}

#[test]
#[ignore = "needs root, openssh-server and moto: scripts/test.sh runs it"]
fn root_ec2_check_says_what_works_and_what_is_missing() {
    common::require_root();
    in_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let cloud = Cloud::start(dir.path());
        let p = Project::new(&format!("{IMAGE}{}", cloud.config(&cloud.ami)));
        let o = cloud.slate(&p, &["check"]);
        let out = text(&o);
        assert!(
            out.contains(&format!("ec2: works (region us-east-1, credentials from the environment (AWS_ACCESS_KEY_ID), AMI {}", cloud.ami)),
            "{out}"
        );
        // No credentials anywhere: said, not a hang on the metadata address.
        let o = p
            .cmd(&["check"])
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("HOME", dir.path())
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_PROFILE")
            .output()
            .unwrap();
        let out = text(&o);
        assert!(out.contains("ec2: unusable: no AWS credentials"), "{out}");
        // An AMI that is not there.
        let p = Project::new(&format!("{IMAGE}{}", cloud.config("ami-0000000000000dead")));
        let out = text(&cloud.slate(&p, &["check"]));
        assert!(out.contains("ec2: unusable: "), "{out}");
        assert!(out.contains("ami-0000000000000dead"), "{out}");
    });
}

#[test]
#[ignore = "needs root, a Debian bootstrap, e2fsprogs and moto: scripts/test.sh runs it"]
fn root_ec2_export_ami_registers_an_image_once_per_recipe() {
    common::require_root();
    common::require_debian_bootstrap();
    common::require_tool("mkfs.ext4", "e2fsprogs");
    // Baked first, out here where the Debian archive can be reached (the
    // namespace below has loopback only): the same recipe in the same
    // shared cache is then found baked.
    let baker = Project::debian("[images.vm]\nfrom = \"debian:bookworm\"\nvm = true\n");
    let o = baker.run(&["bake", "vm"]);
    assert!(o.status.success(), "{}", text(&o));
    in_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let cloud = Cloud::start(dir.path());
        // The vm tests' image: in the shared cache, baked once.
        let p = Project::debian(&format!(
            "[images.vm]\nfrom = \"debian:bookworm\"\nvm = true\n{}",
            cloud.config("image:vm")
        ));
        let registered = |c: &Cloud| {
            c.py(
                "imgs = ec2.describe_images(Owners=['self'])['Images']\n\
                 snaps = ec2.describe_snapshots(Filters=[{'Name': 'tag-key', 'Values': ['slate:digest']}])['Snapshots']\n\
                 out = {'images': [{'id': i['ImageId'], 'name': i['Name'], \
                 'tags': {t['Key']: t['Value'] for t in i.get('Tags', [])}} for i in imgs], \
                 'snaps': [s['SnapshotId'] for s in snaps]}",
            )
        };
        // Before any export, `image:vm` names no AMI: said, with the command.
        let out = text(&cloud.slate(&p, &["check"]));
        assert!(out.contains("has no AMI yet"), "{out}");
        assert!(out.contains("slate bake vm --export ami"), "{out}");

        let o = cloud.slate(&p, &["bake", "vm", "--export", "ami", "builder"]);
        let out = text(&o);
        assert!(o.status.success(), "{out}");
        // What was sent, for whoever runs this with --nocapture.
        println!("{out}");
        let ami = out
            .split_whitespace()
            .skip_while(|w| *w != "AMI")
            .nth(1)
            .unwrap_or_else(|| panic!("no AMI named in: {out}"))
            .to_string();
        assert!(ami.starts_with("ami-"), "{out}");
        assert!(!out.contains(" 0 block(s)"), "nothing was uploaded: {out}");
        let first = registered(&cloud);
        let images = first["images"].as_array().unwrap();
        assert_eq!(images.len(), 1, "{first}");
        assert_eq!(images[0]["id"], ami.as_str(), "{first}");
        assert!(
            images[0]["name"].as_str().unwrap().starts_with("builder-"),
            "{first}"
        );
        let digest = images[0]["tags"]["slate:digest"]
            .as_str()
            .unwrap_or_default();
        assert_eq!(digest.len(), 64, "{first}");
        assert_eq!(first["snaps"].as_array().unwrap().len(), 1, "{first}");
        // (moto registers an image over a snapshot of its own making, not
        // the one named in the block device mapping, so which snapshot the
        // AMI holds cannot be checked here.)

        // The same recipe again: found by its digest, nothing uploaded.
        let o = cloud.slate(&p, &["bake", "vm", "--export", "ami", "builder"]);
        let out = text(&o);
        assert!(o.status.success(), "{out}");
        assert!(
            out.contains(&format!(
                "AMI {ami} in us-east-1: registered before for this recipe, nothing uploaded"
            )),
            "{out}"
        );
        assert_eq!(registered(&cloud), first);

        // `ami = "image:vm"` now resolves to it.
        let out = text(&cloud.slate(&p, &["check"]));
        assert!(out.contains("ec2: works (") && out.contains(&ami), "{out}");
    });
}

#[test]
#[ignore = "needs root, openssh-server and moto: scripts/test.sh runs it"]
fn root_ec2_a_failed_target_a_timeout_and_ctrl_c_each_terminate_their_instance() {
    common::require_root();
    in_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let cloud = Cloud::start(dir.path());
        let p = Project::new(&format!(
            "{IMAGE}[builds.fails]\nimage = \"bb\"\nprovider = \"ec2\"\nrun = [\"exit 3\"]\n\
             [builds.slow]\nimage = \"bb\"\nprovider = \"ec2\"\ntimeout = \"2s\"\nrun = [\"sleep 600\"]\n\
             [builds.hang]\nimage = \"bb\"\nprovider = \"ec2\"\n\
             run = [\"echo started-building\", \"sleep 600\"]\n{}",
            cloud.config(&cloud.ami)
        ));
        let states = |c: &Cloud| {
            let mut v: Vec<(String, String)> = c
                .instances()
                .into_iter()
                .map(|(_, state, tags)| (tags["slate:target"].clone(), state))
                .collect();
            v.sort();
            v
        };
        let o = cloud.slate(&p, &["build", "fails"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let o = cloud.slate(&p, &["build", "slow"]);
        let out = text(&o);
        assert!(!o.status.success() && out.contains("timed out"), "{out}");
        assert_eq!(
            states(&cloud),
            [
                ("fails".to_string(), "terminated".to_string()),
                ("slow".into(), "terminated".into())
            ],
            "{out}"
        );

        let mut child = p
            .cmd(&["build", "hang"])
            .envs(CREDS)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let started = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.ends_with("] started-building"));
        assert!(started, "the build never started");
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let o = child.wait_with_output().unwrap();
        assert!(!o.status.success(), "{}", text(&o));
        let hang = states(&cloud)
            .into_iter()
            .find(|(t, _)| t == "hang")
            .map(|(_, s)| s);
        assert_eq!(hang.as_deref(), Some("terminated"), "{}", text(&o));
    });
}
