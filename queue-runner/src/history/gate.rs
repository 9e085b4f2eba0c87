//! What keeps history pruning from deleting a row that a plan or a submission is about to name.
//! Planning and submitting read steps and derivations, then write rows naming them (edges
//! without foreign keys, steps of old derivations); each holds the gate shared from its first
//! read to its commit, and while a pruning run is under way it names every step and derivation
//! it read. The run deletes each batch holding the gate exclusively, less what was named since
//! its mark: a named row may be reachable again, anything else is as unreachable as the mark
//! found it. The pruner takes the gate only when no plan holds it, and never queues for it: a
//! queued writer would hold every new plan and submission behind the slowest one in progress.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// How often the pruner looks for a moment with no plan in progress.
const RETRY: Duration = Duration::from_millis(20);

/// Shared by ingest, submissions and the pruner of one runner.
#[derive(Debug, Default)]
pub struct PlanGate {
    lock: RwLock<()>,
    /// What plans named since the current run's mark; `None` while no run is under way.
    named: Mutex<Option<Named>>,
}

#[derive(Debug, Default)]
struct Named {
    steps: HashSet<i64>,
    derivations: HashSet<String>,
}

/// A plan or submission in progress; a pruning batch waits until it is dropped.
#[derive(Debug)]
pub struct Planning<'a> {
    gate: &'a PlanGate,
    _shared: RwLockReadGuard<'a, ()>,
}

/// A pruning run under way: plans name what they read until it is dropped.
#[derive(Debug)]
pub struct Marking<'a> {
    gate: &'a PlanGate,
}

/// A pruning batch in progress; plans and submissions wait until it is dropped.
#[derive(Debug)]
pub struct Pruning<'a> {
    gate: &'a PlanGate,
    _exclusive: RwLockWriteGuard<'a, ()>,
}

impl PlanGate {
    /// Enters for a plan or submission, which may read and name any row from now to its commit.
    pub async fn plan(&self) -> Planning<'_> {
        Planning {
            gate: self,
            _shared: self.lock.read().await,
        }
    }

    /// Begins a pruning run, with no plan in progress: what its marks (read after this call)
    /// miss, the plans that follow name.
    pub async fn mark(&self) -> Marking<'_> {
        let _exclusive = self.exclusive().await;
        *self.named() = Some(Named::default());
        Marking { gate: self }
    }

    /// Enters for a pruning batch, once no plan is in progress.
    pub async fn prune(&self) -> Pruning<'_> {
        Pruning {
            gate: self,
            _exclusive: self.exclusive().await,
        }
    }

    /// The gate to itself, taken between plans without waiting in line for it.
    async fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        loop {
            if let Ok(exclusive) = self.lock.try_write() {
                return exclusive;
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    fn named(&self) -> MutexGuard<'_, Option<Named>> {
        self.named.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Planning<'_> {
    /// Names steps this plan read.
    pub fn name_steps(&self, steps: impl IntoIterator<Item = i64>) {
        if let Some(named) = self.gate.named().as_mut() {
            named.steps.extend(steps);
        }
    }

    /// Names derivations this plan or submission read.
    pub fn name_derivations(&self, paths: impl IntoIterator<Item = String>) {
        if let Some(named) = self.gate.named().as_mut() {
            named.derivations.extend(paths);
        }
    }
}

impl Drop for Marking<'_> {
    fn drop(&mut self) {
        *self.gate.named() = None;
    }
}

impl Pruning<'_> {
    /// The steps of `batch` no plan named since the mark.
    #[must_use]
    pub fn unnamed_steps(&self, batch: &[i64]) -> Vec<i64> {
        let named = self.gate.named();
        let named = named.as_ref().map(|named| &named.steps);
        batch
            .iter()
            .copied()
            .filter(|step| !named.is_some_and(|named| named.contains(step)))
            .collect()
    }

    /// The derivations of `batch` no plan or submission named since the mark.
    #[must_use]
    pub fn unnamed_derivations(&self, batch: &[String]) -> Vec<String> {
        let named = self.gate.named();
        let named = named.as_ref().map(|named| &named.derivations);
        batch
            .iter()
            .filter(|path| !named.is_some_and(|named| named.contains(path.as_str())))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::PlanGate;

    #[tokio::test]
    async fn what_a_plan_names_during_a_run_is_spared() {
        let gate = PlanGate::default();
        let before = gate.plan().await;
        before.name_steps([1]);
        drop(before);
        let marking = gate.mark().await;
        let planning = gate.plan().await;
        planning.name_steps([2]);
        planning.name_derivations(["/nix/store/a.drv".to_owned()]);
        drop(planning);
        let pruning = gate.prune().await;
        assert_eq!(pruning.unnamed_steps(&[1, 2, 3]), vec![1, 3]);
        let paths = ["/nix/store/a.drv".to_owned(), "/nix/store/b.drv".to_owned()];
        assert_eq!(pruning.unnamed_derivations(&paths), paths[1..].to_vec());
        drop(pruning);
        drop(marking);
        gate.plan().await.name_steps([4]);
        let _marking = gate.mark().await;
        assert_eq!(gate.prune().await.unnamed_steps(&[2, 4]), vec![2, 4]);
    }

    #[tokio::test]
    async fn a_plan_waits_for_the_batch_in_progress() {
        let gate = PlanGate::default();
        let pruning = gate.prune().await;
        let plan = tokio::time::timeout(std::time::Duration::ZERO, gate.plan()).await;
        assert!(plan.is_err(), "a plan began during a pruning batch");
        drop(pruning);
        drop(gate.plan().await);
    }

    #[tokio::test]
    async fn a_pruner_waiting_for_the_gate_holds_no_plan_back() {
        let gate = PlanGate::default();
        let planning = gate.plan().await;
        let pruner = gate.prune();
        tokio::pin!(pruner);
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), &mut pruner).await;
        assert!(early.is_err(), "a batch began while a plan was in progress");
        let second = tokio::time::timeout(std::time::Duration::from_millis(50), gate.plan()).await;
        assert!(second.is_ok(), "a plan waited behind a pruner");
        drop((planning, second));
        drop(pruner.await);
    }
}
