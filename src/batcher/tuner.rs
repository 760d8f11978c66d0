//! The batch size that tunes itself: the best batch size depends on the CPU (AVX-512 VNNI
//! machines win with batches of 8-32; on an AVX2 machine batch size 1 beat them on e-mail-length
//! text) and on the text length, so no fixed default is right everywhere. Per length bucket
//! (the batch's longest row, in powers of two), the tuner has each candidate size measured on
//! live batches (messages per second of inference time), then uses the best; now and then it
//! measures the neighbours of the best again, so a change of load or machine is followed.
//!
//! Noise: a size's figure is the median of its latest per-batch rates; how far off that median
//! may be is its standard error (from the rates' interquartile range and their number). Two
//! sizes are *within noise* when their medians differ by less than twice their combined
//! standard error (about 95% confidence), or by under 3%. The first walk down (from the largest
//! size) ends at the first size clearly slower than the best so far: the curve has turned
//! (measuring sizes is cheap: a few dozen batches each). The size in use is replaced only by one
//! clearly faster, never on noise (a switch on noise is a coin toss that moves from run to run),
//! and each recheck that changes nothing doubles the wait before the next (up to 16x
//! `recheck_every`); a recheck that finds a clearly faster size moves to it and rechecks at the
//! base interval again.
//!
//! Pure and clock-free: the engine reports each batch's rows and inference seconds; tests
//! drive it with a synthetic cost model.

use serde::Serialize;

/// Length buckets: the batch's longest row up to 8, 16, ..., 512 tokens, then anything longer.
pub const BUCKET_LIMITS: [usize; 8] = [8, 16, 32, 64, 128, 256, 512, usize::MAX];

pub fn bucket_of(longest: usize) -> usize {
    // The limits below it; never all of them, as the last is usize::MAX.
    BUCKET_LIMITS.iter().take_while(|&&limit| longest > limit).count()
}

/// The batch size caps in force, one per length bucket: what the assembler reads (a copy, so
/// it never waits on the tuner's lock while it splits a window).
pub type SizeCaps = [usize; BUCKET_LIMITS.len()];

#[derive(Debug, Clone, Copy)]
pub struct TunerSettings {
    /// A candidate is measured once it ran this many batches...
    pub min_batches: u32,
    /// ... and this many messages (or `min_batches` x 8 batches when traffic is too thin).
    pub min_rows: u64,
    /// After this many batches of a bucket at its best size, its neighbours are measured again.
    pub recheck_every: u32,
}

impl Default for TunerSettings {
    fn default() -> Self {
        TunerSettings { min_batches: 5, min_rows: 48, recheck_every: 400 }
    }
}

/// The least noise assumed: the median of a few quiet batches can look tighter than it is.
const NOISE_FLOOR: f64 = 0.03;

/// Rechecks that change nothing back off to this multiple of `recheck_every` at most.
const MAX_RECHECK_BACKOFF: u32 = 16;

/// Per-batch rates kept per candidate: the median of the latest ones is its figure, so a
/// batch slowed by something else (the first run of a new shape growing ONNX Runtime's arena,
/// the other session hogging the memory bus, a preempted thread) does not decide.
const SAMPLES_KEPT: usize = 15;

#[derive(Debug, Clone, Default)]
struct Measure {
    batches: u32,
    rows: u64,
    /// Real (unpadded) tokens per second of each recent batch: within a bucket, lengths still
    /// vary by up to 2x, and the size changes which lengths run together.
    rates: std::collections::VecDeque<f64>,
}

impl Measure {
    fn add(&mut self, rows: usize, tokens: usize, seconds: f64) {
        self.batches += 1;
        self.rows += rows as u64;
        if self.rates.len() == SAMPLES_KEPT {
            self.rates.pop_front();
        }
        self.rates.push_back(tokens as f64 / seconds);
    }

    fn per_second(&self) -> f64 {
        let mut rates: Vec<f64> = self.rates.iter().copied().collect();
        if rates.is_empty() {
            return 0.0;
        }
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    }

    /// How far off its figure (the median) may be: the standard error of a median of n
    /// samples, 1.25 sigma / sqrt(n), with sigma estimated robustly from the interquartile range.
    fn uncertainty(&self) -> f64 {
        let mut rates: Vec<f64> = self.rates.iter().copied().collect();
        rates.sort_by(f64::total_cmp);
        let n = rates.len();
        if n < 4 {
            return f64::INFINITY;
        }
        let sigma = (rates[(3 * n) / 4] - rates[n / 4]) / 1.349;
        1.2533 * sigma / (n as f64).sqrt()
    }

    fn enough(&self, s: &TunerSettings) -> bool {
        self.batches >= s.min_batches && (self.rows >= s.min_rows || self.batches >= s.min_batches * 8)
    }

    /// Keep the latest half, so the figure follows the machine's present.
    fn age(&mut self) {
        let keep = self.rates.len() / 2;
        while self.rates.len() > keep {
            self.rates.pop_front();
        }
        self.batches = self.rates.len() as u32;
        self.rows /= 2;
    }
}

#[derive(Debug, Clone)]
struct Bucket {
    measures: Vec<Measure>,
    /// Candidates (indices) still to measure in this round; empty: exploiting `best`.
    to_measure: Vec<usize>,
    best: usize,
    since_check: u32,
    /// Batches between rechecks now: doubles after each recheck that changed nothing.
    recheck_every: u32,
    /// The first walk down is over: `best` is a choice made on measurements (before, it is
    /// only the size the walk started from, and deserves no hysteresis).
    chosen: bool,
}

#[derive(Debug, Clone)]
pub struct BatchSizeTuner {
    candidates: Vec<usize>,
    buckets: Vec<Bucket>,
    settings: TunerSettings,
}

/// What one bucket uses and what it measured (for `triage bench` and the log).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BucketChoice {
    /// Batches whose longest row is at most this many tokens (None: longer than every limit).
    pub max_tokens: Option<usize>,
    pub batch_size: usize,
    pub settled: bool,
    /// (candidate size, real tokens per second of inference time) for the measured ones.
    pub measured: Vec<(usize, f64)>,
}

impl BatchSizeTuner {
    /// Candidates: powers of two up to `max_batch_size`, and that size itself.
    pub fn new(max_batch_size: usize, settings: TunerSettings) -> Self {
        let max = max_batch_size.max(1);
        let mut candidates: Vec<usize> = std::iter::successors(Some(1usize), |c| Some(c * 2)).take_while(|&c| c < max).collect();
        candidates.push(max);
        // Measured from the largest down: the first batches of a fresh worker run as before.
        let order: Vec<usize> = (0..candidates.len()).rev().collect();
        let bucket = Bucket {
            measures: vec![Measure::default(); candidates.len()],
            to_measure: order,
            best: candidates.len() - 1,
            since_check: 0,
            recheck_every: settings.recheck_every.max(1),
            chosen: false,
        };
        BatchSizeTuner { buckets: vec![bucket; BUCKET_LIMITS.len()], candidates, settings }
    }

    /// The cap each bucket runs at now.
    pub fn caps(&self) -> SizeCaps {
        let mut caps = [0; BUCKET_LIMITS.len()];
        for (cap, bucket) in caps.iter_mut().zip(&self.buckets) {
            let index = bucket.to_measure.first().copied().unwrap_or(bucket.best);
            *cap = self.candidates[index];
        }
        caps
    }

    /// One batch ran: its longest row, the cap it was assembled under, its rows, their real
    /// tokens and the inference seconds it took.
    pub fn record(&mut self, longest: usize, cap: usize, rows: usize, tokens: usize, seconds: f64) {
        let Some(index) = self.candidates.iter().position(|&c| c == cap) else { return };
        if rows == 0 || !seconds.is_finite() || seconds <= 0.0 {
            return;
        }
        let settings = self.settings;
        let bucket = &mut self.buckets[bucket_of(longest)];
        bucket.measures[index].add(rows, tokens.max(rows), seconds);
        match bucket.to_measure.first().copied() {
            Some(current) => {
                // Batches assembled before the tuner moved on still count for their own cap.
                bucket.to_measure.retain(|&c| !bucket.measures[c].enough(&settings));
                // Throughput rises then falls with the batch size: the walk down ends at the
                // first size clearly slower than the best so far (beyond noise): the curve has
                // turned. Sizes within noise of each other do not end it: a flat stretch can
                // come before the peak (e-mail-length text measured 16 = 32 < 8 here).
                if bucket.measures[index].enough(&settings) {
                    let this = &bucket.measures[index];
                    let turned = bucket
                        .measures
                        .iter()
                        .filter(|m| m.enough(&settings))
                        .any(|best| best.per_second() > this.per_second() && !within_noise(this, best));
                    if turned {
                        bucket.to_measure.retain(|&c| c > index);
                    }
                }
                if bucket.to_measure.is_empty() || !bucket.to_measure.contains(&current) {
                    let previous = bucket.best;
                    let leader = best_measured(&bucket.measures, previous, &settings);
                    // Hysteresis: leave the size in use only for one clearly faster.
                    let stay = bucket.chosen
                        && leader != previous
                        && bucket.measures[previous].enough(&settings)
                        && within_noise(&bucket.measures[leader], &bucket.measures[previous]);
                    bucket.best = if stay { previous } else { leader };
                    if bucket.to_measure.is_empty() {
                        bucket.chosen = true;
                        let base = settings.recheck_every.max(1);
                        bucket.recheck_every = if bucket.best == previous {
                            bucket.recheck_every.saturating_mul(2).min(base.saturating_mul(MAX_RECHECK_BACKOFF))
                        } else {
                            base
                        };
                    }
                }
            }
            None => {
                bucket.since_check += 1;
                if bucket.since_check >= bucket.recheck_every {
                    bucket.since_check = 0;
                    let best = bucket.best;
                    // The best keeps its latest figures; its neighbours start afresh.
                    bucket.measures[best].age();
                    let neighbours = [best.checked_sub(1), Some(best + 1).filter(|&n| n < self.candidates.len())];
                    for n in neighbours.into_iter().flatten() {
                        bucket.measures[n] = Measure::default();
                        bucket.to_measure.push(n);
                    }
                    if !bucket.measures[best].enough(&settings) {
                        bucket.to_measure.push(best);
                    }
                }
            }
        }
    }

    pub fn choices(&self) -> Vec<BucketChoice> {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, b)| b.measures.iter().any(|m| m.batches > 0))
            .map(|(i, b)| BucketChoice {
                max_tokens: (BUCKET_LIMITS[i] != usize::MAX).then_some(BUCKET_LIMITS[i]),
                batch_size: self.candidates[b.to_measure.first().copied().unwrap_or(b.best)],
                settled: b.to_measure.is_empty(),
                measured: self
                    .candidates
                    .iter()
                    .zip(&b.measures)
                    .filter(|(_, m)| m.batches > 0)
                    .map(|(&c, m)| (c, m.per_second()))
                    .collect(),
            })
            .collect()
    }
}

/// Two candidates whose figures differ by less than twice their combined uncertainty (about
/// 95% confidence that the difference is not real), or by less than NOISE_FLOOR.
fn within_noise(a: &Measure, b: &Measure) -> bool {
    let (ra, rb) = (a.per_second(), b.per_second());
    let tolerance = (2.0 * a.uncertainty().hypot(b.uncertainty())).max(NOISE_FLOOR * ra.max(rb));
    (ra - rb).abs() <= tolerance
}

/// The fully measured candidate with the highest throughput (ties: the smaller, for latency);
/// when none is fully measured yet, any measured one.
fn best_measured(measures: &[Measure], fallback: usize, settings: &TunerSettings) -> usize {
    let complete = measures.iter().any(|m| m.enough(settings));
    let mut best: Option<(usize, f64)> = None;
    for (i, m) in measures.iter().enumerate() {
        if m.batches == 0 || (complete && !m.enough(settings)) {
            continue;
        }
        if best.is_none_or(|(_, rate)| m.per_second() > rate) {
            best = Some((i, m.per_second()));
        }
    }
    best.map_or(fallback, |(i, _)| i)
}

/// One line per bucket for the log and `triage bench`.
pub fn describe(choices: &[BucketChoice]) -> String {
    choices
        .iter()
        .map(|c| {
            let span = c.max_tokens.map_or("longer".to_string(), |t| format!("<= {t} tokens"));
            let settled = if c.settled { "" } else { " (measuring)" };
            let measured: Vec<String> = c.measured.iter().map(|(size, rate)| format!("{size}: {rate:.0} tokens/s")).collect();
            format!("{span}: batch size {}{settled} [{}]", c.batch_size, measured.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seconds to run a batch on a synthetic machine: a fixed cost per batch plus a cost per
    /// padded token that grows with the batch beyond `sweet` rows (cache spills), as measured
    /// on an AVX2 machine with long texts.
    fn machine(rows: usize, longest: usize, fixed: f64, per_token: f64, sweet: usize) -> f64 {
        let spill = if rows > sweet { 1.0 + 0.15 * (rows - sweet) as f64 / sweet as f64 } else { 1.0 };
        fixed + per_token * (rows * longest) as f64 * spill
    }

    fn drive(tuner: &mut BatchSizeTuner, longest: usize, batches: usize, cost: impl Fn(usize) -> f64) {
        for _ in 0..batches {
            let cap = tuner.caps()[bucket_of(longest)];
            tuner.record(longest, cap, cap, cap * longest, cost(cap));
        }
    }

    /// A measure of batches whose real-token rates are 1, 2, ..., n per second, 4 rows each.
    fn measure_of(n: usize) -> Measure {
        let mut m = Measure::default();
        for rate in 1..=n {
            m.add(4, rate, 1.0);
        }
        m
    }

    #[test]
    fn a_measure_is_the_median_of_its_latest_rates_with_a_robust_standard_error() {
        assert_eq!(measure_of(3).uncertainty(), f64::INFINITY, "three samples say too little");
        // Quartiles 2 and 4: sigma = 2 / 1.349, error = 1.2533 sigma / sqrt(4).
        let four = measure_of(4);
        assert!((four.uncertainty() - 1.2533 * (2.0 / 1.349) / 2.0).abs() < 1e-12, "{}", four.uncertainty());
        assert_eq!(four.per_second(), 3.0);
        // Only the latest 15 are kept: 6..=20, median 13.
        assert_eq!(measure_of(20).per_second(), 13.0);
    }

    #[test]
    fn a_measure_is_enough_after_min_batches_and_min_rows_or_eight_times_the_batches() {
        let settings = TunerSettings { min_batches: 5, min_rows: 1000, recheck_every: 400 };
        assert!(!measure_of(4).enough(&settings), "too few batches");
        assert!(!measure_of(39).enough(&settings), "156 rows, 39 batches");
        assert!(measure_of(40).enough(&settings), "thin traffic: 8 x min_batches batches");
        assert!(measure_of(5).enough(&TunerSettings { min_rows: 20, ..settings }), "5 batches of 4 rows");
    }

    #[test]
    fn batches_with_no_rows_or_no_measurable_time_are_not_counted() {
        let mut t = BatchSizeTuner::new(32, TunerSettings::default());
        let cap = t.candidates[0];
        for (rows, seconds) in [(0, 0.01), (4, 0.0), (4, -1.0), (4, f64::NAN), (4, f64::INFINITY)] {
            t.record(10, cap, rows, 40, seconds);
        }
        assert_eq!(t.buckets[bucket_of(10)].measures[0].batches, 0, "nothing counted");
        t.record(10, cap, 4, 40, 0.01);
        assert_eq!(t.buckets[bucket_of(10)].measures[0].batches, 1);
    }

    #[test]
    fn ageing_keeps_the_latest_half_of_a_measure() {
        let mut m = measure_of(15);
        m.age();
        assert_eq!((m.rates.len(), m.batches, m.rows), (7, 7, 30));
        assert_eq!(m.rates.iter().copied().collect::<Vec<_>>(), (9..=15).map(f64::from).collect::<Vec<_>>());
        assert_eq!(m.per_second(), 12.0);
    }

    #[test]
    fn candidates_are_powers_of_two_up_to_the_maximum() {
        let t = BatchSizeTuner::new(24, TunerSettings::default());
        assert_eq!(t.candidates, vec![1, 2, 4, 8, 16, 24]);
        assert_eq!(BatchSizeTuner::new(1, TunerSettings::default()).candidates, vec![1]);
        assert_eq!(t.caps(), [24; 8], "a fresh tuner starts at the configured size");
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(9), 1);
        assert_eq!(bucket_of(128), 4);
        assert_eq!(bucket_of(10_000), 7);
        assert_eq!((bucket_of(8), bucket_of(512), bucket_of(513), bucket_of(usize::MAX)), (0, 6, 7, 7));
    }

    #[test]
    fn each_length_settles_on_its_own_fastest_size() {
        let mut t = BatchSizeTuner::new(32, TunerSettings::default());
        // Short texts: a large fixed cost per batch, so big batches win.
        drive(&mut t, 20, 200, |rows| machine(rows, 20, 2e-3, 1e-5, 64));
        // Long texts: little fixed cost and spills beyond 2 rows: tiny batches win.
        drive(&mut t, 120, 200, |rows| machine(rows, 120, 1e-4, 1e-5, 2));
        let choices = t.choices();
        let short = choices.iter().find(|c| c.max_tokens == Some(32)).unwrap();
        let long = choices.iter().find(|c| c.max_tokens == Some(128)).unwrap();
        assert!(short.settled && long.settled, "{}", describe(&choices));
        assert_eq!(short.batch_size, 32, "{}", describe(&choices));
        assert!(long.batch_size <= 2, "{}", describe(&choices));
        assert_eq!(t.caps()[bucket_of(120)], long.batch_size);
        assert_eq!(t.caps()[bucket_of(5)], 32, "untouched buckets keep the configured size");
    }

    #[test]
    fn exploration_is_bounded_and_rechecks_follow_a_changed_machine() {
        let settings = TunerSettings { min_batches: 3, min_rows: 16, recheck_every: 50 };
        let mut t = BatchSizeTuner::new(8, settings);
        let first = |rows| machine(rows, 60, 5e-3, 1e-6, 64);
        drive(&mut t, 60, 300, first);
        while !t.choices()[0].settled {
            drive(&mut t, 60, 1, first); // a recheck may be under way: let it finish
        }
        assert_eq!(t.caps()[bucket_of(60)], 8);
        // The machine changes (say, the pod moved to a node where big batches spill): the
        // rechecks walk the choice down one neighbour at a time.
        drive(&mut t, 60, 2_000, |rows| machine(rows, 60, 1e-5, 1e-5, 1) * if rows > 1 { 3.0 } else { 1.0 });
        assert!(t.caps()[bucket_of(60)] <= 2, "{}", describe(&t.choices()));
    }

    /// Seeded factors uniform in 1 +- `spread` (xorshift: the same sequence on every machine).
    fn uniform_noise(mut seed: u64, spread: f64) -> impl FnMut() -> f64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            1.0 - spread + 2.0 * spread * (seed % 10_000) as f64 / 10_000.0
        }
    }

    /// A flat machine: sizes 4 to 32 all run at the same tokens per second, each batch +-10%
    /// at random (a busy 2-core VM). Nothing is to be gained by measuring or switching.
    #[test]
    fn sizes_within_noise_end_the_exploration_and_back_the_rechecks_off() {
        let settings = TunerSettings::default();
        let mut t = BatchSizeTuner::new(32, settings);
        let mut noise = uniform_noise(0x2545_f491_4f6c_dd1d, 0.1);
        let (mut switches, mut off_best, mut last_choice) = (0, 0, None);
        let batches = 40_000;
        for _ in 0..batches {
            let cap = t.caps()[bucket_of(20)];
            let per_token = if cap >= 4 { 1e-5 } else { 3e-5 };
            t.record(20, cap, cap, cap * 20, per_token * (cap * 20) as f64 * noise());
            let choice = &t.choices()[0];
            if !choice.settled {
                off_best += 1;
            } else if last_choice != Some(choice.batch_size) {
                switches += usize::from(last_choice.is_some());
                last_choice = Some(choice.batch_size);
            }
        }
        let choice = &t.choices()[0];
        let sizes: Vec<usize> = choice.measured.iter().map(|(size, _)| *size).collect();
        assert!(!sizes.contains(&1), "the first clearly slower size (2) ends the walk down: {}", describe(&t.choices()));
        assert!(choice.batch_size >= 4, "{}", describe(&t.choices()));
        // Rechecks every 400 batches without backoff would spend 100 of them measuring and
        // switch on noise; backing off, a handful.
        assert!(off_best < batches / 200, "{off_best} of {batches} batches spent measuring: {}", describe(&t.choices()));
        assert!(switches <= 2, "{switches} changes of the size in use, on noise: {}", describe(&t.choices()));
    }

    /// Per-batch rates in a worker vary widely (lengths within a bucket, the other threads):
    /// the size the first walk starts from must not keep its place by that noise.
    #[test]
    fn the_first_walk_picks_the_fastest_size_however_noisy_the_batches() {
        let mut t = BatchSizeTuner::new(32, TunerSettings::default());
        let mut noise = uniform_noise(0x9e37_79b9_7f4a_7c15, 0.3);
        while !t.choices().first().is_some_and(|c| c.settled) {
            let cap = t.caps()[bucket_of(20)];
            let slow = if cap == 32 { 1.25 } else { 1.0 };
            t.record(20, cap, cap, cap * 20, 1e-5 * slow * (cap * 20) as f64 * noise());
        }
        assert_ne!(t.choices()[0].batch_size, 32, "32 is 25% slower than the rest: {}", describe(&t.choices()));
    }

    #[test]
    fn a_size_clearly_slower_than_the_best_ends_the_walk_down_even_when_close() {
        let mut t = BatchSizeTuner::new(32, TunerSettings::default());
        // 16 runs 8% slower than 32 (beyond the 3% noise floor of these quiet figures), and
        // the smaller sizes slower still: measuring them would only cost throughput.
        drive(&mut t, 20, 100, |rows| (rows * 20) as f64 * 1e-5 * if rows == 32 { 1.0 } else { 1.08 + 0.05 * (16 / rows) as f64 });
        let choice = &t.choices()[0];
        assert!(choice.settled && choice.batch_size == 32, "{}", describe(&t.choices()));
        assert_eq!(choice.measured.iter().map(|(size, _)| *size).collect::<Vec<_>>(), vec![16, 32], "8 and below never measured");
    }

    #[test]
    fn sizes_far_below_the_best_end_the_exploration() {
        let mut t = BatchSizeTuner::new(32, TunerSettings::default());
        // A GPU-like cost: almost all fixed per batch. 16 is half as fast as 32: stop there.
        drive(&mut t, 20, 100, |_| 1e-2);
        let choice = &t.choices()[0];
        assert!(choice.settled && choice.batch_size == 32, "{}", describe(&t.choices()));
        assert_eq!(choice.measured.iter().map(|(size, _)| *size).collect::<Vec<_>>(), vec![16, 32], "1 to 8 never measured");
    }

    #[test]
    fn batches_made_under_an_older_cap_count_for_that_cap() {
        let mut t = BatchSizeTuner::new(4, TunerSettings { min_batches: 1, min_rows: 1, recheck_every: 1_000 });
        assert_eq!(t.caps()[0], 4);
        t.record(8, 1, 1, 8, 0.001); // measured out of turn: cap 1 is done
        t.record(8, 4, 4, 32, 0.001);
        t.record(8, 2, 2, 16, 0.01);
        assert!(t.choices()[0].settled, "{:?}", t.choices());
        assert_eq!(t.caps()[0], 4, "4 rows in 1 ms beat 1 row in 1 ms");
        t.record(8, 3, 3, 24, 0.001); // not a candidate: ignored
        t.record(8, 4, 0, 0, 0.001); // empty: ignored
        assert_eq!(t.choices()[0].measured.len(), 3);
    }
}
