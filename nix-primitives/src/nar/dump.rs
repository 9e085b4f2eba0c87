//! Serialising a file, symlink or directory tree into a NAR, streaming file contents.

use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use error_context::{Classify, Severity};

use super::format::{MAGIC, padding_len, write_string, write_tokens};

/// Why a path could not be serialised.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// Reading the tree failed; the error names the path.
    #[error("reading the tree to serialise")]
    Read(#[source] io::Error),
    /// Writing the NAR failed.
    #[error("writing the NAR")]
    Write(#[source] io::Error),
    /// A socket, device or FIFO: NAR has no representation for it.
    #[error("{0} is neither a regular file, a directory nor a symlink")]
    UnsupportedFileType(PathBuf),
    /// A file changed size while it was being read.
    #[error("{0} changed size while it was being serialised")]
    FileChanged(PathBuf),
}

impl Classify for DumpError {
    fn severity(&self) -> Severity {
        match self {
            Self::Read(_) | Self::Write(_) | Self::FileChanged(_) => Severity::Step,
            Self::UnsupportedFileType(_) => Severity::Reject,
        }
    }
}

/// Writes the NAR of `path` to `out` (unbuffered writes of small tokens: pass a buffered writer
/// or a hasher). Returns the number of bytes written.
pub fn dump(path: &Path, out: &mut impl Write) -> Result<u64, DumpError> {
    let mut counting = CountingWriter {
        inner: out,
        count: 0,
    };
    write_string(&mut counting, MAGIC.as_bytes()).map_err(DumpError::Write)?;
    dump_node(path, &mut counting)?;
    Ok(counting.count)
}

/// Writes the NAR of a single regular file with `contents`: how `.drv` files and other text
/// paths are served from a binary cache.
pub fn write_file_nar(contents: &[u8], executable: bool, out: &mut impl Write) -> io::Result<()> {
    write_string(out, MAGIC.as_bytes())?;
    write_tokens(out, &[b"(", b"type", b"regular"])?;
    if executable {
        write_tokens(out, &[b"executable", b""])?;
    }
    write_tokens(out, &[b"contents", contents, b")"])
}

fn dump_node(path: &Path, out: &mut impl Write) -> Result<(), DumpError> {
    let metadata = fs_err::symlink_metadata(path).map_err(DumpError::Read)?;
    let file_type = metadata.file_type();
    write_tokens(out, &[b"(", b"type"]).map_err(DumpError::Write)?;
    if file_type.is_file() {
        let executable = metadata.permissions().mode() & 0o100 != 0;
        let tokens: &[&[u8]] = if executable {
            &[b"regular", b"executable", b"", b"contents"]
        } else {
            &[b"regular", b"contents"]
        };
        write_tokens(out, tokens).map_err(DumpError::Write)?;
        dump_contents(path, metadata.len(), out)?;
    } else if file_type.is_symlink() {
        let target = fs_err::read_link(path).map_err(DumpError::Read)?;
        write_tokens(out, &[b"symlink", b"target", target.as_os_str().as_bytes()])
            .map_err(DumpError::Write)?;
    } else if file_type.is_dir() {
        write_string(out, b"directory").map_err(DumpError::Write)?;
        let mut entries = fs_err::read_dir(path)
            .map_err(DumpError::Read)?
            .map(|entry| entry.map(|entry| entry.file_name()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(DumpError::Read)?;
        entries.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in entries {
            write_tokens(out, &[b"entry", b"(", b"name", name.as_bytes(), b"node"])
                .map_err(DumpError::Write)?;
            dump_node(&path.join(&name), out)?;
            write_string(out, b")").map_err(DumpError::Write)?;
        }
    } else {
        return Err(DumpError::UnsupportedFileType(path.to_owned()));
    }
    write_string(out, b")").map_err(DumpError::Write)
}

/// Streams a file's contents as one NAR string of the size `stat` reported.
fn dump_contents(path: &Path, len: u64, out: &mut impl Write) -> Result<(), DumpError> {
    out.write_all(&len.to_le_bytes())
        .map_err(DumpError::Write)?;
    let file = fs_err::File::open(path).map_err(DumpError::Read)?;
    let mut limited = file.take(len);
    let mut buffer = vec![0u8; 256 * 1024];
    let mut copied = 0u64;
    loop {
        let read = limited.read(&mut buffer).map_err(DumpError::Read)?;
        if read == 0 {
            break;
        }
        out.write_all(&buffer[..read]).map_err(DumpError::Write)?;
        copied += read as u64;
    }
    let mut probe = [0u8; 1];
    let grown = limited
        .into_inner()
        .read(&mut probe)
        .map_err(DumpError::Read)?
        > 0;
    if copied != len || grown {
        return Err(DumpError::FileChanged(path.to_owned()));
    }
    out.write_all(&[0u8; 8][..padding_len(len)])
        .map_err(DumpError::Write)
}

/// Counts the bytes that pass through.
struct CountingWriter<'a, W> {
    inner: &'a mut W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.count += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
