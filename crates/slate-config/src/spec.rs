//! Resolved, validated specs: what the rest of slate acts on.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Project {
    /// The folder holding the config file; relative paths are relative to it.
    pub dir: PathBuf,
    pub file: PathBuf,
    pub settings: Settings,
    pub images: Vec<ImageSpec>,
    pub targets: Vec<TargetSpec>,
    /// `[providers.vm]`.
    pub vm: VmSpec,
    /// `[providers.ssh]`.
    pub ssh: SshSpec,
    /// `[providers.ec2]`.
    pub ec2: Ec2Spec,
}

/// The ec2 provider: what each target's instance is launched as.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Ec2Spec {
    /// The file has a `[providers.ec2]` section.
    pub configured: bool,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    /// `ami-…`, or `image:NAME` for the AMI `slate bake NAME --export ami`
    /// registered.
    pub ami: String,
    pub instance_type: String,
    pub subnet: Option<String>,
    pub security_group: Option<String>,
    pub key_name: Option<String>,
    pub spot: bool,
    pub max_instances: usize,
    pub user: String,
    pub identity: Option<PathBuf>,
    pub ssh_port: u16,
    /// `auto`, `public` or `private`.
    pub address: String,
    pub boot_timeout: Duration,
}

/// The ssh provider's pool of hosts and how to log in to them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SshSpec {
    /// `host`, `host:port` or `[address]:port`.
    pub hosts: Vec<String>,
    /// `root` unless the file says otherwise (another user runs slate
    /// there through `sudo -n`).
    pub user: String,
    /// The private key; `~/` is the invoking user's home, a relative path
    /// the project folder's.
    pub identity: Option<PathBuf>,
    /// `strict` (only known host keys) or `accept-new`.
    pub known_hosts: String,
    pub known_hosts_file: Option<PathBuf>,
    /// Environments at once per host.
    pub slots: usize,
}

/// How the vm provider runs its machines.
#[derive(Debug, Clone, PartialEq)]
pub struct VmSpec {
    /// `auto` (KVM when a probe guest runs under it, else TCG), `kvm` or `tcg`.
    pub accel: String,
    /// `slate` (slate's agent as PID 1) or `systemd`.
    pub init: String,
    /// Start machines from one saved after its boot (the default).
    pub snapshots: bool,
}

impl Default for VmSpec {
    fn default() -> Self {
        VmSpec {
            accel: "auto".into(),
            init: "slate".into(),
            snapshots: true,
        }
    }
}

impl Project {
    pub fn image(&self, name: &str) -> Option<&ImageSpec> {
        self.images.iter().find(|i| i.name == name)
    }
    pub fn target(&self, name: &str) -> Option<&TargetSpec> {
        self.targets.iter().find(|t| t.name == name)
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub jobs: usize,
    pub artifacts: PathBuf,
    pub publish: Option<String>,
    /// An Ed25519 private key (PKCS#8 PEM) that signs provenance.
    pub signing_key: Option<PathBuf>,
    /// Environments with network trust the host's CA bundle (mounted
    /// read-only, never part of a layer or an artifact).
    pub host_ca: bool,
    /// Where every run's log is shipped (`syslog+tcp://`, `syslog+tls://`,
    /// `elasticsearch+http(s)://HOST:PORT/INDEX`).
    pub ship: Vec<String>,
    /// PEM certificates trusted besides the system's, for TLS sinks.
    pub ship_ca: Option<PathBuf>,
    /// `[settings.logs] format`: `text` or `json`, when the command line
    /// does not say.
    pub log_format: Option<String>,
    /// A layer cache (`s3://BUCKET/PREFIX` or `file://PATH`) missing layers
    /// are fetched from, and `slate bake` sends its layers to.
    pub layer_cache: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BaseSpec {
    Debian {
        suite: String,
        mirror: Option<String>,
        variant: String,
        arch: Option<String>,
    },
    Tar {
        path: PathBuf,
    },
    Oci {
        reference: String,
        insecure: bool,
    },
    Image {
        name: String,
    },
}

#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub name: String,
    pub base: BaseSpec,
    pub packages: Vec<String>,
    /// (host path, absolute path inside the image)
    pub files: Vec<(PathBuf, String)>,
    pub env: Vec<(String, String)>,
    pub steps: Vec<String>,
    pub vm: bool,
    /// Folders that outlive the bake's environments: downloads the steps
    /// fetch, never part of a layer.
    pub caches: Vec<CacheSpec>,
}

impl ImageSpec {
    /// The Debian architecture the image is bootstrapped for, when set.
    pub fn arch(&self) -> Option<&str> {
        match &self.base {
            BaseSpec::Debian { arch, .. } => arch.as_deref(),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Sandbox,
    Vm,
    Ssh,
    Ec2,
}

impl ProviderKind {
    pub const ALL: [ProviderKind; 4] = [Self::Sandbox, Self::Vm, Self::Ssh, Self::Ec2];

    pub fn name(self) -> &'static str {
        match self {
            Self::Sandbox => "sandbox",
            Self::Vm => "vm",
            Self::Ssh => "ssh",
            Self::Ec2 => "ec2",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == s)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum BuildCommand {
    /// A script file on the host, copied in and run.
    Script(PathBuf),
    /// Shell command lines run in order, each one a step.
    Run(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct TargetSpec {
    pub name: String,
    pub build: String,
    pub matrix: Vec<(String, String)>,
    pub image: String,
    pub command: BuildCommand,
    /// Host paths (absolute) copied into `workdir`.
    pub inputs: Vec<PathBuf>,
    pub exclude: Vec<String>,
    pub workdir: String,
    pub artifacts: Vec<String>,
    pub env: Vec<(String, String)>,
    pub secrets: Vec<String>,
    pub network: bool,
    pub cpus: Option<f64>,
    pub memory: Option<u64>,
    pub pids: Option<u64>,
    pub timeout: Option<Duration>,
    pub provider: ProviderKind,
    /// Folders that outlive environments (sandbox only).
    pub caches: Vec<CacheSpec>,
    /// The commands keep what a package manager needs (`privileges =
    /// "packages"`): change owners and modes, switch users.
    pub packages: bool,
}

/// How a cache is shared by environments that run at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// All of them use it at once.
    Shared,
    /// One at a time; the others wait.
    Locked,
    /// One at a time; the others each get a cache of their own.
    Private,
}

/// A folder at `path` inside that outlives environments: downloads, never
/// state a build could depend on silently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSpec {
    pub path: String,
    /// Environments naming the same id share the folder.
    pub id: String,
    pub sharing: Sharing,
}
