//! The real Nix for end-to-end tests: instantiating expressions into a test's own chroot store,
//! reading derivation closures back, and running commands (builders included) with a private
//! `/nix` in a mount namespace of their own, as separate machines would have.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix_primitives::{Derivation, StorePath};

pub use test_support::farm::NIX_CONFIG;
pub use test_support::private_store_command;

/// A chroot store under a test directory: `nix --store DIR` keeps everything below DIR.
pub struct ChrootStore {
    /// Its root.
    pub root: PathBuf,
    /// Its narinfo cache and home.
    pub home: PathBuf,
}

impl ChrootStore {
    /// A store at `root`.
    pub fn new(root: PathBuf) -> Self {
        let home = root.with_extension("home");
        fs_err::create_dir_all(&home).unwrap();
        Self { root, home }
    }

    /// A Nix command bound to this store.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.arg("--store").arg(&self.root);
        test_support::farm::nix_environment(&mut command, &self.home);
        command
    }

    /// Writes a Nix expression to a file of its own beside the store; returns the file.
    pub fn expression(&self, text: &str) -> PathBuf {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut hasher);
        let file = self
            .home
            .join(format!("expression-{:016x}.nix", hasher.finish()));
        fs_err::write(&file, text).unwrap();
        file
    }

    /// Instantiates `attribute` of a Nix file; returns the `.drv` path.
    pub fn instantiate(&self, file: &Path, attribute: &str) -> StorePath {
        let output = self
            .command("nix-instantiate")
            .arg(file)
            .args(["--attr", attribute])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "nix-instantiate: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        StorePath::from_absolute(String::from_utf8(output.stdout).unwrap().trim()).unwrap()
    }

    /// Where a store path's contents are.
    pub fn real_path(&self, path: &StorePath) -> PathBuf {
        self.root.join("nix/store").join(path.base_name())
    }

    /// The input sources of a derivation closure as NARs, with their references, as a client
    /// uploads them.
    pub fn sources(
        &self,
        closure: &BTreeMap<StorePath, (Vec<u8>, Derivation)>,
    ) -> Vec<drover_proto::v1::SourceNar> {
        let sources: std::collections::BTreeSet<&StorePath> = closure
            .values()
            .flat_map(|(_, derivation)| derivation.input_sources.iter())
            .collect();
        sources
            .into_iter()
            .map(|path| {
                let mut nar = Vec::new();
                nix_primitives::nar::dump(&self.real_path(path), &mut nar).unwrap();
                let output = self
                    .command("nix-store")
                    .args(["--query", "--references", &path.to_absolute()])
                    .output()
                    .unwrap();
                assert!(output.status.success());
                drover_proto::v1::SourceNar {
                    path: path.to_absolute(),
                    references: String::from_utf8(output.stdout)
                        .unwrap()
                        .lines()
                        .map(str::to_owned)
                        .collect(),
                    nar,
                }
            })
            .collect()
    }

    /// The derivation closure of `top`, texts and parses, read from the store.
    pub fn closure(&self, top: &StorePath) -> BTreeMap<StorePath, (Vec<u8>, Derivation)> {
        let mut closure = BTreeMap::new();
        let mut pending = vec![top.clone()];
        while let Some(path) = pending.pop() {
            if closure.contains_key(&path) {
                continue;
            }
            let text = fs_err::read(self.real_path(&path)).unwrap();
            let derivation = Derivation::parse(&text).unwrap();
            pending.extend(derivation.input_derivations.keys().cloned());
            closure.insert(path, (text, derivation));
        }
        closure
    }
}

/// The examples directory of the repository.
pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}
