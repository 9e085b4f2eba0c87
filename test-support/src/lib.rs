//! The harness drover's integration tests share: real parts started per test (or per test binary)
//! and cleaned up even when a test fails or its process is killed.
//!
//! # Layout
//! - [`postgres`]: an ephemeral PostgreSQL cluster on a Unix socket ([`TestPostgres`]); one per
//!   test binary through [`TestPostgres::shared`], and a fresh database per test through
//!   [`TestPostgres::create_database`]; also with TLS on TCP, or owned by the OS user `postgres`.
//! - [`process`]: [`ChildGuard`], a child process that is terminated when the test ends, and
//!   [`workspace_binary`], which finds the binaries `cargo build --workspace` made.
//! - [`farm`]: what every farm is made of (certificates, configuration files, builder
//!   environments, ports), shared by the integration tests, the benchmarks and `drover dev-farm`.
//! - [`https`]: [`HttpsDirectory`], a directory served over HTTPS (an upstream binary cache).
//! - [`proxy`]: [`TcpProxy`], a loopback proxy whose connections a test can cut.
//! - [`fake_derivations`]: valid derivation texts made in memory (random DAGs, fixed outputs)
//!   for control-plane tests and benchmarks that need no Nix.
//! - [`browser`]: headless Chromium driven over the DevTools protocol, for the status page.
//! - [`wait`]: [`poll_until`], the one way tests wait for something to happen: poll with a
//!   deadline instead of sleeping "long enough".

pub mod browser;
pub mod fake_derivations;
pub mod farm;
pub mod https;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod wait;

pub use farm::free_port;
pub use https::HttpsDirectory;
pub use postgres::{TestDatabase, TestPostgres, TlsSetup};
pub use process::{
    ChildGuard, private_store_arguments, private_store_command, restricted_private_store_command,
    workspace_binary,
};
pub use proxy::TcpProxy;
pub use wait::poll_until;
