//! What an upstream answered, remembered so that a path is not asked again for every build that
//! needs it: a miss for the configured negative TTL (an upstream fills up, so not for long), a
//! hit for a day. Bounded: past [`MAX_ANSWERS`] entries the expired ones go, and if that is not
//! enough, all of them.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a hit is believed.
const HIT_TTL: Duration = Duration::from_hours(24);

/// The most answers kept per upstream (about 100 bytes each).
const MAX_ANSWERS: usize = 1_000_000;

/// Answers by store path hash part.
#[derive(Debug)]
pub struct Answers {
    miss_ttl: Duration,
    kept: Mutex<HashMap<String, (bool, Instant)>>,
}

impl Answers {
    /// Nothing remembered yet; misses are believed for `miss_ttl`.
    pub fn new(miss_ttl: Duration) -> Self {
        Self {
            miss_ttl,
            kept: Mutex::new(HashMap::new()),
        }
    }

    /// The answer about `hash_part`, while it is fresh.
    pub fn get(&self, hash_part: &str) -> Option<bool> {
        self.get_at(hash_part, Instant::now())
    }

    /// Remembers that the upstream has `hash_part`, or not.
    pub fn insert(&self, hash_part: &str, found: bool) {
        self.insert_at(hash_part, found, Instant::now());
    }

    fn get_at(&self, hash_part: &str, now: Instant) -> Option<bool> {
        let kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        kept.get(hash_part)
            .filter(|(_, expires)| now < *expires)
            .map(|(found, _)| *found)
    }

    fn insert_at(&self, hash_part: &str, found: bool, now: Instant) {
        let ttl = if found { HIT_TTL } else { self.miss_ttl };
        if ttl.is_zero() {
            return;
        }
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.len() >= MAX_ANSWERS {
            kept.retain(|_, (_, expires)| now < *expires);
            if kept.len() >= MAX_ANSWERS {
                kept.clear();
            }
        }
        kept.insert(hash_part.to_owned(), (found, now + ttl));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_miss_is_believed_for_its_ttl_and_a_hit_for_a_day() {
        let now = Instant::now();
        let answers = Answers::new(Duration::from_hours(1));
        answers.insert_at("missing", false, now);
        answers.insert_at("present", true, now);
        assert_eq!(answers.get_at("missing", now), Some(false));
        assert_eq!(
            answers.get_at("missing", now + Duration::from_hours(1)),
            None
        );
        assert_eq!(
            answers.get_at("present", now + Duration::from_hours(1)),
            Some(true)
        );
        assert_eq!(answers.get_at("present", now + HIT_TTL), None);
        assert_eq!(answers.get_at("never asked", now), None);
    }

    #[test]
    fn a_zero_ttl_remembers_no_miss() {
        let answers = Answers::new(Duration::ZERO);
        answers.insert("missing", false);
        assert_eq!(answers.get("missing"), None);
    }
}
