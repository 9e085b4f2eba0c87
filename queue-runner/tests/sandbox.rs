//! Sandboxed builds as NixOS runs them: each builder's steps go through a root nix-daemon of its
//! private store that builds with `sandbox = true`, while the builder itself runs restricted as
//! the shipped unit restricts it (`/proc/sys` and `/nix` read-only but for the GC roots). A build
//! run by the builder itself would fail there ("mounting /proc: Operation not permitted");
//! through the daemon, builds succeed in the sandbox, inputs cross builders through the farm's
//! cache, and a derivation's own failures keep their typed statuses.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::nix::{ChrootStore, examples};
use common::nix_farm::{served_log, submit_closure, submit_fixture};
use common::{BuilderSpec, DEADLINE, Farm, Stored};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_run_in_the_daemons_sandbox_from_a_restricted_builder() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let stores = farm.dir.path().join("stores");
    for name in ["b1", "b2"] {
        farm.start_builder(&BuilderSpec {
            max_jobs: 1,
            nix_store: Some(&stores.join(name)),
            sandboxed: true,
            ..BuilderSpec::new(name)
        });
    }
    // Both present before anything is queued: one that joined late could find every step
    // already built by the other, and nothing would cross between their stores.
    test_support::poll_until(DEADLINE, "both builders to join", || async {
        (farm
            .count("SELECT count(*) FROM machines WHERE connected")
            .await
            == 2)
            .then_some(())
    })
    .await;
    let submitter = ChrootStore::new(farm.dir.path().join("submitter"));
    let top = submitter.instantiate(&examples().join("diamond.nix"), "top");
    let diamond = submit_closure(&farm, &submitter, &top).await;
    let mut builds = BTreeMap::new();
    for attribute in ["sandboxProbe", "broken", "noOutput"] {
        builds.insert(
            attribute,
            submit_fixture(&farm, &submitter, attribute).await,
        );
    }

    assert_eq!(farm.wait_for_build(diamond).await, Stored::Succeeded);
    let machines = farm
        .count("SELECT count(DISTINCT machine) FROM step_attempts WHERE status = 'succeeded'")
        .await;
    assert_eq!(
        machines, 2,
        "both builders built, so inputs crossed through the farm's cache and a daemon"
    );
    let expected = [
        ("sandboxProbe", Stored::Succeeded),
        ("broken", Stored::Failed),
        ("noOutput", Stored::Failed),
    ];
    for (attribute, status) in expected {
        assert_eq!(
            farm.wait_for_build(builds[attribute].0).await,
            status,
            "{attribute}"
        );
    }
    let attempts = farm
        .count("SELECT count(*) FROM step_attempts WHERE status = 'failed'")
        .await;
    assert_eq!(attempts, 2, "a derivation's own failure is tried once");

    let probe = served_log(&farm, &builds["sandboxProbe"].1).await;
    assert!(probe.contains("hostname: localhost"), "{probe}");
    assert!(
        probe.contains("no /usr in sight"),
        "the build saw the host's file system: {probe}"
    );
    let no_output = served_log(&farm, &builds["noOutput"].1).await;
    assert!(
        no_output.contains("this build forgets to create its output"),
        "{no_output}"
    );
    let scratch = farm.dir.path().join("builder-state/b1/nix-scratch");
    assert!(
        Path::new(&scratch).is_dir(),
        "serve processes keep their scratch under the builder's state directory"
    );
}
