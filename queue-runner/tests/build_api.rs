//! The build API users live in, over real mTLS gRPC against a real runner and PostgreSQL:
//! idempotent submissions, listing with filters and pages, why each step waits, and admission
//! control that refuses with a retry-after hint and writes nothing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::collections::BTreeMap;

use common::{BuilderSpec, DEADLINE, Farm, Stored};
use drover_proto::v1::build_service_client::BuildServiceClient;
use drover_proto::v1::watch_event::Event as WatchKind;
use drover_proto::v1::{
    BuildPhase, BuildStatus, GetRequest, GetResponse, ListRequest, StepState, StepStatus,
    WatchEvent, WatchRequest,
};
use drover_tls::Role;
use test_support::fake_derivations::{Factory, Spec};
use tonic_types::StatusExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_submit_with_the_same_key_returns_the_same_build() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let drv = Factory::default().make(&Spec::new("idempotent"));
    let mut request = Farm::request(&[&drv]);
    request.idempotency_key = "ci-run-17".to_owned();
    let mut client = farm.client().await;
    let first = client.submit(request.clone()).await.unwrap().into_inner();
    let again = client.submit(request.clone()).await.unwrap().into_inner();
    assert!(!first.existing);
    assert!(again.existing, "the retry queued nothing");
    assert_eq!(first.build_id, again.build_id);
    assert_eq!(farm.count("SELECT count(*) FROM builds").await, 1);

    let mut other = BuildServiceClient::new(farm.channel(Role::Client, "someone-else").await);
    let theirs = other.submit(request.clone()).await.unwrap().into_inner();
    assert_ne!(theirs.build_id, first.build_id, "keys are per submitter");
    request.idempotency_key = "ci-run-18".to_owned();
    let next = client.submit(request).await.unwrap().into_inner();
    assert_ne!(next.build_id, first.build_id);
    assert_eq!(farm.count("SELECT count(*) FROM builds").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_by_status_metadata_and_time_and_pages_newest_first() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let mut ids = Vec::new();
    for (index, job) in ["a", "b", "a", "b", "a"].iter().enumerate() {
        let drv = factory.make(&Spec::new(&format!("listed-{index}")));
        let mut request = Farm::request(&[&drv]);
        request.metadata = [("job".to_owned(), (*job).to_owned())].into();
        ids.push(farm.submit_request(request).await);
    }
    let mut client = farm.client().await;
    client
        .cancel(drover_proto::v1::CancelRequest { build_id: ids[4] })
        .await
        .unwrap();
    assert_eq!(farm.wait_for_build(ids[4]).await, Stored::Cancelled);
    let list = |request: ListRequest| {
        let mut client = client.clone();
        async move { client.list(request).await.unwrap().into_inner() }
    };
    let listed = |response: &drover_proto::v1::ListResponse| -> Vec<i64> {
        response.builds.iter().map(|build| build.build_id).collect()
    };

    let queued = list(ListRequest {
        statuses: vec![BuildStatus::Queued.into()],
        ..ListRequest::default()
    })
    .await;
    assert_eq!(listed(&queued), [ids[3], ids[2], ids[1], ids[0]]);
    assert!(
        queued
            .builds
            .iter()
            .all(|build| build.phase() == BuildPhase::Accepted)
    );
    let job_a = list(ListRequest {
        metadata: [("job".to_owned(), "a".to_owned())].into(),
        ..ListRequest::default()
    })
    .await;
    assert_eq!(listed(&job_a), [ids[4], ids[2], ids[0]]);
    assert_eq!(job_a.builds[0].phase(), BuildPhase::Cancelled);
    assert!(job_a.builds[0].finished_at_ms > 0);
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let later = list(ListRequest {
        submitted_after_ms: now_ms + 60_000,
        ..ListRequest::default()
    })
    .await;
    assert!(later.builds.is_empty());
    let earlier = list(ListRequest {
        submitted_before_ms: now_ms + 60_000,
        submitted_after_ms: now_ms - 600_000,
        ..ListRequest::default()
    })
    .await;
    assert_eq!(earlier.builds.len(), 5);

    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(ListRequest {
            page_size: 2,
            page_token: token.clone(),
            ..ListRequest::default()
        })
        .await;
        pages.push(listed(&page));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        pages,
        [vec![ids[4], ids[3]], vec![ids[2], ids[1]], vec![ids[0]]]
    );
    let refused = client
        .list(ListRequest {
            page_token: "not a token".to_owned(),
            ..ListRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
}

/// The steps of a build by derivation name, once ingest has planned it.
async fn planned_steps(farm: &Farm, build: i64) -> BTreeMap<String, StepState> {
    test_support::poll_until(DEADLINE, "the build to be planned", || async {
        let response = farm
            .client()
            .await
            .get(GetRequest { build_id: build })
            .await
            .unwrap()
            .into_inner();
        (!response.steps.is_empty()).then(|| {
            response
                .steps
                .into_iter()
                .map(|step| {
                    let name = step
                        .drv_path
                        .rsplit_once('-')
                        .map(|(_, name)| name.trim_end_matches(".drv").to_owned())
                        .unwrap_or_default();
                    (name, step)
                })
                .collect()
        })
    })
    .await
}

/// The steps of a build once its step `name` is runnable: ingest links a build's steps as
/// waiting, and the scheduler makes them runnable a moment later.
async fn runnable(farm: &Farm, build: i64, name: &str) -> BTreeMap<String, StepState> {
    test_support::poll_until(DEADLINE, "the step to be runnable", || async {
        let steps = planned_steps(farm, build).await;
        (steps[name].step_status() == StepStatus::Runnable).then_some(steps)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_says_why_each_unfinished_step_waits() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let base = factory.make(&Spec::new("base"));
    let top = factory.make(&Spec::new("top").inputs(&[&base]));
    let chain = farm.submit(&[&base, &top]).await;
    let steps = runnable(&farm, chain, "base").await;
    assert_eq!(
        steps["top"].waiting_reason,
        "waiting for its inputs to be built"
    );
    assert_eq!(
        steps["base"].waiting_reason,
        "no connected builder offers system x86_64-linux (no builder ever has)"
    );

    farm.start_builder(&BuilderSpec {
        max_jobs: 1,
        build_ms: 60_000,
        ..BuilderSpec::new("busy")
    });
    farm.wait_for_count(
        "the base step to run",
        "SELECT count(*) FROM step_attempts WHERE status = 'running'",
        1,
    )
    .await;
    let steps = planned_steps(&farm, chain).await;
    assert_eq!(steps["base"].step_status(), StepStatus::Running);
    assert_eq!(
        steps["base"].status, "running",
        "the label stays for older clients"
    );
    assert_eq!(steps["base"].builder, "busy");
    assert_eq!(steps["base"].waiting_reason, "");

    let other = factory.make(&Spec::new("other"));
    let queued_behind = farm.submit(&[&other]).await;
    let steps = runnable(&farm, queued_behind, "other").await;
    assert_eq!(
        steps["other"].waiting_reason,
        "every builder that can run it is busy"
    );
    farm.db()
        .await
        .execute(
            "UPDATE steps SET visible_after = '2099-01-01T00:00:00Z' WHERE drv_path = $1",
            &[&other.path.to_absolute()],
        )
        .await
        .unwrap();
    let steps = planned_steps(&farm, queued_behind).await;
    assert_eq!(
        steps["other"].waiting_reason,
        "held back until 2099-01-01T00:00:00Z (postponed)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_farm_refuses_with_a_retry_after_hint_writes_nothing_and_admits_once_drained() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    farm.db()
        .await
        .execute("UPDATE farm_limits SET max_queued_steps = 2", &[])
        .await
        .unwrap();
    let mut factory = Factory::default();
    let base = factory.make(&Spec::new("fills-base"));
    let top = factory.make(&Spec::new("fills-top").inputs(&[&base]));
    let first = farm.submit(&[&base, &top]).await;
    farm.wait_for_count(
        "the first build's steps to queue",
        "SELECT count(*) FROM steps WHERE status IN ('waiting', 'runnable')",
        2,
    )
    .await;
    let extra = factory.make(&Spec::new("one-too-many"));
    let before = (
        farm.count("SELECT count(*) FROM builds").await,
        farm.count("SELECT count(*) FROM derivations").await,
    );
    let refused = farm
        .client()
        .await
        .submit(Farm::request(&[&extra]))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("farm_limits.max_queued_steps"),
        "{}",
        refused.message()
    );
    let retry = refused
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("a retry-after hint in the status details");
    assert!(retry.as_secs() > 0);
    assert_eq!(
        (
            farm.count("SELECT count(*) FROM builds").await,
            farm.count("SELECT count(*) FROM derivations").await,
        ),
        before,
        "the refused submission left rows behind"
    );

    farm.start_builder(&BuilderSpec::new("drains"));
    assert_eq!(farm.wait_for_build(first).await, Stored::Succeeded);
    let admitted = farm.submit(&[&extra]).await;
    assert_eq!(farm.wait_for_build(admitted).await, Stored::Succeeded);
}

/// A Watch stream of `build`.
async fn watch(farm: &Farm, build: i64) -> tonic::Streaming<WatchEvent> {
    farm.client()
        .await
        .watch(WatchRequest { build_id: build })
        .await
        .unwrap()
        .into_inner()
}

/// Reads a Watch stream to its end, with a deadline.
async fn watch_to_the_end(farm: &Farm, build: i64) -> Vec<WatchEvent> {
    let mut stream = watch(farm, build).await;
    let mut events = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while let Some(event) = stream.message().await.unwrap() {
            events.push(event);
        }
    })
    .await
    .expect("the stream to end with the build");
    events
}

/// A chain of five steps of 400 ms each, named `eta-LINK-VERSION` (`eta-a-1`): each version
/// is another derivation of the same five packages (`eta-a` to `eta-e`).
fn timed_chain(
    factory: &mut Factory,
    version: u32,
) -> Vec<test_support::fake_derivations::FakeDrv> {
    let mut chain: Vec<test_support::fake_derivations::FakeDrv> = Vec::new();
    for link in ["a", "b", "c", "d", "e"] {
        let name = format!("eta-{link}-{version}");
        let inputs: Vec<&_> = chain.last().into_iter().collect();
        let spec = Spec::new(&name)
            .inputs(&inputs)
            .env("DROVER_NOOP_SLEEP_MS", "400");
        let made = factory.make(&spec);
        chain.push(made);
    }
    chain
}

fn unix_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    i64::try_from(since.as_millis()).unwrap()
}

async fn get(farm: &Farm, build: i64) -> GetResponse {
    farm.client()
        .await
        .get(GetRequest { build_id: build })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_watch_predict_a_builds_end_from_the_durations_learned_before() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec::new("b1"));
    let mut factory = Factory::default();
    let warm_up = timed_chain(&mut factory, 1);
    let first = farm.submit(&warm_up.iter().collect::<Vec<_>>()).await;
    assert_eq!(farm.wait_for_build(first).await, Stored::Succeeded);
    assert_eq!(
        farm.count(
            "SELECT count(*) FROM step_durations WHERE package LIKE 'eta-%' AND mean_ms >= 400"
        )
        .await,
        5,
        "each package's duration is learned"
    );

    let chain = timed_chain(&mut factory, 2);
    let submitted = unix_ms();
    let build = farm.submit(&chain.iter().collect::<Vec<_>>()).await;
    let mut stream = watch(&farm, build).await;
    let predicted = tokio::time::timeout(DEADLINE, async {
        loop {
            let event = stream.message().await.unwrap().expect("a predicted end");
            match event.event {
                Some(WatchKind::State(state)) if state.estimated_end_ms > 0 => {
                    return state.estimated_end_ms;
                }
                Some(WatchKind::Estimate(estimate)) => return estimate.estimated_end_ms,
                _ => {}
            }
        }
    })
    .await
    .expect("a planned build's state, or an estimate after it, carries its predicted end");
    let remaining = predicted - submitted;
    assert!(
        (400..10_000).contains(&remaining),
        "five steps of 400 ms, some of them done: predicted {remaining} ms after submitting"
    );
    let during = get(&farm, build).await;
    if during.phase() == BuildPhase::Running {
        assert!(
            during.estimated_end_ms > 0,
            "Get predicts it too: {during:?}"
        );
    }
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    assert_eq!(
        get(&farm, build).await.estimated_end_ms,
        0,
        "an ended build has no predicted end"
    );
}

/// How far along a step is, to check that a Watch never shows one going back.
fn progress(status: StepStatus) -> u8 {
    match status {
        StepStatus::Waiting => 0,
        StepStatus::Runnable => 1,
        StepStatus::Running => 2,
        _ => 3,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_opened_while_a_build_runs_never_see_a_step_go_back_or_a_change_twice() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec {
        build_ms: 20,
        ..BuilderSpec::new("b1")
    });
    let mut factory = Factory::default();
    let mut chain = vec![factory.make(&Spec::new("link-0"))];
    for index in 1..30 {
        let link = factory.make(&Spec::new(&format!("link-{index}")).inputs(&[&chain[index - 1]]));
        chain.push(link);
    }
    let build = farm.submit(&chain.iter().collect::<Vec<_>>()).await;

    // Streams opened one after another for as long as the build runs, each read to its end
    // afterwards (what the runner sends waits in the connection meanwhile).
    let mut readers = Vec::new();
    loop {
        let mut stream = watch(&farm, build).await;
        let first = stream.message().await.unwrap().unwrap();
        let Some(WatchKind::State(state)) = first.event else {
            panic!("{first:?}");
        };
        if state.phase() == BuildPhase::Succeeded {
            break;
        }
        readers.push(async move {
            let mut steps: BTreeMap<i64, StepStatus> = state
                .steps
                .iter()
                .map(|step| (step.step_id, step.step_status()))
                .collect();
            let mut went_back = Vec::new();
            while let Some(event) = stream.message().await.unwrap() {
                match event.event {
                    Some(WatchKind::Step(step)) => {
                        let before = steps.insert(step.step_id, step.step_status());
                        if before
                            .is_some_and(|before| progress(before) >= progress(step.step_status()))
                        {
                            went_back.push(format!("{before:?} -> {:?}", step.step_status()));
                        }
                    }
                    Some(WatchKind::State(state)) => {
                        steps = state
                            .steps
                            .iter()
                            .map(|step| (step.step_id, step.step_status()))
                            .collect();
                    }
                    _ => {}
                }
            }
            (went_back, steps)
        });
        assert!(readers.len() < 1000, "the build never ended");
    }
    assert!(readers.len() > 5, "too few streams opened while it ran");
    for reader in readers {
        let (went_back, steps) = tokio::time::timeout(DEADLINE, reader)
            .await
            .expect("every stream ends with the build");
        assert!(went_back.is_empty(), "{went_back:?}");
        assert!(
            steps
                .values()
                .all(|status| *status == StepStatus::Succeeded),
            "{steps:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sends_the_state_then_every_transition_in_order_heartbeats_and_the_state_again() {
    let mut farm = Farm::new().await;
    farm.heartbeat_ms = 200;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let base = factory.make(&Spec::new("watched-base"));
    let top = factory.make(&Spec::new("watched-top").inputs(&[&base]));
    let build = farm.submit(&[&base, &top]).await;

    let mut stream = watch(&farm, build).await;
    let first = stream.message().await.unwrap().unwrap();
    assert!(
        matches!(first.event, Some(WatchKind::State(_))),
        "{first:?}"
    );
    // Nothing happens without a builder: heartbeats keep the stream alive.
    let heartbeat = tokio::time::timeout(DEADLINE, async {
        loop {
            let event = stream.message().await.unwrap().unwrap();
            if matches!(event.event, Some(WatchKind::Heartbeat(_))) {
                return event;
            }
        }
    })
    .await;
    assert!(heartbeat.is_ok(), "no heartbeat while idle");

    farm.start_builder(&BuilderSpec {
        build_ms: 100,
        ..BuilderSpec::new("b1")
    });
    let mut seen = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while let Some(event) = stream.message().await.unwrap() {
            match event.event {
                Some(WatchKind::Step(step)) => {
                    let name = if step.drv_path.ends_with("-watched-base.drv") {
                        "base"
                    } else {
                        "top"
                    };
                    assert_eq!(step.status_label(), step.status, "label and type agree");
                    seen.push(format!("{name} {:?}", step.step_status()));
                }
                Some(WatchKind::Build(update)) => {
                    seen.push(format!("build {:?}", update.status()));
                }
                Some(WatchKind::State(state)) => {
                    seen.push(format!("state {:?}", state.status()));
                }
                Some(WatchKind::Heartbeat(_) | WatchKind::Estimate(_)) | None => {}
            }
        }
    })
    .await
    .expect("the stream to end with the build");
    // The build was planned before the builder came (a state, then nothing new), or just after.
    seen.retain(|line| line != "state Queued");
    assert_eq!(
        seen,
        [
            "base Running",
            "build Running",
            "base Succeeded",
            "top Runnable",
            "top Running",
            "top Succeeded",
            "build Succeeded",
        ],
        "every transition once, in order"
    );

    let again = watch_to_the_end(&farm, build).await;
    assert_eq!(again.len(), 1, "{again:?}");
    let Some(WatchKind::State(state)) = &again[0].event else {
        panic!("{again:?}");
    };
    assert_eq!(state.phase(), BuildPhase::Succeeded);
    assert_eq!(state.steps.len(), 2);
    assert!(
        state
            .steps
            .iter()
            .all(|step| step.step_status() == StepStatus::Succeeded)
    );

    let missing = farm
        .client()
        .await
        .watch(WatchRequest { build_id: 9999 })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_no_builder_ever_offered_is_refused_at_submit_naming_it() {
    let mut farm = Farm::new().await;
    farm.refuse_unknown_systems = true;
    farm.start_runner().await;
    let mut factory = Factory::default();
    // Before any builder joined, the farm cannot judge: it accepts.
    let early = factory.make(&Spec::new("before-any-builder").system("riscv64-linux"));
    farm.submit(&[&early]).await;
    farm.start_builder(&BuilderSpec::new("x86"));
    farm.wait_for_count("the builder to join", "SELECT count(*) FROM machines", 1)
        .await;
    let before = farm.count("SELECT count(*) FROM builds").await;
    let exotic = factory.make(&Spec::new("exotic").system("riscv64-linux"));
    let refused = farm
        .client()
        .await
        .submit(Farm::request(&[&exotic]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("needs system riscv64-linux")
            && refused
                .message()
                .contains("no builder of this farm has ever offered"),
        "{}",
        refused.message()
    );
    assert_eq!(farm.count("SELECT count(*) FROM builds").await, before);
    let fine = factory.make(&Spec::new("ordinary"));
    let build = farm.submit(&[&fine]).await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
}
