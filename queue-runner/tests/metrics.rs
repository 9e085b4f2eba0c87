//! The runner's Prometheus metrics against a real farm: counters and histograms that move
//! during a build, gauges counted from the scheduler at each scrape (builders, slots, steps
//! that no builder can take and why), and the text `promtool check metrics` accepts.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};

use common::nix_farm::{http_get, http_request};
use common::{BuilderSpec, DEADLINE, Farm, Stored};
use test_support::fake_derivations::{Factory, Spec};
use test_support::wait::poll_until;

/// The value of the sample `name` (with its labels, as the text spells them), if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            (series == name).then(|| value.parse().ok()).flatten()
        })
}

async fn scrape(farm: &Farm) -> String {
    let (head, body) = http_request(farm.metrics_address(), "/metrics").await;
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    String::from_utf8(body).unwrap()
}

/// Runs promtool in `contrib/prometheus` with `args`, and `input` on its standard input; fails
/// unless it succeeds, and returns what it printed.
fn promtool(args: &[&str], input: &str) -> String {
    let directory = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/prometheus");
    let mut promtool = Command::new("promtool")
        .args(args)
        .current_dir(&directory)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is missing: install Debian's prometheus package (scripts/test does)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}: {said}");
    said
}

/// What the diamond's four steps on one builder, one cache hit and one miss, and a step no
/// builder offers the system of, left in `text`.
fn assert_moved_by_the_diamond(text: &str) {
    for (series, expected) in [
        ("drover_attempts_started_total", 4.0),
        (r#"drover_attempts_ended_total{status="succeeded"}"#, 4.0),
        (r#"drover_builds_finished_total{status="succeeded"}"#, 1.0),
        ("drover_step_duration_seconds_count", 4.0),
        ("drover_step_queue_wait_seconds_count", 4.0),
        ("drover_builds_unfinished", 1.0),
        (r#"drover_builders{state="idle"}"#, 1.0),
        (r#"drover_slots{system="x86_64-linux"}"#, 2.0),
        (r#"drover_slots_used{system="x86_64-linux"}"#, 0.0),
        (
            r#"drover_steps{system="riscv64-linux",state="runnable"}"#,
            1.0,
        ),
        (
            r#"drover_runnable_steps_without_capacity{system="riscv64-linux",reason="no_builder"}"#,
            1.0,
        ),
        (
            r#"drover_cache_requests_total{kind="other",result="hit"}"#,
            1.0,
        ),
        (
            r#"drover_cache_requests_total{kind="narinfo",result="miss"}"#,
            1.0,
        ),
    ] {
        assert_eq!(sample(text, series), Some(expected), "{series} in\n{text}");
    }
    assert_eq!(
        sample(
            text,
            r#"drover_runnable_steps_without_capacity{system="x86_64-linux",reason="no_builder"}"#
        ),
        None,
        "a reason that no longer holds is gone"
    );
    assert!(
        sample(text, "drover_step_duration_seconds_sum").is_some_and(|sum| sum >= 0.8),
        "four steps of at least 200 ms each: {text}"
    );
    assert!(
        sample(text, "drover_scheduler_commit_duration_seconds_count")
            .is_some_and(|count| count > 0.0)
    );
    assert!(
        sample(
            text,
            r#"drover_oldest_runnable_step_age_seconds{system="riscv64-linux"}"#
        )
        .is_some_and(|age| age > 0.0),
        "{text}"
    );
    assert!(
        sample(text, r#"drover_uploaded_bytes_total{kind="log"}"#).is_some_and(|bytes| bytes > 0.0),
        "{text}"
    );
    assert!(
        sample(text, "drover_cache_filesystem_size_bytes").is_some_and(|bytes| bytes > 0.0),
        "{text}"
    );
}

/// The builder's own metrics after it built the diamond's four steps: they pass promtool.
async fn assert_the_builder_counted_the_diamond(port: u16) {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (head, body) = http_request(address, "/metrics").await;
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    let text = String::from_utf8(body).unwrap();
    for (series, value) in [
        (
            r#"drover_builder_steps_finished_total{outcome="succeeded"}"#,
            4.0,
        ),
        ("drover_builder_steps_running", 0.0),
        ("drover_builder_slots", 2.0),
        ("drover_builder_connected", 1.0),
        ("drover_builder_sessions_total", 1.0),
        ("drover_builder_serve_processes_started_total", 0.0),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series}: {text}");
    }
    assert!(
        sample(&text, "drover_builder_store_free_bytes").is_some_and(|bytes| bytes > 0.0),
        "{text}"
    );
    let said = promtool(&["check", "metrics"], &text);
    assert!(said.is_empty(), "{said}\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_during_a_build_and_pass_promtool() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let idle = scrape(&farm).await;
    assert_eq!(sample(&idle, "drover_attempts_started_total"), Some(0.0));
    assert_eq!(sample(&idle, r#"drover_builders{state="idle"}"#), Some(0.0));
    assert!(
        sample(&idle, "drover_database_connections_max").is_some_and(|max| max > 0.0),
        "{idle}"
    );

    let mut factory = Factory::default();
    let bottom = factory.make(&Spec::new("bottom"));
    let left = factory.make(&Spec::new("left").inputs(&[&bottom]));
    let right = factory.make(&Spec::new("right").inputs(&[&bottom]));
    let top = factory.make(&Spec::new("top").inputs(&[&left, &right]));
    let stranded = factory.make(&Spec::new("stranded").system("riscv64-linux"));
    let diamond = farm.submit(&[&bottom, &left, &right, &top]).await;
    farm.submit(&[&stranded]).await;

    // Queued before any builder: every runnable step says why it waits.
    poll_until(DEADLINE, "the steps to wait for a builder", || async {
        let text = scrape(&farm).await;
        let no_builder = |system: &str| {
            sample(
                &text,
                &format!(
                    r#"drover_runnable_steps_without_capacity{{system="{system}",reason="no_builder"}}"#
                ),
            )
        };
        (no_builder("x86_64-linux") == Some(1.0) && no_builder("riscv64-linux") == Some(1.0))
            .then_some(())
    })
    .await;

    let builder_metrics = test_support::free_port();
    farm.start_builder(&BuilderSpec {
        build_ms: 200,
        metrics_port: Some(builder_metrics),
        ..BuilderSpec::new("b1")
    });
    assert_eq!(farm.wait_for_build(diamond).await, Stored::Succeeded);
    assert_the_builder_counted_the_diamond(builder_metrics).await;
    let (found, _) = http_get(farm.cache_port, "/nix-cache-info").await;
    assert!(found.contains("200"), "{found}");
    let unknown = format!("/{}.narinfo", "0".repeat(32));
    let (missing, _) = http_get(farm.cache_port, &unknown).await;
    assert!(missing.contains("404"), "{missing}");

    let text = scrape(&farm).await;
    assert_moved_by_the_diamond(&text);
    let said = promtool(&["check", "metrics"], &text);
    assert!(said.is_empty(), "{said}\n{text}");
}

#[test]
fn the_alert_rules_pass_promtool_and_their_tests() {
    let checked = promtool(&["check", "rules", "drover-alerts.yml"], "");
    assert!(checked.contains("SUCCESS: 6 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "drover-alerts.test.yml"], "");
    assert!(tested.contains("SUCCESS"), "{tested}");
}
