//! The framing of Nix's serve protocol: every integer a little-endian `u64`; every string (bytes,
//! not necessarily UTF-8) its length, the bytes, then zero padding to a multiple of eight; every
//! list its length, then its items. Reads are bounded, so a desynchronised stream that reads
//! file contents as a length fails instead of allocating gigabytes.

use std::io::{self, BufRead, Write};

/// The longest string this client accepts from Nix: store paths, hashes, error messages and the
/// realisation JSON of an output are all far shorter.
pub const MAX_STRING_BYTES: u64 = 1 << 20;

/// The longest list this client accepts: the most paths one reply names.
pub const MAX_LIST_LEN: u64 = 1 << 20;

/// Writes an integer.
pub fn write_u64(writer: &mut impl Write, value: u64) -> io::Result<()> {
    writer.write_all(&value.to_le_bytes())
}

/// Writes a string.
pub fn write_bytes(writer: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    write_u64(writer, bytes.len() as u64)?;
    writer.write_all(bytes)?;
    writer.write_all(&[0; 8][..padding(bytes.len() as u64)])
}

/// Writes a list of strings.
pub fn write_list<'a>(
    writer: &mut impl Write,
    items: impl ExactSizeIterator<Item = &'a [u8]>,
) -> io::Result<()> {
    write_u64(writer, items.len() as u64)?;
    for item in items {
        write_bytes(writer, item)?;
    }
    Ok(())
}

/// Reads an integer.
pub fn read_u64(reader: &mut impl BufRead) -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    reader.read_exact(&mut bytes)?;
    Ok(u64::from_le_bytes(bytes))
}

/// Reads a string of at most [`MAX_STRING_BYTES`].
pub fn read_bytes(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let len = read_u64(reader)?;
    if len > MAX_STRING_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a string of {len} bytes, over the {MAX_STRING_BYTES} this client accepts"),
        ));
    }
    let mut bytes = vec![0u8; usize::try_from(len).unwrap_or_default()];
    reader.read_exact(&mut bytes)?;
    let mut pad = [0u8; 8];
    let pad = &mut pad[..padding(len)];
    reader.read_exact(pad)?;
    if pad.iter().any(|byte| *byte != 0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a string's padding is not zero",
        ));
    }
    Ok(bytes)
}

/// Reads a UTF-8 string (paths, hashes, messages).
pub fn read_string(reader: &mut impl BufRead) -> io::Result<String> {
    String::from_utf8(read_bytes(reader)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a string is not UTF-8"))
}

/// Reads a list of UTF-8 strings.
pub fn read_strings(reader: &mut impl BufRead) -> io::Result<Vec<String>> {
    let len = read_u64(reader)?;
    if len > MAX_LIST_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a list of {len} items, over the {MAX_LIST_LEN} this client accepts"),
        ));
    }
    (0..len).map(|_| read_string(reader)).collect()
}

fn padding(len: u64) -> usize {
    usize::try_from((8 - len % 8) % 8).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_padded_to_eight_and_read_back() {
        let mut wire = Vec::new();
        write_bytes(&mut wire, b"hello").unwrap();
        write_list(
            &mut wire,
            [b"a".as_slice(), b"12345678".as_slice()].into_iter(),
        )
        .unwrap();
        assert_eq!(&wire[..16], b"\x05\0\0\0\0\0\0\0hello\0\0\0");
        let mut reader = wire.as_slice();
        assert_eq!(read_string(&mut reader).unwrap(), "hello");
        assert_eq!(read_strings(&mut reader).unwrap(), ["a", "12345678"]);
        assert!(reader.is_empty());
    }

    #[test]
    fn a_desynchronised_stream_fails_instead_of_allocating() {
        let mut wire = Vec::new();
        write_u64(&mut wire, u64::MAX).unwrap();
        let error = read_bytes(&mut wire.as_slice()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        let error = read_strings(&mut wire.as_slice()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        let mut bad_padding = b"\x01\0\0\0\0\0\0\0x\x01\0\0\0\0\0\0".to_vec();
        assert_eq!(
            read_bytes(&mut bad_padding.as_slice()).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        bad_padding.truncate(12);
        assert_eq!(
            read_bytes(&mut bad_padding.as_slice()).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
