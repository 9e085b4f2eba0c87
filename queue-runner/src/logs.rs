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

    /// Reads a log back, decompressed.
    pub fn read(&self, file_name: &str) -> io::Result<Vec<u8>> {
        if file_name.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a log file name",
            ));
        }
        let file = fs_err::File::open(self.directory.join(file_name))?;
        let mut log = Vec::new();
        zstd::Decoder::new(file)?.read_to_end(&mut log)?;
        Ok(log)
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
            b"hello worl"
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
            store.read(&LogStore::file_name(long)).unwrap(),
            chunk.repeat(5)
        );
        assert!(store.read("../etc/passwd").is_err());
    }
}
