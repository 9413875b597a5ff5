//! Command-line arguments.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "slate",
    version,
    about = "Build release artifacts, each in a fresh, disposable environment"
)]
pub struct Cli {
    /// Run as if started in DIR
    #[arg(short = 'C', global = true, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// The config file (default: slate.toml here or above)
    #[arg(short = 'f', long = "file", global = true, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// How events are printed (default: `[settings.logs] format`, else text)
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Print only errors and the summary
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Print more (layer keys, environment ids)
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[arg(long, global = true, value_enum, default_value_t = Color::Auto)]
    pub color: Color,
    /// Progress: one live line per running target on a terminal (auto,
    /// live), or plain prefixed lines (plain; also when not a terminal)
    #[arg(long, global = true, value_enum, default_value_t = Progress::Auto)]
    pub progress: Progress,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    Auto,
    Plain,
    Live,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Color {
    Auto,
    Always,
    Never,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Bake what is missing, build the targets (all by default), collect artifacts
    Build(BuildArgs),
    /// Build one target (the `vagrant up NAME` habit)
    Up {
        target: String,
        #[arg(long)]
        provider: Option<String>,
    },
    /// Bake images (every layer cached); export one
    Bake {
        images: Vec<String>,
        /// Export the (one) image: `oci PATH` (a folder, or an archive when PATH ends in .tar), `tar PATH` (a flat rootfs), `disk PATH` (ext4 in qcow2) or `ami NAME` (an AMI through [providers.ec2], once per recipe)
        #[arg(long, num_args = 2, value_names = ["FORMAT", "PATH"])]
        export: Option<Vec<String>>,
        /// Push the (one) image to a registry, e.g. `registry.example:5000/team/builder:v1`
        #[arg(long, value_name = "REF")]
        push: Option<String>,
        /// Allow plain http to a registry that is not on loopback
        #[arg(long)]
        insecure: bool,
        /// Fetch layers missing here from this layer cache (s3://BUCKET/PREFIX
        /// or file://PATH) instead of baking them; default: [settings] layer_cache
        #[arg(long, value_name = "URL")]
        cache_from: Option<String>,
        /// Send the baked layers this cache lacks to it; default: [settings] layer_cache
        #[arg(long, value_name = "URL")]
        cache_to: Option<String>,
    },
    /// List baked images and layers with sizes
    Images,
    /// Remove layers no project uses, old runs and leftovers of killed runs
    ///
    /// The layer cache is shared by every project on this machine: a layer
    /// that any project which baked, built or ran here still uses is kept,
    /// unless `--older-than` or `--all` says otherwise.
    Gc {
        /// Remove every layer, also those this project uses
        #[arg(long)]
        all: bool,
        /// Remove layers not used for this long (e.g. `7d`, `12h`), other
        /// projects' included; this project's are kept
        #[arg(long, value_name = "DURATION")]
        older_than: Option<String>,
        /// Keep this many most recent runs
        #[arg(long, default_value_t = 20)]
        keep_runs: usize,
        /// List what would be removed; remove nothing
        #[arg(long)]
        dry_run: bool,
        /// Instead: on every ssh host, remove what killed runs left there
        #[arg(long, conflicts_with_all = ["all", "older_than", "dry_run"])]
        remote: bool,
    },
    /// An interactive shell in a fresh environment, thrown away on exit
    Shell {
        /// A target or an image
        #[arg(required_unless_present = "keep")]
        name: Option<String>,
        /// Instead: a failed target's environment kept by `build
        /// --keep-failed`, as it was at the failure (what the shell
        /// changes is thrown away)
        #[arg(long, value_name = "RUN/TARGET", conflicts_with = "name")]
        keep: Option<String>,
    },
    /// Run one command in a fresh environment of IMAGE
    Run {
        image: String,
        /// Share the host's network
        #[arg(long)]
        network: bool,
        /// `sandbox` (the default) or `vm` (a machine with the image's own kernel)
        #[arg(long, value_name = "PROVIDER")]
        provider: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Build a target twice in two fresh environments and compare the artifacts
    Verify { target: String },
    /// Push a run's artifacts, provenance and indexes to s3:// or file://
    Publish {
        /// The run to publish (default: the one in the artifacts folder)
        #[arg(long, value_name = "ID")]
        run: Option<String>,
        /// Where to: `s3://BUCKET/PREFIX` or `file://PATH` (default: `[settings] publish`)
        #[arg(long, value_name = "URL")]
        to: Option<String>,
        /// An S3-compatible server, e.g. `http://127.0.0.1:9000` (default: AWS_ENDPOINT_URL)
        #[arg(long, value_name = "URL")]
        endpoint: Option<String>,
        /// Files uploaded at once
        #[arg(short, long, default_value_t = 8)]
        jobs: usize,
    },
    /// Signing keys for provenance, and checking a signed provenance
    #[command(subcommand)]
    Provenance(ProvenanceCommand),
    /// Validate the config and show which providers work here
    Check,
    /// Write a commented starter slate.toml
    Init,
    /// Print a shell completion script (e.g. `slate completions bash > /etc/bash_completion.d/slate`)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `slate man | man -l -`
    Man,
    /// What slate on another machine runs here over ssh
    #[command(hide = true, subcommand)]
    Remote(RemoteCommand),
    /// History of runs
    Runs,
    /// Write a run's HTML report (every build writes one into its run folder)
    Report {
        /// The run (default: the latest)
        #[arg(long)]
        run: Option<String>,
        /// Where to write it (default: report.html in the run's folder)
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// The full log of one target (of the latest run that has it)
    Logs {
        #[arg(required_unless_present = "ship")]
        target: Option<String>,
        #[arg(long)]
        run: Option<String>,
        /// Follow the log of a running target until it finishes (`-f` is
        /// the global `--file`)
        #[arg(short = 'F', long)]
        follow: bool,
        /// Instead: send what run RUN's log has not yet delivered to the
        /// sinks of [settings.logs] (and --to)
        #[arg(long, value_name = "RUN", conflicts_with_all = ["target", "follow", "run"])]
        ship: Option<String>,
        /// With --ship: a sink besides the configured ones
        #[arg(long = "to", value_name = "URL", requires = "ship")]
        to: Vec<String>,
    },
}

/// The requests of the ssh provider, run on a build host.
#[derive(Subcommand, Debug)]
pub enum RemoteCommand {
    /// Make one environment and serve it on standard input and output
    Env,
    /// Print the layer keys this host's store lacks, one per line
    MissingLayers { keys: Vec<String> },
    /// Receive one layer (a tar of its folder) on standard input
    ReceiveLayer { key: String },
    /// Remove what killed runs left here; print what was removed
    Gc,
}

#[derive(Subcommand, Debug)]
pub enum ProvenanceCommand {
    /// Write a new Ed25519 key pair: PATH (private, mode 0600) and PATH.pub
    Keygen { path: PathBuf },
    /// Check that ARTIFACT is a subject of its provenance, signed by KEY
    Verify {
        artifact: PathBuf,
        /// The public key (PEM)
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        /// The DSSE envelope (default: provenance.dsse.json beside ARTIFACT)
        #[arg(long, value_name = "FILE")]
        envelope: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Targets to build (default: all)
    pub targets: Vec<String>,
    /// Targets built at once
    #[arg(short, long)]
    pub jobs: Option<usize>,
    /// Use this provider for every target
    #[arg(long)]
    pub provider: Option<String>,
    /// Stop every target when one fails
    #[arg(long, conflicts_with = "keep_going")]
    pub fail_fast: bool,
    /// Build every target even when some fail (the default)
    #[arg(long)]
    pub keep_going: bool,
    /// Also write the run as JUnit XML here (one testcase per target), for CI servers
    #[arg(long, value_name = "FILE")]
    pub junit: Option<std::path::PathBuf>,
    /// Ship the run's log here too (syslog+tcp://, syslog+tls://,
    /// elasticsearch+https://HOST:PORT/INDEX); repeatable
    #[arg(long, value_name = "URL")]
    pub ship: Vec<String>,
    /// Keep the environment of a target whose build fails, to enter with
    /// `slate shell --keep RUN/TARGET` (removed by `slate gc` after 24 h)
    #[arg(long)]
    pub keep_failed: bool,
}
