//! Valid derivations made in memory for control-plane tests and benchmarks: real ATerm texts whose `.drv` and
//! output paths are computed exactly as Nix would, so the runner's verification accepts them,
//! without needing Nix to instantiate anything.

#![allow(
    clippy::unwrap_used,
    clippy::missing_panics_doc,
    reason = "the factory builds valid derivations from valid names: a failure is a bug in it"
)]

use std::collections::{BTreeMap, BTreeSet};

use nix_primitives::derivation::derivation_path;
use nix_primitives::{Derivation, DerivationHasher, DerivationOutput, StorePath};

/// A derivation with its path and exact text.
#[derive(Debug, Clone)]
pub struct FakeDrv {
    /// Its `.drv` path.
    pub path: StorePath,
    /// Its text.
    pub text: Vec<u8>,
    /// Its output `out`.
    pub out: StorePath,
}

/// Makes derivations, remembering them so dependents can be hashed.
#[derive(Debug, Default)]
pub struct Factory {
    known: BTreeMap<StorePath, Derivation>,
    hasher: DerivationHasher,
}

/// A description of a derivation to make.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its system.
    pub system: &'a str,
    /// Its inputs (their `out`).
    pub inputs: Vec<&'a FakeDrv>,
    /// Extra environment variables.
    pub env: Vec<(&'a str, &'a str)>,
}

impl<'a> Spec<'a> {
    /// An `x86_64-linux` derivation with no inputs.
    #[must_use]
    pub fn new(name: &'a str) -> Self {
        Self {
            name,
            system: "x86_64-linux",
            inputs: Vec::new(),
            env: Vec::new(),
        }
    }

    /// With inputs.
    #[must_use]
    pub fn inputs(mut self, inputs: &[&'a FakeDrv]) -> Self {
        self.inputs = inputs.to_vec();
        self
    }

    /// With a system.
    #[must_use]
    pub fn system(mut self, system: &'a str) -> Self {
        self.system = system;
        self
    }

    /// With an environment variable.
    #[must_use]
    pub fn env(mut self, key: &'a str, value: &'a str) -> Self {
        self.env.push((key, value));
        self
    }
}

impl Factory {
    /// Makes a derivation from `spec`.
    pub fn make(&mut self, spec: &Spec<'_>) -> FakeDrv {
        let placeholder =
            StorePath::from_absolute(&format!("/nix/store/{}-{}", "0".repeat(32), spec.name))
                .unwrap();
        let mut env: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for (key, value) in [
            ("name", spec.name),
            ("system", spec.system),
            ("builder", "/bin/sh"),
        ]
        .into_iter()
        .chain(spec.env.iter().copied())
        {
            env.insert(key.as_bytes().to_vec(), value.as_bytes().to_vec());
        }
        env.insert(b"out".to_vec(), placeholder.to_absolute().into_bytes());
        for (index, input) in spec.inputs.iter().enumerate() {
            env.insert(
                format!("input{index}").into_bytes(),
                input.out.to_absolute().into_bytes(),
            );
        }
        let mut derivation = Derivation {
            outputs: BTreeMap::from([(
                "out".to_owned(),
                DerivationOutput::InputAddressed {
                    path: placeholder.clone(),
                },
            )]),
            input_derivations: spec
                .inputs
                .iter()
                .map(|input| (input.path.clone(), BTreeSet::from(["out".to_owned()])))
                .collect(),
            input_sources: BTreeSet::new(),
            system: spec.system.as_bytes().to_vec(),
            builder: b"/bin/sh".to_vec(),
            args: vec![b"-c".to_vec(), b"echo > $out".to_vec()],
            env,
        };
        let name_path =
            StorePath::from_absolute(&format!("/nix/store/{}-{}.drv", "0".repeat(32), spec.name))
                .unwrap();
        let known = &self.known;
        let outputs = self
            .hasher
            .output_paths(&name_path, &derivation, |path| known.get(path))
            .unwrap();
        let out = outputs["out"].clone();
        derivation.outputs.insert(
            "out".to_owned(),
            DerivationOutput::InputAddressed { path: out.clone() },
        );
        derivation
            .env
            .insert(b"out".to_vec(), out.to_absolute().into_bytes());
        let text = derivation.to_aterm();
        let path = derivation_path(spec.name, &text, &derivation).unwrap();
        self.known.insert(path.clone(), derivation);
        FakeDrv { path, text, out }
    }

    /// A random DAG of `size` derivations (each with up to three inputs among the earlier ones),
    /// plus a top-level derivation depending on every one nothing else depends on. Returns all of
    /// them, the top-level one last.
    pub fn random_dag(&mut self, prefix: &str, size: usize, seed: u64) -> Vec<FakeDrv> {
        let mut state = seed.max(1);
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut drvs: Vec<FakeDrv> = Vec::with_capacity(size + 1);
        let mut has_dependents = vec![false; size];
        for index in 0..size {
            let mut inputs = BTreeSet::new();
            if index > 0 {
                for _ in 0..(next() % 4) {
                    inputs.insert(usize::try_from(next() % index as u64).unwrap());
                }
            }
            for input in &inputs {
                has_dependents[*input] = true;
            }
            let name = format!("{prefix}-{index}");
            let input_drvs: Vec<&FakeDrv> = inputs.iter().map(|i| &drvs[*i]).collect();
            let drv = self.make(&Spec::new(&name).inputs(&input_drvs));
            drvs.push(drv);
        }
        let sinks: Vec<&FakeDrv> = drvs
            .iter()
            .zip(&has_dependents)
            .filter(|(_, has)| !**has)
            .map(|(drv, _)| drv)
            .collect();
        let top = self.make(&Spec::new(&format!("{prefix}-top")).inputs(&sinks));
        drvs.push(top);
        drvs
    }
}

impl Factory {
    /// A fixed-output derivation whose output is a single file with `contents` (flat SHA-256).
    pub fn make_fixed(&mut self, name: &str, contents: &[u8]) -> FakeDrv {
        use nix_primitives::content_address::fixed_output_path;
        use nix_primitives::{Hash, IngestionMethod};
        let hash = Hash::sha256(contents);
        let out =
            fixed_output_path(name, IngestionMethod::Flat, &hash, &BTreeSet::new(), false).unwrap();
        let env: BTreeMap<Vec<u8>, Vec<u8>> = [
            ("name", name.to_owned()),
            ("system", "builtin".to_owned()),
            ("builder", "builtin:fetchurl".to_owned()),
            ("out", out.to_absolute()),
            ("outputHash", hash.to_base16()),
            ("outputHashAlgo", "sha256".to_owned()),
            ("outputHashMode", "flat".to_owned()),
        ]
        .into_iter()
        .map(|(key, value)| (key.as_bytes().to_vec(), value.into_bytes()))
        .collect();
        let derivation = Derivation {
            outputs: BTreeMap::from([(
                "out".to_owned(),
                DerivationOutput::Fixed {
                    path: out.clone(),
                    method: IngestionMethod::Flat,
                    hash,
                },
            )]),
            input_derivations: BTreeMap::new(),
            input_sources: BTreeSet::new(),
            system: b"builtin".to_vec(),
            builder: b"builtin:fetchurl".to_vec(),
            args: Vec::new(),
            env,
        };
        let text = derivation.to_aterm();
        let path = derivation_path(name, &text, &derivation).unwrap();
        self.known.insert(path.clone(), derivation);
        FakeDrv { path, text, out }
    }
}
