//! Shipping run logs to real servers on loopback: rsyslog (Debian's, with
//! a plain TCP input and a TLS one) and an Elasticsearch-compatible `_bulk`
//! server. Needs root (the builds) and the servers; `scripts/test.sh` runs
//! these tests.

mod common;

use common::{require_tool, text, Project};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = "[images.bb]\nfrom = \"tar:bb.tar.gz\"\n";

/// rsyslogd with one plain TCP input and one TLS input (a self-signed
/// certificate for `localhost`), each writing what it receives, one message
/// per line, to a file of its own. Stopped when dropped.
struct Rsyslog {
    child: Child,
    dir: PathBuf,
    tcp: u16,
    tls: u16,
}

impl Rsyslog {
    #[track_caller]
    fn start(dir: &Path) -> Rsyslog {
        Rsyslog::start_on(dir, common::free_port(), common::free_port())
    }

    #[track_caller]
    fn start_on(dir: &Path, tcp: u16, tls: u16) -> Rsyslog {
        let rsyslogd = require_tool("rsyslogd", "rsyslog");
        std::fs::create_dir_all(dir).unwrap();
        // A CA of the test's own, and a server certificate for localhost
        // signed by it (a TLS client refuses a CA certificate as a server's).
        let cert = dir.join("cert.pem");
        if !cert.exists() {
            let openssl = require_tool("openssl", "openssl");
            let run = |args: &[&str]| {
                let o = Command::new(&openssl)
                    .args(args)
                    .current_dir(dir)
                    .output()
                    .unwrap();
                assert!(o.status.success(), "openssl {args:?}: {}", text(&o));
            };
            run(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=slate test CA",
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca.pem",
            ]);
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=localhost",
                "-keyout",
                "key.pem",
                "-out",
                "server.csr",
            ]);
            std::fs::write(
                dir.join("ext.cnf"),
                "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
            )
            .unwrap();
            run(&[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
                "-out",
                "cert.pem",
            ]);
        }
        let d = dir.display();
        let conf = format!(
            "global(workDirectory=\"{d}\" DefaultNetstreamDriverCAFile=\"{d}/ca.pem\" \
             DefaultNetstreamDriverCertFile=\"{d}/cert.pem\" DefaultNetstreamDriverKeyFile=\"{d}/key.pem\")\n\
             module(load=\"imtcp\" MaxSessions=\"100\")\n\
             template(name=\"raw\" type=\"string\" string=\"%rawmsg-after-pri%\\n\")\n\
             ruleset(name=\"tcp\") {{ action(type=\"omfile\" file=\"{d}/tcp.log\" template=\"raw\") }}\n\
             ruleset(name=\"tls\") {{ action(type=\"omfile\" file=\"{d}/tls.log\" template=\"raw\") }}\n\
             input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{tcp}\" ruleset=\"tcp\")\n\
             input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{tls}\" ruleset=\"tls\" \
             streamDriver.name=\"gtls\" streamDriver.mode=\"1\" streamDriver.authMode=\"anon\")\n"
        );
        std::fs::write(dir.join("rsyslog.conf"), conf).unwrap();
        let child = Command::new(rsyslogd)
            .arg("-n")
            .arg("-f")
            .arg(dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(dir.join("rsyslog.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let r = Rsyslog {
            child,
            dir: dir.to_path_buf(),
            tcp,
            tls,
        };
        // Ready when both ports take connections (bounded: 20 s).
        let up = |p: u16| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok();
        let ready = (0..1000).any(|_| {
            let ok = up(tcp) && up(tls);
            if !ok {
                std::thread::sleep(Duration::from_millis(20));
            }
            ok
        });
        assert!(ready, "rsyslogd did not start");
        r
    }

    /// The messages one input received, waiting (up to 30 s) for `n`.
    fn received(&self, input: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let lines: Vec<String> = std::fs::read_to_string(self.dir.join(format!("{input}.log")))
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect();
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The run's ECS documents, in order.
fn ecs_docs(p: &Project) -> (String, Vec<serde_json::Value>) {
    let runs = p.project().join(".slate/runs");
    let mut ids: Vec<String> = std::fs::read_dir(&runs)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ids.sort();
    let id = ids.pop().unwrap();
    let docs = std::fs::read_to_string(runs.join(&id).join("run.ecs.ndjson"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (id, docs)
}

#[test]
#[ignore = "needs root and rsyslog: scripts/test.sh runs it"]
fn root_syslog_over_tcp_and_tls_receives_every_line_in_order_with_structured_data() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let rs = Rsyslog::start(&dir.path().join("rsyslog"));
    let p = Project::new(&format!(
        "{IMAGE}[builds.a]\nimage = \"bb\"\nrun = [\"echo one from a\", \"echo two from a\"]\n\
         [builds.b]\nimage = \"bb\"\nrun = [\"echo from b; exit 2\"]\n\
         [settings.logs]\nship = [\"syslog+tcp://127.0.0.1:{}\", \"syslog+tls://localhost:{}\"]\nca = \"{}\"\n",
        rs.tcp,
        rs.tls,
        rs.dir.join("ca.pem").display()
    ));
    let o = p.run(&["build", "-j", "1"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(!out.contains("not delivered"), "{out}");
    let (run, docs) = ecs_docs(&p);
    for input in ["tcp", "tls"] {
        let got = rs.received(input, docs.len());
        assert_eq!(got.len(), docs.len(), "{input}: {got:#?}");
        // In order, each with its run and target as structured data.
        for (line, doc) in got.iter().zip(&docs) {
            let msg = doc["message"].as_str().unwrap();
            assert!(
                line.ends_with(&format!("] {msg}")),
                "{input}: {line} / {msg}"
            );
            assert!(
                line.contains(&format!("[slate@32473 run=\"{run}\"")),
                "{line}"
            );
            if let Some(t) = doc["labels"]["target"].as_str() {
                assert!(line.contains(&format!(" target=\"{t}\"")), "{line}");
            }
        }
        let failed = got
            .iter()
            .find(|l| l.contains("target=\"b\"") && l.contains("target_finished"))
            .unwrap();
        assert!(
            failed.contains("outcome=\"failure\" exit_code=\"2\""),
            "{failed}"
        );
    }
}

#[test]
#[ignore = "needs root and rsyslog: scripts/test.sh runs it"]
fn root_a_sink_that_is_down_fails_nothing_and_logs_ship_sends_every_line_later() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let (tcp, tls) = (common::free_port(), common::free_port());
    let p = Project::new(&format!(
        "{IMAGE}[builds.a]\nimage = \"bb\"\nrun = [\"echo built\"]\n\
         [settings.logs]\nship = [\"syslog+tcp://127.0.0.1:{tcp}\"]\n"
    ));
    // Nothing listens: the build succeeds and says what was not delivered.
    let o = p.run(&["build"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let (run, docs) = ecs_docs(&p);
    assert!(
        out.contains(&format!(
            "warning: {} log line(s) of run {run} were not delivered to syslog+tcp://127.0.0.1:{tcp}",
            docs.len()
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("`slate logs --ship {run}` sends them")),
        "{out}"
    );
    // The sink comes up; the run's log is sent whole, once.
    let rs = Rsyslog::start_on(&dir.path().join("rsyslog"), tcp, tls);
    let o = p.run(&["logs", "--ship", &run]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("sent {} log line(s)", docs.len())),
        "{}",
        text(&o)
    );
    let got = rs.received("tcp", docs.len());
    assert_eq!(got.len(), docs.len(), "{got:#?}");
    assert!(got
        .last()
        .unwrap()
        .ends_with(docs.last().unwrap()["message"].as_str().unwrap()));
    // Nothing is left to send.
    let o = p.run(&["logs", "--ship", &run]);
    assert!(text(&o).contains("sent 0 log line(s)"), "{}", text(&o));
}
