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

/// The newest run's ECS documents, in order.
fn ecs_docs(p: &Project) -> (String, Vec<serde_json::Value>) {
    let (id, dir) = p.last_run();
    let docs = std::fs::read_to_string(dir.join("run.ecs.ndjson"))
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

/// An Elasticsearch-compatible server: osmem-server (PyPI; an in-memory
/// server of the OpenSearch HTTP API, `_bulk` and `_count` included),
/// behind Debian's nginx for HTTPS (a certificate from the test's CA) and
/// credentials (only `ApiKey <KEY>` passes; osmem checks none itself).
/// Stopped when dropped.
struct Elastic {
    osmem: Option<Child>,
    nginx: Child,
    osmem_port: u16,
    /// nginx's HTTPS port.
    port: u16,
    bin: PathBuf,
}

const API_KEY: &str = "c2xhdGU6dGVzdC1rZXk=";

impl Elastic {
    #[track_caller]
    fn start(dir: &Path, ca_dir: &Path) -> Elastic {
        let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/tools/py/bin/python");
        assert!(
            py.is_file(),
            "this test needs osmem-server: scripts/test.sh installs it into target/tools/py"
        );
        let o = Command::new(&py)
            .args([
                "-c",
                "import osmem_server; print(osmem_server.resolve_binary())",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "osmem-server: {}", text(&o));
        let bin = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        let nginx_bin = require_tool("nginx", "nginx-light");
        std::fs::create_dir_all(dir).unwrap();
        let (osmem_port, port) = (common::free_port(), common::free_port());
        let d = dir.display();
        let c = ca_dir.display();
        std::fs::write(
            dir.join("nginx.conf"),
            format!(
                "daemon off; pid {d}/nginx.pid; error_log {d}/error.log;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{ access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
                 map $http_authorization $ok {{ default 0; \"ApiKey {API_KEY}\" 1; \"Basic c2xhdGU6czNjcmV0\" 1; }}\n\
                 server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {c}/cert.pem; ssl_certificate_key {c}/key.pem;\n\
                 client_max_body_size 100m;\n\
                 location / {{ if ($ok = 0) {{ return 401; }} proxy_pass http://127.0.0.1:{osmem_port}; }} }} }}\n"
            ),
        )
        .unwrap();
        let nginx = Command::new(nginx_bin)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let e = Elastic {
            osmem: None,
            nginx,
            osmem_port,
            port,
            bin,
        };
        e.wait_port(port);
        e
    }

    fn wait_port(&self, port: u16) {
        let ready = (0..1000).any(|_| {
            let ok = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            if !ok {
                std::thread::sleep(Duration::from_millis(20));
            }
            ok
        });
        assert!(ready, "nothing listens on {port}");
    }

    /// The server behind nginx comes up (until then nginx answers 502).
    fn up(&mut self) {
        let child = Command::new(&self.bin)
            .args([
                "--addr",
                &format!("127.0.0.1:{}", self.osmem_port),
                "--no-stdin-watch",
                "--no-ja",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.osmem = Some(child);
        self.wait_port(self.osmem_port);
        // The index is made beforehand, as a deployment's templates would:
        // making it takes the server most of a second on its first request.
        let url = format!("http://127.0.0.1:{}/slate-logs", self.osmem_port);
        ureq::put(&url).call().unwrap();
    }

    /// Documents in `index`, asked of the server itself.
    fn count(&self, index: &str) -> u64 {
        let url = format!("http://127.0.0.1:{}/{index}/_count", self.osmem_port);
        let text = ureq::get(&url).call().unwrap().into_string().unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["count"].as_u64().unwrap_or(0)
    }

    fn search(&self, index: &str, q: &str) -> serde_json::Value {
        let url = format!(
            "http://127.0.0.1:{}/{index}/_search?q={q}&size=100",
            self.osmem_port
        );
        serde_json::from_str(&ureq::get(&url).call().unwrap().into_string().unwrap()).unwrap()
    }
}

impl Drop for Elastic {
    fn drop(&mut self) {
        for c in self
            .osmem
            .iter_mut()
            .chain(std::iter::once(&mut self.nginx))
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
#[ignore = "needs root, nginx-light and osmem-server: scripts/test.sh runs it"]
fn root_elasticsearch_bulk_over_https_with_an_api_key_loses_nothing_across_an_outage() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    // The syslog server is not used; it makes the test CA and certificate.
    let rs = Rsyslog::start(&dir.path().join("rsyslog"));
    let mut es = Elastic::start(&dir.path().join("es"), &rs.dir);
    let p = Project::new(&format!(
        "{IMAGE}[builds.a]\nimage = \"bb\"\nrun = [\"echo from a\"]\n\
         [builds.b]\nimage = \"bb\"\nrun = [\"echo from b\"]\n\
         [settings.logs]\nship = [\"elasticsearch+https://localhost:{}/slate-logs\"]\nca = \"{}\"\n",
        es.port,
        rs.dir.join("ca.pem").display()
    ));
    let build = |key: &str| {
        let o = p
            .cmd(&["build"])
            .env("SLATE_ELASTICSEARCH_API_KEY", key)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let (run, docs) = ecs_docs(&p);
        (text(&o), run, docs)
    };
    // The server is down (nginx answers 502): the build succeeds and says so.
    let (out, run1, docs1) = build(API_KEY);
    assert!(
        out.contains(&format!("log line(s) of run {run1} were not delivered")),
        "{out}"
    );
    es.up();
    // Up: a build ships all of its log, with the right key.
    let (out, run2, docs2) = build(API_KEY);
    assert!(!out.contains("not delivered"), "{out}");
    assert_eq!(es.count("slate-logs"), docs2.len() as u64);
    let hits = es.search("slate-logs", "message:from");
    let msgs: Vec<&str> = hits["hits"]["hits"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["_source"]["labels"]["run"] == run2.as_str())
        .filter_map(|h| h["_source"]["message"].as_str())
        .collect();
    assert!(
        msgs.contains(&"from a") && msgs.contains(&"from b"),
        "{hits}"
    );
    // The first run's log, kept through the outage, is sent whole, once.
    let o = p
        .cmd(&["logs", "--ship", &run1])
        .env("SLATE_ELASTICSEARCH_API_KEY", API_KEY)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(es.count("slate-logs"), (docs1.len() + docs2.len()) as u64);
    // A wrong key is refused: said, and nothing is sent.
    let (out, _, _) = build("d3Jvbmc6a2V5");
    assert!(out.contains("refused the credentials (401)"), "{out}");
    assert_eq!(es.count("slate-logs"), (docs1.len() + docs2.len()) as u64);
    // Basic auth (user slate, password s3cret) instead of a key.
    let o = p
        .cmd(&["build"])
        .env("SLATE_ELASTICSEARCH_USER", "slate")
        .env("SLATE_ELASTICSEARCH_PASSWORD", "s3cret")
        .output()
        .unwrap();
    assert!(
        o.status.success() && !text(&o).contains("not delivered"),
        "{}",
        text(&o)
    );
    let (_, docs4) = ecs_docs(&p);
    assert_eq!(
        es.count("slate-logs"),
        (docs1.len() + docs2.len() + docs4.len()) as u64
    );
}
