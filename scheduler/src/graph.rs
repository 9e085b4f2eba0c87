//! The step graph: which unfinished steps exist, what each waits for, and the order runnable
//! steps are taken in. Pure data; the core keeps the runnable index beside it in step with what
//! these methods return.
//!
//! Which builds need a step is derived, not stored: a build holds its top-level step, and a step
//! is wanted while it is the top of a build that has not ended, has a dependent in the graph, or
//! is kept for a failed keep-going build. Many builds sharing a graph (the jobs of a job set)
//! therefore cost about the graph, not the sum of their closures.
//!
//! The order of a runnable step is (global priority, build priority, critical path, step id):
//! the highest global and build priority of the builds that need it, then the longest chain from
//! it up to a top-level step in predicted time (so the steps that hold up the most work go first;
//! see [`super::durations`]), then the oldest step. Both are raised when builds join, along the steps they bring, and never
//! lowered: a slightly stale, higher value only makes a step go a little early.
//!
//! Completing a step costs O(its dependents and tops), never O(queue); a step that starts marks
//! the steps above it once in their lifetime, to say which builds run.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::types::{AttemptId, BuildId, ClassId, PlannedBuild, PlannedStep, StepId, StepSpec};

/// Where a runnable step stands in line: smaller goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Order {
    global_priority: Reverse<i32>,
    build_priority: Reverse<i32>,
    critical_path: Reverse<u64>,
    /// The step; also the final tie-break (older steps have smaller ids).
    pub step: StepId,
}

/// Where a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepState {
    /// Waiting for this many unfinished inputs.
    Waiting(usize),
    /// Ready for a builder.
    Runnable,
    /// Given to a builder as this attempt.
    Running(AttemptId),
}

/// An unfinished step.
#[derive(Debug)]
pub struct StepNode {
    /// What it builds.
    pub spec: Arc<StepSpec>,
    /// Where it is.
    pub state: StepState,
    /// Its runnable class (requirements).
    pub class: ClassId,
    /// Builder losses survived.
    pub builder_losses: u32,
    /// Infrastructure failures survived.
    pub infrastructure_failures: u32,
    /// The builder its last infrastructure failure happened on: its retry prefers another.
    pub avoid: Option<String>,
    global_priority: i32,
    build_priority: i32,
    /// Its predicted duration, in milliseconds on a builder of speed factor 1.
    predicted_ms: u64,
    critical_path: u64,
    inputs: Vec<StepId>,
    /// Steps that use it; some may have left the graph.
    dependents: Vec<StepId>,
    /// Builds whose top-level step it is; some may have ended.
    tops: Vec<BuildId>,
    /// How many failed keep-going builds keep it wanted.
    kept_for: u32,
    /// Whether it or a step below it has started: every build above it runs.
    started_below: bool,
}

impl StepNode {
    /// Its place in line.
    #[must_use]
    pub fn order(&self, step: StepId) -> Order {
        Order {
            global_priority: Reverse(self.global_priority),
            build_priority: Reverse(self.build_priority),
            critical_path: Reverse(self.critical_path),
            step,
        }
    }

    /// The predicted time from its start to the end of the farthest top-level step that needs
    /// it, its own included, in milliseconds.
    #[must_use]
    pub fn critical_path(&self) -> u64 {
        self.critical_path
    }

    /// Its predicted duration, in milliseconds on a builder of speed factor 1.
    #[must_use]
    pub fn predicted_ms(&self) -> u64 {
        self.predicted_ms
    }
}

#[derive(Debug)]
struct BuildNode {
    top: StepId,
    /// Whether one of its steps has started (in this process: after a restart, the first
    /// start says so again, which the writer and Watch take as it was).
    started: bool,
    /// Whether its steps stay wanted after it failed, to build everything it can.
    keep_going: bool,
}

/// What adding builds changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Added {
    /// New steps that are runnable at once.
    pub runnable: Vec<StepId>,
    /// New steps that wait for inputs.
    pub waiting: Vec<StepId>,
    /// Runnable steps already in the graph whose order changed: (step, old order).
    pub reordered: Vec<(StepId, Order)>,
    /// Builds needing a step that was already running (for another build): they run from now
    /// on.
    pub started: Vec<BuildId>,
}

/// What a finished step changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Steps that became runnable.
    pub runnable: Vec<StepId>,
    /// Builds whose top-level step succeeded.
    pub succeeded_builds: Vec<BuildId>,
    /// Steps that can never run because this one failed.
    pub dep_failed_steps: Vec<StepId>,
    /// Builds whose top-level step failed.
    pub failed_builds: Vec<BuildId>,
    /// Builds that failed because a step they need failed.
    pub dep_failed_builds: Vec<BuildId>,
}

/// The graph of unfinished steps.
#[derive(Debug, Default)]
pub struct StepGraph {
    steps: HashMap<StepId, StepNode>,
    builds: HashMap<BuildId, BuildNode>,
    /// Failed keep-going builds, with the steps each keeps wanted.
    kept: HashMap<BuildId, Vec<StepId>>,
}

impl StepGraph {
    /// A step, if unfinished.
    #[must_use]
    pub fn step(&self, step: StepId) -> Option<&StepNode> {
        self.steps.get(&step)
    }

    /// A step, if unfinished, to update its counters or state.
    pub fn step_mut(&mut self, step: StepId) -> Option<&mut StepNode> {
        self.steps.get_mut(&step)
    }

    /// Whether a build is in the graph (ingested and unfinished).
    #[must_use]
    pub fn has_build(&self, build: BuildId) -> bool {
        self.builds.contains_key(&build)
    }

    /// Number of unfinished builds.
    #[must_use]
    pub fn build_count(&self) -> usize {
        self.builds.len()
    }

    /// Number of unfinished steps.
    #[must_use]
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether no step is unfinished.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Every unfinished step, in no particular order.
    pub fn steps(&self) -> impl Iterator<Item = (StepId, &StepNode)> {
        self.steps.iter().map(|(id, node)| (*id, node))
    }

    /// Adds builds and the unfinished steps of their closures (`steps`, inputs first, each with
    /// its class; inputs neither in the graph nor in `steps` count as done): inserts the steps
    /// some build needs that the graph lacks, each with the duration `predict` gives it, links
    /// each build to its top-level step, and raises priorities and critical paths along `steps`.
    pub fn add_builds(
        &mut self,
        builds: &[PlannedBuild],
        steps: Vec<(PlannedStep, ClassId)>,
        predict: impl Fn(&StepSpec) -> u64,
    ) -> Added {
        let mut added = Added::default();
        let wanted = Self::needed(builds, &steps);
        let mut closure: Vec<StepId> = Vec::with_capacity(wanted.len());
        let mut before: HashMap<StepId, Order> = HashMap::new();
        for (planned, class) in steps {
            if !wanted.contains(&planned.id) {
                continue;
            }
            closure.push(planned.id);
            if let Some(node) = self.steps.get(&planned.id) {
                if node.state == StepState::Runnable {
                    before.insert(planned.id, node.order(planned.id));
                }
                continue;
            }
            let predicted = predict(&planned.spec);
            self.insert(planned, class, predicted, &mut added);
        }
        for new in builds {
            self.builds.insert(
                new.build,
                BuildNode {
                    top: new.top,
                    started: false,
                    keep_going: new.keep_going,
                },
            );
            // A build joining again (restarted) no longer keeps what it kept when it failed.
            self.unkeep(new.build);
            let Some(node) = self.steps.get_mut(&new.top) else {
                continue;
            };
            node.tops.push(new.build);
            node.global_priority = node.global_priority.max(new.global_priority);
            node.build_priority = node.build_priority.max(new.priority);
            if node.started_below || matches!(node.state, StepState::Running(_)) {
                node.started_below = true;
                if let Some(build) = self.builds.get_mut(&new.build) {
                    build.started = true;
                }
                added.started.push(new.build);
            }
        }
        for id in closure.iter().rev() {
            let Some(node) = self.steps.get(id) else {
                continue;
            };
            let (global, priority, path) = (
                node.global_priority,
                node.build_priority,
                node.critical_path,
            );
            for input in node.inputs.clone() {
                if let Some(input) = self.steps.get_mut(&input) {
                    input.global_priority = input.global_priority.max(global);
                    input.build_priority = input.build_priority.max(priority);
                    input.critical_path = input
                        .critical_path
                        .max(path.saturating_add(input.predicted_ms));
                }
            }
        }
        for (id, old) in before {
            if self
                .steps
                .get(&id)
                .is_some_and(|node| node.order(id) != old)
            {
                added.reordered.push((id, old));
            }
        }
        added.reordered.sort_unstable();
        added
    }

    /// The steps of `steps` that some of `builds` needs: those reachable from their tops.
    fn needed(builds: &[PlannedBuild], steps: &[(PlannedStep, ClassId)]) -> HashSet<StepId> {
        let inputs: HashMap<StepId, &[StepId]> = steps
            .iter()
            .map(|(planned, _)| (planned.id, planned.inputs.as_slice()))
            .collect();
        let mut needed = HashSet::with_capacity(steps.len());
        let mut pending: Vec<StepId> = builds.iter().map(|build| build.top).collect();
        while let Some(id) = pending.pop() {
            if let Some(step_inputs) = inputs.get(&id)
                && needed.insert(id)
            {
                pending.extend(step_inputs.iter().copied());
            }
        }
        needed
    }

    /// What remains of `build`, in milliseconds: the longest chain of its unfinished steps up
    /// to its top, and the sum of them all, each step counting what `own` says is left of it.
    /// `None` if the build is not in the graph.
    pub fn remaining(&self, build: BuildId, own: impl Fn(&StepNode) -> u64) -> Option<(u64, u64)> {
        let top = self.builds.get(&build)?.top;
        let mut chain: HashMap<StepId, u64> = HashMap::new();
        let mut work = 0_u64;
        // Depth first, each step after its inputs; a step reached twice is summed once.
        let mut stack = vec![(top, false)];
        while let Some((id, inputs_done)) = stack.pop() {
            let Some(node) = self.steps.get(&id) else {
                continue;
            };
            if chain.contains_key(&id) {
                continue;
            }
            if inputs_done {
                let below = node
                    .inputs
                    .iter()
                    .filter_map(|input| chain.get(input))
                    .max()
                    .copied()
                    .unwrap_or(0);
                let left = own(node);
                work = work.saturating_add(left);
                chain.insert(id, below.saturating_add(left));
            } else {
                stack.push((id, true));
                stack.extend(
                    node.inputs
                        .iter()
                        .filter(|input| !chain.contains_key(input))
                        .map(|input| (*input, false)),
                );
            }
        }
        Some((chain.get(&top).copied().unwrap_or(0), work))
    }

    /// Inserts a step the graph lacks, linked to its inputs in the graph.
    fn insert(
        &mut self,
        planned: PlannedStep,
        class: ClassId,
        predicted_ms: u64,
        added: &mut Added,
    ) {
        let inputs: Vec<StepId> = planned
            .inputs
            .iter()
            .copied()
            .filter(|input| self.steps.contains_key(input))
            .collect();
        let mut started_below = false;
        for input in &inputs {
            if let Some(node) = self.steps.get_mut(input) {
                node.dependents.push(planned.id);
                started_below |= node.started_below || matches!(node.state, StepState::Running(_));
            }
        }
        let state = if inputs.is_empty() {
            added.runnable.push(planned.id);
            StepState::Runnable
        } else {
            added.waiting.push(planned.id);
            StepState::Waiting(inputs.len())
        };
        self.steps.insert(
            planned.id,
            StepNode {
                spec: planned.spec,
                state,
                class,
                builder_losses: planned.builder_losses,
                infrastructure_failures: planned.infrastructure_failures,
                avoid: None,
                global_priority: i32::MIN,
                build_priority: i32::MIN,
                predicted_ms,
                critical_path: predicted_ms,
                inputs,
                dependents: Vec::new(),
                tops: Vec::new(),
                kept_for: 0,
                started_below,
            },
        );
    }

    /// Marks a runnable step as given to a builder; returns the builds that need it and had no
    /// step started before: they run from now on.
    pub fn start(&mut self, step: StepId, attempt: AttemptId) -> Vec<BuildId> {
        let Some(node) = self.steps.get_mut(&step) else {
            return Vec::new();
        };
        if node.state != StepState::Runnable {
            return Vec::new();
        }
        node.state = StepState::Running(attempt);
        // Each step is marked once in its life, so starts cost O(graph) in all.
        let mut started = Vec::new();
        let mut pending = vec![step];
        while let Some(id) = pending.pop() {
            let Some(node) = self.steps.get_mut(&id) else {
                continue;
            };
            if node.started_below && id != step {
                continue;
            }
            node.started_below = true;
            pending.extend(node.dependents.iter().copied());
            for build in &node.tops {
                if let Some(build_node) = self.builds.get_mut(build)
                    && !std::mem::replace(&mut build_node.started, true)
                {
                    started.push(*build);
                }
            }
        }
        started.sort_unstable();
        started
    }

    /// Raises the global priority of `build` and of every unfinished step it needs to at least
    /// `priority` (never lowers one: see the module's note); returns the runnable steps whose
    /// order changed, with their old order. `None` if the build is not in the graph.
    pub fn raise_global_priority(
        &mut self,
        build: BuildId,
        priority: i32,
    ) -> Option<Vec<(StepId, Order)>> {
        let top = self.builds.get(&build)?.top;
        let mut reordered = Vec::new();
        let mut pending = vec![top];
        while let Some(id) = pending.pop() {
            let Some(node) = self.steps.get_mut(&id) else {
                continue;
            };
            if node.global_priority >= priority {
                // Raised already, with everything below it.
                continue;
            }
            if node.state == StepState::Runnable {
                reordered.push((id, node.order(id)));
            }
            node.global_priority = priority;
            pending.extend(node.inputs.iter().copied());
        }
        reordered.sort_unstable();
        Some(reordered)
    }

    /// Puts a running step back in line; returns whether it was running.
    pub fn requeue(&mut self, step: StepId) -> bool {
        match self.steps.get_mut(&step) {
            Some(node) if matches!(node.state, StepState::Running(_)) => {
                node.state = StepState::Runnable;
                true
            }
            _ => false,
        }
    }

    /// Removes a succeeded step; its dependents may become runnable and builds succeed.
    pub fn succeed(&mut self, step: StepId) -> Effects {
        let mut effects = Effects::default();
        let Some(node) = self.steps.remove(&step) else {
            return effects;
        };
        for dependent in node.dependents {
            if let Some(next) = self.steps.get_mut(&dependent)
                && let StepState::Waiting(missing) = next.state
            {
                next.state = if missing <= 1 {
                    effects.runnable.push(dependent);
                    StepState::Runnable
                } else {
                    StepState::Waiting(missing - 1)
                };
            }
        }
        for build in node.tops {
            if self.builds.get(&build).is_some_and(|b| b.top == step) {
                self.builds.remove(&build);
                effects.succeeded_builds.push(build);
            }
        }
        effects
    }

    /// Removes a cancelled build, and the steps of its closure that no other build in the graph
    /// needs any more; `None` if the build is neither in the graph nor kept after a failure.
    /// Returns the removed steps' nodes, so the caller can unindex them and stop the running
    /// ones.
    pub fn cancel_build(&mut self, build: BuildId) -> Option<Vec<(StepId, StepNode)>> {
        let kept = self.kept.remove(&build);
        let top = self.builds.remove(&build).map(|node| node.top);
        if kept.is_none() && top.is_none() {
            return None;
        }
        let mut candidates: Vec<StepId> = top.into_iter().collect();
        for step in kept.into_iter().flatten() {
            if let Some(node) = self.steps.get_mut(&step) {
                node.kept_for = node.kept_for.saturating_sub(1);
                candidates.push(step);
            }
        }
        Some(self.drop_if_unwanted(candidates))
    }

    /// Removes a failed step and every step that depends on it; the builds that needed them
    /// fail, and a failed keep-going build keeps the steps it still needs wanted. Returns the
    /// removed steps' nodes too, so the caller can unindex them.
    pub fn fail(&mut self, step: StepId) -> (Effects, Vec<(StepId, StepNode)>) {
        let mut effects = Effects::default();
        let mut removed = Vec::new();
        let mut pending = vec![step];
        let mut affected_builds = Vec::new();
        while let Some(id) = pending.pop() {
            let Some(node) = self.steps.remove(&id) else {
                continue;
            };
            if id != step {
                effects.dep_failed_steps.push(id);
            }
            pending.extend(node.dependents.iter().copied());
            affected_builds.extend(node.tops.iter().copied());
            removed.push((id, node));
        }
        affected_builds.sort_unstable();
        affected_builds.dedup();
        for build in affected_builds {
            let Some(node) = self.builds.remove(&build) else {
                continue;
            };
            if node.top == step {
                effects.failed_builds.push(build);
            } else {
                effects.dep_failed_builds.push(build);
            }
            if node.keep_going {
                self.keep(build, node.top, &removed);
            }
        }
        effects.dep_failed_steps.sort_unstable();
        (effects, removed)
    }

    /// Keeps wanted, for a failed keep-going build whose top is `top`, the steps in the graph
    /// that the removed steps it needed use.
    fn keep(&mut self, build: BuildId, top: StepId, removed: &[(StepId, StepNode)]) {
        let removed: HashMap<StepId, &StepNode> =
            removed.iter().map(|(id, node)| (*id, node)).collect();
        let mut visited = HashSet::new();
        let mut kept = Vec::new();
        let mut pending = vec![top];
        while let Some(id) = pending.pop() {
            if !visited.insert(id) {
                continue;
            }
            if let Some(node) = removed.get(&id) {
                pending.extend(node.inputs.iter().copied());
            } else if let Some(node) = self.steps.get_mut(&id) {
                node.kept_for += 1;
                kept.push(id);
            }
        }
        self.kept.insert(build, kept);
    }

    /// Forgets what a build kept wanted after it failed, dropping nothing (it joins again).
    fn unkeep(&mut self, build: BuildId) {
        for step in self.kept.remove(&build).into_iter().flatten() {
            if let Some(node) = self.steps.get_mut(&step) {
                node.kept_for = node.kept_for.saturating_sub(1);
            }
        }
    }

    /// Removes what only failed builds needed: from the inputs of `removed` (the steps a failure
    /// took out) on, every step that no live build, and no failed keep-going build, needs any
    /// more. Returns them, for the caller to stop and unindex.
    pub fn drop_unwanted(&mut self, removed: &[(StepId, StepNode)]) -> Vec<(StepId, StepNode)> {
        let candidates = removed
            .iter()
            .flat_map(|(_, node)| node.inputs.iter().copied())
            .collect();
        self.drop_if_unwanted(candidates)
    }

    /// Removes each of `candidates` that nothing wants any more, and then each of their inputs
    /// that nothing wants any more, and so on down.
    fn drop_if_unwanted(&mut self, mut candidates: Vec<StepId>) -> Vec<(StepId, StepNode)> {
        let mut dropped = Vec::new();
        while let Some(id) = candidates.pop() {
            if self.steps.get(&id).is_none_or(|node| self.wanted(node)) {
                continue;
            }
            if let Some(node) = self.steps.remove(&id) {
                candidates.extend(node.inputs.iter().copied());
                dropped.push((id, node));
            }
        }
        dropped
    }

    /// Whether a build that has not ended needs the step (it is its top, or a step above it in
    /// the graph needs it), or a failed keep-going build keeps it.
    pub(crate) fn wanted(&self, node: &StepNode) -> bool {
        node.kept_for > 0
            || node
                .tops
                .iter()
                .any(|build| self.builds.contains_key(build))
            || node
                .dependents
                .iter()
                .any(|dependent| self.steps.contains_key(dependent))
    }
}
