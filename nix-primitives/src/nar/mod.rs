//! NAR, the Nix ARchive: the canonical serialisation of a store path that its NAR hash is
//! computed over.
//!
//! A NAR is a sequence of strings, each a little-endian `u64` length, the bytes, and zero padding
//! to a multiple of 8:
//!
//! ```text
//! nar       = "nix-archive-1" node
//! node      = "(" "type" ( regular | symlink | directory ) ")"
//! regular   = "regular" [ "executable" "" ] "contents" <bytes>
//! symlink   = "symlink" "target" <bytes>
//! directory = "directory" { "entry" "(" "name" <name> "node" node ")" }
//! ```
//!
//! [`dump`] writes one from a directory tree; [`parse`] reads one as a stream, strictly (entries
//! sorted and unique, names that cannot escape a directory, zero padding, nothing after the end),
//! and [`unpack`] recreates the tree without following a symlink or leaving the target directory.

mod dump;
mod format;
mod parse;
mod unpack;

pub use dump::{DumpError, dump, write_file_nar};
pub use format::{MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN};
pub use parse::{NarError, NarErrorKind, NarSummary, NarVisitor, parse, read_one, summarize};
pub use unpack::unpack;
