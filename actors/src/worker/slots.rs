//! Build and substitution slots: counting semaphores where a freed slot wakes exactly
//! one waiter. Waiters are served by priority (the length of the chain of goals
//! waiting on them: the critical path), then first come first served.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};

use crate::goal::GoalId;

#[derive(Debug, Default)]
pub struct Slots {
    capacity: u64,
    holders: HashSet<GoalId>,
    waiting: BinaryHeap<(u64, Reverse<u64>, GoalId)>,
    /// The goals in `waiting` that still wait.
    queued: HashSet<GoalId>,
    /// Waiters that went away before being served (skipped lazily).
    gone: HashSet<GoalId>,
    seq: u64,
}

impl Slots {
    pub fn new(capacity: u64) -> Slots {
        Slots {
            capacity,
            ..Default::default()
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn in_use(&self) -> usize {
        self.holders.len()
    }

    /// Asks for a slot: true when granted at once, else the goal is queued.
    pub fn acquire(&mut self, goal: GoalId, priority: u64) -> bool {
        self.gone.remove(&goal);
        if (self.holders.len() as u64) < self.capacity && self.waiting.is_empty() {
            self.holders.insert(goal);
            return true;
        }
        self.seq += 1;
        self.waiting.push((priority, Reverse(self.seq), goal));
        self.queued.insert(goal);
        false
    }

    /// Frees the goal's slot (or forgets its wait; a goal that neither holds nor
    /// waits for one is no-op); returns the one waiter now granted.
    pub fn release(&mut self, goal: GoalId) -> Option<GoalId> {
        if !self.holders.remove(&goal) {
            if self.queued.remove(&goal) {
                self.gone.insert(goal);
            }
            return None;
        }
        self.grant_next()
    }

    fn grant_next(&mut self) -> Option<GoalId> {
        if (self.holders.len() as u64) >= self.capacity {
            return None;
        }
        while let Some((_, _, g)) = self.waiting.pop() {
            if self.gone.remove(&g) {
                continue;
            }
            self.queued.remove(&g);
            self.holders.insert(g);
            return Some(g);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_slot_wakes_exactly_one_waiter_by_priority_then_fifo() {
        let mut s = Slots::new(1);
        assert!(s.acquire(1, 0));
        assert!(!s.acquire(2, 0));
        assert!(!s.acquire(3, 5));
        assert!(!s.acquire(4, 0));
        assert_eq!(s.release(1), Some(3));
        assert_eq!(s.in_use(), 1);
        assert_eq!(s.release(3), Some(2));
        assert_eq!(s.release(2), Some(4));
        assert_eq!(s.release(4), None);
        assert_eq!(s.in_use(), 0);
    }

    #[test]
    fn gone_waiters_are_skipped_and_capacity_zero_never_grants() {
        let mut s = Slots::new(2);
        assert!(s.acquire(1, 0));
        assert!(s.acquire(2, 0));
        assert!(!s.acquire(3, 0));
        assert!(!s.acquire(4, 0));
        assert_eq!(s.release(3), None);
        assert_eq!(s.release(1), Some(4));
        let mut z = Slots::new(0);
        assert!(!z.acquire(1, 0));
    }

    #[test]
    fn releasing_a_goal_that_never_asked_leaves_nothing_behind() {
        let mut s = Slots::new(1);
        for g in 10..1000 {
            assert_eq!(s.release(g), None);
        }
        assert!(s.gone.is_empty() && s.queued.is_empty());
        assert!(s.acquire(1, 0));
    }
}
