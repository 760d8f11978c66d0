//! `triage eval --shadow`: a shadow model scored against the answers that replaced the route's
//! model's (an LLM's through `triage escalate`, or a person's), beside the route's model on the
//! same messages.
//!
//! Those messages are the ones the route's model escalated: its hardest, so both accuracies here
//! are lower than on all traffic. What matters is the comparison on the same messages, paired:
//! the messages only one of the two got right decide it (McNemar's exact test), the rest are
//! shared.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::sink::clickhouse::service::ShadowCount;

/// Below this McNemar p-value a difference is reported as one.
pub const SIGNIFICANCE: f64 = 0.05;

/// One shadow model version against the route's model version on one topic.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShadowReport {
    pub topic: String,
    pub primary_model: String,
    pub primary_version: String,
    pub shadow_model: String,
    pub shadow_version: String,
    pub overall: Score,
    /// Per judge (`llm`, `person`).
    pub by_judge: BTreeMap<String, Score>,
    /// Per reference label, most messages first.
    pub by_label: Vec<(String, Score)>,
}

/// Paired counts on messages with a reference answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Score {
    pub messages: u64,
    pub primary_right: u64,
    pub shadow_right: u64,
    /// Right by the shadow, wrong by the route's model (and the reverse).
    pub only_shadow_right: u64,
    pub only_primary_right: u64,
}

impl Score {
    fn add(&mut self, c: &ShadowCount) {
        let (p, s) = (c.primary_right != 0, c.shadow_right != 0);
        self.messages += c.messages;
        self.primary_right += if p { c.messages } else { 0 };
        self.shadow_right += if s { c.messages } else { 0 };
        self.only_shadow_right += if s && !p { c.messages } else { 0 };
        self.only_primary_right += if p && !s { c.messages } else { 0 };
    }

    pub fn primary_accuracy(&self) -> f64 {
        ratio(self.primary_right, self.messages)
    }

    pub fn shadow_accuracy(&self) -> f64 {
        ratio(self.shadow_right, self.messages)
    }

    /// Two-sided exact McNemar p-value: how likely a split of the discordant messages at least
    /// this uneven is if neither model is better.
    pub fn mcnemar_p(&self) -> f64 {
        mcnemar_exact(self.only_shadow_right, self.only_primary_right)
    }

    /// One line a reviewer acts on.
    pub fn verdict(&self) -> String {
        let (b, c) = (self.only_shadow_right, self.only_primary_right);
        if self.messages == 0 {
            return "no message has both a shadow answer and a reference answer yet".into();
        }
        if b + c == 0 {
            return "no difference: both right or both wrong on every message".into();
        }
        let p = self.mcnemar_p();
        if p < SIGNIFICANCE {
            let which = if b > c { "better" } else { "worse" };
            format!("shadow {which} (McNemar p = {p:.3}; {b} messages only it got right, {c} only the route's model)")
        } else {
            format!("no significant difference yet (McNemar p = {p:.3}; {b} vs {c} messages only one got right)")
        }
    }
}

fn ratio(n: u64, d: u64) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 / d as f64
    }
}

/// P(X <= k) * 2 for X ~ Binomial(b + c, 1/2), k = min(b, c), capped at 1; in log space so
/// thousands of discordant pairs do not underflow.
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    let ln_half_n = n as f64 * std::f64::consts::LN_2;
    // ln C(n, i) built incrementally: C(n, i) = C(n, i-1) * (n - i + 1) / i.
    let mut ln_choose = 0.0_f64;
    let mut terms = Vec::with_capacity(k as usize + 1);
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        terms.push(ln_choose - ln_half_n);
    }
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let tail = max.exp() * terms.iter().map(|t| (t - max).exp()).sum::<f64>();
    (2.0 * tail).min(1.0)
}

/// Group the counts by (topic, route model version, shadow version).
pub fn summarize(counts: &[ShadowCount]) -> Vec<ShadowReport> {
    type Key = (String, String, String, String, String);
    type Scores = (Score, BTreeMap<String, Score>, BTreeMap<String, Score>);
    let mut groups: BTreeMap<Key, Scores> = BTreeMap::new();
    for c in counts {
        let key = (c.topic.clone(), c.primary_model.clone(), c.primary_version.clone(), c.shadow_model.clone(), c.shadow_version.clone());
        let (overall, by_judge, by_label) = groups.entry(key).or_default();
        overall.add(c);
        by_judge.entry(c.judge.clone()).or_default().add(c);
        by_label.entry(c.label.clone()).or_default().add(c);
    }
    groups
        .into_iter()
        .map(|((topic, primary_model, primary_version, shadow_model, shadow_version), (overall, by_judge, by_label))| {
            let mut by_label: Vec<(String, Score)> = by_label.into_iter().collect();
            by_label.sort_by(|a, b| b.1.messages.cmp(&a.1.messages).then_with(|| a.0.cmp(&b.0)));
            ShadowReport { topic, primary_model, primary_version, shadow_model, shadow_version, overall, by_judge, by_label }
        })
        .collect()
}

/// The reports as text; `labels` caps the per-label lines of each.
pub fn render(reports: &[ShadowReport], labels: usize) -> String {
    let mut s = String::new();
    if reports.is_empty() {
        s.push_str(
            "no shadow answers joined with LLM or person answers in this window: a route needs `shadow = ...`, \
             and its escalations answered by `triage escalate` (or rows with answered_by = 'person:<name>')\n",
        );
        return s;
    }
    for r in reports {
        let o = &r.overall;
        let _ = writeln!(
            s,
            "{}: shadow {} {} vs route model {} {}, on {} messages answered later by an LLM or a person \
             (the route model's escalations: its hardest messages)",
            r.topic, r.shadow_model, r.shadow_version, r.primary_model, r.primary_version, o.messages
        );
        let _ = writeln!(s, "  accuracy: shadow {:.3}, route model {:.3}", o.shadow_accuracy(), o.primary_accuracy());
        let _ = writeln!(s, "  verdict: {}", o.verdict());
        for (judge, score) in &r.by_judge {
            let _ = writeln!(
                s,
                "  against {judge}: {} messages, shadow {:.3}, route model {:.3}",
                score.messages,
                score.shadow_accuracy(),
                score.primary_accuracy()
            );
        }
        let _ = writeln!(s, "  {:<32} {:>8} {:>8} {:>8}", "reference label", "messages", "shadow", "route");
        for (label, score) in r.by_label.iter().take(labels) {
            let _ = writeln!(s, "  {:<32} {:>8} {:>8.3} {:>8.3}", label, score.messages, score.shadow_accuracy(), score.primary_accuracy());
        }
        if r.by_label.len() > labels {
            let _ = writeln!(s, "  ... {} more labels (--json for all)", r.by_label.len() - labels);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(shadow_version: &str, judge: &str, label: &str, p: u8, s: u8, n: u64) -> ShadowCount {
        ShadowCount {
            topic: "tickets".into(),
            primary_model: "support".into(),
            primary_version: "v7".into(),
            shadow_model: "support".into(),
            shadow_version: shadow_version.into(),
            judge: judge.into(),
            label: label.into(),
            primary_right: p,
            shadow_right: s,
            messages: n,
        }
    }

    #[test]
    fn mcnemar_matches_the_binomial_tail() {
        // 1 vs 9: 2 * (C(10,0) + C(10,1)) / 1024 = 22 / 1024.
        assert!((mcnemar_exact(1, 9) - 22.0 / 1024.0).abs() < 1e-12);
        assert!((mcnemar_exact(9, 1) - 22.0 / 1024.0).abs() < 1e-12);
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // Large counts stay finite and tiny, not 0/NaN from underflow.
        let p = mcnemar_exact(400, 600);
        assert!(p > 0.0 && p < 1e-8, "{p}");
    }

    #[test]
    fn counts_are_paired_per_version_judge_and_label() {
        let counts = [
            count("v8", "llm", "card_lost", 1, 1, 50),
            count("v8", "llm", "card_lost", 0, 1, 30),
            count("v8", "llm", "refund", 1, 0, 5),
            count("v8", "person", "refund", 0, 0, 15),
            count("v9", "llm", "refund", 1, 1, 4),
        ];
        let reports = summarize(&counts);
        assert_eq!(reports.len(), 2);
        let v8 = &reports[0];
        assert_eq!(v8.shadow_version, "v8");
        assert_eq!(v8.overall, Score { messages: 100, primary_right: 55, shadow_right: 80, only_shadow_right: 30, only_primary_right: 5 });
        assert_eq!(v8.by_judge["person"].messages, 15);
        assert_eq!(v8.by_judge["llm"].shadow_right, 80);
        assert_eq!(v8.by_label[0].0, "card_lost");
        assert_eq!(
            v8.by_label[1].1,
            Score { messages: 20, primary_right: 5, shadow_right: 0, only_shadow_right: 0, only_primary_right: 5 }
        );
        assert!(v8.overall.verdict().starts_with("shadow better"), "{}", v8.overall.verdict());
        assert!(reports[1].overall.verdict().starts_with("no difference"));
        let text = render(&reports, 1);
        assert!(text.contains("accuracy: shadow 0.800, route model 0.550"), "{text}");
        assert!(text.contains("... 1 more labels"), "{text}");
    }
}
