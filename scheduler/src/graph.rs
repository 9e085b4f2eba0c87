//! The step graph: which unfinished steps exist, what each waits for, which builds need it, and
//! the order runnable steps are taken in. Pure data; the core keeps the runnable index beside
//! it in step with what these methods return.
//!
//! The order of a runnable step is (global priority, build priority, critical path, step id):
//! the highest global and build priority of the builds that need it, then the longest chain of
//! steps from it up to a top-level step (so the steps that hold up the most work go first), then
//! the oldest step. The critical path is maintained incrementally: adding a build raises it
//! along that build's closure only. A failure that removes dependents leaves their inputs'
//! values as they were: a slightly stale, higher value only makes such a step go a little early.
//!
//! Completing a step costs O(its dependents and builds), never O(queue).

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::types::{AttemptId, BuildId, ClassId, PlannedStep, StepId, StepSpec};

/// Where a runnable step stands in line: smaller goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Order {
    global_priority: Reverse<i32>,
    build_priority: Reverse<i32>,
    critical_path: Reverse<u32>,
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
    critical_path: u32,
    inputs: Vec<StepId>,
    dependents: Vec<StepId>,
    builds: Vec<BuildId>,
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

    /// Steps between it and the farthest top-level step that needs it, itself included.
    #[must_use]
    pub fn critical_path(&self) -> u32 {
        self.critical_path
    }
}

#[derive(Debug)]
struct BuildNode {
    top: StepId,
    /// Whether one of its steps has started (in this process: after a restart, the first
    /// start says so again, which the writer and Watch take as it was).
    started: bool,
}

/// A build joining the graph.
#[derive(Debug)]
pub struct NewBuild {
    /// The build.
    pub build: BuildId,
    /// Its priority.
    pub priority: i32,
    /// Its global priority.
    pub global_priority: i32,
    /// Its top-level step (in `steps`, or already in the graph).
    pub top: StepId,
    /// Whether its steps stay wanted after it failed, to build everything it can.
    pub keep_going: bool,
    /// Its unfinished steps, inputs first, each with its class; inputs not in the graph or in
    /// this list count as done.
    pub steps: Vec<(PlannedStep, ClassId)>,
}

/// What adding a build changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Added {
    /// New steps that are runnable at once.
    pub runnable: Vec<StepId>,
    /// New steps that wait for inputs.
    pub waiting: Vec<StepId>,
    /// Runnable steps already in the graph whose order changed: (step, old order).
    pub reordered: Vec<(StepId, Order)>,
    /// Whether a step the build needs was already running (for another build): the build runs
    /// from now on.
    pub started: bool,
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
    /// Builds submitted with keep-going: their steps stay wanted after they failed.
    keep_going: HashSet<BuildId>,
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

    /// Adds a build: inserts its new steps, links it to every step of its closure, raises
    /// priorities and critical paths.
    pub fn add_build(&mut self, new: NewBuild) -> Added {
        let mut added = Added::default();
        if new.keep_going {
            self.keep_going.insert(new.build);
        }
        let closure: Vec<StepId> = new.steps.iter().map(|(step, _)| step.id).collect();
        let before: HashMap<StepId, Order> = closure
            .iter()
            .filter_map(|id| {
                let node = self.steps.get(id)?;
                (node.state == StepState::Runnable).then(|| (*id, node.order(*id)))
            })
            .collect();
        for (planned, class) in new.steps {
            if self.steps.contains_key(&planned.id) {
                continue;
            }
            let inputs: Vec<StepId> = planned
                .inputs
                .iter()
                .copied()
                .filter(|input| self.steps.contains_key(input))
                .collect();
            for input in &inputs {
                if let Some(node) = self.steps.get_mut(input) {
                    node.dependents.push(planned.id);
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
                    global_priority: new.global_priority,
                    build_priority: new.priority,
                    critical_path: 1,
                    inputs,
                    dependents: Vec::new(),
                    builds: Vec::new(),
                },
            );
        }
        added.started = closure.iter().any(|id| {
            self.steps
                .get(id)
                .is_some_and(|node| matches!(node.state, StepState::Running(_)))
        });
        self.builds.insert(
            new.build,
            BuildNode {
                top: new.top,
                started: added.started,
            },
        );
        for id in closure.iter().rev() {
            let Some(node) = self.steps.get_mut(id) else {
                continue;
            };
            node.builds.push(new.build);
            node.global_priority = node.global_priority.max(new.global_priority);
            node.build_priority = node.build_priority.max(new.priority);
            let path = node.critical_path + 1;
            let inputs = node.inputs.clone();
            for input in inputs {
                if let Some(input) = self.steps.get_mut(&input) {
                    input.critical_path = input.critical_path.max(path);
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
        node.builds
            .iter()
            .filter(|build| {
                self.builds
                    .get_mut(build)
                    .is_some_and(|node| !std::mem::replace(&mut node.started, true))
            })
            .copied()
            .collect()
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
        for build in node.builds {
            if self.builds.get(&build).is_some_and(|b| b.top == step) {
                self.builds.remove(&build);
                effects.succeeded_builds.push(build);
            }
        }
        effects
    }

    /// Removes a cancelled build, and the steps of its closure that no other build in the graph
    /// needs (a step's dependents are needed by fewer builds than it, so they go too); `None` if
    /// the build is not in the graph. Returns the removed steps' nodes, so the caller can unindex
    /// them and stop the running ones.
    pub fn cancel_build(&mut self, build: BuildId) -> Option<Vec<(StepId, StepNode)>> {
        self.keep_going.remove(&build);
        let top = self.builds.remove(&build)?.top;
        let mut closure = Vec::new();
        let mut seen = BTreeSet::new();
        let mut pending = vec![top];
        while let Some(id) = pending.pop() {
            if !seen.insert(id) {
                continue;
            }
            if let Some(node) = self.steps.get(&id) {
                pending.extend(node.inputs.iter().copied());
                closure.push(id);
            }
        }
        let mut removed = Vec::new();
        for id in closure {
            let still_needed = self.steps.get(&id).is_some_and(|node| self.wanted(node));
            if !still_needed && let Some(node) = self.steps.remove(&id) {
                removed.push((id, node));
            }
        }
        Some(removed)
    }

    /// Removes a failed step and every step that depends on it; the builds that needed them
    /// fail. Returns the removed steps' nodes too, so the caller can unindex them.
    pub fn fail(&mut self, step: StepId) -> (Effects, Vec<(StepId, StepNode)>) {
        let mut effects = Effects::default();
        let mut removed = Vec::new();
        let mut pending = vec![step];
        let mut affected_builds = BTreeSet::new();
        while let Some(id) = pending.pop() {
            let Some(node) = self.steps.remove(&id) else {
                continue;
            };
            if id != step {
                effects.dep_failed_steps.push(id);
            }
            pending.extend(node.dependents.iter().copied());
            affected_builds.extend(node.builds.iter().copied());
            removed.push((id, node));
        }
        for build in affected_builds {
            if let Some(node) = self.builds.remove(&build) {
                if node.top == step {
                    effects.failed_builds.push(build);
                } else {
                    effects.dep_failed_builds.push(build);
                }
            }
        }
        effects.dep_failed_steps.sort_unstable();
        (effects, removed)
    }

    /// Removes what only failed builds needed: from the inputs of `removed` (the steps a failure
    /// took out) on, every step that no live build, and no failed keep-going build, needs any
    /// more. Returns them, for the caller to stop and unindex.
    pub fn drop_unwanted(&mut self, removed: &[(StepId, StepNode)]) -> Vec<(StepId, StepNode)> {
        let mut pending: Vec<StepId> = removed
            .iter()
            .flat_map(|(_, node)| node.inputs.iter().copied())
            .collect();
        let mut dropped = Vec::new();
        while let Some(id) = pending.pop() {
            if self.steps.get(&id).is_none_or(|node| self.wanted(node)) {
                continue;
            }
            if let Some(node) = self.steps.remove(&id) {
                // Its dependents are normally gone already: only failed builds needed it.
                pending.extend(node.inputs.iter().chain(&node.dependents).copied());
                dropped.push((id, node));
            }
        }
        dropped
    }

    /// Whether a build that has not ended, or a failed keep-going build, needs the step.
    fn wanted(&self, node: &StepNode) -> bool {
        node.builds
            .iter()
            .any(|build| self.builds.contains_key(build) || self.keep_going.contains(build))
    }
}
