//! Layers on disk, below both image baking and VMs: the content-addressed
//! store, reading a stack of layers and writing it as tar or as a disk,
//! the path-safe unpacker, hashes and file locks.

pub mod disk;
pub mod hash;
pub mod lock;
pub mod store;
pub mod tree;
pub mod unpack;

pub use store::{LayerMeta, LayerStore};
