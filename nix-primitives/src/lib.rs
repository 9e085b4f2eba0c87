//! Nix primitives for drover, each checked against the real Nix by this crate's tests.
//!
//! # Layout
//! - [`base32`] and [`hash`]: Nix's base32 and its hash notations.
//! - [`store_path`]: parsing and validating `/nix/store/<hash>-<name>`.
//! - [`content_address`]: how hashes become store paths (text, fixed-output, source and output
//!   paths) and the narinfo `CA:` field.
//! - [`derivation`]: the ATerm format, derivation kinds, required system features, and output
//!   path computation over a derivation closure (`hashDerivationModulo`).
//! - [`nar`]: writing a NAR from a tree, parsing one strictly as a stream, unpacking one safely.
//! - [`narinfo`] and [`signing`]: binary cache metadata and its ed25519 signatures.
//!
//! The crate has no async runtime, no network and no database; the only I/O it does is reading and
//! writing the trees it packs into and unpacks from NARs.

pub mod base32;
pub mod content_address;
pub mod derivation;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod signing;
pub mod store_path;

pub use content_address::{ContentAddress, IngestionMethod};
pub use derivation::{Derivation, DerivationHasher, DerivationKind, DerivationOutput};
pub use hash::{Hash, HashAlgorithm};
pub use narinfo::NarInfo;
pub use signing::{PublicKey, SecretKey, Signature};
pub use store_path::StorePath;
