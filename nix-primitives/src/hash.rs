//! Cryptographic hashes as Nix names and prints them: `sha256:<base32>`, bare base16, SRI.

use std::fmt;
use std::io;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use error_context::{Classify, Severity};
use sha2::Digest as _;

use crate::base32;

/// A hash function Nix accepts for fixed-output derivations and content addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgorithm {
    /// MD5 (16 bytes): still accepted by Nix for old fixed-output derivations.
    Md5,
    /// SHA-1 (20 bytes).
    Sha1,
    /// SHA-256 (32 bytes): what store paths, NAR hashes and most fixed outputs use.
    Sha256,
    /// SHA-512 (64 bytes).
    Sha512,
}

impl HashAlgorithm {
    /// Every algorithm, for tests and error messages.
    pub const ALL: [Self; 4] = [Self::Md5, Self::Sha1, Self::Sha256, Self::Sha512];

    /// Nix's name for the algorithm.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Md5 => "md5",
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
        }
    }

    /// The digest length in bytes.
    #[must_use]
    pub const fn digest_len(self) -> usize {
        match self {
            Self::Md5 => 16,
            Self::Sha1 => 20,
            Self::Sha256 => 32,
            Self::Sha512 => 64,
        }
    }

    /// Looks an algorithm up by Nix's name.
    pub fn from_name(name: &str) -> Result<Self, HashError> {
        Self::ALL
            .into_iter()
            .find(|algorithm| algorithm.name() == name)
            .ok_or_else(|| HashError::UnknownAlgorithm(name.to_owned()))
    }
}

impl fmt::Display for HashAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a hash string cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    /// The algorithm name is not one Nix knows.
    #[error("unknown hash algorithm {0:?}")]
    UnknownAlgorithm(String),
    /// A typed hash without the `algorithm:` or SRI `algorithm-` prefix.
    #[error("hash {0:?} does not name its algorithm")]
    MissingAlgorithm(String),
    /// The digits are not base16, Nix base32 or base64 of the algorithm's length.
    #[error("{text:?} is not a {algorithm} hash in base16, base32 or base64")]
    Encoding {
        /// The algorithm the digits were read for.
        algorithm: HashAlgorithm,
        /// The text that failed.
        text: String,
    },
}

impl Classify for HashError {
    fn severity(&self) -> Severity {
        Severity::Reject
    }
}

/// A digest together with the algorithm that made it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hash {
    algorithm: HashAlgorithm,
    digest: [u8; 64],
}

impl Hash {
    /// Wraps a digest; `None` when its length does not match the algorithm.
    #[must_use]
    pub fn from_digest(algorithm: HashAlgorithm, digest: &[u8]) -> Option<Self> {
        (digest.len() == algorithm.digest_len()).then(|| {
            let mut bytes = [0u8; 64];
            bytes[..digest.len()].copy_from_slice(digest);
            Self {
                algorithm,
                digest: bytes,
            }
        })
    }

    /// Hashes `data` in one go.
    #[must_use]
    pub fn digest(algorithm: HashAlgorithm, data: &[u8]) -> Self {
        let mut hasher = Hasher::new(algorithm);
        hasher.update(data);
        hasher.finish()
    }

    /// SHA-256 of `data`, the most common case.
    #[must_use]
    pub fn sha256(data: &[u8]) -> Self {
        Self::digest(HashAlgorithm::Sha256, data)
    }

    /// The algorithm.
    #[must_use]
    pub const fn algorithm(&self) -> HashAlgorithm {
        self.algorithm
    }

    /// The raw digest bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.digest[..self.algorithm.digest_len()]
    }

    /// Lower-case base16 digits, without the algorithm.
    #[must_use]
    pub fn to_base16(&self) -> String {
        use fmt::Write as _;
        self.as_bytes().iter().fold(String::new(), |mut out, byte| {
            let _ = write!(out, "{byte:02x}");
            out
        })
    }

    /// Nix base32 digits, without the algorithm.
    #[must_use]
    pub fn to_nix_base32(&self) -> String {
        base32::encode(self.as_bytes())
    }

    /// `algorithm:base16`, the form that goes into store path computations.
    #[must_use]
    pub fn to_typed_base16(&self) -> String {
        format!("{}:{}", self.algorithm, self.to_base16())
    }

    /// `algorithm:base32`, the form narinfo files and `nix-store --query --hash` use. This is also
    /// what `Display` prints.
    #[must_use]
    pub fn to_typed_base32(&self) -> String {
        format!("{}:{}", self.algorithm, self.to_nix_base32())
    }

    /// `algorithm-base64`, the SRI form.
    #[must_use]
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algorithm, BASE64.encode(self.as_bytes()))
    }

    /// Parses `algorithm:digits` (base16, Nix base32 or base64) or SRI `algorithm-base64`.
    pub fn parse_typed(text: &str) -> Result<Self, HashError> {
        let (name, digits, sri) = match (text.split_once(':'), text.split_once('-')) {
            (Some((name, digits)), _) => (name, digits, false),
            (None, Some((name, digits))) => (name, digits, true),
            (None, None) => return Err(HashError::MissingAlgorithm(text.to_owned())),
        };
        let algorithm = HashAlgorithm::from_name(name)?;
        if sri {
            Self::parse_base64(algorithm, digits)
        } else {
            Self::parse_untyped(algorithm, digits)
        }
    }

    /// Parses digits of a known algorithm, telling base16, Nix base32 and base64 apart by length
    /// as Nix does.
    pub fn parse_untyped(algorithm: HashAlgorithm, digits: &str) -> Result<Self, HashError> {
        let len = algorithm.digest_len();
        let bad = || HashError::Encoding {
            algorithm,
            text: digits.to_owned(),
        };
        let digest = if digits.len() == 2 * len {
            decode_base16(digits).ok_or_else(bad)?
        } else if digits.len() == base32::encoded_len(len) {
            base32::decode(digits, len).map_err(|_| bad())?
        } else {
            return Self::parse_base64(algorithm, digits);
        };
        Self::from_digest(algorithm, &digest).ok_or_else(bad)
    }

    /// Parses lower-case base16 digits only: the one form Nix writes into derivations.
    pub fn parse_base16(algorithm: HashAlgorithm, digits: &str) -> Result<Self, HashError> {
        let bad = || HashError::Encoding {
            algorithm,
            text: digits.to_owned(),
        };
        if digits.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad());
        }
        let digest = decode_base16(digits).ok_or_else(bad)?;
        Self::from_digest(algorithm, &digest).ok_or_else(bad)
    }

    fn parse_base64(algorithm: HashAlgorithm, digits: &str) -> Result<Self, HashError> {
        let bad = || HashError::Encoding {
            algorithm,
            text: digits.to_owned(),
        };
        let digest = BASE64.decode(digits).map_err(|_| bad())?;
        Self::from_digest(algorithm, &digest).ok_or_else(bad)
    }

    /// Folds the digest to `len` bytes by XOR, as Nix does to make a store path's 20-byte hash part.
    #[must_use]
    pub fn compress(&self, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        for (i, byte) in self.as_bytes().iter().enumerate() {
            out[i % len] ^= byte;
        }
        out
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_typed_base32())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

fn decode_base16(digits: &str) -> Option<Vec<u8>> {
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .as_bytes()
        .chunks(2)
        .map(|pair| {
            let text = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(text, 16).ok()
        })
        .collect()
}

/// A streaming hasher for any [`HashAlgorithm`]; also an [`io::Write`] sink, so NARs can be hashed
/// while they are written or copied.
#[derive(Clone)]
pub enum Hasher {
    /// MD5 state.
    Md5(md5::Md5),
    /// SHA-1 state.
    Sha1(sha1::Sha1),
    /// SHA-256 state.
    Sha256(sha2::Sha256),
    /// SHA-512 state.
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// A fresh hasher.
    #[must_use]
    pub fn new(algorithm: HashAlgorithm) -> Self {
        match algorithm {
            HashAlgorithm::Md5 => Self::Md5(md5::Md5::new()),
            HashAlgorithm::Sha1 => Self::Sha1(sha1::Sha1::new()),
            HashAlgorithm::Sha256 => Self::Sha256(sha2::Sha256::new()),
            HashAlgorithm::Sha512 => Self::Sha512(sha2::Sha512::new()),
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Self::Md5(state) => state.update(data),
            Self::Sha1(state) => state.update(data),
            Self::Sha256(state) => state.update(data),
            Self::Sha512(state) => state.update(data),
        }
    }

    /// The final hash.
    #[must_use]
    pub fn finish(self) -> Hash {
        let (algorithm, digest) = match self {
            Self::Md5(state) => (HashAlgorithm::Md5, state.finalize().to_vec()),
            Self::Sha1(state) => (HashAlgorithm::Sha1, state.finalize().to_vec()),
            Self::Sha256(state) => (HashAlgorithm::Sha256, state.finalize().to_vec()),
            Self::Sha512(state) => (HashAlgorithm::Sha512, state.finalize().to_vec()),
        };
        let mut bytes = [0u8; 64];
        bytes[..digest.len()].copy_from_slice(&digest);
        Hash {
            algorithm,
            digest: bytes,
        }
    }
}

impl io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_sha256_in_every_form() {
        let hash = Hash::sha256(b"");
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(hash.to_base16(), hex);
        assert_eq!(
            hash.to_typed_base32(),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(
            hash.to_sri(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        for form in [
            format!("sha256:{hex}"),
            hash.to_typed_base32(),
            hash.to_sri(),
            format!("sha256:{}", BASE64.encode(hash.as_bytes())),
        ] {
            assert_eq!(Hash::parse_typed(&form).unwrap(), hash, "{form}");
        }
    }

    #[test]
    fn parse_errors_are_typed() {
        assert_eq!(
            Hash::parse_typed("sha3:00"),
            Err(HashError::UnknownAlgorithm("sha3".to_owned()))
        );
        assert!(matches!(
            Hash::parse_typed("abc"),
            Err(HashError::MissingAlgorithm(_))
        ));
        assert!(matches!(
            Hash::parse_typed("sha256:xyz"),
            Err(HashError::Encoding { .. })
        ));
        let upper = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855";
        assert!(Hash::parse_base16(HashAlgorithm::Sha256, upper).is_err());
    }

    #[test]
    fn compress_xors_wraparound() {
        let hash = Hash::from_digest(HashAlgorithm::Sha1, &[1u8; 20]).unwrap();
        assert_eq!(hash.compress(10), vec![0u8; 10]);
        assert_eq!(hash.compress(20), vec![1u8; 20]);
    }
}
