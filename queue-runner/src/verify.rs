//! Verification of a derivation closure before anything of it is built: every `.drv` must parse,
//! hash to its claimed path, and have the output paths its inputs determine. Used for Submit and
//! for builds an evaluator inserted with SQL, so both paths trust exactly the same checks.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use error_context::{Classify, Severity};
use nix_primitives::derivation::{AtermError, FeaturesError, OutputPathError, derivation_path};
use nix_primitives::store_path::StorePathError;
use nix_primitives::{
    Derivation, DerivationHasher, DerivationKind, DerivationOutput, Hash, IngestionMethod,
    StorePath,
};

/// Why a closure was refused.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A path that is not a store path.
    #[error("{path:?} is not a store path")]
    InvalidPath {
        /// The text given.
        path: String,
        /// Why.
        #[source]
        source: StorePathError,
    },
    /// A store path that is not a `.drv`.
    #[error("{0} is not a derivation")]
    NotADerivation(StorePath),
    /// A derivation the closure needs is neither given nor known.
    #[error("derivation {0} is needed but was not provided")]
    Missing(StorePath),
    /// The text is not a canonical derivation.
    #[error("derivation {path} is malformed")]
    Malformed {
        /// The derivation.
        path: StorePath,
        /// Where and why.
        #[source]
        source: AtermError,
    },
    /// The text does not hash to the path it was given under.
    #[error("the text given for {claimed} hashes to {computed}")]
    PathMismatch {
        /// The path claimed.
        claimed: StorePath,
        /// The path its text determines.
        computed: StorePath,
    },
    /// A kind of derivation drover cannot build (output paths unknown before the build).
    #[error("derivation {path} is {kind:?}, which drover does not build")]
    Unsupported {
        /// The derivation.
        path: StorePath,
        /// Its kind.
        kind: DerivationKind,
    },
    /// Output paths that its inputs do not determine, or an inconsistent derivation.
    #[error("output paths of a derivation are wrong")]
    Outputs(#[source] OutputPathError),
    /// `requiredSystemFeatures` cannot be read.
    #[error("required features of {path} cannot be read")]
    Features {
        /// The derivation.
        path: StorePath,
        /// Why.
        #[source]
        source: FeaturesError,
    },
}

impl Classify for VerifyError {
    fn severity(&self) -> Severity {
        Severity::Reject
    }
}

/// What planning and dispatch need of one verified derivation: the text and the parse are
/// dropped once it is verified (a nixpkgs derivation's text is 2 to 10 KB, its environment most of
/// that), and the hasher remembers its output hashes for its dependents.
#[derive(Debug, Clone)]
pub struct VerifiedDerivation {
    /// The system it builds on.
    pub system: String,
    /// Its required system features.
    pub features: BTreeSet<String>,
    /// Its outputs, name to path.
    pub outputs: BTreeMap<String, StorePath>,
    /// The derivations whose outputs it needs.
    pub inputs: Vec<StorePath>,
    /// The store paths it needs as they are.
    pub input_sources: Vec<StorePath>,
    /// The outputs of its input derivations it reads.
    pub input_outputs: Vec<StorePath>,
    /// How its output is hashed and the hash it must have, for a fixed-output derivation.
    pub fixed: Option<(IngestionMethod, Hash)>,
}

/// A derivation verified earlier, as stored: what planning needs, and its hash modulo.
#[derive(Debug, Clone)]
pub struct StoredDerivation {
    /// Its path.
    pub path: StorePath,
    /// What planning needs of it.
    pub derivation: VerifiedDerivation,
    /// Its hash modulo, for verifying its dependents.
    pub hash_modulo: Hash,
}

/// A derivation of a closure being completed, as it was found.
#[derive(Debug)]
pub enum Loaded {
    /// Its text, parsed and checked to hash to its path, still to be verified.
    Parsed(Derivation),
    /// Verified earlier.
    Stored(StoredDerivation),
}

impl Loaded {
    /// The derivations whose outputs it needs.
    #[must_use]
    pub fn inputs(&self) -> Vec<&StorePath> {
        match self {
            Self::Parsed(derivation) => derivation.input_derivations.keys().collect(),
            Self::Stored(stored) => stored.derivation.inputs.iter().collect(),
        }
    }
}

/// Verified derivations with their closures: one build's, or the union of a job set's.
#[derive(Debug, Default)]
pub struct VerifiedClosure {
    /// Every derivation verified, by path: looked up for every step and edge planned, so hashed
    /// rather than ordered (ordered lookups compared the shared `/nix/store/` prefix each time).
    pub derivations: HashMap<StorePath, VerifiedDerivation>,
    /// The output hashes of every derivation verified, so its dependents are hashed without it.
    hasher: DerivationHasher,
}

impl VerifiedClosure {
    /// Verifies the closure of `top` and adds it; returns the derivations verified from their
    /// text, to store. Derivations verified already are not verified again; the others are taken
    /// out of `loaded` and kept only as what [`VerifiedDerivation`] holds. On error nothing of
    /// `top`'s closure is added and `loaded` is left as it was.
    pub fn add(
        &mut self,
        top: &StorePath,
        loaded: &mut BTreeMap<StorePath, Loaded>,
    ) -> Result<Vec<StoredDerivation>, VerifyError> {
        let order = dependency_order(top, loaded, &self.derivations)?;
        let mut verified: HashMap<StorePath, VerifiedDerivation> = HashMap::new();
        let mut to_store = Vec::new();
        for path in &order {
            let found = loaded
                .get(path)
                .ok_or_else(|| VerifyError::Missing(path.clone()))?;
            let derivation = match found {
                Loaded::Stored(stored) => {
                    self.remember(stored);
                    stored.derivation.clone()
                }
                Loaded::Parsed(derivation) => {
                    let compact = self.verify_parsed(path, derivation, loaded, &verified)?;
                    // Outputs hashed apart (none of the kinds drover builds) are not stored.
                    if let Some(hash_modulo) = self.hasher.hash_modulo(path) {
                        to_store.push(StoredDerivation {
                            path: path.clone(),
                            derivation: compact.clone(),
                            hash_modulo,
                        });
                    }
                    compact
                }
            };
            verified.insert(path.clone(), derivation);
        }
        for path in &order {
            loaded.remove(path);
        }
        self.derivations.extend(verified);
        Ok(to_store)
    }

    /// Adds a derivation verified earlier without its closure: enough to verify its dependents,
    /// not to plan them.
    pub fn add_stored(&mut self, stored: StoredDerivation) {
        self.remember(&stored);
        self.derivations.insert(stored.path, stored.derivation);
    }

    /// Gives the hasher a stored derivation's hash modulo, for its dependents.
    fn remember(&mut self, stored: &StoredDerivation) {
        self.hasher.remember(
            stored.path.clone(),
            stored.derivation.outputs.keys().cloned(),
            stored.hash_modulo,
        );
    }

    /// Verifies one parsed derivation whose inputs are verified (in `batch` or earlier).
    fn verify_parsed(
        &mut self,
        path: &StorePath,
        derivation: &Derivation,
        loaded: &BTreeMap<StorePath, Loaded>,
        batch: &HashMap<StorePath, VerifiedDerivation>,
    ) -> Result<VerifiedDerivation, VerifyError> {
        let lookup = |input: &StorePath| match loaded.get(input) {
            Some(Loaded::Parsed(derivation)) => Some(derivation),
            _ => None,
        };
        let outputs = verify_one(&mut self.hasher, path, derivation, lookup)?;
        let output_of = |input: &StorePath, output: &String| {
            batch
                .get(input)
                .or_else(|| self.derivations.get(input))
                .and_then(|known| known.outputs.get(output))
                .cloned()
        };
        compact(path, derivation, outputs, output_of)
    }

    /// The union of the closures of `tops` in dependency order (inputs first); derivations not
    /// verified are left out.
    #[must_use]
    pub fn closure_of<'a>(&self, tops: impl IntoIterator<Item = &'a StorePath>) -> Vec<&StorePath> {
        let mut order = Vec::new();
        let mut visited = HashSet::new();
        let mut stack: Vec<(&StorePath, bool)> = tops.into_iter().map(|top| (top, false)).collect();
        stack.reverse();
        while let Some((path, inputs_done)) = stack.pop() {
            let Some((path, verified)) = self.derivations.get_key_value(path) else {
                continue;
            };
            if inputs_done {
                order.push(path);
            } else if visited.insert(path) {
                stack.push((path, true));
                stack.extend(
                    verified
                        .inputs
                        .iter()
                        .filter(|input| !visited.contains(input))
                        .map(|input| (input, false)),
                );
            }
        }
        order
    }
}

/// What is kept of a verified derivation; `output_of` finds an output of a verified input.
fn compact(
    path: &StorePath,
    derivation: &Derivation,
    outputs: BTreeMap<String, StorePath>,
    output_of: impl Fn(&StorePath, &String) -> Option<StorePath>,
) -> Result<VerifiedDerivation, VerifyError> {
    let features =
        derivation
            .required_system_features()
            .map_err(|source| VerifyError::Features {
                path: path.clone(),
                source,
            })?;
    let mut input_outputs = Vec::new();
    for (input, wanted) in &derivation.input_derivations {
        for output in wanted {
            let found = output_of(input, output).ok_or_else(|| {
                VerifyError::Outputs(OutputPathError::MissingOutput {
                    derivation: input.clone(),
                    output: output.clone(),
                })
            })?;
            input_outputs.push(found);
        }
    }
    Ok(VerifiedDerivation {
        system: String::from_utf8_lossy(&derivation.system).into_owned(),
        features,
        outputs,
        inputs: derivation.input_derivations.keys().cloned().collect(),
        input_sources: derivation.input_sources.iter().cloned().collect(),
        input_outputs,
        fixed: derivation.outputs.values().find_map(|output| match output {
            DerivationOutput::Fixed { method, hash, .. } => Some((*method, *hash)),
            _ => None,
        }),
    })
}

/// Parses a store path given by a client.
pub fn parse_path(text: &str) -> Result<StorePath, VerifyError> {
    let path = StorePath::from_absolute(text).map_err(|source| VerifyError::InvalidPath {
        path: text.to_owned(),
        source,
    })?;
    if path.is_derivation() {
        Ok(path)
    } else {
        Err(VerifyError::NotADerivation(path))
    }
}

/// Parses one derivation text and checks it hashes to `path`.
pub fn parse_derivation(path: &StorePath, text: &[u8]) -> Result<Derivation, VerifyError> {
    let derivation = Derivation::parse(text).map_err(|source| VerifyError::Malformed {
        path: path.clone(),
        source,
    })?;
    let name = path
        .derivation_name()
        .ok_or_else(|| VerifyError::NotADerivation(path.clone()))?;
    let computed =
        derivation_path(name, text, &derivation).map_err(|source| VerifyError::InvalidPath {
            path: path.to_absolute(),
            source,
        })?;
    if computed != *path {
        return Err(VerifyError::PathMismatch {
            claimed: path.clone(),
            computed,
        });
    }
    Ok(derivation)
}

/// Checks one derivation whose inputs `lookup` finds verified: a kind drover builds, and output
/// paths its inputs determine; returns the outputs.
fn verify_one<'a>(
    hasher: &mut DerivationHasher,
    path: &StorePath,
    derivation: &Derivation,
    lookup: impl Fn(&StorePath) -> Option<&'a Derivation>,
) -> Result<BTreeMap<String, StorePath>, VerifyError> {
    let kind = derivation.kind().map_err(|source| {
        VerifyError::Outputs(OutputPathError::Kind {
            derivation: path.clone(),
            source,
        })
    })?;
    if !kind.is_supported() {
        return Err(VerifyError::Unsupported {
            path: path.clone(),
            kind,
        });
    }
    hasher
        .verify(path, derivation, lookup)
        .map_err(VerifyError::Outputs)
}

/// The part of the closure of `top` not in `verified`, in post-order (inputs first), without
/// recursion.
fn dependency_order(
    top: &StorePath,
    loaded: &BTreeMap<StorePath, Loaded>,
    verified: &HashMap<StorePath, VerifiedDerivation>,
) -> Result<Vec<StorePath>, VerifyError> {
    let mut order = Vec::new();
    let mut visited = HashSet::new();
    let mut stack = vec![(top.clone(), false)];
    while let Some((path, inputs_done)) = stack.pop() {
        if inputs_done {
            order.push(path);
            continue;
        }
        if verified.contains_key(&path) || !visited.insert(path.clone()) {
            continue;
        }
        let found = loaded
            .get(&path)
            .ok_or_else(|| VerifyError::Missing(path.clone()))?;
        let inputs: Vec<StorePath> = found
            .inputs()
            .into_iter()
            .filter(|input| !visited.contains(*input))
            .cloned()
            .collect();
        stack.push((path, true));
        stack.extend(inputs.into_iter().map(|input| (input, false)));
    }
    Ok(order)
}
