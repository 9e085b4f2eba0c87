//! Binary cache interoperability with the real Nix, both ways: keys and signatures Nix makes load
//! and verify in drover (and drover's signatures are byte-identical to Nix's), and a `file://`
//! cache written by drover is substituted by `nix-store --realise` only with drover's key.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use nix_primitives::content_address::make_store_path;
use nix_primitives::narinfo::NarInfo;
use nix_primitives::signing::{PublicKey, SecretKey};
use nix_primitives::{ContentAddress, Hash, StorePath, nar};
use support::{Nix, describe, store_path};

/// Generates a key pair with `nix-store --generate-binary-cache-key`; returns the files' contents.
fn nix_key_pair(nix: &Nix, name: &str) -> (String, String) {
    let keys = nix.scratch("keys");
    let (secret, public) = (
        keys.join(format!("{name}.sec")),
        keys.join(format!("{name}.pub")),
    );
    let mut command = nix.command("nix-store");
    command
        .arg("--generate-binary-cache-key")
        .arg(name)
        .arg(&secret)
        .arg(&public);
    support::run(command);
    (
        fs_err::read_to_string(secret).unwrap(),
        fs_err::read_to_string(public).unwrap(),
    )
}

#[test]
fn nix_keys_load_and_nix_signed_narinfos_verify_and_match_ours() {
    let nix = Nix::new();
    let (secret_text, public_text) = nix_key_pair(&nix, "nix-made-1");
    let secret = SecretKey::parse(&secret_text).unwrap();
    let public = PublicKey::parse(&public_text).unwrap();
    assert_eq!(secret.public_key(), public);
    assert_eq!(public.to_string(), public_text.trim());
    assert_eq!(secret.to_nix_format(), secret_text.trim());

    let source = nix.scratch("source").join("payload");
    fs_err::create_dir(&source).unwrap();
    fs_err::write(source.join("data"), b"signed by nix\n").unwrap();
    let mut add = nix.command("nix-store");
    add.arg("--add").arg(&source);
    let path = store_path(String::from_utf8(support::run(add)).unwrap().trim());
    let key_file = nix.scratch("keys").join("nix-made-1.sec");
    let mut sign = nix.command("nix");
    sign.args(["store", "sign", "--key-file"])
        .arg(&key_file)
        .arg(path.to_absolute());
    support::run(sign);
    let cache = nix.scratch("cache");
    let mut copy = nix.command("nix");
    copy.args(["copy", "--to"])
        .arg(format!("file://{}?compression=none", cache.display()))
        .arg(path.to_absolute());
    support::run(copy);

    let text = fs_err::read_to_string(cache.join(format!("{}.narinfo", path.hash_part()))).unwrap();
    let info = NarInfo::parse(&text).unwrap();
    assert_eq!(
        info.to_string(),
        text,
        "narinfo does not print back to Nix's bytes"
    );
    assert_eq!(info.store_path, path);
    assert!(info.is_signed_by_any(std::slice::from_ref(&public)));
    let other = SecretKey::from_seed("nix-made-1", &[9; 32]).public_key();
    assert!(!info.is_signed_by_any(&[other]));
    assert_eq!(info.signatures, vec![secret.sign(&info.fingerprint())]);

    let nar_file = fs_err::read(cache.join(&info.url)).unwrap();
    let summary = nar::summarize(nar_file.as_slice()).unwrap();
    assert_eq!(
        (summary.nar_hash, summary.nar_size),
        (info.nar_hash, info.nar_size)
    );
    assert_eq!(info.file_hash, Some(Hash::sha256(&nar_file)));
    let content_address = info
        .content_address
        .expect("nix-store --add makes a content-addressed path");
    assert!(matches!(content_address, ContentAddress::Fixed { .. }));
    assert_eq!(
        content_address
            .store_path(path.name(), &info.references, false)
            .unwrap(),
        path
    );
}

/// Publishes the tree at `tree` as `path` in a `file://` cache, the way the runner will.
fn publish(
    cache: &Path,
    tree: &Path,
    path: &StorePath,
    references: BTreeSet<StorePath>,
    key: &SecretKey,
) {
    let mut nar_bytes = Vec::new();
    nar::dump(tree, &mut nar_bytes).unwrap();
    let summary = nar::summarize(nar_bytes.as_slice()).unwrap();
    let file_hash = Hash::sha256(&nar_bytes);
    let url = format!("nar/{}.nar", file_hash.to_nix_base32());
    fs_err::create_dir_all(cache.join("nar")).unwrap();
    fs_err::write(cache.join(&url), &nar_bytes).unwrap();
    let mut info = NarInfo {
        store_path: path.clone(),
        url,
        compression: "none".to_owned(),
        file_hash: Some(file_hash),
        file_size: Some(nar_bytes.len() as u64),
        nar_hash: summary.nar_hash,
        nar_size: summary.nar_size,
        references,
        deriver: None,
        system: None,
        signatures: Vec::new(),
        content_address: None,
    };
    info.sign(key);
    fs_err::write(
        cache.join(format!("{}.narinfo", path.hash_part())),
        info.to_string(),
    )
    .unwrap();
}

fn realise(nix: &Nix, path: &StorePath, cache: &Path, trusted: &PublicKey) -> std::process::Output {
    let mut command = nix.command("nix-store");
    command
        .arg("--realise")
        .arg(path.to_absolute())
        .args(["--max-jobs", "0", "--option", "substituters"])
        .arg(format!("file://{}", cache.display()))
        .args(["--option", "trusted-public-keys"])
        .arg(trusted.to_string());
    command.output().expect("running nix-store --realise")
}

#[test]
fn nix_substitutes_from_a_cache_drover_wrote_and_signed_and_only_with_its_key() {
    let publisher = Nix::new();
    let key = SecretKey::from_seed("drover-test-1", &[5; 32]);
    let cache = publisher.scratch("cache");
    fs_err::write(
        cache.join("nix-cache-info"),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n",
    )
    .unwrap();

    let dependency =
        make_store_path("output:out", &Hash::sha256(b"dependency"), "drover-dep").unwrap();
    let top = make_store_path("output:out", &Hash::sha256(b"top"), "drover-top").unwrap();
    let trees = publisher.scratch("trees");
    let dependency_tree = trees.join("dependency");
    fs_err::write(&dependency_tree, b"I am a dependency\n").unwrap();
    let top_tree = trees.join("top");
    fs_err::create_dir_all(top_tree.join("bin")).unwrap();
    fs_err::write(
        top_tree.join("bin/tool"),
        format!("#!/bin/sh\ncat {dependency}\n"),
    )
    .unwrap();
    std::os::unix::fs::symlink(dependency.to_absolute(), top_tree.join("dep")).unwrap();
    publish(&cache, &dependency_tree, &dependency, BTreeSet::new(), &key);
    publish(
        &cache,
        &top_tree,
        &top,
        BTreeSet::from([dependency.clone()]),
        &key,
    );

    let consumer = Nix::new();
    let output = realise(&consumer, &top, &cache, &key.public_key());
    assert!(
        output.status.success(),
        "substitution failed: {}",
        describe(&output)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        top.to_absolute()
    );
    for (path, tree) in [(&top, &top_tree), (&dependency, &dependency_tree)] {
        let mut expected = Vec::new();
        nar::dump(tree, &mut expected).unwrap();
        assert!(
            support::nix_store_dump(&consumer.real_path(path)) == expected,
            "{path} differs"
        );
    }
    let mut verify = consumer.command("nix-store");
    verify.args(["--verify-path"]).arg(top.to_absolute());
    support::run(verify);

    let stranger = Nix::new();
    let untrusted = SecretKey::from_seed("drover-test-1", &[6; 32]).public_key();
    let output = realise(&stranger, &top, &cache, &untrusted);
    assert!(
        !output.status.success(),
        "Nix accepted a path signed by an untrusted key"
    );
    assert!(!stranger.real_path(&top).exists());
}
