//! A runner killed with SIGKILL while real Nix builds run: the builders go on building, keep
//! what finished while the runner was down, and the restarted runner takes every attempt back.
//! No derivation is built twice (each build counts its runs in a file outside the store), every
//! result arrives, and no step is left `running`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::path::Path;

use common::nix::ChrootStore;
use common::nix_farm::{served_log, submit_closure};
use common::{AttemptStatus, BuilderSpec, DEADLINE, Farm, Stored};

/// Steps in flight when the runner dies.
const IN_FLIGHT: usize = 10;

/// Ten steps that each count their run in `runs/<i>`, log that they started and wait for
/// `release-<i mod 2>`, and a top that needs them all.
fn write_expression(dir: &Path) -> std::path::PathBuf {
    let expression = dir.join("in-flight.nix");
    fs_err::create_dir_all(dir.join("runs")).unwrap();
    fs_err::write(
        &expression,
        format!(
            r#"let
              step = i: derivation {{
                name = "in-flight-${{toString i}}";
                system = "x86_64-linux";
                builder = "/bin/sh";
                args = [ "-c" ''
                  echo run >> {dir}/runs/${{toString i}}
                  echo "step ${{toString i}} started" >&2
                  while [ ! -e {dir}/release-${{toString (i - 2 * (i / 2))}} ]; do /bin/sleep 0.1; done
                  echo "built ${{toString i}}" > $out
                '' ];
              }};
            in {{
              top = derivation {{
                name = "in-flight-all";
                system = "x86_64-linux";
                builder = "/bin/sh";
                args = [ "-c" "echo $steps > $out" ];
                steps = builtins.genList step {IN_FLIGHT};
              }};
            }}"#,
            dir = dir.display()
        ),
    )
    .unwrap();
    expression
}

/// How many times each step ran so far.
fn runs(dir: &Path) -> Vec<usize> {
    (0..IN_FLIGHT)
        .map(|i| {
            fs_err::read_to_string(dir.join(format!("runs/{i}")))
                .map_or(0, |text| text.lines().count())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runner_takes_back_every_step_its_builders_ran_and_rebuilds_none() {
    let mut farm = Farm::new().await;
    // Ten real builds on a loaded machine: a builder slow to ping must not count as lost, which
    // would build its steps elsewhere before the runner is killed.
    farm.liveness_timeout_secs = 30;
    let url = farm.database.connection_string.clone();
    let mut runner = farm.spawn_runner_process(&url, "runner-1.log").await;
    for name in ["b1", "b2"] {
        let store = farm.dir.path().join(format!("stores/{name}"));
        farm.start_builder(&BuilderSpec {
            max_jobs: 5,
            nix_store: Some(&store),
            ..BuilderSpec::new(name)
        });
    }
    let dir = farm.dir.path().to_owned();
    let submitter = ChrootStore::new(dir.join("submitter"));
    let top = submitter.instantiate(&write_expression(&dir), "top");
    let build = submit_closure(&farm, &submitter, &top).await;
    test_support::poll_until(DEADLINE, "every step to run on a builder", || async {
        runs(&dir).iter().all(|runs| *runs > 0).then_some(())
    })
    .await;
    assert_eq!(
        runs(&dir),
        [1; IN_FLIGHT],
        "a step ran twice before the runner was killed: {:?}",
        farm.attempts().await
    );

    runner.child_mut().kill().unwrap();
    runner.child_mut().wait().unwrap();
    // Half the steps finish while no runner is there; their builders keep the results.
    fs_err::write(dir.join("release-0"), "").unwrap();
    let _runner = farm.spawn_runner_process(&url, "runner-2.log").await;
    test_support::poll_until(DEADLINE, "the released steps to be recorded", || async {
        (farm
            .count("SELECT count(*) FROM step_attempts WHERE status = 'succeeded'")
            .await
            == 5)
            .then_some(())
    })
    .await;
    // The other half were still building when the runner took them back.
    fs_err::write(dir.join("release-1"), "").unwrap();
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);

    assert_eq!(runs(&dir), [1; IN_FLIGHT], "a step was built again");
    let attempts = farm.attempts().await;
    assert_eq!(
        attempts.len(),
        IN_FLIGHT + 1,
        "one attempt per step: {attempts:?}"
    );
    assert!(
        attempts
            .iter()
            .all(|(_, status, _)| *status == AttemptStatus::Succeeded),
        "each taken back and succeeded: {attempts:?}"
    );
    assert_eq!(
        farm.count("SELECT count(*) FROM steps WHERE status <> 'succeeded'")
            .await,
        0
    );
    let drvs: Vec<String> = farm
        .db()
        .await
        .query(
            "SELECT drv_path FROM steps WHERE drv_path LIKE '%-in-flight-_.drv'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(drvs.len(), IN_FLIGHT);
    for drv in drvs {
        let log = served_log(&farm, drv.trim_start_matches("/nix/store/")).await;
        assert!(
            log.contains("started"),
            "the log written before the restart was sent again: {drv}: {log:?}"
        );
    }
}
