//! Serve processes started and handshaken ahead of the steps that will use them: starting one
//! costs ~20 ms, more than a trivial build. Each slot keeps [`SPARES_PER_SLOT`] spares, ready or
//! on their way; a step takes one and starts its replacement in the background, so the next step
//! finds one ready.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::process::{Launch, ServeProcess, StartError};

/// Spares kept per slot. With one, a chain of short steps on one slot waited ~15 ms per step
/// for the spare its predecessor had just started (the `nix-chain` benchmark); with two, each
/// start has two steps' time to finish.
pub const SPARES_PER_SLOT: usize = 2;

/// The spares and how many are being started.
#[derive(Default)]
struct Pool {
    ready: Vec<ServeProcess>,
    starting: usize,
}

/// Started, handshaken processes waiting for steps.
pub struct Spares {
    pool: Mutex<Pool>,
    /// Told whenever a start ends, ready or failed.
    arrived: Notify,
    /// How many to keep.
    wanted: usize,
    launch: Arc<Launch>,
}

impl Spares {
    /// An empty pool for `slots` concurrent steps of processes started as `launch` says.
    #[must_use]
    pub fn new(slots: usize, launch: Launch) -> Self {
        Self {
            pool: Mutex::new(Pool::default()),
            arrived: Notify::new(),
            wanted: slots * SPARES_PER_SLOT,
            launch: Arc::new(launch),
        }
    }

    /// A spare; if none is ready but one is being started, that one; else one started now.
    pub async fn take(&self) -> Result<ServeProcess, StartError> {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let mut pool = self.lock();
                if let Some(process) = pool.ready.pop() {
                    return Ok(process);
                }
                if pool.starting == 0 {
                    break;
                }
            }
            arrived.await;
        }
        let launch = Arc::clone(&self.launch);
        tokio::task::spawn_blocking(move || ServeProcess::start(&launch))
            .await
            .map_err(StartError::Task)?
    }

    /// Starts spares in the background until there are as many as wanted, ready or on their
    /// way, and returns at once. Each start runs on a blocking thread of its own (it blocks for the
    /// handshake) and ends by itself; a failed one is logged, and the next step starts its own
    /// process and reports the failure as its own.
    pub fn refill(self: &Arc<Self>) {
        let wanted = {
            let mut pool = self.lock();
            let wanted = self.wanted.saturating_sub(pool.ready.len() + pool.starting);
            pool.starting += wanted;
            wanted
        };
        for _ in 0..wanted {
            let spares = Arc::clone(self);
            drop(tokio::task::spawn_blocking(move || {
                let mut starting = Starting(&spares);
                let started = ServeProcess::start(&spares.launch);
                match started {
                    Ok(process) => starting.arrive(process),
                    Err(error) => tracing::warn!(
                        error = %error_context::report(&error),
                        "starting a spare nix-store --serve failed"
                    ),
                }
            }));
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        // A panic while the lock was held cannot leave the pool inconsistent: every change to
        // it is one push, pop or count.
        self.pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One start in progress: when it ends, however it ends (a panic included), the count drops and
/// waiting steps are told.
struct Starting<'a>(&'a Spares);

impl Starting<'_> {
    fn arrive(&mut self, process: ServeProcess) {
        self.0.lock().ready.push(process);
    }
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        self.0.lock().starting -= 1;
        self.0.arrived.notify_waiters();
    }
}
