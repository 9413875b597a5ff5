//! Shipping a run's log to where logs are read: syslog servers (RFC 5424,
//! octet-counted over TCP, or over TLS as RFC 5425 — the way hosted log
//! services take it) and Elasticsearch (`_bulk`, over HTTP or HTTPS, with
//! basic or API-key auth).
//!
//! The run's own `run.ecs.ndjson` is the buffer: a shipper reads it from
//! where it left off (an offset kept in the run folder per sink, moved only
//! after a batch was taken), so a sink that is down loses nothing and
//! `slate logs --ship RUN` sends the rest later. Each sink has a thread of
//! its own; the build never waits on a sink that has failed, and waits a
//! bounded time for one that answers.

pub mod elastic;
pub mod syslog;

use serde_json::Value;
use std::io::{BufRead, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where logs go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Syslog {
        tls: bool,
        host: String,
        port: u16,
    },
    Elastic {
        /// `http(s)://host:port`
        base: String,
        index: String,
    },
}

impl Sink {
    /// `syslog+tcp://HOST:PORT`, `syslog+tls://HOST:PORT`,
    /// `elasticsearch+http(s)://HOST:PORT/INDEX`.
    pub fn parse(url: &str) -> Result<Sink, String> {
        let bad = |why: &str| {
            format!("`{url}` is not a log sink ({why}): use syslog+tcp://HOST:PORT, syslog+tls://HOST:PORT or elasticsearch+https://HOST:PORT/INDEX")
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
        if hostport.contains('@') {
            return Err(bad(
                "credentials go in SLATE_ELASTICSEARCH_* variables, not in the URL",
            ));
        }
        let (host, port) = hostport.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-_[]:".contains(&b));
        if !host_ok || port == 0 {
            return Err(bad("no host"));
        }
        match scheme {
            "syslog+tcp" | "syslog+tls" if path.is_empty() => Ok(Sink::Syslog {
                tls: scheme == "syslog+tls",
                host: host.to_string(),
                port,
            }),
            "elasticsearch+http" | "elasticsearch+https" => {
                let index = path.trim_end_matches('/');
                let index_ok = !index.is_empty()
                    && !index.starts_with(['_', '-', '+'])
                    && index.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)
                    });
                if !index_ok {
                    return Err(bad("name a lowercase index after the port"));
                }
                let http = scheme.trim_start_matches("elasticsearch+");
                Ok(Sink::Elastic {
                    base: format!("{http}://{hostport}"),
                    index: index.to_string(),
                })
            }
            _ => Err(bad("unknown scheme")),
        }
    }

    /// The name the sink's offset file goes by in the run folder.
    fn key(&self) -> String {
        use sha2::Digest;
        let text = format!("{self:?}");
        let h = sha2::Sha256::digest(text.as_bytes());
        h[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Display for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sink::Syslog { tls, host, port } => write!(
                f,
                "syslog+{}://{host}:{port}",
                if *tls { "tls" } else { "tcp" }
            ),
            Sink::Elastic { base, index } => write!(f, "elasticsearch+{base}/{index}"),
        }
    }
}

/// How slate proves who it is and whom it trusts.
#[derive(Clone, Default)]
pub struct Settings {
    /// PEM certificates trusted besides the system's (a private CA).
    pub ca: Option<PathBuf>,
    /// Elasticsearch: `SLATE_ELASTICSEARCH_API_KEY`, or user and password
    /// (`SLATE_ELASTICSEARCH_USER`, `SLATE_ELASTICSEARCH_PASSWORD`).
    pub api_key: Option<String>,
    pub basic: Option<(String, String)>,
}

impl Settings {
    /// Credentials from the environment, `ca` as configured.
    pub fn from_env(ca: Option<PathBuf>) -> Settings {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Settings {
            ca,
            api_key: var("SLATE_ELASTICSEARCH_API_KEY"),
            basic: var("SLATE_ELASTICSEARCH_USER")
                .map(|u| (u, var("SLATE_ELASTICSEARCH_PASSWORD").unwrap_or_default())),
        }
    }

    /// A TLS client trusting the system's CAs and `ca`.
    pub fn tls(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        use rustls_pki_types::{pem::PemObject, CertificateDer};
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let system = [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
        ];
        for f in system.iter().map(PathBuf::from).chain(self.ca.clone()) {
            let Ok(certs) = CertificateDer::pem_file_iter(&f) else {
                if Some(&f) == self.ca.as_ref() {
                    return Err(format!("cannot read the CA file `{}`", f.display()));
                }
                continue;
            };
            for c in certs.flatten() {
                let _ = roots.add(c);
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(cfg))
    }
}

/// Sends batches of ECS documents somewhere.
trait Batch {
    fn send(&mut self, docs: &[Value]) -> Result<(), String>;
}

fn connect(sink: &Sink, settings: &Settings) -> Result<Box<dyn Batch>, String> {
    Ok(match sink {
        Sink::Syslog { tls, host, port } => Box::new(syslog::Conn::new(
            host,
            *port,
            if *tls { Some(settings.tls()?) } else { None },
        )),
        Sink::Elastic { base, index } => Box::new(elastic::Client::new(base, index, settings)?),
    })
}

/// The ECS log in a run folder, and one sink's place in it.
struct Cursor {
    log: PathBuf,
    offset_file: PathBuf,
    offset: u64,
}

/// Documents per batch at most.
const BATCH: usize = 500;

impl Cursor {
    fn new(run_dir: &Path, sink: &Sink) -> Cursor {
        let offset_file = run_dir.join(format!("shipped-{}", sink.key()));
        let offset = fs_err::read_to_string(&offset_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Cursor {
            log: run_dir.join("run.ecs.ndjson"),
            offset_file,
            offset,
        }
    }

    /// The next whole lines from the offset: documents and their bytes.
    fn next(&self) -> (Vec<Value>, u64) {
        let Ok(mut f) = std::fs::File::open(&self.log) else {
            return (vec![], 0);
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return (vec![], 0);
        }
        let mut r = std::io::BufReader::new(f.take(8 << 20));
        let mut docs = Vec::new();
        let mut used = 0u64;
        let mut line = String::new();
        while docs.len() < BATCH {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                // A line still being written waits for its end.
                Ok(_) if !line.ends_with('\n') => break,
                Ok(n) => {
                    used += n as u64;
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        docs.push(v);
                    }
                }
            }
        }
        (docs, used)
    }

    fn advance(&mut self, by: u64) {
        self.offset += by;
        let tmp = self.offset_file.with_extension("tmp");
        if fs_err::write(&tmp, self.offset.to_string()).is_ok() {
            let _ = fs_err::rename(&tmp, &self.offset_file);
        }
    }

    /// Lines not shipped yet.
    fn left(&self) -> usize {
        let Ok(mut f) = std::fs::File::open(&self.log) else {
            return 0;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return 0;
        }
        std::io::BufReader::new(f).lines().count()
    }
}

#[derive(Default)]
struct State {
    /// More of the log may be on disk.
    more: bool,
    /// The run has ended: send what is left, then stop.
    finishing: bool,
    /// Stop now.
    stop: bool,
    /// The sink failed this run (a later success clears it).
    failing: Option<String>,
    /// Nothing left to send after `finishing`.
    drained: bool,
    /// The sink has taken a batch this run.
    answered: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

/// One sink's shipper.
struct Worker {
    sink: Sink,
    run_dir: PathBuf,
    shared: Arc<Shared>,
}

/// Ships a running run's log to its sinks in the background.
pub struct Shipper {
    workers: Vec<Worker>,
}

/// What a sink did not get, and why.
#[derive(Debug)]
pub struct Undelivered {
    pub sink: String,
    pub lines: usize,
    pub why: String,
}

impl Shipper {
    /// Starts one thread per sink, shipping `run_dir`'s ECS log.
    pub fn start(run_dir: &Path, sinks: &[Sink], settings: &Settings) -> Shipper {
        let workers = sinks
            .iter()
            .map(|sink| {
                let shared = Arc::new(Shared {
                    state: Mutex::new(State::default()),
                    wake: Condvar::new(),
                });
                let cursor = Cursor::new(run_dir, sink);
                let (s, sk, st) = (shared.clone(), sink.clone(), settings.clone());
                std::thread::spawn(move || ship_loop(cursor, &sk, &st, &s));
                Worker {
                    sink: sink.clone(),
                    run_dir: run_dir.to_path_buf(),
                    shared,
                }
            })
            .collect();
        Shipper { workers }
    }

    /// More of the log is on disk.
    pub fn poke(&self) {
        for w in &self.workers {
            w.shared.state.lock().unwrap().more = true;
            w.shared.wake.notify_all();
        }
    }

    /// The run has ended: a sink that has taken batches in this run gets
    /// up to `grace` to take the rest, one that has not answered yet gets
    /// up to `unproven`, one that failed gets none. What was not delivered,
    /// per sink (it stays in the run's log for `slate logs --ship`).
    pub fn finish(self, grace: Duration, unproven: Duration) -> Vec<Undelivered> {
        let start = Instant::now();
        for w in &self.workers {
            let mut st = w.shared.state.lock().unwrap();
            st.finishing = true;
            st.more = true;
            w.shared.wake.notify_all();
        }
        let mut out = Vec::new();
        for w in &self.workers {
            let why = {
                let mut st = w.shared.state.lock().unwrap();
                loop {
                    let allowed = if st.answered { grace } else { unproven };
                    let left = allowed.saturating_sub(start.elapsed());
                    if st.drained || st.failing.is_some() || left.is_zero() {
                        break;
                    }
                    st = w.shared.wake.wait_timeout(st, left).unwrap().0;
                }
                st.stop = true;
                w.shared.wake.notify_all();
                st.failing.clone().unwrap_or_else(|| {
                    if st.answered {
                        format!("it did not take everything within {} s", grace.as_secs())
                    } else {
                        "it did not answer".into()
                    }
                })
            };
            // What the sink's offset says is left, whatever its thread is
            // still doing (it is never joined: a sink that hangs must not
            // hold the run).
            let lines = Cursor::new(&w.run_dir, &w.sink).left();
            if lines > 0 {
                out.push(Undelivered {
                    sink: w.sink.to_string(),
                    lines,
                    why,
                });
            }
        }
        out
    }
}

fn ship_loop(mut cursor: Cursor, sink: &Sink, settings: &Settings, shared: &Shared) -> Cursor {
    let mut conn: Option<Box<dyn Batch>> = None;
    let mut backoff = Duration::from_millis(250);
    loop {
        // Wait for more of the log, or the end of the run.
        let finishing = {
            let mut st = shared.state.lock().unwrap();
            while !st.more && !st.stop {
                st = shared.wake.wait(st).unwrap();
            }
            if st.stop {
                return cursor;
            }
            st.more = false;
            st.finishing
        };
        // Everything there is, batch by batch.
        loop {
            let (docs, used) = cursor.next();
            if used == 0 {
                break;
            }
            let sent = match &mut conn {
                Some(c) => c.send(&docs),
                None => connect(sink, settings).and_then(|mut c| {
                    let r = c.send(&docs);
                    conn = Some(c);
                    r
                }),
            };
            let mut st = shared.state.lock().unwrap();
            match sent {
                Ok(()) => {
                    cursor.advance(used);
                    backoff = Duration::from_millis(250);
                    st.failing = None;
                    st.answered = true;
                    shared.wake.notify_all();
                }
                Err(why) => {
                    conn = None;
                    st.failing = Some(why);
                    shared.wake.notify_all();
                    // A sink that fails gets no more time once the run is over.
                    if st.stop || st.finishing {
                        return cursor;
                    }
                    st = shared.wake.wait_timeout(st, backoff).unwrap().0;
                    if st.stop || st.finishing {
                        return cursor;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
            if st.stop {
                return cursor;
            }
        }
        if finishing {
            let mut st = shared.state.lock().unwrap();
            st.drained = true;
            shared.wake.notify_all();
            return cursor;
        }
    }
}

/// Sends what `run_dir`'s log has not yet delivered to `sink`, trying
/// `tries` times: the lines sent.
pub fn ship_rest(
    run_dir: &Path,
    sink: &Sink,
    settings: &Settings,
    tries: u32,
) -> Result<usize, Undelivered> {
    let mut cursor = Cursor::new(run_dir, sink);
    let mut conn: Option<Box<dyn Batch>> = None;
    let mut sent_lines = 0;
    let mut failures = 0;
    loop {
        let (docs, used) = cursor.next();
        if used == 0 {
            return Ok(sent_lines);
        }
        let r = match &mut conn {
            Some(c) => c.send(&docs),
            None => connect(sink, settings).and_then(|mut c| {
                let r = c.send(&docs);
                conn = Some(c);
                r
            }),
        };
        match r {
            Ok(()) => {
                cursor.advance(used);
                sent_lines += docs.len();
            }
            Err(why) => {
                conn = None;
                failures += 1;
                if failures >= tries {
                    return Err(Undelivered {
                        sink: sink.to_string(),
                        lines: cursor.left(),
                        why,
                    });
                }
                std::thread::sleep(Duration::from_millis(500 << failures.min(5)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinks_parse_and_what_is_not_one_is_refused() {
        assert_eq!(
            Sink::parse("syslog+tls://logs.example.net:6514").unwrap(),
            Sink::Syslog {
                tls: true,
                host: "logs.example.net".into(),
                port: 6514
            }
        );
        assert_eq!(
            Sink::parse("elasticsearch+https://es.example.net:9200/slate").unwrap(),
            Sink::Elastic {
                base: "https://es.example.net:9200".into(),
                index: "slate".into()
            }
        );
        for bad in [
            "syslog://h:1",
            "syslog+tcp://h",
            "syslog+tcp://:514",
            "elasticsearch+http://h:9200",
            "elasticsearch+http://h:9200/_all",
            "elasticsearch+http://h:9200/Upper",
            "elasticsearch+https://user:pw@h:9200/x",
            "elasticsearch+http://h:9200/a/../_security",
        ] {
            assert!(Sink::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_cursor_takes_whole_lines_and_remembers_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("run.ecs.ndjson");
        std::fs::write(&log, "{\"a\":1}\n{\"a\":2}\n{\"a\":").unwrap();
        let sink = Sink::parse("syslog+tcp://127.0.0.1:9").unwrap();
        let mut c = Cursor::new(dir.path(), &sink);
        let (docs, used) = c.next();
        assert_eq!(docs.len(), 2);
        c.advance(used);
        assert_eq!(c.left(), 1);
        // A new cursor (a later `slate logs --ship`) starts where it stopped.
        let c = Cursor::new(dir.path(), &sink);
        assert_eq!(c.next().0.len(), 0);
        std::fs::write(&log, "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n").unwrap();
        assert_eq!(c.next().0, vec![serde_json::json!({"a": 3})]);
    }
}
