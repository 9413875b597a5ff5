//! Which targets a command runs, and in which provider: decided here, once,
//! for `build`, `up` and `verify` alike. A provider this slate cannot run
//! is an error here, never a quiet fallback to another.

use slate_config::{Project, ProviderKind, TargetSpec};
use slate_provider::EnvKind;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    #[error("no target named `{name}`")]
    UnknownTarget { name: String, known: Vec<String> },
    #[error("unknown provider `{0}`")]
    UnknownProvider(String),
    #[error(
        "target `{target}`: the `{provider}` provider is not available in this version of slate"
    )]
    Unavailable { target: String, provider: String },
    #[error("the config defines no builds")]
    NoTargets,
}

/// The environment a provider gives, if this slate has that provider.
pub fn env_kind(p: ProviderKind) -> Option<EnvKind> {
    match p {
        ProviderKind::Sandbox => Some(EnvKind::Sandbox),
        ProviderKind::Vm => Some(EnvKind::Vm),
        ProviderKind::Ssh => Some(EnvKind::Ssh),
        ProviderKind::Ec2 => Some(EnvKind::Ec2),
    }
}

/// The targets named (a build name selects all its matrix targets; none
/// selects every target), each with the provider it runs in: `forced`
/// (`--provider`) over its own.
pub fn select(
    project: &Project,
    names: &[String],
    forced: Option<&str>,
) -> Result<Vec<TargetSpec>, SelectError> {
    let forced = forced
        .map(|p| ProviderKind::parse(p).ok_or_else(|| SelectError::UnknownProvider(p.into())))
        .transpose()?;
    let mut selected: Vec<&TargetSpec> = Vec::new();
    for name in names {
        let matched: Vec<&TargetSpec> = project
            .targets
            .iter()
            .filter(|t| &t.name == name || &t.build == name)
            .collect();
        if matched.is_empty() {
            return Err(SelectError::UnknownTarget {
                name: name.clone(),
                known: project.targets.iter().map(|t| t.name.clone()).collect(),
            });
        }
        for t in matched {
            if !selected.iter().any(|s| s.name == t.name) {
                selected.push(t);
            }
        }
    }
    if names.is_empty() {
        selected = project.targets.iter().collect();
    }
    if selected.is_empty() {
        return Err(SelectError::NoTargets);
    }
    selected
        .into_iter()
        .map(|t| {
            let mut t = t.clone();
            t.provider = forced.unwrap_or(t.provider);
            match env_kind(t.provider) {
                Some(_) => Ok(t),
                None => Err(SelectError::Unavailable {
                    target: t.name,
                    provider: t.provider.name().into(),
                }),
            }
        })
        .collect()
}

/// Whether any of `targets` runs in a VM.
pub fn need_vm(targets: &[TargetSpec]) -> bool {
    targets
        .iter()
        .any(|t| env_kind(t.provider) == Some(EnvKind::Vm))
}

/// The providers beyond the sandbox that a command must set up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    pub vm: bool,
    pub ssh: bool,
    pub ec2: bool,
}

/// What `targets` need set up.
pub fn needs(targets: &[TargetSpec]) -> Needs {
    Needs {
        vm: need_vm(targets),
        ssh: need_ssh(targets),
        ec2: targets
            .iter()
            .any(|t| env_kind(t.provider) == Some(EnvKind::Ec2)),
    }
}

/// Whether any of `targets` runs on an ssh host.
pub fn need_ssh(targets: &[TargetSpec]) -> bool {
    targets
        .iter()
        .any(|t| env_kind(t.provider) == Some(EnvKind::Ssh))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(text: &str) -> Project {
        slate_config::load_str(std::path::Path::new("/p/slate.toml"), text).unwrap()
    }

    const CONFIG: &str = "[images.base]\nfrom = \"debian:bookworm\"\n\
        [builds.a]\nimage = \"base\"\nrun = [\"true\"]\n\
        [builds.m]\nimage = \"base\"\nrun = [\"true\"]\nprovider = \"vm\"\nmatrix = { n = [\"1\", \"2\"] }\n\
        [builds.far]\nimage = \"base\"\nrun = [\"true\"]\nprovider = \"ec2\"\n";

    #[test]
    fn every_target_gets_its_provider_or_an_error() {
        let p = project(CONFIG);
        let names = |v: &[TargetSpec]| v.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        let m = select(&p, &["m".into()], None).unwrap();
        assert_eq!(names(&m), ["m-1", "m-2"]);
        assert!(m.iter().all(|t| t.provider == ProviderKind::Vm) && need_vm(&m));
        let forced = select(&p, &["m".into()], Some("sandbox")).unwrap();
        assert!(!need_vm(&forced));
        let far = select(&p, &["far".into()], None).unwrap();
        assert_eq!(env_kind(far[0].provider), Some(EnvKind::Ec2));
        assert_eq!(
            needs(&far),
            Needs {
                vm: false,
                ssh: false,
                ec2: true
            }
        );
        // Forcing a provider that exists makes every target runnable.
        assert_eq!(select(&p, &[], Some("vm")).unwrap().len(), 4);
        assert_eq!(
            select(&p, &["a".into()], Some("docker")).unwrap_err(),
            SelectError::UnknownProvider("docker".into())
        );
        assert!(matches!(
            select(&p, &["nope".into()], None).unwrap_err(),
            SelectError::UnknownTarget { .. }
        ));
    }
}
