//! The NAR wire format shared by the writer and the parser: tokens, padding and limits.

use std::io::{self, Write};

/// The magic string a NAR starts with.
pub(super) const MAGIC: &str = "nix-archive-1";

/// The longest entry name accepted: Linux's `NAME_MAX`, so every accepted NAR can be unpacked.
pub const MAX_NAME_LEN: usize = 255;

/// The longest symlink target accepted: Linux's `PATH_MAX` less the terminating NUL.
pub const MAX_TARGET_LEN: usize = 4095;

/// The deepest directory nesting accepted. Far beyond real store paths; it bounds the parser's
/// memory on hostile input.
pub const MAX_DEPTH: usize = 1024;

/// Zero bytes that follow a string of `len` bytes.
pub(super) const fn padding_len(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// Writes one NAR string: length, bytes, padding.
pub(super) fn write_string(out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    let len = bytes.len() as u64;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(bytes)?;
    out.write_all(&[0u8; 8][..padding_len(len)])
}

/// Writes several NAR strings.
pub(super) fn write_tokens(out: &mut impl Write, tokens: &[&[u8]]) -> io::Result<()> {
    tokens.iter().try_for_each(|token| write_string(out, token))
}
