//! Connected builders: what each offers, what it runs, and the choice of the best builder for a
//! step. The outbox of each is bounded and written with `try_send`, so a slow builder can never
//! block the scheduler.

use std::collections::{BTreeSet, HashMap, HashSet};

use drover_proto::v1::RunnerMessage;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::graph::Requirements;

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
    /// Relative speed.
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

/// What the scheduler sends a builder session: a message, or the error that ends the session.
pub type OutboxItem = Result<RunnerMessage, tonic::Status>;

/// One connected builder.
#[derive(Debug)]
pub struct Machine {
    /// Identifies this connection; a reconnecting builder gets a new one.
    pub session: u64,
    /// What it offers.
    pub capabilities: Capabilities,
    /// Attempts it is running.
    pub running: HashSet<Uuid>,
    /// Messages to it.
    pub outbox: mpsc::Sender<OutboxItem>,
}

impl Machine {
    fn free_slots(&self) -> usize {
        (self.capabilities.max_jobs as usize).saturating_sub(self.running.len())
    }
}

/// Every connected builder, by name.
#[derive(Debug, Default)]
pub struct Machines {
    by_name: HashMap<String, Machine>,
}

impl Machines {
    /// Registers a builder; returns the machine it replaces (the same name reconnecting).
    pub fn join(&mut self, name: String, machine: Machine) -> Option<Machine> {
        self.by_name.insert(name, machine)
    }

    /// Removes a builder if `session` is still its current connection.
    pub fn leave(&mut self, name: &str, session: u64) -> Option<Machine> {
        if self.by_name.get(name).is_some_and(|m| m.session == session) {
            self.by_name.remove(name)
        } else {
            None
        }
    }

    /// A builder by name.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Machine> {
        self.by_name.get_mut(name)
    }

    /// Whether any builder has a free slot.
    #[must_use]
    pub fn any_free(&self) -> bool {
        self.by_name
            .values()
            .any(|machine| machine.free_slots() > 0)
    }

    /// The best builder with a free slot for `requirements`: the fastest, then the least busy,
    /// then by name for determinism.
    #[must_use]
    pub fn best_for(&self, requirements: &Requirements) -> Option<&str> {
        self.by_name
            .iter()
            .filter(|(_, machine)| {
                machine.free_slots() > 0 && machine.capabilities.can_run(requirements)
            })
            .max_by(|(a_name, a), (b_name, b)| {
                a.capabilities
                    .speed_factor
                    .total_cmp(&b.capabilities.speed_factor)
                    .then(a.free_slots().cmp(&b.free_slots()))
                    .then(b_name.cmp(a_name))
            })
            .map(|(name, _)| name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|item| (*item).to_owned()).collect()
    }

    fn caps(systems: &[&str], supported: &[&str], mandatory: &[&str]) -> Capabilities {
        Capabilities {
            systems: set(systems),
            supported_features: set(supported),
            mandatory_features: set(mandatory),
            max_jobs: 1,
            speed_factor: 1.0,
        }
    }

    fn needs(system: &str, features: &[&str]) -> Requirements {
        Requirements {
            system: system.to_owned(),
            features: set(features),
        }
    }

    #[test]
    fn matching_follows_systems_features_and_mandatory_features() {
        let plain = caps(&["x86_64-linux", "i686-linux"], &["kvm"], &[]);
        assert!(plain.can_run(&needs("x86_64-linux", &[])));
        assert!(plain.can_run(&needs("i686-linux", &["kvm"])));
        assert!(plain.can_run(&needs("builtin", &[])));
        assert!(!plain.can_run(&needs("aarch64-linux", &[])));
        assert!(!plain.can_run(&needs("x86_64-linux", &["big-parallel"])));
        let special = caps(&["x86_64-linux"], &[], &["benchmark"]);
        assert!(special.can_run(&needs("x86_64-linux", &["benchmark"])));
        assert!(!special.can_run(&needs("x86_64-linux", &[])));
        assert!(!special.can_run(&needs("builtin", &[])));
    }

    #[test]
    fn the_fastest_free_builder_wins() {
        let (outbox, _receiver) = mpsc::channel(1);
        let mut machines = Machines::default();
        let mut slow = caps(&["x86_64-linux"], &[], &[]);
        slow.speed_factor = 1.0;
        let mut fast = slow.clone();
        fast.speed_factor = 2.0;
        for (name, capabilities) in [("slow", slow), ("fast", fast)] {
            machines.join(
                name.to_owned(),
                Machine {
                    session: 1,
                    capabilities,
                    running: HashSet::new(),
                    outbox: outbox.clone(),
                },
            );
        }
        let requirements = needs("x86_64-linux", &[]);
        assert_eq!(machines.best_for(&requirements), Some("fast"));
        machines
            .get_mut("fast")
            .unwrap()
            .running
            .insert(Uuid::new_v4());
        assert_eq!(machines.best_for(&requirements), Some("slow"));
        machines
            .get_mut("slow")
            .unwrap()
            .running
            .insert(Uuid::new_v4());
        assert_eq!(machines.best_for(&requirements), None);
        assert!(!machines.any_free());
    }
}
