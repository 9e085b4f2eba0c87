//! `drover submit`: instantiate an expression (or take a `.drv`), send the runner the
//! derivation's closure and input sources as a build, or, when a file evaluates to several
//! derivations (as a CI job set does), stage their closures in chunks and queue them as one job
//! set, all or none; with `--watch` wait for every build, print the outputs and exit non-zero if
//! any did not succeed. A farm with no room is waited for: the submission is tried again after
//! the delay the runner names, under the same idempotency key.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Args;
use drover_proto::v1::build_service_client::BuildServiceClient;
use drover_proto::v1::{
    DerivationText, Job, SourceNar, StageDerivationsRequest, SubmitJobSetRequest, SubmitRequest,
};
use error_context::{Classify, ResultExt as _, Severity, WithContext};
use nix_primitives::StorePath;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

use crate::call::CallError;
use crate::connection::{ConnectError, ConnectionArgs};
use crate::exit::{Exit, ExitStatus};

/// `drover submit` arguments.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// What to build, and where.
    #[command(flatten)]
    pub target: TargetArgs,
    /// Wait for every build, print their outputs, and exit non-zero unless all succeeded.
    #[arg(long)]
    pub watch: bool,
}

/// What to build and how, and where the runner is: shared by `drover submit` and `drover build`.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// A Nix file to instantiate (each derivation it evaluates to becomes a build of its own),
    /// or a `/nix/store/….drv` path (`drover build` takes `….drv^dev,out` or `^*` for outputs).
    #[arg(required_unless_present = "expr")]
    target: Option<PathBuf>,
    /// A Nix expression to instantiate instead of a file, as `nix-build -E` takes it.
    #[arg(long, short = 'E', value_name = "EXPR", conflicts_with = "target")]
    expr: Option<String>,
    /// The attribute to instantiate.
    #[arg(long, short = 'A')]
    attr: Option<String>,
    /// Passes NAME = EXPR to the file's function, as Nix's `--arg` (repeatable).
    #[arg(long = "arg", num_args = 2, value_names = ["NAME", "EXPR"])]
    args: Vec<String>,
    /// Passes NAME = "VALUE" to the file's function, as Nix's `--argstr` (repeatable).
    #[arg(long = "argstr", num_args = 2, value_names = ["NAME", "VALUE"])]
    argstrs: Vec<String>,
    /// Adds to Nix's search path (`<nixpkgs>`), as Nix's `-I` (repeatable).
    #[arg(short = 'I', value_name = "PATH")]
    include: Vec<String>,
    /// Higher builds are dispatched first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// After a step fails, build everything that can still be built; by default the steps no
    /// other build needs are cancelled.
    #[arg(long)]
    keep_going: bool,
    /// Metadata returned with the build (repeatable `key=value`).
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = crate::meta::parse_meta)]
    metadata: Vec<(String, String)>,
    /// Where the runner is.
    #[command(flatten)]
    connection: ConnectionArgs,
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
    /// A call to the runner failed.
    #[error(transparent)]
    Call(#[from] CallError),
    /// Instantiating gave no derivation.
    #[error("the target evaluates to no derivation")]
    NothingToBuild,
    /// The local Nix daemon does not trust the farm's cache.
    #[error(
        "this Nix ignores the farm's cache {cache} as an untrusted substituter (a multi-user \
         install): add it to `trusted-substituters` and its key to `trusted-public-keys` in \
         /etc/nix/nix.conf (or make your user a `trusted-users` member), restart nix-daemon, \
         and run again"
    )]
    UntrustedCache {
        /// The cache.
        cache: String,
    },
    /// The farm built an output, but it could not be fetched from the farm's cache.
    #[error(
        "the farm built {path}; fetching it from {cache} failed: is DROVER_CACHE_KEY the key \
         the farm signs with? (nix-store said: {said})"
    )]
    Fetch {
        /// The output.
        path: String,
        /// The farm's cache.
        cache: String,
        /// The last line Nix printed.
        said: String,
    },
    /// Ctrl-C while watching: the builds go on.
    #[error(
        "interrupted; {} on the farm: `drover cancel ID` stops one, `drover watch {}` follows \
         again",
        going_on(.0),
        spaced(.0)
    )]
    Interrupted(Vec<i64>),
    /// A derivation has no output of the name asked for.
    #[error("{drv} has no output {output:?}")]
    UnknownOutput {
        /// The derivation.
        drv: String,
        /// The output asked for.
        output: String,
    },
    /// The farm's build of a derivation did not produce the output asked for.
    #[error("the farm's build did not produce {0}")]
    OutputMissing(String),
    /// Builds did not succeed.
    #[error("{} of {total} builds did not succeed: {}", .failed.len(), ids(.failed))]
    BuildsFailed {
        /// The builds that did not.
        failed: Vec<i64>,
        /// How many were watched.
        total: usize,
    },
}

/// "build 3 goes on", "builds 3 4 go on".
fn going_on(builds: &[i64]) -> String {
    match builds {
        [one] => format!("build {one} goes on"),
        _ => format!("builds {} go on", spaced(builds)),
    }
}

/// Build ids separated by spaces, as `drover watch` takes them.
fn spaced(builds: &[i64]) -> String {
    builds
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

fn ids(builds: &[i64]) -> String {
    builds
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl ExitStatus for SubmitError {
    fn exit(&self) -> Exit {
        match self {
            Self::Call(error) => error.exit(),
            Self::Connect(error) => error.exit(),
            Self::Nix { .. } | Self::NotAStorePath(_) | Self::NothingToBuild => Exit::Data,
            Self::UnknownOutput { .. } => Exit::Usage,
            Self::UntrustedCache { .. } | Self::Fetch { .. } => Exit::Config,
            Self::Interrupted(_) => Exit::Interrupted,
            Self::Read { .. }
            | Self::Dump(_)
            | Self::OutputMissing(_)
            | Self::BuildsFailed { .. } => Exit::Failed,
        }
    }
}

impl Classify for SubmitError {
    fn severity(&self) -> Severity {
        match self {
            Self::Call(error) => error.severity(),
            Self::BuildsFailed { .. } => Severity::Step,
            Self::NothingToBuild => Severity::Reject,
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

/// The `.drv` files a target evaluates to, each once, in Nix's order, with their job names.
#[derive(Debug)]
pub struct Instantiated {
    /// The derivations to build.
    pub tops: Vec<StorePath>,
    /// The job each one is, when there are several: its attribute path, else its name.
    jobs: Vec<String>,
}

/// The `.drv` files to build: the target itself, or every derivation instantiating it gives (a
/// file may evaluate to a set or list of them), each once, in Nix's order.
fn derivations(args: &TargetArgs) -> Result<Instantiated, SubmitError> {
    if let Some(target) = &args.target {
        let target = target.to_string_lossy();
        let (path, _) = target.split_once('^').unwrap_or((&target, ""));
        if Path::new(path)
            .extension()
            .is_some_and(|extension| extension == "drv")
        {
            let tops = vec![store_path(path)?];
            let jobs = job_names(&tops, None);
            return Ok(Instantiated { tops, jobs });
        }
    }
    let (target, mut command) = match (&args.expr, &args.target) {
        (Some(expr), _) => (
            crate::attributes::Target::Expression(expr),
            nix_instantiate(args, ["--expr", expr]),
        ),
        (None, Some(target)) => (
            crate::attributes::Target::File(target),
            nix_instantiate(args, [target.as_os_str()]),
        ),
        (None, None) => return Err(SubmitError::NothingToBuild),
    };
    let printed = nix(&mut command)?;
    let printed: Vec<&str> = printed
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    let attribute_paths = (printed.len() > 1)
        .then(|| {
            crate::attributes::paths(target, args.attr.as_deref(), printed.len(), |command| {
                nix_arguments(args, command);
            })
        })
        .flatten();
    let mut seen = BTreeSet::new();
    let mut tops = Vec::new();
    let mut paths = Vec::new();
    for (index, line) in printed.iter().enumerate() {
        let path = store_path(line)?;
        if seen.insert(path.clone()) {
            tops.push(path);
            paths.extend(attribute_paths.as_ref().map(|all| all[index].clone()));
        }
    }
    if tops.is_empty() {
        return Err(SubmitError::NothingToBuild);
    }
    let jobs = if paths.len() == tops.len() {
        paths
    } else {
        job_names(&tops, args.attr.as_deref())
    };
    Ok(Instantiated { tops, jobs })
}

/// `nix-instantiate` of `target` with the caller's attribute and arguments.
fn nix_instantiate<I: AsRef<std::ffi::OsStr>>(
    args: &TargetArgs,
    target: impl IntoIterator<Item = I>,
) -> Command {
    let mut command = Command::new("nix-instantiate");
    command.args(target);
    if let Some(attr) = &args.attr {
        command.args(["--attr", attr]);
    }
    nix_arguments(args, &mut command);
    command
}

/// Adds the caller's `--arg`, `--argstr` and `-I` flags to a Nix command.
fn nix_arguments(args: &TargetArgs, command: &mut Command) {
    for (flag, values) in [("--arg", &args.args), ("--argstr", &args.argstrs)] {
        for pair in values.chunks(2) {
            command.arg(flag).args(pair);
        }
    }
    for path in &args.include {
        command.args(["-I", path]);
    }
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

/// How long `drover submit` keeps retrying a submission the farm has no room for.
const ADMISSION_PATIENCE: Duration = Duration::from_mins(30);

/// A key unique to this submission of `top`, so that retrying it never queues a second build.
fn idempotency_key(top: &StorePath) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{}-{}-{}",
        top.base_name(),
        std::process::id(),
        now.as_nanos()
    )
}

/// Makes a call, and while the farm answers that it has no room (`RESOURCE_EXHAUSTED`), waits as
/// long as it says and makes it again (under the same idempotency key), saying so.
async fn when_admitted<T, Call>(mut call: impl FnMut() -> Call) -> Result<T, tonic::Status>
where
    Call: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let started = Instant::now();
    loop {
        match call().await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status)
                if status.code() == tonic::Code::ResourceExhausted
                    && started.elapsed() < ADMISSION_PATIENCE =>
            {
                let wait = status
                    .get_details_retry_info()
                    .and_then(|info| info.retry_delay)
                    .unwrap_or(Duration::from_secs(30));
                eprintln!(
                    "the farm has no room for this build now ({}); retrying in {} s",
                    status.message(),
                    wait.as_secs()
                );
                tokio::time::sleep(wait).await;
            }
            Err(status) => return Err(status),
        }
    }
}

/// Submits the derivations the target evaluates to: one as a build of its own, several as a job
/// set (queued all or none); returns the client and the build ids, in Nix's order.
pub async fn submit_target(
    args: &TargetArgs,
) -> Result<(BuildServiceClient<Channel>, Vec<i64>), WithContext<SubmitError>> {
    let instantiated = instantiate(args)?;
    submit_tops(args, &instantiated).await
}

/// The outputs a `.drv` target names after `^` (`/nix/store/….drv^dev,out`; `*` for all), as
/// Nix's own command line takes them.
#[must_use]
pub fn requested_outputs(args: &TargetArgs) -> Option<Vec<String>> {
    let target = args.target.as_ref()?.to_string_lossy().into_owned();
    let (_, outputs) = target.split_once('^')?;
    Some(outputs.split(',').map(str::to_owned).collect())
}

/// The `.drv` files the target evaluates to, each once, in Nix's order.
pub fn instantiate(args: &TargetArgs) -> Result<Instantiated, WithContext<SubmitError>> {
    derivations(args).context("instantiating the target")
}

/// Submits `tops` (instantiated from `args`'s target): one as a build of its own, several as a
/// job set.
pub async fn submit_tops(
    args: &TargetArgs,
    instantiated: &Instantiated,
) -> Result<(BuildServiceClient<Channel>, Vec<i64>), WithContext<SubmitError>> {
    let channel = args.connection.connect().await.map_err(SubmitError::from)?;
    let client = BuildServiceClient::new(channel).max_encoding_message_size(256 * 1024 * 1024);
    let builds = match instantiated.tops.as_slice() {
        [top] => vec![submit_one(&client, args, top).await?],
        _ => submit_job_set(&client, args, instantiated).await?,
    };
    Ok((client, builds))
}

/// Submits `top` with its closure as a build of its own.
async fn submit_one(
    client: &BuildServiceClient<Channel>,
    args: &TargetArgs,
    top: &StorePath,
) -> Result<i64, WithContext<SubmitError>> {
    let (derivations, sources) =
        closure(top).with_context(|| format!("reading the derivation closure of {top}"))?;
    let request = SubmitRequest {
        derivations,
        sources,
        top_drv_path: top.to_absolute(),
        priority: args.priority,
        metadata: args.metadata.iter().cloned().collect(),
        keep_going: args.keep_going,
        idempotency_key: idempotency_key(top),
    };
    let id = when_admitted(|| {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.submit(request).await }
    })
    .await
    .map_err(|status| SubmitError::from(CallError::from(status)))
    .with_context(|| format!("submitting {top}"))?
    .build_id;
    eprintln!("build {id} queued: {top}");
    Ok(id)
}

/// Bytes of derivations and sources sent per `StageDerivations` call.
const STAGE_CHUNK_BYTES: usize = 16 * 1024 * 1024;

/// Stages the union of the closures of `tops` in chunks, each derivation and source once, then
/// queues one build per derivation as a job set.
async fn submit_job_set(
    client: &BuildServiceClient<Channel>,
    args: &TargetArgs,
    Instantiated { tops, jobs }: &Instantiated,
) -> Result<Vec<i64>, WithContext<SubmitError>> {
    let mut staged = BTreeSet::new();
    let mut chunk = StageDerivationsRequest::default();
    let mut chunk_bytes = 0;
    for top in tops {
        let (derivations, sources) =
            closure(top).with_context(|| format!("reading the derivation closure of {top}"))?;
        for derivation in derivations {
            if staged.insert(derivation.path.clone()) {
                chunk_bytes += derivation.text.len();
                chunk.derivations.push(derivation);
            }
        }
        for source in sources {
            if staged.insert(source.path.clone()) {
                chunk_bytes += source.nar.len();
                chunk.sources.push(source);
            }
        }
        if chunk_bytes >= STAGE_CHUNK_BYTES {
            stage(client, std::mem::take(&mut chunk)).await?;
            chunk_bytes = 0;
        }
    }
    stage(client, chunk).await?;
    let request = SubmitJobSetRequest {
        jobs: jobs
            .iter()
            .zip(tops)
            .map(|(name, top)| Job {
                name: name.clone(),
                drv_path: top.to_absolute(),
            })
            .collect(),
        priority: args.priority,
        metadata: args.metadata.iter().cloned().collect(),
        keep_going: args.keep_going,
        idempotency_key: idempotency_key(&tops[0]),
        ..SubmitJobSetRequest::default()
    };
    let queued = when_admitted(|| {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.submit_job_set(request).await }
    })
    .await
    .map_err(|status| SubmitError::from(CallError::from(status)))
    .context("submitting the job set")?;
    eprintln!(
        "job set {} queued: {} builds",
        queued.job_set_id,
        queued.builds.len()
    );
    for (build, top) in queued.builds.iter().zip(tops) {
        eprintln!("build {} queued: {top} ({})", build.build_id, build.name);
    }
    Ok(queued.builds.iter().map(|build| build.build_id).collect())
}

/// Sends one chunk of derivations and sources.
async fn stage(
    client: &BuildServiceClient<Channel>,
    chunk: StageDerivationsRequest,
) -> Result<(), WithContext<SubmitError>> {
    if chunk.derivations.is_empty() && chunk.sources.is_empty() {
        return Ok(());
    }
    client
        .clone()
        .stage_derivations(chunk)
        .await
        .map_err(|status| SubmitError::from(CallError::from(status)))
        .context("sending derivations")?;
    Ok(())
}

/// A job name for each top-level derivation when their attribute paths are not known: its name
/// (after `attr`), numbered from the second one on when several derivations share it.
fn job_names(tops: &[StorePath], attr: Option<&str>) -> Vec<String> {
    let mut taken = BTreeSet::new();
    tops.iter()
        .map(|top| {
            let base = top
                .derivation_name()
                .map_or_else(|| top.base_name().to_owned(), str::to_owned);
            let base = match attr {
                Some(attr) => format!("{attr}.{base}"),
                None => base,
            };
            let mut name = base.clone();
            let mut number = 1;
            while !taken.insert(name.clone()) {
                number += 1;
                name = format!("{base}-{number}");
            }
            name
        })
        .collect()
}
