//! What a run leaves behind and ships, written and read through the same
//! types: the artifacts folder with `SHA256SUMS` and `manifest.json`,
//! in-toto provenance and its DSSE signature, the run record and the
//! events it is made from. `slate-publish` ships what this writes.

pub mod artifacts;
pub mod dsse;
pub mod ecs;
pub mod events;
pub mod html;
pub mod junit;
pub mod provenance;
pub mod record;
