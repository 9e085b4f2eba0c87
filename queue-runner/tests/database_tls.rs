//! Reaching PostgreSQL as a real deployment does: over TCP with TLS (`ssl = on`, a certificate
//! from the test's CA), the password read from a file of its own. `verify-full` checks the
//! certificate's CA and host name, `require` only encrypts, and every mistake (no TLS, another
//! CA, another host name, a wrong, empty or missing password file) is refused with a typed error.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::path::{Path, PathBuf};

use common::{DEADLINE, Farm};
use drover_queue_runner::db::{Connector, ConnectorError, DatabaseConfig, SslMode};
use drover_tls::{CertificateAuthority, Identity, Role};
use test_support::{TestDatabase, TestPostgres, TlsSetup, poll_until};

const PASSWORD: &str = "correct horse battery staple";

/// A TLS cluster whose certificate the CA in `dir/postgres-ca/ca.pem` signed, for `localhost`.
async fn tls_cluster(dir: &Path) -> (TestPostgres, TestDatabase, PathBuf) {
    let dir = dir.join("postgres-ca");
    fs_err::create_dir(&dir).unwrap();
    let ca = CertificateAuthority::generate("postgres test CA").unwrap();
    ca.write(&dir).unwrap();
    let server = ca
        .issue(
            &Identity::new(Role::Runner, "postgres").unwrap(),
            &["localhost".to_owned()],
            &[],
        )
        .unwrap();
    let cluster = TestPostgres::start_tls(&TlsSetup {
        certificate_pem: &server.cert_pem,
        key_pem: &server.key_pem,
        password: PASSWORD,
    });
    let database = cluster.create_database().await;
    (cluster, database, dir.join("ca.pem"))
}

/// Whether a connection made as `config` says is encrypted; the connection's error otherwise.
async fn encrypted(config: &DatabaseConfig) -> Result<bool, String> {
    let pool = Connector::new(config)
        .map_err(|error| error_context::report(&error).to_string())?
        .pool(1)
        .unwrap();
    let client = pool
        .get()
        .await
        .map_err(|error| error_context::report(&error).to_string())?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    Ok(row.get(0))
}

fn password_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs_err::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_password_file_connects_and_every_mistake_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, database, ca) = tls_cluster(dir.path()).await;
    let good = DatabaseConfig {
        url: cluster.tcp_connection_string(&database.name),
        password_file: Some(password_file(
            dir.path(),
            "password",
            &format!("{PASSWORD}\n"),
        )),
        ssl_mode: SslMode::VerifyFull,
        ssl_root_certificate: Some(ca),
    };
    assert_eq!(encrypted(&good).await, Ok(true), "verify-full");
    let require = DatabaseConfig {
        ssl_mode: SslMode::Require,
        ssl_root_certificate: None,
        ..good.clone()
    };
    assert_eq!(encrypted(&require).await, Ok(true), "require");

    let refused = [
        (
            "no TLS",
            DatabaseConfig {
                ssl_mode: SslMode::Disable,
                ..good.clone()
            },
            "no pg_hba.conf entry",
        ),
        (
            "another CA",
            DatabaseConfig {
                ssl_root_certificate: Some({
                    let other = dir.path().join("other");
                    fs_err::create_dir(&other).unwrap();
                    CertificateAuthority::generate("another CA")
                        .unwrap()
                        .write(&other)
                        .unwrap();
                    other.join("ca.pem")
                }),
                ..good.clone()
            },
            "UnknownIssuer",
        ),
        (
            "another host name",
            DatabaseConfig {
                url: good.url.replace("host=localhost", "host=127.0.0.1"),
                ..good.clone()
            },
            "not valid for name",
        ),
        (
            "a wrong password",
            DatabaseConfig {
                password_file: Some(password_file(dir.path(), "wrong", "hunter2")),
                ..good.clone()
            },
            "password authentication failed",
        ),
    ];
    for (mistake, config, expected) in refused {
        let error = encrypted(&config).await.expect_err(mistake);
        assert!(error.contains(expected), "{mistake}: {error}");
    }

    let missing = DatabaseConfig {
        password_file: Some(dir.path().join("nowhere")),
        ..good.clone()
    };
    assert!(matches!(
        Connector::new(&missing),
        Err(ConnectorError::PasswordFile(_))
    ));
    let empty = DatabaseConfig {
        password_file: Some(password_file(dir.path(), "empty", "\n")),
        ..good.clone()
    };
    assert!(matches!(
        Connector::new(&empty),
        Err(ConnectorError::EmptyPassword(_))
    ));
    let no_ca = DatabaseConfig {
        ssl_root_certificate: None,
        ..good
    };
    assert!(matches!(
        Connector::new(&no_ca),
        Err(ConnectorError::NoRootCertificate)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_serves_from_a_database_reached_over_verified_tls() {
    let farm = Farm::new().await;
    let (cluster, database, ca) = tls_cluster(farm.dir.path()).await;
    let password = password_file(farm.dir.path(), "db-password", PASSWORD);
    let config = farm.dir.path().join("runner-tls.toml");
    let text = farm.runner_config_text(&cluster.tcp_connection_string(&database.name));
    let text = text.replacen(
        "[database]\n",
        &format!(
            "[database]\npassword_file = {:?}\nssl_mode = \"verify-full\"\nssl_root_certificate = {:?}\n",
            password.display().to_string(),
            ca.display().to_string()
        ),
        1,
    );
    fs_err::write(&config, text).unwrap();
    let log_path = farm.dir.path().join("runner-tls.log");
    let log = fs_err::File::create(&log_path).unwrap();
    let _runner = test_support::ChildGuard::spawn(
        std::process::Command::new(test_support::workspace_binary("drover-queue-runner"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log.into_parts().0),
    )
    .unwrap();
    poll_until(
        DEADLINE,
        "the runner to recover its queue over TLS",
        || async {
            let log = fs_err::read_to_string(&log_path).unwrap();
            assert!(
                !log.contains("drover-queue-runner: "),
                "the runner ended: {log}"
            );
            log.contains("queue recovered").then_some(())
        },
    )
    .await;
    let migrated: i64 = database
        .connect()
        .await
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        migrated > 0,
        "the runner migrated the database it reached over TLS"
    );
}
