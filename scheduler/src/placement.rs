//! Placement: which runnable step goes to which builder. Runnable steps are indexed by class
//! (one class per distinct [`Requirements`]), each an ordered set; every class also keeps the
//! builders that can run it and have a free slot, ordered fastest first, then least loaded.
//! Choosing the next assignment looks at the head of each class that has a free builder:
//! O(classes + log n), however many runnable steps match no free builder.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};

use super::fleet::Standing;
use super::graph::Order;
use super::types::{Capabilities, ClassId, Requirements, SessionId, StepId};

/// How a free builder ranks for a class: smaller is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    /// `speed_factor` as bits: for positive finite floats the bit patterns order like the
    /// values.
    speed: Reverse<u64>,
    /// Running jobs as a fraction of `max_jobs`, scaled to an integer.
    load: u64,
    session: SessionId,
}

#[derive(Debug)]
struct Class {
    requirements: Requirements,
    runnable: BTreeSet<Order>,
    free: BTreeSet<Rank>,
    /// Connected builders that can run it, free or not.
    capable: usize,
}

/// A connected builder as placement sees it.
#[derive(Debug)]
pub struct Builder {
    /// Its name, from its certificate.
    pub name: String,
    /// What it offers.
    pub capabilities: Capabilities,
    /// Jobs it runs now.
    pub running: u32,
    /// Whether it takes work.
    pub standing: Standing,
    classes: Vec<ClassId>,
}

impl Builder {
    fn rank(&self, session: SessionId) -> Option<Rank> {
        let max = self.capabilities.max_jobs;
        (self.running < self.standing.job_limit(max)).then(|| Rank {
            speed: Reverse(self.capabilities.speed_factor.to_bits()),
            load: (u64::from(self.running) << 32) / u64::from(max.max(1)),
            session,
        })
    }
}

/// Classes, their runnable steps and free builders.
#[derive(Debug, Default)]
pub struct Placement {
    classes: Vec<Class>,
    by_requirements: HashMap<Requirements, ClassId>,
    builders: HashMap<SessionId, Builder>,
    by_name: HashMap<String, SessionId>,
}

impl Placement {
    /// The class of `requirements`, created (and matched against every builder) if new.
    pub fn class_for(&mut self, requirements: &Requirements) -> ClassId {
        if let Some(class) = self.by_requirements.get(requirements) {
            return *class;
        }
        let id = self.classes.len();
        let mut free = BTreeSet::new();
        let mut capable = 0;
        for (session, builder) in &mut self.builders {
            if builder.capabilities.can_run(requirements) {
                builder.classes.push(id);
                free.extend(builder.rank(*session));
                capable += 1;
            }
        }
        self.classes.push(Class {
            requirements: requirements.clone(),
            runnable: BTreeSet::new(),
            free,
            capable,
        });
        self.by_requirements.insert(requirements.clone(), id);
        id
    }

    /// Puts a step in line.
    pub fn add_runnable(&mut self, class: ClassId, order: Order) {
        if let Some(class) = self.classes.get_mut(class) {
            class.runnable.insert(order);
        }
    }

    /// Takes a step out of line.
    pub fn remove_runnable(&mut self, class: ClassId, order: &Order) {
        if let Some(class) = self.classes.get_mut(class) {
            class.runnable.remove(order);
        }
    }

    /// Runnable steps waiting in line, across classes.
    #[must_use]
    pub fn runnable_len(&self) -> usize {
        self.classes.iter().map(|class| class.runnable.len()).sum()
    }

    /// Registers a builder session; returns the session of the same name it replaces.
    pub fn join(
        &mut self,
        session: SessionId,
        name: String,
        capabilities: Capabilities,
        standing: Standing,
    ) -> Option<SessionId> {
        let replaced = self.by_name.insert(name.clone(), session);
        let classes: Vec<ClassId> = self
            .classes
            .iter()
            .enumerate()
            .filter(|(_, class)| capabilities.can_run(&class.requirements))
            .map(|(id, _)| id)
            .collect();
        let builder = Builder {
            name,
            capabilities,
            running: 0,
            standing,
            classes,
        };
        self.set_rank(None, builder.rank(session), &builder.classes);
        for class in &builder.classes {
            self.classes[*class].capable += 1;
        }
        self.builders.insert(session, builder);
        replaced
    }

    /// Removes a builder session.
    pub fn leave(&mut self, session: SessionId) -> Option<Builder> {
        let builder = self.builders.remove(&session)?;
        if self.by_name.get(&builder.name) == Some(&session) {
            self.by_name.remove(&builder.name);
        }
        self.set_rank(builder.rank(session), None, &builder.classes);
        for class in &builder.classes {
            self.classes[*class].capable -= 1;
        }
        Some(builder)
    }

    /// Classes that have runnable steps and no connected builder that can run them.
    pub fn without_a_builder(&self) -> impl Iterator<Item = ClassId> + '_ {
        self.classes
            .iter()
            .enumerate()
            .filter(|(_, class)| class.capable == 0 && !class.runnable.is_empty())
            .map(|(id, _)| id)
    }

    /// Classes with runnable steps, with how many.
    pub fn waiting_classes(&self) -> impl Iterator<Item = (ClassId, u64)> + '_ {
        self.classes
            .iter()
            .enumerate()
            .filter(|(_, class)| !class.runnable.is_empty())
            .map(|(id, class)| (id, class.runnable.len() as u64))
    }

    /// The connected builders that can run `class`, free or not, as matched when they joined
    /// or the class was made.
    pub fn capable_builders(&self, class: ClassId) -> impl Iterator<Item = &Builder> + '_ {
        self.builders
            .values()
            .filter(move |builder| builder.classes.contains(&class))
    }

    /// What steps of `class` need.
    #[must_use]
    pub fn requirements(&self, class: ClassId) -> Option<&Requirements> {
        self.classes.get(class).map(|class| &class.requirements)
    }

    /// The runnable steps of `class`, in line order.
    #[must_use]
    pub fn runnable(&self, class: ClassId) -> Vec<Order> {
        self.classes
            .get(class)
            .map(|class| class.runnable.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The slots of every connected builder that takes work.
    #[must_use]
    pub fn slots(&self) -> u64 {
        self.builders
            .values()
            .map(|builder| u64::from(builder.standing.job_limit(builder.capabilities.max_jobs)))
            .sum()
    }

    /// The session of the builder `name`, if it is connected.
    #[must_use]
    pub fn session_of(&self, name: &str) -> Option<SessionId> {
        self.by_name.get(name).copied()
    }

    /// A connected builder session.
    #[must_use]
    pub fn builder(&self, session: SessionId) -> Option<&Builder> {
        self.builders.get(&session)
    }

    /// Every connected builder session.
    pub fn builders(&self) -> impl Iterator<Item = (SessionId, &Builder)> {
        self.builders
            .iter()
            .map(|(session, builder)| (*session, builder))
    }

    /// One more job runs on `session`.
    pub fn occupy(&mut self, session: SessionId) {
        self.update(session, |builder| builder.running += 1);
    }

    /// Changes whether `session` takes work.
    pub fn set_standing(&mut self, session: SessionId, change: impl FnOnce(&mut Standing)) {
        self.update(session, |builder| change(&mut builder.standing));
    }

    /// One job fewer runs on `session`.
    pub fn release(&mut self, session: SessionId) {
        self.update(session, |builder| {
            builder.running = builder.running.saturating_sub(1);
        });
    }

    /// Changes a builder and ranks it again in its classes.
    fn update(&mut self, session: SessionId, change: impl FnOnce(&mut Builder)) {
        let Some(builder) = self.builders.get_mut(&session) else {
            return;
        };
        let old = builder.rank(session);
        change(builder);
        let new = builder.rank(session);
        let classes = builder.classes.clone();
        self.set_rank(old, new, &classes);
    }

    fn set_rank(&mut self, old: Option<Rank>, new: Option<Rank>, classes: &[ClassId]) {
        if old == new {
            return;
        }
        for class in classes {
            let class = &mut self.classes[*class];
            if let Some(old) = &old {
                class.free.remove(old);
            }
            if let Some(new) = new {
                class.free.insert(new);
            }
        }
    }

    /// The best free builder of `class` other than `session`, if there is one.
    #[must_use]
    pub fn other_free(&self, class: ClassId, session: SessionId) -> Option<SessionId> {
        self.classes
            .get(class)?
            .free
            .iter()
            .map(|rank| rank.session)
            .find(|other| *other != session)
    }

    /// The next assignment: the best runnable step that some free builder can take, and the
    /// best such builder. Nothing is changed; the caller starts the step and occupies the slot.
    #[must_use]
    pub fn next(&self) -> Option<(StepId, ClassId, SessionId)> {
        self.classes
            .iter()
            .enumerate()
            .filter_map(|(id, class)| {
                let builder = class.free.first()?;
                let step = class.runnable.first()?;
                Some((step, id, builder.session))
            })
            .min_by_key(|(step, _, _)| **step)
            .map(|(step, class, session)| (step.step, class, session))
    }
}
