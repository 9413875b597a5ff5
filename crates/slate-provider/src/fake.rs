//! A scripted provider for testing the orchestrator's logic without root.
//!
//! Each environment is an in-memory file map. Commands are matched against
//! rules by substring; the first matching rule decides what happens.

use crate::*;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;

#[derive(Debug, Clone)]
pub enum FakeAction {
    /// Print these lines and exit with this code.
    Exit { lines: Vec<String>, code: i32 },
    /// Write a file (relative to the command's cwd), exit 0.
    Write { path: String, content: Vec<u8> },
    /// Run until cancelled or timed out.
    Hang,
    /// The provider fails with this text (as an agent's error would).
    Error(String),
}

#[derive(Default)]
pub struct FakeProvider {
    rules: Vec<(String, FakeAction)>,
    /// How many `create` calls fail before one succeeds.
    create_failures: AtomicUsize,
    pub created: AtomicUsize,
    pub destroyed: Arc<AtomicUsize>,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl FakeProvider {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn on(mut self, substring: &str, action: FakeAction) -> Self {
        self.rules.push((substring.to_string(), action));
        self
    }
    pub fn failing_creates(self, n: usize) -> Self {
        self.create_failures.store(n, Ordering::SeqCst);
        self
    }
}

pub struct FakeEnv {
    id: String,
    files: BTreeMap<String, Vec<u8>>,
    rules: Vec<(String, FakeAction)>,
    destroyed: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Provider for FakeProvider {
    type Env = FakeEnv;
    fn name(&self) -> &'static str {
        "fake"
    }
    fn create(&self, spec: &EnvSpec) -> Result<FakeEnv, ProviderError> {
        let left = self.create_failures.load(Ordering::SeqCst);
        if left > 0 {
            self.create_failures.store(left - 1, Ordering::SeqCst);
            return Err(ProviderError::Create {
                env: spec.name.clone(),
                what: "scripted failure".into(),
                source: None,
            });
        }
        let n = self.created.fetch_add(1, Ordering::SeqCst);
        self.log
            .lock()
            .unwrap()
            .push(format!("create {}", spec.name));
        Ok(FakeEnv {
            id: format!("{}-{n}", spec.name),
            files: BTreeMap::new(),
            rules: self.rules.clone(),
            destroyed: self.destroyed.clone(),
            log: self.log.clone(),
        })
    }
}

fn join(dir: &str, rel: &str) -> String {
    format!("{}/{}", dir.trim_end_matches('/'), rel)
}

impl Environment for FakeEnv {
    fn id(&self) -> &str {
        &self.id
    }
    fn put(&mut self, base: &Path, entries: &[PathBuf], dest: &str) -> Result<u64, ProviderError> {
        let mut n = 0;
        for e in entries {
            let p = base.join(e);
            if p.is_file() {
                let data = std::fs::read(&p).map_err(|err| {
                    ProviderError::op(&self.id, format!("read `{}`", p.display()), err)
                })?;
                n += data.len() as u64;
                self.files
                    .insert(join(dest, &e.display().to_string()), data);
            }
        }
        Ok(n)
    }
    fn put_bytes(&mut self, data: &[u8], dest: &str, _mode: u32) -> Result<(), ProviderError> {
        self.files.insert(dest.to_string(), data.to_vec());
        Ok(())
    }
    fn exec(
        &mut self,
        spec: &ExecSpec,
        out: &mut dyn OutputSink,
        cancel: &Cancel,
    ) -> Result<ExecOutcome, ProviderError> {
        let cmd = spec.argv.join(" ");
        self.log
            .lock()
            .unwrap()
            .push(format!("exec {} {cmd}", self.id));
        let action = self
            .rules
            .iter()
            .find(|(s, _)| cmd.contains(s.as_str()))
            .map(|(_, a)| a.clone())
            .unwrap_or(FakeAction::Exit {
                lines: vec![],
                code: 0,
            });
        match action {
            FakeAction::Exit { lines, code } => {
                for l in lines {
                    out.line(Stream::Stdout, &l);
                }
                Ok(ExecOutcome::Exited(code))
            }
            FakeAction::Write { path, content } => {
                self.files.insert(join(&spec.cwd, &path), content);
                Ok(ExecOutcome::Exited(0))
            }
            FakeAction::Error(what) => Err(ProviderError::Other {
                env: self.id.clone(),
                what,
            }),
            FakeAction::Hang => loop {
                if cancel.is_cancelled() {
                    return Ok(ExecOutcome::Cancelled);
                }
                if cancel.timed_out() {
                    return Ok(ExecOutcome::TimedOut);
                }
                std::thread::sleep(Duration::from_millis(5));
            },
        }
    }
    fn list(&mut self, dir: &str) -> Result<Vec<String>, ProviderError> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        Ok(self
            .files
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
            .collect())
    }
    fn fetch(&mut self, src: &str, dest: &Path) -> Result<u64, ProviderError> {
        let data = self.files.get(src).ok_or_else(|| ProviderError::Other {
            env: self.id.clone(),
            what: format!("no file `{src}`"),
        })?;
        std::fs::write(dest, data)
            .map_err(|e| ProviderError::op(&self.id, format!("write `{}`", dest.display()), e))?;
        Ok(data.len() as u64)
    }
    fn destroy(self) -> Result<(), ProviderError> {
        self.destroyed.fetch_add(1, Ordering::SeqCst);
        self.log
            .lock()
            .unwrap()
            .push(format!("destroy {}", self.id));
        Ok(())
    }
}
