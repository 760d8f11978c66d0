//! Exponential backoff with full jitter, shared by every retry loop.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max: max.max(initial) }
    }

    /// Delay before retry number `attempt` (1-based): uniform in [cap/2, cap] where cap doubles
    /// per attempt up to `max`. Half-jitter keeps a floor, so retries never hammer.
    pub fn delay(&self, attempt: u32) -> Duration {
        let cap = self.ceiling(attempt);
        let floor = cap / 2;
        let span = (cap - floor).as_millis() as u64;
        floor + Duration::from_millis(if span == 0 { 0 } else { rand::rng().random_range(0..=span) })
    }

    fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1).min(30)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_then_cap_and_stay_jittered_within_bounds() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 1..40 {
            let cap = b.ceiling(attempt);
            let d = b.delay(attempt);
            assert!(d >= cap / 2 && d <= cap, "attempt {attempt}: {d:?} outside [{:?}, {cap:?}]", cap / 2);
        }
        assert_eq!(b.ceiling(1), Duration::from_millis(100));
        assert_eq!(b.ceiling(3), Duration::from_millis(400));
        assert_eq!(b.ceiling(30), Duration::from_secs(2));
    }
}
