//! A real OCI registry for tests: Debian's docker-registry on a free loopback
//! port, with its own config and storage, stopped when dropped.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub struct Registry {
    child: Child,
    pub addr: String,
}

impl Registry {
    /// Starts a registry, or returns `None` (skipped) when it is not
    /// installed outside CI; in CI a missing registry fails the test.
    pub fn start(dir: &Path) -> Option<Registry> {
        let bin = ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let Some(bin) = bin else {
            assert!(
                std::env::var_os("CI").is_none(),
                "this test needs docker-registry, and CI must run it"
            );
            eprintln!("SKIPPED: needs docker-registry");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let cfg = dir.join("registry.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\nhttp: {{addr: {addr}}}\n",
                dir.join("regdata").display()
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let reg = Registry { child, addr };
        // Ready when /v2/ answers (bounded: 10 s).
        for _ in 0..500 {
            if reg.answers() {
                return Some(reg);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("the registry did not start on {}", reg.addr);
    }

    fn answers(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(&self.addr) else {
            return false;
        };
        let _ = write!(s, "GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real S3-compatible server for tests: s3s-fs (it checks SigV4
/// signatures) on a free loopback port, serving a temp folder; stopped when
/// dropped. Access key `test`, secret key `testsecret`.
#[allow(dead_code)]
pub struct S3Server {
    child: Child,
    pub endpoint: String,
    pub data: std::path::PathBuf,
}

#[allow(dead_code)]
impl S3Server {
    pub const ACCESS_KEY: &'static str = "test";
    pub const SECRET_KEY: &'static str = "testsecret";

    /// Starts a server with one bucket, or returns `None` (skipped) when
    /// s3s-fs is not installed outside CI; in CI a missing server fails.
    /// `scripts/test.sh` installs s3s-fs into `target/tools`.
    pub fn start(dir: &Path, bucket: &str) -> Option<S3Server> {
        let in_target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/tools/bin/s3s-fs");
        let bin = std::env::var_os("SLATE_TEST_S3S_FS")
            .map(std::path::PathBuf::from)
            .into_iter()
            .chain([in_target])
            .find(|p| p.exists());
        let Some(bin) = bin else {
            assert!(
                std::env::var_os("CI").is_none(),
                "this test needs s3s-fs (scripts/test.sh installs it), and CI must run it"
            );
            eprintln!("SKIPPED: needs s3s-fs (run scripts/test.sh, or set SLATE_TEST_S3S_FS)");
            return None;
        };
        let data = dir.join("s3data");
        std::fs::create_dir_all(data.join(bucket)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--access-key",
                Self::ACCESS_KEY,
                "--secret-key",
                Self::SECRET_KEY,
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s = S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            data,
        };
        // Ready when it answers HTTP at all (bounded: 10 s).
        for _ in 0..500 {
            if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = write!(c, "GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
                let mut buf = String::new();
                let _ = c.read_to_string(&mut buf);
                if buf.starts_with("HTTP/") {
                    return Some(s);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("s3s-fs did not start on {}", s.endpoint);
    }

    /// The environment an AWS client needs to talk to this server only.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", Self::ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", Self::SECRET_KEY.into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            ("AWS_DEFAULT_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
        ]
    }

    /// The aws CLI (an independent client), pointed at this server.
    pub fn aws(&self, args: &[&str]) -> std::process::Output {
        let out = Command::new("aws")
            .args(["--endpoint-url", &self.endpoint])
            .args(args)
            .envs(self.env())
            .output()
            .expect("the aws CLI is installed (scripts/install-deps.sh)");
        out
    }
}

#[allow(dead_code)]
impl S3Server {
    /// Downloads a published run with the aws CLI, file by file: `SHA256SUMS`,
    /// `manifest.json` and every file `SHA256SUMS` names. (Not `s3 cp
    /// --recursive`: s3s-fs does not escape `+` in url-encoded listings, so
    /// the CLI would turn `1.0+deb` into `1.0 deb`.)
    pub fn fetch_run(&self, url: &str, to: &Path) {
        for name in ["SHA256SUMS", "manifest.json"] {
            let o = self.aws(&[
                "s3",
                "cp",
                &format!("{url}/{name}"),
                to.join(name).to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let sums = std::fs::read_to_string(to.join("SHA256SUMS")).unwrap();
        for line in sums.lines() {
            let rel = line.split_once("  ").unwrap().1;
            let o = self.aws(&[
                "s3",
                "cp",
                &format!("{url}/{rel}"),
                to.join(rel).to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
