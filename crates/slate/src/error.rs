//! The binary's errors: a message, its causes, a hint, and an exit code.

use slate_config::ConfigError;
use std::process::ExitCode;

/// Exit codes (DESIGN.md): one enum, one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    /// A target's own script failed.
    BuildFailed = 1,
    /// Usage or config error.
    Usage = 2,
    /// The environment could not be made or died, after retries.
    Infra = 3,
    /// Interrupted (Ctrl-C).
    Interrupted = 130,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

#[derive(Debug)]
pub struct CliError {
    pub exit: Exit,
    pub message: String,
    pub causes: Vec<String>,
    pub hint: Option<String>,
    /// Config diagnostics, printed with their source lines.
    pub diagnostics: Vec<slate_config::Diagnostic>,
}

impl CliError {
    pub fn new(exit: Exit, message: impl Into<String>) -> CliError {
        CliError {
            exit,
            message: message.into(),
            causes: vec![],
            hint: None,
            diagnostics: vec![],
        }
    }
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError::new(Exit::Usage, message)
    }
    pub fn hint(mut self, h: impl Into<String>) -> CliError {
        self.hint = Some(h.into());
        self
    }
    /// From any error: its message, then its chain of causes.
    pub fn from_error(exit: Exit, e: &dyn std::error::Error) -> CliError {
        let mut c = CliError::new(exit, e.to_string());
        let mut cur = e.source();
        while let Some(s) = cur {
            c.causes.push(s.to_string());
            cur = s.source();
        }
        c
    }

    pub fn print(&self, color: bool) {
        let red = |s: &str| {
            if color {
                format!("\x1b[1;31m{s}\x1b[0m")
            } else {
                s.to_string()
            }
        };
        let cyan = |s: &str| {
            if color {
                format!("\x1b[1;36m{s}\x1b[0m")
            } else {
                s.to_string()
            }
        };
        if self.diagnostics.is_empty() {
            eprintln!("{} {}", red("error:"), self.message);
        }
        for d in &self.diagnostics {
            eprintln!("{} {d}", red("error:"));
            eprintln!("   | {}", d.source_line);
            eprintln!("   | {}^", " ".repeat(d.col.saturating_sub(1)));
            if let Some(h) = &d.hint {
                eprintln!("{} {h}", cyan("hint:"));
            }
        }
        for c in &self.causes {
            eprintln!("  caused by: {c}");
        }
        if let Some(h) = &self.hint {
            eprintln!("{} {h}", cyan("hint:"));
        }
    }
}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> CliError {
        match e {
            ConfigError::Invalid(d) => {
                let mut c = CliError::usage(format!("{} problem(s) in the config", d.len()));
                c.diagnostics = d;
                c
            }
            ConfigError::NotFound { .. } => CliError::usage(e.to_string()).hint(
                "run `slate init` to write a starter slate.toml, or pass `-C DIR` / `-f FILE`",
            ),
            other => CliError::from_error(Exit::Usage, &other),
        }
    }
}

impl From<slate_image::ImageError> for CliError {
    fn from(e: slate_image::ImageError) -> CliError {
        let exit = match &e {
            slate_image::ImageError::Unknown { .. }
            | slate_image::ImageError::Unsupported { .. } => Exit::Usage,
            slate_image::ImageError::Cancelled { .. } => Exit::Interrupted,
            e if e.is_recipe_failure() => Exit::BuildFailed,
            _ => Exit::Infra,
        };
        let hint = e.hint();
        let mut c = CliError::from_error(exit, &e);
        c.hint = hint;
        c
    }
}

impl From<slate_provider::ProviderError> for CliError {
    fn from(e: slate_provider::ProviderError) -> CliError {
        let unavailable = matches!(e, slate_provider::ProviderError::Unavailable { .. });
        CliError::from_error(
            if unavailable {
                Exit::Usage
            } else {
                Exit::Infra
            },
            &e,
        )
    }
}

pub type Result<T> = std::result::Result<T, CliError>;

/// What a command returns: its exit code, or an error to print.
pub type CmdResult = Result<ExitCode>;

impl From<slate_run::targets::SelectError> for CliError {
    fn from(e: slate_run::targets::SelectError) -> CliError {
        use slate_run::targets::SelectError as S;
        match e {
            S::UnknownTarget { name, known } => crate::commands::unknown(
                "target",
                &name,
                known.iter().map(String::as_str).collect(),
            ),
            S::UnknownProvider(_) => {
                CliError::usage(e.to_string()).hint("use `sandbox`, `vm`, `ssh` or `ec2`")
            }
            S::Unavailable { .. } => CliError::usage(e.to_string()).hint(
                "use `provider = \"sandbox\"` (the default), `\"vm\"`, or `--provider sandbox`",
            ),
            S::NoTargets => CliError::usage(e.to_string())
                .hint("add a `[builds.NAME]` table (see `slate init`)"),
        }
    }
}
