//! An `https://` upstream, as the public NixOS cache and every hosted cache are: a local TLS
//! server (certificate from the test's CA) serving a binary cache stock Nix wrote (`nix copy`,
//! signed with the test's key). A step whose outputs it has is never dispatched and the builder
//! substitutes that input from it (Nix trusts the CA through `NIX_SSL_CERT_FILE`); a wrong CA,
//! an unknown key and an unreachable upstream are each logged and the build still succeeds, by
//! building.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::path::Path;

use common::nix::{ChrootStore, examples};
use common::nix_farm::{start_with_one_nix_builder, submit_closure, upstream_with_diamond_base};
use common::{BuilderSpec, Farm, Stored};
use drover_tls::{CertificateAuthority, Identity, Role};
use test_support::HttpsDirectory;

/// Serves `cache` over HTTPS with a `localhost` certificate of `farm`'s CA.
async fn serve_with_farm_ca(farm: &Farm, cache: &Path) -> HttpsDirectory {
    let (certificate, key) = farm.renew_runner_certificate(&farm.dir.path().join("upstream-tls"));
    HttpsDirectory::serve(
        cache,
        &fs_err::read_to_string(certificate).unwrap(),
        &fs_err::read_to_string(key).unwrap(),
    )
    .await
}

/// The drv paths the farm made attempts of, sorted.
async fn attempted(farm: &Farm) -> Vec<String> {
    farm.db()
        .await
        .query(
            "SELECT s.drv_path FROM step_attempts a JOIN steps s ON s.id = a.step_id ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_spares_the_steps_it_has_and_builders_substitute_from_it() {
    let mut farm = Farm::new().await;
    let (cache, key) = upstream_with_diamond_base(&mut farm);
    farm.upstreams.clear();
    let server = serve_with_farm_ca(&farm, &cache).await;
    farm.upstreams
        .push((format!("https://localhost:{}", server.port()), key));
    farm.upstream_ca = Some(farm.dir.path().join("ca.pem"));
    let (_, submitter) = start_with_one_nix_builder(&mut farm).await;
    let top = submitter.instantiate(&examples().join("diamond.nix"), "top");
    let build = submit_closure(&farm, &submitter, &top).await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    let attempted = attempted(&farm).await;
    assert_eq!(attempted.len(), 3, "left, right and top: {attempted:?}");
    assert!(
        attempted
            .iter()
            .all(|drv| !drv.ends_with("-diamond-base.drv")),
        "the step the upstream has was dispatched: {attempted:?}"
    );
}

/// A farm whose runner (a process, whose log is read) has `upstream` with `key`, trusting `ca`
/// for it, and a noop builder; submits the diamond, waits for it to succeed, and returns how
/// many steps were built and the runner's log.
async fn diamond_with_upstream(upstream: String, key: String, ca: &Path) -> (usize, String) {
    let mut farm = Farm::new().await;
    farm.upstreams.push((upstream, key));
    farm.upstream_ca = Some(ca.to_owned());
    let _runner = farm
        .spawn_runner_process(&farm.database.connection_string, "runner.log")
        .await;
    farm.start_builder(&BuilderSpec::new("b1"));
    let submitter = ChrootStore::new(farm.dir.path().join("submitter"));
    let top = submitter.instantiate(&examples().join("diamond.nix"), "top");
    let build = submit_closure(&farm, &submitter, &top).await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    let steps_built = attempted(&farm).await.len();
    let log = fs_err::read_to_string(farm.dir.path().join("runner.log")).unwrap();
    (steps_built, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_an_unknown_key_or_an_unreachable_upstream_is_logged_and_the_build_builds() {
    let mut holder = Farm::new().await;
    let (cache, key) = upstream_with_diamond_base(&mut holder);

    let stranger = CertificateAuthority::generate("someone else's CA").unwrap();
    let issued = stranger
        .issue(
            &Identity::new(Role::Runner, "upstream").unwrap(),
            &["localhost".to_owned()],
            &[],
        )
        .unwrap();
    let wrong_ca = HttpsDirectory::serve(&cache, &issued.cert_pem, &issued.key_pem).await;
    let ca = holder.dir.path().join("ca.pem");
    let (built, log) = diamond_with_upstream(
        format!("https://localhost:{}", wrong_ca.port()),
        key.clone(),
        &ca,
    )
    .await;
    assert_eq!(built, 4, "every step built");
    assert!(
        log.contains("upstream cache unreachable") && log.contains("certificate"),
        "a certificate from another CA is named: {log}"
    );

    let good = serve_with_farm_ca(&holder, &cache).await;
    let other_key = nix_primitives::SecretKey::generate("other-1")
        .unwrap()
        .public_key()
        .to_string();
    let (built, log) =
        diamond_with_upstream(format!("https://localhost:{}", good.port()), other_key, &ca).await;
    assert_eq!(built, 4, "every step built");
    assert!(log.contains("not signed by its key"), "{log}");

    let closed = test_support::free_port();
    let (built, log) = diamond_with_upstream(format!("https://localhost:{closed}"), key, &ca).await;
    assert_eq!(built, 4, "every step built");
    assert_eq!(
        log.matches("upstream cache unreachable").count(),
        1,
        "said once, not for every path: {log}"
    );
}
