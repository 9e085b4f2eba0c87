//! The scheduler: a pure core that decides (the `drover-scheduler` crate), and a thin
//! [`driver`] that does the I/O.
//!
//! - the core ([`drover_scheduler`]): the step graph, the runnable index, the builders' slots
//!   and the running attempts; events in, commands out; no async, no database, no gRPC.
//! - [`driver`]: one task that feeds the core batches of events (builder sessions, ingest),
//!   writes each batch's changes in one transaction, and only then sends assignments, aborts and
//!   acknowledgements to the builders' bounded outboxes.
//! - [`ingest`]: its own task: turns queued builds into plans (closure verification, upstream
//!   lookups, steps created) that the core takes in one event each, so a big submission never
//!   stalls dispatch.
//! - [`listen`]: the LISTEN connection that wakes ingest when builds are queued.
//! - [`handoff`]: closures Submit verified, passed to ingest so they are verified once.
//! - [`attempts`]: the read-only view of running attempts the gRPC handlers authorise with.
//! - [`estimates`]: predicted build ends, remembered for a second so readers share one walk.

pub mod attempts;
pub mod driver;
pub mod estimates;
pub mod handoff;
pub mod ingest;
pub mod listen;
pub mod queue_clock;
