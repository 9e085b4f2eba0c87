//! Real Nix builds end to end: derivations instantiated by Nix, built by `drover-builder`
//! processes with the Nix executor in separate private stores, published in the runner's signed
//! cache, and substituted from it by stock Nix with no local builds allowed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::process::Command;

use common::nix::{ChrootStore, NIX_CONFIG, examples, private_store_command};
use common::{BuilderSpec, Farm};
use drover_proto::v1::{DerivationText, SubmitRequest};

fn succeed(command: &mut Command) -> Vec<u8> {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diamond_builds_across_two_private_stores_and_stock_nix_substitutes_it() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let stores = farm.dir.path().join("stores");
    for name in ["b1", "b2"] {
        let store = stores.join(name);
        farm.start_builder(&BuilderSpec {
            max_jobs: 1,
            nix_store: Some(&store),
            ..BuilderSpec::new(name)
        });
    }

    let diamond = examples().join("diamond.nix");
    let submitter = ChrootStore::new(farm.dir.path().join("submitter"));
    let top = submitter.instantiate(&diamond, "top");
    let closure = submitter.closure(&top);
    assert_eq!(closure.len(), 4);
    let build = farm
        .client()
        .await
        .submit(SubmitRequest {
            derivations: closure
                .iter()
                .map(|(path, (text, _))| DerivationText {
                    path: path.to_absolute(),
                    text: text.clone(),
                })
                .collect(),
            top_drv_path: top.to_absolute(),
            ..SubmitRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .build_id;
    assert_eq!(farm.wait_for_build(build).await, "succeeded");
    let machines: i64 = farm
        .db()
        .await
        .query_one("SELECT count(DISTINCT machine) FROM step_attempts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        machines, 2,
        "left and right should run on different builders"
    );

    let out = farm.get(build).await.outputs["out"].clone();
    let consumer = ChrootStore::new(farm.dir.path().join("consumer"));
    succeed(
        consumer
            .command("nix-store")
            .args([
                "--realise",
                &out,
                "--max-jobs",
                "0",
                "--option",
                "substituters",
            ])
            .arg(format!("http://127.0.0.1:{}", farm.cache_port))
            .args(["--option", "trusted-public-keys"])
            .arg(farm.cache_key.public_key().to_string()),
    );
    let summary = fs_err::read_to_string(
        consumer
            .real_path(&nix_primitives::StorePath::from_absolute(&out).unwrap())
            .join("summary"),
    )
    .unwrap();
    assert!(
        summary.starts_with("left, built on: the base of the diamond / right"),
        "{summary}"
    );

    let local = stores.join("local");
    let local_drv = succeed(
        private_store_command(&local)
            .args(["nix-instantiate"])
            .arg(&diamond)
            .args(["--attr", "top"])
            .env("NIX_CONFIG", NIX_CONFIG)
            .env("HOME", farm.dir.path()),
    );
    assert_eq!(
        String::from_utf8(local_drv).unwrap().trim(),
        top.to_absolute()
    );
    succeed(
        private_store_command(&local)
            .args(["nix-store", "--realise", &top.to_absolute()])
            .env("NIX_CONFIG", NIX_CONFIG)
            .env("HOME", farm.dir.path()),
    );
    let base_name = out.trim_start_matches("/nix/store/");
    let dump =
        |root: std::path::PathBuf| succeed(Command::new("nix-store").arg("--dump").arg(root));
    assert!(
        dump(local.join("store").join(base_name))
            == dump(consumer.root.join("nix/store").join(base_name)),
        "the substituted output differs from a local build"
    );
}
