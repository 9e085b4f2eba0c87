//! Nix builders in a [`Farm`]: starting one with a private store, submitting the closure of an
//! instantiated fixture, and reading the log the farm's cache serves.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use drover_proto::v1::{DerivationText, SubmitRequest};
use nix_primitives::StorePath;

use super::nix::{ChrootStore, NIX_CONFIG, examples, private_store_command};
use super::{BuilderSpec, Farm};

/// Runs `command`, asserting it succeeds; returns its stdout.
pub fn succeed(command: &mut Command) -> Vec<u8> {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// Starts the runner and one Nix builder `b1` (two jobs, a private store); returns the
/// builder's store directory and a submitter's chroot store.
pub async fn start_with_one_nix_builder(farm: &mut Farm) -> (PathBuf, ChrootStore) {
    farm.start_runner().await;
    let store = farm.dir.path().join("stores/b1");
    farm.start_builder(&BuilderSpec {
        max_jobs: 2,
        nix_store: Some(&store),
        ..BuilderSpec::new("b1")
    });
    (store, ChrootStore::new(farm.dir.path().join("submitter")))
}

/// Submits the derivation closure of `top` as read from the submitter's store.
pub async fn submit_closure(farm: &Farm, submitter: &ChrootStore, top: &StorePath) -> i64 {
    farm.submit_request(closure_request(submitter, top)).await
}

/// Instantiates a derivation named `name` that runs the shell `script` (a Nix string's
/// contents: quote `"` as `\"`), in the submitter's store.
pub fn shell_step(submitter: &ChrootStore, name: &str, script: &str) -> StorePath {
    let expression = submitter.expression(&format!(
        r#"{{ step = derivation {{
            name = "{name}";
            system = "x86_64-linux";
            builder = "/bin/sh";
            args = [ "-c" "{script}" ];
        }}; }}"#
    ));
    submitter.instantiate(&expression, "step")
}

/// The Submit request for the derivation closure of `top` in the submitter's store.
pub fn closure_request(submitter: &ChrootStore, top: &StorePath) -> SubmitRequest {
    let closure = submitter.closure(top);
    SubmitRequest {
        sources: submitter.sources(&closure),
        derivations: closure
            .into_iter()
            .map(|(path, (text, _))| DerivationText {
                path: path.to_absolute(),
                text,
            })
            .collect(),
        top_drv_path: top.to_absolute(),
        ..SubmitRequest::default()
    }
}

/// Instantiates `attribute` of the test fixtures and submits its closure; returns the build id
/// and the `.drv` file's base name.
pub async fn submit_fixture(
    farm: &Farm,
    submitter: &ChrootStore,
    attribute: &str,
) -> (i64, String) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/builds.nix");
    let top = submitter.instantiate(&fixtures, attribute);
    let build = submit_closure(farm, submitter, &top).await;
    (build, top.base_name().to_owned())
}

/// GETs a path from the runner's cache listener; returns the status line and the body.
pub async fn http_get(port: u16, path: &str) -> (String, Vec<u8>) {
    let (head, body) = http_request(SocketAddr::from(([127, 0, 0, 1], port)), path).await;
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body)
}

/// GETs a path over HTTP/1.0 from `address`; returns the head (status line and headers) and the
/// body.
pub async fn http_request(address: SocketAddr, path: &str) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    (head, response[split + 4..].to_vec())
}

/// The log the cache serves for a derivation (by base name), as `nix log` fetches it.
pub async fn served_log(farm: &Farm, drv: &str) -> String {
    let (status, log) = http_get(farm.cache_port, &format!("/log/{drv}")).await;
    assert!(status.contains("200"), "{status}");
    String::from_utf8_lossy(&log).into_owned()
}

/// Builds `base` of the diamond example in a separate store, copies it to a signed `file://`
/// cache, and adds that cache to the farm's upstreams; returns the cache directory and its
/// public key.
pub fn upstream_with_diamond_base(farm: &mut Farm) -> (PathBuf, String) {
    let diamond = examples().join("diamond.nix");
    let upstream_store = farm.dir.path().join("stores/upstream");
    let upstream_cache = farm.dir.path().join("upstream-cache");
    let keys = farm.dir.path().join("upstream-keys");
    fs_err::create_dir_all(&keys).unwrap();
    let in_upstream_store = |args: &[&str]| {
        let mut command = private_store_command(&upstream_store);
        command
            .args(args)
            .env("NIX_CONFIG", NIX_CONFIG)
            .env("HOME", farm.dir.path());
        String::from_utf8(succeed(&mut command)).unwrap()
    };
    let secret = keys.join("upstream.sec");
    let public = keys.join("upstream.pub");
    in_upstream_store(&[
        "nix-store",
        "--generate-binary-cache-key",
        "upstream-1",
        secret.to_str().unwrap(),
        public.to_str().unwrap(),
    ]);
    let base_drv = in_upstream_store(&[
        "nix-instantiate",
        diamond.to_str().unwrap(),
        "--attr",
        "base",
    ]);
    let base_out = in_upstream_store(&["nix-store", "--realise", base_drv.trim()]);
    let copy_to = format!(
        "file://{}?compression=none&secret-key={}",
        upstream_cache.display(),
        secret.display()
    );
    in_upstream_store(&["nix", "copy", "--to", &copy_to, base_out.trim()]);
    let public_key = fs_err::read_to_string(&public).unwrap().trim().to_owned();
    farm.upstreams.push((
        format!("file://{}", upstream_cache.display()),
        public_key.clone(),
    ));
    (upstream_cache, public_key)
}
