//! The read commands: `drover status ID`, `drover list` and `drover logs`, each printing plain
//! lines for people or, with `--json`, one JSON document for scripts.

use std::io::Write as _;
use std::time::Duration;

use clap::Args;
use drover_proto::v1::build_service_client::BuildServiceClient;
use drover_proto::v1::log_event::Event as LogKind;
use drover_proto::v1::{
    BuildPhase, BuildStatus, BuildSummary, FollowLogRequest, GetLogRequest, GetRequest,
    GetResponse, ListRequest, StepState, StepStatus,
};
use error_context::{Classify, Severity, WithContext};
use serde_json::json;
use tonic::transport::Channel;

use crate::call::CallError;
use crate::connection::{ConnectError, ConnectionArgs};
use crate::exit::{Exit, ExitStatus};
use crate::times;

/// Why a read command failed.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The runner cannot be reached.
    #[error("reaching the runner")]
    Connect(#[from] ConnectError),
    /// The call failed.
    #[error(transparent)]
    Call(#[from] CallError),
    /// The build has no step matching the one asked for.
    #[error("build {build} has no step matching {wanted:?}")]
    NoSuchStep {
        /// The build.
        build: i64,
        /// What was asked for.
        wanted: String,
    },
    /// Several steps of the build match the one asked for.
    #[error("build {build} has several steps matching {wanted:?}; name one:\n  {}", candidates.join("\n  "))]
    AmbiguousStep {
        /// The build.
        build: i64,
        /// What was asked for.
        wanted: String,
        /// The steps that match.
        candidates: Vec<String>,
    },
    /// The followed step failed.
    #[error("{drv_path} failed: {reason}")]
    StepFailed {
        /// The step.
        drv_path: String,
        /// Why.
        reason: String,
    },
    /// The followed step ended without being built.
    #[error("{drv_path} ended {status} without being built")]
    StepEnded {
        /// The step.
        drv_path: String,
        /// How it ended.
        status: String,
    },
    /// A status name is not one `drover list --status` knows.
    #[error(
        "unknown status {0:?}: use queued, running, succeeded, failed, dep_failed, cancelled or cached_failure"
    )]
    UnknownStatus(String),
    /// Writing to stdout failed.
    #[error("writing the output")]
    Output(#[source] std::io::Error),
}

impl ExitStatus for InspectError {
    fn exit(&self) -> Exit {
        match self {
            Self::Connect(error) => error.exit(),
            Self::Call(error) => error.exit(),
            Self::NoSuchStep { .. } | Self::AmbiguousStep { .. } | Self::UnknownStatus(_) => {
                Exit::Usage
            }
            Self::StepFailed { .. } | Self::StepEnded { .. } | Self::Output(_) => Exit::Failed,
        }
    }
}

impl Classify for InspectError {
    fn severity(&self) -> Severity {
        match self {
            Self::Connect(error) => error.severity(),
            Self::Call(error) => error.severity(),
            Self::NoSuchStep { .. } | Self::AmbiguousStep { .. } | Self::UnknownStatus(_) => {
                Severity::Reject
            }
            Self::StepFailed { .. } | Self::StepEnded { .. } => Severity::Step,
            Self::Output(_) => Severity::Fatal,
        }
    }
}

/// `drover status` arguments.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The build's id.
    build: i64,
    /// Print one JSON document.
    #[arg(long)]
    json: bool,
    /// Where the runner is.
    #[command(flatten)]
    connection: ConnectionArgs,
}

/// `drover list` arguments.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only builds with this status (repeatable).
    #[arg(long = "status", value_name = "STATUS")]
    statuses: Vec<String>,
    /// Only builds with this metadata (repeatable `key=value`).
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = crate::meta::parse_meta)]
    metadata: Vec<(String, String)>,
    /// At most this many builds, newest first (1 to 1000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: u32,
    /// Print one JSON document.
    #[arg(long)]
    json: bool,
    /// Where the runner is.
    #[command(flatten)]
    connection: ConnectionArgs,
}

/// `drover logs` arguments.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The build's id.
    build: i64,
    /// The step: any part of its derivation path (default: the failed step, else a running
    /// one, else the top-level one).
    step: Option<String>,
    /// Follow the log while the step runs, until it ends.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Where the runner is.
    #[command(flatten)]
    connection: ConnectionArgs,
}

async fn client(connection: &ConnectionArgs) -> Result<BuildServiceClient<Channel>, InspectError> {
    Ok(BuildServiceClient::new(connection.connect().await?))
}

async fn get(
    client: &mut BuildServiceClient<Channel>,
    build: i64,
) -> Result<GetResponse, InspectError> {
    Ok(client
        .get(GetRequest { build_id: build })
        .await
        .map_err(call)?
        .into_inner())
}

fn call(status: tonic::Status) -> InspectError {
    InspectError::Call(CallError::from(status))
}

/// The name of a status as the database and the CLI spell it.
pub fn status_name(status: BuildStatus) -> String {
    status
        .as_str_name()
        .trim_start_matches("BUILD_STATUS_")
        .to_lowercase()
}

fn print(text: &str) -> Result<(), InspectError> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}").map_err(InspectError::Output)
}

/// The name of a phase as the JSON documents spell it.
fn phase_name(phase: BuildPhase) -> String {
    phase
        .as_str_name()
        .trim_start_matches("BUILD_PHASE_")
        .to_lowercase()
}

fn step_json(step: &StepState) -> serde_json::Value {
    json!({
        "step_id": step.step_id,
        "drv_path": step.drv_path,
        "status": step.status_label(),
        "waiting_reason": step.waiting_reason,
        "builder": step.builder,
        "failure_reason": step.failure_reason,
        "started_at_ms": step.started_at_ms,
        "finished_at_ms": step.finished_at_ms,
    })
}

/// A build's state as one JSON document.
#[must_use]
pub fn build_json(build: &GetResponse) -> serde_json::Value {
    json!({
        "build_id": build.build_id,
        "status": status_name(build.status()),
        "phase": phase_name(build.phase()),
        "submitted_at_ms": build.submitted_at_ms,
        "finished_at_ms": build.finished_at_ms,
        "estimated_end_ms": build.estimated_end_ms,
        "top_drv_path": build.top_drv_path,
        "metadata": build.metadata,
        "failure_reason": build.failure_reason,
        "outputs": build.outputs,
        "steps": build.steps.iter().map(step_json).collect::<Vec<_>>(),
    })
}

/// One line about a step, as `drover status` prints it: its status and path, the builder of its
/// latest attempt and how long that ran (or runs), and why it waits or failed.
#[must_use]
pub fn step_line(step: &StepState) -> String {
    let mut parts = vec![format!("  {} {}", step.status_label(), step.drv_path)];
    if !step.builder.is_empty() {
        parts.push(format!("on {}", step.builder));
    }
    if step.started_at_ms != 0 {
        let ran = times::between(step.started_at_ms, step.finished_at_ms);
        parts.push(if step.finished_at_ms == 0 {
            format!("for {ran}")
        } else {
            format!("in {ran}")
        });
    }
    let mut line = parts.join(" ");
    if let Some(why) = [&step.waiting_reason, &step.failure_reason]
        .into_iter()
        .find(|text| !text.is_empty())
    {
        line = format!("{line}: {why}");
    }
    line
}

/// Runs `drover status`.
pub async fn status(args: StatusArgs) -> Result<(), WithContext<InspectError>> {
    let mut client = client(&args.connection).await?;
    let build = get(&mut client, args.build).await?;
    if args.json {
        print(&build_json(&build).to_string())?;
        return Ok(());
    }
    let done = build
        .steps
        .iter()
        .filter(|step| step.typed_status() == StepStatus::Succeeded)
        .count();
    print(&format!(
        "build {}: {} ({} of {} steps done)\n  top: {}\n  queued {}, {} {}",
        build.build_id,
        status_name(build.status()),
        done,
        build.steps.len(),
        build.top_drv_path,
        times::instant(build.submitted_at_ms),
        if build.finished_at_ms == 0 {
            "waiting or running for"
        } else {
            "ended after"
        },
        times::between(build.submitted_at_ms, build.finished_at_ms),
    ))?;
    if build.estimated_end_ms > 0 {
        print(&format!(
            "  predicted to end {} (in {})",
            times::instant(build.estimated_end_ms),
            times::between(times::now_ms(), build.estimated_end_ms)
        ))?;
    }
    if !build.failure_reason.is_empty() {
        print(&format!("  why: {}", build.failure_reason))?;
    }
    for step in build
        .steps
        .iter()
        .filter(|step| step.typed_status() == StepStatus::Failed)
    {
        let name = derivation_name(&step.drv_path).unwrap_or(&step.drv_path);
        print(&format!(
            "  failed step: {}; its log: drover logs {} {name}",
            step.drv_path, build.build_id
        ))?;
    }
    for (name, path) in &build.outputs {
        print(&format!("  output {name}: {path}"))?;
    }
    for step in build
        .steps
        .iter()
        .filter(|step| step.typed_status() != StepStatus::Succeeded)
    {
        print(&step_line(step))?;
    }
    Ok(())
}

fn summary_json(build: &BuildSummary) -> serde_json::Value {
    json!({
        "build_id": build.build_id,
        "status": status_name(build.status()),
        "phase": phase_name(build.phase()),
        "top_drv_path": build.top_drv_path,
        "metadata": build.metadata,
        "submitted_at_ms": build.submitted_at_ms,
        "finished_at_ms": build.finished_at_ms,
        "failure_reason": build.failure_reason,
    })
}

/// Runs `drover list`.
pub async fn list(args: ListArgs) -> Result<(), WithContext<InspectError>> {
    let statuses = args
        .statuses
        .iter()
        .map(|name| {
            BuildStatus::from_str_name(&format!("BUILD_STATUS_{}", name.to_uppercase()))
                .filter(|status| *status != BuildStatus::Unknown)
                .map(i32::from)
                .ok_or_else(|| InspectError::UnknownStatus(name.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut client = client(&args.connection).await?;
    let builds = client
        .list(ListRequest {
            statuses,
            metadata: args.metadata.into_iter().collect(),
            page_size: args.limit,
            ..ListRequest::default()
        })
        .await
        .map_err(call)?
        .into_inner()
        .builds;
    if args.json {
        let builds: Vec<_> = builds.iter().map(summary_json).collect();
        print(&serde_json::Value::Array(builds).to_string())?;
        return Ok(());
    }
    for build in &builds {
        print(&format!(
            "{}\t{}\t{}\t{}\t{}",
            build.build_id,
            status_name(build.status()),
            times::instant(build.submitted_at_ms),
            times::between(build.submitted_at_ms, build.finished_at_ms),
            build.top_drv_path
        ))?;
    }
    Ok(())
}

/// The step of `build` that `wanted` names: its `.drv` path, its name (`hello-2.12`, with or
/// without `.drv`), or else a part of its path that only one step has.
pub fn named_step(build: &GetResponse, wanted: &str) -> Result<String, InspectError> {
    let name = wanted.strip_suffix(".drv").unwrap_or(wanted);
    let paths: Vec<&str> = build
        .steps
        .iter()
        .map(|step| step.drv_path.as_str())
        .collect();
    let exact: Vec<&str> = paths
        .iter()
        .copied()
        .filter(|path| *path == wanted || derivation_name(path) == Some(name))
        .collect();
    let candidates = if exact.is_empty() {
        paths
            .into_iter()
            .filter(|path| path.contains(wanted))
            .collect()
    } else {
        exact
    };
    match candidates.as_slice() {
        [] => Err(InspectError::NoSuchStep {
            build: build.build_id,
            wanted: wanted.to_owned(),
        }),
        [one] => Ok((*one).to_owned()),
        several => Err(InspectError::AmbiguousStep {
            build: build.build_id,
            wanted: wanted.to_owned(),
            candidates: several.iter().map(|path| (*path).to_owned()).collect(),
        }),
    }
}

/// The name of a `.drv` path, without its hash and `.drv`.
pub fn derivation_name(path: &str) -> Option<&str> {
    let base = path.rsplit('/').next()?;
    let (_, name) = base.split_once('-')?;
    name.strip_suffix(".drv")
}

/// The step of `build` whose log `drover logs` shows when none is named: the failed one, else a
/// running one, else the top-level one.
pub fn chosen_step(build: &GetResponse) -> String {
    [StepStatus::Failed, StepStatus::Running]
        .iter()
        .find_map(|status| {
            build
                .steps
                .iter()
                .find(|step| step.typed_status() == *status)
        })
        .map_or_else(|| build.top_drv_path.clone(), |step| step.drv_path.clone())
}

/// How long `drover logs -f` waits for a step's result once its log ended.
const RESULT_PATIENCE: Duration = Duration::from_secs(30);
/// How often it looks meanwhile.
const RESULT_POLL: Duration = Duration::from_millis(200);

/// Runs `drover logs`.
pub async fn logs(args: LogsArgs) -> Result<(), WithContext<InspectError>> {
    let mut client = client(&args.connection).await?;
    let build = get(&mut client, args.build).await?;
    let drv_path = match args.step.as_deref() {
        Some(wanted) => named_step(&build, wanted)?,
        None => chosen_step(&build),
    };
    let mut stdout = std::io::stdout().lock();
    if !args.follow {
        let log = client
            .get_log(GetLogRequest {
                drv_path: drv_path.clone(),
            })
            .await
            .map_err(call)?
            .into_inner();
        stdout.write_all(&log.log).map_err(InspectError::Output)?;
        if !log.complete {
            let step = args
                .step
                .as_deref()
                .map(|step| format!(" {step}"))
                .unwrap_or_default();
            eprintln!(
                "drover: this log of {drv_path} is not complete: its step still runs, or its \
                 upload was cut off (`drover logs -f {}{step}` follows a running step)",
                args.build
            );
        }
        return Ok(());
    }
    let mut stream = client
        .follow_log(FollowLogRequest {
            drv_path: drv_path.clone(),
        })
        .await
        .map_err(call)?
        .into_inner();
    while let Some(event) = stream.message().await.map_err(call)? {
        if let Some(LogKind::Data(data)) = event.event {
            stdout.write_all(&data).map_err(InspectError::Output)?;
            stdout.flush().map_err(InspectError::Output)?;
        }
    }
    // The log ended (its upload ends before the step's result is recorded): say how the step
    // did, and exit as it did.
    let mut waited = Duration::ZERO;
    let step = loop {
        let build = get(&mut client, args.build).await?;
        let Some(step) = build
            .steps
            .into_iter()
            .find(|step| step.drv_path == drv_path)
        else {
            return Ok(());
        };
        if step.typed_status() != StepStatus::Running || waited >= RESULT_PATIENCE {
            break step;
        }
        tokio::time::sleep(RESULT_POLL).await;
        waited += RESULT_POLL;
    };
    match step.typed_status() {
        StepStatus::Succeeded => Ok(()),
        StepStatus::Failed => Err(InspectError::StepFailed {
            drv_path,
            reason: step.failure_reason.clone(),
        }
        .into()),
        status if status.is_terminal() => Err(InspectError::StepEnded {
            drv_path,
            status: step.status_label().to_owned(),
        }
        .into()),
        _ => {
            eprintln!(
                "drover: the attempt ended; {drv_path} is {} (`drover logs -f` again follows its next attempt)",
                step.status_label()
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(paths: &[&str]) -> GetResponse {
        GetResponse {
            build_id: 7,
            steps: paths
                .iter()
                .map(|path| StepState {
                    drv_path: format!("/nix/store/{path}"),
                    ..StepState::default()
                })
                .collect(),
            ..GetResponse::default()
        }
    }

    #[test]
    fn a_step_is_named_by_path_name_or_a_part_only_it_has() {
        let hash = |c: char| c.to_string().repeat(32);
        let hello = format!("{}-hello-2.12.drv", hash('a'));
        let doc = format!("{}-hello-2.12-doc.drv", hash('b'));
        let build = build(&[
            &hello,
            &doc,
            &format!("{}-lib-a.drv", hash('c')),
            &format!("{}-lib-b.drv", hash('d')),
        ]);
        let path = |base: &str| format!("/nix/store/{base}");
        for wanted in ["hello-2.12", "hello-2.12.drv", &path(&hello), &hash('a')] {
            assert_eq!(
                named_step(&build, wanted).unwrap(),
                path(&hello),
                "{wanted}"
            );
        }
        assert_eq!(named_step(&build, "doc").unwrap(), path(&doc));
        match named_step(&build, "lib") {
            Err(InspectError::AmbiguousStep { candidates, .. }) => {
                assert_eq!(candidates.len(), 2, "{candidates:?}");
            }
            other => panic!("lib names two steps: {other:?}"),
        }
        assert!(matches!(
            named_step(&build, "gcc"),
            Err(InspectError::NoSuchStep { build: 7, .. })
        ));
    }
}
