//! The drover queue runner.
//!
//! # Layout
//! - [`config`]: the TOML configuration and its validation.
//! - [`db`]: the pool, embedded migrations and every SQL statement.
//! - [`verify`]: checking a derivation closure (paths, output paths, kinds) before it is trusted.
//! - [`scheduler`]: the step graph, the connected builders, ingest of queued builds, and the task
//!   that dispatches steps and records results.
//! - [`grpc`]: the builder tunnel and the build service, authenticated by client certificates.
//! - [`cache`]: the signed binary cache (publishing uploaded NARs, serving it over HTTP).
//! - [`logs`]: compressed step logs on disk.
//! - [`tasks`]: spawning, and supervision of the critical tasks.
//! - [`app`]: assembling all of it.

pub mod app;
pub mod cache;
pub mod config;
pub mod db;
pub mod grpc;
pub mod logs;
pub mod scheduler;
pub mod tasks;
pub mod verify;
