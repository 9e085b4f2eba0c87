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

mod outcome;

pub use outcome::{Outcome, UnknownOutcome};

/// Package `drover.v1`.
pub mod v1 {
    tonic::include_proto!("drover.v1");
}
