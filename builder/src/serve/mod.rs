//! A client of Nix's serve protocol (`nix-store --serve --write`), the protocol Hydra's queue
//! runner speaks to its remote builders: here spoken to a local child process over its stdin and
//! stdout. It is synchronous on purpose: each step owns one process, its calls run one after the
//! other on a blocking thread, and a NAR inside a reply carries no length, so only a parser that
//! reads exactly up to its end can find where the next reply starts.
//!
//! A process whose replies stop making sense (it died, or this client and it disagree on where a
//! message ends) is never used again: every error here fails the step it serves as an
//! infrastructure failure, and the process is dropped.

mod build_result;
mod wire;

use std::collections::BTreeSet;
use std::io::{self, BufRead, Write};

use nix_primitives::derivation::Derivation;
use nix_primitives::nar::{self, NarSummary, NarVisitor};

pub use build_result::{BuildResult, BuildStatus};

/// The client's greeting.
const CLIENT_MAGIC: u64 = 0x390c_9deb;
/// The server's answer.
const SERVER_MAGIC: u64 = 0x5452_eecb;
/// The protocol version this client speaks: 2.6, whose BuildDerivation sends limits, repeats,
/// and the reply's times and built outputs (Nix 2.8 sends the built outputs whatever the minor).
const CLIENT_VERSION: u64 = 0x206;

/// Command numbers.
const QUERY_VALID_PATHS: u64 = 1;
const QUERY_PATH_INFOS: u64 = 2;
const DUMP_STORE_PATH: u64 = 3;
const BUILD_DERIVATION: u64 = 8;

/// Why a serve process could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Reading or writing the process's pipes failed: it died, or said something malformed.
    #[error("{during}")]
    Io {
        /// The exchange it failed in.
        during: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The process does not speak the protocol.
    #[error("the handshake got magic {found:#x} instead of {SERVER_MAGIC:#x}")]
    BadMagic {
        /// What came instead.
        found: u64,
    },
    /// The process speaks a protocol too old for this client.
    #[error("nix-store speaks serve protocol {found:#x}; drover needs 2.6 (Nix 2.4) or later")]
    TooOld {
        /// Its version.
        found: u64,
    },
    /// BuildDerivation answered a status this client does not know.
    #[error("BuildDerivation answered status {0}, which this client does not know")]
    UnknownStatus(u64),
    /// An output's NAR could not be read.
    #[error("reading the NAR of {path}")]
    Nar {
        /// The output.
        path: String,
        /// Why.
        #[source]
        source: nar::NarError,
    },
}

impl ServeError {
    fn io(during: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io { during, source }
    }
}

/// The limits a build runs under, as BuildDerivation takes them; zero means none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuildLimits {
    /// Seconds the build may print nothing.
    pub max_silent_seconds: u64,
    /// Seconds the build may run.
    pub timeout_seconds: u64,
    /// Bytes of log the build may print.
    pub max_log_bytes: u64,
}

/// What QueryPathInfos says about one valid path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The path.
    pub path: String,
    /// Paths it refers to (itself included, if it does).
    pub references: Vec<String>,
    /// The size of its NAR.
    pub nar_size: u64,
    /// Its NAR hash as Nix writes it.
    pub nar_hash: String,
}

/// One handshaken conversation with a serve process.
pub struct Connection<R, W> {
    reader: R,
    writer: W,
}

impl<R: BufRead, W: Write> Connection<R, W> {
    /// Greets the process and checks it speaks a protocol this client understands.
    pub fn handshake(mut reader: R, mut writer: W) -> Result<Self, ServeError> {
        let during = "greeting nix-store --serve";
        wire::write_u64(&mut writer, CLIENT_MAGIC).map_err(ServeError::io(during))?;
        writer.flush().map_err(ServeError::io(during))?;
        let magic = wire::read_u64(&mut reader).map_err(ServeError::io(during))?;
        if magic != SERVER_MAGIC {
            return Err(ServeError::BadMagic { found: magic });
        }
        let version = wire::read_u64(&mut reader).map_err(ServeError::io(during))?;
        if version >> 8 != 2 || version & 0xff < 6 {
            return Err(ServeError::TooOld { found: version });
        }
        wire::write_u64(&mut writer, CLIENT_VERSION).map_err(ServeError::io(during))?;
        writer.flush().map_err(ServeError::io(during))?;
        Ok(Self { reader, writer })
    }

    /// Which of `paths` are valid, after substituting the missing ones from the configured
    /// substituters when `substitute` is set.
    pub fn query_valid_paths(
        &mut self,
        paths: &[String],
        substitute: bool,
    ) -> Result<BTreeSet<String>, ServeError> {
        let during = "QueryValidPaths";
        let send = |writer: &mut W| {
            wire::write_u64(writer, QUERY_VALID_PATHS)?;
            wire::write_u64(writer, 0)?;
            wire::write_u64(writer, u64::from(substitute))?;
            wire::write_list(writer, paths.iter().map(String::as_bytes))?;
            writer.flush()
        };
        send(&mut self.writer).map_err(ServeError::io(during))?;
        let valid = wire::read_strings(&mut self.reader).map_err(ServeError::io(during))?;
        Ok(valid.into_iter().collect())
    }

    /// Builds `derivation` (whose inputs must be valid), known as `drv_path`, with `inputs` as
    /// its input sources: the outputs of its input derivations and its own sources.
    pub fn build_derivation(
        &mut self,
        drv_path: &str,
        derivation: &Derivation,
        inputs: &[String],
        limits: BuildLimits,
    ) -> Result<BuildResult, ServeError> {
        let during = "sending BuildDerivation";
        let send = |writer: &mut W| {
            wire::write_u64(writer, BUILD_DERIVATION)?;
            wire::write_bytes(writer, drv_path.as_bytes())?;
            write_basic_derivation(writer, derivation, inputs)?;
            for value in [
                limits.max_silent_seconds,
                limits.timeout_seconds,
                limits.max_log_bytes,
                0, // repeats
                0, // enforce determinism
            ] {
                wire::write_u64(writer, value)?;
            }
            writer.flush()
        };
        send(&mut self.writer).map_err(ServeError::io(during))?;
        let during = "reading BuildDerivation's result";
        let reader = &mut self.reader;
        let status = wire::read_u64(reader).map_err(ServeError::io(during))?;
        let status = BuildStatus::from_wire(status).ok_or(ServeError::UnknownStatus(status))?;
        let error_message = wire::read_string(reader).map_err(ServeError::io(during))?;
        let times_built = wire::read_u64(reader).map_err(ServeError::io(during))?;
        let non_deterministic = wire::read_u64(reader).map_err(ServeError::io(during))? != 0;
        for _ in ["start time", "stop time"] {
            wire::read_u64(reader).map_err(ServeError::io(during))?;
        }
        let built_outputs = wire::read_u64(reader).map_err(ServeError::io(during))?;
        for _ in 0..built_outputs {
            for _ in ["output id", "realisation"] {
                wire::read_bytes(reader).map_err(ServeError::io(during))?;
            }
        }
        Ok(BuildResult {
            status,
            error_message,
            times_built,
            non_deterministic,
        })
    }

    /// What Nix knows of each valid path of `paths`; invalid ones are left out.
    pub fn query_path_infos(&mut self, paths: &[String]) -> Result<Vec<PathInfo>, ServeError> {
        let during = "QueryPathInfos";
        let send = |writer: &mut W| {
            wire::write_u64(writer, QUERY_PATH_INFOS)?;
            wire::write_list(writer, paths.iter().map(String::as_bytes))?;
            writer.flush()
        };
        send(&mut self.writer).map_err(ServeError::io(during))?;
        let read = |reader: &mut R| -> io::Result<Vec<PathInfo>> {
            let mut infos = Vec::new();
            loop {
                let path = wire::read_string(reader)?;
                if path.is_empty() {
                    return Ok(infos);
                }
                let _deriver = wire::read_bytes(reader)?;
                let references = wire::read_strings(reader)?;
                let _download_size = wire::read_u64(reader)?;
                let nar_size = wire::read_u64(reader)?;
                let nar_hash = wire::read_string(reader)?;
                let _content_address = wire::read_bytes(reader)?;
                let _signatures = wire::read_strings(reader)?;
                infos.push(PathInfo {
                    path,
                    references,
                    nar_size,
                    nar_hash,
                });
            }
        };
        read(&mut self.reader).map_err(ServeError::io(during))
    }

    /// Streams the NAR of the valid path `path` to `sink`, in the pieces it arrives in.
    pub fn dump_store_path(
        &mut self,
        path: &str,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<NarSummary, ServeError> {
        let during = "sending DumpStorePath";
        let send = |writer: &mut W| {
            wire::write_u64(writer, DUMP_STORE_PATH)?;
            wire::write_bytes(writer, path.as_bytes())?;
            writer.flush()
        };
        send(&mut self.writer).map_err(ServeError::io(during))?;
        let mut tee = Tee {
            inner: &mut self.reader,
            sink,
        };
        nar::read_one(&mut tee, &mut IgnoreContents).map_err(|source| ServeError::Nar {
            path: path.to_owned(),
            source,
        })
    }
}

/// Writes a *basic* derivation: the derivation with its input derivations replaced by their
/// outputs, which `inputs` lists with its sources.
fn write_basic_derivation(
    writer: &mut impl Write,
    derivation: &Derivation,
    inputs: &[String],
) -> io::Result<()> {
    wire::write_u64(writer, derivation.outputs.len() as u64)?;
    for (name, output) in &derivation.outputs {
        let path = output
            .path()
            .map(nix_primitives::StorePath::to_absolute)
            .unwrap_or_default();
        let (hash_algorithm, hash) = output.hash_fields();
        for field in [name.as_str(), &path, &hash_algorithm, &hash] {
            wire::write_bytes(writer, field.as_bytes())?;
        }
    }
    let inputs: BTreeSet<&str> = inputs.iter().map(String::as_str).collect();
    wire::write_list(writer, inputs.into_iter().map(str::as_bytes))?;
    wire::write_bytes(writer, &derivation.system)?;
    wire::write_bytes(writer, &derivation.builder)?;
    wire::write_list(writer, derivation.args.iter().map(Vec::as_slice))?;
    wire::write_u64(writer, derivation.env.len() as u64)?;
    for (key, value) in &derivation.env {
        wire::write_bytes(writer, key)?;
        wire::write_bytes(writer, value)?;
    }
    Ok(())
}

/// Hands every byte the NAR parser consumes to a sink, and reads no further than the parser asks:
/// what follows the NAR stays in the connection's buffer.
struct Tee<'a, R> {
    inner: &'a mut R,
    sink: &'a mut dyn FnMut(&[u8]) -> io::Result<()>,
}

impl<R: BufRead> io::Read for Tee<'_, R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let available = self.inner.fill_buf()?;
        let len = available.len().min(buffer.len());
        buffer[..len].copy_from_slice(&available[..len]);
        self.consume(len);
        Ok(len)
    }
}

impl<R: BufRead> BufRead for Tee<'_, R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, amount: usize) {
        // A sink that fails (the upload stopped) does not stop the parser: the NAR must still be
        // read to its end for the connection to stay in step, and the upload reports its own error.
        if let Ok(available) = self.inner.fill_buf() {
            let _ = (self.sink)(&available[..amount.min(available.len())]);
        }
        self.inner.consume(amount);
    }
}

/// The parser only finds where the NAR ends; its contents go to the sink as raw bytes.
struct IgnoreContents;

impl NarVisitor for IgnoreContents {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server's side of a conversation, as bytes.
    fn server(words: &[u64], tail: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for word in words {
            wire::write_u64(&mut bytes, *word).unwrap();
        }
        bytes.extend_from_slice(tail);
        bytes
    }

    #[test]
    fn a_process_that_is_not_nix_or_too_old_is_refused_at_the_handshake() {
        let not_nix = server(&[0x1234, 0x206], b"");
        assert!(matches!(
            Connection::handshake(not_nix.as_slice(), Vec::new()),
            Err(ServeError::BadMagic { found: 0x1234 })
        ));
        let too_old = server(&[SERVER_MAGIC, 0x205], b"");
        assert!(matches!(
            Connection::handshake(too_old.as_slice(), Vec::new()),
            Err(ServeError::TooOld { found: 0x205 })
        ));
        let silent: &[u8] = &[];
        assert!(matches!(
            Connection::handshake(silent, Vec::new()),
            Err(ServeError::Io { .. })
        ));
    }

    #[test]
    fn a_nar_cut_off_mid_stream_is_an_error_and_what_arrived_was_passed_on() {
        let mut nar = Vec::new();
        nar::write_file_nar(&[7u8; 10_000], false, &mut nar).unwrap();
        let cut = nar.len() / 2;
        let reply = server(&[SERVER_MAGIC, 0x207], &nar[..cut]);
        let mut connection = Connection::handshake(reply.as_slice(), Vec::new()).unwrap();
        let mut received = Vec::new();
        let error = connection
            .dump_store_path("/nix/store/x", &mut |bytes| {
                received.extend_from_slice(bytes);
                Ok(())
            })
            .unwrap_err();
        assert!(
            matches!(&error, ServeError::Nar { source, .. } if matches!(source.kind, nar::NarErrorKind::Truncated)),
            "{error:?}"
        );
        assert_eq!(received, nar[..cut]);
    }

    #[test]
    fn a_whole_nar_is_passed_on_and_the_next_reply_stays_readable() {
        let mut nar = Vec::new();
        nar::write_file_nar(b"contents", true, &mut nar).unwrap();
        let mut reply = server(&[SERVER_MAGIC, 0x207], &nar);
        wire::write_u64(&mut reply, 0).unwrap();
        let mut connection = Connection::handshake(
            std::io::BufReader::with_capacity(16, reply.as_slice()),
            Vec::new(),
        )
        .unwrap();
        let mut received = Vec::new();
        let summary = connection
            .dump_store_path("/nix/store/x", &mut |bytes| {
                received.extend_from_slice(bytes);
                Ok(())
            })
            .unwrap();
        assert_eq!(received, nar);
        assert_eq!(summary.nar_size, nar.len() as u64);
        assert_eq!(connection.query_valid_paths(&[], false).unwrap().len(), 0);
    }

    #[test]
    fn an_unknown_build_status_is_refused() {
        let derivation = Derivation::parse(
            br#"Derive([("out","/nix/store/00000000000000000000000000000000-x","","")],[],[],"x86_64-linux","/bin/sh",[],[])"#,
        )
        .unwrap();
        let reply = server(&[SERVER_MAGIC, 0x207, 99], b"");
        let mut connection = Connection::handshake(reply.as_slice(), Vec::new()).unwrap();
        assert!(matches!(
            connection.build_derivation(
                "/nix/store/x.drv",
                &derivation,
                &[],
                BuildLimits::default()
            ),
            Err(ServeError::UnknownStatus(99))
        ));
    }
}
