//! `drover cancel ID` and `drover restart ID`: changing a build one submitted (admins: any
//! build). Cancel stops the build's steps that no other build needs; restart queues a failed or
//! cancelled build again, clearing its steps' failures.

use clap::Args;
use drover_proto::v1::build_service_client::BuildServiceClient;
use drover_proto::v1::{CancelRequest, RestartRequest};
use error_context::{Classify, Severity, WithContext};

use crate::call::CallError;
use crate::connection::{ConnectError, ConnectionArgs};
use crate::exit::{Exit, ExitStatus};

/// Arguments naming one build.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The build's id.
    build: i64,
    /// Where the runner is.
    #[command(flatten)]
    connection: ConnectionArgs,
}

/// Why a build could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    /// The runner cannot be reached.
    #[error("reaching the runner")]
    Connect(#[from] ConnectError),
    /// The call failed.
    #[error(transparent)]
    Call(#[from] CallError),
}

impl ExitStatus for ManageError {
    fn exit(&self) -> Exit {
        match self {
            Self::Connect(error) => error.exit(),
            Self::Call(error) => error.exit(),
        }
    }
}

impl Classify for ManageError {
    fn severity(&self) -> Severity {
        match self {
            Self::Connect(error) => error.severity(),
            Self::Call(error) => error.severity(),
        }
    }
}

/// Runs `drover cancel`.
pub async fn cancel(args: BuildArgs) -> Result<(), WithContext<ManageError>> {
    let mut client =
        BuildServiceClient::new(args.connection.connect().await.map_err(ManageError::from)?);
    let answer = client
        .cancel(CancelRequest {
            build_id: args.build,
        })
        .await
        .map_err(|status| ManageError::from(CallError::from(status)))?
        .into_inner();
    if answer.already_ended {
        eprintln!(
            "build {} had already ended {}: nothing to cancel",
            args.build,
            crate::inspect::status_name(answer.status())
        );
    } else {
        eprintln!("build {} cancelled", args.build);
    }
    Ok(())
}

/// `drover restart` arguments.
#[derive(Debug, Args)]
pub struct RestartArgs {
    /// The build, and where the runner is.
    #[command(flatten)]
    build: BuildArgs,
    /// Also queue again the builds that ended because a step failed in this one (their
    /// dependency failed, or they were cached failures of it).
    #[arg(long)]
    dependents: bool,
}

/// Runs `drover restart`.
pub async fn restart(args: RestartArgs) -> Result<(), WithContext<ManageError>> {
    let RestartArgs { build, dependents } = args;
    let mut client = BuildServiceClient::new(
        build
            .connection
            .connect()
            .await
            .map_err(ManageError::from)?,
    );
    let answer = client
        .restart(RestartRequest {
            build_id: build.build,
            dependents,
        })
        .await
        .map_err(|status| ManageError::from(CallError::from(status)))?
        .into_inner();
    eprintln!("build {} queued again", build.build);
    for dependent in answer.dependents {
        eprintln!(
            "build {dependent} queued again: it ended because of build {}",
            build.build
        );
    }
    Ok(())
}
