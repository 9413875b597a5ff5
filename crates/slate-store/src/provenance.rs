//! Provenance: an in-toto Statement v1 with a SLSA Provenance v1 predicate
//! for every target's artifacts, written next to them.
//!
//! The `in-toto` crate has no v1 types, so the layout is written here, with
//! the field names of the two specifications.

use crate::artifacts::ArtifactRecord;
use serde_json::{json, Value};
use slate_config::{BuildCommand, TargetSpec};
use slate_image::BakedImage;

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
pub const BUILD_TYPE: &str = "urn:slate:build-type:target:v1";
pub const BUILDER_ID: &str = "urn:slate:builder";

pub struct Facts<'a> {
    pub target: &'a TargetSpec,
    pub image: &'a BakedImage,
    pub provider: &'a str,
    pub run_id: &'a str,
    pub started: f64,
    pub finished: f64,
    pub inputs_digest: &'a str,
    pub script_digest: &'a str,
    pub artifacts: &'a [ArtifactRecord],
}

fn time(secs: f64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0.0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The statement for one target. Secrets appear by name only.
pub fn statement(f: &Facts) -> Value {
    let t = f.target;
    let subject: Vec<Value> = f
        .artifacts
        .iter()
        .map(|a| {
            let name = a.path.rsplit('/').next().unwrap_or(&a.path);
            json!({ "name": name, "digest": { "sha256": a.sha256 } })
        })
        .collect();
    let command = match &t.command {
        BuildCommand::Script(p) => {
            json!({ "script": p.file_name().map(|n| n.to_string_lossy().into_owned()) })
        }
        BuildCommand::Run(lines) => json!({ "run": lines }),
    };
    json!({
        "_type": STATEMENT_TYPE,
        "subject": subject,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "target": t.name,
                    "build": t.build,
                    "matrix": t.matrix.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                    "image": t.image,
                    "command": command,
                    "workdir": t.workdir,
                    "artifacts": t.artifacts,
                    "env": t.env.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                    "secrets": t.secrets,
                    "network": t.network,
                },
                "internalParameters": {
                    "provider": f.provider,
                    "cpus": t.cpus,
                    "memory": t.memory,
                    "pids": t.pids,
                    "timeout_seconds": t.timeout.map(|d| d.as_secs()),
                },
                "resolvedDependencies": [
                    { "name": "image", "uri": format!("slate-image:{}", f.image.name), "digest": { "sha256": f.image.digest },
                      "annotations": { "layers": f.image.layers.len(), "note": "the digest chains the recipe digests of every layer" } },
                    { "name": "inputs", "uri": "slate-inputs:workdir", "digest": { "sha256": f.inputs_digest } },
                    { "name": "script", "uri": "slate-script:command", "digest": { "sha256": f.script_digest } },
                ],
            },
            "runDetails": {
                "builder": { "id": BUILDER_ID, "version": { "slate": env!("CARGO_PKG_VERSION") } },
                "metadata": {
                    "invocationId": f.run_id,
                    "startedOn": time(f.started),
                    "finishedOn": time(f.finished),
                },
            },
        },
    })
}
