//! A token bucket that spaces out the commands sent to one server.
//!
//! In: how many commands are about to be sent. Out: how long to wait before
//! sending them. The bucket holds at most [`BURST_SECS`] worth of commands,
//! so a verify that was idle (between passes) cannot then fire a burst
//! larger than a twentieth of a second of its budget; a pipeline of `n`
//! commands waits until the last of its `n` tokens is due.

use std::time::{Duration, Instant};

/// Most credit the bucket accumulates, in seconds of its rate.
pub const BURST_SECS: f64 = 0.05;

/// Rate limit for one server; `qps == 0` means unlimited.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    /// Time one command costs; `None` when unlimited.
    interval: Option<Duration>,
    /// Credit the bucket can hold (at least one command).
    burst: Duration,
    /// When the last reserved command is due.
    next_due: Option<Instant>,
}

impl RateLimiter {
    pub fn new(qps: u32) -> RateLimiter {
        let interval = (qps > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(qps)));
        let burst = interval
            .map(|i| i.max(Duration::from_secs_f64(BURST_SECS)))
            .unwrap_or_default();
        RateLimiter {
            interval,
            burst,
            next_due: None,
        }
    }

    /// Reserves `commands` tokens at `now`; returns how long to wait before
    /// sending them.
    pub fn reserve(&mut self, commands: u32, now: Instant) -> Duration {
        let Some(interval) = self.interval else {
            return Duration::ZERO;
        };
        // Unused credit older than the burst window is forgotten.
        let floor = now.checked_sub(self.burst).unwrap_or(now);
        let start = match self.next_due {
            Some(due) if due > floor => due,
            _ => floor,
        };
        let due = start + interval.saturating_mul(commands);
        self.next_due = Some(due);
        due.saturating_duration_since(now)
    }

    /// Waits until `commands` more may be sent.
    pub async fn acquire(&mut self, commands: usize) {
        let commands = u32::try_from(commands).unwrap_or(u32::MAX);
        let wait = self.reserve(commands, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let mut limiter = RateLimiter::new(0);
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(limiter.reserve(1000, now), Duration::ZERO);
        }
    }

    #[test]
    fn spaces_commands_at_the_rate_after_a_small_burst() {
        let mut limiter = RateLimiter::new(100);
        let now = Instant::now() + Duration::from_secs(1);
        // 5 commands of credit (50 ms at 100/s) go at once.
        for _ in 0..5 {
            assert_eq!(limiter.reserve(1, now), Duration::ZERO);
        }
        assert_eq!(limiter.reserve(1, now), Duration::from_millis(10));
        // 200 more at the same instant: the last one is due ~2 s later.
        let mut wait = Duration::ZERO;
        for _ in 0..200 {
            wait = limiter.reserve(1, now);
        }
        assert!(
            wait >= Duration::from_millis(2000) && wait <= Duration::from_millis(2020),
            "{wait:?}"
        );
    }

    #[test]
    fn a_pipeline_waits_for_its_last_token_and_idle_credit_is_capped() {
        let mut limiter = RateLimiter::new(1000);
        let start = Instant::now() + Duration::from_secs(1);
        let wait = limiter.reserve(550, start);
        assert_eq!(wait, Duration::from_millis(500));
        // Idle for a minute: only 50 ms of credit is kept.
        let later = start + Duration::from_secs(60);
        assert_eq!(limiter.reserve(50, later), Duration::ZERO);
        assert_eq!(limiter.reserve(100, later), Duration::from_millis(100));
    }
}
