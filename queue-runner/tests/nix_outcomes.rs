//! Every way a real Nix build can end, as drover records it: a derivation's own failures (exit
//! code, no output, a fixed-output hash mismatch, too much log) are permanent after exactly one
//! attempt; an input that cannot be made valid is the infrastructure's fault and never built on
//! the builder; a builder killed mid-build, or a cancelled build, leaves no process of the build
//! behind.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::nix::examples;
use common::nix_farm::{
    served_log, shell_step, start_with_one_nix_builder, submit_closure, submit_fixture,
    upstream_with_diamond_base,
};
use common::{AttemptStatus, DEADLINE, Farm, Stored, attempt_status};

/// Every attempt of the farm: derivation name (`broken.drv`) to its attempts' statuses and
/// messages, in order.
async fn attempts(farm: &Farm) -> BTreeMap<String, Vec<(AttemptStatus, String)>> {
    let mut attempts: BTreeMap<String, Vec<(AttemptStatus, String)>> = BTreeMap::new();
    for row in farm
        .db()
        .await
        .query(
            "SELECT s.drv_path, a.status::text, coalesce(a.message, '') FROM step_attempts a
             JOIN steps s ON s.id = a.step_id ORDER BY a.started_at",
            &[],
        )
        .await
        .unwrap()
    {
        let drv: String = row.get(0);
        let name = drv.split_once('-').unwrap().1.to_owned();
        attempts
            .entry(name)
            .or_default()
            .push((attempt_status(row.get(1)), row.get(2)));
    }
    attempts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_derivations_own_failures_are_permanent_after_one_attempt() {
    let mut farm = Farm::new().await;
    let (_, submitter) = start_with_one_nix_builder(&mut farm).await;
    let cases = [
        ("broken", AttemptStatus::Failed, "builder for"),
        (
            "noOutput",
            AttemptStatus::Failed,
            "failed to produce output path",
        ),
        ("wrongHash", AttemptStatus::Failed, "hash mismatch"),
        ("loud", AttemptStatus::LogLimit, "bytes of log output"),
    ];
    let mut builds = BTreeMap::new();
    for (attribute, _, _) in cases {
        builds.insert(
            attribute,
            submit_fixture(&farm, &submitter, attribute).await,
        );
    }
    for (attribute, _, _) in cases {
        assert_eq!(
            farm.wait_for_build(builds[attribute].0).await,
            Stored::Failed,
            "{attribute}"
        );
    }
    let attempts = attempts(&farm).await;
    for (attribute, status, reason) in cases {
        let drv = builds[attribute].1.split_once('-').unwrap().1;
        let tried = &attempts[drv];
        assert_eq!(tried.len(), 1, "{attribute} was tried again: {tried:?}");
        assert_eq!(tried[0].0, status, "{attribute}: {tried:?}");
        assert!(tried[0].1.contains(reason), "{attribute}: {tried:?}");
        assert!(
            !tried[0].1.contains('\u{1b}'),
            "{attribute}'s reason keeps colour codes: {tried:?}"
        );
    }
    let log = served_log(&farm, &builds["noOutput"].1).await;
    assert!(
        log.contains("this build forgets to create its output"),
        "{log}"
    );
    assert!(!log.contains('\u{1b}'), "the log keeps colour codes: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_no_substituter_has_fails_the_step_as_infrastructure_without_building_it() {
    let mut farm = Farm::new().await;
    let (_, _) = upstream_with_diamond_base(&mut farm);
    // The runner sees the upstream and plans `base` as available; the builder cannot reach it.
    farm.hide_upstreams_from_builders = true;
    let (_, submitter) = start_with_one_nix_builder(&mut farm).await;
    let top = submitter.instantiate(&examples().join("diamond.nix"), "top");
    let build = submit_closure(&farm, &submitter, &top).await;
    let status = farm.wait_for_build(build).await;
    assert_ne!(status, Stored::Succeeded);
    let attempts = attempts(&farm).await;
    assert!(
        !attempts.contains_key("diamond-base.drv"),
        "the missing input was built on the builder: {attempts:?}"
    );
    // The build ends when the first of `left` and `right` runs out of retries; the other is
    // stopped then if it runs.
    let finished: Vec<&(AttemptStatus, String)> = ["diamond-left.drv", "diamond-right.drv"]
        .iter()
        .flat_map(|drv| &attempts[*drv])
        .filter(|(status, _)| *status != AttemptStatus::Running)
        .collect();
    assert!(
        finished.len() > 2,
        "an infrastructure failure is retried: {finished:?}"
    );
    for (status, message) in finished {
        // The other branch's attempt running when the build failed is stopped: nothing needs it.
        if *status == AttemptStatus::Aborted {
            assert!(
                message.starts_with("no build needs it any more"),
                "{message}"
            );
            continue;
        }
        assert_eq!(*status, AttemptStatus::InfrastructureFailure, "{message}");
        assert!(
            message.contains("inputs not in the farm's cache or any substituter")
                && message.contains("-diamond-base"),
            "{message}"
        );
    }
}

/// The state letter of a process (`S`, `Z`, …), or `None` once it is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = fs_err::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// Submits a derivation that writes its pid (as the host sees it) and sleeps; returns the build
/// and that pid once the build's process runs.
async fn start_sleeper(farm: &Farm, submitter: &common::nix::ChrootStore) -> (i64, u32) {
    let pid_file = farm.dir.path().join("sleeper.pid");
    // `cut` reads its parent's pid, the shell's, as the host sees it (the build runs in a PID
    // namespace, where `$$` would be another number); the shell then becomes `sleep`.
    let script = format!(
        "/usr/bin/cut -d' ' -f4 /proc/self/stat > {pid}.partial && /bin/mv {pid}.partial {pid} && exec /bin/sleep 600",
        pid = pid_file.display()
    );
    let top = shell_step(submitter, "sleeper", &script);
    let build = submit_closure(farm, submitter, &top).await;
    let pid: u32 = test_support::poll_until(DEADLINE, "the build to write its pid", || async {
        fs_err::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
    })
    .await;
    // The shell writes the file, then becomes `sleep`.
    test_support::poll_until(DEADLINE, "the build's process to become sleep", || async {
        let command = fs_err::read_to_string(format!("/proc/{pid}/cmdline")).ok()?;
        command.starts_with("/bin/sleep").then_some(())
    })
    .await;
    (build, pid)
}

/// Waits until process `pid` is gone (or a zombie nobody reaped yet).
async fn wait_until_gone(pid: u32, what: &str) {
    test_support::poll_until(Duration::from_secs(10), what, || async {
        matches!(process_state(pid), None | Some('Z')).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_killed_mid_build_leaves_no_process_of_the_build() {
    let mut farm = Farm::new().await;
    let (_, submitter) = start_with_one_nix_builder(&mut farm).await;
    let (_, pid) = start_sleeper(&farm, &submitter).await;
    farm.kill_builder(0);
    wait_until_gone(pid, "the build's process to die with its builder").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_real_build_stops_its_process() {
    let mut farm = Farm::new().await;
    let (_, submitter) = start_with_one_nix_builder(&mut farm).await;
    let (build, pid) = start_sleeper(&farm, &submitter).await;
    farm.client()
        .await
        .cancel(drover_proto::v1::CancelRequest { build_id: build })
        .await
        .unwrap();
    assert_eq!(farm.wait_for_build(build).await, Stored::Cancelled);
    wait_until_gone(pid, "the cancelled build's process to stop").await;
    assert_eq!(
        farm.count("SELECT count(*) FROM machines WHERE connected")
            .await,
        1,
        "the builder stays"
    );
}
