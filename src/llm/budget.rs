//! What the LLM tier may spend: requests and tokens per minute (the provider's limits, kept
//! on our side so a burst of escalations does not turn into a storm of 429s) and a hard cap on
//! money per hour (from configured prices), so a flood of doubtful messages cannot run up a
//! bill. Sliding windows over what was used. Pure and clock-free: callers pass `now`.
//!
//! The cap is hard: a call reserves its estimated cost (and tokens) before it starts, so calls
//! running side by side cannot all start just under the cap; the reservation becomes what the
//! reply says it used, or stays the estimate when the reply says nothing (`usage` missing) or
//! the call timed out (the server may have done the work); every HTTP attempt counts against
//! requests per minute, retries included.

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
    /// Prompt tokens served from the provider's cache (unset: the prompt price).
    pub cached_prompt_price_per_million: Option<f64>,
    /// No call starts while the last hour's spend is at or above this.
    pub max_spend_per_hour: Option<f64>,
}

impl Limits {
    pub fn validate(&self) -> Result<(), String> {
        if self.requests_per_minute == Some(0) || self.tokens_per_minute == Some(0) {
            return Err("llm: requests_per_minute and tokens_per_minute must be at least 1 (leave them out for no limit)".into());
        }
        let prices = [self.prompt_price_per_million, self.completion_price_per_million];
        if prices.iter().chain(&self.cached_prompt_price_per_million).any(|p| !p.is_finite() || *p < 0.0) {
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

    /// The cost of a reply whose `cached` prompt tokens (of `prompt_tokens`) the provider
    /// served from its prompt cache, at the cached price.
    pub fn cost_with_cached(&self, prompt_tokens: u64, cached: u64, completion_tokens: u64) -> f64 {
        let cached = cached.min(prompt_tokens);
        let cached_price = self.cached_prompt_price_per_million.unwrap_or(self.prompt_price_per_million);
        self.cost(prompt_tokens - cached, completion_tokens) + cached as f64 * cached_price / 1e6
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

/// What a call is expected to use before it is made: the prompt's tokens (estimated from its
/// length) and the longest reply allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Estimate {
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// A started call's hold on the budget, given back to [`Budget::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    id: u64,
    estimate: Estimate,
}

/// How a call ended, for the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Used {
    /// The reply's `usage`: prompt, completion tokens, and of the prompt's those the provider
    /// served from its prompt cache (billed at the cached price).
    Reported(u64, u64, u64),
    /// A reply without usage, or a timeout: the server may have done the work, so the
    /// estimate stands.
    Unknown,
    /// Refused or failed before the model ran (4xx, 429, 5xx, connection): nothing billed.
    Nothing,
}

#[derive(Debug, Clone)]
pub struct Budget {
    limits: Limits,
    /// (when, tokens, reservation id) of HTTP requests in the last minute; a call in flight
    /// holds its estimate; retries are entries of 0 tokens (they count as requests).
    minute: VecDeque<(Instant, u64, u64)>,
    /// (when, cost, reservation id) of calls in the last hour; a call in flight holds its
    /// estimated cost.
    hour: VecDeque<(Instant, f64, u64)>,
    next_id: u64,
}

impl Budget {
    pub fn new(limits: Limits) -> Self {
        Budget { limits, minute: VecDeque::new(), hour: VecDeque::new(), next_id: 1 }
    }

    fn forget(&mut self, now: Instant) {
        while self.minute.front().is_some_and(|(t, _, _)| now.duration_since(*t) >= MINUTE) {
            self.minute.pop_front();
        }
        while self.hour.front().is_some_and(|(t, _, _)| now.duration_since(*t) >= HOUR) {
            self.hour.pop_front();
        }
    }

    /// Spent (and reserved by calls in flight) in the last hour.
    pub fn spent_last_hour(&mut self, now: Instant) -> f64 {
        self.forget(now);
        self.hour.iter().map(|(_, c, _)| c).sum()
    }

    /// Ok: a call expected to use `estimate` may start now, and holds it until
    /// [`finish`](Self::finish); else how long to wait. `elsewhere`: what other replicas spent
    /// in the last hour (the shared ledger), counted against the cap too.
    pub fn try_start(&mut self, now: Instant, estimate: Estimate, elsewhere: f64) -> Result<Reservation, Wait> {
        self.forget(now);
        if let Some(cap) = self.limits.max_spend_per_hour {
            let cost = self.limits.cost(estimate.prompt_tokens, estimate.completion_tokens);
            let mut spent = self.spent_last_hour(now) + elsewhere;
            // A call that alone costs more than the cap may run when nothing else is spent.
            if spent + cost > cap && spent > 0.0 {
                // Until enough of this replica's hour ages out (others' is re-read meanwhile).
                let mut until = Duration::from_secs(5);
                for (t, c, _) in &self.hour {
                    spent -= c;
                    until = HOUR.saturating_sub(now.duration_since(*t));
                    if spent + cost <= cap {
                        break;
                    }
                }
                return Err(Wait::Spend(until.max(Duration::from_millis(50))));
            }
        }
        let tokens = estimate.tokens();
        if let Some(limit) = self.limits.requests_per_minute {
            if self.minute.len() >= limit as usize {
                let oldest = self.minute[self.minute.len() - limit as usize].0;
                return Err(Wait::Requests(MINUTE.saturating_sub(now.duration_since(oldest))));
            }
        }
        if let Some(limit) = self.limits.tokens_per_minute {
            let used: u64 = self.minute.iter().map(|(_, n, _)| n).sum();
            // A call larger than the whole limit may still run alone.
            if used > 0 && used + tokens > limit {
                let mut freed = 0;
                for (t, n, _) in &self.minute {
                    freed += n;
                    if used - freed + tokens <= limit {
                        return Err(Wait::Tokens(MINUTE.saturating_sub(now.duration_since(*t))));
                    }
                }
                return Err(Wait::Tokens(MINUTE));
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.minute.push_back((now, tokens, id));
        let cost = self.limits.cost(estimate.prompt_tokens, estimate.completion_tokens);
        self.hour.push_back((now, cost, id));
        Ok(Reservation { id, estimate })
    }

    /// A call finished after `requests` HTTP attempts: its reservation becomes what it used
    /// (the estimate when unknown). Returns (prompt tokens, completion tokens, cost) counted.
    pub fn finish(&mut self, now: Instant, reservation: Reservation, used: Used, requests: u32) -> (u64, u64, f64) {
        let (prompt, completion, cached) = match used {
            Used::Reported(p, c, cached) => (p, c, cached),
            Used::Unknown => (reservation.estimate.prompt_tokens, reservation.estimate.completion_tokens, 0),
            Used::Nothing => (0, 0, 0),
        };
        let cost = self.limits.cost_with_cached(prompt, cached, completion);
        if let Some(entry) = self.minute.iter_mut().find(|(_, _, id)| *id == reservation.id) {
            entry.1 = prompt + completion;
        }
        if let Some(entry) = self.hour.iter_mut().find(|(_, _, id)| *id == reservation.id) {
            entry.1 = cost;
        }
        // Retries were requests too (requests per minute is the provider's limit on them).
        for _ in 1..requests {
            self.minute.push_back((now, 0, 0));
        }
        (prompt, completion, cost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, seconds: u64) -> Instant {
        t0 + Duration::from_secs(seconds)
    }

    fn tokens(n: u64) -> Estimate {
        Estimate { prompt_tokens: n, completion_tokens: 0 }
    }

    #[test]
    fn requests_per_minute_slide_and_retries_are_requests() {
        let t0 = Instant::now();
        let mut b = Budget::new(Limits { requests_per_minute: Some(3), ..Limits::default() });
        let first = b.try_start(t0, tokens(10), 0.0).unwrap();
        b.finish(at(t0, 1), first, Used::Reported(10, 0, 0), 2); // one retry: two requests
        assert!(b.try_start(at(t0, 10), tokens(10), 0.0).is_ok());
        assert_eq!(
            b.try_start(at(t0, 20), tokens(10), 0.0),
            Err(Wait::Requests(Duration::from_secs(40))),
            "until the first leaves the minute"
        );
        assert!(b.try_start(at(t0, 61), tokens(10), 0.0).is_ok());
    }

    #[test]
    fn tokens_per_minute_count_what_calls_really_used() {
        let t0 = Instant::now();
        let mut b = Budget::new(Limits { tokens_per_minute: Some(1_000), ..Limits::default() });
        let r = b.try_start(t0, tokens(400), 0.0).unwrap();
        b.finish(t0, r, Used::Reported(500, 100, 0), 1); // it used 600, not 400
        assert!(b.try_start(at(t0, 5), tokens(300), 0.0).is_ok());
        assert_eq!(b.try_start(at(t0, 10), tokens(200), 0.0), Err(Wait::Tokens(Duration::from_secs(50))));
        let mut alone = Budget::new(Limits { tokens_per_minute: Some(100), ..Limits::default() });
        assert!(alone.try_start(t0, tokens(5_000), 0.0).is_ok(), "a call larger than the limit runs alone");
        assert!(matches!(alone.try_start(at(t0, 1), tokens(1), 0.0), Err(Wait::Tokens(_))));
    }

    fn capped() -> Budget {
        let limits = Limits {
            prompt_price_per_million: 2.5,
            completion_price_per_million: 10.0,
            max_spend_per_hour: Some(0.01),
            ..Limits::default()
        };
        assert!(limits.validate().is_ok());
        Budget::new(limits)
    }

    // 2,000 prompt + 100 completion tokens = $0.006 a call.
    const CALL: Estimate = Estimate { prompt_tokens: 2_000, completion_tokens: 100 };

    #[test]
    fn the_hourly_spend_cap_is_hard() {
        let t0 = Instant::now();
        let mut b = capped();
        let r = b.try_start(t0, CALL, 0.0).unwrap();
        let (_, _, cost) = b.finish(t0, r, Used::Reported(2_000, 100, 0), 1);
        assert!((cost - 0.006).abs() < 1e-12);
        // A second call would reach 0.012 > 0.01: it waits until the first ages out.
        assert_eq!(b.try_start(at(t0, 600), CALL, 0.0), Err(Wait::Spend(Duration::from_secs(3_000))));
        assert!(b.try_start(at(t0, 3_600), CALL, 0.0).is_ok());
    }

    #[test]
    fn prompt_tokens_from_the_providers_cache_cost_the_cached_price() {
        let t0 = Instant::now();
        // $2.5 / M prompt, $10 / M completion, $1.25 / M cached prompt (OpenAI's half price).
        let limits = Limits {
            prompt_price_per_million: 2.5,
            completion_price_per_million: 10.0,
            cached_prompt_price_per_million: Some(1.25),
            ..Limits::default()
        };
        let mut b = Budget::new(limits.clone());
        let r = b.try_start(t0, CALL, 0.0).unwrap();
        let (_, _, cost) = b.finish(t0, r, Used::Reported(2_000, 100, 1_024), 1);
        let expected = (976.0 * 2.5 + 1_024.0 * 1.25 + 100.0 * 10.0) / 1e6;
        assert!((cost - expected).abs() < 1e-12, "{cost} vs {expected}");
        assert!((b.spent_last_hour(t0) - expected).abs() < 1e-12, "the hour holds the discounted cost");
        // More cached than prompt tokens (a confused server) is never negative.
        assert!((limits.cost_with_cached(10, 50, 0) - 10.0 * 1.25 / 1e6).abs() < 1e-15);
        // Without a cached price, cached tokens cost the prompt price.
        let plain = Limits { cached_prompt_price_per_million: None, ..limits.clone() };
        assert_eq!(plain.cost_with_cached(2_000, 1_024, 100), plain.cost(2_000, 100));
        assert!(Limits { cached_prompt_price_per_million: Some(-1.0), ..limits }.validate().is_err());
    }

    /// Issue 22: calls side by side each started "just under" the cap, which counted only
    /// finished calls; now each holds its estimate from the start.
    #[test]
    fn calls_in_flight_hold_their_estimate_so_concurrent_calls_cannot_pass_the_cap() {
        let t0 = Instant::now();
        let mut b = capped();
        let first = b.try_start(t0, CALL, 0.0).unwrap();
        assert!(matches!(b.try_start(t0, CALL, 0.0), Err(Wait::Spend(_))), "the first's estimate is held");
        // It ends having used less: the room comes back.
        b.finish(at(t0, 1), first, Used::Reported(400, 10, 0), 1);
        assert!(b.try_start(at(t0, 1), CALL, 0.0).is_ok());
    }

    #[test]
    fn a_reply_without_usage_or_a_timeout_costs_the_estimate_and_a_refusal_nothing() {
        let t0 = Instant::now();
        let mut b = capped();
        let r = b.try_start(t0, CALL, 0.0).unwrap();
        assert_eq!(b.finish(t0, r, Used::Unknown, 1).0, 2_000);
        assert!((b.spent_last_hour(t0) - 0.006).abs() < 1e-12, "not 0: the call was made");
        let mut c = capped();
        let r = c.try_start(t0, CALL, 0.0).unwrap();
        c.finish(t0, r, Used::Nothing, 3);
        assert_eq!(c.spent_last_hour(t0), 0.0);
    }

    #[test]
    fn what_other_replicas_spent_counts_against_the_cap() {
        let t0 = Instant::now();
        let mut b = capped();
        assert!(matches!(b.try_start(t0, CALL, 0.005), Err(Wait::Spend(_))), "0.005 elsewhere + 0.006 > 0.01");
        assert!(b.try_start(t0, CALL, 0.003).is_ok());
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
