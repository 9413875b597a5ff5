//! The ec2 provider: each target gets a fresh cloud instance of its own,
//! launched from an AMI, tagged with the run, the target and an expiry,
//! and terminated after the target (success, failure, timeout, Ctrl-C).
//! Once the instance answers ssh, the target runs there exactly as on an
//! ssh host ([`slate_ssh`]): slate's binary and the image's layers are
//! shipped, slate's sandbox makes the environment.
//!
//! A slate that is killed cannot terminate what it launched: every
//! instance carries `slate:expires` (launch + the targets' timeout + a
//! margin), and [`reap`] (`slate gc --remote`) terminates the instances
//! whose expiry has passed.

pub mod ami;
pub mod api;

use api::{ApiError, Client};
use slate_provider::{
    Cancel, EnvSpec, Environment, ExecOutcome, ExecSpec, OutputSink, Provider, ProviderError,
};
use slate_ssh::{KnownHosts, SshEnv, SshProvider, SshSettings};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// The tags slate puts on what it launches.
pub const TAG_RUN: &str = "slate:run";
pub const TAG_TARGET: &str = "slate:target";
pub const TAG_EXPIRES: &str = "slate:expires";

/// How long a target without a `timeout` may run on an instance before
/// its expiry lets `slate gc --remote` terminate it.
pub const DEFAULT_TARGET_TTL: Duration = Duration::from_secs(2 * 3600);

/// Added to every instance's time to live: inputs, artifacts, teardown.
pub const MARGIN: Duration = Duration::from_secs(600);

/// Which of an instance's addresses slate connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AddressKind {
    /// The public address when the instance has one, else the private one.
    #[default]
    Auto,
    Public,
    Private,
}

impl AddressKind {
    pub fn parse(s: &str) -> Option<AddressKind> {
        match s {
            "auto" => Some(AddressKind::Auto),
            "public" => Some(AddressKind::Public),
            "private" => Some(AddressKind::Private),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Ec2Settings {
    pub region: Option<String>,
    /// In place of AWS's own endpoint: EC2-compatible clouds, test servers.
    pub endpoint: Option<String>,
    /// The AMI every instance starts from.
    pub ami: String,
    pub instance_type: String,
    pub subnet: Option<String>,
    pub security_group: Option<String>,
    /// The key pair the AMI's cloud-init installs for `user`.
    pub key_name: Option<String>,
    /// Spot instances, on demand when spot capacity is refused.
    pub spot: bool,
    /// Instances at once.
    pub max_instances: usize,
    /// The ssh login (root, or a user with passwordless sudo).
    pub user: String,
    pub identity: Option<PathBuf>,
    pub ssh_port: u16,
    pub address: AddressKind,
    /// How long an instance may live: the targets' timeout and a margin.
    /// Its `slate:expires` tag is launch time plus this.
    pub ttl: Duration,
    /// How long an instance may take to run and answer ssh.
    pub boot_timeout: Duration,
}

/// Told what the user should know.
type Note = Box<dyn FnMut(&str) + Send>;

struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

pub struct Ec2Provider {
    client: Arc<Client>,
    settings: Ec2Settings,
    layers_root: PathBuf,
    run: Mutex<String>,
    slots: Arc<Slots>,
    /// One known_hosts file per instance: each is a new machine whose key
    /// is learnt on first contact, and its address may be another's later.
    known_hosts: tempfile::TempDir,
    note: Arc<Mutex<Option<Note>>>,
    launches: AtomicU64,
}

/// The client for `settings`' region and endpoint, with credentials from
/// the usual chain.
pub fn client(region: Option<&str>, endpoint: Option<&str>) -> Result<Client, String> {
    let region = api::region(region)?;
    let creds = api::credentials()?;
    Ok(Client::new(endpoint, region, creds))
}

impl Ec2Provider {
    pub fn new(settings: Ec2Settings, layers_root: &Path) -> Result<Ec2Provider, String> {
        if settings.ami.is_empty() {
            return Err("[providers.ec2] names no `ami`".into());
        }
        let client = client(settings.region.as_deref(), settings.endpoint.as_deref())?;
        let known_hosts = tempfile::Builder::new()
            .prefix("slate-ec2-")
            .tempdir()
            .map_err(|e| format!("cannot make a folder for known_hosts: {e}"))?;
        let max = settings.max_instances.max(1);
        Ok(Ec2Provider {
            client: Arc::new(client),
            settings,
            layers_root: layers_root.to_path_buf(),
            run: Mutex::new(format!("slate-{}", std::process::id())),
            slots: Arc::new(Slots {
                used: Mutex::new(0),
                freed: Condvar::new(),
                max,
            }),
            known_hosts,
            note: Arc::new(Mutex::new(None)),
            launches: AtomicU64::new(0),
        })
    }

    /// The run whose instances these are (their `slate:run` tag).
    pub fn set_run(&self, run: &str) {
        *self.run.lock().unwrap() = run.to_string();
    }

    /// Called with what the user should know (launches, spot refused,
    /// instances that could not be terminated).
    pub fn on_note(&self, f: impl FnMut(&str) + Send + 'static) {
        *self.note.lock().unwrap() = Some(Box::new(f));
    }

    fn say(&self, m: &str) {
        say(&self.note, m);
    }

    /// Whether the credentials work and the AMI is there, in words.
    pub fn check(&self) -> Result<String, String> {
        let c = &self.client;
        let node = c
            .call(
                "DescribeImages",
                &[("ImageId.1".into(), self.settings.ami.clone())],
            )
            .map_err(|e| e.to_string())?;
        let Some(image) = node.items("imagesSet").next() else {
            return Err(format!(
                "AMI {} is not there in {}",
                self.settings.ami, c.region
            ));
        };
        Ok(format!(
            "region {}, credentials from {}, AMI {} ({}), {}{}",
            c.region,
            c.credentials().source,
            self.settings.ami,
            image.text_at(&["name"]).unwrap_or("no name"),
            self.settings.instance_type,
            if self.settings.spot { ", spot" } else { "" }
        ))
    }

    /// Launches one instance for `target`.
    fn launch(&self, target: &str) -> Result<Instance, ApiError> {
        let s = &self.settings;
        let run = self.run.lock().unwrap().clone();
        let expires = SystemTime::now() + s.ttl;
        let expires = humantime::format_rfc3339_seconds(expires).to_string();
        let n = self.launches.fetch_add(1, Ordering::Relaxed);
        let mut p: Vec<(String, String)> = vec![
            ("ImageId".into(), s.ami.clone()),
            ("InstanceType".into(), s.instance_type.clone()),
            ("MinCount".into(), "1".into()),
            ("MaxCount".into(), "1".into()),
            // An instance that shuts itself down is gone, not parked.
            (
                "InstanceInitiatedShutdownBehavior".into(),
                "terminate".into(),
            ),
            // A launch retried after a lost answer is the same launch.
            ("ClientToken".into(), format!("{run}-{target}-{n}")),
            ("TagSpecification.1.ResourceType".into(), "instance".into()),
        ];
        let tags = [
            ("Name", format!("slate {run} {target}")),
            (TAG_RUN, run.clone()),
            (TAG_TARGET, target.to_string()),
            (TAG_EXPIRES, expires.clone()),
        ];
        for (i, (k, v)) in tags.iter().enumerate() {
            p.push((
                format!("TagSpecification.1.Tag.{}.Key", i + 1),
                k.to_string(),
            ));
            p.push((format!("TagSpecification.1.Tag.{}.Value", i + 1), v.clone()));
        }
        if let Some(x) = &s.subnet {
            p.push(("SubnetId".into(), x.clone()));
        }
        if let Some(x) = &s.security_group {
            p.push(("SecurityGroupId.1".into(), x.clone()));
        }
        if let Some(x) = &s.key_name {
            p.push(("KeyName".into(), x.clone()));
        }
        let answer = if s.spot {
            let mut spot = p.clone();
            spot.extend([
                ("InstanceMarketOptions.MarketType".into(), "spot".into()),
                (
                    "InstanceMarketOptions.SpotOptions.SpotInstanceType".into(),
                    "one-time".into(),
                ),
                (
                    "InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior".into(),
                    "terminate".into(),
                ),
            ]);
            if let Some(last) = spot.iter_mut().find(|(k, _)| k == "ClientToken") {
                last.1.push_str("-spot");
            }
            match self.client.call("RunInstances", &spot) {
                Err(e) if e.code().is_some_and(spot_refused) => {
                    self.say(&format!(
                        "spot capacity refused for {target} ({}): launching on demand",
                        e.code().unwrap_or_default()
                    ));
                    self.client.call("RunInstances", &p)?
                }
                other => other?,
            }
        } else {
            self.client.call("RunInstances", &p)?
        };
        let id = answer
            .items("instancesSet")
            .next()
            .and_then(|i| i.text_at(&["instanceId"]))
            .filter(|id| !id.is_empty())
            .ok_or_else(|| ApiError::Answer {
                action: "RunInstances".into(),
                why: "no instance id in the answer".into(),
            })?
            .to_string();
        Ok(Instance {
            client: self.client.clone(),
            note: self.note.clone(),
            id,
            expires,
            terminated: false,
        })
    }

    /// Waits for the instance to run; the address slate connects to.
    fn wait_running(&self, inst: &Instance, cancel: &Cancel) -> Result<String, String> {
        let deadline = Instant::now() + self.settings.boot_timeout;
        loop {
            let node = self
                .client
                .call(
                    "DescribeInstances",
                    &[("InstanceId.1".into(), inst.id.clone())],
                )
                .map_err(|e| e.to_string())?;
            let i = node.find("instancesSet").and_then(|s| s.child("item"));
            let state = i
                .and_then(|i| i.text_at(&["instanceState", "name"]))
                .unwrap_or("unknown");
            match state {
                "running" => {
                    return address_of(i.expect("an instance"), self.settings.address)
                        .map_err(|why| format!("instance {}: {why}", inst.id));
                }
                "pending" | "unknown" => {}
                other => {
                    let why = i
                        .and_then(|i| i.text_at(&["stateReason", "message"]))
                        .unwrap_or("no reason given");
                    return Err(format!(
                        "instance {} is {other} before it ran: {why}",
                        inst.id
                    ));
                }
            }
            if cancel.is_cancelled() {
                return Err("cancelled".into());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "instance {} did not run within {} s",
                    inst.id,
                    self.settings.boot_timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// An instance slot, waiting while `max_instances` run.
    fn take_slot(&self) -> Slot {
        let mut used = self.slots.used.lock().unwrap();
        while *used >= self.slots.max {
            used = self.slots.freed.wait(used).unwrap();
        }
        *used += 1;
        Slot(self.slots.clone())
    }
}

/// The address of a running instance slate connects to. Only an IP
/// address is taken: whatever the endpoint answers goes on ssh's command
/// line.
fn address_of(i: &api::Node, kind: AddressKind) -> Result<String, String> {
    let private = i.text_at(&["privateIpAddress"]).filter(|a| !a.is_empty());
    let public = i.text_at(&["ipAddress"]).filter(|a| !a.is_empty());
    let (addr, which) = match kind {
        AddressKind::Auto => (public.or(private), "IP"),
        AddressKind::Public => (public, "public"),
        AddressKind::Private => (private, "private"),
    };
    let addr = addr.ok_or_else(|| format!("it runs but has no {which} address"))?;
    addr.parse::<std::net::IpAddr>()
        .map(|ip| ip.to_string())
        .map_err(|_| format!("the cloud gave `{addr}` as its address, which is not an IP address"))
}

/// Spot launches refused for want of capacity or price: tried again on
/// demand.
fn spot_refused(code: &str) -> bool {
    matches!(
        code,
        "InsufficientInstanceCapacity"
            | "InsufficientCapacity"
            | "SpotMaxPriceTooLow"
            | "MaxSpotInstanceCountExceeded"
            | "UnfulfillableCapacity"
            | "InsufficientFreeAddressesInSubnet"
    ) || code.starts_with("Spot")
}

fn say(note: &Mutex<Option<Note>>, m: &str) {
    if let Some(f) = &mut *note.lock().unwrap() {
        f(m);
    }
}

struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        *self.0.used.lock().unwrap() -= 1;
        self.0.freed.notify_all();
    }
}

/// A launched instance, terminated when dropped unless already.
struct Instance {
    client: Arc<Client>,
    note: Arc<Mutex<Option<Note>>>,
    id: String,
    expires: String,
    terminated: bool,
}

impl Instance {
    fn terminate(&mut self) -> Result<(), String> {
        self.terminated = true;
        self.client
            .call(
                "TerminateInstances",
                &[("InstanceId.1".into(), self.id.clone())],
            )
            .map(drop)
            .map_err(|e| {
                format!(
                    "instance {} could not be terminated: {e}; `slate gc --remote` terminates it after {}",
                    self.id, self.expires
                )
            })
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if !self.terminated {
            if let Err(why) = self.terminate() {
                say(&self.note, &why);
            }
        }
    }
}

impl Provider for Ec2Provider {
    type Env = Ec2Env;

    fn name(&self) -> &'static str {
        "ec2"
    }

    fn create(&self, spec: &EnvSpec) -> Result<Ec2Env, ProviderError> {
        let cerr = |what: String| ProviderError::Create {
            env: spec.name.clone(),
            what,
            source: None,
        };
        let slot = self.take_slot();
        let inst = self.launch(&spec.name).map_err(|e| match e {
            // Credentials or settings the cloud refuses: no retry helps.
            ApiError::Service { ref code, .. }
                if code.starts_with("Auth")
                    || code.starts_with("InvalidAMI")
                    || code.starts_with("InvalidParameter")
                    || code == "UnauthorizedOperation" =>
            {
                ProviderError::Unavailable {
                    provider: "ec2".into(),
                    why: e.to_string(),
                }
            }
            e => cerr(format!("cannot launch an instance: {e}")),
        })?;
        // Cancelled by nothing here: a target's timeout and Ctrl-C end the
        // commands; the launch itself is bounded by `boot_timeout`.
        let cancel = Cancel::new();
        let addr = self.wait_running(&inst, &cancel).map_err(cerr)?;
        self.say(&format!(
            "{}: instance {} at {addr} (expires {})",
            spec.name, inst.id, inst.expires
        ));
        let host = if addr.contains(':') {
            format!("[{addr}]:{}", self.settings.ssh_port)
        } else {
            format!("{addr}:{}", self.settings.ssh_port)
        };
        let ssh = SshProvider::new(
            SshSettings {
                hosts: vec![host],
                user: self.settings.user.clone(),
                identity: self.settings.identity.clone(),
                known_hosts: KnownHosts::AcceptNew,
                known_hosts_file: Some(self.known_hosts.path().join(&inst.id)),
                slots: 1,
                shared_masters: false,
            },
            &self.layers_root,
        )
        .map_err(|why| ProviderError::Unavailable {
            provider: "ec2".into(),
            why,
        })?;
        let deadline = Instant::now() + self.settings.boot_timeout;
        ssh.wait_ready(deadline, &cancel).map_err(|why| {
            cerr(format!(
                "instance {} does not answer ssh as needed: {why}",
                inst.id
            ))
        })?;
        let env = ssh.create(spec)?;
        Ok(Ec2Env {
            id: format!("{}@{}", spec.name, inst.id),
            env: Some(env),
            ssh: Some(ssh),
            instance: inst,
            _slot: slot,
        })
    }
}

/// A target's environment on its own instance.
pub struct Ec2Env {
    id: String,
    env: Option<SshEnv>,
    /// Dropped after the environment: it ends the master connection.
    ssh: Option<SshProvider>,
    instance: Instance,
    _slot: Slot,
}

impl Ec2Env {
    fn env(&mut self) -> &mut SshEnv {
        self.env.as_mut().expect("an environment until destroyed")
    }
}

impl Environment for Ec2Env {
    fn id(&self) -> &str {
        &self.id
    }

    fn put(&mut self, base: &Path, entries: &[PathBuf], dest: &str) -> Result<u64, ProviderError> {
        self.env().put(base, entries, dest)
    }

    fn put_bytes(&mut self, data: &[u8], dest: &str, mode: u32) -> Result<(), ProviderError> {
        self.env().put_bytes(data, dest, mode)
    }

    fn exec(
        &mut self,
        spec: &ExecSpec,
        out: &mut dyn OutputSink,
        cancel: &Cancel,
    ) -> Result<ExecOutcome, ProviderError> {
        self.env().exec(spec, out, cancel)
    }

    fn list(&mut self, dir: &str) -> Result<Vec<String>, ProviderError> {
        self.env().list(dir)
    }

    fn fetch(&mut self, src: &str, dest: &Path) -> Result<u64, ProviderError> {
        self.env().fetch(src, dest)
    }

    fn destroy(mut self) -> Result<(), ProviderError> {
        let env = self.env.take().expect("an environment until destroyed");
        // The instance goes whatever its environment said.
        let destroyed = env.destroy();
        drop(self.ssh.take());
        let terminated = self.instance.terminate();
        destroyed?;
        terminated.map_err(|what| ProviderError::Other {
            env: self.id.clone(),
            what,
        })
    }
}

impl Drop for Ec2Env {
    fn drop(&mut self) {
        // The connection first, then the instance (Instance's own drop).
        drop(self.env.take());
        drop(self.ssh.take());
    }
}

/// What [`reap`] did.
#[derive(Debug, Default)]
pub struct Reaped {
    /// `(instance, target, expiry)` terminated.
    pub terminated: Vec<(String, String, String)>,
    /// `(instance, expiry)` of slate's instances still within their time.
    pub waiting: Vec<(String, String)>,
}

/// Terminates every live instance slate launched whose `slate:expires`
/// has passed (at `now`); those still within their time are left and
/// listed.
pub fn reap(client: &Client, now: SystemTime) -> Result<Reaped, ApiError> {
    let mut found = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut p: Vec<(String, String)> = vec![
            ("Filter.1.Name".into(), "tag-key".into()),
            ("Filter.1.Value.1".into(), TAG_EXPIRES.into()),
            ("Filter.2.Name".into(), "instance-state-name".into()),
        ];
        for (i, s) in ["pending", "running", "stopping", "stopped"]
            .iter()
            .enumerate()
        {
            p.push((format!("Filter.2.Value.{}", i + 1), s.to_string()));
        }
        if let Some(t) = &token {
            p.push(("NextToken".into(), t.clone()));
        }
        let node = client.call("DescribeInstances", &p)?;
        for r in node.items("reservationSet") {
            for i in r.items("instancesSet") {
                let id = i.text_at(&["instanceId"]).unwrap_or_default().to_string();
                let tags = i.tags();
                let tag = |k: &str| {
                    tags.iter()
                        .find(|(key, _)| key == k)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                found.push((id, tag(TAG_TARGET), tag(TAG_EXPIRES)));
            }
        }
        token = node
            .text_at(&["nextToken"])
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    let mut out = Reaped::default();
    for (id, target, expires) in found {
        // A tag that is not a time was not written by slate: left alone.
        match humantime::parse_rfc3339(&expires) {
            Ok(t) if t <= now => out.terminated.push((id, target, expires)),
            Ok(_) => out.waiting.push((id, expires)),
            Err(_) => {}
        }
    }
    for batch in out.terminated.chunks(100) {
        let p: Vec<(String, String)> = batch
            .iter()
            .enumerate()
            .map(|(i, (id, _, _))| (format!("InstanceId.{}", i + 1), id.clone()))
            .collect();
        client.call("TerminateInstances", &p)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_refusals_fall_back_to_on_demand_and_others_do_not() {
        for code in [
            "InsufficientInstanceCapacity",
            "SpotMaxPriceTooLow",
            "MaxSpotInstanceCountExceeded",
        ] {
            assert!(spot_refused(code), "{code}");
        }
        for code in [
            "AuthFailure",
            "InvalidAMIID.NotFound",
            "UnauthorizedOperation",
        ] {
            assert!(!spot_refused(code), "{code}");
        }
    }

    #[test]
    fn an_address_from_the_cloud_must_be_an_ip_address() {
        let node = |private: &str, public: &str| {
            api::parse(
                format!(
                    "<item><privateIpAddress>{private}</privateIpAddress><ipAddress>{public}</ipAddress></item>"
                )
                .as_bytes(),
            )
            .unwrap()
        };
        let n = node("10.0.0.4", "203.0.113.9");
        assert_eq!(address_of(&n, AddressKind::Auto).unwrap(), "203.0.113.9");
        assert_eq!(address_of(&n, AddressKind::Private).unwrap(), "10.0.0.4");
        let n = node("10.0.0.4", "");
        assert_eq!(address_of(&n, AddressKind::Auto).unwrap(), "10.0.0.4");
        assert!(address_of(&n, AddressKind::Public).is_err());
        // A hostile or broken endpoint's answer never reaches ssh.
        for bad in ["-oProxyCommand=touch /tmp/x", "host.example", "10.0.0.4 -v"] {
            let err = address_of(&node(bad, ""), AddressKind::Private).unwrap_err();
            assert!(err.contains("not an IP address"), "{bad}: {err}");
        }
    }

    #[test]
    fn address_kinds_parse() {
        assert_eq!(AddressKind::parse("private"), Some(AddressKind::Private));
        assert_eq!(AddressKind::parse("elastic"), None);
    }
}
