//! `slate provenance keygen` and `slate provenance verify`: signing keys, and
//! checking a signed provenance against an artifact.

use crate::error::{CliError, CmdResult, Exit};
use crate::Ctx;
use slate_store::dsse;
use slate_store::provenance::{PREDICATE_TYPE, STATEMENT_TYPE};
use std::path::Path;
use std::sync::Arc;

fn key_error(e: dsse::DsseError) -> CliError {
    CliError::from_error(Exit::Usage, &e)
        .hint("keys are Ed25519 in PKCS#8 PEM: make a pair with `slate provenance keygen PATH` (or `openssl genpkey -algorithm ed25519`)")
}

/// The signer for a build: `SLATE_SIGNING_KEY` (a path), else
/// `[settings] signing_key`, else none.
pub fn signer(project: &slate_config::Project) -> Result<Option<Arc<dsse::Signer>>, CliError> {
    let path = std::env::var_os("SLATE_SIGNING_KEY")
        .map(std::path::PathBuf::from)
        .or_else(|| project.settings.signing_key.clone());
    match path {
        None => Ok(None),
        Some(p) => Ok(Some(Arc::new(dsse::Signer::load(&p).map_err(key_error)?))),
    }
}

pub fn keygen(ctx: &Ctx, path: &Path) -> CmdResult {
    let path = ctx.cwd.join(path);
    let (public, id) = dsse::generate(&path).map_err(|e| {
        CliError::from_error(Exit::Usage, &e).hint("slate never overwrites a key; pick a new path")
    })?;
    ctx.say(&format!(
        "wrote the private key {} (keep it secret; set SLATE_SIGNING_KEY or `signing_key` under [settings] to it)\nwrote the public key {} (give it to whoever verifies)\nkey id {id}",
        path.display(),
        public.display()
    ));
    Ok(Exit::Ok.into())
}

pub fn verify(ctx: &Ctx, artifact: &Path, key: &Path, envelope: Option<&Path>) -> CmdResult {
    let artifact = ctx.cwd.join(artifact);
    let envelope = match envelope {
        Some(e) => ctx.cwd.join(e),
        None => artifact
            .parent()
            .unwrap_or(Path::new("."))
            .join(dsse::ENVELOPE),
    };
    let vk = dsse::load_public(&ctx.cwd.join(key)).map_err(key_error)?;
    let bytes = fs_err::read(&envelope).map_err(|e| {
        CliError::new(
            Exit::Usage,
            format!("cannot read the envelope `{}`: {e}", envelope.display()),
        )
        .hint("builds write it beside the artifacts when a signing key is set; pass another with `--envelope`")
    })?;
    let fail = |m: String| CliError::new(Exit::BuildFailed, m);
    let statement =
        dsse::open(&bytes, &vk).map_err(|e| fail(format!("`{}`: {e}", envelope.display())))?;
    if statement["_type"] != STATEMENT_TYPE || statement["predicateType"] != PREDICATE_TYPE {
        return Err(fail(format!(
            "`{}` is signed but is not an in-toto v1 statement with a SLSA v1 predicate",
            envelope.display()
        )));
    }
    let sha = slate_layers::hash::sha256_file(&artifact)
        .map(|(sha, _)| sha)
        .map_err(|e| {
            CliError::new(
                Exit::Usage,
                format!("cannot read the artifact `{}`: {e}", artifact.display()),
            )
        })?;
    let name = artifact
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let subjects = statement["subject"].as_array().cloned().unwrap_or_default();
    let Some(subject) = subjects.iter().find(|s| s["name"] == name.as_str()) else {
        return Err(fail(format!(
            "`{name}` is not a subject of the signed provenance `{}`",
            envelope.display()
        )));
    };
    let recorded = subject["digest"]["sha256"].as_str().unwrap_or("");
    if recorded != sha {
        return Err(fail(format!(
            "`{name}` does not match its signed provenance: its sha256 is {sha}, the provenance says {recorded}"
        )));
    }
    let p = &statement["predicate"];
    ctx.say(&format!(
        "OK: {name} (sha256 {sha}) is a subject of provenance signed by {}\n  target {}, run {}, built by slate {} with image digest {}",
        dsse::keyid(&vk),
        p["buildDefinition"]["externalParameters"]["target"].as_str().unwrap_or("?"),
        p["runDetails"]["metadata"]["invocationId"].as_str().unwrap_or("?"),
        p["runDetails"]["builder"]["version"]["slate"].as_str().unwrap_or("?"),
        p["buildDefinition"]["resolvedDependencies"][0]["digest"]["sha256"].as_str().unwrap_or("?"),
    ));
    Ok(Exit::Ok.into())
}
