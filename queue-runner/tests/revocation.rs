//! Revoking certificates with `drover admin revoke` against a real farm: the runner lists the
//! certificates it has seen; a revoked builder's tunnel is closed mid-step, its step finishes
//! on another builder without waiting for it, its uploads are refused even on a connection
//! opened before, and it cannot rejoin; a revoked client is refused at once.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use common::{AttemptStatus, BuilderSpec, DEADLINE, Farm, Stored};
use drover_proto::v1::LogChunk;
use drover_proto::v1::build_service_client::BuildServiceClient;
use drover_proto::v1::builder_service_client::BuilderServiceClient;
use drover_proto::v1::{ListRequest, WatchRequest};
use drover_tls::Role;
use test_support::fake_derivations::{Factory, Spec};
use test_support::wait::poll_until;

/// The serial of the certificate the runner saw for `identity` (`role/name`), once it has
/// recorded it.
async fn serial_of(farm: &Farm, identity: &str) -> String {
    poll_until(DEADLINE, "the runner to record the certificate", || async {
        let output = farm
            .run_drover_as(Role::Admin, &["admin", "certs", "--json"])
            .await;
        assert!(output.status.success(), "{output:?}");
        let certificates: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
        certificates.into_iter().find_map(|certificate| {
            let named = format!("{}/{}", certificate["role"], certificate["name"]).replace('"', "");
            (named == identity).then(|| certificate["serial"].as_str().unwrap().to_owned())
        })
    })
    .await
}

/// Revokes `serial` as an admin; returns what the command said.
async fn revoke(farm: &Farm, serial: &str) -> String {
    let output = farm
        .run_drover_as(Role::Admin, &["admin", "revoke", serial])
        .await;
    let said = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "{said}");
    said
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_builder_is_cut_off_mid_step_and_its_step_finishes_elsewhere_at_once() {
    let mut farm = Farm::new().await;
    // Were the revoked builder waited for like one whose connection broke, the step would sit
    // out this grace, far past the test's deadline.
    farm.rejoin_grace_secs = 3600;
    farm.start_runner().await;
    let revoked = farm.start_builder(&BuilderSpec {
        max_jobs: 1,
        ..BuilderSpec::new("b1")
    });
    farm.wait_for_count(
        "b1 to join",
        "SELECT count(*) FROM machines WHERE connected",
        1,
    )
    .await;
    let mut factory = Factory::default();
    let slow = factory.make(&Spec::new("slow").env("DROVER_NOOP_SLEEP_MS", "4000"));
    let build = farm.submit(&[&slow]).await;
    farm.wait_for_count(
        "the step to run on b1",
        "SELECT count(*) FROM step_attempts WHERE status = 'running' AND machine = 'b1'",
        1,
    )
    .await;
    // A connection b1's certificate opened before the revocation.
    let mut open_before = BuilderServiceClient::new(farm.channel(Role::Builder, "b1").await);
    farm.start_builder(&BuilderSpec::new("b2"));

    let serial = serial_of(&farm, "builder/b1").await;
    let said = revoke(&farm, &serial).await;
    assert_eq!(
        said.trim(),
        format!("certificate {serial} of builder/b1 revoked")
    );

    let status = farm.wait_builder_exit(revoked, DEADLINE).await;
    assert!(!status.success(), "a revoked builder gives up: {status}");
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    let attempts = farm.attempts().await;
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert!(
        attempts
            .iter()
            .any(|(machine, status, _)| machine == "b1" && *status != AttemptStatus::Succeeded),
        "{attempts:?}"
    );
    assert!(
        attempts
            .iter()
            .any(|(machine, status, _)| machine == "b2" && *status == AttemptStatus::Succeeded),
        "{attempts:?}"
    );

    let refused = open_before
        .upload_log(tokio_stream::iter([LogChunk {
            attempt_id: uuid::Uuid::nil().to_string(),
            data: b"late".to_vec(),
        }]))
        .await
        .expect_err("an upload with a revoked certificate");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(
        refused.message().contains("has been revoked"),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_is_refused_on_new_and_open_connections() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let listed = farm.run_drover(&["list"]).await;
    assert!(listed.status.success(), "{listed:?}");
    let mut open_before = BuildServiceClient::new(farm.channel(Role::Client, "tester").await);
    open_before.list(ListRequest::default()).await.unwrap();
    // A Watch opened before the revocation, of a build no builder takes.
    let queued = farm
        .submit(&[&Factory::default().make(&Spec::new("queued"))])
        .await;
    let mut watching = open_before
        .watch(WatchRequest { build_id: queued })
        .await
        .unwrap()
        .into_inner();
    watching
        .message()
        .await
        .unwrap()
        .expect("the build's state");

    let serial = serial_of(&farm, "client/tester").await;
    // As openssl prints serials: a prefix, capitals, and colons as other tools add.
    let spelled = serial
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|pair| String::from_utf8_lossy(pair).into_owned())
        .collect::<Vec<_>>()
        .join(":");
    let spelled = format!("serial={spelled}");
    revoke(&farm, &spelled).await;

    let refused = farm.run_drover(&["list"]).await;
    assert_eq!(refused.status.code(), Some(64), "{refused:?}");
    let stderr = String::from_utf8(refused.stderr).unwrap();
    assert!(stderr.contains("has been revoked"), "{stderr}");
    let status = open_before
        .list(ListRequest::default())
        .await
        .expect_err("a call on a connection opened before the revocation");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    // Changes that were on their way may come first; then the stream ends refused.
    let cut = tokio::time::timeout(DEADLINE, async {
        loop {
            match watching.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the Watch ended without a refusal"),
                Err(status) => break status,
            }
        }
    })
    .await
    .expect("the open Watch to end");
    assert_eq!(cut.code(), tonic::Code::Unauthenticated, "{cut:?}");
    let (_, metrics) = common::nix_farm::http_request(farm.metrics_address(), "/metrics").await;
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("drover_rpc_refusals_total{code=\"unauthenticated\"}"),
        "{metrics}"
    );

    let output = farm.run_drover_as(Role::Admin, &["admin", "certs"]).await;
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(
        table.contains(&format!("{serial}  client/tester")),
        "{table}"
    );
    assert!(table.contains("REVOKED"), "{table}");
    let bad = farm
        .run_drover_as(Role::Admin, &["admin", "revoke", "not-a-serial"])
        .await;
    assert_eq!(bad.status.code(), Some(65), "{bad:?}");
}
