//! The drover.v1 gRPC protocol: messages and services generated from `proto/drover/v1/*.proto`
//! (with protox, so no `protoc` is needed), and [`API_VERSION`], which builders present at Join.
//!
//! This crate only describes the wire format; it knows nothing of PostgreSQL, Nix or TLS.

#![allow(
    missing_docs,
    clippy::pedantic,
    reason = "generated code: the .proto files carry the documentation"
)]

/// The protocol version: a fingerprint of the .proto files. A builder whose version differs is
/// refused at Join, so runner and builders never misread each other's messages.
pub const API_VERSION: &str = env!("DROVER_API_VERSION");

/// The largest message either end of `BuilderService` sends or accepts, in bytes. Both ends set
/// it, so a message one side may send is one the other side reads: a Build message carries the
/// step's whole derivation, and a tunnel that broke on one oversized message would take every
/// other step of that builder with it. The runner keeps derivations to at most half of it.
pub const MAX_TUNNEL_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The most bytes a step result carries inline, its log and NARs together: small enough that a
/// result never holds up the tunnel. A builder sends more over `UploadLog` and `UploadNar`; the
/// runner refuses a result that carries more.
pub const MAX_INLINE_RESULT_BYTES: usize = 256 * 1024;

/// The encoded `FileDescriptorSet` of the drover.v1 protocol, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/drover_descriptors.bin"));

pub mod codec;
mod outcome;
mod phase;
mod step_status;

pub use outcome::{Outcome, UnknownOutcome};

/// Package `drover.v1`.
pub mod v1 {
    tonic::include_proto!("drover.v1");
    include!(concat!(env!("OUT_DIR"), "/drover.v1.serde.rs"));
}
