//! Golden tests: derivations instantiated by the real Nix from `fixtures/derivations.nix`, parsed,
//! printed and hashed by drover, and compared with what Nix wrote and computed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod support;

use std::collections::{BTreeMap, BTreeSet};

use nix_primitives::derivation::{OutputPathError, derivation_path};
use nix_primitives::{
    ContentAddress, Derivation, DerivationHasher, DerivationKind, Hash, IngestionMethod, StorePath,
};
use support::{Nix, fixtures, store_path};

/// For each fixture attribute: its `.drv` path and its output paths, as Nix computed them.
const FIXTURE_PATHS: &str = r#"builtins.mapAttrs (name: drv: {
  drvPath = drv.drvPath;
  outputs = builtins.listToAttrs (map
    (output: { name = output; value = drv.${output}.outPath; })
    (drv.outputs or [ "out" ]));
}) (import ./derivations.nix)"#;

/// The fixtures instantiated into one store, with the whole derivation closure read back.
struct Instantiated {
    nix: Nix,
    /// Attribute name → (drv path, output name → output path), as Nix computed them.
    attributes: BTreeMap<String, (StorePath, BTreeMap<String, String>)>,
    /// Every `.drv` in the closure: its exact bytes and its parse.
    derivations: BTreeMap<StorePath, (Vec<u8>, Derivation)>,
}

impl Instantiated {
    fn new() -> Self {
        let nix = Nix::new();
        let json = nix.eval_json(FIXTURE_PATHS, &fixtures());
        let attributes: BTreeMap<_, _> = json
            .as_object()
            .expect("the fixtures evaluate to an attribute set")
            .iter()
            .map(|(name, value)| {
                let drv = store_path(value["drvPath"].as_str().expect("drvPath is a string"));
                let outputs = value["outputs"]
                    .as_object()
                    .expect("outputs is an attribute set")
                    .iter()
                    .map(|(output, path)| {
                        (output.clone(), path.as_str().expect("a path").to_owned())
                    })
                    .collect();
                (name.clone(), (drv, outputs))
            })
            .collect();
        let mut derivations = BTreeMap::new();
        let mut pending: Vec<StorePath> = attributes.values().map(|(drv, _)| drv.clone()).collect();
        while let Some(path) = pending.pop() {
            if derivations.contains_key(&path) {
                continue;
            }
            let text = fs_err::read(nix.real_path(&path)).expect("Nix wrote the .drv");
            let derivation =
                Derivation::parse(&text).unwrap_or_else(|error| panic!("parsing {path}: {error}"));
            pending.extend(derivation.input_derivations.keys().cloned());
            derivations.insert(path, (text, derivation));
        }
        Self {
            nix,
            attributes,
            derivations,
        }
    }

    fn derivation(&self, attribute: &str) -> (&StorePath, &Derivation) {
        let (path, _) = &self.attributes[attribute];
        (path, &self.derivations[path].1)
    }

    fn lookup<'s>(&'s self) -> impl Fn(&StorePath) -> Option<&'s Derivation> + 's {
        |path| self.derivations.get(path).map(|(_, derivation)| derivation)
    }
}

/// Fixtures whose output paths Nix does not know before the build, with the kind drover must see.
fn unsupported_kinds() -> BTreeMap<&'static str, DerivationKind> {
    BTreeMap::from([
        (
            "floatingContentAddressed",
            DerivationKind::FloatingContentAddressed,
        ),
        ("impure", DerivationKind::Impure),
        ("deferred", DerivationKind::Deferred),
    ])
}

#[test]
fn every_derivation_prints_back_to_the_bytes_nix_wrote_and_hashes_to_its_path() {
    let fixtures = Instantiated::new();
    assert!(
        fixtures.derivations.len() >= 60,
        "only {} derivations in the closure",
        fixtures.derivations.len()
    );
    for (path, (text, derivation)) in &fixtures.derivations {
        assert_eq!(
            derivation.to_aterm(),
            *text,
            "{path} does not print back to Nix's bytes"
        );
        let name = path.derivation_name().expect("a .drv path");
        assert_eq!(&derivation_path(name, text, derivation).unwrap(), path);
    }
}

#[test]
fn output_paths_match_nix_for_every_supported_derivation() {
    let fixtures = Instantiated::new();
    let unsupported = unsupported_kinds();
    let mut hasher = DerivationHasher::new();
    let mut checked = 0;
    for (attribute, (path, nix_outputs)) in &fixtures.attributes {
        let derivation = &fixtures.derivations[path].1;
        let kind = derivation.kind().unwrap();
        if let Some(expected) = unsupported.get(attribute.as_str()) {
            assert_eq!(kind, *expected, "{attribute}");
            assert!(!kind.is_supported());
            let error = hasher
                .verify(path, derivation, fixtures.lookup())
                .unwrap_err();
            assert!(
                matches!(error, OutputPathError::Unsupported { kind: found, .. } if found == kind),
                "{attribute}: {error}"
            );
            continue;
        }
        let computed = hasher
            .verify(path, derivation, fixtures.lookup())
            .unwrap_or_else(|error| panic!("{attribute} ({path}): {error}"));
        let computed: BTreeMap<String, String> = computed
            .into_iter()
            .map(|(output, path)| (output, path.to_absolute()))
            .collect();
        assert_eq!(&computed, nix_outputs, "{attribute}");
        checked += 1;
    }
    assert!(checked >= 35, "only {checked} supported fixtures checked");
}

#[test]
fn every_dependency_in_the_closure_also_hashes_like_nix() {
    let fixtures = Instantiated::new();
    let mut hasher = DerivationHasher::new();
    for (path, (_, derivation)) in &fixtures.derivations {
        let supported = derivation.kind().unwrap().is_supported()
            && derivation
                .input_derivations
                .keys()
                .all(|input| fixtures.derivations[input].1.kind().unwrap().is_supported());
        if supported {
            hasher
                .verify(path, derivation, fixtures.lookup())
                .unwrap_or_else(|error| panic!("{path}: {error}"));
        }
    }
}

#[test]
fn a_verified_input_needs_no_parse_to_verify_its_dependents() {
    let fixtures = Instantiated::new();
    let mut hasher = DerivationHasher::new();
    let (input, input_derivation) = fixtures.derivation("simple");
    let (dependent, dependent_derivation) = fixtures.derivation("dependsOnSimple");
    assert!(
        dependent_derivation.input_derivations.contains_key(input),
        "the fixture dependsOnSimple must depend on simple"
    );
    assert!(matches!(
        hasher.verify(dependent, dependent_derivation, |_| None),
        Err(OutputPathError::MissingInput(missing)) if missing == *input
    ));
    hasher
        .verify(input, input_derivation, fixtures.lookup())
        .unwrap();
    let computed = hasher
        .verify(dependent, dependent_derivation, |_| None)
        .unwrap();
    assert_eq!(
        computed["out"].to_absolute(),
        fixtures.attributes["dependsOnSimple"].1["out"]
    );

    // What a store keeps of the input is enough for another hasher.
    let stored = hasher.hash_modulo(input).unwrap();
    let mut restarted = DerivationHasher::new();
    restarted.remember(
        input.clone(),
        input_derivation.outputs.keys().cloned(),
        stored,
    );
    assert_eq!(
        restarted
            .verify(dependent, dependent_derivation, |_| None)
            .unwrap(),
        computed
    );
    let mut forged = DerivationHasher::new();
    forged.remember(
        input.clone(),
        input_derivation.outputs.keys().cloned(),
        Hash::sha256(b"another derivation"),
    );
    assert!(matches!(
        forged.verify(dependent, dependent_derivation, |_| None),
        Err(OutputPathError::PathMismatch { .. })
    ));
}

#[test]
fn kinds_features_and_strings_are_read_as_nix_wrote_them() {
    let fixtures = Instantiated::new();
    let features = |attribute| {
        fixtures
            .derivation(attribute)
            .1
            .required_system_features()
            .unwrap()
    };
    let set = |items: &[&str]| {
        items
            .iter()
            .map(|item| (*item).to_owned())
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(features("structuredAttrs"), set(&["big-parallel", "kvm"]));
    assert_eq!(features("plainFeatures"), set(&["kvm", "nixos-test"]));
    assert_eq!(features("simple"), set(&[]));
    assert!(
        fixtures
            .derivation("structuredAttrs")
            .1
            .env
            .contains_key(b"__json".as_slice())
    );

    let (_, builtin) = fixtures.derivation("builtinFetch");
    assert!(builtin.is_builtin());
    assert_eq!(builtin.kind().unwrap(), DerivationKind::FixedOutput);
    assert!(!fixtures.derivation("simple").1.is_builtin());

    let (_, escapes) = fixtures.derivation("escapes");
    assert_eq!(
        escapes.env[b"weird".as_slice()],
        b"quote \" backslash \\ newline \n tab \t cr \r dollar ${x} end"
    );
    let (_, non_utf8) = fixtures.derivation("nonUtf8");
    assert_eq!(
        non_utf8.env[b"bytes".as_slice()],
        fs_err::read(fixtures_file("latin1.bin")).unwrap()
    );
    assert!(non_utf8.env_str("bytes").is_none());

    let (_, multi) = fixtures.derivation("multiOutput");
    assert_eq!(
        multi.outputs.keys().collect::<Vec<_>>(),
        ["dev", "lib", "out"]
    );
    let (_, uses_dev) = fixtures.derivation("usesSecondOutput");
    let wanted: Vec<_> = uses_dev.input_derivations.values().flatten().collect();
    assert_eq!(wanted, ["dev"]);
    let (_, recursive) = fixtures.derivation("fixedRecursiveSha1");
    assert!(matches!(
        recursive.outputs["out"],
        nix_primitives::DerivationOutput::Fixed {
            method: IngestionMethod::Recursive,
            ..
        }
    ));
}

fn fixtures_file(name: &str) -> std::path::PathBuf {
    fixtures().join(name)
}

#[test]
fn tampered_derivations_are_rejected_with_typed_errors() {
    let fixtures = Instantiated::new();
    let mut hasher = DerivationHasher::new();
    let (path, original) = fixtures.derivation("dependsOnSimple");

    let mut wrong_path = original.clone();
    let other = store_path(&fixtures.attributes["simple"].1["out"]);
    wrong_path.outputs.insert(
        "out".to_owned(),
        nix_primitives::DerivationOutput::InputAddressed {
            path: other.clone(),
        },
    );
    wrong_path
        .env
        .insert(b"out".to_vec(), other.to_absolute().into_bytes());
    assert!(matches!(
        hasher.verify(path, &wrong_path, fixtures.lookup()),
        Err(OutputPathError::PathMismatch { written, .. }) if written == other
    ));

    let mut wrong_env = original.clone();
    wrong_env
        .env
        .insert(b"out".to_vec(), b"/tmp/elsewhere".to_vec());
    assert!(matches!(
        hasher.verify(path, &wrong_env, fixtures.lookup()),
        Err(OutputPathError::EnvironmentMismatch { output, .. }) if output == "out"
    ));

    let mut changed_builder = original.clone();
    changed_builder.builder = b"/bin/bash".to_vec();
    assert!(matches!(
        hasher.verify(path, &changed_builder, fixtures.lookup()),
        Err(OutputPathError::PathMismatch { .. })
    ));

    let empty = DerivationHasher::new().verify(path, original, |_| None);
    assert!(matches!(empty, Err(OutputPathError::MissingInput(_))));

    let (top, diamond) = fixtures.derivation("usesSecondOutput");
    let mut missing_output = diamond.clone();
    for outputs in missing_output.input_derivations.values_mut() {
        outputs.insert("man".to_owned());
    }
    assert!(matches!(
        DerivationHasher::new().verify(top, &missing_output, fixtures.lookup()),
        Err(OutputPathError::MissingOutput { output, .. }) if output == "man"
    ));
}

#[test]
fn input_sources_hash_to_the_paths_nix_gave_them() {
    let fixtures = Instantiated::new();
    let sources: BTreeSet<StorePath> = fixtures
        .derivations
        .values()
        .flat_map(|(_, derivation)| derivation.input_sources.iter().cloned())
        .filter(|path| !path.is_derivation())
        .collect();
    assert!(sources.len() >= 6, "only {} input sources", sources.len());

    let mut command = fixtures.nix.command("nix");
    command
        .args(["path-info", "--json"])
        .args(sources.iter().map(StorePath::to_absolute));
    let infos: Vec<serde_json::Value> =
        serde_json::from_slice(&support::run(command)).expect("path-info prints JSON");
    assert_eq!(infos.len(), sources.len());
    let mut methods = BTreeSet::new();
    for info in infos {
        let path = store_path(info["path"].as_str().unwrap());
        let references: BTreeSet<StorePath> = info["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(|reference| store_path(reference.as_str().unwrap()))
            .collect();
        let content_address = ContentAddress::parse(info["ca"].as_str().unwrap()).unwrap();
        assert_eq!(
            content_address
                .store_path(path.name(), &references, false)
                .unwrap(),
            path
        );
        let on_disk = fixtures.nix.real_path(&path);
        let recomputed = match content_address {
            ContentAddress::Text(_) => {
                ContentAddress::Text(Hash::sha256(&fs_err::read(&on_disk).unwrap()))
            }
            ContentAddress::Fixed {
                method: IngestionMethod::Flat,
                hash,
            } => ContentAddress::Fixed {
                method: IngestionMethod::Flat,
                hash: Hash::digest(hash.algorithm(), &fs_err::read(&on_disk).unwrap()),
            },
            ContentAddress::Fixed {
                method: IngestionMethod::Recursive,
                ..
            } => {
                let mut nar = Vec::new();
                nix_primitives::nar::dump(&on_disk, &mut nar).unwrap();
                ContentAddress::Fixed {
                    method: IngestionMethod::Recursive,
                    hash: Hash::sha256(&nar),
                }
            }
        };
        assert_eq!(recomputed, content_address, "{path}");
        methods.insert(match content_address {
            ContentAddress::Text(_) => "text",
            ContentAddress::Fixed {
                method: IngestionMethod::Flat,
                ..
            } => "flat",
            ContentAddress::Fixed {
                method: IngestionMethod::Recursive,
                ..
            } => "recursive",
        });
    }
    assert_eq!(methods, BTreeSet::from(["flat", "recursive", "text"]));
}
