//! How Nix turns hashes into store paths: `makeStorePath` and the text, fixed-output, source and
//! derivation-output cases built on it, plus the `CA:` field of narinfo files.

use std::collections::BTreeSet;
use std::fmt;

use error_context::{Classify, Severity};

use crate::hash::{Hash, HashAlgorithm, HashError};
use crate::store_path::{HASH_BYTES, STORE_DIR, StorePath, StorePathError};

/// How the bytes of a fixed-output path were hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IngestionMethod {
    /// The hash of a single regular file's contents.
    Flat,
    /// The hash of the path's NAR serialisation (written `r:` in derivations).
    Recursive,
}

impl IngestionMethod {
    /// The prefix that precedes the algorithm name in derivations and `CA:` fields.
    #[must_use]
    pub const fn prefix(self) -> &'static str {
        match self {
            Self::Flat => "",
            Self::Recursive => "r:",
        }
    }
}

/// The store path `type:hash:storedir:name` hashes to, as Nix's `makeStorePath`.
pub fn make_store_path(
    path_type: &str,
    hash: &Hash,
    name: &str,
) -> Result<StorePath, StorePathError> {
    let fingerprint = format!("{path_type}:{}:{STORE_DIR}:{name}", hash.to_typed_base16());
    let compressed = Hash::sha256(fingerprint.as_bytes()).compress(HASH_BYTES);
    let mut hash_part = [0u8; HASH_BYTES];
    hash_part.copy_from_slice(&compressed);
    StorePath::from_hash_and_name(&hash_part, name)
}

/// `prefix` followed by `:<reference>` for each reference in order and `:self` if the path refers
/// to itself: the path type of content-addressed paths with references.
fn type_with_references<'a>(
    prefix: &str,
    references: impl IntoIterator<Item = &'a StorePath>,
    self_reference: bool,
) -> String {
    let mut path_type = prefix.to_owned();
    for reference in references {
        path_type.push(':');
        path_type.push_str(&reference.to_absolute());
    }
    if self_reference {
        path_type.push_str(":self");
    }
    path_type
}

/// The path of a text file added with known references: `builtins.toFile` results and `.drv` files
/// (whose references are their input sources and input derivations).
pub fn text_path(
    name: &str,
    contents: &[u8],
    references: &BTreeSet<StorePath>,
) -> Result<StorePath, StorePathError> {
    text_path_from_hash(name, &Hash::sha256(contents), references)
}

fn text_path_from_hash(
    name: &str,
    hash: &Hash,
    references: &BTreeSet<StorePath>,
) -> Result<StorePath, StorePathError> {
    make_store_path(&type_with_references("text", references, false), hash, name)
}

/// The path of fixed-output content: a fixed-output derivation's output, or a source added to the
/// store (`./file` in a Nix expression is recursive SHA-256 with no references).
pub fn fixed_output_path(
    name: &str,
    method: IngestionMethod,
    hash: &Hash,
    references: &BTreeSet<StorePath>,
    self_reference: bool,
) -> Result<StorePath, StorePathError> {
    if method == IngestionMethod::Recursive && hash.algorithm() == HashAlgorithm::Sha256 {
        let path_type = type_with_references("source", references, self_reference);
        make_store_path(&path_type, hash, name)
    } else {
        let inner = format!("fixed:out:{}{}:", method.prefix(), hash.to_typed_base16());
        make_store_path("output:out", &Hash::sha256(inner.as_bytes()), name)
    }
}

/// The name of a derivation output's path: the derivation name, plus `-<output>` unless the output
/// is `out`.
#[must_use]
pub fn output_path_name(derivation_name: &str, output_name: &str) -> String {
    if output_name == "out" {
        derivation_name.to_owned()
    } else {
        format!("{derivation_name}-{output_name}")
    }
}

/// The path of an input-addressed derivation output, from the derivation's hash modulo.
pub fn output_path(
    derivation_name: &str,
    output_name: &str,
    hash_modulo: &Hash,
) -> Result<StorePath, StorePathError> {
    make_store_path(
        &format!("output:{output_name}"),
        hash_modulo,
        &output_path_name(derivation_name, output_name),
    )
}

/// Why a `CA:` field cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentAddressError {
    /// Neither `text:` nor `fixed:`.
    #[error("content address {0:?} is neither text: nor fixed:")]
    UnknownKind(String),
    /// A text content address must use SHA-256.
    #[error("text content address {0:?} does not use sha256")]
    TextNotSha256(String),
    /// The hash part is bad.
    #[error("content address {text:?} has a bad hash")]
    Hash {
        /// The whole field.
        text: String,
        /// What is wrong with its hash.
        #[source]
        source: HashError,
    },
}

impl Classify for ContentAddressError {
    fn severity(&self) -> Severity {
        Severity::Reject
    }
}

/// A narinfo `CA:` field: how a path's contents determine its name, which lets Nix accept the path
/// without a trusted signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentAddress {
    /// `text:sha256:…`: a text file such as a `.drv`, hashed flat.
    Text(Hash),
    /// `fixed:[r:]algo:…`: fixed-output content.
    Fixed {
        /// How the content was hashed.
        method: IngestionMethod,
        /// The content hash.
        hash: Hash,
    },
}

impl ContentAddress {
    /// Parses a `CA:` field.
    pub fn parse(text: &str) -> Result<Self, ContentAddressError> {
        let hash = |digits: &str| {
            Hash::parse_typed(digits).map_err(|source| ContentAddressError::Hash {
                text: text.to_owned(),
                source,
            })
        };
        if let Some(rest) = text.strip_prefix("text:") {
            let hash = hash(rest)?;
            if hash.algorithm() != HashAlgorithm::Sha256 {
                return Err(ContentAddressError::TextNotSha256(text.to_owned()));
            }
            Ok(Self::Text(hash))
        } else if let Some(rest) = text.strip_prefix("fixed:") {
            let (method, rest) = match rest.strip_prefix("r:") {
                Some(rest) => (IngestionMethod::Recursive, rest),
                None => (IngestionMethod::Flat, rest),
            };
            Ok(Self::Fixed {
                method,
                hash: hash(rest)?,
            })
        } else {
            Err(ContentAddressError::UnknownKind(text.to_owned()))
        }
    }

    /// The store path this content address gives `name` with `references`.
    pub fn store_path(
        &self,
        name: &str,
        references: &BTreeSet<StorePath>,
        self_reference: bool,
    ) -> Result<StorePath, StorePathError> {
        match self {
            Self::Text(hash) => text_path_from_hash(name, hash, references),
            Self::Fixed { method, hash } => {
                fixed_output_path(name, *method, hash, references, self_reference)
            }
        }
    }
}

impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text(hash) => write!(f, "text:{hash}"),
            Self::Fixed { method, hash } => write!(f, "fixed:{}{hash}", method.prefix()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_address_round_trips() {
        let hash = Hash::sha256(b"x");
        for ca in [
            ContentAddress::Text(hash),
            ContentAddress::Fixed {
                method: IngestionMethod::Recursive,
                hash,
            },
            ContentAddress::Fixed {
                method: IngestionMethod::Flat,
                hash: Hash::digest(HashAlgorithm::Sha1, b"x"),
            },
        ] {
            assert_eq!(ContentAddress::parse(&ca.to_string()).unwrap(), ca);
        }
        assert!(matches!(
            ContentAddress::parse("nar:sha256:00"),
            Err(ContentAddressError::UnknownKind(_))
        ));
        assert!(matches!(
            ContentAddress::parse(&format!("text:{}", Hash::digest(HashAlgorithm::Sha1, b"x"))),
            Err(ContentAddressError::TextNotSha256(_))
        ));
    }

    #[test]
    fn output_names() {
        assert_eq!(output_path_name("hello-2.12", "out"), "hello-2.12");
        assert_eq!(output_path_name("hello-2.12", "dev"), "hello-2.12-dev");
    }
}
