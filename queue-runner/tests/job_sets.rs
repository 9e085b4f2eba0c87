//! Job sets over real mTLS gRPC against a real runner and PostgreSQL: derivations staged in
//! chunks then queued as one build per job, all or none; the same steps and outcomes as separate
//! Submits; a retried or resumed submission that queues once; and a newer job set of a series
//! that cancels exactly what only the older one needed; derivations verified once, as staged.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{BuilderSpec, Farm, Stored};
use drover_proto::v1::{
    DerivationText, Job, StageDerivationsRequest, SubmitJobSetRequest, SubmitJobSetResponse,
};
use nix_primitives::derivation::derivation_path;
use nix_primitives::{Derivation, DerivationOutput};
use test_support::fake_derivations::{Factory, FakeDrv, Spec};
use tonic::Code;

fn stage_request(drvs: &[&FakeDrv]) -> StageDerivationsRequest {
    StageDerivationsRequest {
        derivations: drvs
            .iter()
            .map(|drv| DerivationText {
                path: drv.path.to_absolute(),
                text: drv.text.clone(),
            })
            .collect(),
        sources: Vec::new(),
    }
}

fn job_set_request(jobs: &[(&str, &FakeDrv)]) -> SubmitJobSetRequest {
    SubmitJobSetRequest {
        jobs: jobs
            .iter()
            .map(|(name, drv)| Job {
                name: (*name).to_owned(),
                drv_path: drv.path.to_absolute(),
            })
            .collect(),
        ..SubmitJobSetRequest::default()
    }
}

/// Stages `drvs` in chunks of two, then submits `request`.
async fn submit_job_set(
    farm: &Farm,
    drvs: &[&FakeDrv],
    request: SubmitJobSetRequest,
) -> SubmitJobSetResponse {
    let mut client = farm.client().await;
    for chunk in drvs.chunks(2) {
        client
            .stage_derivations(stage_request(chunk))
            .await
            .unwrap();
    }
    client.submit_job_set(request).await.unwrap().into_inner()
}

/// A store path's name, without its hash.
fn name(path: &str) -> String {
    path.rsplit_once('/')
        .and_then(|(_, base)| base.split_once('-'))
        .map(|(_, name)| name.to_owned())
        .unwrap()
}

/// Everything a farm ended with, by name: each build's top, status and the steps Get lists for
/// it, and every step with its status.
async fn outcome(
    farm: &Farm,
) -> (
    BTreeMap<String, (Stored, BTreeSet<String>)>,
    BTreeSet<String>,
) {
    let db = farm.db().await;
    let mut builds = BTreeMap::new();
    for row in db
        .query("SELECT id, drv_path FROM builds", &[])
        .await
        .unwrap()
    {
        let id: i64 = row.get(0);
        let status = farm.wait_for_build(id).await;
        let steps = farm
            .get(id)
            .await
            .steps
            .iter()
            .map(|step| name(&step.drv_path))
            .collect();
        builds.insert(name(row.get(1)), (status, steps));
    }
    let steps = db
        .query("SELECT drv_path, status::text FROM steps", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| format!("{} {}", name(row.get(0)), row.get::<_, String>(1)))
        .collect();
    (builds, steps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_set_builds_the_same_steps_with_the_same_outcomes_as_separate_submits() {
    let mut factory = Factory::default();
    let base = factory.make(&Spec::new("base"));
    let left = factory.make(&Spec::new("left").inputs(&[&base]));
    let right = factory.make(&Spec::new("right").inputs(&[&base]));
    let top = factory.make(&Spec::new("top").inputs(&[&left, &right]));
    let broken = factory.make(&Spec::new("broken").env("DROVER_NOOP_FAIL", "on purpose"));
    let above_broken = factory.make(&Spec::new("above-broken").inputs(&[&broken, &left]));
    let all = [&base, &left, &right, &top, &broken, &above_broken];
    let jobs = [
        ("left", &left),
        ("top", &top),
        ("above-broken", &above_broken),
        ("right", &right),
    ];

    let mut separate = Farm::new().await;
    separate.start_runner().await;
    for (_, job) in &jobs {
        let mut request = Farm::request(&all);
        request.top_drv_path = job.path.to_absolute();
        separate.submit_request(request).await;
    }

    let mut together = Farm::new().await;
    together.start_runner().await;
    let queued = submit_job_set(&together, &all, job_set_request(&jobs)).await;
    assert!(!queued.existing);
    let names: Vec<&str> = queued
        .builds
        .iter()
        .map(|build| build.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["left", "top", "above-broken", "right"],
        "in request order"
    );
    let first = together.get(queued.builds[1].build_id).await;
    assert_eq!(first.job_set_id, queued.job_set_id);
    assert_eq!(first.job_name, "top");

    for farm in [&mut separate, &mut together] {
        farm.wait_for_count(
            "every build to be planned",
            "SELECT count(*) FROM builds WHERE ingested_at IS NULL",
            0,
        )
        .await;
        farm.start_builder(&BuilderSpec::new("b1"));
    }
    let (separate_builds, separate_steps) = outcome(&separate).await;
    let (together_builds, together_steps) = outcome(&together).await;
    assert_eq!(together_builds, separate_builds);
    assert_eq!(together_steps, separate_steps);
    assert_eq!(together_builds["top.drv"].0, Stored::Succeeded);
    assert_eq!(together_builds["above-broken.drv"].0, Stored::DepFailed);
    assert_eq!(
        together.count("SELECT count(*) FROM steps").await,
        6,
        "each shared derivation is one step"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_job_set_is_planned_in_growing_slices_while_its_first_steps_run() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut builder = BuilderSpec::new("b1");
    builder.max_jobs = 8;
    farm.start_builder(&builder);
    farm.wait_for_count(
        "the builder to join",
        "SELECT count(*) FROM machines WHERE connected",
        1,
    )
    .await;
    let mut factory = Factory::default();
    let base = factory.make(&Spec::new("base"));
    let middles: Vec<FakeDrv> = (0..40)
        .map(|index| factory.make(&Spec::new(&format!("middle-{index}")).inputs(&[&base])))
        .collect();
    // Slices of 500 and the remaining 100: the builds of the second need steps the first
    // queued, and some of them built, before it was planned.
    let tops: Vec<FakeDrv> = (0..600)
        .map(|index| {
            factory.make(&Spec::new(&format!("top-{index}")).inputs(&[&middles[index % 40]]))
        })
        .collect();
    let all: Vec<&FakeDrv> = std::iter::once(&base)
        .chain(&middles)
        .chain(&tops)
        .collect();
    let mut client = farm.client().await;
    for chunk in all.chunks(500) {
        client
            .stage_derivations(stage_request(chunk))
            .await
            .unwrap();
    }
    let names: Vec<String> = (0..tops.len())
        .map(|index| format!("top-{index}"))
        .collect();
    let jobs: Vec<(&str, &FakeDrv)> = names.iter().map(String::as_str).zip(&tops).collect();
    let queued = client
        .submit_job_set(job_set_request(&jobs))
        .await
        .unwrap()
        .into_inner();
    for build in &queued.builds {
        assert_eq!(farm.wait_for_build(build.build_id).await, Stored::Succeeded);
    }
    assert_eq!(
        farm.count("SELECT count(DISTINCT ingested_at) FROM builds")
            .await,
        2,
        "planned in two transactions"
    );
    assert_eq!(
        farm.count("SELECT count(*) FROM steps").await,
        641,
        "each derivation is one step"
    );
    assert_eq!(
        farm.count("SELECT count(*) FROM step_attempts").await,
        641,
        "each step built once"
    );
    assert_eq!(
        farm.count("SELECT count(*) FROM step_inputs").await,
        640,
        "each edge recorded once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_set_with_one_bad_derivation_queues_nothing_and_names_its_job() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let base = factory.make(&Spec::new("base"));
    let good = factory.make(&Spec::new("good").inputs(&[&base]));
    let other = factory.make(&Spec::new("other"));
    let mut stolen = Derivation::parse(&other.text).unwrap();
    stolen.outputs.insert(
        "out".to_owned(),
        DerivationOutput::InputAddressed {
            path: base.out.clone(),
        },
    );
    stolen
        .env
        .insert(b"out".to_vec(), base.out.to_absolute().into_bytes());
    let stolen_text = stolen.to_aterm();
    let stolen_path = derivation_path("other", &stolen_text, &stolen).unwrap();
    let mut client = farm.client().await;

    // Staging checks each text against its path, and stores nothing of a refused chunk.
    let mut mislabelled = stage_request(&[&base]);
    mislabelled.derivations.push(DerivationText {
        path: good.path.to_absolute(),
        text: other.text.clone(),
    });
    let refused = client.stage_derivations(mislabelled).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("hashes to"), "{refused:?}");
    assert_eq!(farm.count("SELECT count(*) FROM derivations").await, 0);

    // A text whose outputs its inputs do not give hashes to its path: staged, refused at submit.
    client
        .stage_derivations(stage_request(&[&base, &good]))
        .await
        .unwrap();
    client
        .stage_derivations(StageDerivationsRequest {
            derivations: vec![DerivationText {
                path: stolen_path.to_absolute(),
                text: stolen_text,
            }],
            sources: Vec::new(),
        })
        .await
        .unwrap();
    let mut request = job_set_request(&[("good", &good)]);
    request.jobs.push(Job {
        name: "thief".to_owned(),
        drv_path: stolen_path.to_absolute(),
    });
    let refused = client.submit_job_set(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("job thief"), "{refused:?}");
    assert!(
        refused
            .message()
            .contains("output paths of a derivation are wrong"),
        "{refused:?}"
    );

    let never_staged = factory.make(&Spec::new("never-staged"));
    let missing_input = factory.make(&Spec::new("missing-input").inputs(&[&never_staged]));
    client
        .stage_derivations(stage_request(&[&missing_input]))
        .await
        .unwrap();
    let refused = client
        .submit_job_set(job_set_request(&[
            ("good", &good),
            ("missing-input", &missing_input),
        ]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("job missing-input"),
        "{refused:?}"
    );
    assert!(
        refused.message().contains(&never_staged.path.to_absolute()),
        "{refused:?}"
    );

    let mut supersede_alone = job_set_request(&[("good", &good)]);
    supersede_alone.supersede = true;
    for (what, request) in [
        ("no job", job_set_request(&[])),
        (
            "a name twice",
            job_set_request(&[("good", &good), ("good", &base)]),
        ),
        ("an empty name", job_set_request(&[("", &good)])),
        ("supersede without a series", supersede_alone),
    ] {
        let refused = client.submit_job_set(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{what}: {refused:?}");
    }
    assert_eq!(farm.count("SELECT count(*) FROM builds").await, 0);
    assert_eq!(farm.count("SELECT count(*) FROM job_sets").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_set_sent_twice_or_resumed_queues_once() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let chain = factory.chain("resumed", 5);
    let drvs: Vec<&FakeDrv> = chain.iter().collect();
    let mut client = farm.client().await;
    let first = client
        .stage_derivations(stage_request(&drvs[..3]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.stored, 3);
    // The connection was cut before the answer: the client sends everything again.
    let resumed = client
        .stage_derivations(stage_request(&drvs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resumed.stored, 2, "only what the runner lacked is new");

    let mut request = job_set_request(&[("middle", drvs[2]), ("end", drvs[4])]);
    request.idempotency_key = "eval-41".to_owned();
    let queued = client
        .submit_job_set(request.clone())
        .await
        .unwrap()
        .into_inner();
    let again = client.submit_job_set(request).await.unwrap().into_inner();
    assert!(!queued.existing);
    assert!(again.existing, "the retry queued nothing");
    assert_eq!(again.job_set_id, queued.job_set_id);
    assert_eq!(again.builds, queued.builds);
    assert_eq!(farm.count("SELECT count(*) FROM builds").await, 2);

    farm.start_builder(&BuilderSpec::new("b1"));
    for build in &queued.builds {
        assert_eq!(farm.wait_for_build(build.build_id).await, Stored::Succeeded);
    }
    assert_eq!(
        farm.count("SELECT count(*) FROM step_attempts").await,
        5,
        "each step built once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseding_job_set_cancels_exactly_what_only_older_ones_of_its_series_need() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec {
        max_jobs: 2,
        build_ms: 4000,
        ..BuilderSpec::new("b1")
    });
    let mut factory = Factory::default();
    let shared = factory.make(&Spec::new("shared"));
    let old_only = factory.make(&Spec::new("old-only"));
    let old_above = factory.make(&Spec::new("old-above").inputs(&[&shared]));
    let new_only = factory.make(&Spec::new("new-only"));
    let elsewhere = factory.make(&Spec::new("elsewhere").inputs(&[&shared]));
    let all = [&shared, &old_only, &old_above, &new_only, &elsewhere];

    let mut old = job_set_request(&[
        ("shared", &shared),
        ("only", &old_only),
        ("above", &old_above),
    ]);
    old.series = "main".to_owned();
    let old = submit_job_set(&farm, &all, old).await;
    let mut other_series = job_set_request(&[("elsewhere", &elsewhere)]);
    other_series.series = "release".to_owned();
    let other_series = submit_job_set(&farm, &[], other_series).await;
    farm.wait_for_count(
        "the two runnable steps of the old job set to run",
        "SELECT count(*) FROM step_attempts WHERE status = 'running'",
        2,
    )
    .await;

    let mut new = job_set_request(&[("shared", &shared), ("new", &new_only)]);
    new.series = "main".to_owned();
    new.supersede = true;
    let new = submit_job_set(&farm, &[], new).await;

    for build in &old.builds {
        assert_eq!(
            farm.wait_for_build(build.build_id).await,
            Stored::Cancelled,
            "{build:?}"
        );
        let reason = farm.get(build.build_id).await.failure_reason;
        assert!(
            reason.contains(&format!("job set {}, which supersedes it", new.job_set_id)),
            "{reason}"
        );
    }
    for build in new.builds.iter().chain(&other_series.builds) {
        assert_eq!(
            farm.wait_for_build(build.build_id).await,
            Stored::Succeeded,
            "{build:?}"
        );
    }
    let step = |name: &'static str| {
        let farm = &farm;
        async move {
            farm.db()
                .await
                .query_one(
                    "SELECT s.status::text,
                            array(SELECT a.status::text FROM step_attempts a
                                  WHERE a.step_id = s.id ORDER BY a.started_at)
                     FROM steps s WHERE s.drv_path LIKE '%-' || $1 || '.drv'",
                    &[&name],
                )
                .await
                .map(|row| (row.get::<_, String>(0), row.get::<_, Vec<String>>(1)))
                .unwrap()
        }
    };
    assert_eq!(
        step("old-only").await,
        ("cancelled".to_owned(), vec!["aborted".to_owned()]),
        "what only the old job set needed stopped on its builder"
    );
    assert_eq!(
        step("shared").await,
        ("succeeded".to_owned(), vec!["succeeded".to_owned()]),
        "the step both needed went on, not started again"
    );
    assert_eq!(step("old-above").await.0, "cancelled");
    assert_eq!(step("new-only").await.0, "succeeded");
    assert_eq!(
        step("elsewhere").await.0,
        "succeeded",
        "another series is left alone"
    );
}

/// The `verified_derivations` rows, by name: (output paths, input derivations).
async fn verified_rows(farm: &Farm) -> BTreeMap<String, (Vec<String>, Vec<String>)> {
    farm.db()
        .await
        .query(
            "SELECT path, output_paths, input_derivations FROM verified_derivations",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (name(row.get(0)), (row.get(1), row.get(2))))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn derivations_are_verified_once_as_they_are_staged_and_read_back_from_their_rows() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let base = factory.make(&Spec::new("base"));
    let middle = factory.make(&Spec::new("middle").inputs(&[&base]));
    let top = factory.make(&Spec::new("top").inputs(&[&middle]));
    let later = factory.make(&Spec::new("later"));
    let early = factory.make(&Spec::new("early").inputs(&[&later]));
    let mut client = farm.client().await;

    // A chunk is verified as it is staged when its inputs are staged already or in it.
    client
        .stage_derivations(stage_request(&[&middle, &base]))
        .await
        .unwrap();
    let rows = verified_rows(&farm).await;
    assert_eq!(
        rows.keys().collect::<Vec<_>>(),
        ["base.drv", "middle.drv"],
        "{rows:?}"
    );
    assert_eq!(
        rows["middle.drv"],
        (
            vec![middle.out.to_absolute()],
            vec![base.path.to_absolute()]
        )
    );
    // One whose input comes in a later chunk waits for the job set.
    client
        .stage_derivations(stage_request(&[&early]))
        .await
        .unwrap();
    client
        .stage_derivations(stage_request(&[&later, &top]))
        .await
        .unwrap();
    assert_eq!(
        verified_rows(&farm).await.keys().collect::<Vec<_>>(),
        ["base.drv", "later.drv", "middle.drv", "top.drv"]
    );
    let queued = client
        .submit_job_set(job_set_request(&[("top", &top), ("early", &early)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        verified_rows(&farm).await.len(),
        5,
        "the job set stored early's row"
    );
    farm.start_builder(&BuilderSpec::new("b1"));
    for build in &queued.builds {
        assert_eq!(farm.wait_for_build(build.build_id).await, Stored::Succeeded);
    }

    // A later job set, and a restarted runner, read the rows, not the texts: with base's text
    // spoilt, a job needing it is still queued, recovered and built, as base is built already.
    farm.terminate_builder(0);
    farm.db()
        .await
        .execute(
            "UPDATE derivations SET text = 'not a derivation' WHERE path = $1",
            &[&base.path.to_absolute()],
        )
        .await
        .unwrap();
    let again = factory.make(&Spec::new("again").inputs(&[&middle]));
    let queued = submit_job_set(&farm, &[&again], job_set_request(&[("again", &again)])).await;
    farm.stop_runner().await;
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec::new("b2"));
    assert_eq!(
        farm.wait_for_build(queued.builds[0].build_id).await,
        Stored::Succeeded
    );
}
