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

/// Where logs live and how large one may be.
#[derive(Debug, Clone)]
pub struct LogStore {
    directory: PathBuf,
    max_bytes: u64,
}

/// A log being written.
pub struct LogWriter {
    encoder: zstd::Encoder<'static, fs_err::File>,
    stored: u64,
    truncated: u64,
    max_bytes: u64,
}

impl LogStore {
    /// A store in `directory` keeping at most `max_bytes` per attempt.
    #[must_use]
    pub fn new(directory: PathBuf, max_bytes: u64) -> Self {
        Self {
            directory,
            max_bytes,
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
            encoder: zstd::Encoder::new(file, 3)?,
            stored: 0,
            truncated: 0,
            max_bytes: self.max_bytes,
        })
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
        self.encoder.write_all(&chunk[..kept])?;
        self.stored += kept as u64;
        self.truncated += (chunk.len() - kept) as u64;
        Ok(())
    }

    /// Finishes the file; returns the bytes stored and dropped.
    pub fn finish(self) -> io::Result<(u64, u64)> {
        self.encoder.finish()?;
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
        assert!(store.read("../etc/passwd").is_err());
    }
}
