//! The host's side: what `slate remote …` does when slate on another
//! machine runs it over ssh. It answers which layers this host lacks,
//! receives layers into this host's store, and serves one environment
//! (made here by the sandbox provider) over its standard input and output
//! with the wire of [`slate_provider::wire`]: the same requests a VM's
//! guest agent answers.
//!
//! The environment lives as long as the connection: when the standard
//! input ends (slate closed it, or the connection dropped), the running
//! command is killed and the environment destroyed.

use crate::RemoteSpec;
use slate_layers::store::LayerStore;
use slate_provider::wire::{self, DataReader, Frame, FrameSource};
use slate_provider::{
    error_chain, Cancel, EnvKind, EnvSpec, Environment, ExecOutcome, ExecSpec, Limits, Privileges,
    Provider, Stream,
};
use slate_sandbox::SandboxProvider;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};

/// How a host's answer begins when it lacks what the environment needs.
pub const LACKS: &str = "this host lacks";

/// The keys of `keys` this store does not hold, one per line on `out`.
pub fn missing_layers(store: &LayerStore, keys: &[String], out: &mut impl Write) -> io::Result<()> {
    for k in keys {
        check_key(k)?;
        if !store.has(k) {
            writeln!(out, "{k}")?;
        }
    }
    out.flush()
}

/// A layer key is a file name in the store: nothing else is accepted.
fn check_key(key: &str) -> io::Result<()> {
    let ok = !key.is_empty()
        && key.len() <= 128
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{key}` is not a layer key"),
        ))
    }
}

/// Receives the layer `key` as a tar of its folder (`fs/` and
/// `layer.json`, as GNU tar writes it with overlay whiteouts and xattrs) on
/// `input`, and makes it a layer of this store at once and whole.
pub fn receive_layer(store: &LayerStore, key: &str, input: impl Read) -> io::Result<()> {
    check_key(key)?;
    let _lock = store.lock(key)?;
    receive_layer_locked(store, key, input)
}

/// As [`receive_layer`], for a caller that holds the store's lock on `key`.
pub fn receive_layer_locked(store: &LayerStore, key: &str, input: impl Read) -> io::Result<()> {
    check_key(key)?;
    if store.has(key) {
        // Another slate sent it meanwhile: read and drop this copy.
        io::copy(&mut { input }, &mut io::sink())?;
        return Ok(());
    }
    let staging = store.staging(key)?;
    let res = untar(&staging, input).and_then(|()| {
        // The layer's own record must say it is this layer.
        let meta = store_meta(&staging)?;
        if meta != key {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the layer sent as `{key}` says it is `{meta}`"),
            ));
        }
        fs_err::rename(&staging, store.layer_dir(key))
    });
    if res.is_err() {
        let _ = slate_layers::store::remove_tree(&staging);
    }
    store.touch_used(key);
    res
}

fn store_meta(staging: &Path) -> io::Result<String> {
    let text = fs_err::read_to_string(staging.join("layer.json"))?;
    let meta: slate_layers::store::LayerMeta =
        serde_json::from_str(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(meta.key)
}

/// Extracts a tar of a layer folder into `dir` with GNU tar, which keeps
/// what an overlay layer holds (whiteout devices, opaque-folder xattrs,
/// owners, hard links).
fn untar(dir: &Path, mut input: impl Read) -> io::Result<()> {
    let mut child = Command::new("tar")
        .args(TAR_FLAGS)
        .arg("-C")
        .arg(dir)
        .args(["-xpf", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run tar: {e}")))?;
    let copied = io::copy(&mut input, &mut child.stdin.take().expect("piped"));
    let out = child.wait_with_output()?;
    let invalid = |e: &io::Error| e.kind() == io::ErrorKind::InvalidData;
    let copied = match copied {
        // tar stops at the archive's end marker (or at a broken header)
        // and may leave the rest unread: it is read to the end all the
        // same, for a source that checks what it sent when it ends.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            io::copy(&mut input, &mut io::sink()).map(drop)
        }
        other => other.map(drop),
    };
    match copied {
        // Such a source (a layer cache's record) knows better than tar
        // why the archive was broken.
        Err(e) if invalid(&e) => Err(e),
        // tar's own complaint next: a pipe it closed early is its symptom.
        _ if !out.status.success() => Err(io::Error::other(format!(
            "tar failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
        other => other,
    }
}

/// GNU tar's flags for a layer folder, on both sides.
pub const TAR_FLAGS: [&str; 3] = [
    "--xattrs",
    "--xattrs-include=trusted.overlay.*",
    "--numeric-owner",
];

/// Serves one environment on `input`/`output` until the input ends.
pub fn serve_env(
    store: &LayerStore,
    input: impl Read + Send + 'static,
    output: impl Write + Send + 'static,
) -> io::Result<()> {
    let out: Out = Arc::new(Mutex::new(Box::new(output)));
    // One thread reads, so that a KILL reaches a running command. Each
    // EXEC gets its cancel here, before it is passed on: a KILL (or the end
    // of the input) that follows it at once finds it even when the command
    // has not started yet.
    let current: Arc<Mutex<Option<Cancel>>> = Arc::new(Mutex::new(None));
    let (tx, rx) = mpsc::sync_channel::<Frame>(64);
    let reader_current = current.clone();
    let mut input = input;
    std::thread::spawn(move || {
        loop {
            match wire::read_frame(&mut input) {
                Ok(Some((wire::KILL, _))) => {
                    if let Some(c) = &*reader_current.lock().unwrap() {
                        c.cancel();
                    }
                }
                Ok(Some(f)) => {
                    if f.0 == wire::EXEC {
                        *reader_current.lock().unwrap() = Some(Cancel::new());
                    }
                    if tx.send(f).is_err() {
                        break;
                    }
                }
                // The end of the input, or a broken stream: slate is gone.
                _ => break,
            }
        }
        // Whatever runs or is about to run stops; nothing new starts.
        let gone = Cancel::new();
        gone.cancel();
        let mut current = reader_current.lock().unwrap();
        if let Some(c) = &*current {
            c.cancel();
        }
        *current = Some(gone);
    });
    let mut frames = Incoming(&rx);
    let spec = match frames.next_frame()? {
        Some((wire::CREATE, p)) => wire::parse::<RemoteSpec>(&p)?,
        Some((k, _)) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected the environment to make, got a frame of kind {k}"),
            ))
        }
        None => return Ok(()),
    };
    let mut env = match create(store, &spec) {
        Ok(env) => env,
        Err(e) => {
            let _ = send(&out, wire::ERR, e.as_bytes());
            return Ok(());
        }
    };
    let hello = wire::Hello {
        kernel: kernel(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let served = send_json(&out, wire::HELLO, &hello).and_then(|()| {
        let mut server = Server {
            store,
            env: &mut env,
            out: &out,
            current: &current,
        };
        server.serve(&mut frames)
    });
    let destroyed = env.destroy();
    served?;
    destroyed.map_err(io::Error::other)
}

type Out = Arc<Mutex<Box<dyn Write + Send>>>;

fn send(out: &Out, kind: u8, payload: &[u8]) -> io::Result<()> {
    wire::write_frame(&mut *out.lock().unwrap(), kind, payload)
}

fn send_json(out: &Out, kind: u8, v: &impl serde::Serialize) -> io::Result<()> {
    wire::write_json(&mut *out.lock().unwrap(), kind, v)
}

/// The frames the reader thread passes on.
struct Incoming<'a>(&'a Receiver<Frame>);

impl FrameSource for Incoming<'_> {
    fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        Ok(self.0.recv().ok())
    }
}

fn kernel() -> String {
    fs_err::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Makes the environment `spec` asks for from this store's layers.
fn create(store: &LayerStore, spec: &RemoteSpec) -> Result<slate_sandbox::SandboxEnv, String> {
    let mut layers = Vec::new();
    for k in &spec.layers {
        check_key(k).map_err(|e| e.to_string())?;
        if !store.has(k) {
            return Err(format!("{LACKS} the layer `{k}`"));
        }
        store.touch_used(k);
        layers.push(store.layer_fs(k));
    }
    SandboxProvider::probe()?;
    let provider = SandboxProvider::new(store.envs_dir());
    provider
        .create(&EnvSpec {
            name: spec.name.clone(),
            layers,
            upper: None,
            network: spec.network,
            host_ca: spec.host_ca,
            limits: Limits {
                cpus: spec.cpus,
                memory: spec.memory,
                pids: spec.pids,
                best_effort: spec.limits_best_effort,
            },
            binds: vec![],
            ephemeral: false,
            kind: EnvKind::Sandbox,
            privileges: Privileges::None,
            ..Default::default()
        })
        .map_err(|e| error_chain(&e))
}

struct Server<'a, E: Environment> {
    store: &'a LayerStore,
    env: &'a mut E,
    out: &'a Out,
    current: &'a Arc<Mutex<Option<Cancel>>>,
}

static SCRATCH: AtomicU64 = AtomicU64::new(0);

impl<E: Environment> Server<'_, E> {
    fn serve(&mut self, frames: &mut Incoming) -> io::Result<()> {
        while let Some((kind, payload)) = frames.next_frame()? {
            let res = match kind {
                wire::EXEC => self.exec(&payload),
                wire::PUT_TAR => self.put_tar(&payload, frames),
                wire::PUT_FILE => self.put_file(&payload, frames),
                wire::LIST => self.list(&payload),
                wire::FETCH => self.fetch(&payload),
                // The rest of a request that failed: no answer.
                wire::DATA => Ok(()),
                other => Err(format!("unknown request {other}")),
            };
            if let Err(e) = res {
                send(self.out, wire::ERR, e.as_bytes())?;
            }
        }
        Ok(())
    }

    /// A scratch path in this store's tmp folder.
    fn scratch(&self, what: &str) -> PathBuf {
        self.store.root().join("tmp").join(format!(
            "remote-{what}-{}-{}",
            std::process::id(),
            SCRATCH.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn exec(&mut self, payload: &[u8]) -> Result<(), String> {
        let req: wire::Exec = wire::parse(payload).map_err(|e| e.to_string())?;
        // Made by the reader thread when it read this EXEC.
        let cancel = self.current.lock().unwrap().clone().unwrap_or_default();
        let out = self.out.clone();
        let mut sink = move |s: Stream, line: &str| {
            let kind = match s {
                Stream::Stdout => wire::STDOUT,
                Stream::Stderr => wire::STDERR,
            };
            let mut data = Vec::with_capacity(line.len() + 1);
            data.extend_from_slice(line.as_bytes());
            data.push(b'\n');
            let _ = send(&out, kind, &data);
        };
        let spec = ExecSpec {
            argv: req.argv,
            env: req.env,
            cwd: req.cwd,
            interactive: false,
        };
        let outcome = self.env.exec(&spec, &mut sink, &cancel);
        let exit = match outcome.map_err(|e| error_chain(&e))? {
            ExecOutcome::Exited(c) => wire::Exit {
                code: Some(c),
                signal: None,
            },
            ExecOutcome::Signaled(s) => wire::Exit {
                code: None,
                signal: Some(s),
            },
            ExecOutcome::TimedOut | ExecOutcome::Cancelled => wire::Exit {
                code: None,
                signal: Some(9),
            },
        };
        send_json(self.out, wire::EXIT, &exit).map_err(|e| e.to_string())
    }

    fn put_tar(&mut self, payload: &[u8], frames: &mut Incoming) -> Result<(), String> {
        let arg: wire::PathArg = wire::parse(payload).map_err(|e| e.to_string())?;
        let dir = self.scratch("put");
        let res = (|| {
            fs_err::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let mut data = DataReader::new(frames);
            // Inputs are files, folders and symlinks: as for a `tar:` base,
            // nothing else is made and no setuid bit is kept.
            let unpacked = slate_layers::unpack::unpack(
                &mut data,
                &dir,
                slate_layers::unpack::Source::TarBase,
            );
            // Whatever happened, the stream stays in step.
            let _ = data.drain();
            unpacked.map_err(|e| error_chain(&e))?;
            let entries: Vec<PathBuf> = slate_layers::tree::walk(&dir)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|(rel, _)| rel)
                .collect();
            self.env
                .put(&dir, &entries, &arg.path)
                .map_err(|e| error_chain(&e))
        })();
        let _ = slate_layers::store::remove_tree(&dir);
        res?;
        send(self.out, wire::OK, b"").map_err(|e| e.to_string())
    }

    fn put_file(&mut self, payload: &[u8], frames: &mut Incoming) -> Result<(), String> {
        const MAX: u64 = 64 << 20;
        let arg: wire::PathArg = wire::parse(payload).map_err(|e| e.to_string())?;
        let mut data = DataReader::new(frames);
        let mut bytes = Vec::new();
        let read = (&mut data).take(MAX + 1).read_to_end(&mut bytes);
        let _ = data.drain();
        read.map_err(|e| e.to_string())?;
        if bytes.len() as u64 > MAX {
            return Err(format!("a file to write is over {} MiB", MAX >> 20));
        }
        self.env
            .put_bytes(&bytes, &arg.path, arg.mode)
            .map_err(|e| error_chain(&e))?;
        send(self.out, wire::OK, b"").map_err(|e| e.to_string())
    }

    fn list(&mut self, payload: &[u8]) -> Result<(), String> {
        let arg: wire::PathArg = wire::parse(payload).map_err(|e| e.to_string())?;
        let files = self.env.list(&arg.path).map_err(|e| error_chain(&e))?;
        let json = serde_json::to_vec(&files).map_err(|e| e.to_string())?;
        wire::send_data(&mut *self.out.lock().unwrap(), &mut &json[..])
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn fetch(&mut self, payload: &[u8]) -> Result<(), String> {
        let arg: wire::PathArg = wire::parse(payload).map_err(|e| e.to_string())?;
        let tmp = self.scratch("fetch");
        let res = (|| {
            let size = self
                .env
                .fetch(&arg.path, &tmp)
                .map_err(|e| error_chain(&e))?;
            let mut f = fs_err::File::open(&tmp).map_err(|e| e.to_string())?;
            let mut out = self.out.lock().unwrap();
            wire::write_json(&mut *out, wire::RESULT, &wire::FileSize { size })
                .and_then(|()| wire::send_data(&mut *out, &mut f))
                .map(drop)
                .map_err(|e| e.to_string())
        })();
        let _ = fs_err::remove_file(&tmp);
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_key_that_is_a_path_is_refused() {
        for bad in ["../x", "a/b", "", ".", "k;rm", "/etc"] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
        assert!(check_key("0123abcdef").is_ok());
        let t = tempfile::tempdir().unwrap();
        let store = LayerStore::open(t.path()).unwrap();
        let mut out = Vec::new();
        assert!(missing_layers(&store, &["../../etc".into()], &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn a_layer_sent_under_another_key_is_not_stored() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs_err::create_dir_all(src.join("fs")).unwrap();
        fs_err::write(src.join("fs/f"), "x").unwrap();
        let meta = r#"{"key":"realkey","parent":null,"description":"","created":0,"size":0,"bake_seconds":0.0}"#;
        fs_err::write(src.join("layer.json"), meta).unwrap();
        let tar = Command::new("tar")
            .arg("-C")
            .arg(&src)
            .args(["-cf", "-", "fs", "layer.json"])
            .output()
            .unwrap();
        assert!(tar.status.success());
        let store = LayerStore::open(&t.path().join("cache")).unwrap();
        let err = receive_layer(&store, "otherkey", &tar.stdout[..]).unwrap_err();
        assert!(err.to_string().contains("says it is `realkey`"), "{err}");
        assert!(!store.has("otherkey") && !store.has("realkey"));
        receive_layer(&store, "realkey", &tar.stdout[..]).unwrap();
        assert!(store.has("realkey"));
    }
}
