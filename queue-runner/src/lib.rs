//! The drover queue runner.
//!
//! # Layout
//! - [`config`]: the TOML configuration and its validation.
//! - [`db`]: the pool, embedded migrations and every SQL statement.
//! - [`verify`]: checking a derivation closure (paths, output paths, kinds) before it is trusted.
//! - [`scheduler`]: the pure scheduler core (step graph, placement, attempts), the driver that
//!   writes its decisions in batches and talks to builders, and ingest on its own task.
//! - [`builds`]: the build API's use cases (submit, read, list, cancel, restart, logs) with typed
//!   errors, which every front end calls.
//! - [`admin`]: the admin API's use cases (builders drained, quarantined; global priority).
//! - [`grpc`]: the builder tunnel, the build and admin services, authenticated by client
//!   certificates.
//! - [`cache`]: the signed binary cache (publishing uploaded NARs, serving it over HTTP).
//! - [`logs`]: compressed step logs on disk.
//! - [`sweeper`]: collection on a schedule: cache sweeps, log expiry, history pruning.
//! - [`history`]: pruning the rows of builds finished long ago, and what keeps it from racing
//!   plans and submissions.
//! - [`live_logs`]: the logs builders are still sending, for followers.
//! - [`compression`]: zstd with a reused context per thread.
//! - [`tasks`]: spawning, and supervision of the critical tasks.
//! - [`health`]: `/healthz` and `/readyz`.
//! - [`audit`]: rate-limited lines naming who was refused and why.
//! - [`certificates`]: the revoked certificates, checked on every call, and those seen.
//! - [`tokens`]: API tokens for HTTP clients without a certificate.
//! - [`web`]: the HTTP/JSON API with server-sent events and its OpenAPI description.
//! - [`reload`]: applying a reloaded configuration (SIGHUP).
//! - [`app`]: assembling all of it.

pub mod admin;
pub mod app;
pub mod audit;
pub mod builds;
pub mod cache;
pub mod certificates;
pub mod compression;
pub mod config;
pub mod db;
pub mod grpc;
pub mod health;
pub mod history;
pub mod live_logs;
pub mod logs;
pub mod metrics;
pub mod reload;
pub mod scheduler;
pub mod sweeper;
pub mod tasks;
pub mod tokens;
pub mod verify;
pub mod web;
