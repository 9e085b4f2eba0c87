//! Group commit for the cache's files. Publishing makes files durable at two points (the NAR
//! before its narinfo exists, the narinfo before the step may succeed); one `fsync` per file at
//! each point costs several synchronous disk writes per step. Instead every publisher waits on
//! [`GroupSync::sync`], and one `syncfs` of the cache's file system serves every publisher that
//! was waiting when it started: while one flush runs, the next batch gathers.

use std::io;
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Flushes the file system of one directory for many callers at once.
#[derive(Debug)]
pub struct GroupSync {
    directory: fs_err::File,
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Tickets handed out; a ticket is covered by any flush that starts after it was taken.
    requested: u64,
    /// Every ticket up to this one is covered by a finished flush.
    completed: u64,
    /// Whether a caller is flushing now.
    flushing: bool,
    /// The last failed flush: the tickets it covered and the error, for the callers it failed.
    failure: Option<(u64, u64, io::ErrorKind, String)>,
}

impl GroupSync {
    /// A group sync for the file system holding `directory`.
    pub fn open(directory: &Path) -> io::Result<Self> {
        Ok(Self {
            directory: fs_err::File::open(directory)?,
            state: Mutex::new(State::default()),
            done: Condvar::new(),
        })
    }

    /// Returns once everything this thread wrote (and renamed) before the call is on disk.
    /// Blocking: call it from a blocking thread.
    pub fn sync(&self) -> io::Result<()> {
        let mut state = self.lock();
        state.requested += 1;
        let ticket = state.requested;
        loop {
            if state.completed >= ticket {
                return match &state.failure {
                    Some((first, last, kind, message)) if (*first..=*last).contains(&ticket) => {
                        Err(io::Error::new(*kind, message.clone()))
                    }
                    _ => Ok(()),
                };
            }
            if state.flushing {
                state = self
                    .done
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // Lead a flush for every ticket taken so far.
            state.flushing = true;
            let (first, last) = (state.completed + 1, state.requested);
            drop(state);
            let result = rustix::fs::syncfs(self.directory.file());
            state = self.lock();
            state.flushing = false;
            state.completed = last;
            if let Err(error) = result {
                let error = io::Error::from(error);
                state.failure = Some((first, last, error.kind(), error.to_string()));
            }
            self.done.notify_all();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a handful of assignments; a panicking holder leaves it consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_callers_share_flushes_and_all_return() {
        let directory = tempfile::tempdir().unwrap();
        let sync = std::sync::Arc::new(GroupSync::open(directory.path()).unwrap());
        let threads: Vec<_> = (0..16)
            .map(|index| {
                let sync = sync.clone();
                let path = directory.path().join(format!("file{index}"));
                std::thread::spawn(move || {
                    fs_err::write(&path, b"durable").unwrap();
                    sync.sync().unwrap();
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let state = sync.lock();
        assert_eq!(state.completed, 16);
        assert!(!state.flushing);
        assert!(state.failure.is_none());
    }
}
