//! The core's vocabulary: the events it takes, the commands it returns, and the plain data both
//! carry. Nothing here knows of tokio, tonic or PostgreSQL; the driver translates.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use nix_primitives::{Hash, IngestionMethod, StorePath};
use uuid::Uuid;

use crate::status::{AttemptStatus, BuildStatus, StepStatus};

/// Step id (the `steps.id` column).
pub type StepId = i64;
/// Build id (the `builds.id` column).
pub type BuildId = i64;
/// One builder connection; a reconnecting builder gets a new one.
pub type SessionId = u64;
/// Attempt id (the `step_attempts.id` column), quoted by builders.
pub type AttemptId = Uuid;

/// What a builder must offer to run a step.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirements {
    /// The derivation's system; `builtin` runs anywhere.
    pub system: String,
    /// Its `requiredSystemFeatures`.
    pub features: BTreeSet<String>,
}

/// What a builder offered at Join.
#[derive(Debug, Clone, PartialEq)]
pub struct Capabilities {
    /// Systems it builds for.
    pub systems: BTreeSet<String>,
    /// Features it offers.
    pub supported_features: BTreeSet<String>,
    /// Features a step must require to run on it.
    pub mandatory_features: BTreeSet<String>,
    /// Steps at once.
    pub max_jobs: u32,
    /// Relative speed; positive and finite (checked at Join).
    pub speed_factor: f64,
}

impl Capabilities {
    /// Whether a step with `requirements` may run here: the system matches (or is `builtin`),
    /// every required feature is offered, and every mandatory feature is required.
    #[must_use]
    pub fn can_run(&self, requirements: &Requirements) -> bool {
        let system =
            requirements.system == "builtin" || self.systems.contains(&requirements.system);
        let features = requirements.features.iter().all(|feature| {
            self.supported_features.contains(feature) || self.mandatory_features.contains(feature)
        });
        let mandatory = self
            .mandatory_features
            .iter()
            .all(|feature| requirements.features.contains(feature));
        system && features && mandatory
    }
}

/// Everything about a step that does not change while it is queued: what to send a builder
/// and what its uploads must match. Shared (`Arc`) between the graph, assignments and the
/// upload checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSpec {
    /// The derivation it builds.
    pub drv_path: StorePath,
    /// Its outputs, name to path.
    pub outputs: BTreeMap<String, StorePath>,
    /// What a builder needs.
    pub requirements: Requirements,
    /// Input sources and the outputs of input derivations it uses; its outputs may refer only
    /// to their closure and to each other.
    pub input_paths: BTreeSet<StorePath>,
    /// For a fixed-output derivation, how its output is hashed and the hash it must have.
    pub fixed: Option<(IngestionMethod, Hash)>,
}

/// One unfinished step of a build's closure, as ingest found it.
#[derive(Debug, Clone)]
pub struct PlannedStep {
    /// Its id.
    pub id: StepId,
    /// What it builds.
    pub spec: Arc<StepSpec>,
    /// Its inputs that were unfinished when ingest read them; each is earlier in the plan.
    pub inputs: Vec<StepId>,
    /// Its row's status when ingest read it.
    pub recorded_status: StepStatus,
    /// Builder losses it has survived so far.
    pub builder_losses: u32,
    /// Infrastructure failures it has survived so far.
    pub infrastructure_failures: u32,
    /// How long it is still held back (`steps.visible_after` in the future), if at all.
    pub visible_in: Option<std::time::Duration>,
}

/// A build joining the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedBuild {
    /// The build.
    pub build: BuildId,
    /// Its own priority (higher first).
    pub priority: i32,
    /// The administrator's global priority, which beats every other order (higher first).
    pub global_priority: i32,
    /// Its top-level step.
    pub top: StepId,
    /// Whether it builds everything it can after a step failed, rather than letting the steps
    /// only it needs be cancelled.
    pub keep_going: bool,
}

/// Builds expanded by ingest, ready to join the graph: one build, or the builds of a job set,
/// which share one list of steps.
#[derive(Debug, Clone)]
pub struct BuildPlan {
    /// The builds.
    pub builds: Vec<PlannedBuild>,
    /// Every unfinished step of their closures, each once, inputs before the steps that use
    /// them.
    pub steps: Vec<PlannedStep>,
    /// Steps of their closures that ingest found done without building (every output already
    /// in a cache) and recorded as succeeded.
    pub available: Vec<StepId>,
    /// How many step completions had been committed before ingest read the step statuses:
    /// completions after that may be missing from the plan, and the core corrects for them.
    pub snapshot: u64,
}

/// How a builder says an attempt ended (the runner converts the wire's outcome at its edge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Built; the outputs are uploaded.
    Succeeded,
    /// The build itself failed: permanent, never retried.
    Failed,
    /// The build exceeded its time or silence limit: permanent.
    TimedOut,
    /// Something other than the build failed (store, disk, transfer): retried.
    InfrastructureFailure,
    /// The build printed more log than its limit allows: permanent.
    LogLimitExceeded,
}

/// A builder's report on one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// How it ended.
    pub outcome: Outcome,
    /// Why, for anything but success; or why the runner refused a claimed success.
    pub message: String,
    /// Outputs of a success (checked against the step and the cache by the session).
    pub outputs: Vec<OutputRecord>,
}

/// One output of a successful attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRecord {
    /// Output name.
    pub name: String,
    /// Output path.
    pub path: String,
    /// NAR hash, `sha256:<nix base32>`.
    pub nar_hash: String,
    /// NAR size in bytes.
    pub nar_size: u64,
}

/// Something the core must react to.
#[derive(Debug, Clone)]
pub enum Event {
    /// Ingest expanded a build.
    BuildPlanned(BuildPlan),
    /// Ingest drained every queued build it knew of; completions up to `snapshot` are visible
    /// to every later plan.
    IngestCaughtUp {
        /// Committed completions when that drain began.
        snapshot: u64,
    },
    /// A builder passed Join.
    BuilderJoined {
        /// Its name, from its certificate.
        name: String,
        /// Its connection.
        session: SessionId,
        /// What it offers.
        capabilities: Capabilities,
        /// Its Nix version.
        nix_version: String,
        /// The attempts it still runs or holds a result of, from an earlier session (of this
        /// runner process or of one before it): re-adopted if they are still wanted.
        held: Vec<AttemptId>,
    },
    /// A builder's session ended.
    BuilderLeft {
        /// The connection that ended.
        session: SessionId,
        /// Why, for the log and the attempts it loses.
        reason: String,
        /// Whether the builder may come back for its attempts.
        departure: Departure,
    },
    /// A builder pinged.
    BuilderPinged {
        /// The connection.
        session: SessionId,
        /// Free bytes on its store's file system, if it knows.
        free_disk_bytes: Option<u64>,
        /// Its memory pressure (PSI "some avg10", percent), if its kernel says.
        memory_pressure_percent: Option<f64>,
    },
    /// A builder is draining: it takes no new work; what it still holds when it leaves goes
    /// back in line without counting as a loss.
    BuilderDraining {
        /// The connection.
        session: SessionId,
    },
    /// An admin drained a builder (it keeps its session and finishes what it runs, but gets no
    /// new work, until enabled) or enabled it.
    SetDrained {
        /// The builder's name.
        name: String,
        /// Drained, or enabled.
        drained: bool,
    },
    /// An admin quarantined a builder (its cool-down and probation follow as after failures)
    /// or lifted its quarantine.
    SetQuarantine {
        /// The builder's name.
        name: String,
        /// Imposed, or lifted.
        quarantined: bool,
        /// Who, for the reason recorded.
        by: String,
        /// When, on the core's clock.
        at: Instant,
    },
    /// An admin set a build's global priority: its steps in line move up now if it is higher
    /// (a lower one applies to steps planned later; see the step graph's note on order).
    SetGlobalPriority {
        /// The build.
        build: BuildId,
        /// Its new global priority.
        priority: i32,
    },
    /// A user cancelled a build: its steps that no other build needs stop.
    CancelBuild {
        /// The build.
        build: BuildId,
        /// Who cancelled it, for the reason recorded.
        by: String,
    },
    /// A user is restarting an ended build: a plan for it may come again.
    RestartBuild {
        /// The build.
        build: BuildId,
    },
    /// A builder reported the end of an attempt (the session checked it owns it).
    StepFinished {
        /// The connection that reported.
        session: SessionId,
        /// The attempt.
        attempt: AttemptId,
        /// What it reported.
        report: Report,
        /// When the report came, on the core's clock.
        at: Instant,
    },
}

/// A durable state change: the driver writes a batch of them in one transaction before it
/// carries out any [`Command::Send`] of the same batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A step's status changed (terminal ones stamp `finished_at`).
    StepStatus {
        /// The step.
        step: StepId,
        /// Its new status.
        status: StepStatus,
        /// Why, for failures.
        reason: Option<String>,
    },
    /// A step failed on its own, and `build` is the oldest build that failed because of it:
    /// later builds that need the step name it as where their cached failure comes from.
    FailureOrigin {
        /// The step.
        step: StepId,
        /// The build.
        build: BuildId,
    },
    /// A step is held back from dispatch for `delay` (a retry's backoff): `visible_after`.
    StepHeld {
        /// The step.
        step: StepId,
        /// For how long, from now.
        delay: std::time::Duration,
    },
    /// A step was requeued without failing; its counters changed.
    StepCounters {
        /// The step.
        step: StepId,
        /// Builder losses so far.
        builder_losses: u32,
        /// Infrastructure failures so far.
        infrastructure_failures: u32,
    },
    /// An attempt was dispatched; its step runs.
    AttemptStarted {
        /// The attempt.
        attempt: AttemptId,
        /// Its step.
        step: StepId,
        /// The builder's name.
        builder: String,
    },
    /// An attempt ended.
    AttemptEnded {
        /// The attempt.
        attempt: AttemptId,
        /// How.
        status: AttemptStatus,
        /// The builder's or the runner's reason, for anything but success.
        message: Option<String>,
    },
    /// A package's learned duration moved (a step of it succeeded).
    DurationLearned(Learned),
    /// A step's outputs, recorded with its success.
    Outputs {
        /// The step.
        step: StepId,
        /// Its outputs.
        outputs: Vec<OutputRecord>,
    },
    /// A build's first step started: the build runs from now on. (A build is `running` from
    /// its first step's start until it ends; the core decides it, and storage and Watch follow.)
    BuildStarted {
        /// The build.
        build: BuildId,
    },
    /// A build ended.
    BuildFinished {
        /// The build.
        build: BuildId,
        /// Its terminal status.
        status: BuildStatus,
        /// Why, for anything but success.
        reason: Option<String>,
    },
    /// A builder joined.
    MachineJoined {
        /// Its name.
        name: String,
        /// What it offered.
        capabilities: Capabilities,
        /// Its Nix version.
        nix_version: String,
    },
    /// A builder pinged.
    MachinePinged {
        /// Its name.
        name: String,
        /// Free bytes on its store's file system, if it knows.
        free_disk_bytes: Option<u64>,
        /// Whether it is below the farm's free disk floor (and gets no new work).
        below_disk_floor: bool,
        /// Its memory pressure, if its kernel says.
        memory_pressure_percent: Option<f64>,
        /// Whether that is over the farm's limit (and it gets no new work).
        under_memory_pressure: bool,
    },
    /// A builder's last session ended.
    MachineLeft {
        /// Its name.
        name: String,
    },
    /// An admin drained or enabled a builder.
    MachineDrained {
        /// Its name.
        name: String,
        /// Drained, or enabled.
        drained: bool,
    },
    /// A builder's quarantine began (with why and its cool-down) or was lifted (`None`).
    MachineQuarantined {
        /// Its name.
        name: String,
        /// The quarantine begun, if it began.
        quarantine: Option<Imposed>,
    },
}

/// A quarantine that began, for the driver to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imposed {
    /// Why.
    pub reason: String,
    /// Until its probation begins.
    pub cool_down: std::time::Duration,
}

/// A step given to a builder.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// The attempt id the builder quotes.
    pub attempt: AttemptId,
    /// The step.
    pub step: StepId,
    /// What to build.
    pub spec: Arc<StepSpec>,
}

/// A message for one builder session.
#[derive(Debug, Clone, PartialEq)]
pub enum ToBuilder {
    /// The builder is in: its re-adopted attempts are registered, so it may report on them.
    Joined,
    /// Build this.
    Build(Assignment),
    /// Stop this attempt; its result is no longer wanted.
    Abort {
        /// The attempt.
        attempt: AttemptId,
        /// Why.
        reason: String,
    },
    /// The attempt's result is durable; the builder may forget it.
    ResultRecorded {
        /// The attempt.
        attempt: AttemptId,
    },
}

/// What the core asks the driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Persist a change (before any send of the same batch).
    Persist(Change),
    /// Send a message to a builder session (after the batch committed).
    Send {
        /// The session.
        session: SessionId,
        /// The message.
        message: ToBuilder,
    },
    /// A session took over an attempt it holds (the driver lets it upload and report for it);
    /// nothing is sent and nothing changes in the database: the attempt was running already.
    Adopt {
        /// The session that holds it now.
        session: SessionId,
        /// The attempt and its step.
        assignment: Assignment,
    },
    /// End a builder session (it reconnects and joins afresh).
    EndSession {
        /// The session.
        session: SessionId,
        /// Why.
        reason: String,
    },
}

/// Index of a class of runnable steps.
pub type ClassId = usize;

/// A running attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Its step.
    pub step: StepId,
    /// The session it was given to.
    pub session: SessionId,
    /// When it was dispatched, on the core's clock (for one adopted from a previous runner
    /// process: when this process found it).
    pub started: Instant,
    /// Whether `started` is its dispatch, so its duration can be learned from.
    pub measured: bool,
}

/// How a builder's session ended, which decides what becomes of the attempts it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure {
    /// Its connection failed: the builder is probably still building and dialling again, so
    /// its attempts wait for it for the rejoin grace before they are requeued.
    ConnectionLost,
    /// Anything else (it closed the tunnel, went silent past the liveness timeout, misbehaved,
    /// or the runner ended the session): its attempts are requeued at once.
    Ended,
}

/// A package's name in the history, with its system.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DurationKey {
    /// The derivation's name without its version.
    pub package: String,
    /// The system it builds for.
    pub system: String,
}

/// A package's learned duration, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    /// Whose.
    pub key: DurationKey,
    /// Successes seen.
    pub samples: u32,
    /// The estimate, in milliseconds on a builder of speed factor 1.
    pub mean_ms: u64,
}
