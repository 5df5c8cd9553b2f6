//! Capped exponential backoff between reconnection attempts, shared by the
//! stages that retry (listener → source, shipper → drainer, applier →
//! target).
//!
//! In: a minimum and a maximum delay. Out: the delay before each retry,
//! doubling from the minimum up to the maximum, back to the minimum after
//! [`Backoff::reset`] (a stage resets once a session was established).

use std::time::Duration;

/// Capped exponential backoff.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `min`; `max` below `min` is raised to `min`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The next delay is `min` again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// The delay before the next retry, without advancing.
    pub fn current(&self) -> Duration {
        self.next
    }

    /// The delay before the next retry; the one after it doubles, up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<_> = (0..4).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 350, 350]);
        backoff.reset();
        assert_eq!(backoff.current(), Duration::from_millis(100));
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn a_max_below_the_min_is_the_min() {
        let mut backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(backoff.next_delay(), Duration::from_secs(2));
        assert_eq!(backoff.next_delay(), Duration::from_secs(2));
    }
}
