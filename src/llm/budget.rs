//! What the LLM tier may spend: requests and tokens per minute (the provider's limits, kept
//! on our side so a burst of escalations does not turn into a storm of 429s) and a hard cap on
//! money per hour (from configured prices), so a flood of doubtful messages cannot run up a
//! bill. Sliding windows over what was actually used. Pure and clock-free: callers pass `now`.
//! (Issue 14 groundwork: `triage escalate` will ask it before every call.)

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    /// Prompt + completion tokens per minute.
    pub tokens_per_minute: Option<u64>,
    /// Prices per million tokens (the provider's; 0 for a self-hosted server).
    pub prompt_price_per_million: f64,
    pub completion_price_per_million: f64,
    /// No call starts while the last hour's spend is at or above this.
    pub max_spend_per_hour: Option<f64>,
}

impl Limits {
    pub fn validate(&self) -> Result<(), String> {
        if self.requests_per_minute == Some(0) || self.tokens_per_minute == Some(0) {
            return Err("llm: requests_per_minute and tokens_per_minute must be at least 1 (leave them out for no limit)".into());
        }
        let prices = [self.prompt_price_per_million, self.completion_price_per_million];
        if prices.iter().any(|p| !p.is_finite() || *p < 0.0) {
            return Err("llm: prices must be numbers >= 0".into());
        }
        if self.max_spend_per_hour.is_some_and(|m| !m.is_finite() || m <= 0.0) {
            return Err("llm: max_spend_per_hour must be above 0 (leave it out for no cap)".into());
        }
        if self.max_spend_per_hour.is_some() && prices.iter().all(|p| *p == 0.0) {
            return Err("llm: max_spend_per_hour needs prompt_price_per_million / completion_price_per_million".into());
        }
        Ok(())
    }

    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        (prompt_tokens as f64 * self.prompt_price_per_million + completion_tokens as f64 * self.completion_price_per_million) / 1e6
    }
}

/// Why a call must wait, and until when.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Wait {
    Requests(Duration),
    Tokens(Duration),
    /// The hourly spend cap is reached.
    Spend(Duration),
}

impl Wait {
    pub fn duration(&self) -> Duration {
        match self {
            Wait::Requests(d) | Wait::Tokens(d) | Wait::Spend(d) => *d,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Budget {
    limits: Limits,
    /// (when, tokens) of calls in the last minute; tokens of a call in flight are its estimate.
    minute: VecDeque<(Instant, u64)>,
    /// (when, cost) of calls in the last hour.
    hour: VecDeque<(Instant, f64)>,
}

impl Budget {
    pub fn new(limits: Limits) -> Self {
        Budget { limits, minute: VecDeque::new(), hour: VecDeque::new() }
    }

    fn forget(&mut self, now: Instant) {
        while self.minute.front().is_some_and(|(t, _)| now.duration_since(*t) >= MINUTE) {
            self.minute.pop_front();
        }
        while self.hour.front().is_some_and(|(t, _)| now.duration_since(*t) >= HOUR) {
            self.hour.pop_front();
        }
    }

    /// Spent in the last hour.
    pub fn spent_last_hour(&mut self, now: Instant) -> f64 {
        self.forget(now);
        self.hour.iter().map(|(_, c)| c).sum()
    }

    /// Ok: a call of about `tokens` may start now (and is counted); else how long to wait.
    pub fn try_start(&mut self, now: Instant, tokens: u64) -> Result<(), Wait> {
        self.forget(now);
        if let Some(cap) = self.limits.max_spend_per_hour {
            let mut spent = self.spent_last_hour(now);
            if spent >= cap {
                // Until enough of the hour's spend ages out.
                let mut until = Duration::ZERO;
                for (t, c) in &self.hour {
                    spent -= c;
                    until = HOUR.saturating_sub(now.duration_since(*t));
                    if spent < cap {
                        break;
                    }
                }
                return Err(Wait::Spend(until));
            }
        }
        if let Some(limit) = self.limits.requests_per_minute {
            if self.minute.len() >= limit as usize {
                let oldest = self.minute[self.minute.len() - limit as usize].0;
                return Err(Wait::Requests(MINUTE.saturating_sub(now.duration_since(oldest))));
            }
        }
        if let Some(limit) = self.limits.tokens_per_minute {
            let used: u64 = self.minute.iter().map(|(_, n)| n).sum();
            // A call larger than the whole limit may still run alone.
            if used > 0 && used + tokens > limit {
                let mut freed = 0;
                for (t, n) in &self.minute {
                    freed += n;
                    if used - freed + tokens <= limit {
                        return Err(Wait::Tokens(MINUTE.saturating_sub(now.duration_since(*t))));
                    }
                }
                return Err(Wait::Tokens(MINUTE));
            }
        }
        self.minute.push_back((now, tokens));
        Ok(())
    }

    /// A call started at `started` (with its estimate counted) finished: count what it really
    /// used, and its cost. Returns the cost.
    pub fn finish(&mut self, started: Instant, estimate: u64, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        if let Some(entry) = self.minute.iter_mut().find(|(t, n)| *t == started && *n == estimate) {
            entry.1 = prompt_tokens + completion_tokens;
        }
        let cost = self.limits.cost(prompt_tokens, completion_tokens);
        self.hour.push_back((started, cost));
        cost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, seconds: u64) -> Instant {
        t0 + Duration::from_secs(seconds)
    }

    #[test]
    fn requests_per_minute_slide() {
        let t0 = Instant::now();
        let mut b = Budget::new(Limits { requests_per_minute: Some(2), ..Limits::default() });
        assert_eq!(b.try_start(t0, 10), Ok(()));
        assert_eq!(b.try_start(at(t0, 10), 10), Ok(()));
        assert_eq!(b.try_start(at(t0, 20), 10), Err(Wait::Requests(Duration::from_secs(40))), "until the first leaves the minute");
        assert_eq!(b.try_start(at(t0, 60), 10), Ok(()));
    }

    #[test]
    fn tokens_per_minute_count_what_calls_really_used() {
        let t0 = Instant::now();
        let mut b = Budget::new(Limits { tokens_per_minute: Some(1_000), ..Limits::default() });
        assert_eq!(b.try_start(t0, 400), Ok(()));
        b.finish(t0, 400, 500, 100); // it used 600, not 400
        assert_eq!(b.try_start(at(t0, 5), 300), Ok(()));
        assert_eq!(b.try_start(at(t0, 10), 200), Err(Wait::Tokens(Duration::from_secs(50))));
        let mut alone = Budget::new(Limits { tokens_per_minute: Some(100), ..Limits::default() });
        assert_eq!(alone.try_start(t0, 5_000), Ok(()), "a call larger than the limit runs alone");
        assert!(matches!(alone.try_start(at(t0, 1), 1), Err(Wait::Tokens(_))));
    }

    #[test]
    fn the_hourly_spend_cap_is_hard() {
        let t0 = Instant::now();
        let limits = Limits {
            prompt_price_per_million: 2.5,
            completion_price_per_million: 10.0,
            max_spend_per_hour: Some(0.01),
            ..Limits::default()
        };
        assert!(limits.validate().is_ok());
        let mut b = Budget::new(limits);
        // 2,000 prompt + 100 completion tokens = $0.006 a call.
        assert_eq!(b.try_start(t0, 2_100), Ok(()));
        assert!((b.finish(t0, 2_100, 2_000, 100) - 0.006).abs() < 1e-12);
        assert_eq!(b.try_start(at(t0, 600), 2_100), Ok(()));
        b.finish(at(t0, 600), 2_100, 2_000, 100);
        assert!((b.spent_last_hour(at(t0, 700)) - 0.012).abs() < 1e-12);
        assert_eq!(b.try_start(at(t0, 700), 2_100), Err(Wait::Spend(Duration::from_secs(2_900))), "until the first call's spend ages out");
        assert_eq!(b.try_start(at(t0, 3_600), 2_100), Ok(()));
    }

    #[test]
    fn limits_that_cannot_work_are_refused() {
        assert!(Limits { requests_per_minute: Some(0), ..Limits::default() }.validate().is_err());
        assert!(Limits { prompt_price_per_million: -1.0, ..Limits::default() }.validate().is_err());
        let no_prices = Limits { max_spend_per_hour: Some(5.0), ..Limits::default() }.validate().unwrap_err();
        assert!(no_prices.contains("price"), "{no_prices}");
        assert!(Limits::default().validate().is_ok(), "no limits at all is allowed (a self-hosted server)");
    }
}
