//! History pruning (`[history] keep_days`): on a database laid out by SQL, a run deletes the
//! builds past their days and the steps, attempts, logs, outputs, edges and derivations nothing
//! kept reaches, and keeps what a recent, pinned or unfinished build needs (a step reached
//! through an old edge, a derivation only in a live closure), what a restart started again, what
//! was stored recently, and the learned durations; derivations wait while a build queued by SQL
//! waits to be planned. On a running farm, pruning while builds come and go loses nothing live.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::sync::Arc;

use common::{BuilderSpec, Farm, Stored, migrated_database};
use drover_queue_runner::history::{PlanGate, Pruned, Pruner};
use drover_queue_runner::logs::LogStore;
use drover_scheduler::history::HistoryPolicy;
use test_support::fake_derivations::{Factory, FakeDrv, Spec};

const POLICY: HistoryPolicy = HistoryPolicy {
    keep_days: 30,
    cache_keep_days: 7,
};

/// The graph, by derivation name (`/nix/store/<name>.drv`; ages in days):
/// - `kept` (build finished 1 day ago) → `reused` (a step that ended 100 days ago);
/// - `old` (build finished 100 days ago) → `reused`, `old-input`; its attempt has a log;
/// - `pinned` (build finished 100 days ago, pinned);
/// - `restarted` (a step of the old build started again: no end);
/// - `live` (a queued build, planned) needing `live-input` (no step: built long ago);
/// - `kept-input`: in the kept build's verified closure, without a step (found in a cache);
/// - `recent` (a step that ended 1 day ago, no build reaches it) → `recent-input` (100 days);
/// - `stray` (stored 100 days ago, named by nothing) and `fresh` (stored now, named by nothing).
const LAYOUT: &str = "
    INSERT INTO machines (name, systems, supported_features, mandatory_features, max_jobs,
                          speed_factor, nix_version, connected)
    VALUES ('b1', '{x86_64-linux}', '{}', '{}', 1, 1, '2.8', false);
    INSERT INTO derivations (path, text, created_at)
    SELECT '/nix/store/' || name || '.drv', 'Derive()', now() - make_interval(days => age)
    FROM (VALUES ('kept', 1), ('reused', 100), ('old', 100), ('old-input', 100),
                 ('pinned', 100), ('restarted', 100), ('live', 0), ('live-input', 100),
                 ('stray', 100), ('fresh', 0), ('kept-input', 100), ('recent', 1),
                 ('recent-input', 100)) AS d(name, age);
    INSERT INTO verified_derivations (path, system, required_features, output_names, output_paths,
                                      input_derivations, input_sources, input_outputs,
                                      hash_modulo)
    VALUES ('/nix/store/live.drv', 'x86_64-linux', '{}', '{out}', '{/nix/store/live}',
            '{/nix/store/live-input.drv}', '{}', '{}', decode(repeat('00', 32), 'hex')),
           ('/nix/store/live-input.drv', 'x86_64-linux', '{}', '{out}',
            '{/nix/store/live-input}', '{}', '{}', '{}', decode(repeat('00', 32), 'hex')),
           ('/nix/store/kept.drv', 'x86_64-linux', '{}', '{out}', '{/nix/store/kept}',
            '{/nix/store/kept-input.drv}', '{}', '{}', decode(repeat('00', 32), 'hex')),
           ('/nix/store/kept-input.drv', 'x86_64-linux', '{}', '{out}',
            '{/nix/store/kept-input}', '{}', '{}', '{}', decode(repeat('00', 32), 'hex'));
    INSERT INTO steps (drv_path, status, system, finished_at)
    SELECT '/nix/store/' || name || '.drv', status::step_status, 'x86_64-linux',
           now() - make_interval(days => age)
    FROM (VALUES ('reused', 'succeeded', 100), ('old-input', 'succeeded', 100),
                 ('old', 'failed', 100), ('pinned', 'succeeded', 100),
                 ('recent-input', 'succeeded', 100), ('recent', 'succeeded', 1),
                 ('kept', 'succeeded', 1)) AS s(name, status, age);
    INSERT INTO steps (drv_path, status, system) VALUES
        ('/nix/store/restarted.drv', 'waiting', 'x86_64-linux'),
        ('/nix/store/live.drv', 'runnable', 'x86_64-linux');
    INSERT INTO step_inputs (step_id, input_id)
    SELECT s.id, i.id FROM steps s, steps i
    WHERE (s.drv_path, i.drv_path) IN (('/nix/store/kept.drv', '/nix/store/reused.drv'),
                                       ('/nix/store/old.drv', '/nix/store/reused.drv'),
                                       ('/nix/store/old.drv', '/nix/store/old-input.drv'),
                                       ('/nix/store/recent.drv', '/nix/store/recent-input.drv'));
    INSERT INTO step_attempts (id, step_id, machine, status, started_at, finished_at, log_file)
    SELECT gen_random_uuid(), id, 'b1', 'failed', finished_at, finished_at, 'old.log.zst'
    FROM steps WHERE drv_path = '/nix/store/old.drv';
    INSERT INTO step_outputs (step_id, output_name, path)
    SELECT id, 'out', '/nix/store/old-input' FROM steps WHERE drv_path = '/nix/store/old-input.drv';
    INSERT INTO builds (drv_path, status, ingested_at, finished_at, pinned_at)
    SELECT '/nix/store/' || name || '.drv', status::build_status, now(),
           now() - make_interval(days => age), CASE WHEN pinned THEN now() END
    FROM (VALUES ('kept', 'succeeded', 1, false), ('old', 'failed', 100, false),
                 ('pinned', 'succeeded', 100, true)) AS b(name, status, age, pinned);
    INSERT INTO builds (drv_path, status, ingested_at) VALUES ('/nix/store/live.drv', 'queued', now());
    INSERT INTO step_durations (package, system, samples, mean_ms)
    VALUES ('old', 'x86_64-linux', 1, 1000);
";

/// The names of the rows of `table` left (`/nix/store/<name>.drv` in `column`).
async fn names(client: &tokio_postgres::Client, table: &str, column: &str) -> Vec<String> {
    let rows = client
        .query(
            &format!(
                "SELECT substring({column} FROM '/nix/store/(.*)\\.drv') FROM {table} ORDER BY 1"
            ),
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|row| row.get(0)).collect()
}

#[tokio::test]
async fn a_run_deletes_what_nothing_kept_reaches_and_keeps_the_rest() {
    let (database, pool) = migrated_database().await;
    let client = database.connect().await;
    client.batch_execute(LAYOUT).await.unwrap();
    let logs = tempfile::tempdir().unwrap();
    fs_err::write(logs.path().join("old.log.zst"), b"log").unwrap();
    let gate = Arc::new(PlanGate::default());
    let store = LogStore::new(logs.path().to_owned(), 1 << 20);
    let pruner = Pruner::new(pool, gate, store, POLICY, None, 3);

    let run = pruner.prune().await.unwrap();

    let expected = Pruned {
        builds: 1,
        steps: 2,
        logs: 1,
        derivations: 3,
        interrupted: false,
    };
    assert_eq!(run, expected);
    assert_eq!(
        names(&client, "builds", "drv_path").await,
        ["kept", "live", "pinned"]
    );
    assert_eq!(
        names(&client, "steps", "drv_path").await,
        [
            "kept",
            "live",
            "pinned",
            "recent",
            "recent-input",
            "restarted",
            "reused"
        ],
        "the old build's steps go; an old step a kept build or a recent step reaches stays"
    );
    assert_eq!(
        names(&client, "derivations", "path").await,
        [
            "fresh",
            "kept",
            "kept-input",
            "live",
            "live-input",
            "pinned",
            "recent",
            "recent-input",
            "restarted",
            "reused"
        ],
        "derivations nothing names go once stored long ago; a kept build's closure stays"
    );
    for (table, expected) in [
        ("step_attempts", 0),
        ("step_outputs", 0),
        ("step_inputs", 2),
        ("step_durations", 1),
    ] {
        let count: i64 = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(count, expected, "{table}");
    }
    assert!(!logs.path().join("old.log.zst").exists());
    assert_eq!(
        pruner.prune().await.unwrap(),
        Pruned::default(),
        "a second run finds nothing"
    );
}

#[tokio::test]
async fn derivations_wait_while_a_build_queued_by_sql_waits_to_be_planned() {
    let (database, pool) = migrated_database().await;
    let client = database.connect().await;
    client.batch_execute(LAYOUT).await.unwrap();
    client
        .batch_execute("INSERT INTO builds (drv_path) VALUES ('/nix/store/fresh.drv');")
        .await
        .unwrap();
    let logs = tempfile::tempdir().unwrap();
    let store = LogStore::new(logs.path().to_owned(), 1 << 20);
    let pruner = Pruner::new(pool, Arc::new(PlanGate::default()), store, POLICY, None, 3);

    let run = pruner.prune().await.unwrap();

    assert!(run.interrupted, "{run:?}");
    assert_eq!(run.derivations, 0);
    assert_eq!(
        run.steps, 2,
        "steps do not wait: an unplanned build names none"
    );
    assert!(
        names(&client, "derivations", "path")
            .await
            .contains(&"stray".to_owned())
    );
}

/// Makes every finished build, step and attempt, and every derivation, 100 days older.
const AGE_EVERYTHING: &str = "
    UPDATE builds SET finished_at = finished_at - interval '100 days' WHERE finished_at IS NOT NULL;
    UPDATE steps SET finished_at = finished_at - interval '100 days' WHERE finished_at IS NOT NULL;
    UPDATE step_attempts SET finished_at = finished_at - interval '100 days'
    WHERE finished_at IS NOT NULL;
    UPDATE derivations SET created_at = created_at - interval '100 days';
";

/// A farm pruning history every second (builds kept 30 days), with what it built.
struct Built {
    farm: Farm,
    factory: Factory,
    /// `shared`, then `old`, which needs it: built by `old_build`.
    old: [FakeDrv; 2],
    old_build: i64,
    pinned_build: i64,
    /// Needs `shared` and a system no builder offers yet: live while history goes.
    live: i64,
}

async fn farm_with_history() -> Built {
    let mut farm = Farm::new().await;
    farm.unsupported_grace_secs = 3600;
    farm.runner_settings = vec![
        ("gc.enabled", false.into()),
        ("gc.interval_secs", 1.into()),
        ("history.keep_days", 30.into()),
    ];
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec {
        max_jobs: 2,
        build_ms: 20,
        ..BuilderSpec::new("b1")
    });
    let mut factory = Factory::default();
    let shared = factory.make(&Spec::new("shared"));
    let old = factory.make(&Spec::new("old").inputs(&[&shared]));
    let pinned = factory.make(&Spec::new("pinned"));
    let old_build = farm.submit(&[&shared, &old]).await;
    let pinned_build = farm.submit(&[&pinned]).await;
    for build in [old_build, pinned_build] {
        assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    }
    let later = factory.make(
        &Spec::new("later")
            .system("aarch64-linux")
            .inputs(&[&shared]),
    );
    let live = farm.submit(&[&shared, &later]).await;
    farm.wait_for_count(
        "the live build to be planned",
        "SELECT count(*) FROM steps WHERE drv_path LIKE '%-later.drv' AND status = 'runnable'",
        1,
    )
    .await;
    Built {
        farm,
        factory,
        old: [shared, old],
        old_build,
        pinned_build,
        live,
    }
}

/// The log files of the attempts of the steps of derivations named `name`.
async fn log_files(farm: &Farm, name: &str) -> Vec<String> {
    let rows = farm
        .db()
        .await
        .query(
            "SELECT a.log_file FROM step_attempts a JOIN steps s ON s.id = a.step_id
             WHERE s.drv_path LIKE '%-' || $1 || '.drv'",
            &[&name],
        )
        .await
        .unwrap();
    rows.iter().filter_map(|row| row.get(0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_while_the_farm_builds_loses_nothing_live() {
    let Built {
        mut farm,
        mut factory,
        old,
        old_build,
        pinned_build,
        live,
    } = farm_with_history().await;
    let old_logs = log_files(&farm, "old").await;
    assert_eq!(old_logs.len(), 1, "the old step's attempt has a log");
    let learned =
        "SELECT count(*) FROM step_durations WHERE package IN ('old', 'shared', 'pinned')";
    assert_eq!(farm.count(learned).await, 3, "successes were learned");
    let db = farm.db().await;
    db.batch_execute(AGE_EVERYTHING).await.unwrap();
    db.execute(
        "UPDATE builds SET pinned_at = now() WHERE id = $1",
        &[&pinned_build],
    )
    .await
    .unwrap();

    // Builds come and go while history is pruned every second.
    let busy = factory.chain("busy", 6);
    let building = async {
        for (index, drv) in busy.iter().enumerate() {
            let build = farm
                .submit(&busy[..=index].iter().collect::<Vec<_>>())
                .await;
            assert_eq!(
                farm.wait_for_build(build).await,
                Stored::Succeeded,
                "{drv:?}"
            );
        }
    };
    let pruned = farm.wait_for_count(
        "the old build to be pruned with its steps and derivations",
        "SELECT count(*) FROM derivations WHERE path LIKE '%-old.drv'",
        0,
    );
    tokio::join!(building, pruned);

    let steps =
        |name: &str| format!("SELECT count(*) FROM steps WHERE drv_path LIKE '%-{name}.drv'");
    assert_eq!(
        farm.count(&format!(
            "SELECT count(*) FROM builds WHERE id = {old_build}"
        ))
        .await,
        0
    );
    assert_eq!(farm.count(&steps("old")).await, 0);
    assert_eq!(
        farm.count(&steps("shared")).await,
        1,
        "the live build reaches it"
    );
    assert_eq!(farm.count(&steps("pinned")).await, 1);
    assert_eq!(farm.count(&steps("later")).await, 1);
    assert_eq!(
        farm.count(learned).await,
        3,
        "learned durations are never pruned"
    );
    for log in &old_logs {
        assert!(!farm.dir.path().join("logs").join(log).exists(), "{log}");
    }
    let (_, metrics) = common::nix_farm::http_request(farm.metrics_address(), "/metrics").await;
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("drover_history_pruned_rows_total{table=\"builds\"} 1"),
        "{metrics}"
    );

    farm.start_builder(&BuilderSpec {
        systems: &["aarch64-linux"],
        ..BuilderSpec::new("b2")
    });
    assert_eq!(farm.wait_for_build(live).await, Stored::Succeeded);
    let again = farm.submit(&[&old[0], &old[1]]).await;
    assert_eq!(
        farm.wait_for_build(again).await,
        Stored::Succeeded,
        "what was pruned builds again"
    );
}
