//! The scheduler core: every decision the scheduler makes, as a pure function of its state and
//! one event. No async, no database, no gRPC (this crate depends on none of them, so the
//! compiler keeps it that way): events in ([`Event`]), commands out
//! ([`Command`]): durable changes for the driver to commit in one batch, then messages for
//! builder sessions. Time comes in as an argument, so tests control it.
//!
//! The core owns the step graph, the runnable index and the builders' slots ([`Placement`]),
//! and the running attempts (one map). [`Core::dispatch`] gives free slots the best runnable
//! steps; the driver calls it once per batch of events, and at [`Core::next_wakeup`], when a
//! step held back by a retry's backoff ([`backoff`]) is due.

mod backoff;
pub mod durations;
pub mod fleet;
pub mod gauges;
mod graph;
pub mod history;
mod orphans;
mod placement;
pub mod retention;
pub mod status;
mod types;
mod unsupported;

#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use status::{AttemptStatus, BuildStatus, StepStatus};

pub use backoff::RetryPolicy;
pub use graph::{Order, StepGraph, StepNode, StepState};
pub use placement::{Builder, Placement};
pub use types::{
    Assignment, Attempt, AttemptId, BuildId, BuildPlan, Capabilities, Change, ClassId, Command,
    Departure, DurationKey, Event, Imposed, Learned, Outcome, OutputRecord, PlannedBuild,
    PlannedStep, Report, Requirements, SessionId, StepId, StepSpec, ToBuilder,
};

use backoff::Held;
use durations::Durations;
use fleet::{Fleet, Hold, Quarantine, QuarantinePolicy, StoredStanding};
use orphans::{Cause, Orphan, Orphans, Wait};
use unsupported::Unsupported;

/// The core's limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoreLimits {
    /// Builder losses a step survives; one more ends it `cancelled` with the reason.
    pub max_builder_losses: u32,
    /// How infrastructure failures are retried.
    pub retry: RetryPolicy,
    /// How long runnable steps wait for a connected builder that can run them before they end
    /// `unsupported`.
    pub unsupported_grace: std::time::Duration,
    /// How long attempts a previous runner process left running wait for their builders to
    /// reconnect and claim them before their steps are requeued.
    pub readoption_grace: std::time::Duration,
    /// How long the attempts of a builder whose connection failed wait for it to come back
    /// before they are requeued; zero requeues them at once.
    pub rejoin_grace: std::time::Duration,
    /// Whether runnable steps are ordered by learned durations; off, by step count.
    pub learned_durations: bool,
    /// When builders are quarantined.
    pub quarantine: QuarantinePolicy,
    /// A builder whose latest ping reports less free disk than this gets no new work until one
    /// reports more; 0: no floor.
    pub min_free_disk_bytes: u64,
    /// A builder whose latest ping reports more memory pressure than this (percent) gets no
    /// new work until one reports less; 0: no limit.
    pub max_memory_pressure_percent: f64,
}

/// Why an attempt ended without a result of the build's own: which counter it moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Requeue {
    /// The builder left or went silent mid-step.
    BuilderLost,
    /// The builder reported a failure that was not the build's.
    InfrastructureFailure,
    /// The builder drained and left with the attempt unfinished: handed back, nobody's fault.
    HandedBack,
}

/// How a step ended, as remembered for builds ingested while it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    Succeeded,
    Failed,
}

/// Steps finished since ingest last read step statuses. Ingest runs beside the core, so a plan
/// may call a step unfinished that the core finished (and the driver committed) after ingest
/// read it; without this the step would be built again, or a build would wait on a failure.
#[derive(Debug, Default)]
struct RecentFinishes {
    /// Step completions recorded so far; the driver publishes the value it has committed.
    count: u64,
    by_step: HashMap<StepId, (u64, Finish)>,
    in_order: VecDeque<(u64, StepId)>,
}

impl RecentFinishes {
    fn record(&mut self, step: StepId, finish: Finish) {
        self.count += 1;
        self.by_step.insert(step, (self.count, finish));
        self.in_order.push_back((self.count, step));
    }

    /// How `step` finished after `snapshot`, if it did.
    fn after(&self, snapshot: u64, step: StepId) -> Option<Finish> {
        self.by_step
            .get(&step)
            .and_then(|(seq, finish)| (*seq > snapshot).then_some(*finish))
    }

    /// Forgets finishes every later plan sees in the database.
    fn prune(&mut self, snapshot: u64) {
        while let Some((seq, step)) = self.in_order.front().copied() {
            if seq > snapshot {
                break;
            }
            self.in_order.pop_front();
            if self.by_step.get(&step).is_some_and(|(s, _)| *s == seq) {
                self.by_step.remove(&step);
            }
        }
    }
}

/// The scheduler's state.
pub struct Core {
    graph: StepGraph,
    placement: Placement,
    attempts: HashMap<AttemptId, Attempt>,
    by_session: HashMap<SessionId, BTreeSet<AttemptId>>,
    recent: RecentFinishes,
    /// Builds cancelled before ingest planned them: a late plan for one is ignored.
    cancelled: HashSet<BuildId>,
    /// Global priorities set for builds not planned yet: their plan may have read the row
    /// before it changed.
    raised: HashMap<BuildId, i32>,
    /// Attempts of cancelled steps, told to stop: they hold their builder's slot until its
    /// result comes (whatever it says) or the builder leaves.
    stopping: HashSet<AttemptId>,
    held: Held,
    unsupported: Unsupported,
    orphans: Orphans,
    durations: Durations,
    fleet: Fleet,
    limits: CoreLimits,
    new_attempt_id: Box<dyn FnMut() -> AttemptId + Send + Sync>,
    commands: Vec<Command>,
}

impl Core {
    /// An empty core; `new_attempt_id` makes attempt ids (random in production, counted in
    /// tests).
    #[must_use]
    pub fn new(
        limits: CoreLimits,
        new_attempt_id: Box<dyn FnMut() -> AttemptId + Send + Sync>,
    ) -> Self {
        Self {
            graph: StepGraph::default(),
            placement: Placement::default(),
            attempts: HashMap::new(),
            by_session: HashMap::new(),
            recent: RecentFinishes::default(),
            cancelled: HashSet::new(),
            raised: HashMap::new(),
            stopping: HashSet::new(),
            held: Held::default(),
            unsupported: Unsupported::default(),
            orphans: Orphans::default(),
            durations: Durations::new(limits.learned_durations),
            fleet: Fleet::default(),
            limits,
            new_attempt_id,
            commands: Vec::new(),
        }
    }

    /// The unfinished steps.
    #[must_use]
    pub fn graph(&self) -> &StepGraph {
        &self.graph
    }

    /// Runnable steps and connected builders.
    #[must_use]
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The farm counted for metrics.
    #[must_use]
    pub fn gauges(&self) -> gauges::Gauges {
        gauges::Gauges::count(&self.graph, &self.placement)
    }

    /// A running attempt.
    #[must_use]
    pub fn attempt(&self, attempt: &AttemptId) -> Option<&Attempt> {
        self.attempts.get(attempt)
    }

    /// The step of an attempt whose builder is out of reach and may still claim it.
    #[must_use]
    pub fn orphaned(&self, attempt: &AttemptId) -> Option<StepId> {
        self.orphans.step_of(attempt)
    }

    /// Running attempts.
    pub fn attempts(&self) -> impl Iterator<Item = (&AttemptId, &Attempt)> {
        self.attempts.iter()
    }

    /// Step completions recorded so far (see [`BuildPlan::snapshot`]).
    #[must_use]
    pub fn completions(&self) -> u64 {
        self.recent.count
    }

    /// Applies one event; returns what to persist and send. Call [`Core::dispatch`] after a
    /// batch of events.
    pub fn handle(&mut self, event: Event) -> Vec<Command> {
        match event {
            Event::BuildPlanned(plan) => self.on_build_planned(plan),
            Event::IngestCaughtUp { snapshot } => self.recent.prune(snapshot),
            Event::BuilderJoined {
                name,
                session,
                capabilities,
                nix_version,
                held,
            } => self.on_builder_joined(name, session, capabilities, nix_version, &held),
            Event::BuilderLeft {
                session,
                reason,
                departure,
            } => self.on_builder_left(session, &reason, departure),
            Event::BuilderDraining { session } => self
                .placement
                .set_standing(session, |standing| standing.set(Hold::ShuttingDown, true)),
            Event::SetDrained { name, drained } => self.set_drained(&name, drained),
            Event::SetQuarantine {
                name,
                quarantined,
                by,
                at,
            } => self.set_quarantine(&name, quarantined, &by, at),
            Event::SetGlobalPriority { build, priority } => {
                self.raise_global_priority(build, priority);
            }
            Event::CancelBuild { build, by } => self.cancel_build(build, &by),
            Event::RestartBuild { build } => {
                self.cancelled.remove(&build);
            }
            Event::BuilderPinged {
                session,
                free_disk_bytes,
                memory_pressure_percent,
            } => self.on_builder_pinged(session, free_disk_bytes, memory_pressure_percent),
            Event::StepFinished {
                session,
                attempt,
                report,
                at,
            } => self.on_step_finished(session, attempt, report, at),
        }
        std::mem::take(&mut self.commands)
    }

    /// Gives every free slot the best runnable step it can take.
    pub fn dispatch(&mut self, now: Instant) -> Vec<Command> {
        self.refresh_quarantines(now);
        self.orphans.arm(now);
        for (attempt, orphan) in self.orphans.expired(now) {
            let reason = match &orphan.cause {
                Cause::RunnerRestarted => format!(
                    "builder lost: {} did not claim the attempt within {:?} of the runner's restart",
                    orphan.builder, self.limits.readoption_grace
                ),
                Cause::ConnectionLost(why) => format!(
                    "builder lost: {} did not come back within {:?} of losing its connection ({why})",
                    orphan.builder, self.limits.rejoin_grace
                ),
            };
            self.end_orphan(attempt, orphan.step, &reason);
        }
        for step in self.held.release(now) {
            if self
                .graph
                .step(step)
                .is_some_and(|node| node.state == StepState::Runnable)
            {
                self.enqueue(step);
            }
        }
        let grace = self.limits.unsupported_grace;
        for class in self.unsupported.expired(now, &self.placement, grace) {
            let Some(requirements) = self.placement.requirements(class) else {
                continue;
            };
            let reason = self.unsupported.reason(requirements, grace);
            for order in self.placement.runnable(class) {
                self.placement.remove_runnable(class, &order);
                self.fail(order.step, StepStatus::Unsupported, &reason);
            }
        }
        while let Some((step, class, best)) = self.placement.next() {
            let Some(node) = self.graph.step(step) else {
                break;
            };
            // A retry prefers any other free builder to the one it failed on.
            let session = match &node.avoid {
                Some(avoid)
                    if self
                        .placement
                        .builder(best)
                        .is_some_and(|b| b.name == *avoid) =>
                {
                    self.placement.other_free(class, best).unwrap_or(best)
                }
                _ => best,
            };
            let order = node.order(step);
            let spec = node.spec.clone();
            self.placement.remove_runnable(class, &order);
            let attempt = (self.new_attempt_id)();
            let started_builds = self.graph.start(step, attempt);
            self.placement.occupy(session);
            if let Some(builder) = self.placement.builder(session)
                && builder.standing.quarantine == Some(Quarantine::Probation)
            {
                self.fleet.on_probation(&builder.name, attempt);
            }
            self.attempts.insert(
                attempt,
                Attempt {
                    step,
                    session,
                    started: now,
                    measured: true,
                },
            );
            self.by_session.entry(session).or_default().insert(attempt);
            let builder = self
                .placement
                .builder(session)
                .map(|builder| builder.name.clone())
                .unwrap_or_default();
            self.persist(Change::AttemptStarted {
                attempt,
                step,
                builder,
            });
            for build in started_builds {
                self.persist(Change::BuildStarted { build });
            }
            self.send(
                session,
                ToBuilder::Build(Assignment {
                    attempt,
                    step,
                    spec,
                }),
            );
        }
        std::mem::take(&mut self.commands)
    }

    /// When [`Core::dispatch`] must run next although no event came: a held step is due, or
    /// steps no builder can take reach the end of their grace period.
    #[must_use]
    pub fn next_wakeup(&self) -> Option<Instant> {
        let unsupported = self
            .unsupported
            .next_deadline(self.limits.unsupported_grace);
        let probation = self
            .placement
            .builders()
            .filter(|(_, builder)| builder.standing.quarantine == Some(Quarantine::CoolingDown))
            .filter_map(|(_, builder)| self.fleet.probation_from(&builder.name))
            .min();
        [
            self.held.next_due(),
            unsupported,
            self.orphans.deadline(),
            probation,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Takes the attempts the database says are running, left by a previous runner process:
    /// their steps wait for their builders to claim them instead of being built again. Call
    /// before any event.
    pub fn recover_attempts(
        &mut self,
        running: impl IntoIterator<Item = (AttemptId, StepId, String)>,
        now: Instant,
    ) {
        for (attempt, step, builder) in running {
            self.add_orphan(
                attempt,
                Orphan {
                    step,
                    builder,
                    started: now,
                    cause: Cause::RunnerRestarted,
                    wait: Wait::Recovery,
                },
            );
        }
    }

    /// The queue is recovered (every unfinished build planned) and builders may join: the
    /// orphans no build needs any more end now, the others wait for their builders until the
    /// re-adoption grace ends.
    pub fn recovered(&mut self, now: Instant) -> Vec<Command> {
        for (attempt, step) in self.orphans.list() {
            if !self.orphan_wanted(attempt, step) {
                self.orphans.take(&attempt);
                self.end_orphan(attempt, step, "no unfinished build needs it any more");
            }
        }
        self.orphans.start_grace(now, self.limits.readoption_grace);
        std::mem::take(&mut self.commands)
    }

    /// Applies new limits (a reloaded configuration): retries, caps and grace periods decided
    /// from now on use them.
    pub fn set_limits(&mut self, limits: CoreLimits) {
        self.limits = limits;
        self.durations.enable(limits.learned_durations);
    }

    /// Takes the builders' standing a previous runner process stored (drained, quarantined);
    /// stored cool-downs count from `now`. Call before any event.
    pub fn recover_machines(
        &mut self,
        stored: impl IntoIterator<Item = StoredStanding>,
        now: Instant,
    ) {
        self.fleet.recover(stored, now);
    }

    /// Takes in the durations earlier runs learned (the driver reads them at start).
    pub fn load_durations(&mut self, learned: impl IntoIterator<Item = Learned>) {
        self.durations.load(learned);
    }

    /// How long `build` is predicted to take from `now` to its end: the longer of its longest
    /// chain of unfinished steps and all their work spread over every connected builder's
    /// slots (running steps count what is left of their prediction). `None` if it is not in
    /// the graph, no builder is connected, or nothing has been learned yet (every prediction
    /// would be the same guess).
    #[must_use]
    pub fn estimate(&self, build: BuildId, now: Instant) -> Option<Duration> {
        let slots = self.placement.slots();
        if slots == 0 || self.durations.is_empty() {
            return None;
        }
        let (chain, work) = self.graph.remaining(build, |node| match node.state {
            StepState::Running(attempt) => {
                let elapsed = self.attempts.get(&attempt).map_or(0, |running| {
                    u64::try_from(now.saturating_duration_since(running.started).as_millis())
                        .unwrap_or(u64::MAX)
                });
                self.durations.expected(&node.spec).saturating_sub(elapsed)
            }
            StepState::Runnable | StepState::Waiting(_) => self.durations.expected(&node.spec),
        })?;
        Some(Duration::from_millis(chain.max(work / slots)))
    }

    /// Remembers that a builder once offered `capabilities` (the driver tells it those the
    /// database knows at start), so a step nobody can take says whether anybody ever could.
    pub fn remember_builder(&mut self, capabilities: Capabilities) {
        self.unsupported.remember(capabilities);
    }

    /// A builder's ping: what it says of its disk and memory decides whether it takes work. A
    /// builder that does not say keeps its standing.
    fn on_builder_pinged(
        &mut self,
        session: SessionId,
        free_disk_bytes: Option<u64>,
        memory_pressure_percent: Option<f64>,
    ) {
        let (floor, limit) = (
            self.limits.min_free_disk_bytes,
            self.limits.max_memory_pressure_percent,
        );
        self.placement.set_standing(session, |standing| {
            if let Some(free) = free_disk_bytes {
                standing.set(Hold::LowDisk, free < floor);
            }
            if let Some(pressure) = memory_pressure_percent {
                standing.set(Hold::MemoryPressure, limit > 0.0 && pressure > limit);
            }
        });
        if let Some(builder) = self.placement.builder(session) {
            self.persist(Change::MachinePinged {
                name: builder.name.clone(),
                free_disk_bytes,
                below_disk_floor: builder.standing.has(Hold::LowDisk),
                memory_pressure_percent,
                under_memory_pressure: builder.standing.has(Hold::MemoryPressure),
            });
        }
    }

    /// An admin drained or enabled a builder.
    fn set_drained(&mut self, name: &str, drained: bool) {
        if !self.fleet.set_drained(name, drained) {
            return;
        }
        self.persist(Change::MachineDrained {
            name: name.to_owned(),
            drained,
        });
        if let Some(session) = self.placement.session_of(name) {
            self.placement
                .set_standing(session, |standing| standing.set(Hold::Drained, drained));
        }
    }

    /// An admin imposed or lifted a builder's quarantine.
    fn set_quarantine(&mut self, name: &str, quarantined: bool, by: &str, at: Instant) {
        if quarantined {
            let reason = format!("imposed by {by}");
            let imposed = self
                .fleet
                .impose(name, reason, self.limits.quarantine.cool_down, at);
            self.quarantine_changed(name, Some(imposed), at);
        } else if self.fleet.lift(name) {
            self.quarantine_changed(name, None, at);
        }
    }

    /// Persists a quarantine that began or ended, and applies it to the builder's session.
    fn quarantine_changed(&mut self, name: &str, imposed: Option<Imposed>, now: Instant) {
        let quarantine = self.fleet.quarantine(name, now);
        self.persist(Change::MachineQuarantined {
            name: name.to_owned(),
            quarantine: imposed,
        });
        if let Some(session) = self.placement.session_of(name) {
            self.placement
                .set_standing(session, |standing| standing.quarantine = quarantine);
        }
    }

    /// Moves the connected builders whose cool-down ended to probation.
    fn refresh_quarantines(&mut self, now: Instant) {
        let due: Vec<(SessionId, Option<Quarantine>)> = self
            .fleet
            .quarantined()
            .filter_map(|name| {
                let session = self.placement.session_of(name)?;
                let quarantine = self.fleet.quarantine(name, now);
                let current = self.placement.builder(session)?.standing.quarantine;
                (current != quarantine).then_some((session, quarantine))
            })
            .collect();
        for (session, quarantine) in due {
            self.placement
                .set_standing(session, |standing| standing.quarantine = quarantine);
        }
    }

    fn persist(&mut self, change: Change) {
        self.commands.push(Command::Persist(change));
    }

    fn send(&mut self, session: SessionId, message: ToBuilder) {
        self.commands.push(Command::Send { session, message });
    }

    /// Sorts a plan's steps by what happened to them since ingest read them: the steps to add,
    /// those among them that failed meanwhile (with the reason to fail them again at once), and
    /// those that succeeded meanwhile (left out).
    fn correct_for_recent(
        &self,
        snapshot: u64,
        planned: Vec<PlannedStep>,
    ) -> (Vec<PlannedStep>, Vec<(StepId, String)>, HashSet<StepId>) {
        let mut steps = Vec::with_capacity(planned.len());
        let mut failed = Vec::new();
        let mut succeeded = HashSet::new();
        for planned in planned {
            // Ingest ends a build needing a step recorded as failed (a cached failure); one that
            // failed after ingest read it is corrected here.
            match self.recent.after(snapshot, planned.id) {
                Some(Finish::Succeeded) => {
                    succeeded.insert(planned.id);
                }
                Some(Finish::Failed) => {
                    // Joins the graph only to fail again at once, taking its dependents in
                    // this plan with it. Its own row already says failed, and why.
                    failed.push((planned.id, format!("{} failed", planned.spec.drv_path)));
                    steps.push(planned);
                }
                None => steps.push(planned),
            }
        }
        (steps, failed, succeeded)
    }

    fn on_build_planned(&mut self, plan: BuildPlan) {
        let mut builds: Vec<PlannedBuild> = plan
            .builds
            .into_iter()
            .filter(|build| {
                !self.graph.has_build(build.build) && !self.cancelled.remove(&build.build)
            })
            .collect();
        if builds.is_empty() {
            return;
        }
        for build in &mut builds {
            if let Some(priority) = self.raised.remove(&build.build) {
                build.global_priority = build.global_priority.max(priority);
            }
        }
        for step in plan.available {
            self.succeed_available(step);
        }
        let (steps, failed, succeeded) = self.correct_for_recent(plan.snapshot, plan.steps);
        builds.retain(|build| {
            let done = succeeded.contains(&build.top);
            if done {
                self.persist(Change::BuildFinished {
                    build: build.build,
                    status: BuildStatus::Succeeded,
                    reason: None,
                });
            }
            !done
        });
        if builds.is_empty() {
            return;
        }
        let recorded: HashMap<StepId, StepStatus> = steps
            .iter()
            .map(|step| (step.id, step.recorded_status))
            .collect();
        let steps_postponed: HashMap<StepId, Duration> = steps
            .iter()
            .filter_map(|step| Some((step.id, step.visible_in?)))
            .collect();
        let steps = steps
            .into_iter()
            .map(|planned| {
                let class = self.placement.class_for(&planned.spec.requirements);
                (planned, class)
            })
            .collect();
        let durations = &self.durations;
        let added = self
            .graph
            .add_builds(&builds, steps, |spec| durations.predict(spec));
        for build in added.started {
            self.persist(Change::BuildStarted { build });
        }
        let new_steps = added
            .runnable
            .iter()
            .map(|step| (*step, StepStatus::Runnable))
            .chain(
                added
                    .waiting
                    .iter()
                    .map(|step| (*step, StepStatus::Waiting)),
            );
        let failing: HashSet<StepId> = failed.iter().map(|(step, _)| *step).collect();
        let postponed: HashMap<StepId, Duration> = steps_postponed;
        for (step, status) in new_steps {
            if failing.contains(&step) {
                continue;
            }
            if status == StepStatus::Runnable && self.resume_orphan(step) {
                continue;
            }
            if let Some(delay) = postponed.get(&step) {
                // Its row says so already (`visible_after`), and nothing is used up.
                self.held.hold(step, *delay);
            }
            if status == StepStatus::Runnable {
                self.enqueue(step);
            }
            // A row keeps what an earlier life of it left (running, cancelled, ...) until
            // corrected here; rows ingest just created are already waiting.
            if recorded.get(&step) != Some(&status) {
                self.persist(Change::StepStatus {
                    step,
                    status,
                    reason: None,
                });
            }
        }
        self.reorder(added.reordered);
        for (step, reason) in failed {
            self.propagate_failure(step, StepStatus::Failed, &reason);
        }
    }

    /// Moves runnable steps whose order changed (from `old`) to their new place in line.
    fn reorder(&mut self, reordered: Vec<(StepId, Order)>) {
        for (step, old) in reordered {
            if self.held.holds(step) {
                continue;
            }
            if let Some(node) = self.graph.step(step) {
                let (class, new) = (node.class, node.order(step));
                self.placement.remove_runnable(class, &old);
                self.placement.add_runnable(class, new);
            }
        }
    }

    /// Raises a build's steps to `priority`, now or when it is planned.
    fn raise_global_priority(&mut self, build: BuildId, priority: i32) {
        match self.graph.raise_global_priority(build, priority) {
            Some(reordered) => self.reorder(reordered),
            None => {
                self.raised.insert(build, priority);
            }
        }
    }

    fn on_builder_joined(
        &mut self,
        name: String,
        session: SessionId,
        capabilities: Capabilities,
        nix_version: String,
        held: &[AttemptId],
    ) {
        self.persist(Change::MachineJoined {
            name: name.clone(),
            capabilities: capabilities.clone(),
            nix_version,
        });
        self.unsupported.remember(capabilities.clone());
        // The builder names every attempt it still runs or holds a result of: those it left
        // behind that it does not name are gone, so their steps need not wait any longer.
        let left_behind = self.orphans.of_builder(&name);
        let gone = format!("builder lost: {name} came back without the attempt");
        let standing = self.fleet.joining(&name);
        let previous = self.placement.join(session, name, capabilities, standing);
        let mut unknown = Vec::new();
        for attempt in held {
            if !self.claim(session, previous, *attempt) {
                unknown.push(*attempt);
            }
        }
        self.send(session, ToBuilder::Joined);
        for attempt in left_behind {
            if let Some(orphan) = self.orphans.take(&attempt) {
                self.end_orphan(attempt, orphan.step, &gone);
            }
        }
        for attempt in unknown {
            // Ended while the builder was away, or never given: the builder stops it. A result
            // it holds for it is acknowledged when it comes.
            self.send(
                session,
                ToBuilder::Abort {
                    attempt,
                    reason: "the runner no longer runs this attempt".to_owned(),
                },
            );
        }
        if let Some(previous) = previous {
            self.commands.push(Command::EndSession {
                session: previous,
                reason: "replaced by a newer session of the same builder".to_owned(),
            });
            self.lose_session(previous, "the builder reconnected");
        }
    }

    /// Marks a newly planned step running under its orphaned attempt, if it has one: the
    /// builder still runs it and claims it when it rejoins. Returns whether it did.
    fn resume_orphan(&mut self, step: StepId) -> bool {
        let Some(attempt) = self.orphans.of_step(step) else {
            return false;
        };
        self.graph.start(step, attempt);
        true
    }

    /// Gives a joining `session` an attempt it says it holds, if it is its builder's and still
    /// wanted: left by a previous runner process, or by the session this one replaces. Returns
    /// whether it was claimed.
    fn claim(
        &mut self,
        session: SessionId,
        previous: Option<SessionId>,
        attempt: AttemptId,
    ) -> bool {
        let step = if let Some(running) = self.attempts.get_mut(&attempt) {
            if Some(running.session) != previous {
                return false;
            }
            running.session = session;
            if let Some(attempts) = previous.and_then(|p| self.by_session.get_mut(&p)) {
                attempts.remove(&attempt);
            }
            running.step
        } else {
            let Some(orphan) = self.orphans.take(&attempt) else {
                return false;
            };
            let builder = self.placement.builder(session).map(|b| b.name.as_str());
            if builder != Some(orphan.builder.as_str()) || !self.orphan_wanted(attempt, orphan.step)
            {
                // Not this builder's to claim: it stays an orphan for its own builder.
                self.orphans.add(attempt, orphan);
                return false;
            }
            self.attempts.insert(
                attempt,
                Attempt {
                    step: orphan.step,
                    session,
                    started: orphan.started,
                    measured: !matches!(orphan.cause, Cause::RunnerRestarted),
                },
            );
            orphan.step
        };
        self.by_session.entry(session).or_default().insert(attempt);
        self.placement.occupy(session);
        let Some(spec) = self.graph.step(step).map(|node| node.spec.clone()) else {
            return true;
        };
        self.commands.push(Command::Adopt {
            session,
            assignment: Assignment {
                attempt,
                step,
                spec,
            },
        });
        true
    }

    /// Whether an orphaned attempt is its step's running attempt in the graph.
    fn orphan_wanted(&self, attempt: AttemptId, step: StepId) -> bool {
        self.graph.step(step).map(|node| node.state) == Some(StepState::Running(attempt))
    }

    /// Ends an orphaned attempt nobody claimed: its step, if still wanted, is requeued as
    /// after a builder loss.
    fn end_orphan(&mut self, attempt: AttemptId, step: StepId, reason: &str) {
        if self.orphan_wanted(attempt, step) {
            self.requeue(attempt, step, Requeue::BuilderLost, reason);
        } else {
            self.persist(Change::AttemptEnded {
                attempt,
                status: AttemptStatus::Aborted,
                message: Some(reason.to_owned()),
            });
        }
    }

    fn on_builder_left(&mut self, session: SessionId, reason: &str, departure: Departure) {
        let Some(builder) = self.placement.leave(session) else {
            return;
        };
        if builder.standing.has(Hold::ShuttingDown) {
            // What a builder shutting down still held is handed back: nobody's fault.
            self.requeue_session(session, Requeue::HandedBack, "builder left: draining");
        } else if departure == Departure::ConnectionLost && !self.limits.rejoin_grace.is_zero() {
            self.await_rejoin(session, &builder.name, reason);
        } else {
            self.lose_session(session, reason);
        }
        let replaced = self
            .placement
            .builders()
            .any(|(_, other)| other.name == builder.name);
        if !replaced {
            self.persist(Change::MachineLeft { name: builder.name });
        }
    }

    /// Cancels a build: the steps of it that no other build needs leave the graph, the running
    /// ones stopped on their builders; the steps other builds need go on.
    fn cancel_build(&mut self, build: BuildId, by: &str) {
        let reason = format!("cancelled by {by}");
        self.persist(Change::BuildFinished {
            build,
            status: BuildStatus::Cancelled,
            reason: Some(reason.clone()),
        });
        self.raised.remove(&build);
        let Some(removed) = self.graph.cancel_build(build) else {
            // Not planned yet (or already ended, which the write leaves alone).
            self.cancelled.insert(build);
            return;
        };
        self.drop_steps(
            removed,
            &format!("no build needs it any more: build {build} was {reason}"),
        );
    }

    /// Ends steps that left the graph because no build needs them any more: `cancelled`, the
    /// running ones stopped on their builders.
    fn drop_steps(&mut self, removed: Vec<(StepId, StepNode)>, step_reason: &str) {
        for (step, node) in removed {
            match node.state {
                StepState::Runnable => self
                    .placement
                    .remove_runnable(node.class, &node.order(step)),
                StepState::Running(attempt) => {
                    self.orphans.take(&attempt);
                    // The slot stays taken until the builder says the attempt has stopped.
                    if let Some(running) = self.attempts.get(&attempt) {
                        self.send(
                            running.session,
                            ToBuilder::Abort {
                                attempt,
                                reason: step_reason.to_owned(),
                            },
                        );
                        self.stopping.insert(attempt);
                    }
                    self.persist(Change::AttemptEnded {
                        attempt,
                        status: AttemptStatus::Aborted,
                        message: Some(step_reason.to_owned()),
                    });
                }
                StepState::Waiting(_) => {}
            }
            self.persist(Change::StepStatus {
                step,
                status: StepStatus::Cancelled,
                reason: Some(step_reason.to_owned()),
            });
        }
    }

    /// Keeps the attempts of a session whose connection failed for its builder to claim when
    /// it dials again, for the rejoin grace: they go on running there meanwhile.
    fn await_rejoin(&mut self, session: SessionId, builder: &str, reason: &str) {
        for attempt in self.by_session.remove(&session).unwrap_or_default() {
            if self.stopping.remove(&attempt) {
                self.attempts.remove(&attempt);
            } else if let Some(running) = self.attempts.remove(&attempt) {
                let orphan = Orphan {
                    step: running.step,
                    builder: builder.to_owned(),
                    started: running.started,
                    cause: Cause::ConnectionLost(reason.to_owned()),
                    wait: Wait::For(self.limits.rejoin_grace),
                };
                self.add_orphan(attempt, orphan);
            }
        }
    }

    /// Keeps an attempt for its builder to claim; a second one for the same step (which a
    /// consistent state never has) is ended.
    fn add_orphan(&mut self, attempt: AttemptId, orphan: Orphan) {
        if let Some(duplicate) = self.orphans.add(attempt, orphan) {
            self.persist(Change::AttemptEnded {
                attempt: duplicate,
                status: AttemptStatus::Aborted,
                message: Some("a second running attempt of its step".to_owned()),
            });
        }
    }

    /// Requeues every attempt of a session that is gone, without counting a build failure.
    fn lose_session(&mut self, session: SessionId, reason: &str) {
        self.placement.leave(session);
        self.requeue_session(
            session,
            Requeue::BuilderLost,
            &format!("builder lost: {reason}"),
        );
    }

    /// Requeues every attempt `session` held, for `cause`; the attempts of cancelled steps,
    /// already ended, are only forgotten.
    fn requeue_session(&mut self, session: SessionId, cause: Requeue, message: &str) {
        for attempt in self.by_session.remove(&session).unwrap_or_default() {
            if self.stopping.remove(&attempt) {
                self.attempts.remove(&attempt);
            } else if let Some(running) = self.attempts.remove(&attempt) {
                self.requeue(attempt, running.step, cause, message);
            }
        }
    }

    fn on_step_finished(
        &mut self,
        session: SessionId,
        attempt: AttemptId,
        report: Report,
        at: Instant,
    ) {
        // Whatever happens next, the builder need not keep this result: it is recorded below,
        // or it is for an attempt that no longer counts.
        let running = self.attempts.get(&attempt).filter(|a| a.session == session);
        let Some(running) = running.cloned() else {
            self.send(session, ToBuilder::ResultRecorded { attempt });
            return;
        };
        self.attempts.remove(&attempt);
        if let Some(attempts) = self.by_session.get_mut(&session) {
            attempts.remove(&attempt);
        }
        let builder = self.placement.builder(session);
        let speed_factor = builder.map_or(1.0, |builder| builder.capabilities.speed_factor);
        let builder_name = builder.map(|builder| builder.name.clone());
        self.placement.release(session);
        if self.stopping.remove(&attempt) {
            // A cancelled step's attempt has stopped; its end is already recorded.
            self.send(session, ToBuilder::ResultRecorded { attempt });
            return;
        }
        let step = running.step;
        match report.outcome {
            Outcome::Succeeded => {
                if let Some(node) = self.graph.step(step).filter(|_| running.measured) {
                    let took = at.saturating_duration_since(running.started);
                    let learned = self.durations.learn(&node.spec, took, speed_factor);
                    self.persist(Change::DurationLearned(learned));
                }
                if let Some(name) = builder_name
                    && self.fleet.success(&name, attempt)
                {
                    self.quarantine_changed(&name, None, at);
                }
                self.succeed(attempt, step, report.outputs);
            }
            Outcome::Failed | Outcome::TimedOut | Outcome::LogLimitExceeded => {
                let status = match report.outcome {
                    Outcome::TimedOut => AttemptStatus::TimedOut,
                    Outcome::LogLimitExceeded => AttemptStatus::LogLimit,
                    _ => AttemptStatus::Failed,
                };
                self.persist(Change::AttemptEnded {
                    attempt,
                    status,
                    message: Some(report.message.clone()),
                });
                self.fail(step, StepStatus::Failed, &report.message);
            }
            Outcome::InfrastructureFailure => {
                if let Some(name) = &builder_name
                    && let Some(imposed) = self.fleet.infrastructure_failure(
                        name,
                        attempt,
                        &report.message,
                        self.limits.quarantine,
                        at,
                    )
                {
                    self.quarantine_changed(name, Some(imposed), at);
                }
                if let (Some(node), Some(name)) = (self.graph.step_mut(step), builder_name) {
                    node.avoid = Some(name);
                }
                self.requeue(
                    attempt,
                    step,
                    Requeue::InfrastructureFailure,
                    &report.message,
                );
            }
        }
        self.send(session, ToBuilder::ResultRecorded { attempt });
    }

    fn succeed(&mut self, attempt: AttemptId, step: StepId, outputs: Vec<OutputRecord>) {
        self.persist(Change::AttemptEnded {
            attempt,
            status: AttemptStatus::Succeeded,
            message: None,
        });
        self.persist(Change::Outputs { step, outputs });
        self.persist(Change::StepStatus {
            step,
            status: StepStatus::Succeeded,
            reason: None,
        });
        self.recent.record(step, Finish::Succeeded);
        self.release_dependents(step);
    }

    /// A queued step whose outputs turned up in a cache: ingest recorded its success, and it
    /// need not be built. One that already runs is left to finish.
    fn succeed_available(&mut self, step: StepId) {
        let Some(node) = self.graph.step(step) else {
            return;
        };
        match node.state {
            StepState::Running(_) => return,
            StepState::Runnable => {
                let (class, order) = (node.class, node.order(step));
                self.placement.remove_runnable(class, &order);
            }
            StepState::Waiting(_) => {}
        }
        self.release_dependents(step);
    }

    /// Removes a succeeded step from the graph: its dependents may run, its builds succeed.
    fn release_dependents(&mut self, step: StepId) {
        let effects = self.graph.succeed(step);
        for next in effects.runnable {
            self.enqueue(next);
            self.persist(Change::StepStatus {
                step: next,
                status: StepStatus::Runnable,
                reason: None,
            });
        }
        for build in effects.succeeded_builds {
            self.persist(Change::BuildFinished {
                build,
                status: BuildStatus::Succeeded,
                reason: None,
            });
        }
    }

    /// Ends an attempt that was not the build's fault and puts its step back in line (at once
    /// after a builder loss; after the retry policy's backoff after an infrastructure failure),
    /// unless that cause has hit it too often: then the step ends `cancelled` (not a cached
    /// failure: the next build that needs it tries again) with the reason.
    fn requeue(&mut self, attempt: AttemptId, step: StepId, cause: Requeue, message: &str) {
        let status = match cause {
            Requeue::BuilderLost => AttemptStatus::BuilderLost,
            Requeue::InfrastructureFailure => AttemptStatus::InfrastructureFailure,
            Requeue::HandedBack => AttemptStatus::Aborted,
        };
        self.persist(Change::AttemptEnded {
            attempt,
            status,
            message: Some(message.to_owned()),
        });
        let Some(node) = self.graph.step_mut(step) else {
            return;
        };
        // A hand-back moves no counter and has no cap.
        let cap = match cause {
            Requeue::HandedBack => None,
            Requeue::BuilderLost => {
                node.builder_losses += 1;
                Some((
                    node.builder_losses,
                    self.limits.max_builder_losses,
                    "builder losses",
                ))
            }
            Requeue::InfrastructureFailure => {
                node.infrastructure_failures += 1;
                Some((
                    node.infrastructure_failures,
                    // The last allowed attempt's failure is final.
                    self.limits.retry.max_attempts.saturating_sub(1),
                    "infrastructure failures",
                ))
            }
        };
        let failures = node.infrastructure_failures;
        let counters = Change::StepCounters {
            step,
            builder_losses: node.builder_losses,
            infrastructure_failures: node.infrastructure_failures,
        };
        if let Some((count, limit, what)) = cap {
            self.persist(counters);
            if count > limit {
                let reason = format!("{count} {what}; the last: {message}");
                self.fail(step, StepStatus::Cancelled, &reason);
                return;
            }
        }
        if self.graph.requeue(step) {
            if cause == Requeue::InfrastructureFailure {
                let delay = self.limits.retry.delay(failures);
                self.held.hold(step, delay);
                self.persist(Change::StepHeld { step, delay });
            }
            self.enqueue(step);
            self.persist(Change::StepStatus {
                step,
                status: StepStatus::Runnable,
                reason: None,
            });
        }
    }

    /// Ends a step for good with `status` and everything that depends on it.
    fn fail(&mut self, step: StepId, status: StepStatus, reason: &str) {
        self.persist(Change::StepStatus {
            step,
            status,
            reason: Some(reason.to_owned()),
        });
        self.propagate_failure(step, status, reason);
    }

    /// What a step's failure does to the graph: its dependents and the builds needing it fail.
    fn propagate_failure(&mut self, step: StepId, status: StepStatus, reason: &str) {
        let (effects, removed) = self.graph.fail(step);
        for (id, node) in &removed {
            if node.state == StepState::Runnable {
                self.placement.remove_runnable(node.class, &node.order(*id));
            }
        }
        if status == StepStatus::Failed {
            self.recent.record(step, Finish::Failed);
        }
        let origin = effects
            .failed_builds
            .iter()
            .chain(&effects.dep_failed_builds)
            .min();
        if let (StepStatus::Failed, Some(&build)) = (status, origin) {
            self.persist(Change::FailureOrigin { step, build });
        }
        let dependency_reason = format!("a dependency failed: {reason}");
        for dependent in effects.dep_failed_steps {
            self.persist(Change::StepStatus {
                step: dependent,
                status: StepStatus::DepFailed,
                reason: Some(dependency_reason.clone()),
            });
        }
        for build in effects.failed_builds {
            self.persist(Change::BuildFinished {
                build,
                status: BuildStatus::Failed,
                reason: Some(reason.to_owned()),
            });
        }
        for build in effects.dep_failed_builds {
            self.persist(Change::BuildFinished {
                build,
                status: BuildStatus::DepFailed,
                reason: Some(dependency_reason.clone()),
            });
        }
        let unwanted = self.graph.drop_unwanted(&removed);
        self.drop_steps(
            unwanted,
            &format!("no build needs it any more: the builds that did failed: {reason}"),
        );
    }

    /// Puts a runnable step in its class's line.
    fn enqueue(&mut self, step: StepId) {
        if self.held.holds(step) {
            return;
        }
        if let Some(node) = self.graph.step(step) {
            self.placement.add_runnable(node.class, node.order(step));
        }
    }
}
