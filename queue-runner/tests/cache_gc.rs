//! Garbage collection of the binary cache on a live farm with real Nix: sweeps every second
//! while builds upload, then builds aged past `keep_days` lose their outputs, a pinned one and
//! the recent ones keep theirs, and stock Nix still substitutes every kept output with its
//! whole closure without building anything; a log past its days is deleted and said to have
//! expired. The dry run says what would go and why.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::nix::{ChrootStore, examples};
use common::nix_farm::{
    http_get, http_request, start_with_one_nix_builder, submit_closure, succeed,
};
use common::{DEADLINE, Farm, Stored};
use drover_tls::Role;
use nix_primitives::StorePath;
use nix_primitives::narinfo::NarInfo;

const RUNNER: &str = env!("CARGO_BIN_EXE_drover-queue-runner");

/// Two small closures besides the diamond: each top's output names its input's path, so the
/// input is in its runtime closure.
const AGED: &str = r#"
let
  step = name: script: inputs: derivation ({
    inherit name;
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" script ];
  } // inputs);
  pair = prefix: rec {
    base = step "${prefix}-base" "echo ${prefix} base > $out" { };
    top = step "${prefix}-top" "read line < $base; echo \"$line, kept with $base\" > $out" { inherit base; };
  };
in { old = (pair "old").top; pinned = (pair "pinned").top; }
"#;

/// A farm sweeping every `interval_secs` (nothing young, builds kept 30 days) with one Nix
/// builder, which has built the diamond's top, `old` and `pinned`.
async fn farm_with_three_builds(interval_secs: i64) -> (Farm, [i64; 3]) {
    let mut farm = Farm::new().await;
    farm.runner_settings = vec![
        ("gc.interval_secs", interval_secs.into()),
        ("gc.grace_secs", 0.into()),
        ("gc.keep_days", 30.into()),
    ];
    let (_store, submitter) = start_with_one_nix_builder(&mut farm).await;
    let builds = build_three(&farm, &submitter).await;
    (farm, builds)
}

/// The output `out` of a finished build.
async fn output(farm: &Farm, build: i64) -> StorePath {
    StorePath::from_absolute(&farm.get(build).await.outputs["out"]).unwrap()
}

/// Builds the diamond's top, `old` and `pinned`; returns their build ids.
async fn build_three(farm: &Farm, submitter: &ChrootStore) -> [i64; 3] {
    let aged = submitter.expression(AGED);
    let tops = [
        submitter.instantiate(&examples().join("diamond.nix"), "top"),
        submitter.instantiate(&aged, "old"),
        submitter.instantiate(&aged, "pinned"),
    ];
    let mut builds = [0; 3];
    for (build, top) in builds.iter_mut().zip(&tops) {
        *build = submit_closure(farm, submitter, top).await;
    }
    for build in builds {
        assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    }
    builds
}

/// Whether the cache's HTTP listener serves a narinfo for `path`.
async fn served(farm: &Farm, path: &StorePath) -> bool {
    let (status, _) = http_get(farm.cache_port, &format!("/{}.narinfo", path.hash_part())).await;
    status.contains("200")
}

/// The narinfos in the cache directory, and the NAR files.
fn cache_files(cache: &Path) -> (Vec<NarInfo>, BTreeSet<String>) {
    let mut infos = Vec::new();
    for entry in fs_err::read_dir(cache).unwrap() {
        let path = entry.unwrap().path();
        if path
            .extension()
            .is_some_and(|extension| extension == "narinfo")
        {
            infos.push(NarInfo::parse(&fs_err::read_to_string(&path).unwrap()).unwrap());
        }
    }
    let nars = fs_err::read_dir(cache.join("nar"))
        .unwrap()
        .map(|entry| format!("nar/{}", entry.unwrap().file_name().to_str().unwrap()))
        .collect();
    (infos, nars)
}

/// Stock Nix realising `out` in a fresh store from the farm's cache only, building nothing.
fn substitute(farm: &Farm, consumer: &ChrootStore, out: &StorePath) {
    succeed(
        consumer
            .command("nix-store")
            .args(["--realise", &out.to_absolute(), "--max-jobs", "0"])
            .args([
                "--option",
                "substituters",
                &format!("http://127.0.0.1:{}", farm.cache_port),
            ])
            .args([
                "--option",
                "trusted-public-keys",
                &farm.cache_key().public_key().to_string(),
            ]),
    );
}

/// Makes `old` and `pinned` finished 40 days ago, past `keep_days`, and pins `pinned`.
async fn age_and_pin(farm: &Farm, old: i64, pinned: i64) {
    farm.db()
        .await
        .execute(
            "UPDATE builds SET finished_at = finished_at - interval '40 days' WHERE id = ANY($1)",
            &[&vec![old, pinned]],
        )
        .await
        .unwrap();
    let pinning = farm
        .run_drover_as(Role::Admin, &["admin", "pin", &pinned.to_string()])
        .await;
    assert!(pinning.status.success(), "{pinning:?}");
}

/// Waits for two sweeps that start from now on to complete: the first still keeps what was
/// looked up since the one before it began (the builds' own uploads and lookups), the second
/// only what was looked up since the first began.
async fn wait_for_a_sweep(db: &tokio_postgres::Client) {
    let since: std::time::SystemTime = db.query_one("SELECT now()", &[]).await.unwrap().get(0);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while db
        .query_one(
            "SELECT count(*) FROM cache_sweeps WHERE started_at > $1",
            &[&since],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        < 2
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no sweep after the builds aged"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// `old`'s log expired (the attempt says so, its file is gone); `kept`'s is still there.
async fn the_old_log_expired(farm: &Farm, old: i64, kept: i64) {
    farm.wait_for_count(
        "the old log to expire",
        "SELECT count(*) FROM step_attempts WHERE log_expired_at IS NOT NULL AND log_file IS NULL",
        1,
    )
    .await;
    let logs = farm
        .run_drover(&["logs", &old.to_string(), "old-top"])
        .await;
    let said = String::from_utf8_lossy(&logs.stderr);
    assert!(
        !logs.status.success() && said.contains("expired on"),
        "{logs:?}"
    );
    let kept_log = farm
        .run_drover(&["logs", &kept.to_string(), "diamond-top"])
        .await;
    assert!(kept_log.status.success(), "{kept_log:?}");
    let log_files = fs_err::read_dir(farm.dir.path().join("logs"))
        .unwrap()
        .count();
    let logged = farm
        .count("SELECT count(*) FROM step_attempts WHERE log_file IS NOT NULL")
        .await;
    assert_eq!(
        i64::try_from(log_files).unwrap(),
        logged,
        "the expired log's file is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeps_racing_uploads_keep_every_root_and_stock_nix_substitutes_what_stays() {
    let (farm, [diamond, old, pinned]) = farm_with_three_builds(1).await;
    let (diamond_out, old_out, pinned_out) = (
        output(&farm, diamond).await,
        output(&farm, old).await,
        output(&farm, pinned).await,
    );

    age_and_pin(&farm, old, pinned).await;
    let db = farm.db().await;
    // The log of `old`'s top step ended 100 days ago: past the default 90 days.
    let expiring = db
        .execute(
            "UPDATE step_attempts SET finished_at = finished_at - interval '100 days'
             WHERE step_id = (SELECT s.id FROM steps s JOIN builds b ON b.drv_path = s.drv_path
                              WHERE b.id = $1) AND log_file IS NOT NULL",
            &[&old],
        )
        .await
        .unwrap();
    assert_eq!(expiring, 1);
    wait_for_a_sweep(&db).await;

    assert!(
        !served(&farm, &old_out).await,
        "an aged build's output stayed"
    );
    for kept in [&diamond_out, &pinned_out] {
        assert!(served(&farm, kept).await, "{kept} was collected");
    }
    let (infos, nars) = cache_files(&farm.dir.path().join("cache"));
    let names: BTreeSet<&str> = infos.iter().map(|info| info.store_path.name()).collect();
    assert!(
        !names.contains("old-base") && !names.contains("old-top"),
        "{names:?}"
    );
    assert!(
        names.contains("pinned-base"),
        "the pinned build's input went: {names:?}"
    );
    assert!(
        !names.contains("diamond-base"),
        "the diamond's base is no output's reference and no live build needs it: {names:?}"
    );
    let referenced: BTreeSet<String> = infos.iter().map(|info| info.url.clone()).collect();
    assert_eq!(
        referenced, nars,
        "every NAR file belongs to a narinfo and the reverse"
    );

    the_old_log_expired(&farm, old, diamond).await;

    let consumer = ChrootStore::new(farm.dir.path().join("consumer"));
    substitute(&farm, &consumer, &diamond_out);
    substitute(&farm, &consumer, &pinned_out);
    let (_, metrics) = http_request(farm.metrics_address(), "/metrics").await;
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("\ndrover_cache_gc_deleted_paths_total "),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_says_what_would_go_and_why_and_deletes_nothing() {
    let (farm, [_, old, pinned]) = farm_with_three_builds(86_400).await;
    age_and_pin(&farm, old, pinned).await;
    let db = farm.db().await;
    let missing = farm
        .run_drover_as(Role::Admin, &["admin", "pin", "999999"])
        .await;
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no build 999999"),
        "{missing:?}"
    );

    let lines = |output: &std::process::Output| -> Vec<(String, String)> {
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout.clone())
            .unwrap()
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                assert_eq!(fields.len(), 3, "{line}");
                (fields[0].to_owned(), fields[2].to_owned())
            })
            .collect()
    };
    let printed = run_dry_run(&farm, &[]);
    let doomed = lines(&printed);
    assert_eq!(
        names(&doomed),
        ["diamond-base", "old-base", "old-top"]
            .map(str::to_owned)
            .into(),
        "{printed:?}"
    );
    assert!(
        doomed
            .iter()
            .all(|(_, why)| why.starts_with("no build kept needs it"))
    );
    assert!(
        served(&farm, &output(&farm, old).await).await,
        "a dry run deleted something"
    );

    // The newest build of each branch stays however old: `old` is main's newest.
    db.execute(
        "UPDATE builds SET metadata = '{\"branch\": \"main\"}' WHERE id = $1",
        &[&old],
    )
    .await
    .unwrap();
    let keyed = lines(&run_dry_run(
        &farm,
        &[("key", "branch".into()), ("keep_per_key", 1.into())],
    ));
    assert_eq!(
        names(&keyed),
        ["diamond-base".to_owned()].into(),
        "main's newest build went"
    );

    let mut bounded = lines(&run_dry_run(&farm, &[("max_bytes", 1.into())]));
    bounded.retain(|(_, why)| why.contains("gc.max_bytes"));
    assert_eq!(
        names(&bounded),
        ["diamond-left", "diamond-right", "diamond-top"]
            .map(str::to_owned)
            .into(),
        "the recent build goes under a 1-byte bound, the pinned one never does"
    );
}

/// The names of the store paths of a dry run's lines.
fn names(lines: &[(String, String)]) -> BTreeSet<String> {
    lines
        .iter()
        .map(|(path, _)| StorePath::from_absolute(path).unwrap().name().to_owned())
        .collect()
}

/// `drover-queue-runner gc --dry-run` with the farm's configuration and more `[gc]` keys.
fn run_dry_run(farm: &Farm, gc: &[(&str, toml::Value)]) -> std::process::Output {
    let text = farm.runner_config_text(&farm.database.connection_string);
    let mut config: toml::Table = text.parse().unwrap();
    let table = config
        .get_mut("gc")
        .and_then(toml::Value::as_table_mut)
        .unwrap();
    for (key, value) in gc {
        table.insert((*key).to_owned(), value.clone());
    }
    let file = farm.dir.path().join("gc-dry-run.toml");
    fs_err::write(&file, config.to_string()).unwrap();
    Command::new(RUNNER)
        .arg("--config")
        .arg(&file)
        .args(["gc", "--dry-run"])
        .output()
        .unwrap()
}
