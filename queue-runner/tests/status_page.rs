//! The status page in headless Chromium (Debian's package, over the DevTools protocol) against a
//! farm with a real Nix build in progress: signing in with a token, the overview's builders and
//! running step, a build's page whose live log gets a line that arrived after the page loaded,
//! screenshots at desktop and phone widths (under `target/`), and no page wider than a phone's
//! 375 px; without a token, the page sends the visitor to sign in.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::path::PathBuf;

use common::Farm;
use common::nix_farm::{shell_step, start_with_one_nix_builder, submit_closure};
use drover_tls::Role;
use serde_json::json;
use test_support::browser::Browser;

/// Where screenshots go: under `target/`, kept after the test for a person to look at.
fn screenshot(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("status-page")
        .join(format!("{name}.png"))
}

/// Signs in on the login page the overview sends a visitor without a credential to.
async fn sign_in(browser: &mut Browser, site: &str, token: &str) {
    browser.open(&format!("{site}/")).await.unwrap();
    browser
        .wait_for("location.pathname === '/login'")
        .await
        .unwrap();
    let submit = format!(
        "document.querySelector('#token').value = {}; document.querySelector('form').submit(); true",
        json!(token)
    );
    browser.evaluate(&submit).await.unwrap();
    browser
        .wait_for(
            "location.pathname === '/' && document.querySelector('#connection').textContent === 'live'",
        )
        .await
        .unwrap();
}

/// Photographs the page at a desktop's and a phone's width, checking that it is no wider
/// than the phone.
async fn photograph(browser: &mut Browser, name: &str) {
    browser.resize(1280, 800).await.unwrap();
    browser
        .screenshot(&screenshot(&format!("{name}-desktop")))
        .await
        .unwrap();
    browser.resize(375, 812).await.unwrap();
    let width = browser
        .evaluate("document.documentElement.scrollWidth")
        .await
        .unwrap();
    assert!(width.as_u64().unwrap() <= 375, "{name} is {width} px wide");
    browser
        .screenshot(&screenshot(&format!("{name}-phone")))
        .await
        .unwrap();
    browser.resize(1280, 800).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_farm_live_in_a_browser() {
    let mut farm = Farm::new().await;
    farm.serve_web();
    let (_, submitter) = start_with_one_nix_builder(&mut farm).await;
    let token = farm
        .run_drover_as(Role::Admin, &["token", "create", "--name", "viewer"])
        .await;
    assert!(token.status.success(), "{token:?}");
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    let top = shell_step(
        &submitter,
        "talker",
        r#"for i in 1 2 3 4 5 6 7 8 9 10; do echo \"line $i\" >&2; /bin/sleep 1; done; echo done > $out"#,
    );
    let build = submit_closure(&farm, &submitter, &top).await;
    farm.wait_for_count(
        "the step to run",
        "SELECT count(*) FROM step_attempts WHERE status = 'running'",
        1,
    )
    .await;
    let site = format!("https://localhost:{}", farm.web_address().port());
    let mut browser = Browser::start().await.unwrap();
    sign_in(&mut browser, &site, &token).await;
    for shown in [
        "document.querySelector('#builders tbody').textContent.includes('b1')",
        "document.querySelector('#running tbody').textContent.includes('talker')",
        "document.querySelector('#builders tbody tr').children[2].textContent === '1/2'",
    ] {
        browser.wait_for(shown).await.unwrap();
    }
    photograph(&mut browser, "overview").await;

    browser
        .open(&format!("{site}/builds/{build}"))
        .await
        .unwrap();
    browser
        .wait_for("document.querySelector('#steps tbody').textContent.includes('running')")
        .await
        .unwrap();
    browser
        .wait_for("document.querySelector('#log').textContent.includes('line')")
        .await
        .unwrap();
    let at_load = browser
        .evaluate("document.querySelector('#log').textContent")
        .await
        .unwrap();
    assert!(
        !at_load.as_str().unwrap().contains("line 10"),
        "the build ended before its page loaded: {at_load}"
    );
    browser
        .wait_for("document.querySelector('#log').textContent.includes('line 10')")
        .await
        .unwrap();
    let focusable = browser
        .evaluate("document.querySelector('a.home').tabIndex >= 0")
        .await
        .unwrap();
    assert_eq!(focusable, json!(true));
    photograph(&mut browser, "build").await;
    browser
        .wait_for("document.querySelector('#summary').textContent.includes('succeeded')")
        .await
        .unwrap();
}
