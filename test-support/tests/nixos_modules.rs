//! drover's NixOS modules evaluated with nixpkgs' real module system: `nixos-modules/tests/eval.nix`
//! declares the NixOS options they use as stubs, evaluates a few configurations and prints, for
//! each, the systemd units, the settings each unit's TOML file is generated from, and the messages
//! of failed assertions. The tests here pin what a deployment relies on.
//!
//! Needs `nix-instantiate` and nixpkgs' `lib`: `DROVER_NIXPKGS_LIB`, or else the checkout's
//! sibling `shared/nixpkgs-lib/lib`. A missing `lib` fails the tests instead of skipping them, so
//! CI cannot pass without evaluating the modules.

#![allow(
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{Value, json};
use test_support::farm::nix_environment;

const RUNNER: &str = "drover-queue-runner";
const BUILDER: &str = "drover-builder";

/// Runner configurations `eval.nix` evaluates that must pass their assertions.
const VALID_RUNNER_CASES: [&str; 2] = ["runnerDefaults", "runnerRemoteDatabase"];
/// Builder configurations `eval.nix` evaluates that must pass their assertions.
const VALID_BUILDER_CASES: [&str; 3] = ["builderDaemon", "builderLocal", "builderNoop"];

/// nixpkgs' `lib` directory, which must exist.
fn nixpkgs_lib() -> PathBuf {
    let path = std::env::var_os("DROVER_NIXPKGS_LIB").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/nixpkgs-lib/lib"),
        PathBuf::from,
    );
    assert!(
        path.join("default.nix").is_file(),
        "nixpkgs' lib not found at {}: set DROVER_NIXPKGS_LIB to a nixpkgs `lib` directory \
         (e.g. the lib folder of a nix-community/nixpkgs.lib checkout)",
        path.display()
    );
    path
}

/// What `eval.nix` returns, evaluated once per test binary: the tests only read it.
fn evaluation() -> &'static Value {
    static EVALUATION: OnceLock<Value> = OnceLock::new();
    EVALUATION.get_or_init(|| {
        let eval_nix =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../nixos-modules/tests/eval.nix");
        let home = tempfile::tempdir().expect("a temporary home for nix-instantiate");
        let mut command = Command::new("nix-instantiate");
        // A lookup path needs no quoting, unlike a path written into a Nix expression.
        command
            .arg("-I")
            .arg(format!("drover-nixpkgs-lib={}", nixpkgs_lib().display()))
            .args(["--eval", "--strict", "--json"])
            .arg(&eval_nix)
            .args(["--arg", "lib", "import <drover-nixpkgs-lib>"]);
        nix_environment(&mut command, home.path());
        let output = command
            .output()
            .expect("running nix-instantiate (package nix-bin)");
        assert!(
            output.status.success(),
            "evaluating {}: {}",
            eval_nix.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("nix-instantiate --json printed JSON")
    })
}

/// One configuration's result, e.g. `runnerDefaults`.
fn case(name: &str) -> &'static Value {
    let value = &evaluation()[name];
    assert!(value.is_object(), "eval.nix has no case {name}");
    value
}

fn unit(case_name: &str, unit_name: &str) -> &'static Value {
    let value = &case(case_name)["units"][unit_name];
    assert!(value.is_object(), "{case_name} defines no unit {unit_name}");
    value
}

/// What the unit's TOML file is generated from.
fn settings(case_name: &str, unit_name: &str) -> &'static Value {
    let value = &unit(case_name, unit_name)["settings"];
    assert!(
        value.is_object(),
        "{case_name}: {unit_name}'s ExecStart passes no file from the TOML generator"
    );
    value
}

fn strings<'a>(value: &'a Value, what: &str) -> Vec<&'a str> {
    let Some(items) = value.as_array() else {
        panic!("{what} is not a list: {value}");
    };
    items
        .iter()
        .map(|item| {
            let Some(text) = item.as_str() else {
                panic!("{what} holds a non-string: {item}");
            };
            text
        })
        .collect()
}

fn failed_assertions(case_name: &str) -> Vec<&'static str> {
    strings(
        &case(case_name)["failedAssertions"],
        &format!("{case_name}'s failed assertions"),
    )
}

/// Where in `value` a null is, as dotted keys.
fn nulls(value: &Value, at: &str) -> Vec<String> {
    match value {
        Value::Null => vec![at.to_owned()],
        Value::Array(items) => items
            .iter()
            .enumerate()
            .flat_map(|(index, item)| nulls(item, &format!("{at}[{index}]")))
            .collect(),
        Value::Object(fields) => fields
            .iter()
            .flat_map(|(key, field)| nulls(field, &format!("{at}.{key}")))
            .collect(),
        Value::Bool(_) | Value::Number(_) | Value::String(_) => Vec::new(),
    }
}

#[test]
fn the_runner_is_a_notify_service_that_a_config_error_does_not_restart() {
    for case_name in VALID_RUNNER_CASES {
        let service = &unit(case_name, RUNNER)["serviceConfig"];
        assert_eq!(service["Type"], "notify", "{case_name}");
        assert_eq!(service["User"], "drover", "{case_name}");
        assert_eq!(service["RestartPreventExitStatus"], 78, "{case_name}");
        assert_eq!(
            case(case_name)["users"]["drover"]["isSystemUser"],
            true,
            "{case_name}"
        );
    }
}

#[test]
fn the_runner_starts_after_postgresql_setup_whether_or_not_the_database_is_local() {
    for case_name in VALID_RUNNER_CASES {
        let after = strings(&unit(case_name, RUNNER)["after"], "after");
        assert!(
            after.contains(&"postgresql-setup.service"),
            "{case_name}: {after:?}"
        );
    }

    let local = unit("runnerDefaults", RUNNER);
    assert!(strings(&local["after"], "after").contains(&"postgresql.service"));
    assert_eq!(
        strings(&local["requires"], "requires"),
        ["postgresql.service"]
    );
    assert_eq!(
        case("runnerDefaults")["postgresql"]["ensureDatabases"],
        json!(["drover"])
    );

    let remote = unit("runnerRemoteDatabase", RUNNER);
    assert!(!strings(&remote["after"], "after").contains(&"postgresql.service"));
    let requires = strings(&remote["requires"], "requires");
    assert!(requires.is_empty(), "{requires:?}");
    assert_eq!(case("runnerRemoteDatabase")["postgresql"], json!({}));
}

#[test]
fn the_runner_reads_its_secrets_as_the_keys_group_unless_told_otherwise() {
    let groups = &unit("runnerDefaults", RUNNER)["serviceConfig"]["SupplementaryGroups"];
    assert_eq!(strings(groups, "SupplementaryGroups"), ["keys"]);

    // secretsGroup = null: no group at all (an empty list gives systemd none either).
    let groups = &unit("runnerRemoteDatabase", RUNNER)["serviceConfig"]["SupplementaryGroups"];
    assert!(
        groups.is_null() || groups == &json!([]),
        "SupplementaryGroups = {groups}"
    );
}

#[test]
fn the_runner_settings_carry_the_remote_database_keys() {
    assert_eq!(
        settings("runnerRemoteDatabase", RUNNER)["database"],
        json!({
            "url": "host=db.example.org dbname=drover user=drover",
            "password_file": "/run/keys/drover/database-password",
            "ssl_mode": "verify-full",
            "ssl_root_certificate": "/run/keys/drover/postgresql-ca.pem",
        })
    );
}

#[test]
fn unset_optional_keys_are_left_out_of_the_generated_settings() {
    let cases = VALID_RUNNER_CASES
        .map(|case_name| (case_name, RUNNER))
        .into_iter()
        .chain(VALID_BUILDER_CASES.map(|case_name| (case_name, BUILDER)));
    for (case_name, unit_name) in cases {
        let found = nulls(settings(case_name, unit_name), "settings");
        assert!(
            found.is_empty(),
            "{case_name}: nulls, which TOML cannot write: {found:?}"
        );
    }
    assert_eq!(
        settings("runnerDefaults", RUNNER)["database"],
        json!({
            "url": "host=/run/postgresql dbname=drover user=drover",
            "ssl_mode": "disable",
        })
    );
}

#[test]
fn invalid_configurations_fail_an_assertion_naming_the_key() {
    let failed = failed_assertions("runnerVerifyFullWithoutRootCertificate");
    assert!(
        matches!(failed.as_slice(), [message] if message.contains("ssl_root_certificate")),
        "{failed:?}"
    );
    let failed = failed_assertions("builderNixWithoutCacheUrl");
    assert!(
        matches!(failed.as_slice(), [message] if message.contains("executor.cache_url")),
        "{failed:?}"
    );
}

#[test]
fn valid_configurations_fail_no_assertion() {
    for case_name in VALID_RUNNER_CASES.into_iter().chain(VALID_BUILDER_CASES) {
        let failed = failed_assertions(case_name);
        assert!(failed.is_empty(), "{case_name}: {failed:?}");
    }
}

#[test]
fn the_builder_is_a_notify_service_run_by_a_nix_trusted_root() {
    for case_name in VALID_BUILDER_CASES {
        let service = &unit(case_name, BUILDER)["serviceConfig"];
        assert_eq!(service["Type"], "notify", "{case_name}");
        assert_eq!(service["User"], "root", "{case_name}");
        assert_eq!(service["RestartPreventExitStatus"], 78, "{case_name}");
        let trusted = strings(
            &case(case_name)["trustedUsers"],
            "nix.settings.trusted-users",
        );
        assert!(trusted.contains(&"root"), "{case_name}: {trusted:?}");
    }
}

#[test]
fn a_daemon_store_builder_needs_the_daemon_keeps_its_hardening_and_writes_only_gc_roots() {
    let builder = unit("builderDaemon", BUILDER);
    let requires = strings(&builder["requires"], "requires");
    assert!(requires.contains(&"nix-daemon.socket"), "{requires:?}");
    let after = strings(&builder["after"], "after");
    assert!(
        after.contains(&"nix-daemon.socket") && after.contains(&"nix-daemon.service"),
        "{after:?}"
    );
    let service = &builder["serviceConfig"];
    assert_eq!(
        strings(&service["ReadWritePaths"], "ReadWritePaths"),
        ["/nix/var/nix/gcroots"]
    );
    for setting in ["ProtectKernelTunables", "ProtectHostname", "ProtectClock"] {
        assert_eq!(service[setting], true, "{setting}");
    }
    assert_eq!(service["CapabilityBoundingSet"], json!(["CAP_SYS_ADMIN"]));
    assert_eq!(
        settings("builderDaemon", BUILDER)["executor"]["store"],
        "daemon"
    );
}

#[test]
fn a_local_store_builder_writes_the_store_itself() {
    let builder = unit("builderLocal", BUILDER);
    assert_eq!(
        strings(
            &builder["serviceConfig"]["ReadWritePaths"],
            "ReadWritePaths"
        ),
        ["/nix"]
    );
    assert!(
        builder["serviceConfig"]
            .get("CapabilityBoundingSet")
            .is_none(),
        "builds run in the unit: no capability bound"
    );
    let requires = strings(&builder["requires"], "requires");
    assert!(!requires.contains(&"nix-daemon.socket"), "{requires:?}");
    assert_eq!(
        settings("builderLocal", BUILDER)["executor"]["store"],
        "local"
    );
}

#[test]
fn a_noop_builder_gets_none_of_the_nix_executors_keys() {
    // The builder's parser reads [executor] by its kind and refuses unknown keys.
    assert_eq!(
        settings("builderNoop", BUILDER)["executor"],
        json!({ "kind": "noop", "build_ms": 100 })
    );
    // It runs no Nix: no daemon to wait for, nothing of /nix to write.
    let builder = unit("builderNoop", BUILDER);
    let requires = strings(&builder["requires"], "requires");
    assert!(!requires.contains(&"nix-daemon.socket"), "{requires:?}");
    assert_eq!(builder["serviceConfig"]["ReadWritePaths"], json!([]));
}

#[test]
fn opening_the_firewall_opens_the_grpc_and_cache_ports() {
    assert_eq!(
        case("runnerRemoteDatabase")["allowedTCPPorts"],
        json!([7700, 7701])
    );
    assert_eq!(case("runnerDefaults")["allowedTCPPorts"], json!([]));
}

/// The settings a case writes, as the TOML file the daemon reads.
fn toml_text(case_name: &str, unit_name: &str) -> String {
    let table: toml::Table = serde_json::from_value(settings(case_name, unit_name).clone())
        .unwrap_or_else(|error| panic!("{case_name}: the settings are not a TOML table: {error}"));
    table.to_string()
}

#[test]
fn every_valid_configuration_is_one_the_daemons_accept() {
    for case_name in VALID_RUNNER_CASES {
        let text = toml_text(case_name, RUNNER);
        if let Err(error) =
            drover_queue_runner::config::Config::parse(&text, Path::new("queue-runner.toml"))
        {
            panic!("{case_name}: the runner refuses what the module writes: {error}\n{text}");
        }
    }
    for case_name in VALID_BUILDER_CASES {
        let text = toml_text(case_name, BUILDER);
        if let Err(error) = drover_builder::config::Config::parse(&text, Path::new("builder.toml"))
        {
            panic!("{case_name}: the builder refuses what the module writes: {error}\n{text}");
        }
    }
}
