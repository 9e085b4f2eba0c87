//! What the cache was asked for while a garbage collection sweeps it. A path that ingest found
//! published (and so will not build), that an upload refers to, or whose NAR a publisher put in
//! place, is noted here under the same lock the sweep holds to delete: either the lookup comes
//! first and the sweep keeps the path with its closure, or the deletion comes first and the
//! lookup finds nothing, so the step is built. GC and publishing never race.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard, PoisonError};

use nix_primitives::StorePath;

/// Paths and NAR files used since the current sweep began.
#[derive(Debug, Default)]
pub struct Touched {
    /// Store paths found published.
    pub paths: HashSet<StorePath>,
    /// NAR files (`nar/<hash>.nar.zst`) put in place by a publisher.
    pub nars: HashSet<String>,
}

/// Noting is on only while a sweep runs.
#[derive(Debug, Default)]
pub struct SweepMarks {
    touched: Mutex<Option<Touched>>,
}

impl SweepMarks {
    /// Starts noting. A sweep already running is an error of the caller: one sweep at a time.
    pub fn begin(&self) {
        *self.lock() = Some(Touched::default());
    }

    /// Stops noting.
    pub fn end(&self) {
        *self.lock() = None;
    }

    /// Runs `look` (a lookup of the cache directory) under the lock; when it finds `path`
    /// published while a sweep runs, notes it.
    pub fn lookup<T>(
        &self,
        path: &StorePath,
        look: impl FnOnce() -> T,
        found: fn(&T) -> bool,
    ) -> T {
        let mut touched = self.lock();
        let result = look();
        if let Some(touched) = touched.as_mut()
            && found(&result)
        {
            touched.paths.insert(path.clone());
        }
        result
    }

    /// Runs `place` (renaming a NAR into place) under the lock, noting the file.
    pub fn place<T>(&self, url: &str, place: impl FnOnce() -> T) -> T {
        let mut touched = self.lock();
        if let Some(touched) = touched.as_mut() {
            touched.nars.insert(url.to_owned());
        }
        place()
    }

    /// Holds the lock while the sweep deletes a batch; gives what was noted since the last
    /// batch.
    pub fn hold(&self) -> (MutexGuard<'_, Option<Touched>>, Touched) {
        let mut guard = self.lock();
        let noted = guard.as_mut().map(std::mem::take).unwrap_or_default();
        (guard, noted)
    }

    fn lock(&self) -> MutexGuard<'_, Option<Touched>> {
        // What is noted stays consistent whatever panicked while it was held.
        self.touched.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
