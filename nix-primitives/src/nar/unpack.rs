//! Recreating a tree from a NAR without ever following a symlink or leaving the target.
//!
//! Safety comes from two rules: the parser has already refused every entry name that could
//! traverse (`.`, `..`, `/`, NUL, empty), and every file, directory and symlink is created fresh
//! (`O_EXCL` semantics), so nothing is written through a path that existed before, including a
//! symlink the NAR itself created.

use std::ffi::OsStr;
use std::io::{self, Read, Write as _};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::DirBuilderExt as _;

use fs_err::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use super::parse::{NarError, NarSummary, NarVisitor, parse};

/// Unpacks the NAR read from `source` at `target`, which must not exist yet. Files get mode 0666
/// (0777 if executable) and directories 0777, both less the process umask, as Nix does before it
/// makes a store path read-only.
pub fn unpack(source: impl Read, target: &Path) -> Result<NarSummary, NarError> {
    let mut unpacker = Unpacker {
        target: target.to_owned(),
        file: None,
    };
    parse(source, &mut unpacker)
}

struct Unpacker {
    target: PathBuf,
    /// The regular file whose contents are arriving.
    file: Option<fs_err::File>,
}

impl Unpacker {
    fn path(&self, path: &[Vec<u8>]) -> PathBuf {
        path.iter().fold(self.target.clone(), |full, name| {
            full.join(OsStr::from_bytes(name))
        })
    }
}

impl NarVisitor for Unpacker {
    fn directory(&mut self, path: &[Vec<u8>]) -> io::Result<()> {
        self.file = None;
        let full = self.path(path);
        std::fs::DirBuilder::new()
            .mode(0o777)
            .create(&full)
            .map_err(|error| named(&error, &full))
    }

    fn file(&mut self, path: &[Vec<u8>], executable: bool, _size: u64) -> io::Result<()> {
        let full = self.path(path);
        let mut options = fs_err::OpenOptions::new();
        options
            .write(true)
            .create_new(true)
            .mode(if executable { 0o777 } else { 0o666 });
        self.file = Some(options.open(&full)?);
        Ok(())
    }

    fn file_chunk(&mut self, chunk: &[u8]) -> io::Result<()> {
        match &mut self.file {
            Some(file) => file.write_all(chunk),
            None => Err(io::Error::other("file contents outside a file")),
        }
    }

    fn symlink(&mut self, path: &[Vec<u8>], target: &[u8]) -> io::Result<()> {
        self.file = None;
        let full = self.path(path);
        std::os::unix::fs::symlink(OsStr::from_bytes(target), &full)
            .map_err(|error| named(&error, &full))
    }
}

/// Adds the path to an error from a `std` call that does not name it.
fn named(error: &io::Error, path: &Path) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}
