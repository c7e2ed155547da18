//! One table of the core's timers, like quinn-proto's `connection/timer.rs`: the fixed
//! timers by name, and one deadline per chunk request in flight.
//!
//! [`Mesh::poll_timeout`](super::Mesh::poll_timeout) is the earliest of
//! [`TimerTable::next_timeout`] and the delayed pulls of gossip (which keep their times
//! with the objects they wait for).

use crate::time::Instant;
use alloc::collections::BTreeSet;

/// The fixed timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Timer {
    /// Next anti-entropy digest to one random peer (armed at the first peer).
    AntiEntropy = 0,
    /// Next rollout tick: re-evaluate rollouts, flush reports, reveal stalled super-seeds.
    Tick = 1,
    /// Downloads pause until then after the store failed to keep a chunk.
    StoreBackoff = 2,
}

const TIMER_COUNT: usize = 3;

/// The deadlines of the core.
#[derive(Debug, Default)]
pub(super) struct TimerTable {
    fixed: [Option<Instant>; TIMER_COUNT],
    /// (deadline, request id) of every chunk request in flight.
    requests: BTreeSet<(Instant, u64)>,
}

impl TimerTable {
    /// Arm `timer` for `at` (re-arming replaces the previous deadline).
    pub(super) fn set(&mut self, timer: Timer, at: Instant) {
        self.fixed[timer as usize] = Some(at);
    }

    /// Disarm `timer`.
    pub(super) fn stop(&mut self, timer: Timer) {
        self.fixed[timer as usize] = None;
    }

    /// When `timer` fires, if armed.
    pub(super) fn get(&self, timer: Timer) -> Option<Instant> {
        self.fixed[timer as usize]
    }

    /// Is `timer` armed and due at `now`?
    pub(super) fn is_due(&self, timer: Timer, now: Instant) -> bool {
        self.get(timer).is_some_and(|t| t <= now)
    }

    /// Arm the timeout of request `id`.
    pub(super) fn set_request(&mut self, deadline: Instant, id: u64) {
        self.requests.insert((deadline, id));
    }

    /// Disarm the timeout of request `id` (armed for `deadline`).
    pub(super) fn stop_request(&mut self, deadline: Instant, id: u64) {
        self.requests.remove(&(deadline, id));
    }

    /// The next request whose timeout is due at `now`, earliest first; it is disarmed.
    pub(super) fn pop_due_request(&mut self, now: Instant) -> Option<u64> {
        let &(t, id) = self.requests.first()?;
        if t > now {
            return None;
        }
        self.requests.pop_first();
        Some(id)
    }

    /// The earliest deadline in the table.
    pub(super) fn next_timeout(&self) -> Option<Instant> {
        self.fixed
            .iter()
            .flatten()
            .copied()
            .chain(self.requests.first().map(|(t, _)| *t))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::time::Duration;

    fn at(ms: u64) -> Instant {
        Instant::ZERO + Duration::from_millis(ms)
    }

    #[test]
    fn next_timeout_is_the_earliest_armed() {
        let mut t = TimerTable::default();
        assert_eq!(t.next_timeout(), None);
        t.set(Timer::Tick, at(50));
        t.set(Timer::AntiEntropy, at(30));
        assert_eq!(t.next_timeout(), Some(at(30)));
        t.set_request(at(10), 7);
        assert_eq!(t.next_timeout(), Some(at(10)));
        t.stop_request(at(10), 7);
        t.stop(Timer::AntiEntropy);
        assert_eq!(t.next_timeout(), Some(at(50)));
        t.set(Timer::Tick, at(70));
        assert_eq!(t.get(Timer::Tick), Some(at(70)), "re-arming replaces");
    }

    #[test]
    fn due_requests_pop_in_deadline_order_and_only_when_due() {
        let mut t = TimerTable::default();
        t.set_request(at(20), 1);
        t.set_request(at(10), 2);
        t.set_request(at(30), 3);
        assert_eq!(t.pop_due_request(at(5)), None);
        assert_eq!(t.pop_due_request(at(25)), Some(2));
        assert_eq!(t.pop_due_request(at(25)), Some(1));
        assert_eq!(t.pop_due_request(at(25)), None);
        assert_eq!(t.next_timeout(), Some(at(30)));
    }

    #[test]
    fn is_due_needs_an_armed_timer() {
        let mut t = TimerTable::default();
        assert!(!t.is_due(Timer::StoreBackoff, at(100)));
        t.set(Timer::StoreBackoff, at(100));
        assert!(!t.is_due(Timer::StoreBackoff, at(99)));
        assert!(t.is_due(Timer::StoreBackoff, at(100)));
    }
}
