//! What the cache was asked for, so a garbage collection keeps it. Every path found published
//! (by ingest, which then does not build it; by a publisher checking a reference) and every NAR
//! file a publisher puts in place is noted. A sweep keeps what was noted since the previous
//! sweep began, and what is noted while it runs: a lookup takes the gate shared and a batch of
//! deletions takes it exclusively, so either the lookup comes first and the sweep keeps the
//! path with its closure, or the deletion comes first and the lookup finds nothing, and the step
//! is built. GC and publishing never race.

use std::collections::HashSet;
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

/// The gate between lookups and deletions, and what lookups noted.
#[derive(Debug, Default)]
pub struct SweepMarks {
    gate: RwLock<()>,
    noted: Mutex<Noted>,
}

/// Deletions may proceed while it is held; lookups wait.
pub type Deleting<'a> = RwLockWriteGuard<'a, ()>;

impl SweepMarks {
    /// Runs `look` (a lookup of the cache directory) with the gate shared; when it finds `path`
    /// published, notes it.
    pub fn lookup<T>(
        &self,
        path: &StorePath,
        look: impl FnOnce() -> T,
        found: fn(&T) -> bool,
    ) -> T {
        let _shared = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        let result = look();
        if found(&result) {
            self.noted().paths.insert(path.clone());
        }
        result
    }

    /// Runs `place` (renaming a NAR into place) with the gate shared, noting the file.
    pub fn place<T>(&self, url: &str, place: impl FnOnce() -> T) -> T {
        let _shared = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        self.noted().nars.insert(url.to_owned());
        place()
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
        // What is noted stays consistent whatever panicked while it was held.
        self.noted.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
