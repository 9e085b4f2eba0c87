//! Real Nix builds end to end: derivations instantiated by Nix, built by `drover-builder`
//! processes with the Nix executor in separate private stores, published in the runner's signed
//! cache, and substituted from it by stock Nix with no local builds allowed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::nix::{ChrootStore, NIX_CONFIG, examples, private_store_command};
use common::nix_farm::{
    closure_request, served_log, start_with_one_nix_builder, submit_closure, submit_fixture,
    succeed, upstream_with_diamond_base,
};
use common::{
    AttemptStatus, BuilderSpec, DEADLINE, Farm, StepStatus, Stored, attempt_status, step_status,
};
use drover_proto::v1::{DerivationText, SubmitRequest};
use nix_primitives::StorePath;

/// Stock Nix realising `out` in `consumer` from the farm's cache (and an upstream `file://`
/// cache with its key), with no local builds allowed.
fn substitute_from_farm(
    farm: &Farm,
    consumer: &ChrootStore,
    out: &StorePath,
    upstream: Option<(&Path, &str)>,
) {
    let farm_cache = format!("http://127.0.0.1:{}", farm.cache_port);
    let farm_key = farm.cache_key().public_key().to_string();
    let (substituters, keys) = match upstream {
        Some((directory, key)) => (
            format!("{farm_cache} file://{}", directory.display()),
            format!("{farm_key} {key}"),
        ),
        None => (farm_cache, farm_key),
    };
    succeed(
        consumer
            .command("nix-store")
            .args(["--realise", &out.to_absolute(), "--max-jobs", "0"])
            .args(["--option", "substituters", &substituters])
            .args(["--option", "trusted-public-keys", &keys]),
    );
}

/// `nix-store --dump` of a directory holding a store's contents.
fn dump(path: PathBuf) -> Vec<u8> {
    succeed(Command::new("nix-store").arg("--dump").arg(path))
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
    assert_eq!(submitter.closure(&top).len(), 4);
    let build = submit_closure(&farm, &submitter, &top).await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    let machines = farm
        .count("SELECT count(DISTINCT machine) FROM step_attempts")
        .await;
    assert_eq!(
        machines, 2,
        "left and right should run on different builders"
    );

    let out = StorePath::from_absolute(&farm.get(build).await.outputs["out"]).unwrap();
    let consumer = ChrootStore::new(farm.dir.path().join("consumer"));
    substitute_from_farm(&farm, &consumer, &out, None);
    let summary = fs_err::read_to_string(consumer.real_path(&out).join("summary")).unwrap();
    assert!(
        summary.starts_with("left, built on: the base of the diamond / right"),
        "{summary}"
    );

    let local = stores.join("local");
    let in_local_store = |args: &[&str]| {
        let mut command = private_store_command(&local);
        command
            .args(args)
            .env("NIX_CONFIG", NIX_CONFIG)
            .env("HOME", farm.dir.path());
        String::from_utf8(succeed(&mut command)).unwrap()
    };
    let diamond_file = diamond.to_str().unwrap();
    let local_drv = in_local_store(&["nix-instantiate", diamond_file, "--attr", "top"]);
    assert_eq!(local_drv.trim(), top.to_absolute());
    in_local_store(&["nix-store", "--realise", &top.to_absolute()]);
    assert!(
        dump(local.join("store").join(out.base_name())) == dump(consumer.real_path(&out)),
        "the substituted output differs from a local build"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiple_outputs_fixed_outputs_failures_and_logs_with_real_nix() {
    let mut farm = Farm::new().await;
    let (_, submitter) = start_with_one_nix_builder(&mut farm).await;
    let expectations = [
        ("usesDev", Stored::Succeeded),
        ("usesFixed", Stored::Succeeded),
        ("chatty", Stored::Succeeded),
    ];
    let mut builds = BTreeMap::new();
    for (attribute, _) in expectations {
        builds.insert(
            attribute,
            submit_fixture(&farm, &submitter, attribute).await,
        );
    }
    // It needs `broken` and `independent`; with keep-going the independent sibling is built
    // although `broken` fails.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/builds.nix");
    let mut request = closure_request(
        &submitter,
        &submitter.instantiate(&fixtures, "dependsOnBroken"),
    );
    request.keep_going = true;
    let depends_on_broken = farm.submit_request(request).await;
    for (attribute, expected) in expectations {
        let (build, _) = builds[attribute];
        assert_eq!(farm.wait_for_build(build).await, expected, "{attribute}");
    }
    assert_eq!(
        farm.wait_for_build(depends_on_broken).await,
        Stored::DepFailed
    );

    let db = farm.db().await;
    let published: Vec<String> = db
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
        published,
        ["dev", "out"],
        "both outputs of multi are published"
    );

    let broken = submitter.instantiate(&fixtures, "broken");
    let log = served_log(&farm, broken.base_name()).await;
    assert!(log.contains("this build breaks on purpose"), "{log}");
    let chatty = served_log(&farm, &builds["chatty"].1).await;
    for line in [
        "log line 1 of 3000",
        "log line 1500 of 3000",
        "log line 3000 of 3000",
    ] {
        assert!(chatty.contains(line), "missing {line:?}");
    }

    let independent = test_support::poll_until(DEADLINE, "the independent sibling", || async {
        let status = db
            .query_one(
                "SELECT status::text FROM steps WHERE drv_path LIKE '%-independent.drv'",
                &[],
            )
            .await
            .unwrap();
        let status = step_status(status.get(0));
        status.is_terminal().then_some(status)
    })
    .await;
    assert_eq!(
        independent,
        StepStatus::Succeeded,
        "a keep-going build's independent branch is still built"
    );

    let before = farm.count("SELECT count(*) FROM step_attempts").await;
    let (again, _) = submit_fixture(&farm, &submitter, "usesDev").await;
    assert_eq!(farm.wait_for_build(again).await, Stored::Succeeded);
    assert_eq!(
        farm.count("SELECT count(*) FROM step_attempts").await,
        before,
        "a step already in the cache is not rebuilt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_are_uploaded_verified_and_used_and_forged_ones_refused() {
    let mut farm = Farm::new().await;
    let (_, submitter) = start_with_one_nix_builder(&mut farm).await;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/builds.nix");
    let top = submitter.instantiate(&fixtures, "withSources");
    let closure = submitter.closure(&top);
    let mut forged = submitter.sources(&closure);
    assert_eq!(forged.len(), 2, "the script and the toFile text");
    let script = forged
        .iter_mut()
        .find(|s| s.path.ends_with("script.sh"))
        .unwrap();
    script.nar = {
        let mut nar = Vec::new();
        nix_primitives::nar::write_file_nar(b"echo forged", true, &mut nar).unwrap();
        nar
    };
    let refused = farm
        .client()
        .await
        .submit(SubmitRequest {
            sources: forged,
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
        .expect_err("a source whose contents do not match its path");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    let build = submit_closure(&farm, &submitter, &top).await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    let out = StorePath::from_absolute(&farm.get(build).await.outputs["out"]).unwrap();
    let consumer = ChrootStore::new(farm.dir.path().join("consumer"));
    substitute_from_farm(&farm, &consumer, &out, None);
    let output = consumer.real_path(&out);
    let hello = output.join("bin/hello");
    assert_eq!(
        fs_err::metadata(&hello).unwrap().permissions().mode() & 0o111,
        0o111
    );
    assert!(
        fs_err::read_to_string(&hello)
            .unwrap()
            .contains("hello from a source script")
    );
    assert_eq!(
        fs_err::read_link(output.join("bin/greeting-link")).unwrap(),
        Path::new("../share/greeting")
    );
    assert_eq!(
        fs_err::read_to_string(output.join("share/greeting")).unwrap(),
        "written by toFile\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_an_upstream_cache_has_are_not_built_and_their_outputs_are_substituted() {
    let mut farm = Farm::new().await;
    let diamond = examples().join("diamond.nix");
    let (upstream_cache, public_key) = upstream_with_diamond_base(&mut farm);
    let (_, submitter) = start_with_one_nix_builder(&mut farm).await;
    let top = submitter.instantiate(&diamond, "top");
    let build = submit_closure(&farm, &submitter, &top).await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    let attempted: Vec<String> = farm
        .db()
        .await
        .query(
            "SELECT s.drv_path || ' ' || a.status || ' ' || coalesce(a.message, '')
             FROM step_attempts a JOIN steps s ON s.id = a.step_id ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        attempted.len(),
        3,
        "left, right and top are built: {attempted:?}"
    );
    assert!(
        attempted
            .iter()
            .all(|drv| !drv.ends_with("-diamond-base.drv")),
        "the upstream's step was built: {attempted:?}"
    );
    let (_, metrics) = common::nix_farm::http_request(farm.metrics_address(), "/metrics").await;
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("\ndrover_steps_substituted_total 1\n"),
        "{metrics}"
    );

    let out = farm.get(build).await.outputs["out"].clone();
    let consumer = ChrootStore::new(farm.dir.path().join("consumer"));
    let out = StorePath::from_absolute(&out).unwrap();
    substitute_from_farm(&farm, &consumer, &out, Some((&upstream_cache, &public_key)));
}

/// Whether a process whose command line contains `marker` is running.
fn running(marker: &str) -> bool {
    !Command::new("pgrep")
        .args(["-f", marker])
        .output()
        .unwrap()
        .stdout
        .is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_past_their_time_or_silence_limit_are_stopped_as_timed_out() {
    let mut farm = Farm::new().await;
    farm.step_limits_secs = (4, 2);
    let (store, submitter) = start_with_one_nix_builder(&mut farm).await;
    let (ticker, _) = submit_fixture(&farm, &submitter, "ticker").await;
    let (silent, _) = submit_fixture(&farm, &submitter, "silent").await;
    let pins = store.join("var/nix/gcroots/drover");
    test_support::poll_until(
        DEADLINE,
        "the running steps' paths to be pinned",
        || async {
            let pinned = fs_err::read_dir(&pins).map_or(0, Iterator::count);
            (pinned == 2).then_some(())
        },
    )
    .await;
    assert_eq!(farm.wait_for_build(ticker).await, Stored::Failed);
    assert_eq!(farm.wait_for_build(silent).await, Stored::Failed);
    let messages: BTreeMap<String, (AttemptStatus, String)> = farm
        .db()
        .await
        .query(
            "SELECT s.drv_path, a.status::text, a.message FROM step_attempts a
             JOIN steps s ON s.id = a.step_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| {
            let drv: String = row.get(0);
            let name = drv.rsplit('-').next().unwrap_or_default().to_owned();
            (name, (attempt_status(row.get(1)), row.get(2)))
        })
        .collect();
    assert_eq!(
        farm.count("SELECT count(*) FROM step_attempts").await,
        2,
        "a timed-out step is not tried again"
    );
    let (status, message) = &messages["ticker.drv"];
    assert_eq!(*status, AttemptStatus::TimedOut);
    assert!(message.contains("timed out after 4 seconds"), "{message}");
    let (status, message) = &messages["silent.drv"];
    assert_eq!(*status, AttemptStatus::TimedOut);
    assert!(message.contains("seconds of silence"), "{message}");
    test_support::poll_until(DEADLINE, "the pins to be removed", || async {
        (fs_err::read_dir(&pins).unwrap().count() == 0).then_some(())
    })
    .await;
    for marker in ["drover-test-ticker", "drover-test-silent"] {
        test_support::poll_until(
            DEADLINE,
            "the stopped build's processes to exit",
            || async { (!running(marker)).then_some(()) },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_over_the_size_limit_fails_its_build_and_is_not_published() {
    let mut farm = Farm::new().await;
    farm.max_output_bytes = 50_000;
    let (_, submitter) = start_with_one_nix_builder(&mut farm).await;
    let (build, _) = submit_fixture(&farm, &submitter, "big").await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Failed);
    let message: String = farm
        .db()
        .await
        .query_one("SELECT message FROM step_attempts", &[])
        .await
        .unwrap()
        .get(0);
    assert!(message.contains("over the limit of 50000"), "{message}");
    let outputs = farm.count("SELECT count(*) FROM step_outputs").await;
    assert_eq!(outputs, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_too_large_to_go_inline_is_uploaded_from_its_serve_process_whole() {
    let mut farm = Farm::new().await;
    let (_, submitter) = start_with_one_nix_builder(&mut farm).await;
    let (build, _) = submit_fixture(&farm, &submitter, "large").await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    let nar_size = farm.count("SELECT nar_size FROM step_outputs").await;
    assert!(
        nar_size > 192 * 1024,
        "{nar_size} bytes would have gone inline"
    );
    let out = StorePath::from_absolute(&farm.get(build).await.outputs["out"]).unwrap();
    let consumer = ChrootStore::new(farm.dir.path().join("consumer"));
    substitute_from_farm(&farm, &consumer, &out, None);
    let contents = fs_err::read_to_string(consumer.real_path(&out)).unwrap();
    assert_eq!(contents.lines().count(), 5000, "the whole output arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closure_whose_source_nobody_uploaded_fails_at_ingest_naming_it() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let submitter = ChrootStore::new(farm.dir.path().join("submitter"));
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/builds.nix");
    let top = submitter.instantiate(&fixtures, "withSources");
    let mut request = closure_request(&submitter, &top);
    let missing = request.sources.remove(0).path;
    let build = farm.submit_request(request).await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Failed);
    let reason = farm.get(build).await.failure_reason;
    assert!(
        reason.contains(&missing) && reason.contains("not published"),
        "{reason}"
    );
    assert_eq!(farm.count("SELECT count(*) FROM step_attempts").await, 0);
}
