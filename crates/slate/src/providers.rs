//! Every provider behind one type: the orchestrator is generic over a
//! provider, and each environment says which kind it wants (bakes and the
//! sandbox targets get a sandbox, `provider = "vm"` targets a VM).

use slate_provider::*;
use slate_sandbox::{SandboxEnv, SandboxProvider};
use slate_vm::{VmEnv, VmProvider};
use std::path::{Path, PathBuf};

pub struct Providers {
    pub sandbox: SandboxProvider,
    /// Made only when a target needs it.
    pub vm: Option<VmProvider>,
}

pub enum AnyEnv {
    Sandbox(SandboxEnv),
    Vm(VmEnv),
}

impl Provider for Providers {
    type Env = AnyEnv;

    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn create(&self, spec: &EnvSpec) -> Result<AnyEnv, ProviderError> {
        match spec.kind {
            EnvKind::Sandbox => self.sandbox.create(spec).map(AnyEnv::Sandbox),
            EnvKind::Vm => match &self.vm {
                Some(vm) => vm.create(spec).map(AnyEnv::Vm),
                None => Err(ProviderError::Unavailable {
                    provider: "vm".into(),
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
        }
    };
}

impl Environment for AnyEnv {
    fn id(&self) -> &str {
        each!(self, e => e.id())
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
