//! The gRPC services: thin adapters that authenticate the caller from its certificate, decode,
//! call a typed operation, and map its error to a `Status` through one `From` impl per phase.

pub mod admin_service;
pub mod auth;
pub mod build_service;
pub mod follow_log;
pub mod list_filter;
pub mod refusals;
pub mod shutdown;
pub mod status;
pub mod tls;
pub mod tunnel;
pub mod upload;
pub mod watch;
