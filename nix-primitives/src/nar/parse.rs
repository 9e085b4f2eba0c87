//! A strict streaming NAR parser: it validates as it reads, hashes every byte it consumes, never
//! holds more than one buffer of file contents, and hands what it finds to a [`NarVisitor`].

use std::io::{self, BufRead, BufReader, Read};

use error_context::{Classify, Severity};

use super::format::{MAGIC, MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN, padding_len};
use crate::hash::{Hash, HashAlgorithm, Hasher};

/// The longest token the parser reads when it expects a fixed token.
const MAX_TOKEN_LEN: usize = 16;

/// Bytes of file contents handed to the visitor at a time.
const CHUNK_LEN: usize = 256 * 1024;

/// Why a byte stream is not a valid NAR; `offset` is where the offending string starts.
#[derive(Debug, thiserror::Error)]
#[error("invalid NAR at byte {offset}: {kind}")]
pub struct NarError {
    /// Byte offset into the NAR.
    pub offset: u64,
    /// What is wrong there.
    #[source]
    pub kind: NarErrorKind,
}

impl Classify for NarError {
    fn severity(&self) -> Severity {
        match self.kind {
            NarErrorKind::Read(_) | NarErrorKind::Visitor(_) => Severity::Step,
            _ => Severity::Reject,
        }
    }
}

/// The ways a NAR can be invalid, or its processing fail.
#[derive(Debug, thiserror::Error)]
pub enum NarErrorKind {
    /// The source failed for a reason other than ending early.
    #[error("reading the NAR")]
    Read(#[source] io::Error),
    /// The stream ended in the middle of the NAR.
    #[error("the NAR is truncated")]
    Truncated,
    /// The stream does not start with `nix-archive-1`.
    #[error("not a NAR: the magic string is missing")]
    BadMagic,
    /// A fixed token was expected.
    #[error("expected {expected:?}")]
    UnexpectedToken {
        /// The token expected.
        expected: &'static str,
    },
    /// A node type other than regular, symlink or directory.
    #[error("unknown node type")]
    UnknownNodeType,
    /// A string longer than its limit.
    #[error("string longer than {limit} bytes")]
    StringTooLong {
        /// The limit.
        limit: u64,
    },
    /// Padding after a string is not zero.
    #[error("non-zero padding")]
    BadPadding,
    /// An empty entry name.
    #[error("empty entry name")]
    NameEmpty,
    /// The entry name `.`.
    #[error("entry named \".\"")]
    NameDot,
    /// The entry name `..`.
    #[error("entry named \"..\"")]
    NameDotDot,
    /// An entry name containing `/`.
    #[error("entry name contains '/'")]
    NameContainsSlash,
    /// An entry name containing NUL.
    #[error("entry name contains NUL")]
    NameContainsNul,
    /// Entries not in ascending byte order.
    #[error("directory entries are not sorted")]
    UnsortedEntries,
    /// Two entries with the same name.
    #[error("duplicate directory entry")]
    DuplicateEntry,
    /// A symlink with an empty target.
    #[error("empty symlink target")]
    TargetEmpty,
    /// A symlink target containing NUL.
    #[error("symlink target contains NUL")]
    TargetContainsNul,
    /// Directories nested deeper than [`MAX_DEPTH`].
    #[error("directories nested deeper than {MAX_DEPTH}")]
    TooDeep,
    /// Bytes after the end of the NAR.
    #[error("trailing bytes after the NAR")]
    TrailingBytes,
    /// The visitor (for example the unpacker) failed.
    #[error("processing the NAR contents")]
    Visitor(#[source] io::Error),
}

/// The NAR hash and size: what a narinfo's `NarHash` and `NarSize` say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarSummary {
    /// SHA-256 over the whole NAR.
    pub nar_hash: Hash,
    /// Length of the NAR in bytes.
    pub nar_size: u64,
}

/// Receives the nodes of a NAR in order. Paths are the entry names from the root; the root itself
/// is the empty path. Every method defaults to ignoring what it is given.
pub trait NarVisitor {
    /// A directory starts; its entries follow.
    fn directory(&mut self, path: &[Vec<u8>]) -> io::Result<()> {
        let _ = path;
        Ok(())
    }

    /// A regular file starts; `size` bytes of contents follow through [`NarVisitor::file_chunk`].
    fn file(&mut self, path: &[Vec<u8>], executable: bool, size: u64) -> io::Result<()> {
        let _ = (path, executable, size);
        Ok(())
    }

    /// The next piece of the current file's contents.
    fn file_chunk(&mut self, chunk: &[u8]) -> io::Result<()> {
        let _ = chunk;
        Ok(())
    }

    /// A symlink.
    fn symlink(&mut self, path: &[Vec<u8>], target: &[u8]) -> io::Result<()> {
        let _ = (path, target);
        Ok(())
    }
}

/// A visitor that only lets the parser validate and hash.
struct Discard;

impl NarVisitor for Discard {}

/// Validates a NAR and returns its hash and size without unpacking anything.
pub fn summarize(source: impl Read) -> Result<NarSummary, NarError> {
    parse(source, &mut Discard)
}

/// Parses a NAR from `source`, which must end where the NAR ends, handing its nodes to `visitor`.
pub fn parse(source: impl Read, visitor: &mut impl NarVisitor) -> Result<NarSummary, NarError> {
    let mut parser = Parser::new(BufReader::with_capacity(CHUNK_LEN, source));
    parser.archive(visitor)?;
    parser.token_start = parser.offset;
    match parser.source.fill_buf() {
        Ok([]) => Ok(parser.summary()),
        Ok(_) => Err(parser.error(NarErrorKind::TrailingBytes)),
        Err(error) => Err(parser.error(NarErrorKind::Read(error))),
    }
}

/// Parses one NAR from the start of `source` and stops where it ends, leaving whatever follows
/// unread: for a NAR inside a longer stream that carries no length, such as Nix's serve
/// protocol's `DumpStorePath` reply.
pub fn read_one(
    source: &mut impl BufRead,
    visitor: &mut impl NarVisitor,
) -> Result<NarSummary, NarError> {
    let mut parser = Parser::new(source);
    parser.archive(visitor)?;
    Ok(parser.summary())
}

/// An open directory while its entries are parsed.
struct Frame {
    /// The previous entry's name, for the order check.
    last_name: Option<Vec<u8>>,
    /// Whether this directory is an entry of its parent (so its `)` is followed by the entry's).
    is_entry: bool,
}

struct Parser<R> {
    source: R,
    offset: u64,
    hasher: Hasher,
    token_start: u64,
}

impl<R: BufRead> Parser<R> {
    fn new(source: R) -> Self {
        Self {
            source,
            offset: 0,
            hasher: Hasher::new(HashAlgorithm::Sha256),
            token_start: 0,
        }
    }

    fn summary(self) -> NarSummary {
        NarSummary {
            nar_hash: self.hasher.finish(),
            nar_size: self.offset,
        }
    }

    fn error(&self, kind: NarErrorKind) -> NarError {
        NarError {
            offset: self.token_start,
            kind,
        }
    }

    fn read_exact(&mut self, buffer: &mut [u8]) -> Result<(), NarError> {
        self.source.read_exact(buffer).map_err(|error| {
            self.error(if error.kind() == io::ErrorKind::UnexpectedEof {
                NarErrorKind::Truncated
            } else {
                NarErrorKind::Read(error)
            })
        })?;
        self.hasher.update(buffer);
        self.offset += buffer.len() as u64;
        Ok(())
    }

    fn read_u64(&mut self) -> Result<u64, NarError> {
        let mut bytes = [0u8; 8];
        self.read_exact(&mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn read_padding(&mut self, len: u64) -> Result<(), NarError> {
        let mut padding = [0u8; 8];
        let padding = &mut padding[..padding_len(len)];
        self.read_exact(padding)?;
        if padding.iter().any(|byte| *byte != 0) {
            return Err(self.error(NarErrorKind::BadPadding));
        }
        Ok(())
    }

    /// Reads one string of at most `limit` bytes.
    fn read_string(&mut self, limit: usize) -> Result<Vec<u8>, NarError> {
        self.token_start = self.offset;
        let len = self.read_u64()?;
        if len > limit as u64 {
            return Err(self.error(NarErrorKind::StringTooLong {
                limit: limit as u64,
            }));
        }
        let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(limit)];
        self.read_exact(&mut bytes)?;
        self.read_padding(len)?;
        Ok(bytes)
    }

    fn expect(&mut self, token: &'static str) -> Result<(), NarError> {
        let found = self
            .read_string(MAX_TOKEN_LEN)
            .map_err(|error| match error.kind {
                NarErrorKind::StringTooLong { .. } => {
                    self.error(NarErrorKind::UnexpectedToken { expected: token })
                }
                _ => error,
            })?;
        if found == token.as_bytes() {
            Ok(())
        } else {
            Err(self.error(NarErrorKind::UnexpectedToken { expected: token }))
        }
    }

    fn archive(&mut self, visitor: &mut impl NarVisitor) -> Result<(), NarError> {
        self.expect(MAGIC).map_err(|error| match error.kind {
            NarErrorKind::UnexpectedToken { .. } => self.error(NarErrorKind::BadMagic),
            _ => error,
        })?;
        let mut path: Vec<Vec<u8>> = Vec::new();
        let mut stack: Vec<Frame> = Vec::new();
        if self.node(&path, visitor)? {
            stack.push(Frame {
                last_name: None,
                is_entry: false,
            });
        }
        while let Some(frame) = stack.last_mut() {
            self.token_start = self.offset;
            let token = self
                .read_string(MAX_TOKEN_LEN)
                .map_err(|error| match error.kind {
                    NarErrorKind::StringTooLong { .. } => {
                        self.error(NarErrorKind::UnexpectedToken { expected: "entry" })
                    }
                    _ => error,
                })?;
            match token.as_slice() {
                b"entry" => {
                    self.expect("(")?;
                    self.expect("name")?;
                    let name = self.read_string(MAX_NAME_LEN)?;
                    self.check_name(&name, frame.last_name.as_deref())?;
                    frame.last_name = Some(name.clone());
                    self.expect("node")?;
                    path.push(name);
                    if self.node(&path, visitor)? {
                        if stack.len() >= MAX_DEPTH {
                            return Err(self.error(NarErrorKind::TooDeep));
                        }
                        stack.push(Frame {
                            last_name: None,
                            is_entry: true,
                        });
                    } else {
                        self.expect(")")?;
                        path.pop();
                    }
                }
                b")" => {
                    let is_entry = frame.is_entry;
                    stack.pop();
                    if is_entry {
                        self.expect(")")?;
                        path.pop();
                    }
                }
                _ => {
                    return Err(self.error(NarErrorKind::UnexpectedToken { expected: "entry" }));
                }
            }
        }
        Ok(())
    }

    /// Parses a node's header. Regular files and symlinks are parsed whole, including their `)`;
    /// for a directory it returns `true` and leaves its entries to the caller.
    fn node(&mut self, path: &[Vec<u8>], visitor: &mut impl NarVisitor) -> Result<bool, NarError> {
        self.expect("(")?;
        self.expect("type")?;
        let node_type = self
            .read_string(MAX_TOKEN_LEN)
            .map_err(|error| match error.kind {
                NarErrorKind::StringTooLong { .. } => self.error(NarErrorKind::UnknownNodeType),
                _ => error,
            })?;
        match node_type.as_slice() {
            b"regular" => {
                self.regular(path, visitor)?;
                self.expect(")")?;
                Ok(false)
            }
            b"symlink" => {
                self.expect("target")?;
                let target = self.read_string(MAX_TARGET_LEN)?;
                if target.is_empty() {
                    return Err(self.error(NarErrorKind::TargetEmpty));
                }
                if target.contains(&0) {
                    return Err(self.error(NarErrorKind::TargetContainsNul));
                }
                visitor
                    .symlink(path, &target)
                    .map_err(|error| self.error(NarErrorKind::Visitor(error)))?;
                self.expect(")")?;
                Ok(false)
            }
            b"directory" => {
                visitor
                    .directory(path)
                    .map_err(|error| self.error(NarErrorKind::Visitor(error)))?;
                Ok(true)
            }
            _ => Err(self.error(NarErrorKind::UnknownNodeType)),
        }
    }

    fn regular(&mut self, path: &[Vec<u8>], visitor: &mut impl NarVisitor) -> Result<(), NarError> {
        self.token_start = self.offset;
        let token = self.read_string(MAX_TOKEN_LEN)?;
        let executable = match token.as_slice() {
            b"executable" => {
                self.expect("")?;
                self.expect("contents")?;
                true
            }
            b"contents" => false,
            _ => {
                return Err(self.error(NarErrorKind::UnexpectedToken {
                    expected: "contents",
                }));
            }
        };
        self.token_start = self.offset;
        let size = self.read_u64()?;
        visitor
            .file(path, executable, size)
            .map_err(|error| self.error(NarErrorKind::Visitor(error)))?;
        let mut remaining = size;
        let mut chunk = vec![0u8; CHUNK_LEN.min(usize::try_from(size).unwrap_or(CHUNK_LEN))];
        while remaining > 0 {
            let len = chunk
                .len()
                .min(usize::try_from(remaining).unwrap_or(chunk.len()));
            self.read_exact(&mut chunk[..len])?;
            visitor
                .file_chunk(&chunk[..len])
                .map_err(|error| self.error(NarErrorKind::Visitor(error)))?;
            remaining -= len as u64;
        }
        self.read_padding(size)
    }

    fn check_name(&self, name: &[u8], previous: Option<&[u8]>) -> Result<(), NarError> {
        let kind = match name {
            b"" => Some(NarErrorKind::NameEmpty),
            b"." => Some(NarErrorKind::NameDot),
            b".." => Some(NarErrorKind::NameDotDot),
            _ if name.contains(&b'/') => Some(NarErrorKind::NameContainsSlash),
            _ if name.contains(&0) => Some(NarErrorKind::NameContainsNul),
            _ => match previous.map(|previous| previous.cmp(name)) {
                Some(std::cmp::Ordering::Equal) => Some(NarErrorKind::DuplicateEntry),
                Some(std::cmp::Ordering::Greater) => Some(NarErrorKind::UnsortedEntries),
                _ => None,
            },
        };
        kind.map_or(Ok(()), |kind| Err(self.error(kind)))
    }
}
