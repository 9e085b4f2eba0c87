//! `.narinfo` files: what a binary cache says about one store path, and the fingerprint its
//! signatures cover.

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};

use error_context::{Classify, Severity};

use crate::content_address::{ContentAddress, ContentAddressError};
use crate::hash::{Hash, HashAlgorithm, HashError};
use crate::signing::{KeyError, PublicKey, SecretKey, Signature};
use crate::store_path::{StorePath, StorePathError};

/// Why a narinfo text cannot be used; `line` is 1-based, 0 for a field that is missing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid narinfo at line {line}: {kind}")]
pub struct NarInfoError {
    /// The line with the problem.
    pub line: usize,
    /// What is wrong.
    #[source]
    pub kind: NarInfoErrorKind,
}

impl Classify for NarInfoError {
    fn severity(&self) -> Severity {
        Severity::Reject
    }
}

/// The ways a narinfo can be invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarInfoErrorKind {
    /// A line without `: `.
    #[error("line is not \"Key: value\"")]
    NotAField,
    /// A required field is absent.
    #[error("required field {0} is missing")]
    MissingField(&'static str),
    /// A field that may appear once appears twice.
    #[error("field {0} appears twice")]
    DuplicateField(&'static str),
    /// A store path field is invalid.
    #[error("invalid store path")]
    StorePath(#[source] StorePathError),
    /// A hash field is invalid.
    #[error("invalid hash")]
    Hash(#[source] HashError),
    /// `NarHash` must be SHA-256.
    #[error("NarHash is not sha256")]
    NarHashNotSha256,
    /// A size field is not a number.
    #[error("{0} is not a number")]
    Number(&'static str),
    /// A signature is malformed.
    #[error("invalid signature")]
    Signature(#[source] KeyError),
    /// The `CA` field is malformed.
    #[error("invalid content address")]
    ContentAddress(#[source] ContentAddressError),
}

/// The contents of a `.narinfo` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    /// The path described.
    pub store_path: StorePath,
    /// Where the (compressed) NAR is, relative to the cache.
    pub url: String,
    /// `none`, `xz`, `zstd`, `bzip2`, …
    pub compression: String,
    /// Hash of the compressed file.
    pub file_hash: Option<Hash>,
    /// Size of the compressed file.
    pub file_size: Option<u64>,
    /// SHA-256 of the uncompressed NAR.
    pub nar_hash: Hash,
    /// Size of the uncompressed NAR.
    pub nar_size: u64,
    /// Store paths the path refers to.
    pub references: BTreeSet<StorePath>,
    /// The derivation that built it, if known.
    pub deriver: Option<StorePath>,
    /// The system it was built for, if recorded.
    pub system: Option<String>,
    /// Signatures over [`NarInfo::fingerprint`].
    pub signatures: Vec<Signature>,
    /// The content address, which lets Nix accept the path without a trusted signature.
    pub content_address: Option<ContentAddress>,
}

/// The text Nix signs for a store path: `1;path;sha256:base32;size;ref,ref,…`.
#[must_use]
pub fn fingerprint(
    store_path: &StorePath,
    nar_hash: &Hash,
    nar_size: u64,
    references: &BTreeSet<StorePath>,
) -> String {
    let references = references
        .iter()
        .map(StorePath::to_absolute)
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "1;{store_path};{};{nar_size};{references}",
        nar_hash.to_typed_base32()
    )
}

impl NarInfo {
    /// Parses a narinfo. Unknown fields are ignored, as Nix does.
    pub fn parse(text: &str) -> Result<Self, NarInfoError> {
        let mut fields = Fields::default();
        for (index, line) in text.lines().enumerate() {
            let line_no = index + 1;
            if line.is_empty() {
                continue;
            }
            let at = |kind| NarInfoError {
                line: line_no,
                kind,
            };
            let (key, value) = line
                .split_once(": ")
                .ok_or_else(|| at(NarInfoErrorKind::NotAField))?;
            fields.set(key, value).map_err(at)?;
        }
        fields.finish()
    }

    /// The fingerprint signatures cover.
    #[must_use]
    pub fn fingerprint(&self) -> String {
        fingerprint(
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Adds a signature made with `key`.
    pub fn sign(&mut self, key: &SecretKey) {
        let signature = key.sign(&self.fingerprint());
        self.signatures.push(signature);
    }

    /// Whether any signature was made by one of `keys`.
    #[must_use]
    pub fn is_signed_by_any(&self, keys: &[PublicKey]) -> bool {
        let fingerprint = self.fingerprint();
        self.signatures
            .iter()
            .any(|signature| keys.iter().any(|key| key.verify(&fingerprint, signature)))
    }
}

impl fmt::Display for NarInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::with_capacity(512);
        let _ = writeln!(out, "StorePath: {}", self.store_path);
        let _ = writeln!(out, "URL: {}", self.url);
        let _ = writeln!(out, "Compression: {}", self.compression);
        if let Some(file_hash) = &self.file_hash {
            let _ = writeln!(out, "FileHash: {file_hash}");
        }
        if let Some(file_size) = self.file_size {
            let _ = writeln!(out, "FileSize: {file_size}");
        }
        let _ = writeln!(out, "NarHash: {}", self.nar_hash);
        let _ = writeln!(out, "NarSize: {}", self.nar_size);
        let references: Vec<&str> = self.references.iter().map(StorePath::base_name).collect();
        let _ = writeln!(out, "References: {}", references.join(" "));
        if let Some(deriver) = &self.deriver {
            let _ = writeln!(out, "Deriver: {}", deriver.base_name());
        }
        if let Some(system) = &self.system {
            let _ = writeln!(out, "System: {system}");
        }
        for signature in &self.signatures {
            let _ = writeln!(out, "Sig: {signature}");
        }
        if let Some(content_address) = &self.content_address {
            let _ = writeln!(out, "CA: {content_address}");
        }
        f.write_str(&out)
    }
}

/// The fields seen so far while parsing.
#[derive(Default)]
struct Fields {
    store_path: Option<StorePath>,
    url: Option<String>,
    compression: Option<String>,
    file_hash: Option<Hash>,
    file_size: Option<u64>,
    nar_hash: Option<Hash>,
    nar_size: Option<u64>,
    references: Option<BTreeSet<StorePath>>,
    deriver: Option<StorePath>,
    system: Option<String>,
    signatures: Vec<Signature>,
    content_address: Option<ContentAddress>,
}

/// Stores `value` in `slot`, refusing a second value.
fn once<T>(slot: &mut Option<T>, name: &'static str, value: T) -> Result<(), NarInfoErrorKind> {
    if slot.replace(value).is_some() {
        return Err(NarInfoErrorKind::DuplicateField(name));
    }
    Ok(())
}

impl Fields {
    fn set(&mut self, key: &str, value: &str) -> Result<(), NarInfoErrorKind> {
        let hash = |value: &str| Hash::parse_typed(value).map_err(NarInfoErrorKind::Hash);
        let number = |name| {
            move |value: &str| {
                value
                    .parse::<u64>()
                    .map_err(|_| NarInfoErrorKind::Number(name))
            }
        };
        match key {
            "StorePath" => once(
                &mut self.store_path,
                "StorePath",
                StorePath::from_absolute(value).map_err(NarInfoErrorKind::StorePath)?,
            ),
            "URL" => once(&mut self.url, "URL", value.to_owned()),
            "Compression" => once(&mut self.compression, "Compression", value.to_owned()),
            "FileHash" => once(&mut self.file_hash, "FileHash", hash(value)?),
            "FileSize" => once(&mut self.file_size, "FileSize", number("FileSize")(value)?),
            "NarHash" => {
                let nar_hash = hash(value)?;
                if nar_hash.algorithm() != HashAlgorithm::Sha256 {
                    return Err(NarInfoErrorKind::NarHashNotSha256);
                }
                once(&mut self.nar_hash, "NarHash", nar_hash)
            }
            "NarSize" => once(&mut self.nar_size, "NarSize", number("NarSize")(value)?),
            "References" => {
                let references = value
                    .split(' ')
                    .filter(|reference| !reference.is_empty())
                    .map(StorePath::from_base_name)
                    .collect::<Result<_, _>>()
                    .map_err(NarInfoErrorKind::StorePath)?;
                once(&mut self.references, "References", references)
            }
            "Deriver" if value == "unknown-deriver" => Ok(()),
            "Deriver" => once(
                &mut self.deriver,
                "Deriver",
                StorePath::from_base_name(value).map_err(NarInfoErrorKind::StorePath)?,
            ),
            "System" => once(&mut self.system, "System", value.to_owned()),
            "Sig" => {
                self.signatures
                    .push(Signature::parse(value).map_err(NarInfoErrorKind::Signature)?);
                Ok(())
            }
            "CA" => once(
                &mut self.content_address,
                "CA",
                ContentAddress::parse(value).map_err(NarInfoErrorKind::ContentAddress)?,
            ),
            _ => Ok(()),
        }
    }

    fn finish(self) -> Result<NarInfo, NarInfoError> {
        let missing = |field| NarInfoError {
            line: 0,
            kind: NarInfoErrorKind::MissingField(field),
        };
        Ok(NarInfo {
            store_path: self.store_path.ok_or_else(|| missing("StorePath"))?,
            url: self.url.ok_or_else(|| missing("URL"))?,
            compression: self.compression.unwrap_or_else(|| "bzip2".to_owned()),
            file_hash: self.file_hash,
            file_size: self.file_size,
            nar_hash: self.nar_hash.ok_or_else(|| missing("NarHash"))?,
            nar_size: self.nar_size.ok_or_else(|| missing("NarSize"))?,
            references: self.references.unwrap_or_default(),
            deriver: self.deriver,
            system: self.system,
            signatures: self.signatures,
            content_address: self.content_address,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "StorePath: /nix/store/wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm-a\n\
URL: nar/1m7w5s0lkcq8l5f1fc0wkhqfd0qzpbzsl2c0h7l1jg2p7rlcwdgs.nar\n\
Compression: none\n\
NarHash: sha256:1m7w5s0lkcq8l5f1fc0wkhqfd0qzpbzsl2c0h7l1jg2p7rlcwdgs\n\
NarSize: 120\n\
References: wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm-a\n\
Deriver: 3pysdbjixd4amzidam0kp6vwzpqy58y3-a.drv\n";

    #[test]
    fn parses_prints_signs() {
        let mut info = NarInfo::parse(TEXT).unwrap();
        assert_eq!(info.to_string(), TEXT);
        assert_eq!(
            info.fingerprint(),
            "1;/nix/store/wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm-a;sha256:1m7w5s0lkcq8l5f1fc0wkhqfd0qzpbzsl2c0h7l1jg2p7rlcwdgs;120;/nix/store/wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm-a"
        );
        let key = SecretKey::from_seed("k-1", &[3u8; 32]);
        assert!(!info.is_signed_by_any(&[key.public_key()]));
        info.sign(&key);
        let reparsed = NarInfo::parse(&info.to_string()).unwrap();
        assert!(reparsed.is_signed_by_any(&[key.public_key()]));
        let mut tampered = reparsed;
        tampered.nar_size += 1;
        assert!(!tampered.is_signed_by_any(&[key.public_key()]));
    }

    #[test]
    fn errors_are_typed() {
        let kind = |text: &str| NarInfo::parse(text).unwrap_err().kind;
        assert_eq!(kind("garbage"), NarInfoErrorKind::NotAField);
        assert_eq!(
            kind(&TEXT.replace("URL: ", "Nope: ")),
            NarInfoErrorKind::MissingField("URL")
        );
        assert_eq!(
            kind(&format!("{TEXT}NarSize: 3\n")),
            NarInfoErrorKind::DuplicateField("NarSize")
        );
        assert_eq!(
            kind(&TEXT.replace("NarSize: 120", "NarSize: x")),
            NarInfoErrorKind::Number("NarSize")
        );
        assert!(matches!(
            kind(&TEXT.replace("Deriver: 3", "Deriver: e")),
            NarInfoErrorKind::StorePath(_)
        ));
        assert!(matches!(
            kind(&format!("{TEXT}Sig: nokey\n")),
            NarInfoErrorKind::Signature(KeyError::MissingName)
        ));
    }
}
