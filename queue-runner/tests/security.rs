//! What the runner refuses, each with its typed status and with nothing written: submissions that
//! do not verify, certificates from elsewhere or of the wrong role, a builder reporting on an
//! attempt it was not given, and a builder speaking another API version.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::collections::BTreeMap;

use common::{AttemptStatus, DEADLINE, Farm, Stored, attempt_status};
use drover_proto::API_VERSION;
use drover_proto::v1::build_service_client::BuildServiceClient;
use drover_proto::v1::builder_message::Message as Outbound;
use drover_proto::v1::builder_service_client::BuilderServiceClient;
use drover_proto::v1::runner_message::Message as Inbound;
use drover_proto::v1::{
    BuilderMessage, BuiltOutput, DerivationText, Join, LogChunk, NarChunk, RunnerMessage,
    StepOutcome, StepResult, SubmitRequest, UploadNarResponse,
};
use drover_tls::{CertificateAuthority, Identity, Role};
use nix_primitives::derivation::derivation_path;
use nix_primitives::{Derivation, DerivationOutput, HashAlgorithm, IngestionMethod, StorePath};
use test_support::fake_derivations::{Factory, Spec};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Streaming};

fn request(texts: &[(&StorePath, &[u8])], top: &StorePath) -> SubmitRequest {
    SubmitRequest {
        derivations: texts
            .iter()
            .map(|(path, text)| DerivationText {
                path: path.to_absolute(),
                text: text.to_vec(),
            })
            .collect(),
        top_drv_path: top.to_absolute(),
        priority: 0,
        metadata: BTreeMap::new().into_iter().collect(),
        ..SubmitRequest::default()
    }
}

/// Re-serialises a modified derivation under the path its new text hashes to.
fn rehash(name: &str, derivation: &Derivation) -> (StorePath, Vec<u8>) {
    let text = derivation.to_aterm();
    (derivation_path(name, &text, derivation).unwrap(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_that_do_not_verify_are_refused_and_write_nothing() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let base = factory.make(&Spec::new("base"));
    let other = factory.make(&Spec::new("other"));
    let top = factory.make(&Spec::new("top").inputs(&[&base]));

    let mut wrong_output = Derivation::parse(&other.text).unwrap();
    let stolen = DerivationOutput::InputAddressed {
        path: base.out.clone(),
    };
    wrong_output.outputs.insert("out".to_owned(), stolen);
    wrong_output
        .env
        .insert(b"out".to_vec(), base.out.to_absolute().into_bytes());
    let (wrong_output_path, wrong_output_text) = rehash("other", &wrong_output);

    let mut floating = Derivation::parse(&other.text).unwrap();
    floating.outputs.insert(
        "out".to_owned(),
        DerivationOutput::Floating {
            method: IngestionMethod::Recursive,
            algorithm: HashAlgorithm::Sha256,
        },
    );
    let (floating_path, floating_text) = rehash("other", &floating);

    let cases: Vec<(&str, SubmitRequest, Code)> = vec![
        (
            "text under another derivation's path",
            request(&[(&base.path, &other.text)], &base.path),
            Code::InvalidArgument,
        ),
        (
            "output path that its inputs do not give",
            request(
                &[(&wrong_output_path, &wrong_output_text)],
                &wrong_output_path,
            ),
            Code::InvalidArgument,
        ),
        (
            "malformed ATerm",
            request(&[(&base.path, b"Derive([(\"out\"")], &base.path),
            Code::InvalidArgument,
        ),
        (
            "input derivation not provided",
            request(&[(&top.path, &top.text)], &top.path),
            Code::InvalidArgument,
        ),
        (
            "top-level path that is not a derivation",
            request(&[], &base.out),
            Code::InvalidArgument,
        ),
        (
            "floating content-addressed derivation",
            request(&[(&floating_path, &floating_text)], &floating_path),
            Code::FailedPrecondition,
        ),
    ];
    let mut client = farm.client().await;
    for (case, submission, code) in cases {
        let status = client.submit(submission).await.expect_err(case);
        assert_eq!(status.code(), code, "{case}: {status:?}");
    }
    assert_eq!(farm.count("SELECT count(*) FROM derivations").await, 0);
    assert_eq!(farm.count("SELECT count(*) FROM builds").await, 0);

    let accepted = farm.submit(&[&base, &top]).await;
    assert!(
        accepted > 0,
        "a valid submission is accepted after the refusals"
    );
}

/// A channel presenting `identity` (if any) from `authority` (if any).
async fn channel_with(
    farm: &Farm,
    client: Option<(&CertificateAuthority, &Identity)>,
) -> Option<Channel> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            fs_err::read(farm.dir.path().join("ca.pem")).unwrap(),
        ))
        .domain_name("localhost");
    if let Some((authority, identity)) = client {
        let issued = authority.issue(identity, &[], &[]).unwrap();
        tls = tls.identity(tonic::transport::Identity::from_pem(
            issued.cert_pem,
            issued.key_pem,
        ));
    }
    Endpoint::from_shared(format!("https://localhost:{}", farm.grpc_port))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_certificates_of_the_farm_ca_with_the_right_role_get_in() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let drv = factory.make(&Spec::new("guarded"));
    let submission = || request(&[(&drv.path, &drv.text)], &drv.path);

    let stranger_ca = CertificateAuthority::generate("someone else's CA").unwrap();
    let client = Identity::new(Role::Client, "intruder").unwrap();
    for (case, channel) in [
        (
            "a certificate from another CA",
            channel_with(&farm, Some((&stranger_ca, &client))).await,
        ),
        ("no client certificate", channel_with(&farm, None).await),
    ] {
        if let Some(channel) = channel {
            let status = BuildServiceClient::new(channel)
                .submit(submission())
                .await
                .expect_err(case);
            assert_ne!(status.code(), Code::Ok, "{case}");
        }
    }
    assert_eq!(farm.count("SELECT count(*) FROM builds").await, 0);

    let builder_on_build_service = BuildServiceClient::new(farm.channel(Role::Builder, "b1").await)
        .submit(submission())
        .await
        .expect_err("a builder certificate may not submit");
    assert_eq!(builder_on_build_service.code(), Code::PermissionDenied);

    let (outbox, receiver) = mpsc::channel(4);
    outbox.send(join(API_VERSION)).await.unwrap();
    let client_on_builder_service =
        BuilderServiceClient::new(farm.channel(Role::Client, "c1").await)
            .open_tunnel(ReceiverStream::new(receiver))
            .await
            .expect_err("a client certificate may not open a tunnel");
    assert_eq!(client_on_builder_service.code(), Code::PermissionDenied);
    assert_eq!(farm.count("SELECT count(*) FROM machines").await, 0);
    assert_eq!(farm.count("SELECT count(*) FROM builds").await, 0);
}

fn join(api_version: &str) -> BuilderMessage {
    BuilderMessage {
        message: Some(Outbound::Join(Join {
            api_version: api_version.to_owned(),
            systems: vec!["x86_64-linux".to_owned()],
            max_jobs: 1,
            speed_factor: 1.0,
            ..Join::default()
        })),
    }
}

/// A builder driven by the test over the real protocol.
struct ScriptedBuilder {
    outbox: mpsc::Sender<BuilderMessage>,
    inbound: Streaming<RunnerMessage>,
    client: BuilderServiceClient<Channel>,
}

impl ScriptedBuilder {
    async fn join(farm: &Farm, name: &str) -> Self {
        let mut client = farm.builder_client(name).await;
        let (outbox, receiver) = mpsc::channel(16);
        outbox.send(join(API_VERSION)).await.unwrap();
        let mut inbound = client
            .open_tunnel(ReceiverStream::new(receiver))
            .await
            .unwrap()
            .into_inner();
        let joined = inbound.message().await.unwrap().unwrap();
        assert!(matches!(joined.message, Some(Inbound::Joined(_))));
        Self {
            outbox,
            inbound,
            client,
        }
    }

    async fn send(&self, message: Outbound) {
        self.outbox
            .send(BuilderMessage {
                message: Some(message),
            })
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_cannot_report_on_or_upload_for_another_builders_attempt() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let drv = factory.make(&Spec::new("contested"));
    let mut honest = ScriptedBuilder::join(&farm, "honest").await;
    let build = farm.submit(&[&drv]).await;
    let Some(Inbound::Build(assignment)) = honest.inbound.message().await.unwrap().unwrap().message
    else {
        panic!("the honest builder got no Build");
    };

    let mut thief = ScriptedBuilder::join(&farm, "thief").await;
    let forged_log = thief
        .client
        .upload_log(tokio_stream::iter([LogChunk {
            attempt_id: assignment.attempt_id.clone(),
            data: b"forged".to_vec(),
        }]))
        .await
        .expect_err("a log for someone else's attempt");
    assert_eq!(forged_log.code(), Code::PermissionDenied);
    let outputs = vec![BuiltOutput {
        name: "out".to_owned(),
        path: drv.out.to_absolute(),
        nar_hash: "sha256:forged".to_owned(),
        nar_size: 1,
        ..BuiltOutput::default()
    }];
    thief
        .send(Outbound::StepResult(StepResult {
            attempt_id: assignment.attempt_id.clone(),
            outcome: StepOutcome::Succeeded.into(),
            message: String::new(),
            outputs: outputs.clone(),
            ..StepResult::default()
        }))
        .await;
    let ended = thief
        .inbound
        .message()
        .await
        .expect_err("the thief's tunnel must end");
    assert_eq!(ended.code(), Code::PermissionDenied);
    let (status, nar_hash): (AttemptStatus, Option<String>) = {
        let row = farm
            .db()
            .await
            .query_one(
                "SELECT a.status::text, (SELECT nar_hash FROM step_outputs LIMIT 1)
                 FROM step_attempts a",
                &[],
            )
            .await
            .unwrap();
        (attempt_status(row.get(0)), row.get(1))
    };
    assert_eq!((status, nar_hash), (AttemptStatus::Running, None));

    let uploaded = upload(
        &mut honest.client,
        &assignment.attempt_id,
        &drv.out,
        &[],
        nar_of(b"honest"),
    )
    .await
    .unwrap();
    let honest_outputs = vec![BuiltOutput {
        nar_hash: uploaded.nar_hash.clone(),
        ..outputs[0].clone()
    }];
    honest
        .send(Outbound::StepResult(StepResult {
            attempt_id: assignment.attempt_id,
            outcome: StepOutcome::Succeeded.into(),
            message: String::new(),
            outputs: honest_outputs,
            ..StepResult::default()
        }))
        .await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    let stored: String = farm
        .db()
        .await
        .query_one("SELECT nar_hash FROM step_outputs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, uploaded.nar_hash);
    let response = farm.get(build).await;
    assert_eq!(response.outputs["out"], drv.out.to_absolute());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_speaking_another_api_version_is_refused() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let (outbox, receiver) = mpsc::channel(4);
    outbox.send(join("v0-0000000000000000")).await.unwrap();
    let status = farm
        .builder_client("old")
        .await
        .open_tunnel(ReceiverStream::new(receiver))
        .await
        .expect_err("an old builder must be refused");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(farm.count("SELECT count(*) FROM machines").await, 0);
}

/// The NAR of a single file with `contents`.
fn nar_of(contents: &[u8]) -> Vec<u8> {
    let mut nar = Vec::new();
    nix_primitives::nar::write_file_nar(contents, false, &mut nar).unwrap();
    nar
}

/// Uploads `nar` as `path` for an attempt, in small chunks.
async fn upload(
    client: &mut BuilderServiceClient<Channel>,
    attempt_id: &str,
    path: &StorePath,
    references: &[&StorePath],
    nar: Vec<u8>,
) -> Result<UploadNarResponse, tonic::Status> {
    let mut chunks = vec![NarChunk {
        attempt_id: attempt_id.to_owned(),
        store_path: path.to_absolute(),
        references: references.iter().map(|r| r.to_absolute()).collect(),
        data: Vec::new(),
    }];
    chunks.extend(nar.chunks(7).map(|data| NarChunk {
        attempt_id: attempt_id.to_owned(),
        data: data.to_vec(),
        ..NarChunk::default()
    }));
    client
        .upload_nar(tokio_stream::iter(chunks))
        .await
        .map(tonic::Response::into_inner)
}

async fn next_build(builder: &mut ScriptedBuilder) -> drover_proto::v1::Build {
    loop {
        if let Some(Inbound::Build(build)) =
            builder.inbound.message().await.unwrap().unwrap().message
        {
            return build;
        }
    }
}

fn cache_entries(farm: &Farm) -> Vec<String> {
    let mut entries: Vec<String> = ["", "nar", "tmp"]
        .iter()
        .flat_map(|dir| fs_err::read_dir(farm.dir.path().join("cache").join(dir)).unwrap())
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".narinfo") || name.contains('.'))
        .collect();
    entries.sort();
    entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(clippy::too_many_lines, reason = "one scenario, refusal by refusal")]
async fn uploads_beyond_what_an_attempt_may_publish_are_refused_and_publish_nothing() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let input = factory.make(&Spec::new("upload-input"));
    let step = factory.make(&Spec::new("upload-step").inputs(&[&input]));
    let stranger = factory.make(&Spec::new("stranger"));
    let mut builder = ScriptedBuilder::join(&farm, "uploader").await;
    let build = farm.submit(&[&input, &step]).await;

    let first = next_build(&mut builder).await;
    assert_eq!(first.drv_path, input.path.to_absolute());
    let before = cache_entries(&farm);
    let refusals: Vec<(&str, Result<UploadNarResponse, tonic::Status>, Code)> = vec![
        (
            "a path that is not an output",
            upload(
                &mut builder.client,
                &first.attempt_id,
                &stranger.out,
                &[],
                nar_of(b"x"),
            )
            .await,
            Code::PermissionDenied,
        ),
        (
            "a reference outside the input closure",
            upload(
                &mut builder.client,
                &first.attempt_id,
                &input.out,
                &[&stranger.out],
                nar_of(b"x"),
            )
            .await,
            Code::PermissionDenied,
        ),
        (
            "a NAR cut in the middle",
            upload(
                &mut builder.client,
                &first.attempt_id,
                &input.out,
                &[],
                nar_of(b"complete contents")[..40].to_vec(),
            )
            .await,
            Code::InvalidArgument,
        ),
        (
            "a malformed NAR",
            upload(
                &mut builder.client,
                &first.attempt_id,
                &input.out,
                &[],
                b"not a nar at all, not at all".to_vec(),
            )
            .await,
            Code::InvalidArgument,
        ),
    ];
    for (case, result, code) in refusals {
        let status = result.expect_err(case);
        assert_eq!(status.code(), code, "{case}: {status:?}");
    }
    assert_eq!(
        cache_entries(&farm),
        before,
        "a refused upload left something in the cache"
    );

    let good = upload(
        &mut builder.client,
        &first.attempt_id,
        &input.out,
        &[],
        nar_of(b"input"),
    )
    .await
    .unwrap();
    assert!(!good.already_published);
    let again = upload(
        &mut builder.client,
        &first.attempt_id,
        &input.out,
        &[],
        nar_of(b"input"),
    )
    .await
    .unwrap();
    assert!(again.already_published);
    builder
        .send(Outbound::StepResult(success(
            &first.attempt_id,
            &input.out,
            "sha256:0000".to_owned(),
        )))
        .await;
    let retried = next_build(&mut builder).await;
    assert_eq!(
        retried.drv_path,
        input.path.to_absolute(),
        "a wrong NAR hash is requeued"
    );
    let status: String = farm
        .db()
        .await
        .query_one(
            "SELECT status::text FROM step_attempts WHERE id::text = $1",
            &[&first.attempt_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        attempt_status(&status),
        AttemptStatus::InfrastructureFailure
    );
    builder
        .send(Outbound::StepResult(success(
            &retried.attempt_id,
            &input.out,
            good.nar_hash.clone(),
        )))
        .await;

    let second = next_build(&mut builder).await;
    assert_eq!(second.drv_path, step.path.to_absolute());
    let with_input_reference = upload(
        &mut builder.client,
        &second.attempt_id,
        &step.out,
        &[&input.out, &step.out],
        nar_of(b"step"),
    )
    .await;
    let with_input_reference =
        with_input_reference.expect("an input and the output itself are allowed references");
    builder
        .send(Outbound::StepResult(success(
            &second.attempt_id,
            &step.out,
            with_input_reference.nar_hash,
        )))
        .await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
}

/// How attempt `attempt` ended, and its message, once it has.
async fn ended_attempt(farm: &Farm, attempt: &str) -> (AttemptStatus, String) {
    test_support::poll_until(DEADLINE, "the attempt to end", || async {
        let row = farm
            .db()
            .await
            .query_one(
                "SELECT status::text, message FROM step_attempts WHERE id::text = $1",
                &[&attempt],
            )
            .await
            .unwrap();
        let status = attempt_status(&row.get::<_, String>(0));
        (status != AttemptStatus::Running)
            .then(|| (status, row.get::<_, Option<String>>(1).unwrap_or_default()))
    })
    .await
}

/// A success carrying its output's NAR and log inline, as a builder sends a small result.
fn inline_success(
    attempt_id: &str,
    path: &StorePath,
    references: &[&StorePath],
    nar: Vec<u8>,
) -> StepResult {
    StepResult {
        attempt_id: attempt_id.to_owned(),
        outcome: StepOutcome::Succeeded.into(),
        outputs: vec![BuiltOutput {
            name: "out".to_owned(),
            path: path.to_absolute(),
            nar_size: nar.len() as u64,
            nar,
            references: references.iter().map(|r| r.to_absolute()).collect(),
            ..BuiltOutput::default()
        }],
        log: b"an inline log\n".to_vec(),
        log_inline: true,
        ..StepResult::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_nar_is_checked_and_published_as_an_upload_of_it_would_be() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let output = factory.make(&Spec::new("inline-output"));
    let stranger = factory.make(&Spec::new("inline-stranger"));
    let mut builder = ScriptedBuilder::join(&farm, "inliner").await;
    let build = farm.submit(&[&output]).await;
    let before = cache_entries(&farm);
    let refusals: [(&str, &StorePath, &[&StorePath], Vec<u8>); 3] = [
        (
            "a path that is not an output",
            &stranger.out,
            &[],
            nar_of(b"x"),
        ),
        (
            "a reference outside the input closure",
            &output.out,
            &[&stranger.out],
            nar_of(b"x"),
        ),
        ("a malformed NAR", &output.out, &[], b"not a nar".to_vec()),
    ];
    for (case, path, references, nar) in refusals {
        let attempt = next_build(&mut builder).await.attempt_id;
        builder
            .send(Outbound::StepResult(inline_success(
                &attempt, path, references, nar,
            )))
            .await;
        let status = ended_attempt(&farm, &attempt).await;
        assert_eq!(
            status.0,
            AttemptStatus::InfrastructureFailure,
            "{case}: {status:?}"
        );
        assert_eq!(
            cache_entries(&farm),
            before,
            "{case} left something in the cache"
        );
    }

    let attempt = next_build(&mut builder).await.attempt_id;
    builder
        .send(Outbound::StepResult(inline_success(
            &attempt,
            &output.out,
            &[&output.out],
            nar_of(b"inline"),
        )))
        .await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    let published = farm
        .db()
        .await
        .query_one(
            "SELECT nar_size FROM step_outputs o JOIN steps s ON s.id = o.step_id
             WHERE s.drv_path = $1",
            &[&output.path.to_absolute()],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(published, i64::try_from(nar_of(b"inline").len()).unwrap());
    assert!(
        cache_entries(&farm).len() > before.len(),
        "the inline NAR is in the cache"
    );
    let log = farm
        .client()
        .await
        .get_log(drover_proto::v1::GetLogRequest {
            drv_path: output.path.to_absolute(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(log.log, b"an inline log\n");
    assert!(log.complete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_carrying_more_inline_than_a_result_may_is_refused_and_stores_nothing() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let output = factory.make(&Spec::new("inline-oversized"));
    let mut builder = ScriptedBuilder::join(&farm, "oversharer").await;
    farm.submit(&[&output]).await;
    let attempt = next_build(&mut builder).await.attempt_id;
    let before = cache_entries(&farm);
    let nar = nar_of(&vec![b'x'; drover_proto::MAX_INLINE_RESULT_BYTES]);
    builder
        .send(Outbound::StepResult(inline_success(
            &attempt,
            &output.out,
            &[],
            nar,
        )))
        .await;
    let (status, message) = ended_attempt(&farm, &attempt).await;
    assert_eq!(status, AttemptStatus::InfrastructureFailure);
    assert!(message.contains("bytes inline, over the"), "{message}");
    assert_eq!(cache_entries(&farm), before, "nothing was published");
    let log = farm
        .client()
        .await
        .get_log(drover_proto::v1::GetLogRequest {
            drv_path: output.path.to_absolute(),
        })
        .await;
    assert!(log.is_err(), "no log was stored: {log:?}");
}

fn success(attempt_id: &str, path: &StorePath, nar_hash: String) -> StepResult {
    StepResult {
        attempt_id: attempt_id.to_owned(),
        outcome: StepOutcome::Succeeded.into(),
        message: String::new(),
        outputs: vec![BuiltOutput {
            name: "out".to_owned(),
            path: path.to_absolute(),
            nar_hash,
            nar_size: 0,
            ..BuiltOutput::default()
        }],
        ..StepResult::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_output_with_other_contents_is_refused() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let fixed = factory.make_fixed("fixed-file", b"the expected contents");
    let mut builder = ScriptedBuilder::join(&farm, "fetcher").await;
    let fixed_build = farm.submit(&[&fixed]).await;
    let third = next_build(&mut builder).await;
    let mismatch = upload(
        &mut builder.client,
        &third.attempt_id,
        &fixed.out,
        &[],
        nar_of(b"other contents"),
    )
    .await;
    assert_eq!(
        mismatch.expect_err("fixed-output content mismatch").code(),
        Code::InvalidArgument
    );
    let matching = upload(
        &mut builder.client,
        &third.attempt_id,
        &fixed.out,
        &[],
        nar_of(b"the expected contents"),
    )
    .await
    .unwrap();
    builder
        .send(Outbound::StepResult(success(
            &third.attempt_id,
            &fixed.out,
            matching.nar_hash,
        )))
        .await;
    assert_eq!(farm.wait_for_build(fixed_build).await, Stored::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_attempt_was_taken_away_midway_publishes_nothing() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let drv = factory.make(&Spec::new("withdrawn"));
    let mut builder = ScriptedBuilder::join(&farm, "leaver").await;
    farm.submit(&[&drv]).await;
    let build = next_build(&mut builder).await;

    let nar = nar_of(b"uploaded while the attempt was lost");
    let (sender, receiver) = tokio::sync::mpsc::channel(8);
    let mut uploader = builder.client.clone();
    let upload = tokio::spawn(async move {
        uploader
            .upload_nar(ReceiverStream::new(receiver))
            .await
            .map(tonic::Response::into_inner)
    });
    let header = NarChunk {
        attempt_id: build.attempt_id.clone(),
        store_path: drv.out.to_absolute(),
        references: Vec::new(),
        data: nar[..16].to_vec(),
    };
    sender.send(header).await.unwrap();

    let before = cache_entries(&farm);
    drop(builder.outbox);
    let db = farm.db().await;
    test_support::poll_until(DEADLINE, "the attempt to be lost", || async {
        let status: String = db
            .query_one("SELECT status::text FROM step_attempts", &[])
            .await
            .unwrap()
            .get(0);
        (attempt_status(&status) == AttemptStatus::BuilderLost).then_some(())
    })
    .await;
    let rest = NarChunk {
        attempt_id: build.attempt_id.clone(),
        data: nar[16..].to_vec(),
        ..NarChunk::default()
    };
    // The runner may have refused the upload already, closing its stream: then this send fails,
    // and the refusal below is what counts.
    let _ = sender.send(rest).await;
    drop(sender);
    let status = upload
        .await
        .unwrap()
        .expect_err("a withdrawn attempt must not publish");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(cache_entries(&farm), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_with_a_certificate_from_another_ca_exits_at_once_saying_why() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    // Its certificate is in place before the farm would issue one from its own CA.
    let stranger_ca = CertificateAuthority::generate("someone else's CA").unwrap();
    stranger_ca
        .issue(&Identity::new(Role::Builder, "intruder").unwrap(), &[], &[])
        .unwrap()
        .write(farm.dir.path())
        .unwrap();
    let index = farm.start_builder(&common::BuilderSpec::new("intruder"));
    // Its reconnect budget is a minute: giving up within seconds means it did not retry.
    let status = farm
        .wait_builder_exit(index, std::time::Duration::from_secs(15))
        .await;
    assert!(!status.success(), "{status}");
    let log = fs_err::read_to_string(farm.dir.path().join("builder-intruder.log")).unwrap();
    assert!(
        log.contains("certificate"),
        "the builder does not say its certificate was refused: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nar_cut_in_the_middle_publishes_nothing_and_its_step_is_retried_after_its_backoff() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let drv = Factory::default().make(&Spec::new("cut-upload"));
    let mut builder = ScriptedBuilder::join(&farm, "cutter").await;
    let build = farm.submit(&[&drv]).await;
    let first = next_build(&mut builder).await;
    let before = cache_entries(&farm);
    let cut = upload(
        &mut builder.client,
        &first.attempt_id,
        &drv.out,
        &[],
        nar_of(b"the whole output, never sent whole")[..48].to_vec(),
    )
    .await
    .expect_err("a NAR cut in the middle");
    assert_eq!(cut.code(), Code::InvalidArgument, "{cut:?}");
    assert_eq!(
        cache_entries(&farm),
        before,
        "something of it was published"
    );
    // What the builder reports when an upload fails.
    let reported = std::time::Instant::now();
    builder
        .send(Outbound::StepResult(StepResult {
            attempt_id: first.attempt_id.clone(),
            outcome: StepOutcome::InfrastructureFailure.into(),
            message: format!("uploading {} failed: {}", drv.out, cut.message()),
            ..StepResult::default()
        }))
        .await;
    let retried = next_build(&mut builder).await;
    assert!(
        reported.elapsed() >= std::time::Duration::from_millis(100),
        "retried before the farm's 100 ms first backoff"
    );
    assert_eq!(retried.drv_path, drv.path.to_absolute());
    let good = upload(
        &mut builder.client,
        &retried.attempt_id,
        &drv.out,
        &[],
        nar_of(b"whole"),
    )
    .await
    .unwrap();
    builder
        .send(Outbound::StepResult(success(
            &retried.attempt_id,
            &drv.out,
            good.nar_hash,
        )))
        .await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    assert_eq!(
        farm.count("SELECT infrastructure_failures::bigint FROM steps")
            .await,
        1
    );
}

/// Sends and receives bytes as they are, to put malformed messages on the wire.
#[derive(Debug, Default, Clone)]
struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        Self
    }

    fn decoder(&mut self) -> Self {
        Self
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        destination: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(destination, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        source: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let remaining = prost::bytes::Buf::remaining(source);
        Ok(Some(
            prost::bytes::Buf::copy_to_bytes(source, remaining).to_vec(),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_is_invalid_argument_not_internal() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut grpc = tonic::client::Grpc::new(farm.channel(Role::Client, "c1").await);
    grpc.ready().await.unwrap();
    let refused = grpc
        .unary(
            tonic::Request::new(vec![0xff, 0xff, 0xff, 0xff]),
            tonic::codegen::http::uri::PathAndQuery::from_static("/drover.v1.BuildService/Submit"),
            RawBytes,
        )
        .await
        .expect_err("garbage is refused");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert_eq!(farm.count("SELECT count(*) FROM builds").await, 0);
}
