//! The attribute path of each derivation a Nix file or expression yields, for naming the jobs of
//! a job set as Hydra and nix-eval-jobs do (`hello`, `tests.simple`). `nix-instantiate` prints
//! only `.drv` paths, so a second, read-only evaluation walks the value the way it does: the
//! top-level set's attributes in name order, into sets marked `recurseForDerivations` and into
//! lists, calling functions with the `--arg`s they take. Its order is the order of the paths
//! `nix-instantiate` printed.

use std::path::Path;
use std::process::Command;

/// The walk: a function of the auto-arguments given to `nix-instantiate`, the target's value
/// and the attribute path to select in it.
const WALK: &str = r#"args: target: attrPath:
let
  call = f: if builtins.isFunction f
    then f (builtins.intersectAttrs (builtins.functionArgs f) args) else f;
  select = value: key: let v = call value; in
    if builtins.isList v then builtins.elemAt v (builtins.fromJSON key) else v.${key};
  isDerivation = v: builtins.isAttrs v && (v.type or null) == "derivation";
  walk = path: v:
    if isDerivation v then [ path ]
    else if builtins.isAttrs v then builtins.concatMap (name:
      let child = v.${name}; in
      if isDerivation child || (builtins.isAttrs child && (child.recurseForDerivations or false))
      then walk (path ++ [ name ]) child else [ ]) (builtins.attrNames v)
    else if builtins.isList v then builtins.concatLists (builtins.genList
      (i: walk (path ++ [ (toString i) ]) (builtins.elemAt v i)) (builtins.length v))
    else [ ];
  selected = call (builtins.foldl' select target attrPath);
in map (builtins.concatStringsSep ".") (walk [ ] selected)
"#;

/// The attribute path of each derivation `nix-instantiate` printed for the same target, in its
/// order (`attr` prefixed); `None` when the walk fails or disagrees, so names fall back to
/// derivation names. `nix_arguments` adds the caller's `--arg`, `--argstr` and `-I` flags.
pub fn paths(
    target: Target<'_>,
    attr: Option<&str>,
    printed: usize,
    nix_arguments: impl FnOnce(&mut Command),
) -> Option<Vec<String>> {
    let attr_path: Vec<&str> = attr
        .map(|attr| attr.split('.').filter(|key| !key.is_empty()).collect())
        .unwrap_or_default();
    let expression = format!(
        "args@{{ ... }}: ({WALK}) args ({}) {}",
        target.expression()?,
        nix_list(&attr_path)
    );
    let mut command = Command::new("nix-instantiate");
    command.args(["--eval", "--strict", "--json", "--expr", &expression]);
    // `--eval` calls the walk only when some argument is given; functions never see this one.
    command.args(["--arg", "droverWalk", "true"]);
    nix_arguments(&mut command);
    let output = command.output().ok()?;
    if !output.status.success() {
        return None;
    }
    let walked: Vec<String> = serde_json::from_slice(&output.stdout).ok()?;
    (walked.len() == printed).then(|| {
        walked
            .into_iter()
            .map(|path| match (attr, path.is_empty()) {
                (Some(attr), true) => attr.to_owned(),
                (Some(attr), false) => format!("{attr}.{path}"),
                (None, _) => path,
            })
            .collect()
    })
}

/// What was instantiated.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// A file, a directory with a `default.nix`, or a search-path entry (`<nixpkgs>`).
    File(&'a Path),
    /// An expression given with `-E`.
    Expression(&'a str),
}

impl Target<'_> {
    /// The target as a Nix expression; `None` for a path that is not valid UTF-8.
    fn expression(self) -> Option<String> {
        match self {
            Self::Expression(expression) => Some(format!("({expression})")),
            Self::File(path) => {
                let text = path.to_str()?;
                if text.starts_with('<') && text.ends_with('>') {
                    return Some(format!("import {text}"));
                }
                let absolute = std::path::absolute(path).ok()?;
                Some(format!("import (/. + {})", nix_string(absolute.to_str()?)))
            }
        }
    }
}

/// `keys` as a Nix list of strings.
fn nix_list(keys: &[&str]) -> String {
    let items: Vec<String> = keys.iter().map(|key| nix_string(key)).collect();
    format!("[ {} ]", items.join(" "))
}

/// `text` as a Nix string literal.
fn nix_string(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace("${", "\\${");
    format!("\"{escaped}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOBS: &str = r#"{ greeting ? "hi" }:
let mk = name: derivation {
  inherit name; system = "x86_64-linux"; builder = "/bin/sh"; args = [ greeting ];
};
in {
  hello = mk "hello-1.0";
  nested = { recurseForDerivations = true; a = mk "a"; b = mk "b"; };
  skipped = { c = mk "c"; };
  list = [ (mk "l0") ];
  dup = mk "b";
}
"#;

    /// The attribute paths the walk finds, and the names of the derivations `nix-instantiate`
    /// prints for the same target, in its order.
    fn walked_and_printed(file: &Path, attr: Option<&str>) -> (Vec<String>, Vec<String>) {
        let mut command = Command::new("nix-instantiate");
        command.arg(file).args(["--argstr", "greeting", "x"]);
        if let Some(attr) = attr {
            command.args(["--attr", attr]);
        }
        let output = command
            .output()
            .expect("nix-instantiate runs (is nix-bin installed?)");
        assert!(output.status.success(), "{output:?}");
        let printed: Vec<String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| {
                let base = line.rsplit('/').next().unwrap_or_default();
                let name = base.split_once('-').map_or(base, |(_, name)| name);
                name.trim_end_matches(".drv").to_owned()
            })
            .collect();
        let walked = paths(Target::File(file), attr, printed.len(), |command| {
            command.args(["--argstr", "greeting", "x"]);
        })
        .expect("the walk agrees with nix-instantiate");
        (walked, printed)
    }

    #[test]
    fn jobs_are_named_by_attribute_path_in_nix_instantiates_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jobs.nix");
        fs_err::write(&file, JOBS).unwrap();
        let (walked, printed) = walked_and_printed(&file, None);
        assert_eq!(walked, ["dup", "hello", "nested.a", "nested.b"]);
        assert_eq!(printed, ["b", "hello-1.0", "a", "b"]);
        let (walked, _) = walked_and_printed(&file, Some("nested"));
        assert_eq!(walked, ["nested.a", "nested.b"]);

        let listed = paths(
            Target::Expression(&format!("(import {} {{ }}).list", file.display())),
            None,
            1,
            |_| {},
        );
        assert_eq!(listed.as_deref(), Some(&["0".to_owned()][..]));
        let disagreeing = paths(Target::File(&file), None, 3, |_| {});
        assert_eq!(
            disagreeing, None,
            "a count unlike nix-instantiate's is not trusted"
        );
    }

    #[test]
    fn strings_are_quoted_so_nix_reads_them_back_verbatim() {
        assert_eq!(nix_string(r#"a"b\c${d}"#), r#""a\"b\\c\${d}""#);
        assert_eq!(nix_list(&["tests", "0"]), r#"[ "tests" "0" ]"#);
    }
}
