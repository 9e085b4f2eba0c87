//! Output paths of derivations: Nix's `hashDerivationModulo` over a derivation closure, and the
//! check that the paths written in a derivation are the ones its inputs determine.
//!
//! A farm that trusted the output paths written in a submitted derivation would let any client
//! claim another package's path and have the farm sign whatever it built there; so the runner
//! recomputes every output path with [`DerivationHasher`] before it accepts a derivation.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use error_context::{Classify, Severity};

use super::aterm::{Outputs, print};
use super::{Derivation, DerivationKind, DerivationOutput, KindError};
use crate::content_address::{fixed_output_path, output_path};
use crate::hash::Hash;
use crate::store_path::{StorePath, StorePathError};

/// Why a derivation's output paths cannot be computed or do not match.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputPathError {
    /// An input derivation is not in the closure that was provided.
    #[error("input derivation {0} is missing from the closure")]
    MissingInput(StorePath),
    /// The input derivations refer to each other in a cycle.
    #[error("derivation {0} depends on itself")]
    Cycle(StorePath),
    /// A derivation asks for an output its input derivation does not have.
    #[error("derivation {derivation} has no output {output:?}")]
    MissingOutput {
        /// The input derivation.
        derivation: StorePath,
        /// The output asked for.
        output: String,
    },
    /// A path that is not a `.drv` was named as a derivation.
    #[error("{0} is not a derivation path")]
    NotADerivation(StorePath),
    /// The outputs do not form a coherent kind.
    #[error("derivation {derivation} has inconsistent outputs")]
    Kind {
        /// The derivation.
        derivation: StorePath,
        /// What is inconsistent.
        #[source]
        source: KindError,
    },
    /// A kind of derivation whose output paths are not known before the build.
    #[error(
        "derivation {derivation} is {kind:?}, whose output paths are not known before it is built"
    )]
    Unsupported {
        /// The derivation.
        derivation: StorePath,
        /// Its kind.
        kind: DerivationKind,
    },
    /// A computed output path is not a valid store path (its name is too long).
    #[error("computing an output path of {derivation}")]
    StorePath {
        /// The derivation.
        derivation: StorePath,
        /// Why the path is invalid.
        #[source]
        source: StorePathError,
    },
    /// The path written in the derivation is not the one its inputs determine.
    #[error("output {output:?} of {derivation} is written as {written} but must be {computed}")]
    PathMismatch {
        /// The derivation.
        derivation: StorePath,
        /// The output.
        output: String,
        /// The path in the text.
        written: StorePath,
        /// The path computed.
        computed: StorePath,
    },
    /// The environment variable named after an output does not hold its path.
    #[error("environment variable {output:?} of {derivation} does not hold the output's path")]
    EnvironmentMismatch {
        /// The derivation.
        derivation: StorePath,
        /// The output.
        output: String,
    },
}

impl Classify for OutputPathError {
    fn severity(&self) -> Severity {
        Severity::Reject
    }
}

/// Per-output hashes of a derivation: what dependents put in place of its path when they are
/// hashed modulo.
type OutputHashes = BTreeMap<String, Hash>;

/// Computes `hashDerivationModulo` for derivations in a closure, remembering the hash of every
/// input derivation so that a closure is hashed in time linear in its size.
#[derive(Debug, Default)]
pub struct DerivationHasher {
    known: HashMap<StorePath, OutputHashes>,
}

impl DerivationHasher {
    /// A hasher that knows nothing yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The hash modulo of a derivation this hasher verified or hashed as an input: the hash
    /// every one of its outputs is hashed to. To store, and give back to [`Self::remember`].
    #[must_use]
    pub fn hash_modulo(&self, path: &StorePath) -> Option<Hash> {
        let hashes = self.known.get(path)?;
        let first = *hashes.values().next()?;
        hashes.values().all(|hash| *hash == first).then_some(first)
    }

    /// Takes the hash modulo of a derivation verified earlier, as [`Self::hash_modulo`] gave
    /// it, with the names of its outputs: its dependents then verify without its parse.
    pub fn remember(
        &mut self,
        path: StorePath,
        outputs: impl IntoIterator<Item = String>,
        hash_modulo: Hash,
    ) {
        let hashes = outputs
            .into_iter()
            .map(|output| (output, hash_modulo))
            .collect();
        self.known.insert(path, hashes);
    }

    /// The output paths the derivation at `path` must have, computed from its inputs.
    /// `lookup` finds the derivations of the closure by path.
    pub fn output_paths<'a>(
        &mut self,
        path: &StorePath,
        derivation: &Derivation,
        lookup: impl Fn(&StorePath) -> Option<&'a Derivation>,
    ) -> Result<BTreeMap<String, StorePath>, OutputPathError> {
        let name = derivation_name(path)?;
        let kind = kind_of(path, derivation)?;
        let path_error = |source| OutputPathError::StorePath {
            derivation: path.clone(),
            source,
        };
        match kind {
            DerivationKind::FixedOutput => derivation
                .outputs
                .iter()
                .filter_map(|(output, value)| match value {
                    DerivationOutput::Fixed { method, hash, .. } => Some(
                        fixed_output_path(name, *method, hash, &BTreeSet::new(), false)
                            .map(|computed| (output.clone(), computed))
                            .map_err(path_error),
                    ),
                    _ => None,
                })
                .collect(),
            DerivationKind::InputAddressed => {
                self.hash_inputs(derivation, &lookup)?;
                let masked = self.hash_with_inputs(derivation, Outputs::Masked)?;
                derivation
                    .outputs
                    .keys()
                    .map(|output| {
                        output_path(name, output, &masked)
                            .map(|computed| (output.clone(), computed))
                            .map_err(path_error)
                    })
                    .collect()
            }
            kind => Err(OutputPathError::Unsupported {
                derivation: path.clone(),
                kind,
            }),
        }
    }

    /// Checks that every output path written in the derivation, and the environment variable
    /// named after each output, is the path its inputs determine; returns the paths. The
    /// derivation's own output hashes are remembered, so its dependents verify without `lookup`
    /// finding it: a caller that verifies inputs first may drop each parse once it is verified.
    pub fn verify<'a>(
        &mut self,
        path: &StorePath,
        derivation: &Derivation,
        lookup: impl Fn(&StorePath) -> Option<&'a Derivation>,
    ) -> Result<BTreeMap<String, StorePath>, OutputPathError> {
        let computed = self.output_paths(path, derivation, lookup)?;
        for (output, computed_path) in &computed {
            let written = derivation
                .outputs
                .get(output)
                .and_then(DerivationOutput::path);
            if let Some(written) = written.filter(|written| *written != computed_path) {
                return Err(OutputPathError::PathMismatch {
                    derivation: path.clone(),
                    output: output.clone(),
                    written: written.clone(),
                    computed: computed_path.clone(),
                });
            }
            if derivation.env_str(output) != Some(computed_path.to_absolute().as_str()) {
                return Err(OutputPathError::EnvironmentMismatch {
                    derivation: path.clone(),
                    output: output.clone(),
                });
            }
        }
        if !self.known.contains_key(path) {
            let hashes = self.output_hashes(path, derivation)?;
            self.known.insert(path.clone(), hashes);
        }
        Ok(computed)
    }

    /// Makes sure the output hashes of every derivation in the input closure are known, visiting
    /// the closure depth-first without recursion (closures can be thousands deep).
    fn hash_inputs<'a>(
        &mut self,
        derivation: &Derivation,
        lookup: &impl Fn(&StorePath) -> Option<&'a Derivation>,
    ) -> Result<(), OutputPathError> {
        let mut in_progress = HashSet::new();
        let mut stack: Vec<(&StorePath, bool)> = derivation
            .input_derivations
            .keys()
            .map(|input| (input, false))
            .collect();
        while let Some((path, inputs_done)) = stack.pop() {
            if self.known.contains_key(path) {
                continue;
            }
            let input = lookup(path).ok_or_else(|| OutputPathError::MissingInput(path.clone()))?;
            if inputs_done {
                let hashes = self.output_hashes(path, input)?;
                self.known.insert(path.clone(), hashes);
                in_progress.remove(path);
            } else {
                if !in_progress.insert(path) {
                    return Err(OutputPathError::Cycle(path.clone()));
                }
                stack.push((path, true));
                stack.extend(
                    input
                        .input_derivations
                        .keys()
                        .filter(|next| !self.known.contains_key(*next))
                        .map(|next| (next, false)),
                );
            }
        }
        Ok(())
    }

    /// The per-output hashes of an input derivation whose own inputs are already known.
    fn output_hashes(
        &self,
        path: &StorePath,
        derivation: &Derivation,
    ) -> Result<OutputHashes, OutputPathError> {
        match kind_of(path, derivation)? {
            DerivationKind::FixedOutput => {
                let name = derivation_name(path)?;
                derivation
                    .outputs
                    .iter()
                    .filter_map(|(output, value)| match value {
                        DerivationOutput::Fixed { method, hash, .. } => {
                            Some((output, method, hash))
                        }
                        _ => None,
                    })
                    .map(|(output, method, hash)| {
                        let computed =
                            fixed_output_path(name, *method, hash, &BTreeSet::new(), false)
                                .map_err(|source| OutputPathError::StorePath {
                                    derivation: path.clone(),
                                    source,
                                })?;
                        let fingerprint = format!(
                            "fixed:out:{}{}:{}:{}",
                            method.prefix(),
                            hash.algorithm(),
                            hash.to_base16(),
                            computed
                        );
                        Ok((output.clone(), Hash::sha256(fingerprint.as_bytes())))
                    })
                    .collect()
            }
            DerivationKind::InputAddressed => {
                let hash = self.hash_with_inputs(derivation, Outputs::AsWritten)?;
                Ok(derivation
                    .outputs
                    .keys()
                    .map(|output| (output.clone(), hash))
                    .collect())
            }
            kind => Err(OutputPathError::Unsupported {
                derivation: path.clone(),
                kind,
            }),
        }
    }

    /// SHA-256 of the derivation printed with each input derivation replaced by the hash of the
    /// outputs it uses. Every input must already be known.
    fn hash_with_inputs(
        &self,
        derivation: &Derivation,
        outputs: Outputs,
    ) -> Result<Hash, OutputPathError> {
        let mut inputs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (input, wanted) in &derivation.input_derivations {
            let hashes = self
                .known
                .get(input)
                .ok_or_else(|| OutputPathError::MissingInput(input.clone()))?;
            for output in wanted {
                let hash = hashes
                    .get(output)
                    .ok_or_else(|| OutputPathError::MissingOutput {
                        derivation: input.clone(),
                        output: output.clone(),
                    })?;
                inputs
                    .entry(hash.to_base16())
                    .or_default()
                    .insert(output.clone());
            }
        }
        Ok(Hash::sha256(&print(derivation, outputs, Some(&inputs))))
    }
}

fn derivation_name(path: &StorePath) -> Result<&str, OutputPathError> {
    path.derivation_name()
        .ok_or_else(|| OutputPathError::NotADerivation(path.clone()))
}

fn kind_of(path: &StorePath, derivation: &Derivation) -> Result<DerivationKind, OutputPathError> {
    derivation.kind().map_err(|source| OutputPathError::Kind {
        derivation: path.clone(),
        source,
    })
}
