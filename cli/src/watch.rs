//! Following builds until they end: `drover submit --watch`, `drover build` and `drover watch`
//! show each build's progress and its end (with the end of the failing step's log), wait for an
//! unreachable runner to come back, and keep watching a keep-going build until the steps it
//! kept have run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Args;
use drover_proto::v1::build_service_client::BuildServiceClient;
use drover_proto::v1::watch_event::Event as Kind;
use drover_proto::v1::{
    BuildPhase, GetLogRequest, GetRequest, GetResponse, StepStatus, WatchEvent, WatchRequest,
};
use error_context::WithContext;
use futures_util::StreamExt as _;
use futures_util::stream::{BoxStream, SelectAll};
use tonic::transport::Channel;

use crate::call::CallError;
use crate::connection::ConnectionArgs;
use crate::progress::{self, Progress};
use crate::submit::{SubmitArgs, SubmitError};

/// How often a keep-going build that ended is looked at again while steps it kept still run.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How long `--watch` waits for an unreachable runner to come back (a restart, an upgrade)
/// before it gives up.
const UNREACHABLE_BUDGET: Duration = Duration::from_mins(10);

/// `drover watch` arguments.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The builds to follow.
    #[arg(required = true)]
    builds: Vec<i64>,
    /// Where the runner is.
    #[command(flatten)]
    connection: ConnectionArgs,
}

/// Runs `drover submit`: submits, then with `--watch` follows the builds to their end.
pub async fn submit(args: SubmitArgs) -> Result<(), WithContext<SubmitError>> {
    let (mut client, builds) = crate::submit::submit_target(&args.target).await?;
    if args.watch {
        print_outputs(&watch(&mut client, &builds).await?);
    } else {
        for id in &builds {
            println!("{id}");
        }
    }
    Ok(())
}

/// Runs `drover watch`: follows builds queued earlier (after a Ctrl-C, or from another shell) as
/// `submit --watch` does.
pub async fn run(args: WatchArgs) -> Result<(), WithContext<SubmitError>> {
    let channel = args.connection.connect().await.map_err(SubmitError::from)?;
    let mut client = BuildServiceClient::new(channel);
    print_outputs(&watch(&mut client, &args.builds).await?);
    Ok(())
}

/// Prints `output path` lines, build by build.
pub fn print_outputs(built: &[(i64, BTreeMap<String, String>)]) {
    for (_, outputs) in built {
        for (output, path) in outputs {
            println!("{output} {path}");
        }
    }
}

/// Lines of a failed build's log shown when it ends.
const LOG_TAIL_LINES: usize = 20;

/// The last lines of the log of the step that failed a build (or its top-level step), if the
/// runner has one.
async fn log_tail(
    client: &mut BuildServiceClient<Channel>,
    build: &drover_proto::v1::GetResponse,
) -> Option<(String, Vec<String>)> {
    let step = crate::inspect::chosen_step(build);
    let log = client
        .get_log(GetLogRequest {
            drv_path: step.clone(),
        })
        .await
        .ok()?
        .into_inner()
        .log;
    let text = String::from_utf8_lossy(&log);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..]
        .iter()
        .map(|line| (*line).to_owned())
        .collect();
    Some((step, tail))
}

/// Waits for every build to end, showing their progress and each one's end (with the end of the
/// failing step's log); returns each build's outputs, in the order of `builds`, if all succeeded.
pub async fn watch(
    client: &mut BuildServiceClient<Channel>,
    builds: &[i64],
) -> Result<Vec<(i64, BTreeMap<String, String>)>, SubmitError> {
    tokio::select! {
        watched = watch_until_ended(client, builds) => watched,
        // The builds go on on the farm; the error says how to stop or follow them.
        _ = tokio::signal::ctrl_c() => Err(SubmitError::Interrupted(builds.to_vec())),
    }
}

/// What one build's `Watch` stream said.
enum Followed {
    /// The stream opened (the runner answers).
    Opened,
    /// An event of the build.
    Event(Box<WatchEvent>),
    /// The stream ended: the build has ended.
    Ended,
    /// The stream failed.
    Lost(tonic::Status),
}

/// Follows build `id` with `Watch`, after `delay`: each item names the build.
fn follow(
    client: &BuildServiceClient<Channel>,
    id: i64,
    delay: Duration,
) -> BoxStream<'static, (i64, Followed)> {
    enum Stage {
        Start(BuildServiceClient<Channel>),
        Open(tonic::Streaming<WatchEvent>),
        Done,
    }
    futures_util::stream::unfold(Stage::Start(client.clone()), move |stage| async move {
        let (said, next) = match stage {
            Stage::Start(mut client) => {
                tokio::time::sleep(delay).await;
                match client.watch(WatchRequest { build_id: id }).await {
                    Ok(stream) => (Followed::Opened, Stage::Open(stream.into_inner())),
                    Err(status) => (Followed::Lost(status), Stage::Done),
                }
            }
            Stage::Open(mut stream) => match stream.message().await {
                Ok(Some(event)) => (Followed::Event(Box::new(event)), Stage::Open(stream)),
                Ok(None) => (Followed::Ended, Stage::Done),
                Err(status) => (Followed::Lost(status), Stage::Done),
            },
            Stage::Done => return None,
        };
        Some(((id, said), next))
    })
    .boxed()
}

/// Applies one `Watch` event to what is known of a build.
fn apply(build: &mut GetResponse, event: WatchEvent) {
    match event.event {
        Some(Kind::State(state)) => *build = state,
        Some(Kind::Step(step)) => match build
            .steps
            .iter_mut()
            .find(|known| known.step_id == step.step_id)
        {
            Some(known) => *known = step,
            None => build.steps.push(step),
        },
        Some(Kind::Build(update)) => {
            build.status = update.status;
            build.phase = update.phase;
            build.failure_reason = update.failure_reason;
        }
        Some(Kind::Estimate(estimate)) => build.estimated_end_ms = estimate.estimated_end_ms,
        Some(Kind::Heartbeat(_)) | None => {}
    }
}

/// How often the progress is drawn again while no event comes, so its clock moves.
const CLOCK_TICK: Duration = Duration::from_secs(1);

/// How long a lost `Watch` stream waits before it is opened again.
const REOPEN_DELAY: Duration = Duration::from_secs(1);

async fn watch_until_ended(
    client: &mut BuildServiceClient<Channel>,
    builds: &[i64],
) -> Result<Vec<(i64, BTreeMap<String, String>)>, SubmitError> {
    let mut followed = SelectAll::new();
    let mut known: BTreeMap<i64, GetResponse> = BTreeMap::new();
    for &id in builds {
        followed.push(follow(client, id, Duration::ZERO));
    }
    let mut failed = Vec::new();
    let mut succeeded = BTreeMap::new();
    let mut progress = Progress::on_stderr();
    let started = Instant::now();
    // Since when the runner has been unreachable, and whether the user was told.
    let mut lost: Option<Instant> = None;
    let mut told = false;
    loop {
        // Between events the clock of each build still shown keeps moving.
        let Ok(next) = tokio::time::timeout(CLOCK_TICK, followed.next()).await else {
            for build in known.values().filter(|build| !build.phase().is_terminal()) {
                progress.update(build, started.elapsed());
            }
            continue;
        };
        let Some((id, said)) = next else {
            break;
        };
        match said {
            Followed::Opened => {
                if lost.take().is_some() && told {
                    progress.clear();
                    eprintln!("the runner is back");
                    told = false;
                }
            }
            Followed::Event(event) => {
                let build = known.entry(id).or_default();
                apply(build, *event);
                if build.build_id == id {
                    progress.update(build, started.elapsed());
                }
            }
            Followed::Lost(status) => match CallError::from(status) {
                // The builds are safe in the runner's database: wait for it to come back.
                CallError::Unreachable(status) | CallError::Refused(status)
                    if is_unavailable(&status)
                        && lost.get_or_insert_with(Instant::now).elapsed() < UNREACHABLE_BUDGET =>
                {
                    if !told {
                        progress.clear();
                        eprintln!(
                            "lost the runner ({}); still waiting for it to come back",
                            status.message()
                        );
                        told = true;
                    }
                    followed.push(follow(client, id, REOPEN_DELAY));
                }
                error => return Err(error.into()),
            },
            Followed::Ended => {
                let build = client
                    .get(GetRequest { build_id: id })
                    .await
                    .map_err(CallError::from)?
                    .into_inner();
                // A keep-going build that ended still runs the steps it kept, as `nix-build -k`
                // waits for them: its stream is opened again, which answers its state.
                if !build.phase().is_terminal() || still_building(&build) {
                    progress.update(&build, started.elapsed());
                    followed.push(follow(client, id, POLL_INTERVAL));
                    continue;
                }
                progress.clear();
                progress.forget(id);
                known.remove(&id);
                let name = crate::inspect::status_name(build.status());
                let label = progress::label(&build);
                if build.phase() == BuildPhase::Succeeded {
                    eprintln!("{label} succeeded");
                    succeeded.insert(id, build.outputs.into_iter().collect::<BTreeMap<_, _>>());
                } else {
                    eprintln!("{label} ended {name}: {}", build.failure_reason);
                    if let Some((step, tail)) = log_tail(client, &build).await {
                        eprintln!("last lines of the log of {step}:");
                        for line in tail {
                            eprintln!("  | {line}");
                        }
                    }
                    failed.push(id);
                }
            }
        }
    }
    if failed.is_empty() {
        Ok(builds
            .iter()
            .filter_map(|id| Some((*id, succeeded.remove(id)?)))
            .collect())
    } else {
        Err(SubmitError::BuildsFailed {
            failed,
            total: builds.len(),
        })
    }
}

/// Whether a failed call means the runner is out of reach or going away (a restart, an
/// upgrade), not that it refused.
fn is_unavailable(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable || std::error::Error::source(status).is_some()
}

/// Whether a keep-going build still runs, or will run, steps it kept after it failed.
fn still_building(build: &GetResponse) -> bool {
    build.keep_going
        && build.steps.iter().any(|step| {
            matches!(
                step.typed_status(),
                StepStatus::Waiting | StepStatus::Runnable | StepStatus::Running
            )
        })
}
