//! The HTTP/JSON API on a real farm, over real TLS: every build operation as JSON with an API
//! token (made with `drover token create`) or a client certificate; Watch and `FollowLog` as
//! server-sent events with heartbeats, read by a real HTTP client; and the refusals: no
//! credentials, an unknown or revoked token (which also ends its open event stream), a role
//! that may not, a full farm (`503` with `Retry-After`), a precondition (`422`), bad JSON.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::sync::Arc;

use base64::Engine as _;
use common::nix_farm::{closure_request, shell_step, start_with_one_nix_builder};
use common::{BuilderSpec, DEADLINE, Farm, Stored};
use drover_tls::Role;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use test_support::fake_derivations::{Factory, FakeDrv, Spec};

/// An HTTP client of the farm's web listener, trusting the farm's CA, with a client certificate
/// of `identity` if given.
fn client(farm: &Farm, identity: Option<(Role, &str)>) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    let ca = farm.dir.path().join(drover_tls::CA_CERT_FILE);
    for certificate in CertificateDer::pem_file_iter(&ca).unwrap() {
        roots.add(certificate.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some((role, name)) => {
            let (certificate, key) = farm.issue(role, name);
            let chain = CertificateDer::pem_file_iter(&certificate)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(&key).unwrap())
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .build()
        .unwrap()
}

/// The URL of `path` on the farm's web listener.
fn url(farm: &Farm, path: &str) -> String {
    format!("https://localhost:{}{path}", farm.web_address().port())
}

/// A token made with `drover token create` (an admin's certificate).
async fn token(farm: &Farm, name: &str, role: &str) -> String {
    let output = farm
        .run_drover_as(
            Role::Admin,
            &["token", "create", "--name", name, "--role", role],
        )
        .await;
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// Sends `request` with `token`; returns the status and the JSON body.
async fn send(request: reqwest::RequestBuilder, token: Option<&str>) -> (u16, Value) {
    let request = match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// The JSON of a Submit of `drvs` (the last one the top), their texts in base64.
fn submit_body(drvs: &[&FakeDrv]) -> Value {
    let derivations: Vec<Value> = drvs
        .iter()
        .map(|drv| {
            json!({
                "path": drv.path.to_absolute(),
                "text": base64::engine::general_purpose::STANDARD.encode(&drv.text),
            })
        })
        .collect();
    json!({
        "derivations": derivations,
        "top_drv_path": drvs.last().unwrap().path.to_absolute(),
        "metadata": { "branch": "main" },
    })
}

/// An int64 of a JSON answer (the protobuf JSON mapping writes them as strings).
fn int64(value: &Value) -> i64 {
    value.as_str().unwrap().parse().unwrap()
}

/// Reads server-sent events from `response` until `done` holds for those read so far, as
/// (name, data) pairs; fails past the deadline.
async fn events_until(
    response: &mut reqwest::Response,
    done: impl Fn(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    let mut text = String::new();
    let mut events = Vec::new();
    let read = tokio::time::timeout(DEADLINE, async {
        while !done(&events) {
            let Some(chunk) = response.chunk().await.unwrap() else {
                break;
            };
            text.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = text.find("\n\n") {
                let block: String = text.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        value.trim().clone_into(&mut name);
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push(value.strip_prefix(' ').unwrap_or(value).to_owned());
                    }
                }
                events.push((name, data.join("\n")));
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the events to arrive; so far {events:?}");
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_as_json_with_a_token_or_a_certificate() {
    let mut farm = Farm::new().await;
    farm.serve_web();
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec::new("b1"));
    let alice = token(&farm, "alice", "client").await;
    let http = client(&farm, None);
    let mut factory = Factory::default();
    let base = factory.make(&Spec::new("base"));
    let top = factory.make(&Spec::new("top").inputs(&[&base]));

    let (status, submitted) = send(
        http.post(url(&farm, "/api/v1/builds"))
            .json(&submit_body(&[&base, &top])),
        Some(&alice),
    )
    .await;
    assert_eq!(status, 200, "{submitted}");
    let build = int64(&submitted["build_id"]);
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    let (status, state) = send(
        http.get(url(&farm, &format!("/api/v1/builds/{build}"))),
        Some(&alice),
    )
    .await;
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["status"], "BUILD_STATUS_SUCCEEDED", "{state}");
    assert_eq!(state["metadata"]["branch"], "main", "{state}");

    let listed = "/api/v1/builds?status=succeeded&metadata.branch=main&page_size=10";
    let (status, page) = send(http.get(url(&farm, listed)), Some(&alice)).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(int64(&page["builds"][0]["build_id"]), build, "{page}");
    let log = format!("/api/v1/logs?drv_path={}", top.path.to_absolute());
    let (status, log) = send(http.get(url(&farm, &log)), Some(&alice)).await;
    assert_eq!((status, &log["complete"]), (200, &json!(true)), "{log}");

    // A build no builder can take yet: cancelled, then queued again.
    let waits = factory.make(&Spec::new("waits").system("aarch64-linux"));
    let (_, submitted) = send(
        http.post(url(&farm, "/api/v1/builds"))
            .json(&submit_body(&[&waits])),
        Some(&alice),
    )
    .await;
    let waiting = int64(&submitted["build_id"]);
    let cancel = url(&farm, &format!("/api/v1/builds/{waiting}/cancel"));
    let (status, cancelled) = send(http.post(cancel), Some(&alice)).await;
    assert_eq!(
        (status, &cancelled["already_ended"]),
        (200, &json!(false)),
        "{cancelled}"
    );
    assert_eq!(farm.wait_for_build(waiting).await, Stored::Cancelled);
    let restart = url(
        &farm,
        &format!("/api/v1/builds/{waiting}/restart?dependents=true"),
    );
    let (status, restarted) = send(http.post(restart), Some(&alice)).await;
    assert_eq!(status, 200, "{restarted}");
    farm.wait_for_count(
        "the cancelled build to be queued again",
        &format!("SELECT count(*) FROM builds WHERE id = {waiting} AND status = 'queued'"),
        1,
    )
    .await;

    // Staged derivations, then a job set of them, with a client certificate instead of a token.
    let carol = client(&farm, Some((Role::Client, "carol")));
    let job = factory.make(&Spec::new("job"));
    let staged = json!({ "derivations": [{
        "path": job.path.to_absolute(),
        "text": base64::engine::general_purpose::STANDARD.encode(&job.text),
    }] });
    let (status, stored) = send(
        carol.post(url(&farm, "/api/v1/derivations")).json(&staged),
        None,
    )
    .await;
    assert_eq!((status, &stored["stored"]), (200, &json!(1)), "{stored}");
    let jobs = json!({ "jobs": [{ "name": "job", "drv_path": job.path.to_absolute() }] });
    let (status, set) = send(carol.post(url(&farm, "/api/v1/job-sets")).json(&jobs), None).await;
    assert_eq!(status, 200, "{set}");
    let job_build = int64(&set["builds"][0]["build_id"]);
    assert_eq!(farm.wait_for_build(job_build).await, Stored::Succeeded);

    let (status, document) = send(http.get(url(&farm, "/api/v1/openapi.json")), Some(&alice)).await;
    assert_eq!(status, 200);
    assert!(document["paths"]["/api/v1/builds/{id}/events"]["get"].is_object());
}

/// The router's own refusals (a build id that is not a number, no such path) come in the
/// API's JSON form too.
async fn router_refusals_are_json(farm: &Farm, http: &reqwest::Client, token: &str) {
    for (path, status) in [("/api/v1/builds/seven", 400), ("/api/v1/nothing", 404)] {
        let (answer, refused) = send(http.get(url(farm, path)), Some(token)).await;
        assert_eq!(answer, status, "{path}: {refused}");
        assert!(refused["error"]["message"].is_string(), "{path}: {refused}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_may_not_is_refused_with_the_reason() {
    let mut farm = Farm::new().await;
    farm.serve_web();
    farm.refuse_unknown_systems = true;
    farm.start_runner().await;
    // One slot, busy for the whole test: what is submitted next waits in the queue.
    farm.start_builder(&BuilderSpec {
        max_jobs: 1,
        build_ms: 600_000,
        ..BuilderSpec::new("b1")
    });
    let alice = token(&farm, "alice", "client").await;
    let http = client(&farm, None);
    let builds = url(&farm, "/api/v1/builds");

    let (status, refused) = send(http.get(&builds), None).await;
    assert_eq!(
        (status, &refused["error"]["code"]),
        (401, &json!("UNAUTHENTICATED"))
    );
    let (status, _) = send(http.get(&builds), Some("drover_not-a-token")).await;
    assert_eq!(status, 401);
    let builder = client(&farm, Some((Role::Builder, "b9")));
    let (status, refused) = send(builder.get(&builds), None).await;
    assert_eq!(
        (status, &refused["error"]["code"]),
        (403, &json!("PERMISSION_DENIED"))
    );
    router_refusals_are_json(&farm, &http, &alice).await;
    let (status, refused) = send(http.post(&builds).body("{not json"), Some(&alice)).await;
    assert_eq!(
        (status, &refused["error"]["code"]),
        (400, &json!("INVALID_ARGUMENT"))
    );

    let mut factory = Factory::default();
    let exotic = factory.make(&Spec::new("exotic").system("riscv64-linux"));
    let (status, refused) = send(
        http.post(&builds).json(&submit_body(&[&exotic])),
        Some(&alice),
    )
    .await;
    assert_eq!(
        (status, &refused["error"]["code"]),
        (422, &json!("FAILED_PRECONDITION"))
    );

    for name in ["busy", "queued"] {
        let drv = factory.make(&Spec::new(name));
        let (status, _) = send(http.post(&builds).json(&submit_body(&[&drv])), Some(&alice)).await;
        assert_eq!(status, 200);
    }
    farm.wait_for_count(
        "one step to run and one to wait",
        "SELECT count(*) FROM steps WHERE status = 'runnable'",
        1,
    )
    .await;
    let cap = farm
        .run_drover_as(Role::Admin, &["admin", "cap", "1"])
        .await;
    assert!(cap.status.success(), "{cap:?}");
    let one = factory.make(&Spec::new("one"));
    let response = http
        .post(&builds)
        .bearer_auth(&alice)
        .json(&submit_body(&[&one]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "{retry}");

    // A revoked token is refused at once, and the event stream it opened ends.
    let cap = farm
        .run_drover_as(Role::Admin, &["admin", "cap", "1000"])
        .await;
    assert!(cap.status.success(), "{cap:?}");
    let (_, submitted) = send(http.post(&builds).json(&submit_body(&[&one])), Some(&alice)).await;
    let build = int64(&submitted["build_id"]);
    let mut events = http
        .get(url(&farm, &format!("/api/v1/builds/{build}/events")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    events_until(&mut events, |events| !events.is_empty()).await;
    let revoked = farm
        .run_drover_as(Role::Admin, &["token", "revoke", "alice"])
        .await;
    assert!(revoked.status.success(), "{revoked:?}");
    let (status, _) = send(http.get(&builds), Some(&alice)).await;
    assert_eq!(status, 401);
    let ended = events_until(&mut events, |events| {
        events.iter().any(|(name, _)| name == "error")
    })
    .await;
    let (_, error) = ended.iter().find(|(name, _)| name == "error").unwrap();
    assert!(error.contains("UNAUTHENTICATED"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_and_a_live_log_as_server_sent_events_with_heartbeats() {
    let mut farm = Farm::new().await;
    farm.serve_web();
    farm.heartbeat_ms = 200;
    let (_, submitter) = start_with_one_nix_builder(&mut farm).await;
    let alice = token(&farm, "alice", "client").await;
    let http = client(&farm, None);
    let top = shell_step(
        &submitter,
        "talker",
        r#"/bin/sleep 1; for i in 1 2 3; do echo \"line $i\" >&2; /bin/sleep 0.3; done; echo done > $out"#,
    );
    let request = serde_json::to_value(closure_request(&submitter, &top)).unwrap();
    let (status, answer) = send(
        http.post(url(&farm, "/api/v1/builds")).json(&request),
        Some(&alice),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let build = int64(&answer["build_id"]);

    let mut watch = http
        .get(url(&farm, &format!("/api/v1/builds/{build}/events")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(watch.headers()["content-type"], "text/event-stream");
    farm.wait_for_count(
        "the step to run",
        "SELECT count(*) FROM step_attempts WHERE status = 'running'",
        1,
    )
    .await;
    let mut log = http
        .get(url(
            &farm,
            &format!("/api/v1/logs/events?drv_path={}", top.to_absolute()),
        ))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    let logged = events_until(&mut log, |events| {
        let text: String = events
            .iter()
            .filter(|(name, _)| name == "log")
            .map(|(_, data)| data.as_str())
            .collect();
        text.contains("line 3")
    })
    .await;
    assert!(
        logged.iter().any(|(name, _)| name == "heartbeat"),
        "{logged:?}"
    );
    let watched = events_until(&mut watch, |events| {
        events
            .iter()
            .any(|(name, data)| name == "build" && data.contains("BUILD_STATUS_SUCCEEDED"))
    })
    .await;
    assert_eq!(watched[0].0, "state", "{watched:?}");
    let state: Value = serde_json::from_str(&watched[0].1).unwrap();
    assert_eq!(int64(&state["build_id"]), build);
    assert!(
        watched.iter().any(|(name, _)| name == "heartbeat"),
        "{watched:?}"
    );
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_status_page_is_read_without_a_credential_and_nothing_else_is() {
    let mut farm = Farm::new().await;
    farm.serve_web();
    farm.runner_settings
        .push(("web.public_status", true.into()));
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec::new("b1"));
    farm.wait_for_count(
        "b1 to join",
        "SELECT count(*) FROM machines WHERE connected",
        1,
    )
    .await;
    let http = client(&farm, None);

    let (status, overview) = send(http.get(url(&farm, "/api/v1/status")), None).await;
    assert_eq!(status, 200, "{overview}");
    assert_eq!(overview["builders"][0]["name"], "b1", "{overview}");
    let page = http.get(url(&farm, "/")).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let policy = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(policy.starts_with("default-src 'self'"), "{policy}");

    let mut factory = Factory::default();
    let drv = factory.make(&Spec::new("anonymous"));
    let (status, refused) = send(
        http.post(url(&farm, "/api/v1/builds"))
            .json(&submit_body(&[&drv])),
        None,
    )
    .await;
    assert_eq!(
        (status, &refused["error"]["code"]),
        (401, &json!("UNAUTHENTICATED"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_over_http_are_an_admins() {
    let mut farm = Farm::new().await;
    farm.serve_web();
    farm.start_runner().await;
    let alice = token(&farm, "alice", "client").await;
    let http = client(&farm, None);
    let builds = url(&farm, "/api/v1/builds");

    // alice's client token may not make one; an admin's token may.
    let tokens = url(&farm, "/api/v1/tokens");
    let wanted = json!({ "name": "mallory", "role": "client" });
    let (status, refused) = send(http.post(&tokens).json(&wanted), Some(&alice)).await;
    assert_eq!(
        (status, &refused["error"]["code"]),
        (403, &json!("PERMISSION_DENIED"))
    );
    let root = token(&farm, "root", "admin").await;
    let (status, made) = send(http.post(&tokens).json(&wanted), Some(&root)).await;
    assert_eq!(status, 200, "{made}");
    let mallory = made["token"].as_str().unwrap().to_owned();
    assert_eq!(send(http.get(&builds), Some(&mallory)).await.0, 200);
    let (status, listed) = send(http.get(&tokens), Some(&root)).await;
    assert_eq!(status, 200, "{listed}");
    assert!(listed.to_string().contains("mallory"), "{listed}");
    assert!(
        !listed.to_string().contains(&mallory),
        "a secret is never listed"
    );

    // The status page's cookie never authorises a change.
    let cookie = format!("drover_token={alice}");
    let refused = http
        .post(url(&farm, "/api/v1/builds/1/cancel"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401);
}
