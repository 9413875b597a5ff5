//! `slate.toml` → validated specs.
//!
//! `file` is what the file says; `spec` is what slate acts on. Every problem found
//! while going from one to the other becomes a [`Diagnostic`] that names the file,
//! line and column and, where we can guess it, the fix.

pub mod diag;
pub mod file;
pub mod resolve;
pub mod spec;
pub mod units;

pub use diag::{ConfigError, Diagnostic};
pub use resolve::{load, load_str};
pub use spec::*;

/// The commented starter file `slate init` writes.
pub const STARTER: &str = include_str!("starter.toml");

/// The file name slate looks for.
pub const FILE_NAME: &str = "slate.toml";
