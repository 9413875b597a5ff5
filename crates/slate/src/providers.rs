//! Every provider behind one type: the orchestrator is generic over a
//! provider, and each environment says which kind it wants (bakes and the
//! sandbox targets get a sandbox, `provider = "vm"` targets a VM). For
//! slate's own tests, a scripted provider can stand in for all of them.

use slate_ec2::{Ec2Env, Ec2Provider};
use slate_provider::fake::{FakeAction, FakeEnv, FakeProvider};
use slate_provider::*;
use slate_sandbox::{SandboxEnv, SandboxProvider};
use slate_ssh::{SshEnv, SshProvider};
use slate_vm::{VmEnv, VmProvider};
use std::path::{Path, PathBuf};

pub struct Providers {
    pub sandbox: SandboxProvider,
    /// Made only when a target needs it.
    pub vm: Option<VmProvider>,
    /// Made only when a target needs it.
    pub ssh: Option<SshProvider>,
    /// Made only when a target needs it.
    pub ec2: Option<Ec2Provider>,
    /// In place of every other, when `SLATE_FAKE_PROVIDER` is set.
    pub fake: Option<FakeProvider>,
}

pub enum AnyEnv {
    Sandbox(SandboxEnv),
    Vm(VmEnv),
    Ssh(SshEnv),
    Ec2(Ec2Env),
    Fake(FakeEnv),
}

/// The variable naming a rules file for the scripted provider: slate's
/// command-line tests run every command (bake, build, verify…) through it,
/// as any user, with nothing run for real.
pub const FAKE_VAR: &str = "SLATE_FAKE_PROVIDER";

/// The scripted provider `SLATE_FAKE_PROVIDER` asks for, if it does. Its
/// file is a JSON list of rules, the first whose `match` is in a command's
/// text deciding: `{"match": "make", "exit": 2, "lines": ["…"]}`,
/// `{"match": "…", "write": "out/a.txt", "content": "…"}`,
/// `{"match": "…", "hang": true}` or `{"match": "…", "error": "…"}`.
/// Commands no rule matches exit 0.
pub fn fake_from_env() -> Result<Option<FakeProvider>, String> {
    let Some(path) = std::env::var_os(FAKE_VAR) else {
        return Ok(None);
    };
    let path = Path::new(&path);
    let text = std::fs::read(path).map_err(|e| format!("{FAKE_VAR}: `{}`: {e}", path.display()))?;
    let rules: Vec<serde_json::Value> = serde_json::from_slice(&text)
        .map_err(|e| format!("{FAKE_VAR}: `{}`: {e}", path.display()))?;
    let mut fake = FakeProvider::new();
    for r in &rules {
        let text = |k: &str| r.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let on = text("match").ok_or_else(|| format!("{FAKE_VAR}: a rule without `match`: {r}"))?;
        let action = if let Some(path) = text("write") {
            FakeAction::Write {
                path,
                content: text("content").unwrap_or_default().into_bytes(),
            }
        } else if let Some(what) = text("error") {
            FakeAction::Error(what)
        } else if r.get("hang").is_some() {
            FakeAction::Hang
        } else {
            FakeAction::Exit {
                lines: r
                    .get("lines")
                    .and_then(|l| l.as_array())
                    .map(|l| {
                        l.iter()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
                code: r.get("exit").and_then(|c| c.as_i64()).unwrap_or(0) as i32,
            }
        };
        fake = fake.on(&on, action);
    }
    Ok(Some(fake))
}

impl Provider for Providers {
    type Env = AnyEnv;

    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn create(&self, spec: &EnvSpec) -> Result<AnyEnv, ProviderError> {
        if let Some(fake) = &self.fake {
            return fake.create(spec).map(AnyEnv::Fake);
        }
        match spec.kind {
            EnvKind::Sandbox => self.sandbox.create(spec).map(AnyEnv::Sandbox),
            EnvKind::Vm => match &self.vm {
                Some(vm) => vm.create(spec).map(AnyEnv::Vm),
                None => Err(ProviderError::Unavailable {
                    provider: "vm".into(),
                    why: "it was not set up for this command".into(),
                }),
            },
            EnvKind::Ssh => match &self.ssh {
                Some(ssh) => ssh.create(spec).map(AnyEnv::Ssh),
                None => Err(ProviderError::Unavailable {
                    provider: "ssh".into(),
                    why: "it was not set up for this command".into(),
                }),
            },
            EnvKind::Ec2 => match &self.ec2 {
                Some(ec2) => ec2.create(spec).map(AnyEnv::Ec2),
                None => Err(ProviderError::Unavailable {
                    provider: "ec2".into(),
                    why: "it was not set up for this command".into(),
                }),
            },
        }
    }
}

macro_rules! each {
    ($self:ident, $e:ident => $body:expr) => {
        match $self {
            AnyEnv::Sandbox($e) => $body,
            AnyEnv::Vm($e) => $body,
            AnyEnv::Ssh($e) => $body,
            AnyEnv::Ec2($e) => $body,
            AnyEnv::Fake($e) => $body,
        }
    };
}

impl Environment for AnyEnv {
    fn id(&self) -> &str {
        each!(self, e => e.id())
    }
    fn keep(self, dest: &Path) -> Result<(), ProviderError> {
        each!(self, e => e.keep(dest))
    }
    fn put(&mut self, base: &Path, entries: &[PathBuf], dest: &str) -> Result<u64, ProviderError> {
        each!(self, e => e.put(base, entries, dest))
    }
    fn put_bytes(&mut self, data: &[u8], dest: &str, mode: u32) -> Result<(), ProviderError> {
        each!(self, e => e.put_bytes(data, dest, mode))
    }
    fn exec(
        &mut self,
        spec: &ExecSpec,
        out: &mut dyn OutputSink,
        cancel: &Cancel,
    ) -> Result<ExecOutcome, ProviderError> {
        each!(self, e => e.exec(spec, out, cancel))
    }
    fn list(&mut self, dir: &str) -> Result<Vec<String>, ProviderError> {
        each!(self, e => e.list(dir))
    }
    fn fetch(&mut self, src: &str, dest: &Path) -> Result<u64, ProviderError> {
        each!(self, e => e.fetch(src, dest))
    }
    fn destroy(self) -> Result<(), ProviderError> {
        each!(self, e => e.destroy())
    }
}
