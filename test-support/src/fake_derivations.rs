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
        let mut random = XorShift::new(seed);
        let (mut drvs, sinks) = self.random_graph(prefix, size, |index| {
            let mut inputs = BTreeSet::new();
            if index > 0 {
                for _ in 0..random.below(4) {
                    inputs.insert(random.below(index));
                }
            }
            inputs
        });
        let sinks: Vec<&FakeDrv> = sinks.iter().map(|index| &drvs[*index]).collect();
        let top = self.make(&Spec::new(&format!("{prefix}-top")).inputs(&sinks));
        drvs.push(top);
        drvs
    }

    /// `size` derivations named `prefix-<index>`, each depending on the earlier ones
    /// `inputs_of(index)` names; returns them and the indices of those nothing depends on.
    fn random_graph(
        &mut self,
        prefix: &str,
        size: usize,
        mut inputs_of: impl FnMut(usize) -> BTreeSet<usize>,
    ) -> (Vec<FakeDrv>, Vec<usize>) {
        let mut drvs: Vec<FakeDrv> = Vec::with_capacity(size + size / 32 + 2);
        let mut has_dependents = vec![false; size];
        for index in 0..size {
            let inputs = inputs_of(index);
            for input in &inputs {
                has_dependents[*input] = true;
            }
            let name = format!("{prefix}-{index}");
            let input_drvs: Vec<&FakeDrv> = inputs.iter().map(|i| &drvs[*i]).collect();
            let drv = self.make(&Spec::new(&name).inputs(&input_drvs));
            drvs.push(drv);
        }
        let sinks = (0..size).filter(|index| !has_dependents[*index]).collect();
        (drvs, sinks)
    }
}

/// A small deterministic generator (xorshift), so a seed always makes the same graph.
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (0 counts as 1).
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next number below `bound` (0 for a bound of 0).
    pub fn below(&mut self, bound: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        usize::try_from(self.0 % bound.max(1) as u64).unwrap()
    }
}

/// Most inputs any derivation made by the graph shapes below has: real derivations do not have
/// thousands of inputs, so wide graphs are closed by a tree of this fan-in.
pub const MAX_FAN_IN: usize = 64;

impl Factory {
    /// Derivations that depend on `roots` through a tree of fan-in at most [`MAX_FAN_IN`],
    /// ending in one top-level derivation; appended to `drvs`, the top last.
    fn close_with_tree(&mut self, prefix: &str, drvs: &mut Vec<FakeDrv>, mut roots: Vec<usize>) {
        let mut level = 0;
        loop {
            let mut next = Vec::new();
            for (index, group) in roots.chunks(MAX_FAN_IN).enumerate() {
                let name = format!("{prefix}-tree{level}-{index}");
                let inputs: Vec<&FakeDrv> = group.iter().map(|i| &drvs[*i]).collect();
                let drv = self.make(&Spec::new(&name).inputs(&inputs));
                drvs.push(drv);
                next.push(drvs.len() - 1);
            }
            if next.len() == 1 {
                return;
            }
            roots = next;
            level += 1;
        }
    }

    /// A chain of `length` derivations, each depending on the one before; the last is the top.
    pub fn chain(&mut self, prefix: &str, length: usize) -> Vec<FakeDrv> {
        let mut drvs: Vec<FakeDrv> = Vec::with_capacity(length);
        for index in 0..length {
            let name = format!("{prefix}-{index}");
            let inputs: Vec<&FakeDrv> = drvs.last().into_iter().collect();
            let drv = self.make(&Spec::new(&name).inputs(&inputs));
            drvs.push(drv);
        }
        drvs
    }

    /// One derivation that `width` others depend on, closed by a tree up to one top.
    pub fn fan_out(&mut self, prefix: &str, width: usize) -> Vec<FakeDrv> {
        let mut drvs = vec![self.make(&Spec::new(&format!("{prefix}-root")))];
        for index in 0..width {
            let name = format!("{prefix}-{index}");
            let drv = self.make(&Spec::new(&name).inputs(&[&drvs[0]]));
            drvs.push(drv);
        }
        self.close_with_tree(prefix, &mut drvs, (1..=width).collect());
        drvs
    }

    /// `count` independent diamonds (a ← b, a ← c, {b, c} ← d), closed by a tree.
    pub fn diamonds(&mut self, prefix: &str, count: usize) -> Vec<FakeDrv> {
        let mut drvs: Vec<FakeDrv> = Vec::with_capacity(count * 4 + count / 32 + 2);
        let mut tops = Vec::with_capacity(count);
        for index in 0..count {
            let a = self.make(&Spec::new(&format!("{prefix}-{index}-a")));
            let b = self.make(&Spec::new(&format!("{prefix}-{index}-b")).inputs(&[&a]));
            let c = self.make(&Spec::new(&format!("{prefix}-{index}-c")).inputs(&[&a]));
            let d = self.make(&Spec::new(&format!("{prefix}-{index}-d")).inputs(&[&b, &c]));
            drvs.extend([a, b, c, d]);
            tops.push(drvs.len() - 1);
        }
        self.close_with_tree(prefix, &mut drvs, tops);
        drvs
    }

    /// A layered DAG of about `size` derivations from `seed`: layers of `layer_width`, each
    /// derivation with 1 to 5 inputs from earlier layers (none in the first), then a tree up to
    /// one top over every derivation nothing depends on. Inputs first, the top last.
    pub fn layered_dag(
        &mut self,
        prefix: &str,
        size: usize,
        layer_width: usize,
        seed: u64,
    ) -> Vec<FakeDrv> {
        let mut random = XorShift::new(seed);
        let (mut drvs, sinks) = self.random_graph(prefix, size, |index| {
            let layer_start = index - index % layer_width.max(1);
            let mut inputs = BTreeSet::new();
            if layer_start > 0 {
                for _ in 0..=random.below(5) {
                    inputs.insert(random.below(layer_start));
                }
            }
            inputs
        });
        self.close_with_tree(prefix, &mut drvs, sinks);
        drvs
    }

    /// A graph shaped like a nixpkgs evaluation, from `seed`: `size` derivations in `depth`
    /// layers, the first few small (a bootstrap), each derivation with 1 to 10 inputs: one from
    /// the layer below (so the graph is `depth` deep), usually one hub picked with a heavy tail
    /// (the first derivations get thousands of dependents, as a bootstrap stdenv does), and up to
    /// eight more from earlier layers. Each carries 2 to 10 KB of build flags, so its text is the
    /// size of a real one. Returns the derivations, inputs first, and the indices of the jobs:
    /// every derivation nothing depends on, then others at random up to `jobs`.
    pub fn nixpkgs_shaped(
        &mut self,
        prefix: &str,
        size: usize,
        depth: usize,
        jobs: usize,
        seed: u64,
    ) -> (Vec<FakeDrv>, Vec<usize>) {
        let mut random = XorShift::new(seed);
        let bootstrap = [1, 4, 16, 64];
        let mut layer_starts = vec![0];
        for width in bootstrap {
            layer_starts.push(layer_starts.last().copied().unwrap_or_default() + width);
        }
        let rest = depth.saturating_sub(bootstrap.len()).max(1);
        let width = size
            .saturating_sub(layer_starts[bootstrap.len()])
            .div_ceil(rest);
        while layer_starts.last().copied().unwrap_or_default() < size {
            let next = layer_starts.last().copied().unwrap_or_default() + width.max(1);
            layer_starts.push(next.min(size));
        }
        let mut drvs: Vec<FakeDrv> = Vec::with_capacity(size);
        let mut has_dependents = vec![false; size];
        let flags: Vec<String> = (0..64).map(|n| format!("--enable-feature-{n} ")).collect();
        for layer in 0..layer_starts.len() - 1 {
            let (start, end) = (layer_starts[layer], layer_starts[layer + 1]);
            for index in start..end {
                let mut inputs = BTreeSet::new();
                if layer > 0 {
                    let below = layer_starts[layer - 1];
                    inputs.insert(below + random.below(start - below));
                    if random.below(10) < 9 {
                        // A cube skews the pick towards the first derivations: a heavy tail.
                        let reach = u64::try_from(start.min(4096)).unwrap_or(0);
                        let pick = u64::try_from(random.below(1000)).unwrap_or(0);
                        let skewed = pick * pick * pick * reach / 1_000_000_000;
                        inputs.insert(usize::try_from(skewed).unwrap_or(0));
                    }
                    for _ in 0..random.below(9) {
                        inputs.insert(random.below(start));
                    }
                }
                for input in &inputs {
                    has_dependents[*input] = true;
                }
                let mut padding = String::new();
                let target = 2048 + random.below(8192);
                while padding.len() < target {
                    padding.push_str(&flags[random.below(flags.len())]);
                }
                let name = format!("{prefix}-{index}");
                let input_drvs: Vec<&FakeDrv> = inputs.iter().map(|i| &drvs[*i]).collect();
                let drv = self.make(
                    &Spec::new(&name)
                        .inputs(&input_drvs)
                        .env("configureFlags", &padding),
                );
                drvs.push(drv);
            }
        }
        let mut picked: Vec<usize> = (0..size).filter(|index| !has_dependents[*index]).collect();
        let mut chosen: BTreeSet<usize> = picked.iter().copied().collect();
        while picked.len() < jobs.min(size) {
            let index = random.below(size);
            if chosen.insert(index) {
                picked.push(index);
            }
        }
        (drvs, picked)
    }

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
