//! Ed25519 keys and signatures in Nix's text formats: `name:base64(seed ‖ public key)` secret
//! keys (as `nix-store --generate-binary-cache-key` writes them), `name:base64(public key)` public
//! keys, and `name:base64(signature)` signatures over a narinfo fingerprint.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signer as _, Verifier as _};
use error_context::{Classify, Severity};

/// Why a key or signature string cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// No `name:` prefix, or an empty name.
    #[error("expected name:base64, found no name")]
    MissingName,
    /// The part after the name is not base64.
    #[error("{0} is not valid base64")]
    Base64(&'static str),
    /// The decoded bytes have the wrong length.
    #[error("{what} must be {expected} bytes, found {found}")]
    Length {
        /// Key or signature.
        what: &'static str,
        /// Bytes needed.
        expected: usize,
        /// Bytes found.
        found: usize,
    },
    /// A secret key whose public half does not belong to its seed.
    #[error("the public half of secret key {0:?} does not match its seed")]
    MismatchedHalves(String),
    /// The operating system could not provide random bytes for a new key.
    #[error("the operating system provided no randomness for a new key")]
    NoRandomness,
    /// A public key that is not a valid curve point.
    #[error("public key {0:?} is not a valid ed25519 key")]
    InvalidPublicKey(String),
}

impl Classify for KeyError {
    fn severity(&self) -> Severity {
        Severity::Reject
    }
}

/// Splits `name:base64` and decodes the base64 into exactly `N` bytes.
fn split_decode<const N: usize>(
    text: &str,
    what: &'static str,
) -> Result<(String, [u8; N]), KeyError> {
    let (name, data) = text
        .split_once(':')
        .filter(|(name, _)| !name.is_empty())
        .ok_or(KeyError::MissingName)?;
    let bytes = BASE64
        .decode(data.trim())
        .map_err(|_| KeyError::Base64(what))?;
    let array = <[u8; N]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length {
        what,
        expected: N,
        found: bytes.len(),
    })?;
    Ok((name.to_owned(), array))
}

/// A named ed25519 secret key. Its `Debug` shows only the name, so it cannot leak into logs.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl SecretKey {
    /// Parses Nix's secret key format (surrounding whitespace, such as a file's final newline, is
    /// ignored).
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_decode::<64>(text.trim(), "secret key")?;
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&bytes[..32]);
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        if key.verifying_key().as_bytes()[..] != bytes[32..] {
            return Err(KeyError::MismatchedHalves(name));
        }
        Ok(Self { name, key })
    }

    /// A new key from the operating system's random number generator.
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        if name.is_empty() || name.contains(':') {
            return Err(KeyError::MissingName);
        }
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|_| KeyError::NoRandomness)?;
        Ok(Self::from_seed(name, &seed))
    }

    /// A key from a 32-byte seed.
    #[must_use]
    pub fn from_seed(name: &str, seed: &[u8; 32]) -> Self {
        Self {
            name: name.to_owned(),
            key: ed25519_dalek::SigningKey::from_bytes(seed),
        }
    }

    /// The key's name, such as `cache.example.org-1`.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The matching public key.
    #[must_use]
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Signs a fingerprint.
    #[must_use]
    pub fn sign(&self, fingerprint: &str) -> Signature {
        Signature {
            key_name: self.name.clone(),
            bytes: self.key.sign(fingerprint.as_bytes()).to_bytes(),
        }
    }

    /// The key in Nix's secret key file format. Named explicitly, not `Display`, so that it is
    /// never printed by accident.
    #[must_use]
    pub fn to_nix_format(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.to_keypair_bytes())
        )
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({:?})", self.name)
    }
}

/// A named ed25519 public key, as listed in `trusted-public-keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl PublicKey {
    /// Parses `name:base64`.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_decode::<32>(text.trim(), "public key")?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| KeyError::InvalidPublicKey(name.clone()))?;
        Ok(Self { name, key })
    }

    /// The key's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `signature` was made by this key (same name, valid signature) over `fingerprint`.
    #[must_use]
    pub fn verify(&self, fingerprint: &str, signature: &Signature) -> bool {
        signature.key_name == self.name
            && self
                .key
                .verify(
                    fingerprint.as_bytes(),
                    &ed25519_dalek::Signature::from_bytes(&signature.bytes),
                )
                .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

/// A signature with the name of the key that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    key_name: String,
    bytes: [u8; 64],
}

impl Signature {
    /// Parses `name:base64`.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let (key_name, bytes) = split_decode::<64>(text, "signature")?;
        Ok(Self { key_name, bytes })
    }

    /// The name of the key that made it.
    #[must_use]
    pub fn key_name(&self) -> &str {
        &self.key_name
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key_name, BASE64.encode(self.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_formats_round_trip() {
        let secret = SecretKey::from_seed("test-1", &[7u8; 32]);
        let public = secret.public_key();
        let signature = secret.sign("1;/nix/store/x");
        assert!(public.verify("1;/nix/store/x", &signature));
        assert!(!public.verify("1;/nix/store/y", &signature));
        let other = SecretKey::from_seed("test-1", &[8u8; 32]).public_key();
        assert!(!other.verify("1;/nix/store/x", &signature));
        let renamed =
            PublicKey::parse(&public.to_string().replacen("test-1", "test-2", 1)).unwrap();
        assert!(!renamed.verify("1;/nix/store/x", &signature));

        let reparsed = SecretKey::parse(&format!("{}\n", secret.to_nix_format())).unwrap();
        assert_eq!(reparsed.public_key(), public);
        assert_eq!(PublicKey::parse(&public.to_string()).unwrap(), public);
        assert_eq!(Signature::parse(&signature.to_string()).unwrap(), signature);
        assert_eq!(format!("{secret:?}"), "SecretKey(\"test-1\")");
    }

    #[test]
    fn malformed_keys_are_typed() {
        assert_eq!(SecretKey::parse("abc").unwrap_err(), KeyError::MissingName);
        assert_eq!(
            PublicKey::parse("k:!!!").unwrap_err(),
            KeyError::Base64("public key")
        );
        assert!(matches!(
            PublicKey::parse("k:AAAA").unwrap_err(),
            KeyError::Length {
                expected: 32,
                found: 3,
                ..
            }
        ));
        let mut pair = SecretKey::from_seed("k", &[1u8; 32]).key.to_keypair_bytes();
        pair[40] ^= 1;
        assert_eq!(
            SecretKey::parse(&format!("k:{}", BASE64.encode(pair))).unwrap_err(),
            KeyError::MismatchedHalves("k".to_owned())
        );
    }
}
