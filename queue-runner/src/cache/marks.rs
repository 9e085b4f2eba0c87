//! What the cache was asked for, so a garbage collection keeps it. Every path found published
//! (by ingest, which then does not build it; by a publisher checking a reference) and every NAR
//! file a publisher puts in place is noted. A sweep keeps what was noted since the previous
//! sweep began, and what is noted while it runs: a lookup of a path (or NAR) the sweep may
//! delete takes the gate shared and a batch of deletions takes it exclusively, so either the
//! lookup comes first and the sweep keeps the path with its closure, or the deletion comes
//! first and the lookup finds nothing, and the step is built. Lookups of anything else never
//! wait for the sweep. GC and publishing never race.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockWriteGuard};

use nix_primitives::StorePath;

/// Paths and NAR files used.
#[derive(Debug, Default)]
pub struct Noted {
    /// Store paths found published.
    pub paths: HashSet<StorePath>,
    /// NAR files (`nar/<hash>.nar.zst`) put in place by a publisher.
    pub nars: HashSet<String>,
}

/// The gate between lookups and deletions, what lookups noted, and what the running sweep may
/// delete.
#[derive(Debug, Default)]
pub struct SweepMarks {
    gate: RwLock<()>,
    noted: Mutex<Noted>,
    doomed: Mutex<Noted>,
    /// Moved each time what is doomed changes: a lookup that saw it move while it ran without
    /// the gate runs again with it.
    epoch: AtomicU64,
}

/// Deletions may proceed while it is held; lookups wait.
pub type Deleting<'a> = RwLockWriteGuard<'a, ()>;

impl SweepMarks {
    /// Runs `look` (a lookup of the cache directory); when it finds `path` published, notes it.
    /// A path the running sweep may delete is looked up with the gate shared.
    pub fn lookup<T>(&self, path: &StorePath, look: impl Fn() -> T, found: fn(&T) -> bool) -> T {
        self.gated(
            |doomed| doomed.paths.contains(path),
            || {
                let result = look();
                if found(&result) {
                    self.noted().paths.insert(path.clone());
                }
                result
            },
        )
    }

    /// Runs `place` (renaming a NAR into place), noting the file; with the gate shared when the
    /// running sweep may delete a file of that name.
    pub fn place<T>(&self, url: &str, place: impl Fn() -> T) -> T {
        self.gated(
            |doomed| doomed.nars.contains(url),
            || {
                self.noted().nars.insert(url.to_owned());
                place()
            },
        )
    }

    /// Runs `work` without the gate unless `is_doomed` says the sweep may delete what it
    /// touches, or what is doomed changed meanwhile; then again with the gate shared.
    fn gated<T>(&self, is_doomed: impl Fn(&Noted) -> bool, work: impl Fn() -> T) -> T {
        let epoch = self.epoch.load(Ordering::SeqCst);
        if !is_doomed(&lock(&self.doomed)) {
            let result = work();
            if self.epoch.load(Ordering::SeqCst) == epoch {
                return result;
            }
        }
        let _shared = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        work()
    }

    /// Declares what the sweep may delete from now on (before its first batch), or nothing
    /// (after its last).
    pub fn doom(&self, doomed: Noted) {
        let mut current = lock(&self.doomed);
        *current = doomed;
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// What was noted since the last call: at a sweep's start, what was used since the previous
    /// sweep began; between batches, what was used meanwhile.
    pub fn take(&self) -> Noted {
        std::mem::take(&mut *self.noted())
    }

    /// Holds the gate exclusively for a batch of deletions; gives what was noted since the
    /// last call.
    pub fn hold(&self) -> (Deleting<'_>, Noted) {
        let held = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        (held, self.take())
    }

    fn noted(&self) -> MutexGuard<'_, Noted> {
        lock(&self.noted)
    }
}

/// Locks `noted`; what is noted stays consistent whatever panicked while it was held.
fn lock(noted: &Mutex<Noted>) -> MutexGuard<'_, Noted> {
    noted.lock().unwrap_or_else(PoisonError::into_inner)
}
