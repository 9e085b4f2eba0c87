//! Step logs on disk: one zstd-compressed file per attempt, written as chunks arrive and capped
//! at a configured size, so a runaway build cannot fill the runner's disk. The file is named
//! after the attempt, and the attempt's row names it from dispatch on.
//!
//! Logs are not flushed to disk one by one: they are diagnostics, and a step's result never
//! depends on its log, so a machine crash may cost the last seconds of logs but never a result,
//! while an fsync per step would cost every step a synchronous disk write.

use std::io::{self, Read as _, Write as _};
use std::path::PathBuf;

use uuid::Uuid;

use crate::live_logs::{LiveFollower, LiveLogs, LiveWriter};

/// Where logs live and how large one may be.
#[derive(Debug, Clone)]
pub struct LogStore {
    directory: PathBuf,
    max_bytes: u64,
    live: LiveLogs,
}

/// Log bytes kept in memory before a log is streamed through a compressor of its own: most
/// logs are smaller, and are compressed in one go at the end with the thread's reused context.
const BUFFERED_BYTES: usize = 256 * 1024;

/// A log as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogText {
    /// Its bytes, decompressed.
    pub bytes: Vec<u8>,
    /// False while its step runs (what has arrived so far), or when its upload was cut.
    pub complete: bool,
}

/// A log being written.
pub struct LogWriter {
    file: Option<fs_err::File>,
    /// The start of the log, until it outgrows [`BUFFERED_BYTES`].
    buffered: Vec<u8>,
    /// The compressor of a log that outgrew the buffer.
    encoder: Option<zstd::Encoder<'static, fs_err::File>>,
    stored: u64,
    truncated: u64,
    max_bytes: u64,
    live: LiveWriter,
}

impl LogStore {
    /// A store in `directory` keeping at most `max_bytes` per attempt.
    #[must_use]
    pub fn new(directory: PathBuf, max_bytes: u64) -> Self {
        Self {
            directory,
            max_bytes,
            live: LiveLogs::default(),
        }
    }

    /// The file name of an attempt's log, relative to the store.
    #[must_use]
    pub fn file_name(attempt: Uuid) -> String {
        format!("{attempt}.log.zst")
    }

    /// Starts (or restarts) the log of an attempt.
    pub fn create(&self, attempt: Uuid) -> io::Result<LogWriter> {
        let file = fs_err::File::create(self.directory.join(Self::file_name(attempt)))?;
        Ok(LogWriter {
            file: Some(file),
            buffered: Vec::new(),
            encoder: None,
            stored: 0,
            truncated: 0,
            max_bytes: self.max_bytes,
            live: self.live.start(attempt),
        })
    }

    /// Follows the log of an attempt while its builder is still sending it.
    #[must_use]
    pub fn follow(&self, attempt: Uuid) -> Option<LiveFollower> {
        self.live.follow(attempt)
    }

    /// The log file named `file_name` (as an attempt's row names it) in the log directory.
    fn file(&self, file_name: &str) -> io::Result<PathBuf> {
        if file_name.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a log file name",
            ));
        }
        Ok(self.directory.join(file_name))
    }

    /// Deletes a log whose time is up; one gone already is no error.
    pub fn delete(&self, file_name: &str) -> io::Result<()> {
        match fs_err::remove_file(self.file(file_name)?) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }

    /// Deletes each of `files` (logs whose rows said `why` they go: expired, pruned), logging
    /// the ones that cannot be; returns how many went.
    pub fn delete_all(&self, files: &[String], why: &str) -> u64 {
        let mut deleted = 0;
        for file in files {
            match self.delete(file) {
                Ok(()) => deleted += 1,
                Err(error) => tracing::warn!(%file, %error, why, "a log could not be deleted"),
            }
        }
        deleted
    }

    /// Reads a log back, decompressed, as far as it goes: a file whose upload was cut (or is
    /// under way) ends in an unfinished frame, and what precedes it is kept.
    pub fn read(&self, file_name: &str) -> io::Result<LogText> {
        let file = fs_err::File::open(self.file(file_name)?)?;
        let mut bytes = Vec::new();
        // `read_to_end` keeps what it decoded before an error.
        let complete = zstd::Decoder::new(file)?.read_to_end(&mut bytes).is_ok();
        Ok(LogText { bytes, complete })
    }

    /// Reads the log of `attempt` (stored in `file_name`) with what has arrived so far while
    /// its builder still sends it: the file's start and the live log's recent bytes.
    pub fn read_so_far(&self, attempt: Uuid, file_name: &str) -> io::Result<LogText> {
        let Some((start, recent)) = self.live.recent(attempt) else {
            return self.read(file_name);
        };
        let mut bytes = if start == 0 {
            Vec::new()
        } else {
            match self.read(file_name) {
                Ok(stored) => stored.bytes,
                Err(error) if error.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(error) => return Err(error),
            }
        };
        let start = usize::try_from(start).unwrap_or(usize::MAX);
        if bytes.len() >= start {
            bytes.truncate(start);
        } else {
            let missing = start - bytes.len();
            bytes.extend_from_slice(
                format!(
                    "\n[drover: {missing} bytes of this running step's log can be read once it ends]\n"
                )
                .as_bytes(),
            );
        }
        bytes.extend_from_slice(&recent);
        Ok(LogText {
            bytes,
            complete: false,
        })
    }
}

impl LogWriter {
    /// Appends a chunk, dropping (and counting) whatever exceeds the limit.
    pub fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        let room =
            usize::try_from(self.max_bytes.saturating_sub(self.stored)).unwrap_or(usize::MAX);
        let kept = chunk.len().min(room);
        self.live.append(&chunk[..kept]);
        if let Some(encoder) = &mut self.encoder {
            encoder.write_all(&chunk[..kept])?;
        } else {
            self.buffered.extend_from_slice(&chunk[..kept]);
            if self.buffered.len() > BUFFERED_BYTES
                && let Some(file) = self.file.take()
            {
                let mut encoder = zstd::Encoder::new(file, crate::compression::LEVEL)?;
                encoder.write_all(&std::mem::take(&mut self.buffered))?;
                self.encoder = Some(encoder);
            }
        }
        self.stored += kept as u64;
        self.truncated += (chunk.len() - kept) as u64;
        Ok(())
    }

    /// Finishes the file; returns the bytes stored and dropped.
    pub fn finish(self) -> io::Result<(u64, u64)> {
        match (self.encoder, self.file) {
            (Some(encoder), _) => {
                encoder.finish()?;
            }
            (None, Some(file)) => {
                let (written, _) = crate::compression::compress(file, |encoder| {
                    encoder.write_all(&self.buffered)
                })?;
                written?;
            }
            (None, None) => {}
        }
        Ok((self.stored, self.truncated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live_logs::BACKLOG_BYTES;

    #[test]
    fn logs_round_trip_and_are_capped() {
        let directory = tempfile::tempdir().unwrap();
        let store = LogStore::new(directory.path().to_owned(), 10);
        let attempt = Uuid::new_v4();
        let mut writer = store.create(attempt).unwrap();
        writer.write(b"hello ").unwrap();
        writer.write(b"world, and more").unwrap();
        assert_eq!(writer.finish().unwrap(), (10, 11));
        assert_eq!(
            store.read(&LogStore::file_name(attempt)).unwrap(),
            LogText {
                bytes: b"hello worl".to_vec(),
                complete: true
            }
        );
        let long = Uuid::new_v4();
        let store = LogStore::new(directory.path().to_owned(), 1 << 30);
        let mut writer = store.create(long).unwrap();
        let chunk: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        for _ in 0..5 {
            writer.write(&chunk).unwrap();
        }
        assert_eq!(writer.finish().unwrap(), (500_000, 0));
        assert_eq!(
            store.read(&LogStore::file_name(long)).unwrap().bytes,
            chunk.repeat(5)
        );
        assert!(store.read("../etc/passwd").is_err());
    }

    /// Bytes zstd cannot shrink, so the file grows as they are written.
    fn noise(length: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        (0..length)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[0]
            })
            .collect()
    }

    #[test]
    fn a_log_being_written_reads_as_far_as_it_has_come() {
        let directory = tempfile::tempdir().unwrap();
        let store = LogStore::new(directory.path().to_owned(), 1 << 30);
        let short = Uuid::new_v4();
        let mut writer = store.create(short).unwrap();
        writer.write(b"line 1\n").unwrap();
        assert_eq!(
            store
                .read_so_far(short, &LogStore::file_name(short))
                .unwrap(),
            LogText {
                bytes: b"line 1\n".to_vec(),
                complete: false
            }
        );
        writer.finish().unwrap();
        assert!(
            store
                .read_so_far(short, &LogStore::file_name(short))
                .unwrap()
                .complete
        );

        // Longer than what the live log keeps: the file's start, then the recent bytes.
        let long = Uuid::new_v4();
        let mut writer = store.create(long).unwrap();
        let written = noise(3 * BACKLOG_BYTES);
        for chunk in written.chunks(64 * 1024) {
            writer.write(chunk).unwrap();
        }
        let so_far = store.read_so_far(long, &LogStore::file_name(long)).unwrap();
        assert!(!so_far.complete);
        assert!(so_far.bytes.starts_with(&written[..1000]));
        assert!(
            so_far
                .bytes
                .ends_with(&written[written.len() - BACKLOG_BYTES..])
        );

        // An upload cut off: what was stored before the cut is read, marked incomplete.
        drop(writer);
        let cut = store.read(&LogStore::file_name(long)).unwrap();
        assert!(!cut.complete);
        assert!(!cut.bytes.is_empty());
        assert!(written.starts_with(&cut.bytes));
    }
}
