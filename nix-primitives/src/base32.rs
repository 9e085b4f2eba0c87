//! Nix's base32: the alphabet and bit order used in store path hash parts and `sha256:…` hashes.
//!
//! It is not RFC 4648: the alphabet drops `e`, `o`, `u` and `t`, and the string is written from the
//! last 5-bit group of the input to the first, so it cannot be replaced by a generic base32 crate.

use error_context::{Classify, Severity};

/// The 32 digits, in value order.
const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a string is not Nix base32 for the expected number of bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Base32Error {
    /// The string has the wrong number of characters for the expected byte length.
    #[error("expected {expected} base32 characters, found {found}")]
    Length {
        /// Characters needed.
        expected: usize,
        /// Characters given.
        found: usize,
    },
    /// A character outside the alphabet.
    #[error("invalid base32 character {character:?}")]
    Character {
        /// The offending character.
        character: char,
    },
    /// The first character carries bits beyond the decoded length.
    #[error("base32 string has bits set beyond its byte length")]
    Overflow,
}

impl Classify for Base32Error {
    fn severity(&self) -> Severity {
        Severity::Reject
    }
}

/// The number of characters that encode `byte_len` bytes.
#[must_use]
pub const fn encoded_len(byte_len: usize) -> usize {
    if byte_len == 0 {
        0
    } else {
        (byte_len * 8 - 1) / 5 + 1
    }
}

/// Encodes bytes as Nix base32.
#[must_use]
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let bit = n * 5;
        let (byte, shift) = (bit / 8, bit % 8);
        let low = u32::from(bytes[byte]) >> shift;
        let high = bytes
            .get(byte + 1)
            .map_or(0, |next| u32::from(*next) << (8 - shift));
        out.push(char::from(ALPHABET[((low | high) & 0x1f) as usize]));
    }
    out
}

/// Decodes a Nix base32 string that must encode exactly `byte_len` bytes.
pub fn decode(text: &str, byte_len: usize) -> Result<Vec<u8>, Base32Error> {
    let expected = encoded_len(byte_len);
    if text.len() != expected {
        return Err(Base32Error::Length {
            expected,
            found: text.chars().count(),
        });
    }
    let mut bytes = vec![0u8; byte_len];
    for (n, character) in text.bytes().rev().enumerate() {
        let digit = digit_value(character).ok_or(Base32Error::Character {
            character: char::from(character),
        })?;
        let bit = n * 5;
        let (byte, shift) = (bit / 8, bit % 8);
        let digit = u16::from(digit) << shift;
        let [low, high] = digit.to_le_bytes();
        bytes[byte] |= low;
        match bytes.get_mut(byte + 1) {
            Some(next) => *next |= high,
            None if high != 0 => return Err(Base32Error::Overflow),
            None => {}
        }
    }
    Ok(bytes)
}

/// Marks a byte of [`DIGIT_VALUES`] that is not a digit.
const NOT_A_DIGIT: u8 = u8::MAX;

/// Each byte's digit value, or [`NOT_A_DIGIT`]: decoding is on ingest's path, once per store path
/// of every derivation.
const DIGIT_VALUES: [u8; 256] = {
    let mut values = [NOT_A_DIGIT; 256];
    let mut digit: u8 = 0;
    while (digit as usize) < ALPHABET.len() {
        values[ALPHABET[digit as usize] as usize] = digit;
        digit += 1;
    }
    values
};

/// The value of one base32 digit, if it is one.
fn digit_value(character: u8) -> Option<u8> {
    let value = DIGIT_VALUES[usize::from(character)];
    (value != NOT_A_DIGIT).then_some(value)
}

/// Whether `character` is a Nix base32 digit.
#[must_use]
pub fn is_digit(character: u8) -> bool {
    digit_value(character).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0x1f]), "0z");
        assert_eq!(encode(&[0xff; 20]), "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz");
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(64), 103);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            decode("abc", 20),
            Err(Base32Error::Length {
                expected: 32,
                found: 3
            })
        );
        assert_eq!(
            decode("e0", 1),
            Err(Base32Error::Character { character: 'e' })
        );
        assert_eq!(decode("z0", 1), Err(Base32Error::Overflow));
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let text = encode(&bytes);
            prop_assert_eq!(decode(&text, bytes.len()).unwrap(), bytes);
        }
    }
}
