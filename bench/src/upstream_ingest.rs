//! Ingest of a closure an upstream cache has entirely (issue 19): `--steps` fake derivations
//! whose every output has a signed narinfo upstream, submitted as one build to a runner process
//! on a durable PostgreSQL. Nothing is dispatched; the build succeeds at ingest. The same
//! narinfos are served twice in one invocation: from a `file://` directory (the baseline: no
//! network) and from a local `https://` server (HTTP/2, a certificate of a CA made here), so the
//! ratio is the price of asking over HTTPS. It prints the wall time from Submit to success, the
//! lookups per second, and how many files the HTTPS server was asked for.
//!
//! Usage (build the binaries first: `cargo build --release --bins`):
//! `cargo run --release -p drover-bench --bin upstream-ingest -- [--steps 10000]`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_precision_loss,
    clippy::print_stdout,
    reason = "a benchmark harness: any failure aborts the measurement"
)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use drover_bench::farm::Farm;
use drover_tls::{CertificateAuthority, Identity, Role};
use nix_primitives::narinfo::NarInfo;
use nix_primitives::{Hash, SecretKey};
use test_support::HttpsDirectory;
use test_support::TestPostgres;
use test_support::fake_derivations::{Factory, FakeDrv};

#[derive(Parser)]
struct Args {
    /// Steps in the closure (a layered DAG of fake derivations).
    #[arg(long, default_value_t = 10_000)]
    steps: usize,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("upstream");
    fs_err::create_dir_all(&cache).unwrap();
    let drvs = Factory::default().layered_dag("up", args.steps, 100, 7);
    let key = SecretKey::generate("upstream-bench-1").unwrap();
    write_narinfos(&cache, &drvs, &key);
    fs_err::write(
        cache.join("nix-cache-info"),
        "StoreDir: /nix/store\nPriority: 40\n",
    )
    .unwrap();

    let ca = CertificateAuthority::generate("upstream bench CA").unwrap();
    ca.write(dir.path()).unwrap();
    let server_certificate = ca
        .issue(
            &Identity::new(Role::Runner, "upstream").unwrap(),
            &["localhost".to_owned()],
            &[],
        )
        .unwrap();
    let server = HttpsDirectory::serve(
        &cache,
        &server_certificate.cert_pem,
        &server_certificate.key_pem,
    )
    .await;
    let public_key = key.public_key().to_string();
    let ca_file = dir.path().join("ca.pem").display().to_string();

    let cluster = TestPostgres::start_durable();
    println!(
        "upstream-ingest: {} steps, every output upstream; durable PostgreSQL",
        args.steps
    );
    let file = ingest(
        &cluster,
        &drvs,
        &format!("file://{}", cache.display()),
        &public_key,
        &ca_file,
    )
    .await;
    report("file:// (baseline)", args.steps, file);
    let https = ingest(
        &cluster,
        &drvs,
        &format!("https://localhost:{}", server.port()),
        &public_key,
        &ca_file,
    )
    .await;
    report("https:// (HTTP/2)", args.steps, https);
    println!(
        "https/file wall time: {:.2}x; files the HTTPS server was asked for: {} (steps {}, plus nix-cache-info)",
        https.as_secs_f64() / file.as_secs_f64(),
        server.requests(),
        args.steps
    );
}

/// Submits the closure to a fresh runner with `upstream`; returns the time to its success.
async fn ingest(
    cluster: &TestPostgres,
    drvs: &[FakeDrv],
    upstream: &str,
    public_key: &str,
    ca_file: &str,
) -> Duration {
    let farm = Farm::start_with(cluster, |config| {
        config.push(
            "cache.upstreams",
            &[
                ("url", upstream),
                ("public_key", public_key),
                ("ca_certificate", ca_file),
            ],
        )
    })
    .await;
    // The runner is up before the clock starts.
    drop(farm.client().await);
    let started = Instant::now();
    let build = farm.submit(drvs).await;
    farm.wait_for_success(build).await;
    let took = started.elapsed();
    let dispatched: i64 = farm
        .db
        .query_one("SELECT count(*) FROM step_attempts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dispatched, 0, "a step the upstream has was dispatched");
    farm.stop();
    took
}

fn report(label: &str, steps: usize, took: Duration) {
    println!(
        "  {label:<20} {:>8.2} s from Submit to success, {:>8.0} lookups/s",
        took.as_secs_f64(),
        steps as f64 / took.as_secs_f64()
    );
}

/// A signed narinfo for every output of `drvs` (fake NAR hashes and sizes: nobody fetches the
/// NARs; ingest only asks whether the paths are there).
fn write_narinfos(cache: &Path, drvs: &[FakeDrv], key: &SecretKey) {
    for drv in drvs {
        let mut info = NarInfo {
            store_path: drv.out.clone(),
            url: format!("nar/{}.nar", drv.out.hash_part()),
            compression: "none".to_owned(),
            file_hash: None,
            file_size: None,
            nar_hash: Hash::sha256(drv.out.to_absolute().as_bytes()),
            nar_size: 120,
            references: BTreeSet::new(),
            deriver: Some(drv.path.clone()),
            system: None,
            signatures: Vec::new(),
            content_address: None,
        };
        info.sign(key);
        fs_err::write(
            cache.join(format!("{}.narinfo", drv.out.hash_part())),
            info.to_string(),
        )
        .unwrap();
    }
}
