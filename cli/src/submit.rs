//! `drover submit`: instantiate an expression (or take a `.drv`), send the runner the derivation
//! closure and the input sources, and with `--watch` wait for the result, print the outputs and
//! exit non-zero if the build did not succeed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Args;
use drover_proto::v1::build_service_client::BuildServiceClient;
use drover_proto::v1::{BuildStatus, DerivationText, GetRequest, SourceNar, SubmitRequest};
use error_context::{Classify, ResultExt as _, Severity, WithContext};
use nix_primitives::StorePath;

use crate::connection::{ConnectError, ConnectionArgs};

/// How often `--watch` asks for the build's state.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// `drover submit` arguments.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// A Nix file to instantiate, or a `/nix/store/….drv` path.
    target: PathBuf,
    /// The attribute to instantiate.
    #[arg(long, short = 'A')]
    attr: Option<String>,
    /// Wait for the build, print its outputs, and exit non-zero unless it succeeded.
    #[arg(long)]
    watch: bool,
    /// Higher builds are dispatched first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Metadata returned with the build (repeatable `key=value`).
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
    metadata: Vec<(String, String)>,
    /// Where the runner is.
    #[command(flatten)]
    connection: ConnectionArgs,
}

fn parse_meta(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("{text:?} is not key=value"))
}

/// Why a submission failed.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// A local Nix command failed.
    #[error("{command} failed: {stderr}")]
    Nix {
        /// The command.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// A local store path cannot be read.
    #[error("reading {path}")]
    Read {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Nix printed something that is not a store path.
    #[error("Nix printed {0:?}, which is not a store path")]
    NotAStorePath(String),
    /// A source could not be serialised.
    #[error("serialising an input source")]
    Dump(#[source] nix_primitives::nar::DumpError),
    /// The runner cannot be reached.
    #[error("reaching the runner")]
    Connect(#[from] ConnectError),
    /// The runner refused the request.
    #[error("the runner refused: {}", .0.message())]
    Refused(tonic::Status),
    /// The build did not succeed.
    #[error("build {id} ended {status}: {reason}")]
    BuildFailed {
        /// The build.
        id: i64,
        /// Its status.
        status: String,
        /// Why.
        reason: String,
    },
}

impl Classify for SubmitError {
    fn severity(&self) -> Severity {
        match self {
            Self::Refused(status)
                if matches!(
                    status.code(),
                    tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
                ) =>
            {
                Severity::Reject
            }
            Self::BuildFailed { .. } => Severity::Step,
            Self::Connect(error) => error.severity(),
            _ => Severity::Fatal,
        }
    }
}

fn nix(command: &mut Command) -> Result<String, SubmitError> {
    let output = command.output().map_err(|source| SubmitError::Nix {
        command: format!("{command:?}"),
        stderr: source.to_string(),
    })?;
    if !output.status.success() {
        return Err(SubmitError::Nix {
            command: format!("{command:?}"),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn store_path(text: &str) -> Result<StorePath, SubmitError> {
    StorePath::from_absolute(text.trim()).map_err(|_| SubmitError::NotAStorePath(text.to_owned()))
}

/// The `.drv` to build: the target itself, or what instantiating it gives.
fn derivation(args: &SubmitArgs) -> Result<StorePath, SubmitError> {
    if args
        .target
        .extension()
        .is_some_and(|extension| extension == "drv")
    {
        return store_path(&args.target.to_string_lossy());
    }
    let mut command = Command::new("nix-instantiate");
    command.arg(&args.target);
    if let Some(attr) = &args.attr {
        command.args(["--attr", attr]);
    }
    let printed = nix(&mut command)?;
    store_path(printed.lines().last().unwrap_or_default())
}

/// The derivation closure's texts and its input sources as NARs, from the local store.
fn closure(top: &StorePath) -> Result<(Vec<DerivationText>, Vec<SourceNar>), SubmitError> {
    let requisites =
        nix(Command::new("nix-store").args(["--query", "--requisites", &top.to_absolute()]))?;
    let mut derivations = Vec::new();
    let mut sources = Vec::new();
    for line in requisites.lines() {
        let path = store_path(line)?;
        let real = Path::new(line.trim());
        if path.is_derivation() {
            let text = fs_err::read(real).map_err(|source| SubmitError::Read {
                path: real.to_owned(),
                source,
            })?;
            derivations.push(DerivationText {
                path: path.to_absolute(),
                text,
            });
        } else {
            let mut nar = Vec::new();
            nix_primitives::nar::dump(real, &mut nar).map_err(SubmitError::Dump)?;
            let references =
                nix(Command::new("nix-store").args(["--query", "--references", line.trim()]))?;
            sources.push(SourceNar {
                path: path.to_absolute(),
                references: references.lines().map(str::to_owned).collect(),
                nar,
            });
        }
    }
    Ok((derivations, sources))
}

/// Runs `drover submit`.
pub async fn run(args: SubmitArgs) -> Result<(), WithContext<SubmitError>> {
    let top = derivation(&args).context("instantiating the target")?;
    let (derivations, sources) = closure(&top).context("reading the derivation closure")?;
    let channel = args.connection.connect().await.map_err(SubmitError::from)?;
    let mut client = BuildServiceClient::new(channel).max_encoding_message_size(256 * 1024 * 1024);
    let id = client
        .submit(SubmitRequest {
            derivations,
            sources,
            top_drv_path: top.to_absolute(),
            priority: args.priority,
            metadata: args.metadata.iter().cloned().collect(),
        })
        .await
        .map_err(SubmitError::Refused)?
        .into_inner()
        .build_id;
    eprintln!("build {id} queued: {top}");
    if !args.watch {
        println!("{id}");
        return Ok(());
    }
    loop {
        let build = client
            .get(GetRequest { build_id: id })
            .await
            .map_err(SubmitError::Refused)?
            .into_inner();
        let status = build.status();
        if matches!(
            status,
            BuildStatus::Queued | BuildStatus::Running | BuildStatus::Unknown
        ) {
            tokio::time::sleep(POLL_INTERVAL).await;
            continue;
        }
        let name = status
            .as_str_name()
            .trim_start_matches("BUILD_STATUS_")
            .to_lowercase();
        eprintln!("build {id} {name}");
        if status == BuildStatus::Succeeded {
            let outputs: BTreeMap<_, _> = build.outputs.into_iter().collect();
            for (output, path) in outputs {
                println!("{output} {path}");
            }
            return Ok(());
        }
        return Err(SubmitError::BuildFailed {
            id,
            status: name,
            reason: build.failure_reason,
        }
        .into());
    }
}
