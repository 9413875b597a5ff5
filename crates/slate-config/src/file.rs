//! What `slate.toml` says, as written: the serde model of the file.
//!
//! These types are not used at run time; `resolve` turns them into specs. Every
//! struct denies unknown fields so that a typo is an error with a span, not a
//! silently ignored setting.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub settings: SettingsConfig,
    #[serde(default)]
    pub images: indexmap_like::OrderedMap<Spanned<ImageConfig>>,
    #[serde(default)]
    pub builds: indexmap_like::OrderedMap<Spanned<BuildConfig>>,
    #[serde(default)]
    pub providers: ProvidersConfig,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SettingsConfig {
    pub jobs: Option<Spanned<u32>>,
    pub artifacts: Option<Spanned<String>>,
    pub publish: Option<Spanned<String>>,
    pub signing_key: Option<Spanned<String>>,
    /// Network builds and bake steps trust the host's CA bundle.
    #[serde(default)]
    pub host_ca: bool,
    /// `script`, `inputs`, `files` and `tar:` sources may lie outside the
    /// project folder.
    #[serde(default)]
    pub outside_sources: bool,
    /// Baked layers fetched from (and `slate bake` sends to) this cache.
    pub layer_cache: Option<Spanned<String>>,
    /// `[settings.logs]`: where every run's log is shipped.
    #[serde(default)]
    pub logs: LogsConfig,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LogsConfig {
    #[serde(default)]
    pub ship: Vec<Spanned<String>>,
    /// PEM certificates trusted besides the system's, for TLS sinks.
    pub ca: Option<String>,
    /// How events are printed when `--log-format` is not given.
    pub format: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    pub from: Spanned<String>,
    #[serde(default)]
    pub packages: Vec<Spanned<String>>,
    #[serde(default)]
    pub steps: Vec<Spanned<String>>,
    #[serde(default)]
    pub files: indexmap_like::OrderedMap<Spanned<String>>,
    #[serde(default)]
    pub env: indexmap_like::OrderedMap<String>,
    pub arch: Option<Spanned<String>>,
    pub mirror: Option<Spanned<String>>,
    pub variant: Option<Spanned<String>>,
    #[serde(default)]
    pub vm: bool,
    /// Folders that outlive the bake's environments (as on builds).
    #[serde(default)]
    pub caches: Vec<Spanned<CacheConfig>>,
    /// Allow plain http to a non-loopback registry (`oci:` bases).
    #[serde(default)]
    pub insecure: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildConfig {
    pub image: Spanned<String>,
    #[serde(default)]
    pub matrix: indexmap_like::OrderedMap<Spanned<Vec<String>>>,
    pub script: Option<Spanned<String>>,
    pub run: Option<Spanned<Vec<String>>>,
    pub inputs: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub exclude: Vec<Spanned<String>>,
    pub workdir: Option<Spanned<String>>,
    #[serde(default)]
    pub artifacts: Vec<Spanned<String>>,
    #[serde(default)]
    pub env: indexmap_like::OrderedMap<String>,
    #[serde(default)]
    pub secrets: Vec<Spanned<String>>,
    #[serde(default)]
    pub network: bool,
    pub cpus: Option<Spanned<f64>>,
    pub memory: Option<Spanned<String>>,
    pub pids: Option<Spanned<u64>>,
    pub timeout: Option<Spanned<String>>,
    pub provider: Option<Spanned<String>>,
    /// Folders that outlive environments: `"/path"` or `{ path, id, sharing }`.
    #[serde(default)]
    pub caches: Vec<Spanned<CacheConfig>>,
    /// `none` (the default) or `packages`: what a package manager needs.
    pub privileges: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum CacheConfig {
    Path(String),
    Table {
        path: String,
        id: Option<String>,
        sharing: Option<String>,
    },
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ProvidersConfig {
    pub sandbox: Option<SandboxConfig>,
    pub vm: Option<VmConfig>,
    pub ssh: Option<SshConfig>,
    pub ec2: Option<Ec2Config>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub accel: Option<Spanned<String>>,
    pub init: Option<Spanned<String>>,
    pub snapshots: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    #[serde(default)]
    pub hosts: Vec<String>,
    pub user: Option<String>,
    pub identity: Option<String>,
    pub known_hosts: Option<Spanned<String>>,
    pub known_hosts_file: Option<String>,
    pub slots: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Ec2Config {
    pub region: Option<String>,
    pub endpoint: Option<Spanned<String>>,
    pub ami: Option<Spanned<String>>,
    pub instance_type: Option<String>,
    pub subnet: Option<String>,
    pub security_group: Option<String>,
    pub key_name: Option<String>,
    pub spot: Option<bool>,
    pub max_instances: Option<Spanned<u64>>,
    pub user: Option<String>,
    pub identity: Option<String>,
    pub ssh_port: Option<Spanned<u64>>,
    pub address: Option<Spanned<String>>,
    pub boot_timeout: Option<Spanned<String>>,
}

/// An ordered string-keyed map that keeps the file's order (matrix axes and
/// targets are named in the order the user wrote them).
pub mod indexmap_like {
    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
    use std::fmt;
    use std::marker::PhantomData;

    #[derive(Debug, Clone)]
    pub struct OrderedMap<V>(pub Vec<(String, V)>);

    impl<V> Default for OrderedMap<V> {
        fn default() -> Self {
            OrderedMap(Vec::new())
        }
    }

    impl<V> OrderedMap<V> {
        pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
            self.0.iter().map(|(k, v)| (k, v))
        }
        pub fn get(&self, key: &str) -> Option<&V> {
            self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
        }
        pub fn keys(&self) -> impl Iterator<Item = &String> {
            self.0.iter().map(|(k, _)| k)
        }
        pub fn is_empty(&self) -> bool {
            self.0.is_empty()
        }
        pub fn len(&self) -> usize {
            self.0.len()
        }
    }

    impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V2<V>(PhantomData<V>);
            impl<'de, V: Deserialize<'de>> Visitor<'de> for V2<V> {
                type Value = OrderedMap<V>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a table")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                    let mut out = Vec::new();
                    while let Some((k, v)) = m.next_entry::<String, V>()? {
                        out.push((k, v));
                    }
                    Ok(OrderedMap(out))
                }
            }
            d.deserialize_map(V2(PhantomData))
        }
    }
}
