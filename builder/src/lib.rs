//! The drover builder agent.
//!
//! # Layout
//! - [`config`]: the TOML configuration and its validation.
//! - [`tunnel`]: dialling the runner over mTLS, the session loop, reconnecting.
//! - [`link`]: the joined session's client, shared with the running steps.
//! - [`jobs`]: the running steps, which outlive sessions.
//! - [`executor`]: running one step (noop or Nix).
//! - [`serve`]: a client of Nix's serve protocol, which the Nix executor speaks.
//! - [`log_upload`]: streaming a step's log, spooled so that it survives a lost session.
//! - [`upload`]: uploading a finished step's outputs as NARs.

pub mod config;
pub mod executor;
pub mod jobs;
pub mod link;
pub mod log_upload;
pub mod serve;
pub mod tunnel;
pub mod upload;
