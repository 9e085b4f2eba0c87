//! Logs of attempts whose builders are still sending them, for `FollowLog`: each keeps its last
//! [`BACKLOG_BYTES`] in memory (so a follower that comes late sees some context) and announces
//! every chunk, numbered by its offset in the log, so a follower that copies the backlog and
//! then reads announcements sends each byte once. Once the upload ends the log is read from
//! its file like any other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::broadcast;
use uuid::Uuid;

/// The most recent bytes of a live log kept for followers that join late.
pub const BACKLOG_BYTES: usize = 1024 * 1024;

/// Chunks announced and not yet read by a follower before it is told it fell behind.
const ANNOUNCED_CHUNKS: usize = 256;

/// What a live log tells its followers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveChunk {
    /// Bytes at this offset of the log.
    Data(u64, Arc<[u8]>),
    /// The upload ended.
    End,
}

/// The recent bytes of one live log.
#[derive(Debug, Default)]
struct Backlog {
    /// The offset in the log of `bytes[0]`.
    start: u64,
    bytes: Vec<u8>,
}

/// One live log.
#[derive(Debug)]
struct LiveLog {
    backlog: Mutex<Backlog>,
    announce: broadcast::Sender<LiveChunk>,
}

/// Every live log, by attempt.
#[derive(Debug, Clone, Default)]
pub struct LiveLogs {
    logs: Arc<Mutex<HashMap<Uuid, Arc<LiveLog>>>>,
}

/// The writing end of one live log; ending it (or dropping it, if the upload was cut) tells the
/// followers and forgets the log.
#[derive(Debug)]
pub struct LiveWriter {
    logs: LiveLogs,
    attempt: Uuid,
    log: Arc<LiveLog>,
}

/// A follower of one live log: the backlog when it started following, then the chunks after it.
#[derive(Debug)]
pub struct LiveFollower {
    /// The offset of the first byte of `backlog` in the log.
    pub start: u64,
    /// The recent bytes when following started.
    pub backlog: Vec<u8>,
    /// Chunks after that (and possibly overlapping it: skip bytes before `start + backlog.len()`).
    pub chunks: broadcast::Receiver<LiveChunk>,
}

impl LiveLogs {
    /// Starts (or restarts) the live log of an attempt.
    #[must_use]
    pub fn start(&self, attempt: Uuid) -> LiveWriter {
        let log = Arc::new(LiveLog {
            backlog: Mutex::new(Backlog::default()),
            announce: broadcast::channel(ANNOUNCED_CHUNKS).0,
        });
        self.lock().insert(attempt, log.clone());
        LiveWriter {
            logs: self.clone(),
            attempt,
            log,
        }
    }

    /// Follows the live log of an attempt, if its upload is under way.
    #[must_use]
    pub fn follow(&self, attempt: Uuid) -> Option<LiveFollower> {
        let log = self.lock().get(&attempt)?.clone();
        // Subscribed before the backlog is copied: nothing written after the copy is missed.
        let chunks = log.announce.subscribe();
        let backlog = log.backlog.lock().unwrap_or_else(PoisonError::into_inner);
        Some(LiveFollower {
            start: backlog.start,
            backlog: backlog.bytes.clone(),
            chunks,
        })
    }

    /// The offset and bytes of what a live log keeps (its last [`BACKLOG_BYTES`]), if its
    /// upload is under way.
    #[must_use]
    pub fn recent(&self, attempt: Uuid) -> Option<(u64, Vec<u8>)> {
        let log = self.lock().get(&attempt)?.clone();
        let backlog = log.backlog.lock().unwrap_or_else(PoisonError::into_inner);
        Some((backlog.start, backlog.bytes.clone()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<LiveLog>>> {
        // Every operation is one map call: a panicking holder leaves it consistent.
        self.logs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl LiveWriter {
    /// Appends the bytes the log file kept.
    pub fn append(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut backlog = self
            .log
            .backlog
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let offset = backlog.start + backlog.bytes.len() as u64;
        backlog.bytes.extend_from_slice(data);
        let excess = backlog.bytes.len().saturating_sub(BACKLOG_BYTES);
        if excess > 0 {
            backlog.bytes.drain(..excess);
            backlog.start += excess as u64;
        }
        // Announced under the lock, so announcements keep the order of the offsets.
        let _ = self.log.announce.send(LiveChunk::Data(offset, data.into()));
    }
}

impl Drop for LiveWriter {
    fn drop(&mut self) {
        let mut logs = self.logs.lock();
        if logs
            .get(&self.attempt)
            .is_some_and(|log| Arc::ptr_eq(log, &self.log))
        {
            logs.remove(&self.attempt);
        }
        let _ = self.log.announce.send(LiveChunk::End);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_gets_the_backlog_then_each_later_chunk_and_the_end() {
        let logs = LiveLogs::default();
        let attempt = Uuid::new_v4();
        assert!(logs.follow(attempt).is_none());
        let writer = logs.start(attempt);
        writer.append(b"first ");
        let mut follower = logs.follow(attempt).unwrap();
        assert_eq!(
            (follower.start, follower.backlog.as_slice()),
            (0, &b"first "[..])
        );
        writer.append(b"second");
        assert_eq!(
            follower.chunks.try_recv().unwrap(),
            LiveChunk::Data(6, Arc::from(&b"second"[..]))
        );
        drop(writer);
        assert_eq!(follower.chunks.try_recv().unwrap(), LiveChunk::End);
        assert!(
            logs.follow(attempt).is_none(),
            "an ended log is read from its file"
        );
    }

    #[test]
    fn the_backlog_keeps_the_most_recent_bytes() {
        let logs = LiveLogs::default();
        let attempt = Uuid::new_v4();
        let writer = logs.start(attempt);
        writer.append(&vec![b'a'; BACKLOG_BYTES]);
        writer.append(b"tail");
        let follower = logs.follow(attempt).unwrap();
        assert_eq!(follower.start, 4);
        assert_eq!(follower.backlog.len(), BACKLOG_BYTES);
        assert!(follower.backlog.ends_with(b"tail"));
    }
}
