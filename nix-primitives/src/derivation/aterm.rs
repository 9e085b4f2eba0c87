//! The ATerm text of a derivation (`Derive([outputs],[inputDrvs],[inputSrcs],system,builder,
//! [args],[env])`): a strict parser and the printer, byte for byte as Nix writes them.
//!
//! The parser accepts canonical text only: lists sorted and free of duplicates where Nix keeps
//! them in sets and maps, hashes in lower-case base16, and only the escapes Nix's printer emits.
//! So every accepted text prints back to exactly the same bytes, and a derivation's store path (the
//! hash of its text) is the same whether computed from the bytes received or from the parsed form.

use std::collections::{BTreeMap, BTreeSet};

use error_context::{Classify, Severity};

use super::{Derivation, DerivationOutput};
use crate::content_address::IngestionMethod;
use crate::hash::{Hash, HashAlgorithm, HashError};
use crate::store_path::{StorePath, StorePathError, validate_name};

/// Why a text is not a canonical derivation; `offset` is the byte where the problem was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed derivation at byte {offset}: {kind}")]
pub struct AtermError {
    /// Byte offset into the text.
    pub offset: usize,
    /// What is wrong there.
    #[source]
    pub kind: AtermErrorKind,
}

impl Classify for AtermError {
    fn severity(&self) -> Severity {
        Severity::Reject
    }
}

/// The ways a derivation text can be malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AtermErrorKind {
    /// The text ends too early.
    #[error("unexpected end of text")]
    UnexpectedEnd,
    /// A fixed token was expected.
    #[error("expected {0}")]
    Expected(&'static str),
    /// Bytes after the closing parenthesis.
    #[error("trailing bytes after the derivation")]
    TrailingBytes,
    /// A string Nix would have written differently: an escape it never emits or a raw control
    /// character it always escapes.
    #[error("non-canonical string escape")]
    NonCanonicalString,
    /// A store path, output name or hash field is not UTF-8.
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    /// A field that must be a store path is not one.
    #[error("invalid store path")]
    StorePath(#[source] StorePathError),
    /// An output name is not a valid store path name component.
    #[error("invalid output name")]
    OutputName(#[source] StorePathError),
    /// An output's hash algorithm or hash is invalid.
    #[error("invalid output hash")]
    Hash(#[source] HashError),
    /// An output tuple whose fields fit no kind of output.
    #[error("output {0:?} combines path, hash algorithm and hash in a way no output kind has")]
    InvalidOutput(String),
    /// A list that Nix keeps sorted is out of order.
    #[error("{0} are not sorted")]
    Unsorted(&'static str),
    /// A list that Nix keeps as a set has a duplicate.
    #[error("duplicate in {0}")]
    Duplicate(&'static str),
}

const HEADER: &[u8] = b"Derive(";

/// Parses a canonical derivation text.
pub(super) fn parse(text: &[u8]) -> Result<Derivation, AtermError> {
    let mut parser = Parser { text, offset: 0 };
    let derivation = parser.derivation()?;
    if parser.offset != text.len() {
        return Err(parser.error(AtermErrorKind::TrailingBytes));
    }
    Ok(derivation)
}

struct Parser<'a> {
    text: &'a [u8],
    offset: usize,
}

impl Parser<'_> {
    fn error(&self, kind: AtermErrorKind) -> AtermError {
        AtermError {
            offset: self.offset,
            kind,
        }
    }

    fn peek(&self) -> Result<u8, AtermError> {
        self.text
            .get(self.offset)
            .copied()
            .ok_or_else(|| self.error(AtermErrorKind::UnexpectedEnd))
    }

    fn expect(&mut self, token: &'static str) -> Result<(), AtermError> {
        let rest = &self.text[self.offset..];
        if rest.starts_with(token.as_bytes()) {
            self.offset += token.len();
            Ok(())
        } else if token.as_bytes().starts_with(rest) {
            Err(self.error(AtermErrorKind::UnexpectedEnd))
        } else {
            Err(self.error(AtermErrorKind::Expected(token)))
        }
    }

    fn derivation(&mut self) -> Result<Derivation, AtermError> {
        self.expect("Derive(")?;
        let outputs = self.sorted_map("outputs", Self::output)?;
        self.expect(",")?;
        let input_derivations = self.sorted_map("input derivations", Self::input_derivation)?;
        self.expect(",")?;
        let input_sources = self.sorted_set("input sources", Self::store_path)?;
        self.expect(",")?;
        let system = self.string()?;
        self.expect(",")?;
        let builder = self.string()?;
        self.expect(",")?;
        let args = self.list(Self::string)?;
        self.expect(",")?;
        let env = self.sorted_map("environment variables", Self::env_pair)?;
        self.expect(")")?;
        Ok(Derivation {
            outputs,
            input_derivations,
            input_sources,
            system,
            builder,
            args,
            env,
        })
    }

    /// `[item,item,…]`.
    fn list<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, AtermError>,
    ) -> Result<Vec<T>, AtermError> {
        self.expect("[")?;
        let mut items = Vec::new();
        if self.peek()? == b']' {
            self.offset += 1;
            return Ok(items);
        }
        loop {
            items.push(item(self)?);
            match self.peek()? {
                b',' => self.offset += 1,
                b']' => {
                    self.offset += 1;
                    return Ok(items);
                }
                _ => return Err(self.error(AtermErrorKind::Expected("',' or ']'"))),
            }
        }
    }

    /// A list whose items must be strictly ascending, collected into a set.
    fn sorted_set<T: Ord>(
        &mut self,
        what: &'static str,
        item: impl FnMut(&mut Self) -> Result<T, AtermError>,
    ) -> Result<BTreeSet<T>, AtermError> {
        let start = self.offset;
        let items = self.list(item)?;
        check_ascending(&items, |item| item, what).map_err(|kind| AtermError {
            offset: start,
            kind,
        })?;
        Ok(items.into_iter().collect())
    }

    /// A list of pairs whose keys must be strictly ascending, collected into a map.
    fn sorted_map<K: Ord, V>(
        &mut self,
        what: &'static str,
        item: impl FnMut(&mut Self) -> Result<(K, V), AtermError>,
    ) -> Result<BTreeMap<K, V>, AtermError> {
        let start = self.offset;
        let items = self.list(item)?;
        check_ascending(&items, |(key, _)| key, what).map_err(|kind| AtermError {
            offset: start,
            kind,
        })?;
        Ok(items.into_iter().collect())
    }

    /// A quoted string with Nix's escapes, as bytes.
    fn string(&mut self) -> Result<Vec<u8>, AtermError> {
        self.expect("\"")?;
        // Most strings have no escapes: copy them in one exact allocation.
        let rest = &self.text[self.offset..];
        let special = rest
            .iter()
            .position(|byte| matches!(byte, b'"' | b'\\' | b'\n' | b'\r' | b'\t'));
        if let Some(end) = special
            && rest[end] == b'"'
        {
            self.offset += end + 1;
            return Ok(rest[..end].to_vec());
        }
        let mut value = Vec::new();
        loop {
            let byte = self.peek()?;
            self.offset += 1;
            match byte {
                b'"' => return Ok(value),
                b'\\' => {
                    let escaped = self.peek()?;
                    value.push(match escaped {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'"' | b'\\' => escaped,
                        _ => return Err(self.error(AtermErrorKind::NonCanonicalString)),
                    });
                    self.offset += 1;
                }
                b'\n' | b'\r' | b'\t' => {
                    self.offset -= 1;
                    return Err(self.error(AtermErrorKind::NonCanonicalString));
                }
                _ => value.push(byte),
            }
        }
    }

    /// A string that must be UTF-8 (paths, names, hashes).
    fn text_string(&mut self, what: &'static str) -> Result<String, AtermError> {
        let start = self.offset;
        String::from_utf8(self.string()?).map_err(|_| AtermError {
            offset: start,
            kind: AtermErrorKind::NotUtf8(what),
        })
    }

    fn store_path(&mut self) -> Result<StorePath, AtermError> {
        let start = self.offset;
        let text = self.text_string("store path")?;
        StorePath::from_absolute(&text).map_err(|source| AtermError {
            offset: start,
            kind: AtermErrorKind::StorePath(source),
        })
    }

    fn output_name(&mut self) -> Result<String, AtermError> {
        let start = self.offset;
        let name = self.text_string("output name")?;
        validate_name(&name).map_err(|source| AtermError {
            offset: start,
            kind: AtermErrorKind::OutputName(source),
        })?;
        Ok(name)
    }

    /// `("name","path","hashAlgo","hash")`.
    fn output(&mut self) -> Result<(String, DerivationOutput), AtermError> {
        self.expect("(")?;
        let name = self.output_name()?;
        self.expect(",")?;
        let path_start = self.offset;
        let path = self.text_string("output path")?;
        self.expect(",")?;
        let algo_start = self.offset;
        let hash_algo = self.text_string("hash algorithm")?;
        self.expect(",")?;
        let hash_start = self.offset;
        let hash = self.text_string("hash")?;
        self.expect(")")?;

        let at = |offset, kind| AtermError { offset, kind };
        let path = if path.is_empty() {
            None
        } else {
            Some(
                StorePath::from_absolute(&path)
                    .map_err(|source| at(path_start, AtermErrorKind::StorePath(source)))?,
            )
        };
        let method_algorithm = if hash_algo.is_empty() {
            None
        } else {
            let (method, name) = match hash_algo.strip_prefix("r:") {
                Some(name) => (IngestionMethod::Recursive, name),
                None => (IngestionMethod::Flat, hash_algo.as_str()),
            };
            let algorithm = HashAlgorithm::from_name(name)
                .map_err(|source| at(algo_start, AtermErrorKind::Hash(source)))?;
            Some((method, algorithm))
        };
        let output = match (path, method_algorithm, hash.as_str()) {
            (Some(path), None, "") => DerivationOutput::InputAddressed { path },
            (None, None, "") => DerivationOutput::Deferred,
            (None, Some((method, algorithm)), "") => {
                DerivationOutput::Floating { method, algorithm }
            }
            (None, Some((method, algorithm)), "impure") => {
                DerivationOutput::Impure { method, algorithm }
            }
            (Some(path), Some((method, algorithm)), digits) if !digits.is_empty() => {
                let hash = Hash::parse_base16(algorithm, digits)
                    .map_err(|source| at(hash_start, AtermErrorKind::Hash(source)))?;
                DerivationOutput::Fixed { path, method, hash }
            }
            _ => return Err(at(path_start, AtermErrorKind::InvalidOutput(name))),
        };
        Ok((name, output))
    }

    /// `("/nix/store/….drv",["out",…])`.
    fn input_derivation(&mut self) -> Result<(StorePath, BTreeSet<String>), AtermError> {
        self.expect("(")?;
        let path = self.store_path()?;
        self.expect(",")?;
        let outputs = self.sorted_set("input derivation outputs", Self::output_name)?;
        self.expect(")")?;
        Ok((path, outputs))
    }

    /// `("key","value")`.
    fn env_pair(&mut self) -> Result<(Vec<u8>, Vec<u8>), AtermError> {
        self.expect("(")?;
        let key = self.string()?;
        self.expect(",")?;
        let value = self.string()?;
        self.expect(")")?;
        Ok((key, value))
    }
}

/// Checks that the keys of `items` are strictly ascending, naming the list in the error.
fn check_ascending<T, K: Ord>(
    items: &[T],
    key: impl Fn(&T) -> &K,
    what: &'static str,
) -> Result<(), AtermErrorKind> {
    for pair in items.windows(2) {
        match key(&pair[0]).cmp(key(&pair[1])) {
            std::cmp::Ordering::Less => {}
            std::cmp::Ordering::Equal => return Err(AtermErrorKind::Duplicate(what)),
            std::cmp::Ordering::Greater => return Err(AtermErrorKind::Unsorted(what)),
        }
    }
    Ok(())
}

/// Whether output paths are printed as written or blanked, as `hashDerivationModulo` needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outputs {
    /// The derivation's own text.
    AsWritten,
    /// Output paths, and environment variables named after outputs, printed as empty strings.
    Masked,
}

/// Prints a derivation. `input_hashes` replaces the input derivations (by path) with input
/// derivation hashes (by base16 digest), as `hashDerivationModulo` does.
pub(super) fn print(
    derivation: &Derivation,
    outputs: Outputs,
    input_hashes: Option<&BTreeMap<String, BTreeSet<String>>>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(HEADER);
    print_list(
        &mut out,
        derivation.outputs.iter(),
        |out, (name, output)| {
            out.push(b'(');
            print_string(out, name.as_bytes());
            out.push(b',');
            let path = match outputs {
                Outputs::AsWritten => output.path().map(StorePath::to_absolute),
                Outputs::Masked => None,
            };
            print_string(out, path.unwrap_or_default().as_bytes());
            out.push(b',');
            let (hash_algo, hash) = output_hash_fields(output);
            print_string(out, hash_algo.as_bytes());
            out.push(b',');
            print_string(out, hash.as_bytes());
            out.push(b')');
        },
    );
    out.push(b',');
    match input_hashes {
        Some(hashes) => print_list(&mut out, hashes.iter(), |out, (hash, names)| {
            print_input(out, hash, names);
        }),
        None => print_list(
            &mut out,
            derivation.input_derivations.iter(),
            |out, (path, names)| print_input(out, &path.to_absolute(), names),
        ),
    }
    out.push(b',');
    print_list(&mut out, derivation.input_sources.iter(), |out, path| {
        print_string(out, path.to_absolute().as_bytes());
    });
    out.push(b',');
    print_string(&mut out, &derivation.system);
    out.push(b',');
    print_string(&mut out, &derivation.builder);
    out.push(b',');
    print_list(&mut out, derivation.args.iter(), |out, arg| {
        print_string(out, arg);
    });
    out.push(b',');
    print_list(&mut out, derivation.env.iter(), |out, (key, value)| {
        let masked = outputs == Outputs::Masked
            && std::str::from_utf8(key).is_ok_and(|key| derivation.outputs.contains_key(key));
        out.push(b'(');
        print_string(out, key);
        out.push(b',');
        print_string(out, if masked { b"" } else { value });
        out.push(b')');
    });
    out.push(b')');
    out
}

/// The `hashAlgo` and `hash` fields of an output tuple.
pub(super) fn output_hash_fields(output: &DerivationOutput) -> (String, String) {
    match output {
        DerivationOutput::InputAddressed { .. } | DerivationOutput::Deferred => {
            (String::new(), String::new())
        }
        DerivationOutput::Fixed { method, hash, .. } => (
            format!("{}{}", method.prefix(), hash.algorithm()),
            hash.to_base16(),
        ),
        DerivationOutput::Floating { method, algorithm } => {
            (format!("{}{algorithm}", method.prefix()), String::new())
        }
        DerivationOutput::Impure { method, algorithm } => (
            format!("{}{algorithm}", method.prefix()),
            "impure".to_owned(),
        ),
    }
}

fn print_input(out: &mut Vec<u8>, key: &str, names: &BTreeSet<String>) {
    out.push(b'(');
    print_string(out, key.as_bytes());
    out.push(b',');
    print_list(out, names.iter(), |out, name| {
        print_string(out, name.as_bytes());
    });
    out.push(b')');
}

fn print_list<T>(
    out: &mut Vec<u8>,
    items: impl Iterator<Item = T>,
    mut item: impl FnMut(&mut Vec<u8>, T),
) {
    out.push(b'[');
    for (index, value) in items.enumerate() {
        if index > 0 {
            out.push(b',');
        }
        item(out, value);
    }
    out.push(b']');
}

fn print_string(out: &mut Vec<u8>, value: &[u8]) {
    out.reserve(value.len() + 2);
    out.push(b'"');
    // Runs of plain bytes are copied whole: hashing modulo prints every derivation again.
    let mut plain = 0;
    for (at, byte) in value.iter().enumerate() {
        let escaped: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            _ => continue,
        };
        out.extend_from_slice(&value[plain..at]);
        out.extend_from_slice(escaped);
        plain = at + 1;
    }
    out.extend_from_slice(&value[plain..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SIMPLE: &[u8] = br#"Derive([("out","/nix/store/wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm-a","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo hi > $out"],[("builder","/bin/sh"),("name","a"),("out","/nix/store/wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm-a"),("system","x86_64-linux")])"#;

    fn kind_of(text: &[u8]) -> AtermErrorKind {
        parse(text).unwrap_err().kind
    }

    fn replace(from: &str, to: &str) -> Vec<u8> {
        String::from_utf8(SIMPLE.to_vec())
            .unwrap()
            .replacen(from, to, 1)
            .into_bytes()
    }

    #[test]
    fn round_trips_and_escapes() {
        let drv = parse(SIMPLE).unwrap();
        assert_eq!(print(&drv, Outputs::AsWritten, None), SIMPLE);
        let escaped = replace("echo hi", r#"a\"b\\c\nd\re\tf"#);
        let drv = parse(&escaped).unwrap();
        assert_eq!(drv.args[1], b"a\"b\\c\nd\re\tf > $out");
        assert_eq!(print(&drv, Outputs::AsWritten, None), escaped);
    }

    #[test]
    fn each_malformation_has_its_kind() {
        assert_eq!(kind_of(b"Derive("), AtermErrorKind::UnexpectedEnd);
        assert_eq!(kind_of(b"Derivx"), AtermErrorKind::Expected("Derive("));
        let mut trailing = SIMPLE.to_vec();
        trailing.push(b'\n');
        assert_eq!(kind_of(&trailing), AtermErrorKind::TrailingBytes);
        assert_eq!(
            kind_of(&replace("echo hi", r"\q")),
            AtermErrorKind::NonCanonicalString
        );
        assert_eq!(
            kind_of(&replace("echo hi", "a\nb")),
            AtermErrorKind::NonCanonicalString
        );
        assert!(matches!(
            kind_of(&replace(
                "/nix/store/wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm-a",
                "/tmp/x"
            )),
            AtermErrorKind::StorePath(StorePathError::NotInStore(_))
        ));
        assert_eq!(
            kind_of(&replace("(\"builder\"", "(\"zzz\"")),
            AtermErrorKind::Unsorted("environment variables")
        );
        assert_eq!(
            kind_of(&replace("(\"name\"", "(\"builder\"")),
            AtermErrorKind::Duplicate("environment variables")
        );
        assert!(matches!(
            kind_of(&replace("\"\",\"\")]", "\"md6\",\"00\")]")),
            AtermErrorKind::Hash(HashError::UnknownAlgorithm(_))
        ));
        assert!(matches!(
            kind_of(&replace("\"\",\"\")]", "\"\",\"00\")]")),
            AtermErrorKind::InvalidOutput(_)
        ));
        assert!(matches!(
            kind_of(&replace("(\"out\",\"/nix", "(\"o t\",\"/nix")),
            AtermErrorKind::OutputName(_)
        ));
        assert_eq!(
            kind_of(&replace("[\"-c\",", "[\"-c\" ")),
            AtermErrorKind::Expected("',' or ']'")
        );
    }

    #[test]
    fn non_utf8_bytes_survive() {
        let text = replace("echo hi", "\u{0}");
        let mut bytes = text.clone();
        let at = bytes.iter().position(|b| *b == 0).unwrap();
        bytes[at] = 0xff;
        let drv = parse(&bytes).unwrap();
        assert!(drv.args[1].starts_with(&[0xff]));
        assert_eq!(print(&drv, Outputs::AsWritten, None), bytes);
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn never_panics_on_mutated_derivations(
            at in 0..SIMPLE.len(),
            byte in any::<u8>(),
            cut in 0..=SIMPLE.len(),
        ) {
            let mut text = SIMPLE.to_vec();
            text[at] = byte;
            text.truncate(cut);
            if let Ok(drv) = parse(&text) {
                prop_assert_eq!(print(&drv, Outputs::AsWritten, None), text);
            }
        }
    }
}
