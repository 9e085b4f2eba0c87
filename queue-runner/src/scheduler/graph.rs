//! The in-memory step graph: which unfinished steps exist, what each waits for, which builds need
//! it, and which are runnable in priority order. Pure data, no I/O: the scheduler mirrors every
//! change into PostgreSQL, which stays the source of truth; this is a cache rebuilt at start.
//!
//! Completing a step costs O(its dependents and builds), never O(queue).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use nix_primitives::{Hash, IngestionMethod, StorePath};

/// Step id (the `steps.id` column).
pub type StepId = i64;
/// Build id (the `builds.id` column).
pub type BuildId = i64;

/// What a builder must offer to run a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirements {
    /// The derivation's system; `builtin` runs anywhere.
    pub system: String,
    /// Its `requiredSystemFeatures`.
    pub features: BTreeSet<String>,
}

/// A step to add to the graph.
#[derive(Debug, Clone)]
pub struct NewStep {
    /// Its id.
    pub id: StepId,
    /// The derivation it builds.
    pub drv_path: StorePath,
    /// The derivation's exact text, sent to builders.
    pub drv_text: Vec<u8>,
    /// Its outputs, name to path.
    pub outputs: BTreeMap<String, StorePath>,
    /// What a builder needs.
    pub requirements: Requirements,
    /// Input sources and the outputs of input derivations it uses.
    pub input_paths: BTreeSet<StorePath>,
    /// For a fixed-output derivation, how its output is hashed and the hash it must have.
    pub fixed: Option<(IngestionMethod, Hash)>,
    /// Unfinished steps it depends on (already in the graph or in the same batch).
    pub inputs: Vec<StepId>,
}

/// Where a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepState {
    /// Waiting for this many inputs.
    Waiting(usize),
    /// Ready for a builder.
    Runnable,
    /// Given to a builder.
    Running,
}

/// An unfinished step.
#[derive(Debug)]
pub struct StepNode {
    /// The step as added.
    pub step: NewStep,
    /// Where it is.
    pub state: StepState,
    /// The highest priority of the builds that need it.
    pub priority: i32,
    dependents: Vec<StepId>,
    builds: Vec<BuildId>,
}

#[derive(Debug)]
struct BuildNode {
    top: StepId,
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
    runnable: BTreeSet<(Reverse<i32>, StepId)>,
}

impl StepGraph {
    /// An empty graph.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a step is in the graph (unfinished and known).
    #[must_use]
    pub fn contains(&self, step: StepId) -> bool {
        self.steps.contains_key(&step)
    }

    /// A step, if unfinished.
    #[must_use]
    pub fn step(&self, step: StepId) -> Option<&StepNode> {
        self.steps.get(&step)
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

    /// Adds a build whose unfinished closure is `closure` (step ids already in the graph) plus
    /// `new_steps`. Returns the steps that became runnable.
    pub fn add_build(
        &mut self,
        build: BuildId,
        priority: i32,
        top: StepId,
        closure: &[StepId],
        new_steps: Vec<NewStep>,
    ) -> Vec<StepId> {
        let new_ids: Vec<StepId> = new_steps.iter().map(|step| step.id).collect();
        for step in new_steps {
            self.steps.insert(
                step.id,
                StepNode {
                    state: StepState::Waiting(0),
                    priority,
                    dependents: Vec::new(),
                    builds: Vec::new(),
                    step,
                },
            );
        }
        for id in &new_ids {
            let inputs = self.steps[id].step.inputs.clone();
            let mut missing = 0;
            for input in inputs {
                if let Some(node) = self.steps.get_mut(&input) {
                    node.dependents.push(*id);
                    missing += 1;
                }
            }
            if let Some(node) = self.steps.get_mut(id) {
                node.state = StepState::Waiting(missing);
            }
        }
        self.builds.insert(build, BuildNode { top });
        let mut runnable = Vec::new();
        for id in closure.iter().chain(&new_ids) {
            let Some(node) = self.steps.get_mut(id) else {
                continue;
            };
            node.builds.push(build);
            if node.state == StepState::Runnable && priority > node.priority {
                self.runnable.remove(&(Reverse(node.priority), *id));
                self.runnable.insert((Reverse(priority), *id));
            }
            node.priority = node.priority.max(priority);
            if node.state == StepState::Waiting(0) {
                node.state = StepState::Runnable;
                self.runnable.insert((Reverse(node.priority), *id));
                runnable.push(*id);
            }
        }
        runnable
    }

    /// Runnable steps, highest priority first, then oldest.
    pub fn runnable(&self) -> impl Iterator<Item = &StepNode> + '_ {
        self.runnable
            .iter()
            .filter_map(|(_, id)| self.steps.get(id))
    }

    /// Marks a runnable step as given to a builder.
    pub fn start(&mut self, step: StepId) {
        if let Some(node) = self.steps.get_mut(&step)
            && node.state == StepState::Runnable
        {
            self.runnable.remove(&(Reverse(node.priority), step));
            node.state = StepState::Running;
        }
    }

    /// Puts a running step back in the runnable set (its builder left, or failed for reasons not
    /// its own).
    pub fn requeue(&mut self, step: StepId) {
        if let Some(node) = self.steps.get_mut(&step)
            && node.state == StepState::Running
        {
            node.state = StepState::Runnable;
            self.runnable.insert((Reverse(node.priority), step));
        }
    }

    /// Removes a succeeded step; its dependents may become runnable and builds succeed.
    pub fn succeed(&mut self, step: StepId) -> Effects {
        let mut effects = Effects::default();
        let Some(node) = self.remove(step) else {
            return effects;
        };
        for dependent in node.dependents {
            if let Some(next) = self.steps.get_mut(&dependent)
                && let StepState::Waiting(missing) = next.state
            {
                next.state = if missing <= 1 {
                    self.runnable.insert((Reverse(next.priority), dependent));
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

    /// Removes a failed step and every step that depends on it; the builds that needed them fail.
    pub fn fail(&mut self, step: StepId) -> Effects {
        let mut effects = Effects::default();
        let mut pending = vec![step];
        let mut affected_builds = BTreeSet::new();
        while let Some(id) = pending.pop() {
            let Some(node) = self.remove(id) else {
                continue;
            };
            if id != step {
                effects.dep_failed_steps.push(id);
            }
            pending.extend(node.dependents);
            affected_builds.extend(node.builds);
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
        effects
    }

    fn remove(&mut self, step: StepId) -> Option<StepNode> {
        let node = self.steps.remove(&step)?;
        self.runnable.remove(&(Reverse(node.priority), step));
        Some(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(id: StepId, inputs: &[StepId]) -> NewStep {
        let path = format!("/nix/store/{}-s{id}.drv", "0".repeat(32));
        NewStep {
            id,
            drv_path: StorePath::from_absolute(&path).unwrap(),
            drv_text: Vec::new(),
            outputs: BTreeMap::new(),
            requirements: Requirements {
                system: "x86_64-linux".to_owned(),
                features: BTreeSet::new(),
            },
            input_paths: BTreeSet::new(),
            fixed: None,
            inputs: inputs.to_vec(),
        }
    }

    fn runnable_ids(graph: &StepGraph) -> Vec<StepId> {
        graph.runnable().map(|node| node.step.id).collect()
    }

    /// 1 ← 2, 1 ← 3, {2, 3} ← 4: a diamond with 4 on top.
    fn diamond(graph: &mut StepGraph, build: BuildId) {
        let runnable = graph.add_build(
            build,
            0,
            4,
            &[],
            vec![step(4, &[2, 3]), step(2, &[1]), step(3, &[1]), step(1, &[])],
        );
        assert_eq!(runnable, vec![1]);
    }

    #[test]
    fn a_diamond_runs_bottom_up_and_its_build_succeeds_with_the_top() {
        let mut graph = StepGraph::new();
        diamond(&mut graph, 10);
        graph.start(1);
        assert!(runnable_ids(&graph).is_empty());
        let effects = graph.succeed(1);
        assert_eq!(effects.runnable, vec![2, 3]);
        graph.start(2);
        graph.start(3);
        assert!(graph.succeed(2).runnable.is_empty());
        assert_eq!(graph.succeed(3).runnable, vec![4]);
        graph.start(4);
        assert_eq!(graph.succeed(4).succeeded_builds, vec![10]);
        assert!(graph.is_empty());
    }

    #[test]
    fn shared_steps_serve_every_build_and_priorities_rise() {
        let mut graph = StepGraph::new();
        diamond(&mut graph, 10);
        let runnable = graph.add_build(11, 5, 5, &[2, 1], vec![step(5, &[2])]);
        assert!(runnable.is_empty());
        assert_eq!(graph.step(1).unwrap().priority, 5);
        assert_eq!(graph.step(3).unwrap().priority, 0);
        graph.start(1);
        graph.succeed(1);
        assert_eq!(runnable_ids(&graph), vec![2, 3]);
        graph.start(2);
        assert_eq!(graph.succeed(2).runnable, vec![5]);
        assert_eq!(graph.succeed(5).succeeded_builds, vec![11]);
    }

    #[test]
    fn a_failure_fails_its_dependents_and_the_builds_that_need_them() {
        let mut graph = StepGraph::new();
        diamond(&mut graph, 10);
        graph.add_build(11, 0, 2, &[2, 1], vec![]);
        graph.add_build(12, 0, 6, &[], vec![step(6, &[])]);
        graph.start(1);
        graph.succeed(1);
        graph.start(2);
        let effects = graph.fail(2);
        assert_eq!(effects.dep_failed_steps, vec![4]);
        assert_eq!(effects.failed_builds, vec![11]);
        assert_eq!(effects.dep_failed_builds, vec![10]);
        assert!(graph.contains(3), "an independent branch keeps building");
        assert!(graph.contains(6));
    }

    #[test]
    fn a_requeued_step_is_runnable_again() {
        let mut graph = StepGraph::new();
        diamond(&mut graph, 10);
        graph.start(1);
        graph.requeue(1);
        assert_eq!(runnable_ids(&graph), vec![1]);
    }
}
