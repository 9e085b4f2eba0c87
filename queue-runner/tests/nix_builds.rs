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

/// Instantiates `attribute` of the test fixtures and submits its closure; returns the build id
/// and the `.drv` path.
async fn submit_fixture(farm: &Farm, submitter: &ChrootStore, attribute: &str) -> (i64, String) {
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/builds.nix");
    let top = submitter.instantiate(&fixtures, attribute);
    let closure = submitter.closure(&top);
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
    (build, top.to_absolute())
}

/// GETs a path from the runner's cache listener; returns the status line and the body.
async fn http_get(port: u16, path: &str) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, response[split + 4..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiple_outputs_fixed_outputs_failures_and_logs_with_real_nix() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let store = farm.dir.path().join("stores/b1");
    farm.start_builder(&BuilderSpec {
        max_jobs: 2,
        nix_store: Some(&store),
        ..BuilderSpec::new("b1")
    });
    let submitter = ChrootStore::new(farm.dir.path().join("submitter"));
    let mut builds = std::collections::BTreeMap::new();
    for attribute in [
        "usesDev",
        "usesFixed",
        "chatty",
        "broken",
        "dependsOnBroken",
    ] {
        builds.insert(
            attribute,
            submit_fixture(&farm, &submitter, attribute).await,
        );
    }
    let expectations = [
        ("usesDev", "succeeded"),
        ("usesFixed", "succeeded"),
        ("chatty", "succeeded"),
        ("broken", "failed"),
        ("dependsOnBroken", "dep_failed"),
    ];
    for (attribute, expected) in expectations {
        let (build, _) = builds[attribute];
        assert_eq!(farm.wait_for_build(build).await, expected, "{attribute}");
    }

    let used_outputs: Vec<String> = farm
        .db()
        .await
        .query(
            "SELECT o.output_name FROM step_outputs o JOIN steps s ON s.id = o.step_id
             WHERE s.drv_path LIKE '%-multi.drv' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        used_outputs,
        ["dev", "out"],
        "both outputs of multi are published"
    );

    let (_, broken_drv) = &builds["broken"];
    let (status, log) = http_get(
        farm.cache_port,
        &format!("/log/{}", broken_drv.trim_start_matches("/nix/store/")),
    )
    .await;
    assert!(status.contains("200"), "{status}");
    let log = String::from_utf8_lossy(&log);
    assert!(log.contains("this build breaks on purpose"), "{log}");

    let (_, chatty_drv) = &builds["chatty"];
    let (_, chatty_log) = http_get(
        farm.cache_port,
        &format!("/log/{}", chatty_drv.trim_start_matches("/nix/store/")),
    )
    .await;
    let chatty_log = String::from_utf8_lossy(&chatty_log);
    for line in [
        "log line 1 of 3000",
        "log line 1500 of 3000",
        "log line 3000 of 3000",
    ] {
        assert!(chatty_log.contains(line), "missing {line:?}");
    }

    let independent: String = farm
        .db()
        .await
        .query_one(
            "SELECT status::text FROM steps WHERE drv_path LIKE '%-independent.drv'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        independent, "succeeded",
        "an independent branch is still built and cached"
    );

    let attempts_before: i64 = farm
        .db()
        .await
        .query_one("SELECT count(*) FROM step_attempts", &[])
        .await
        .unwrap()
        .get(0);
    let (again, _) = submit_fixture(&farm, &submitter, "usesDev").await;
    assert_eq!(farm.wait_for_build(again).await, "succeeded");
    let attempts_after: i64 = farm
        .db()
        .await
        .query_one("SELECT count(*) FROM step_attempts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        attempts_before, attempts_after,
        "a step already in the cache is not rebuilt"
    );
}
