//! Derivations: the model, its ATerm text form, its kind, and the store paths computed from it.
//!
//! Strings inside a derivation (builder, arguments, environment) are bytes: `builtins.readFile`
//! can put anything there, and a derivation's store path is the hash of its exact text. Store
//! paths and output names are validated on parse, so everything that reaches path computation is
//! well formed.

mod aterm;
mod features;
mod hash_modulo;

use std::collections::{BTreeMap, BTreeSet};

use error_context::{Classify, Severity};

use crate::content_address::{IngestionMethod, text_path};
use crate::hash::{Hash, HashAlgorithm};
use crate::store_path::{StorePath, StorePathError};

pub use aterm::{AtermError, AtermErrorKind};
pub use features::FeaturesError;
pub use hash_modulo::{DerivationHasher, OutputPathError};

/// A parsed derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derivation {
    /// Outputs by name.
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Derivations whose outputs this one needs, with the names of the outputs it needs.
    pub input_derivations: BTreeMap<StorePath, BTreeSet<String>>,
    /// Store paths (sources, `builtins.toFile` results) this derivation needs as they are.
    pub input_sources: BTreeSet<StorePath>,
    /// The system type, such as `x86_64-linux` or `builtin`.
    pub system: Vec<u8>,
    /// The program to run.
    pub builder: Vec<u8>,
    /// Its arguments.
    pub args: Vec<Vec<u8>>,
    /// Its environment.
    pub env: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// One output of a derivation, as its ATerm tuple says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DerivationOutput {
    /// The path is computed from the derivation itself (`hashDerivationModulo`).
    InputAddressed {
        /// The output path.
        path: StorePath,
    },
    /// The content hash is fixed in advance (fetchers).
    Fixed {
        /// The output path, computed from the hash.
        path: StorePath,
        /// How the content is hashed.
        method: IngestionMethod,
        /// The expected content hash.
        hash: Hash,
    },
    /// Content-addressed with the hash known only after the build (`__contentAddressed`).
    Floating {
        /// How the content will be hashed.
        method: IngestionMethod,
        /// The algorithm.
        algorithm: HashAlgorithm,
    },
    /// Input-addressed, but the path depends on floating outputs not yet built.
    Deferred,
    /// An impure derivation's output (`__impure`).
    Impure {
        /// How the content will be hashed.
        method: IngestionMethod,
        /// The algorithm.
        algorithm: HashAlgorithm,
    },
}

impl DerivationOutput {
    /// The output path written in the derivation, if it has one.
    #[must_use]
    pub fn path(&self) -> Option<&StorePath> {
        match self {
            Self::InputAddressed { path } | Self::Fixed { path, .. } => Some(path),
            Self::Floating { .. } | Self::Deferred | Self::Impure { .. } => None,
        }
    }

    /// The `hashAlgo` and `hash` fields as the derivation's text writes them (both empty for an
    /// input-addressed output; `r:sha256` and a base-16 hash for a recursive fixed output).
    #[must_use]
    pub fn hash_fields(&self) -> (String, String) {
        aterm::output_hash_fields(self)
    }
}

/// What kind of derivation this is: decides how its output paths are computed and whether drover
/// can build it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DerivationKind {
    /// Every output path is computed from the derivation's inputs.
    InputAddressed,
    /// One output `out` with a content hash known in advance.
    FixedOutput,
    /// Content-addressed outputs whose hash is known only after the build (experimental in Nix).
    FloatingContentAddressed,
    /// Input-addressed, depending on floating content-addressed outputs (experimental in Nix).
    Deferred,
    /// Impure: may access the network, never cached (experimental in Nix).
    Impure,
}

impl DerivationKind {
    /// Whether drover can build and cache derivations of this kind: only input-addressed and
    /// fixed-output ones have output paths known before the build.
    #[must_use]
    pub const fn is_supported(self) -> bool {
        matches!(self, Self::InputAddressed | Self::FixedOutput)
    }
}

/// Why a derivation's outputs do not make a coherent kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KindError {
    /// The derivation has no outputs.
    #[error("derivation has no outputs")]
    NoOutputs,
    /// Outputs of different kinds in one derivation.
    #[error("derivation mixes outputs of different kinds")]
    MixedOutputs,
    /// A fixed-output derivation must have exactly one output, named `out`.
    #[error("a fixed-output derivation must have exactly one output named \"out\"")]
    FixedOutputNotSingleOut,
}

impl Classify for KindError {
    fn severity(&self) -> Severity {
        Severity::Reject
    }
}

impl Derivation {
    /// Parses ATerm text. Only canonical text is accepted (sorted, no duplicates, lower-case
    /// base16 hashes), so [`Derivation::to_aterm`] gives back exactly the bytes parsed.
    pub fn parse(text: &[u8]) -> Result<Self, AtermError> {
        aterm::parse(text)
    }

    /// The canonical ATerm text.
    #[must_use]
    pub fn to_aterm(&self) -> Vec<u8> {
        aterm::print(self, aterm::Outputs::AsWritten, None)
    }

    /// The kind of this derivation, from its outputs.
    pub fn kind(&self) -> Result<DerivationKind, KindError> {
        let kind_of = |output: &DerivationOutput| match output {
            DerivationOutput::InputAddressed { .. } => DerivationKind::InputAddressed,
            DerivationOutput::Fixed { .. } => DerivationKind::FixedOutput,
            DerivationOutput::Floating { .. } => DerivationKind::FloatingContentAddressed,
            DerivationOutput::Deferred => DerivationKind::Deferred,
            DerivationOutput::Impure { .. } => DerivationKind::Impure,
        };
        let mut kinds = self.outputs.values().map(kind_of);
        let kind = kinds.next().ok_or(KindError::NoOutputs)?;
        if kinds.any(|other| other != kind) {
            return Err(KindError::MixedOutputs);
        }
        if kind == DerivationKind::FixedOutput
            && (self.outputs.len() != 1 || !self.outputs.contains_key("out"))
        {
            return Err(KindError::FixedOutputNotSingleOut);
        }
        Ok(kind)
    }

    /// The store paths a `.drv` file refers to: its input sources and input derivations.
    #[must_use]
    pub fn references(&self) -> BTreeSet<StorePath> {
        self.input_sources
            .iter()
            .chain(self.input_derivations.keys())
            .cloned()
            .collect()
    }

    /// An environment variable, if it is set and valid UTF-8.
    #[must_use]
    pub fn env_str(&self, key: &str) -> Option<&str> {
        self.env
            .get(key.as_bytes())
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    /// Whether this derivation runs inside Nix itself (system `builtin`, such as
    /// `builtin:fetchurl`), and so on any builder.
    #[must_use]
    pub fn is_builtin(&self) -> bool {
        self.system == b"builtin"
    }

    /// The system features a builder must offer (`requiredSystemFeatures`, also inside `__json`
    /// with structured attributes).
    pub fn required_system_features(&self) -> Result<BTreeSet<String>, FeaturesError> {
        features::required_system_features(self)
    }
}

/// The store path of a `.drv` file: a text path over its exact bytes, referring to its inputs.
pub fn derivation_path(
    name: &str,
    text: &[u8],
    derivation: &Derivation,
) -> Result<StorePath, StorePathError> {
    text_path(&format!("{name}.drv"), text, &derivation.references())
}
