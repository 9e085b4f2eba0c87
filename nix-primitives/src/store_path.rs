//! Store paths: `/nix/store/<32 base32 digits>-<name>`, validated with Nix 2.8's rules.

use std::fmt;

use error_context::{Classify, Severity};

use crate::base32;

/// The one store directory drover supports. Output paths depend on it, so a farm cannot mix store
/// directories anyway.
pub const STORE_DIR: &str = "/nix/store";

/// Bytes in a store path's hash part.
pub const HASH_BYTES: usize = 20;

/// Base32 characters in a store path's hash part.
pub const HASH_CHARS: usize = base32::encoded_len(HASH_BYTES);

/// The longest name Nix accepts after the hash part.
pub const MAX_NAME_LEN: usize = 211;

/// Why a string is not a store path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    /// The path is not directly inside [`STORE_DIR`].
    #[error("{0:?} is not directly inside {STORE_DIR}")]
    NotInStore(String),
    /// The base name is too short to hold a hash part and a name.
    #[error("store path base name {0:?} is too short")]
    TooShort(String),
    /// The hash part is not base32.
    #[error("store path base name {base_name:?} has an invalid hash part")]
    HashPart {
        /// The base name.
        base_name: String,
        /// What is wrong with the hash part.
        #[source]
        source: base32::Base32Error,
    },
    /// No `-` between hash part and name.
    #[error("store path base name {0:?} has no '-' after its hash part")]
    MissingDash(String),
    /// The name is empty.
    #[error("store path name is empty")]
    EmptyName,
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("store path name {name:?} is {len} characters long; the limit is {MAX_NAME_LEN}")]
    NameTooLong {
        /// The name.
        name: String,
        /// Its length.
        len: usize,
    },
    /// The name contains a character Nix does not allow.
    #[error("store path name {name:?} contains the illegal character {character:?}")]
    IllegalCharacter {
        /// The name.
        name: String,
        /// The first illegal character.
        character: char,
    },
}

impl Classify for StorePathError {
    fn severity(&self) -> Severity {
        Severity::Reject
    }
}

/// A valid store path. Ordered like Nix orders `StorePathSet`s (by base name), which is also the
/// order of their absolute forms.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    base_name: String,
}

impl StorePath {
    /// Parses `/nix/store/<hash>-<name>`.
    pub fn from_absolute(path: &str) -> Result<Self, StorePathError> {
        let base_name = path
            .strip_prefix(STORE_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|rest| !rest.contains('/'))
            .ok_or_else(|| StorePathError::NotInStore(path.to_owned()))?;
        Self::from_base_name(base_name)
    }

    /// Parses `<hash>-<name>`, the form narinfo `References` and `Deriver` use.
    pub fn from_base_name(base_name: &str) -> Result<Self, StorePathError> {
        let (Some(hash), Some(rest)) = (
            base_name.get(..HASH_CHARS),
            base_name.get(HASH_CHARS..).filter(|rest| !rest.is_empty()),
        ) else {
            return Err(StorePathError::TooShort(base_name.to_owned()));
        };
        base32::decode(hash, HASH_BYTES).map_err(|source| StorePathError::HashPart {
            base_name: base_name.to_owned(),
            source,
        })?;
        let name = rest
            .strip_prefix('-')
            .ok_or_else(|| StorePathError::MissingDash(base_name.to_owned()))?;
        validate_name(name)?;
        Ok(Self {
            base_name: base_name.to_owned(),
        })
    }

    /// Builds a store path from a 20-byte hash and a name.
    pub fn from_hash_and_name(hash: &[u8; HASH_BYTES], name: &str) -> Result<Self, StorePathError> {
        validate_name(name)?;
        Ok(Self {
            base_name: format!("{}-{name}", base32::encode(hash)),
        })
    }

    /// `<hash>-<name>`.
    #[must_use]
    pub fn base_name(&self) -> &str {
        &self.base_name
    }

    /// The 32 base32 characters of the hash part.
    #[must_use]
    pub fn hash_part(&self) -> &str {
        &self.base_name[..HASH_CHARS]
    }

    /// The name after the hash part.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.base_name[HASH_CHARS + 1..]
    }

    /// `/nix/store/<hash>-<name>`.
    #[must_use]
    pub fn to_absolute(&self) -> String {
        format!("{STORE_DIR}/{}", self.base_name)
    }

    /// Whether this is a derivation (its name ends in `.drv`).
    #[must_use]
    #[expect(
        clippy::case_sensitive_file_extension_comparisons,
        reason = "Nix recognises derivations by the exact suffix .drv"
    )]
    pub fn is_derivation(&self) -> bool {
        self.name().ends_with(".drv")
    }

    /// For a derivation path, its name without `.drv`: the name its outputs are derived from.
    #[must_use]
    pub fn derivation_name(&self) -> Option<&str> {
        self.name().strip_suffix(".drv")
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}", self.base_name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.base_name)
    }
}

/// Checks a store path name with Nix 2.8's rules: 1 to 211 characters from
/// `[A-Za-z0-9+-._?=]`.
pub fn validate_name(name: &str) -> Result<(), StorePathError> {
    if name.is_empty() {
        return Err(StorePathError::EmptyName);
    }
    if let Some(character) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "+-._?=".contains(*c)))
    {
        return Err(StorePathError::IllegalCharacter {
            name: name.to_owned(),
            character,
        });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong {
            name: name.to_owned(),
            len: name.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/nix/store/wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm-a";

    #[test]
    fn parses_and_prints() {
        let path = StorePath::from_absolute(PATH).unwrap();
        assert_eq!(path.hash_part(), "wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm");
        assert_eq!(path.name(), "a");
        assert_eq!(path.to_string(), PATH);
        assert_eq!(path.to_absolute(), PATH);
        assert!(!path.is_derivation());
    }

    #[test]
    fn rejects_each_malformation_with_its_variant() {
        type Expectation = fn(&StorePathError) -> bool;
        let cases: [(&str, Expectation); 8] = [
            ("/nix/store", |e| matches!(e, StorePathError::NotInStore(_))),
            ("/nix/storex/abc", |e| {
                matches!(e, StorePathError::NotInStore(_))
            }),
            ("/nix/store/wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm-a/bin", |e| {
                matches!(e, StorePathError::NotInStore(_))
            }),
            ("/nix/store/wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm", |e| {
                matches!(e, StorePathError::TooShort(_))
            }),
            ("/nix/store/ed0ys9snp82b5v5j4pgp5wfhnfjhl2vm-a", |e| {
                matches!(e, StorePathError::HashPart { .. })
            }),
            ("/nix/store/wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm_a", |e| {
                matches!(e, StorePathError::MissingDash(_))
            }),
            ("/nix/store/wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm-", |e| {
                matches!(e, StorePathError::EmptyName)
            }),
            ("/nix/store/wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm-a b", |e| {
                matches!(e, StorePathError::IllegalCharacter { character: ' ', .. })
            }),
        ];
        for (input, expected) in cases {
            let error = StorePath::from_absolute(input).unwrap_err();
            assert!(expected(&error), "{input}: {error:?}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(
            validate_name(&long),
            Err(StorePathError::NameTooLong { len: 212, .. })
        ));
        assert!(validate_name(&long[1..]).is_ok());
    }
}
