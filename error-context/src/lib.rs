//! Typed error chains for drover.
//!
//! Every phase of drover (config, database, tunnel, store, dispatch, transfer) has its own narrow
//! `thiserror` enum. This crate wraps such an enum in [`WithContext`]: either the typed root itself
//! or a context message ("claiming step 42 for builder b1") around another [`WithContext`]. The
//! root stays reachable with [`WithContext::root`], so callers `match` on variants instead of
//! downcasting or reading message text, and [`WithContext::severity`] forwards the root's
//! [`Severity`], which decides whether the process exits, a session ends, a step is retried or an
//! input is refused.
//!
//! [`report`] renders any error with its whole `source()` chain, one cause per line: that is what a
//! fatal exit prints.
//!
//! The crate is deliberately small: it has no dependencies and no `From` impls for foreign error
//! types, so it couples no crate to another's backends.

mod chain;
mod report;
mod severity;

pub use chain::{IntoChain, ResultExt, WithContext};
pub use report::{Report, report};
pub use severity::{Classify, Severity};
