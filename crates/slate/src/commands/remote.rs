//! `slate remote …`: what the ssh provider runs on a build host, over the
//! connection. Not for people: its input and output are slate's own.

use crate::cli::RemoteCommand;
use crate::error::{CliError, CmdResult, Exit};
use slate_image::LayerStore;
use std::process::ExitCode;

pub fn remote(what: &RemoteCommand) -> CmdResult {
    let store = LayerStore::open(&LayerStore::default_root())
        .map_err(|e| CliError::from_error(Exit::Infra, &e))?;
    let io = |e: std::io::Error| CliError::from_error(Exit::Infra, &e);
    match what {
        RemoteCommand::Env => {
            // Environments a killed connection left behind go first.
            let _ = slate_sandbox::reap(&store.envs_dir());
            slate_ssh::serve::serve_env(&store, std::io::stdin(), std::io::stdout()).map_err(io)?
        }
        RemoteCommand::MissingLayers { keys } => {
            slate_ssh::serve::missing_layers(&store, keys, &mut std::io::stdout().lock())
                .map_err(io)?
        }
        RemoteCommand::Gc => {
            let r = slate_sandbox::reap(&store.envs_dir());
            let tmp = store.clean_tmp();
            let mut said = format!(
                "{} environment(s) of killed runs removed, {} MiB freed",
                r.environments,
                (r.bytes + tmp) >> 20
            );
            for (path, e) in &r.failed {
                said.push_str(&format!("; could not remove {}: {e}", path.display()));
            }
            println!("{said}");
        }
        RemoteCommand::ReceiveLayer { key } => {
            slate_ssh::serve::receive_layer(&store, key, std::io::stdin().lock()).map_err(io)?
        }
    }
    Ok(ExitCode::SUCCESS)
}
