//! The drover builder agent.
//!
//! # Layout
//! From the top down; each module imports only those below it.
//! - [`tunnel`]: dialling the runner over mTLS, Join, the session loop, reconnecting.
//! - [`reconnect`]: when to dial again: backoff with jitter, and the budget.
//! - [`jobs`]: the running steps, which outlive sessions.
//! - [`log_upload`]: streaming a step's log, spooled so that it survives a lost session.
//! - [`upload`]: uploading a finished step's outputs as NARs.
//! - [`upload_error`]: why a step's log or outputs could not reach the runner.
//! - [`link`]: the joined session's client, shared with the running steps.
//! - [`health`]: free disk and memory pressure, reported at each ping.
//! - [`metrics`]: Prometheus metrics on a listener of their own, when enabled.
//! - [`executor`]: running one step (noop or Nix).
//! - [`serve`]: a client of Nix's serve protocol, which the Nix executor speaks.
//! - [`job`]: one step as the runner sent it.
//! - [`ansi`]: removing terminal colour codes from Nix's messages and logs.
//! - [`backoff`]: the jittered exponential backoff that retries use.
//! - [`config`]: the TOML configuration and its validation.

pub mod ansi;
pub mod backoff;
pub mod config;
pub mod executor;
pub mod health;
pub mod job;
pub mod jobs;
pub mod link;
pub mod log_upload;
pub mod metrics;
pub mod reconnect;
pub mod serve;
pub mod tunnel;
pub mod upload;
pub mod upload_error;
