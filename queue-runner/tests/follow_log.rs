//! `FollowLog` of a real Nix build: the lines arrive while the build runs, the stream ends with
//! the build, heartbeats fill the silences, and following it afterwards gives the whole log from
//! the start; `GetLog` of a running step gives what has arrived so far; `drover logs -f` waits
//! for a step not dispatched yet and exits as the step ended.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use common::nix_farm::{shell_step, start_with_one_nix_builder, submit_closure};
use common::{DEADLINE, Farm, Stored};
use drover_proto::v1::log_event::Event;
use drover_proto::v1::{FollowLogRequest, GetLogRequest, LogEvent};
use test_support::wait::poll_until;

/// Reads a `FollowLog` stream to its end: the log, and whether a heartbeat came.
async fn follow(farm: &Farm, drv_path: &str, mut seen: impl FnMut(&str)) -> (String, bool) {
    let mut stream = farm
        .client()
        .await
        .follow_log(FollowLogRequest {
            drv_path: drv_path.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut log = String::new();
    let mut heartbeat = false;
    tokio::time::timeout(DEADLINE, async {
        while let Some(LogEvent { event }) = stream.message().await.unwrap() {
            match event {
                Some(Event::Data(data)) => {
                    log.push_str(&String::from_utf8_lossy(&data));
                    seen(&log);
                }
                Some(Event::Heartbeat(_)) => heartbeat = true,
                None => {}
            }
        }
    })
    .await
    .expect("the log to end with the build");
    (log, heartbeat)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_real_builds_log_arrives_live_and_whole_afterwards() {
    let mut farm = Farm::new().await;
    farm.heartbeat_ms = 300;
    let (_, submitter) = start_with_one_nix_builder(&mut farm).await;
    let top = shell_step(
        &submitter,
        "talker",
        r#"for i in 1 2 3 4 5 6; do echo \"line $i\" >&2; /bin/sleep 0.5; done; echo done > $out"#,
    );
    let build = submit_closure(&farm, &submitter, &top).await;
    farm.wait_for_count(
        "the build to start",
        "SELECT count(*) FROM step_attempts WHERE status = 'running'",
        1,
    )
    .await;

    let mut first_line_at = None;
    let (live, heartbeat) = follow(&farm, &top.to_absolute(), |log| {
        if first_line_at.is_none() && log.contains("line 1") {
            first_line_at = Some(std::time::SystemTime::now());
        }
    })
    .await;
    // The log ends before the result is recorded.
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    let finished_at: f64 = farm
        .db()
        .await
        .query_one(
            "SELECT extract(epoch FROM finished_at)::float8 FROM step_attempts",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let first_line_at = first_line_at
        .expect("line 1 never came")
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        first_line_at + 1.0 < finished_at,
        "the first line came {:.2} s before the build ended: not live",
        finished_at - first_line_at
    );
    assert!(live.contains("line 6"), "{live:?}");
    assert!(heartbeat, "no heartbeat in the half-second silences");

    let (whole, _) = follow(&farm, &top.to_absolute(), |_| {}).await;
    for line in ["line 1", "line 3", "line 6"] {
        assert!(whole.contains(line), "{line} missing from {whole:?}");
    }
    let missing = farm
        .client()
        .await
        .follow_log(FollowLogRequest {
            drv_path: "/nix/store/00000000000000000000000000000000-never.drv".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_of_a_running_step_reads_as_far_as_it_has_come() {
    let mut farm = Farm::new().await;
    let (_, submitter) = start_with_one_nix_builder(&mut farm).await;
    let top = shell_step(
        &submitter,
        "slow-talker",
        "echo started >&2; for i in 1 2 3 4 5 6 7 8 9 10; do /bin/sleep 0.5; done; echo finished >&2; echo done > $out",
    );
    let build = submit_closure(&farm, &submitter, &top).await;
    let client = farm.client().await;
    let get_log = || {
        let mut client = client.clone();
        let drv_path = top.to_absolute();
        async move {
            client
                .get_log(GetLogRequest { drv_path })
                .await
                .ok()
                .map(tonic::Response::into_inner)
        }
    };
    let so_far = poll_until(DEADLINE, "the log's first line", || async {
        get_log()
            .await
            .filter(|log| String::from_utf8_lossy(&log.log).contains("started"))
    })
    .await;
    let running: i64 = farm
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM step_attempts WHERE status = 'running'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(running, 1, "the step ended before its log was read");
    assert!(!so_far.complete, "a running step's log is not complete");
    assert!(!String::from_utf8_lossy(&so_far.log).contains("finished"));

    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    let whole = get_log().await.expect("the stored log");
    assert!(whole.complete);
    let text = String::from_utf8_lossy(&whole.log);
    assert!(
        text.contains("started") && text.contains("finished"),
        "{text:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drover_logs_follow_waits_for_a_step_and_exits_as_it_ended() {
    let mut farm = Farm::new().await;
    let (_, submitter) = start_with_one_nix_builder(&mut farm).await;
    let expression = submitter.expression(
        r#"let
          slow = derivation {
            name = "slow";
            system = "x86_64-linux";
            builder = "/bin/sh";
            args = [ "-c" "/bin/sleep 2; echo > $out" ];
          };
        in { broken = derivation {
            name = "broken";
            system = "x86_64-linux";
            builder = "/bin/sh";
            args = [ "-c" "echo about to break >&2; exit 3" ];
            inherit slow;
        }; }"#,
    );
    let top = submitter.instantiate(&expression, "broken");
    let build = submit_closure(&farm, &submitter, &top).await;
    farm.wait_for_count(
        "slow to start",
        "SELECT count(*) FROM step_attempts WHERE status = 'running'",
        1,
    )
    .await;
    let broken_attempts = "SELECT count(*) FROM step_attempts a JOIN steps s ON s.id = a.step_id
                           WHERE s.drv_path LIKE '%-broken.drv'";
    assert_eq!(
        farm.count(broken_attempts).await,
        0,
        "broken is not dispatched yet"
    );

    let followed = farm
        .run_drover(&["logs", "-f", &build.to_string(), "broken"])
        .await;
    let stdout = String::from_utf8_lossy(&followed.stdout);
    let stderr = String::from_utf8_lossy(&followed.stderr);
    assert_eq!(farm.count(broken_attempts).await, 1);
    assert!(stdout.contains("about to break"), "{stdout}{stderr}");
    assert_eq!(followed.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("-broken.drv failed"),
        "the outcome is said: {stderr}"
    );
}
