//! `drover watch` against a real farm: Ctrl-C leaves the build running and says how to stop it
//! or follow it again, and `drover watch ID` follows it to its end and prints its outputs; a
//! keep-going build is watched until the steps it kept have run; a watch waits for a restarted
//! runner and says so.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::path::PathBuf;
use std::process::Stdio;

use common::nix_farm::{closure_request, shell_step, start_with_one_nix_builder, submit_closure};
use common::{DEADLINE, Farm, Stored};
use test_support::ChildGuard;
use test_support::wait::poll_until;

/// Starts a farm with one Nix builder, a build `name` that runs for 3 s, and `drover watch` of
/// it once it runs; returns the build, the watch and the file its stderr goes to, once the watch
/// shows progress.
async fn watch_a_running_build(farm: &mut Farm, name: &str) -> (i64, ChildGuard, PathBuf) {
    let (_, submitter) = start_with_one_nix_builder(farm).await;
    let top = shell_step(&submitter, name, "/bin/sleep 3; echo done > $out");
    let build = submit_closure(farm, &submitter, &top).await;
    farm.wait_for_count(
        "the build to start",
        "SELECT count(*) FROM step_attempts WHERE status = 'running'",
        1,
    )
    .await;
    let stderr_file = farm.dir.path().join("watch.stderr");
    let watching = ChildGuard::spawn(
        farm.drover()
            .args(["watch", &build.to_string()])
            .stdout(Stdio::null())
            .stderr(fs_err::File::create(&stderr_file).unwrap().into_parts().0),
    )
    .unwrap();
    poll_until(DEADLINE, "the watch to show progress", || async {
        fs_err::read_to_string(&stderr_file)
            .ok()
            .filter(|text| text.contains("steps done"))
    })
    .await;
    (build, watching, stderr_file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_leaves_the_build_running_and_drover_watch_follows_it_again() {
    let mut farm = Farm::new().await;
    let (build, watching, stderr_file) = watch_a_running_build(&mut farm, "slow").await;
    let pid = watching.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let watching = std::sync::Mutex::new(watching);
    let status = poll_until(DEADLINE, "the watch to stop", || async {
        watching.lock().unwrap().child_mut().try_wait().unwrap()
    })
    .await;
    let said = fs_err::read_to_string(&stderr_file).unwrap();
    assert_eq!(status.code(), Some(130), "{said}");
    assert!(
        said.contains(&format!("interrupted; build {build} goes on on the farm"))
            && said.contains(&format!("drover watch {build}")),
        "{said}"
    );
    let status: String = farm
        .db()
        .await
        .query_one("SELECT status::text FROM builds WHERE id = $1", &[&build])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "running", "the build went on");

    let followed = farm.run_drover(&["watch", &build.to_string()]).await;
    let stdout = String::from_utf8_lossy(&followed.stdout);
    assert!(
        followed.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&followed.stderr)
    );
    assert!(
        stdout.starts_with("out /nix/store/") && stdout.contains("-slow"),
        "{stdout}"
    );
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_going_build_is_watched_until_the_steps_it_kept_have_run() {
    let mut farm = Farm::new().await;
    let (_, submitter) = start_with_one_nix_builder(&mut farm).await;
    let expression = submitter.expression(
        r#"let
          step = name: script: inputs: derivation ({
            inherit name;
            system = "x86_64-linux";
            builder = "/bin/sh";
            args = [ "-c" script ];
          } // inputs);
          broken = step "broken" "exit 3" { };
          slow = step "slow-sibling" "/bin/sleep 3; echo > $out" { };
        in { top = step "top" "echo > $out" { inherit broken slow; }; }"#,
    );
    let top = submitter.instantiate(&expression, "top");
    let mut request = closure_request(&submitter, &top);
    request.keep_going = true;
    let build = farm.submit_request(request).await;

    let watched = farm.run_drover(&["watch", &build.to_string()]).await;
    let stderr = String::from_utf8_lossy(&watched.stderr);
    assert_eq!(watched.status.code(), Some(1), "{stderr}");
    let slow: String = farm
        .db()
        .await
        .query_one(
            "SELECT status::text FROM steps WHERE drv_path LIKE '%-slow-sibling.drv'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        slow, "succeeded",
        "the watch ended before the kept step ran: {stderr}"
    );
}

/// A tmux server of the test's own, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn command(&self) -> std::process::Command {
        let mut command = std::process::Command::new("tmux");
        command.args(["-L", &self.socket]);
        command
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command().arg("kill-server").output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_an_80_column_terminal_each_build_has_one_line_that_fits() {
    let mut farm = Farm::new().await;
    let (_, submitter) = start_with_one_nix_builder(&mut farm).await;
    let expression = submitter.expression(
        r#"let
          slow = name: derivation {
            inherit name;
            system = "x86_64-linux";
            builder = "/bin/sh";
            args = [ "-c" "/bin/sleep 4; echo > $out" ];
          };
        in {
          first = slow "a-derivation-whose-name-is-long-enough-to-overflow-a-line";
          second = slow "another-derivation-with-a-name-that-will-not-fit-either";
        }"#,
    );
    let mut builds = Vec::new();
    for attribute in ["first", "second"] {
        let top = submitter.instantiate(&expression, attribute);
        builds.push(submit_closure(&farm, &submitter, &top).await.to_string());
    }
    let watch = farm.drover();
    let mut line: Vec<String> = watch
        .get_envs()
        .filter_map(|(key, value)| {
            Some(format!(
                "{}='{}'",
                key.to_str()?,
                value?.to_str()?.replace('\'', "'\\''")
            ))
        })
        .collect();
    line.push(watch.get_program().to_string_lossy().into_owned());
    line.push("watch".to_owned());
    line.extend(builds.iter().cloned());
    line.push("; sleep 60".to_owned());
    let tmux = Tmux {
        socket: format!("drover-test-{}", std::process::id()),
    };
    let started = tmux
        .command()
        .args(["new-session", "-d", "-x", "80", "-y", "24", "-s", "watch"])
        .arg(format!("env {}", line.join(" ")))
        .status()
        .expect("tmux (Debian's tmux package) gives the test a terminal");
    assert!(started.success());
    let screen = poll_until(DEADLINE, "both builds to show running steps", || async {
        let captured = tmux
            .command()
            .args(["capture-pane", "-p", "-t", "watch"])
            .output()
            .unwrap();
        let screen = String::from_utf8_lossy(&captured.stdout).into_owned();
        (screen.matches("running:").count() >= 2).then_some(screen)
    })
    .await;
    for build in &builds {
        assert_eq!(
            screen.matches(&format!("build {build}:")).count(),
            1,
            "one line per build, no stale copies:\n{screen}"
        );
    }
    for row in screen.lines() {
        assert!(row.chars().count() <= 80, "{row:?} overflows:\n{screen}");
    }
    assert!(screen.contains('…'), "the long lines are cut:\n{screen}");
    // Between events the clock moves.
    poll_until(DEADLINE, "the progress clock to reach 2 s", || async {
        let captured = tmux
            .command()
            .args(["capture-pane", "-p", "-t", "watch"])
            .output()
            .unwrap();
        let screen = String::from_utf8_lossy(&captured.stdout).into_owned();
        (screen.contains("[2 s") || screen.contains("[3 s")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_waits_for_a_restarted_runner_and_says_so() {
    let mut farm = Farm::new().await;
    let (build, watching, stderr_file) =
        watch_a_running_build(&mut farm, "outlives-its-runner").await;
    farm.stop_runner().await;
    poll_until(DEADLINE, "the watch to say it lost the runner", || async {
        fs_err::read_to_string(&stderr_file)
            .ok()
            .filter(|text| text.contains("lost the runner"))
    })
    .await;
    farm.start_runner().await;
    let watching = std::sync::Mutex::new(watching);
    let status = poll_until(DEADLINE, "the watch to end", || async {
        watching.lock().unwrap().child_mut().try_wait().unwrap()
    })
    .await;
    let said = fs_err::read_to_string(&stderr_file).unwrap();
    assert!(status.success(), "{said}");
    assert!(said.contains("the runner is back"), "{said}");
    assert!(said.contains(&format!("build {build} succeeded")), "{said}");
}
