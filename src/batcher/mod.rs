//! Dynamic batch assembly: which pending messages run together, and when.
//!
//! A batch closes when adding another message would push its padded token count
//! (rows x longest row) past `max_batch_tokens`, when it holds `max_batch_size` messages, or
//! when its oldest message has waited `max_wait`. To pad little, pending messages are grouped
//! by length: up to `bucket_window` batches' worth of messages wait together, the window is
//! split into batches of similar lengths at the least cost (padding plus a fixed cost per
//! batch), and the batch holding the OLDEST pending message runs next (so nobody starves).
//!
//! Each length bucket may run under a smaller batch size than `max_batch_size`: the caps
//! [`tuner::BatchSizeTuner`] measured best on this machine, for texts of that length.
//!
//! Pure and clock-free: callers pass `now`, so tests drive time by hand.

pub mod tuner;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchPolicy {
    /// Most messages in one batch.
    pub max_batch_size: usize,
    /// Most padded tokens (rows x longest row) in one batch.
    pub max_batch_tokens: usize,
    /// Longest a message waits for company before its batch runs anyway (milliseconds).
    pub max_wait_ms: u64,
    /// How many batches' worth of messages are sorted by length together (1: arrival order).
    pub bucket_window: usize,
    /// Fixed cost of running one batch, in tokens. Higher favours fewer, fuller batches over
    /// less padding (GPUs: high; CPUs, where compute is proportional to padded tokens: low).
    pub batch_cost_tokens: usize,
    /// Measure batch sizes up to `max_batch_size` per text length on live traffic and use the
    /// fastest (false: always fill up to `max_batch_size`).
    pub tune_batch_size: bool,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        // Measured on 2 AVX-512 cores (`triage bench --sweep`, BENCHMARKS.md): batches of 8-32
        // sequences beat 64-128 by 15-25% (short texts) and ~25% (e-mail-length ones); GPUs
        // want far larger budgets (README: GPU).
        BatchPolicy {
            max_batch_size: 32,
            max_batch_tokens: 1024,
            max_wait_ms: 20,
            bucket_window: 4,
            batch_cost_tokens: 64,
            tune_batch_size: true,
        }
    }
}

impl BatchPolicy {
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }

    /// Checks that do not need the model; `max_length` is the model's truncation.
    pub fn validate(&self, max_length: usize) -> Result<(), String> {
        if self.max_batch_size == 0 {
            return Err("max_batch_size must be at least 1".into());
        }
        if self.bucket_window == 0 {
            return Err("bucket_window must be at least 1 (1 = arrival order)".into());
        }
        if self.max_batch_tokens < max_length {
            return Err(format!(
                "max_batch_tokens ({}) is below the model's max_length ({max_length}): a full-length message would not fit a batch",
                self.max_batch_tokens
            ));
        }
        Ok(())
    }
}

/// A closed batch, in the order it will run.
#[derive(Debug)]
pub struct Batch<T> {
    pub items: Vec<T>,
    pub lengths: Vec<usize>,
    /// When the oldest member arrived.
    pub oldest: Instant,
    /// The batch size cap it was assembled under (what the tuner credits its speed to).
    pub cap: usize,
}

impl<T> Batch<T> {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn real_tokens(&self) -> usize {
        self.lengths.iter().sum()
    }

    pub fn padded_tokens(&self) -> usize {
        self.lengths.len() * self.lengths.iter().copied().max().unwrap_or(0)
    }

    /// Padded tokens / real tokens (1.0: no padding, an empty batch's too, as the engine's
    /// statistics count it).
    pub fn padding_ratio(&self) -> f64 {
        match self.real_tokens() {
            0 => 1.0,
            real => self.padded_tokens() as f64 / real as f64,
        }
    }
}

struct Pending<T> {
    item: T,
    tokens: usize,
    arrived: Instant,
}

pub struct Assembler<T> {
    policy: BatchPolicy,
    pending: VecDeque<Pending<T>>,
    pending_tokens: usize,
    caps: tuner::SizeCaps,
}

impl<T> Assembler<T> {
    pub fn new(policy: BatchPolicy) -> Self {
        let caps = [policy.max_batch_size; tuner::BUCKET_LIMITS.len()];
        Assembler { policy, pending: VecDeque::new(), pending_tokens: 0, caps }
    }

    /// Batch size caps per length bucket from now on (each at most `max_batch_size`).
    pub fn set_caps(&mut self, caps: tuner::SizeCaps) {
        self.caps = caps.map(|c| c.clamp(1, self.policy.max_batch_size));
    }

    fn cap_for(&self, longest: usize) -> usize {
        self.caps[tuner::bucket_of(longest)]
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn push(&mut self, item: T, tokens: usize, now: Instant) {
        // Zero-length sequences still occupy a row.
        let tokens = tokens.max(1);
        self.pending_tokens += tokens;
        self.pending.push_back(Pending { item, tokens, arrived: now });
    }

    /// When the oldest pending message will have waited `max_wait`.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending.front().map(|p| p.arrived + self.policy.max_wait())
    }

    /// Whether enough is pending that waiting longer cannot improve the next batch.
    pub fn window_full(&self) -> bool {
        let window = self.policy.bucket_window;
        if window == 1 {
            return self.first_fifo_batch_len() < self.pending.len();
        }
        self.pending.len() >= self.policy.max_batch_size * window || self.pending_tokens >= self.policy.max_batch_tokens * window
    }

    /// The next batch if one is due now: the window is full, the oldest message's wait is up,
    /// or `flush` (input ended) and anything is pending.
    pub fn pop_due(&mut self, now: Instant, flush: bool) -> Option<Batch<T>> {
        if self.pending.is_empty() {
            return None;
        }
        let expired = self.deadline().is_some_and(|d| now >= d);
        if flush || expired || self.window_full() {
            Some(self.take_batch())
        } else {
            None
        }
    }

    fn fits(&self, rows: usize, longest: usize) -> bool {
        rows <= self.cap_for(longest) && rows * longest <= self.policy.max_batch_tokens
    }

    fn first_fifo_batch_len(&self) -> usize {
        let mut longest = 0;
        let mut rows = 0;
        for p in &self.pending {
            let next_longest = longest.max(p.tokens);
            if rows > 0 && !self.fits(rows + 1, next_longest) {
                break;
            }
            rows += 1;
            longest = next_longest;
        }
        rows
    }

    /// Remove and return the batch around the oldest pending message.
    fn take_batch(&mut self) -> Batch<T> {
        let chosen: Vec<usize> =
            if self.policy.bucket_window == 1 { (0..self.first_fifo_batch_len()).collect() } else { self.bucket_around_oldest() };
        let mut take = vec![false; self.pending.len()];
        for &i in &chosen {
            take[i] = true;
        }
        let oldest = self.pending.front().map(|p| p.arrived).unwrap_or_else(Instant::now);
        let mut items = Vec::with_capacity(chosen.len());
        let mut lengths = Vec::with_capacity(chosen.len());
        let mut kept = VecDeque::with_capacity(self.pending.len() - chosen.len());
        for (p, taken) in self.pending.drain(..).zip(take) {
            if taken {
                self.pending_tokens -= p.tokens;
                items.push(p.item);
                lengths.push(p.tokens);
            } else {
                kept.push_back(p);
            }
        }
        self.pending = kept;
        let cap = self.cap_for(lengths.iter().copied().max().unwrap_or(1));
        Batch { items, lengths, oldest, cap }
    }

    /// Indices (into `pending`) of the batch holding the oldest message, from the cheapest
    /// split of the length-sorted window into batches. A batch costs `batch_cost_tokens` plus
    /// its padded tokens, so similar lengths run together and a batch only takes in a much
    /// longer neighbour when the fixed cost saved outweighs the padding added.
    fn bucket_around_oldest(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.pending.len()).collect();
        order.sort_by_key(|&i| (self.pending[i].tokens, i));
        let lens: Vec<usize> = order.iter().map(|&i| self.pending[i].tokens).collect();
        let n = lens.len();
        // best[i]: cheapest cost of batching the i shortest; cut[i]: where its last batch starts.
        let mut best = vec![usize::MAX; n + 1];
        let mut cut = vec![0usize; n + 1];
        best[0] = 0;
        for end in 1..=n {
            let longest = lens[end - 1];
            let lowest_start = end.saturating_sub(self.policy.max_batch_size);
            for start in (lowest_start..end).rev() {
                let rows = end - start;
                if rows > 1 && !self.fits(rows, longest) {
                    break;
                }
                let cost = best[start].saturating_add(self.policy.batch_cost_tokens + rows * longest);
                if cost < best[end] {
                    best[end] = cost;
                    cut[end] = start;
                }
            }
        }
        let anchor = order.iter().position(|&i| i == 0).unwrap_or(0);
        let mut end = n;
        while cut[end] > anchor {
            end = cut[end];
        }
        order[cut[end]..end].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(size: usize, tokens: usize, wait_ms: u64, window: usize) -> BatchPolicy {
        BatchPolicy {
            max_batch_size: size,
            max_batch_tokens: tokens,
            max_wait_ms: wait_ms,
            bucket_window: window,
            batch_cost_tokens: 64,
            tune_batch_size: false,
        }
    }

    #[test]
    fn nothing_is_due_before_the_wait_or_a_full_window() {
        let t0 = Instant::now();
        let mut a = Assembler::new(policy(4, 1000, 50, 2));
        a.push("a", 10, t0);
        a.push("b", 10, t0 + Duration::from_millis(5));
        assert!(a.pop_due(t0 + Duration::from_millis(49), false).is_none());
        assert_eq!(a.deadline(), Some(t0 + Duration::from_millis(50)));
        let batch = a.pop_due(t0 + Duration::from_millis(50), false).expect("oldest waited max_wait");
        assert_eq!(batch.items, vec!["a", "b"]);
        assert!(a.is_empty());
    }

    #[test]
    fn batch_size_limit_holds() {
        let t0 = Instant::now();
        let mut a = Assembler::new(policy(3, 10_000, 10, 2));
        for i in 0..6 {
            a.push(i, 5, t0);
        }
        let b = a.pop_due(t0, false).expect("window of 2x3 is full");
        assert_eq!(b.len(), 3);
        assert_eq!(a.len(), 3);
        assert!(a.pop_due(t0, false).is_none(), "3 pending < window of 6, and nobody expired");
        assert_eq!(a.pop_due(t0, true).map(|b| b.len()), Some(3));
    }

    #[test]
    fn token_budget_counts_padding() {
        let t0 = Instant::now();
        // 100 padded tokens: a 40-token message with 3 short ones pads to 4 x 40 = 160.
        let mut a = Assembler::new(policy(16, 100, 10, 1));
        a.push("long", 40, t0);
        for s in ["s1", "s2", "s3"] {
            a.push(s, 5, t0);
        }
        let b = a.pop_due(t0, false).expect("FIFO batch cannot grow: due");
        assert!(b.padded_tokens() <= 100, "padded {}", b.padded_tokens());
        assert_eq!(b.items, vec!["long", "s1"]);
    }

    #[test]
    fn a_message_longer_than_the_budget_still_runs_alone() {
        let t0 = Instant::now();
        let mut a = Assembler::new(policy(8, 50, 10, 4));
        a.push("huge", 80, t0);
        let b = a.pop_due(t0, true).unwrap();
        assert_eq!(b.items, vec!["huge"]);
        // In arrival order (a window of 1) too, and the message after it is not held back.
        let mut fifo = Assembler::new(policy(8, 50, 10, 1));
        fifo.push("huge", 80, t0);
        fifo.push("next", 5, t0);
        let b = fifo.pop_due(t0, false).expect("a batch is ready: the next message cannot join it");
        assert_eq!(b.items, vec!["huge"]);
        assert_eq!(fifo.pop_due(t0, true).map(|b| b.items), Some(vec!["next"]));
        // Among short ones, bucketed: it runs alone and the short ones within the budget.
        let mut mixed = Assembler::new(policy(8, 50, 10, 4));
        for (item, tokens) in [("a", 5), ("huge", 80), ("b", 5)] {
            mixed.push(item, tokens, t0);
        }
        let mut seen = 0;
        while let Some(b) = mixed.pop_due(t0, true) {
            assert!(b.len() == 1 || b.padded_tokens() <= 50, "{:?} ({} padded tokens)", b.items, b.padded_tokens());
            seen += b.len();
        }
        assert_eq!(seen, 3);
    }

    #[test]
    fn bucketing_groups_similar_lengths_and_always_includes_the_oldest() {
        let t0 = Instant::now();
        let mut a = Assembler::new(policy(4, 10_000, 10, 3));
        // Alternate short and long so arrival order mixes them.
        let lens = [100, 5, 98, 6, 99, 7, 97, 8, 96, 9, 95, 10];
        for (i, &l) in lens.iter().enumerate() {
            a.push(i, l, t0);
        }
        let first = a.pop_due(t0, false).expect("window 3x4 = 12 is full");
        assert!(first.items.contains(&0), "oldest (index 0) must be in the batch");
        assert!(first.lengths.iter().all(|&l| l >= 95), "long ones together: {:?}", first.lengths);
        let second = a.pop_due(t0, true).unwrap();
        assert!(second.items.contains(&1), "next oldest leads the next batch");
        assert!(second.lengths.iter().all(|&l| l <= 10), "short ones together: {:?}", second.lengths);
    }

    #[test]
    fn bucketing_pads_less_than_fifo_on_mixed_lengths() {
        let t0 = Instant::now();
        let lens: Vec<usize> = (0..512).map(|i| [12, 140, 30, 90, 18, 60, 128, 9][i % 8] + (i * 7) % 11).collect();
        let ratio = |window: usize| {
            let mut a = Assembler::new(policy(32, 4096, 10, window));
            let (mut real, mut padded) = (0, 0);
            for (i, &l) in lens.iter().enumerate() {
                a.push(i, l, t0);
                while let Some(b) = a.pop_due(t0, false) {
                    real += b.real_tokens();
                    padded += b.padded_tokens();
                }
            }
            while let Some(b) = a.pop_due(t0, true) {
                real += b.real_tokens();
                padded += b.padded_tokens();
            }
            padded as f64 / real as f64
        };
        let fifo = ratio(1);
        let bucketed = ratio(4);
        assert!(bucketed < 1.15, "bucketed padding ratio {bucketed}");
        assert!(fifo > 1.5, "fifo padding ratio {fifo}");
    }

    #[test]
    fn every_item_comes_out_exactly_once() {
        let t0 = Instant::now();
        let mut a = Assembler::new(policy(7, 300, 10, 3));
        let mut seen = Vec::new();
        for i in 0..1000usize {
            a.push(i, 1 + (i * 37) % 64, t0);
            while let Some(b) = a.pop_due(t0, false) {
                assert!(b.len() <= 7 && (b.padded_tokens() <= 300));
                assert!(!b.is_empty(), "a closed batch holds at least one item");
                seen.extend(b.items);
            }
        }
        while let Some(b) = a.pop_due(t0, true) {
            seen.extend(b.items);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn the_tuners_caps_limit_each_length_bucket_and_never_exceed_max_batch_size() {
        let t0 = Instant::now();
        let mut a = Assembler::new(policy(8, 100_000, 10, 1));
        let mut caps = [8; tuner::BUCKET_LIMITS.len()];
        caps[tuner::bucket_of(5)] = 2;
        caps[tuner::bucket_of(100)] = 50;
        a.set_caps(caps);
        for i in 0..4 {
            a.push(i, 5, t0);
        }
        assert!(!a.is_empty() && a.len() == 4);
        let short = a.pop_due(t0, true).expect("flushed");
        assert_eq!((short.len(), short.cap), (2, 2), "short messages' bucket capped at 2");
        assert_eq!(a.pop_due(t0, true).map(|b| b.len()), Some(2));
        assert!(a.is_empty());
        for i in 0..10 {
            a.push(i, 100, t0);
        }
        let long = a.pop_due(t0, true).expect("flushed");
        assert_eq!((long.len(), long.cap), (8, 8), "a cap above max_batch_size is clamped to it");
    }

    #[test]
    fn a_window_is_full_at_window_times_the_batch_limits_in_rows_or_tokens() {
        let t0 = Instant::now();
        // Rows: 3 batches of 4.
        let mut a = Assembler::new(policy(4, 100_000, 1000, 3));
        for i in 0..11 {
            a.push(i, 5, t0);
        }
        assert!(!a.window_full() && a.pop_due(t0, false).is_none(), "11 of 12 rows");
        a.push(11, 5, t0);
        assert!(a.window_full(), "12 rows");
        // Tokens: 3 budgets of 100.
        let mut a = Assembler::new(policy(100, 100, 1000, 3));
        for i in 0..9 {
            a.push(i, 30, t0);
        }
        assert!(!a.window_full() && a.pop_due(t0, false).is_none(), "270 of 300 tokens");
        a.push(9, 30, t0);
        assert!(a.window_full(), "300 tokens");
        // A batch taken out leaves the rest's tokens counted: 7 x 30, then 10 x 30 again.
        assert_eq!(a.pop_due(t0, false).map(|b| b.len()), Some(3), "100-token budget: 3 rows of 30");
        assert!(!a.window_full(), "210 tokens left");
        for i in 10..13 {
            a.push(i, 30, t0);
        }
        assert!(a.window_full(), "300 tokens again");
    }

    #[test]
    fn a_batch_is_empty_only_without_items() {
        let batch = |items: Vec<u8>| Batch { lengths: vec![1; items.len()], items, oldest: Instant::now(), cap: 4 };
        assert!(batch(Vec::new()).is_empty());
        assert!(!batch(vec![7]).is_empty());
    }

    #[test]
    fn a_batch_counts_its_real_and_padded_tokens() {
        let batch = |lengths: Vec<usize>| Batch { items: vec![(); lengths.len()], lengths, oldest: Instant::now(), cap: 4 };
        let mixed = batch(vec![2, 8, 6]);
        assert_eq!((mixed.real_tokens(), mixed.padded_tokens(), mixed.padding_ratio()), (16, 24, 1.5));
        assert_eq!(batch(vec![5, 5]).padding_ratio(), 1.0);
        assert_eq!(batch(Vec::new()).padding_ratio(), 1.0, "empty: no padding, no division by zero");
    }

    #[test]
    fn policy_validation_explains() {
        assert!(policy(0, 100, 1, 1).validate(10).unwrap_err().contains("max_batch_size"));
        assert!(policy(4, 100, 1, 1).validate(128).unwrap_err().contains("max_length"));
        // A budget of exactly one full-length message is enough.
        assert_eq!(policy(4, 128, 1, 1).validate(128), Ok(()));
        assert!(policy(4, 1000, 1, 0).validate(128).unwrap_err().contains("bucket_window"));
    }
}
