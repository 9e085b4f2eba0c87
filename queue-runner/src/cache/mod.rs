//! The runner's binary cache: a directory in Nix's `file://` layout (`nix-cache-info`,
//! `<hash>.narinfo`, `nar/<file hash>.nar.zst`), written only by [`BinaryCache::publish`] and
//! served over HTTP by [`http`].
//!
//! Publishing streams the NAR through the strict parser while compressing it to a temporary file,
//! so a NAR of any size needs constant memory and a malformed or cut one leaves nothing behind.
//! The NAR file is renamed into place first and the signed narinfo last, each atomically, and
//! only once every path it refers to is published: a client never sees a narinfo it cannot
//! substitute. Durability goes through [`durability::GroupSync`]: the NAR is on disk before its
//! narinfo appears, and the narinfo before [`BinaryCache::publish`] returns, with one flush of
//! the file system serving every concurrent publisher.

pub mod durability;
pub mod gc;
pub mod http;
pub mod marks;
pub mod upstream;

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use error_context::{Classify, Severity};
use nix_primitives::hash::{HashAlgorithm, Hasher};
use nix_primitives::nar::{self, NarError, NarVisitor};
use nix_primitives::narinfo::{NarInfo, NarInfoError};
use nix_primitives::signing::{PublicKey, SecretKey};
use nix_primitives::{ContentAddress, Hash, IngestionMethod, StorePath};

/// Why a path could not be published or read.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The cache directory failed.
    #[error("cache storage failed")]
    Io(#[source] io::Error),
    /// The NAR is malformed or was cut off.
    #[error("the NAR of {path} is invalid")]
    Nar {
        /// The path being published.
        path: StorePath,
        /// Why.
        #[source]
        source: NarError,
    },
    /// A reference that is not yet published.
    #[error("{path} refers to {reference}, which is not published")]
    ReferenceNotPublished {
        /// The path being published.
        path: StorePath,
        /// The missing reference.
        reference: StorePath,
    },
    /// Content that does not match a fixed-output derivation's hash.
    #[error("{path} has hash {actual}, but its derivation fixes {expected}")]
    FixedOutputMismatch {
        /// The path.
        path: StorePath,
        /// The hash the derivation fixes.
        expected: Box<Hash>,
        /// The hash of what was uploaded.
        actual: Box<Hash>,
    },
    /// A flat fixed output that is not a single regular file.
    #[error("{0} must be a single regular file (flat fixed output)")]
    NotAFlatFile(StorePath),
    /// The attempt uploading the path stopped running before it was published.
    #[error("the attempt uploading {0} is no longer running")]
    Withdrawn(StorePath),
    /// An uploaded source whose contents do not give its path under any content address.
    #[error("the contents uploaded for {0} do not hash to that path")]
    SourceMismatch(StorePath),
    /// A stored narinfo that cannot be read.
    #[error("a stored narinfo is invalid")]
    NarInfo(#[source] NarInfoError),
}

impl Classify for CacheError {
    fn severity(&self) -> Severity {
        match self {
            Self::Io(_) | Self::NarInfo(_) => Severity::Step,
            Self::Nar { source, .. } => source.severity(),
            Self::ReferenceNotPublished { .. }
            | Self::FixedOutputMismatch { .. }
            | Self::NotAFlatFile(_)
            | Self::SourceMismatch(_)
            | Self::Withdrawn(_) => Severity::Reject,
        }
    }
}

/// What is being published, besides its NAR.
#[derive(Debug, Clone)]
pub struct Publication {
    /// The store path.
    pub store_path: StorePath,
    /// The paths it refers to (it may refer to itself).
    pub references: BTreeSet<StorePath>,
    /// The derivation that built it.
    pub deriver: Option<StorePath>,
    /// References known to be in an upstream cache: they need not be published here.
    pub upstream_references: BTreeSet<StorePath>,
    /// Its content address, for `.drv` files and sources.
    pub content_address: Option<ContentAddress>,
    /// For a fixed-output derivation's output: how it is hashed and the hash it must have.
    pub fixed: Option<(IngestionMethod, Hash)>,
}

/// The cache directory and the key its narinfos are signed with.
#[derive(Debug)]
pub struct BinaryCache {
    directory: PathBuf,
    key: SecretKey,
    upstreams: upstream::Upstreams,
    sync: durability::GroupSync,
    marks: marks::SweepMarks,
}

/// A NAR in place and its signed narinfo written to a temporary file, not yet visible.
struct Staged {
    info: NarInfo,
    narinfo: PathBuf,
}

/// What staging a publication found.
enum Stage {
    /// The path was published already: its narinfo.
    Published(NarInfo),
    /// The NAR is in place; the narinfo waits to be revealed.
    Staged(Staged),
}

impl BinaryCache {
    /// Opens (creating if needed) a cache directory.
    pub fn open(
        directory: &Path,
        key: SecretKey,
        upstreams: upstream::Upstreams,
    ) -> Result<Self, CacheError> {
        fs_err::create_dir_all(directory.join("nar")).map_err(CacheError::Io)?;
        // Uploads cut off by a crash leave partial files here; nothing else uses them.
        let temporary = directory.join("tmp");
        if temporary.exists() {
            fs_err::remove_dir_all(&temporary).map_err(CacheError::Io)?;
        }
        fs_err::create_dir_all(&temporary).map_err(CacheError::Io)?;
        let info = directory.join("nix-cache-info");
        if !info.exists() {
            write_atomically(
                directory,
                &info,
                b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n",
            )?;
        }
        Ok(Self {
            sync: durability::GroupSync::open(directory).map_err(CacheError::Io)?,
            directory: directory.to_owned(),
            key,
            upstreams,
            marks: marks::SweepMarks::default(),
        })
    }

    /// The directory.
    #[must_use]
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// The key clients must trust.
    #[must_use]
    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    fn narinfo_file(&self, path: &StorePath) -> PathBuf {
        self.directory.join(format!("{}.narinfo", path.hash_part()))
    }

    /// What a running garbage collection must keep besides its roots.
    #[must_use]
    pub fn marks(&self) -> &marks::SweepMarks {
        &self.marks
    }

    /// Flushes the cache's file system: what was written or deleted is on disk.
    pub fn flush(&self) -> Result<(), CacheError> {
        self.sync.sync().map_err(CacheError::Io)
    }

    /// Whether `path` is published (a path found here is kept by a sweep running meanwhile).
    #[must_use]
    pub fn is_published(&self, path: &StorePath) -> bool {
        let file = self.narinfo_file(path);
        self.marks.lookup(path, || file.exists(), |found| *found)
    }

    /// The narinfo of a published path (kept by a sweep running meanwhile).
    pub fn narinfo(&self, path: &StorePath) -> Result<Option<NarInfo>, CacheError> {
        let file = self.narinfo_file(path);
        let read = self
            .marks
            .lookup(path, || fs_err::read_to_string(&file), Result::is_ok);
        match read {
            Ok(text) => NarInfo::parse(&text).map(Some).map_err(CacheError::NarInfo),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(CacheError::Io(error)),
        }
    }

    /// Whether `path` is here or, signed by its key, in an upstream cache.
    pub async fn is_available(&self, path: &StorePath) -> bool {
        self.is_published(path) || self.upstreams.has(path).await
    }

    /// The runtime closure of `roots` through the references of published paths, here or
    /// upstream; returns the closure and the part of it that only an upstream has.
    pub async fn closure_with_upstreams(
        &self,
        roots: &BTreeSet<StorePath>,
    ) -> Result<(BTreeSet<StorePath>, BTreeSet<StorePath>), CacheError> {
        let mut closure = BTreeSet::new();
        let mut upstream_only = BTreeSet::new();
        let mut pending: Vec<StorePath> = roots.iter().cloned().collect();
        while let Some(path) = pending.pop() {
            if !closure.insert(path.clone()) {
                continue;
            }
            let mut info = self.narinfo(&path)?;
            if info.is_none() {
                info = self.upstreams.narinfo(&path).await;
                if info.is_some() {
                    upstream_only.insert(path.clone());
                }
            }
            if let Some(info) = info {
                pending.extend(info.references.into_iter().filter(|r| !closure.contains(r)));
            }
        }
        Ok((closure, upstream_only))
    }

    /// Publishes a NAR read from `source` (blocking: call it from a blocking thread). If the path
    /// is already published, the NAR is still read and validated, and the stored narinfo is
    /// returned with `true`. `still_allowed` is asked once more just before anything becomes
    /// visible, so an upload whose attempt was taken away meanwhile publishes nothing.
    pub fn publish(
        &self,
        publication: &Publication,
        source: impl Read,
        still_allowed: &dyn Fn() -> bool,
    ) -> Result<(NarInfo, bool), CacheError> {
        match self.stage(publication, source, still_allowed)? {
            Stage::Published(existing) => Ok((existing, true)),
            Stage::Staged(staged) => {
                self.sync.sync().map_err(CacheError::Io)?;
                let revealed = self.reveal(staged);
                self.sync.sync().map_err(CacheError::Io)?;
                revealed
            }
        }
    }

    /// Validates and compresses the NAR, renames it into place and writes the signed narinfo
    /// to a temporary file. Nothing is flushed.
    fn stage(
        &self,
        publication: &Publication,
        source: impl Read,
        still_allowed: &dyn Fn() -> bool,
    ) -> Result<Stage, CacheError> {
        let path = &publication.store_path;
        if let Some(existing) = self.narinfo(path)? {
            nar::summarize(source).map_err(|source| CacheError::Nar {
                path: path.clone(),
                source,
            })?;
            return Ok(Stage::Published(existing));
        }
        for reference in &publication.references {
            if reference != path
                && !publication.upstream_references.contains(reference)
                && !self.is_published(reference)
            {
                return Err(CacheError::ReferenceNotPublished {
                    path: path.clone(),
                    reference: reference.clone(),
                });
            }
        }
        let temporary = self.temporary_file(path.hash_part());
        let result = Self::compress_and_check(publication, source, &temporary);
        if result.is_err() {
            let _ = fs_err::remove_file(&temporary);
        }
        let (summary, file_hash, file_size) = result?;
        if !still_allowed() {
            let _ = fs_err::remove_file(&temporary);
            return Err(CacheError::Withdrawn(path.clone()));
        }
        let url = format!("nar/{}.nar.zst", file_hash.to_nix_base32());
        let placed = self.marks.place(&url, || {
            fs_err::rename(&temporary, self.directory.join(&url))
        });
        if let Err(error) = placed {
            let _ = fs_err::remove_file(&temporary);
            return Err(CacheError::Io(error));
        }
        let mut info = NarInfo {
            store_path: path.clone(),
            url,
            compression: "zstd".to_owned(),
            file_hash: Some(file_hash),
            file_size: Some(file_size),
            nar_hash: summary.nar_hash,
            nar_size: summary.nar_size,
            references: publication.references.clone(),
            deriver: publication.deriver.clone(),
            system: None,
            signatures: Vec::new(),
            content_address: publication.content_address,
        };
        info.sign(&self.key);
        let narinfo = self.temporary_file(&format!("{}.narinfo", path.hash_part()));
        fs_err::write(&narinfo, info.to_string()).map_err(CacheError::Io)?;
        Ok(Stage::Staged(Staged { info, narinfo }))
    }

    /// Makes a staged narinfo visible, unless another publisher's already is (first writer
    /// wins: a narinfo, once visible, never changes under a client). The narinfo must have been
    /// flushed first. A rename that refuses to replace rather than a link and an unlink: every
    /// deleted inode slows the file system's next allocations for a while.
    fn reveal(&self, staged: Staged) -> Result<(NarInfo, bool), CacheError> {
        let target = self.narinfo_file(&staged.info.store_path);
        let renamed = rustix::fs::renameat_with(
            rustix::fs::CWD,
            &staged.narinfo,
            rustix::fs::CWD,
            &target,
            rustix::fs::RenameFlags::NOREPLACE,
        );
        match renamed {
            Ok(()) => return Ok((staged.info, false)),
            Err(rustix::io::Errno::EXIST) => {
                let _ = fs_err::remove_file(&staged.narinfo);
            }
            Err(error) => {
                let _ = fs_err::remove_file(&staged.narinfo);
                return Err(CacheError::Io(io::Error::from(error)));
            }
        }
        let existing = self.narinfo(&staged.info.store_path)?.ok_or_else(|| {
            CacheError::Io(io::Error::other(
                "a narinfo vanished while it was published",
            ))
        })?;
        Ok((existing, true))
    }

    fn temporary_file(&self, name: &str) -> PathBuf {
        self.directory
            .join("tmp")
            .join(format!("{name}.{}", uuid::Uuid::new_v4()))
    }

    /// Publishes an input source uploaded by a client, after recomputing its path from its
    /// contents: a `./path` source (recursive SHA-256), a `builtins.toFile` text with its
    /// references, or a flat file. Anything else is refused.
    pub fn publish_source(
        &self,
        path: &StorePath,
        references: BTreeSet<StorePath>,
        nar_bytes: &[u8],
    ) -> Result<(), CacheError> {
        if self.is_published(path) {
            return Ok(());
        }
        let mut file = RootFile::default();
        let summary = nar::parse(nar_bytes, &mut file).map_err(|source| CacheError::Nar {
            path: path.clone(),
            source,
        })?;
        let mut candidates = vec![ContentAddress::Fixed {
            method: IngestionMethod::Recursive,
            hash: summary.nar_hash,
        }];
        if let Some(contents) = &file.contents {
            let hash = Hash::sha256(contents);
            candidates.push(ContentAddress::Text(hash));
            candidates.push(ContentAddress::Fixed {
                method: IngestionMethod::Flat,
                hash,
            });
        }
        let content_address = candidates
            .into_iter()
            .find(|candidate| {
                candidate
                    .store_path(path.name(), &references, false)
                    .is_ok_and(|computed| computed == *path)
            })
            .ok_or_else(|| CacheError::SourceMismatch(path.clone()))?;
        let publication = Publication {
            store_path: path.clone(),
            references,
            upstream_references: BTreeSet::new(),
            deriver: None,
            content_address: Some(content_address),
            fixed: None,
        };
        self.publish(&publication, nar_bytes, &|| true).map(|_| ())
    }

    /// Streams the NAR through the parser into a zstd file; checks a fixed output's hash.
    fn compress_and_check(
        publication: &Publication,
        source: impl Read,
        temporary: &Path,
    ) -> Result<(nar::NarSummary, Hash, u64), CacheError> {
        let path = &publication.store_path;
        let file = fs_err::File::create(temporary).map_err(CacheError::Io)?;
        let counted = HashingWriter {
            inner: io::BufWriter::new(file),
            hasher: Hasher::new(HashAlgorithm::Sha256),
            written: 0,
        };
        let recursive_algorithm = match publication.fixed {
            Some((IngestionMethod::Recursive, hash)) => Some(hash.algorithm()),
            _ => None,
        };
        let (checked, mut counted) = crate::compression::compress(counted, |encoder| {
            let mut tee = TeeReader {
                source,
                sink: encoder,
                recursive: recursive_algorithm.map(Hasher::new),
                error: None,
            };
            let mut flat = FlatHasher::new(publication.fixed);
            let parsed = nar::parse(&mut tee, &mut flat);
            (parsed, tee.error, tee.recursive, flat)
        })
        .map_err(CacheError::Io)?;
        let (parsed, sink_error, recursive, flat) = checked;
        if let Some(error) = sink_error {
            return Err(CacheError::Io(error));
        }
        let summary = parsed.map_err(|source| CacheError::Nar {
            path: path.clone(),
            source,
        })?;
        if let Some((method, expected)) = publication.fixed {
            let actual = match method {
                IngestionMethod::Recursive => recursive.map(Hasher::finish),
                IngestionMethod::Flat => flat.finish(),
            }
            .ok_or_else(|| CacheError::NotAFlatFile(path.clone()))?;
            if actual != expected {
                return Err(CacheError::FixedOutputMismatch {
                    path: path.clone(),
                    expected: Box::new(expected),
                    actual: Box::new(actual),
                });
            }
        }
        counted.inner.flush().map_err(CacheError::Io)?;
        counted
            .inner
            .into_inner()
            .map_err(|error| CacheError::Io(error.into_error()))?;
        Ok((summary, counted.hasher.finish(), counted.written))
    }
}

/// Writes `contents` to `target` through a temporary file and a rename.
fn write_atomically(directory: &Path, target: &Path, contents: &[u8]) -> Result<(), CacheError> {
    let name = target
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = directory
        .join("tmp")
        .join(format!("{name}.{}", uuid::Uuid::new_v4()));
    let mut file = fs_err::File::create(&temporary).map_err(CacheError::Io)?;
    file.write_all(contents).map_err(CacheError::Io)?;
    file.sync_all().map_err(CacheError::Io)?;
    fs_err::rename(&temporary, target).map_err(CacheError::Io)
}

/// Passes every byte read on to a sink (the compressor) and an optional hasher.
struct TeeReader<R, W> {
    source: R,
    sink: W,
    recursive: Option<Hasher>,
    /// A sink failure, kept apart from source failures so it is reported as a storage error.
    error: Option<io::Error>,
}

impl<R: Read, W: Write> Read for TeeReader<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.source.read(buf)?;
        if let Err(error) = self.sink.write_all(&buf[..read]) {
            let kind = error.kind();
            self.error = Some(error);
            return Err(io::Error::new(kind, "the cache could not store the NAR"));
        }
        if let Some(hasher) = &mut self.recursive {
            hasher.update(&buf[..read]);
        }
        Ok(read)
    }
}

/// Counts and hashes what is written: the compressed file's `FileHash` and `FileSize`.
struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes the contents of a NAR whose root is a regular file: a flat fixed output's hash.
struct FlatHasher {
    hasher: Option<Hasher>,
    root_is_file: bool,
}

impl FlatHasher {
    fn new(fixed: Option<(IngestionMethod, Hash)>) -> Self {
        Self {
            hasher: match fixed {
                Some((IngestionMethod::Flat, hash)) => Some(Hasher::new(hash.algorithm())),
                _ => None,
            },
            root_is_file: false,
        }
    }

    fn finish(self) -> Option<Hash> {
        self.hasher
            .filter(|_| self.root_is_file)
            .map(Hasher::finish)
    }
}

impl NarVisitor for FlatHasher {
    fn file(&mut self, path: &[Vec<u8>], _executable: bool, _size: u64) -> io::Result<()> {
        self.root_is_file = path.is_empty();
        Ok(())
    }

    fn file_chunk(&mut self, chunk: &[u8]) -> io::Result<()> {
        if let (true, Some(hasher)) = (self.root_is_file, &mut self.hasher) {
            hasher.update(chunk);
        }
        Ok(())
    }
}

/// Collects the contents of a NAR whose root is a regular file (sources are small: they arrive
/// in one message).
#[derive(Default)]
struct RootFile {
    contents: Option<Vec<u8>>,
}

impl NarVisitor for RootFile {
    fn file(&mut self, path: &[Vec<u8>], _executable: bool, _size: u64) -> io::Result<()> {
        if path.is_empty() {
            self.contents = Some(Vec::new());
        }
        Ok(())
    }

    fn file_chunk(&mut self, chunk: &[u8]) -> io::Result<()> {
        if let Some(contents) = &mut self.contents {
            contents.extend_from_slice(chunk);
        }
        Ok(())
    }
}
