//! What the benchmark binaries share: [`farm`], a runner process on a durable PostgreSQL with
//! certificates, a signed cache, and builders (simulated in-process, or real `drover-builder`
//! processes with the Nix executor in private stores).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    clippy::missing_panics_doc,
    clippy::must_use_candidate,
    reason = "a benchmark harness: any failure aborts the measurement"
)]

pub mod farm;
