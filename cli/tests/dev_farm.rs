//! `drover dev-farm` and `drover submit` as a user runs them: the farm comes up and writes its
//! exports; `drover submit --watch` builds the example graph (exit 0, outputs printed), reports a
//! failing derivation with exit 1, and builds every derivation of a file that has several;
//! SIGTERM stops the farm leaving nothing running, and so does SIGKILL.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use test_support::{ChildGuard, poll_until};

const DROVER: &str = env!("CARGO_BIN_EXE_drover");

/// Parses the `export K=V …` line the farm writes.
fn exports(text: &str) -> BTreeMap<String, String> {
    text.trim()
        .trim_start_matches("export ")
        .split(' ')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

/// `drover submit` in a private store of its own, with the farm's exports.
fn submit(
    dir: &Path,
    env: &BTreeMap<String, String>,
    file: &Path,
    attribute: Option<&str>,
) -> std::process::Output {
    test_support::private_store_command(&dir.join("client-store"))
        .arg(DROVER)
        .args(["submit"])
        .arg(file)
        .args(
            attribute
                .map(|attribute| ["--attr", attribute])
                .into_iter()
                .flatten(),
        )
        .arg("--watch")
        .envs(env)
        .env(
            "NIX_CONFIG",
            "sandbox = false\nbuild-users-group =\nsubstituters =\n",
        )
        .env("HOME", dir)
        .output()
        .unwrap()
}

/// Starts `drover dev-farm` with two builders in `dir/farm`, logging to `dir/farm.log`; returns
/// it once its exports are written, with the exports.
async fn start_farm(dir: &Path) -> (ChildGuard, BTreeMap<String, String>) {
    let farm_dir = dir.join("farm");
    // A farm started again in the same directory writes its exports again.
    let env_file = farm_dir.join("env");
    let _ = fs_err::remove_file(&env_file);
    let log = fs_err::File::create(dir.join("farm.log")).unwrap();
    let farm = ChildGuard::spawn(
        Command::new(DROVER)
            .args(["dev-farm", "--builders", "2", "--dir"])
            .arg(&farm_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap().into_parts().0)
            .stderr(log.into_parts().0),
    )
    .unwrap();
    let env = poll_until(
        Duration::from_secs(90),
        "the dev farm to come up",
        || async {
            fs_err::read_to_string(&env_file)
                .ok()
                .map(|text| exports(&text))
        },
    )
    .await;
    (farm, env)
}

/// How many builds the farm has queued.
fn builds_queued(env: &BTreeMap<String, String>) -> usize {
    let listed = Command::new(DROVER)
        .args(["list", "--json", "--limit", "1000"])
        .envs(env)
        .output()
        .unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    listed.as_array().unwrap().len()
}

/// `drover build` in a fresh store of its own leaves a working `./result` and prints the path;
/// built again it queues nothing: the output is valid there, or in the farm's cache for another
/// store, and the runner is not even asked.
fn builds_like_nix_build(dir: &Path, env: &BTreeMap<String, String>, file: &Path) {
    let store = dir.join("build-store");
    let work = dir.join("work");
    fs_err::create_dir_all(&work).unwrap();
    let in_store = || in_a_store(dir, &store, &work, env);
    let stdout = succeeded(
        in_store()
            .arg(DROVER)
            .arg("build")
            .arg(file)
            .args(["--attr", "top"]),
    );
    let target = fs_err::read_link(work.join("result")).unwrap();
    assert_eq!(stdout.trim(), target.to_str().unwrap());
    assert!(stdout.trim().ends_with("-diamond-top"), "{stdout}");
    let shown = in_store()
        .args(["sh", "-c", "./result/bin/show && cat result/summary"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("-diamond-right") && shown.contains("left, built on"),
        "./result does not work: {shown}"
    );

    let queued = builds_queued(env);
    let build_top_again = |mut command: Command, why: &str| {
        let again = succeeded(
            command
                .arg(DROVER)
                .args(["build", "--no-link"])
                .arg(file)
                .args(["--attr", "top"]),
        );
        assert_eq!(again, stdout, "{why}");
    };
    let mut unreachable = in_store();
    unreachable.env("DROVER_RUNNER", "https://localhost:1");
    build_top_again(unreachable, "valid locally, the runner is not asked");
    let other_store = dir.join("other-build-store");
    build_top_again(
        in_a_store(dir, &other_store, &work, env),
        "in the farm's cache, substituted",
    );
    assert_eq!(builds_queued(env), queued, "nothing was queued again");

    // Looked for before the farm built it, then fetched once it did.
    let fresh = succeeded(
        in_store()
            .arg(DROVER)
            .args(["build", "--no-link", "-E"])
            .arg(format!(
                r#"derivation {{ name = "fresh"; system = "x86_64-linux"; builder = "/bin/sh";
                    args = [ "-c" "echo {} > $out" ]; }}"#,
                dir.display()
            )),
    );
    assert!(fresh.trim().ends_with("-fresh"), "{fresh}");
    assert_eq!(builds_queued(env), queued + 1);
}

/// `drover build DRV^dev,out` builds and links the outputs asked for, as Nix's `^` names them.
fn builds_the_outputs_asked_for(dir: &Path, env: &BTreeMap<String, String>, fixtures: &Path) {
    let store = dir.join("outputs-store");
    let work = dir.join("outputs-work");
    fs_err::create_dir_all(&work).unwrap();
    let instantiated = in_a_store(dir, &store, &work, env)
        .arg("nix-instantiate")
        .arg(fixtures)
        .args(["--attr", "multi"])
        .output()
        .unwrap();
    let drv = String::from_utf8(instantiated.stdout).unwrap();
    let stdout = succeeded(
        in_a_store(dir, &store, &work, env)
            .arg(DROVER)
            .arg("build")
            .arg(format!("{}^dev,out", drv.trim())),
    );
    let printed: Vec<&str> = stdout.lines().collect();
    assert_eq!(printed.len(), 2, "{stdout}");
    assert!(
        printed[0].ends_with("-multi-dev") && printed[1].ends_with("-multi"),
        "{stdout}"
    );
    assert_eq!(
        fs_err::read_link(work.join("result-dev")).unwrap().to_str(),
        Some(printed[0])
    );
    assert_eq!(
        fs_err::read_link(work.join("result")).unwrap().to_str(),
        Some(printed[1])
    );
}

/// Runs `command`, asserting it succeeds; returns its stdout.
fn succeeded(command: &mut Command) -> String {
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{command:?}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A command with `store` as its `/nix`, the farm's settings and Nix's test configuration.
fn in_a_store(dir: &Path, store: &Path, work: &Path, env: &BTreeMap<String, String>) -> Command {
    let mut command = test_support::private_store_command(store);
    command
        .envs(env)
        .env(
            "NIX_CONFIG",
            "sandbox = false\nbuild-users-group =\nsubstituters =\n",
        )
        .env("HOME", dir)
        .current_dir(work);
    command
}

/// `drover submit --watch` on a terminal (`script` gives it one) draws its progress on one line,
/// redrawn in place; the plain output of the other submissions here has no such codes.
fn shows_progress_on_a_terminal(dir: &Path, env: &BTreeMap<String, String>, fixtures: &Path) {
    let mut command = test_support::private_store_command(&dir.join("client-store"));
    command
        .arg(DROVER)
        .arg("submit")
        .arg(fixtures)
        .args(["--attr", "chatty", "--watch"]);
    let quoted: Vec<String> = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| format!("'{}'", part.to_string_lossy().replace('\'', "'\\''")))
        .collect();
    let output = Command::new("script")
        .args([
            "--quiet",
            "--return",
            "--command",
            &quoted.join(" "),
            "/dev/null",
        ])
        .envs(env)
        .env(
            "NIX_CONFIG",
            "sandbox = false\nbuild-users-group =\nsubstituters =\n",
        )
        .env("HOME", dir)
        .output()
        .expect("`script` (bsdutils) gives the test a terminal");
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{shown}");
    assert!(
        shown.contains("\r\x1b[2Kbuild ")
            && (shown.contains(" steps done") || shown.contains(": queued, being planned [")),
        "no progress line drawn on the terminal: {shown:?}"
    );
    assert!(shown.contains("succeeded"), "{shown:?}");
}

/// `drover status`, `list` and `logs` on the failed build that `drover submit` reported on
/// `stderr`, plain and as JSON.
fn reads_a_failed_build(env: &BTreeMap<String, String>, stderr: &str) {
    let id = stderr
        .split_once("build ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .expect("a build id");
    let drover = |args: &[&str]| {
        let output = Command::new(DROVER).args(args).envs(env).output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{args:?}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    };
    let status: serde_json::Value =
        serde_json::from_str(&drover(&["status", id, "--json"])).unwrap();
    assert_eq!(status["status"], "failed", "{status}");
    assert_eq!(status["phase"], "failed", "{status}");
    assert!(status["finished_at_ms"].as_i64() > status["submitted_at_ms"].as_i64());
    let failed_step = status["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|step| step["status"] == "failed")
        .expect("a failed step");
    assert!(
        failed_step["builder"].as_str().unwrap().starts_with('b'),
        "a finished step names its builder: {failed_step}"
    );
    let plain = drover(&["status", id]);
    assert!(plain.contains(": failed"), "{plain}");
    assert!(
        plain.contains(" UTC, ended after ") && plain.contains("-broken.drv on b"),
        "times and the builder of the failed step: {plain}"
    );
    assert!(
        plain.contains(&format!("its log: drover logs {id} broken")),
        "how to read the failed step's log: {plain}"
    );
    let listed: serde_json::Value =
        serde_json::from_str(&drover(&["list", "--status", "failed", "--json"])).unwrap();
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|build| build["build_id"].as_i64() == id.parse().ok())
        .unwrap_or_else(|| panic!("build {id} is listed: {listed}"));
    assert_eq!(entry["phase"], "failed", "{entry}");
    let line = drover(&["list", "--limit", "1"]);
    assert_eq!(
        line.trim_end().split('\t').count(),
        5,
        "id, status, queued, duration, top: {line}"
    );
    let zero = Command::new(DROVER)
        .args(["list", "--limit", "0"])
        .envs(env)
        .output()
        .unwrap();
    assert_eq!(
        zero.status.code(),
        Some(64),
        "--limit 0 is refused as usage (EX_USAGE, not clap's 2)"
    );
    assert!(drover(&["logs", id]).contains("this build breaks on purpose"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dev_farm_builds_what_drover_submit_sends_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let farm_dir = dir.path().join("farm");
    let (farm, env) = start_farm(dir.path()).await;
    assert!(env["DROVER_CACHE_KEY"].starts_with("drover-dev-farm-1:"));

    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/diamond.nix");
    let built = submit(dir.path(), &env, &examples, Some("top"));
    let stdout = String::from_utf8_lossy(&built.stdout);
    assert!(
        built.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&built.stderr)
    );
    assert!(
        stdout.starts_with("out /nix/store/") && stdout.contains("-diamond-top"),
        "{stdout}"
    );

    builds_like_nix_build(dir.path(), &env, &examples);

    let fixtures =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../queue-runner/tests/fixtures/builds.nix");
    let failed = submit(dir.path(), &env, &fixtures, Some("broken"));
    assert_eq!(failed.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("ended failed"), "{stderr}");
    assert!(
        stderr.contains("this build breaks on purpose"),
        "the failing step's log tail: {stderr}"
    );
    assert!(
        (stderr.contains(" steps done") || stderr.contains(": queued, being planned ["))
            && !stderr.contains('\u{1b}'),
        "progress as plain lines when stderr is not a terminal: {stderr}"
    );
    reads_a_failed_build(&env, &stderr);
    builds_the_outputs_asked_for(dir.path(), &env, &fixtures);
    shows_progress_on_a_terminal(dir.path(), &env, &fixtures);

    let jobs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs.nix");
    let both = submit(dir.path(), &env, &jobs, None);
    let stdout = String::from_utf8_lossy(&both.stdout);
    let stderr = String::from_utf8_lossy(&both.stderr);
    assert!(both.status.success(), "{stdout}{stderr}");
    assert_eq!(
        stderr.matches(" queued: /nix/store/").count(),
        2,
        "each derivation of the file is a build: {stderr}"
    );
    assert!(
        stderr.contains("(left) succeeded") && stderr.contains("(right) succeeded"),
        "each build is named by its job's attribute path: {stderr}"
    );
    assert!(
        stdout.contains("-diamond-left") && stdout.contains("-diamond-right"),
        "{stdout}"
    );

    let pid = farm.id();
    let farm = std::sync::Mutex::new(farm);
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = poll_until(Duration::from_secs(30), "the dev farm to stop", || async {
        farm.lock().unwrap().child_mut().try_wait().unwrap()
    })
    .await;
    assert!(status.success(), "the farm did not stop cleanly: {status}");
    let builders_left = Command::new("pgrep")
        .args(["-f", &farm_dir.join("builder-b1.toml").to_string_lossy()])
        .output()
        .unwrap();
    assert!(
        builders_left.stdout.is_empty(),
        "a builder outlived the farm"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dev_farm_killed_with_sigkill_leaves_no_builder_running_and_its_directory_reusable() {
    let dir = tempfile::tempdir().unwrap();
    let farm_dir = dir.path().join("farm");
    let (mut farm, env) = start_farm(dir.path()).await;
    let key_mode = fs_err::metadata(farm_dir.join("cache-key.sec"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "the cache's secret key is private");
    let builder_pids = |index: u32| {
        let config = farm_dir.join(format!("builder-b{index}.toml"));
        let found = Command::new("pgrep")
            .args(["-f", &config.to_string_lossy()])
            .output()
            .unwrap();
        String::from_utf8(found.stdout).unwrap()
    };
    for index in [1, 2] {
        assert!(
            !builder_pids(index).is_empty(),
            "builder b{index} is not running before the kill"
        );
    }
    farm.child_mut().kill().unwrap();
    farm.child_mut().wait().unwrap();
    poll_until(
        Duration::from_secs(10),
        "the killed farm's builders to die with it",
        || async { (builder_pids(1).is_empty() && builder_pids(2).is_empty()).then_some(()) },
    )
    .await;

    // The same directory serves again, with the same CA and cache key, so clients set up for
    // the first farm keep working.
    let ca = fs_err::read(farm_dir.join("ca.pem")).unwrap();
    let (_again, env_again) = start_farm(dir.path()).await;
    assert_eq!(env_again["DROVER_CACHE_KEY"], env["DROVER_CACHE_KEY"]);
    assert_eq!(fs_err::read(farm_dir.join("ca.pem")).unwrap(), ca);
}
