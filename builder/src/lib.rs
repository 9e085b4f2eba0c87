//! The drover builder agent.
//!
//! # Layout
//! - [`config`]: the TOML configuration and its validation.
//! - [`tunnel`]: dialling the runner over mTLS, the session loop, log upload, reconnecting.
//! - [`executor`]: running one step (noop or Nix).
//! - [`serve`]: a client of Nix's serve protocol, which the Nix executor speaks.
//! - [`upload`]: uploading a finished step's outputs as NARs.

pub mod config;
pub mod executor;
pub mod serve;
pub mod tunnel;
pub mod upload;
