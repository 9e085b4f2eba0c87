//! NAR tests: drover's writer against `nix-store --dump`, its hashes against `nix-hash`, unpacking
//! round trips, and one rejection test per kind of malformed NAR.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod support;

use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::Path;
use std::process::Command;

use nix_primitives::nar::{self, DumpError, MAX_DEPTH, NarErrorKind};
use nix_primitives::{Hash, HashAlgorithm};
use proptest::prelude::*;
use support::Nix;

/// Writes a file with the given mode.
fn write_file(path: &Path, contents: &[u8], mode: u32) {
    fs_err::write(path, contents).unwrap();
    fs_err::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Deterministic pseudo-random bytes (xorshift), so large files are not all zeros.
fn noise(len: usize, mut state: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

/// A tree with every kind of node NAR has and the edge cases of each.
fn build_tree(root: &Path) {
    fs_err::create_dir(root).unwrap();
    write_file(&root.join("a"), b"seven b", 0o644);
    write_file(&root.join("empty"), b"", 0o644);
    write_file(&root.join("eight"), b"12345678", 0o644);
    write_file(&root.join("exec"), b"#!/bin/sh\nexit 0\n", 0o755);
    write_file(&root.join("owner-exec-only"), b"x", 0o700);
    write_file(&root.join("big"), &noise(3 * 1024 * 1024 + 5, 42), 0o644);
    for name in ["B", "a.b", "a-b", "ab", "with space", "grüße"] {
        write_file(&root.join(name), name.as_bytes(), 0o644);
    }
    write_file(
        &root.join(std::ffi::OsStr::from_bytes(b"bytes-\xff\xfe")),
        b"x",
        0o644,
    );
    symlink("a", root.join("relative")).unwrap();
    symlink(
        "/nix/store/wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm-a/bin/a",
        root.join("absolute"),
    )
    .unwrap();
    symlink("../../outside", root.join("dangling")).unwrap();
    fs_err::create_dir(root.join("empty-dir")).unwrap();
    let mut deep = root.join("deep");
    for level in 0..40 {
        deep = deep.join(level.to_string());
    }
    fs_err::create_dir_all(&deep).unwrap();
    write_file(&deep.join("bottom"), b"bottom", 0o644);
    symlink("../..", deep.join("up")).unwrap();
}

fn dump(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let written = nar::dump(path, &mut out).unwrap();
    assert_eq!(written, out.len() as u64);
    out
}

#[test]
fn dump_is_byte_identical_to_nix_store_dump() {
    let nix = Nix::new();
    let scratch = nix.scratch("trees");
    let tree = scratch.join("tree");
    build_tree(&tree);
    write_file(&scratch.join("file"), b"just a file", 0o644);
    write_file(&scratch.join("script"), b"#!/bin/sh\n", 0o755);
    symlink("/nix/store/x", scratch.join("link")).unwrap();
    fs_err::create_dir(scratch.join("nothing")).unwrap();
    for root in ["tree", "file", "script", "link", "nothing"] {
        let path = scratch.join(root);
        assert!(
            dump(&path) == support::nix_store_dump(&path),
            "{root}: drover's NAR differs from nix-store --dump"
        );
    }
}

#[test]
fn a_file_nar_written_from_memory_equals_the_dump_of_the_file() {
    let nix = Nix::new();
    let scratch = nix.scratch("files");
    for (name, contents, mode, executable) in [
        ("plain", b"Derive([])".as_slice(), 0o644, false),
        ("exec", b"#!/bin/sh\n".as_slice(), 0o755, true),
        ("empty", b"".as_slice(), 0o644, false),
    ] {
        let path = scratch.join(name);
        write_file(&path, contents, mode);
        let mut written = Vec::new();
        nar::write_file_nar(contents, executable, &mut written).unwrap();
        assert!(written == support::nix_store_dump(&path), "{name}");
    }
}

#[test]
fn summary_matches_nix_hash() {
    let nix = Nix::new();
    let tree = nix.scratch("trees").join("tree");
    build_tree(&tree);
    let nar = dump(&tree);
    let summary = nar::summarize(nar.as_slice()).unwrap();
    assert_eq!(summary.nar_size, nar.len() as u64);
    let mut command = Command::new("nix-hash");
    command.args(["--type", "sha256", "--base32"]).arg(&tree);
    let nix_hash = String::from_utf8(support::run(command)).unwrap();
    assert_eq!(summary.nar_hash.to_nix_base32(), nix_hash.trim());
    assert_eq!(summary.nar_hash, Hash::digest(HashAlgorithm::Sha256, &nar));
}

#[test]
fn read_one_stops_where_the_nar_ends_and_leaves_what_follows() {
    let nix = Nix::new();
    let tree = nix.scratch("streams").join("tree");
    build_tree(&tree);
    let nar = dump(&tree);
    let mut stream = nar.clone();
    stream.extend_from_slice(b"next reply");
    let mut source = io::BufReader::with_capacity(64, stream.as_slice());
    let summary = nar::read_one(&mut source, &mut Discarding).unwrap();
    assert_eq!(summary.nar_size, nar.len() as u64);
    assert_eq!(summary.nar_hash, Hash::digest(HashAlgorithm::Sha256, &nar));
    let mut rest = Vec::new();
    source.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"next reply");
    let rejected = nar::summarize(stream.as_slice()).unwrap_err();
    assert!(matches!(rejected.kind, NarErrorKind::TrailingBytes));
}

/// Looks at nothing: the parser alone decides where the NAR ends.
struct Discarding;

impl nar::NarVisitor for Discarding {}

#[test]
fn unpack_recreates_the_tree_nix_dumps_identically() {
    let nix = Nix::new();
    let scratch = nix.scratch("trees");
    let tree = scratch.join("tree");
    build_tree(&tree);
    let nar = dump(&tree);
    let copy = scratch.join("copy");
    let summary = nar::unpack(nar.as_slice(), &copy).unwrap();
    assert_eq!(summary.nar_size, nar.len() as u64);
    assert!(
        support::nix_store_dump(&copy) == nar,
        "the unpacked tree does not dump to the same NAR"
    );
    assert_eq!(
        fs_err::read_link(copy.join("absolute")).unwrap(),
        Path::new("/nix/store/wd0ys9snp82b5v5j4pgp5wfhnfjhl2vm-a/bin/a")
    );
    assert!(!scratch.join("outside").exists());
}

#[test]
fn unpack_never_writes_through_an_existing_path() {
    let nix = Nix::new();
    let scratch = nix.scratch("trees");
    let tree = scratch.join("tree");
    build_tree(&tree);
    let nar = dump(&tree);
    let error = nar::unpack(nar.as_slice(), &tree).unwrap_err();
    assert!(
        matches!(&error.kind, NarErrorKind::Visitor(io) if io.kind() == io::ErrorKind::AlreadyExists),
        "{error:?}"
    );

    let outside = scratch.join("outside");
    fs_err::create_dir(&outside).unwrap();
    let target = scratch.join("target");
    symlink(&outside, &target).unwrap();
    let file_nar = nar_of(&[&[b"(", b"type", b"regular", b"contents", b"data", b")"]]);
    assert!(nar::unpack(file_nar.as_slice(), &target).is_err());
    assert_eq!(fs_err::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn dump_refuses_special_files() {
    let nix = Nix::new();
    let fifo = nix.scratch("special").join("fifo");
    let status = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("running mkfifo");
    assert!(status.success());
    assert!(matches!(
        nar::dump(&fifo, &mut io::sink()),
        Err(DumpError::UnsupportedFileType(path)) if path == fifo
    ));
}

/// Serialises NAR strings, for building NARs by hand.
fn nar_of(groups: &[&[&[u8]]]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut string = |bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(bytes);
        out.resize(out.len().next_multiple_of(8), 0);
    };
    string(b"nix-archive-1");
    for group in groups {
        for token in *group {
            string(token);
        }
    }
    out
}

/// A directory whose entries are small regular files with the given names, in the given order.
fn directory_with(names: &[&[u8]]) -> Vec<u8> {
    let mut groups: Vec<Vec<&[u8]>> = vec![vec![b"(", b"type", b"directory"]];
    for name in names {
        groups.push(vec![
            b"entry",
            b"(",
            b"name",
            name,
            b"node",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"x",
            b")",
            b")",
        ]);
    }
    groups.push(vec![b")"]);
    let groups: Vec<&[&[u8]]> = groups.iter().map(Vec::as_slice).collect();
    nar_of(&groups)
}

/// Whether a rejection is the one a case expects.
type Expectation = fn(&NarErrorKind) -> bool;

fn rejection(bytes: &[u8]) -> NarErrorKind {
    nar::summarize(bytes)
        .expect_err("a malformed NAR was accepted")
        .kind
}

#[test]
fn each_malformed_nar_is_rejected_with_its_own_variant() {
    assert!(nar::summarize(directory_with(&[b"a", b"b"]).as_slice()).is_ok());
    let cases: Vec<(&str, Vec<u8>, Expectation)> = vec![
        ("..", directory_with(&[b".."]), |k| {
            matches!(k, NarErrorKind::NameDotDot)
        }),
        (".", directory_with(&[b"."]), |k| {
            matches!(k, NarErrorKind::NameDot)
        }),
        ("slash", directory_with(&[b"a/b"]), |k| {
            matches!(k, NarErrorKind::NameContainsSlash)
        }),
        ("empty name", directory_with(&[b""]), |k| {
            matches!(k, NarErrorKind::NameEmpty)
        }),
        ("nul", directory_with(&[b"a\0b"]), |k| {
            matches!(k, NarErrorKind::NameContainsNul)
        }),
        ("unsorted", directory_with(&[b"b", b"a"]), |k| {
            matches!(k, NarErrorKind::UnsortedEntries)
        }),
        ("duplicate", directory_with(&[b"a", b"a"]), |k| {
            matches!(k, NarErrorKind::DuplicateEntry)
        }),
        (
            "long name",
            directory_with(&[&[b'n'; nar::MAX_NAME_LEN + 1]]),
            |k| matches!(k, NarErrorKind::StringTooLong { .. }),
        ),
        (
            "bad magic",
            {
                let mut bytes = directory_with(&[b"a"]);
                bytes[8 + 12] = b'2';
                bytes
            },
            |k| matches!(k, NarErrorKind::BadMagic),
        ),
        (
            "unknown type",
            nar_of(&[&[b"(", b"type", b"fifo", b")"]]),
            |k| matches!(k, NarErrorKind::UnknownNodeType),
        ),
        (
            "executable marker",
            nar_of(&[&[
                b"(",
                b"type",
                b"regular",
                b"executable",
                b"yes",
                b"contents",
                b"",
                b")",
            ]]),
            |k| matches!(k, NarErrorKind::UnexpectedToken { expected: "" }),
        ),
        (
            "empty target",
            nar_of(&[&[b"(", b"type", b"symlink", b"target", b"", b")"]]),
            |k| matches!(k, NarErrorKind::TargetEmpty),
        ),
        (
            "nul in target",
            nar_of(&[&[b"(", b"type", b"symlink", b"target", b"a\0", b")"]]),
            |k| matches!(k, NarErrorKind::TargetContainsNul),
        ),
        (
            "bad padding",
            {
                let mut bytes = nar_of(&[&[b"(", b"type", b"regular", b"contents", b"abc", b")"]]);
                let padding = bytes.len() - 16 - 1;
                bytes[padding] = 1;
                bytes
            },
            |k| matches!(k, NarErrorKind::BadPadding),
        ),
        (
            "trailing bytes",
            {
                let mut bytes = directory_with(&[b"a"]);
                bytes.extend_from_slice(&[0; 8]);
                bytes
            },
            |k| matches!(k, NarErrorKind::TrailingBytes),
        ),
        ("too deep", too_deep(), |k| {
            matches!(k, NarErrorKind::TooDeep)
        }),
    ];
    for (name, bytes, expected) in cases {
        let kind = rejection(&bytes);
        assert!(expected(&kind), "{name}: {kind:?}");
    }
}

fn too_deep() -> Vec<u8> {
    let directory: &[&[u8]] = &[b"(", b"type", b"directory"];
    let entry: &[&[u8]] = &[
        b"entry",
        b"(",
        b"name",
        b"d",
        b"node",
        b"(",
        b"type",
        b"directory",
    ];
    let mut groups = vec![directory];
    groups.extend(std::iter::repeat_n(entry, MAX_DEPTH + 1));
    nar_of(&groups)
}

#[test]
fn a_nar_cut_anywhere_is_truncated() {
    let nix = Nix::new();
    let tree = nix.scratch("trees").join("tree");
    build_tree(&tree);
    let whole = dump(&tree);
    let step = whole.len() / 97;
    for cut in (0..whole.len()).step_by(step).chain([whole.len() - 1]) {
        let kind = rejection(&whole[..cut]);
        assert!(
            matches!(kind, NarErrorKind::Truncated),
            "cut at {cut}: {kind:?}"
        );
    }
}

/// A source that delivers `good` bytes and then fails like a dropped connection.
struct DroppedConnection<'a> {
    good: &'a [u8],
}

impl Read for DroppedConnection<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.good.is_empty() {
            return Err(io::Error::from(io::ErrorKind::ConnectionReset));
        }
        let len = buf.len().min(self.good.len()).min(1000);
        buf[..len].copy_from_slice(&self.good[..len]);
        self.good = &self.good[len..];
        Ok(len)
    }
}

#[test]
fn a_dropped_connection_mid_nar_is_a_read_error_and_unpacks_nothing_more() {
    let nix = Nix::new();
    let scratch = nix.scratch("trees");
    let tree = scratch.join("tree");
    build_tree(&tree);
    let whole = dump(&tree);
    let source = DroppedConnection {
        good: &whole[..whole.len() / 2],
    };
    let error = nar::unpack(source, &scratch.join("partial")).unwrap_err();
    assert!(
        matches!(&error.kind, NarErrorKind::Read(io) if io.kind() == io::ErrorKind::ConnectionReset),
        "{error:?}"
    );
    assert!(error.offset > 0 && error.offset <= whole.len() as u64 / 2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parser_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = nar::summarize(bytes.as_slice());
    }

    #[test]
    fn parser_never_panics_on_mutated_nars(
        at in 0usize..200,
        byte in any::<u8>(),
        cut in 0usize..220,
    ) {
        let mut bytes = directory_with(&[b"a", b"b"]);
        let at = at % bytes.len();
        bytes[at] = byte;
        bytes.truncate(cut.min(bytes.len()));
        let _ = nar::summarize(bytes.as_slice());
    }
}
