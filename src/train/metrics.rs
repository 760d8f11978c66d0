//! Classification quality: accuracy, macro-F1, per-label precision / recall, the most confused
//! pairs, the accuracy-vs-escalation curve of a confidence threshold, and AUROC.

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LabelQuality {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Confusion {
    pub truth: String,
    pub predicted: String,
    pub count: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub examples: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_label: Vec<LabelQuality>,
    pub confused: Vec<Confusion>,
}

/// Single-label quality of `predicted` against `truth` (class indices into `labels`).
pub fn report(truth: &[usize], predicted: &[usize], labels: &[String], most_confused: usize) -> Report {
    let k = labels.len();
    let mut matrix = vec![vec![0usize; k]; k];
    for (&t, &p) in truth.iter().zip(predicted) {
        matrix[t][p] += 1;
    }
    let correct: usize = (0..k).map(|i| matrix[i][i]).sum();
    let per_label: Vec<LabelQuality> = (0..k)
        .map(|i| {
            let support: usize = matrix[i].iter().sum();
            let predicted_i: usize = (0..k).map(|t| matrix[t][i]).sum();
            let precision = ratio(matrix[i][i], predicted_i);
            let recall = ratio(matrix[i][i], support);
            let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
            LabelQuality { label: labels[i].clone(), precision, recall, f1, support }
        })
        .collect();
    let present: Vec<&LabelQuality> = per_label.iter().filter(|l| l.support > 0).collect();
    let macro_f1 = if present.is_empty() { 0.0 } else { present.iter().map(|l| l.f1).sum::<f64>() / present.len() as f64 };
    let mut confused: Vec<Confusion> = (0..k)
        .flat_map(|t| (0..k).map(move |p| (t, p)))
        .filter(|&(t, p)| t != p && matrix[t][p] > 0)
        .map(|(t, p)| Confusion { truth: labels[t].clone(), predicted: labels[p].clone(), count: matrix[t][p] })
        .collect();
    confused.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.truth.cmp(&b.truth)));
    confused.truncate(most_confused);
    Report { examples: truth.len(), accuracy: ratio(correct, truth.len()), macro_f1, per_label, confused }
}

/// Micro-averaged F1 of multi-label predictions.
pub fn micro_f1(truth: &[Vec<bool>], predicted: &[Vec<bool>]) -> f64 {
    let (mut tp, mut fp, mut fneg) = (0usize, 0usize, 0usize);
    for (t, p) in truth.iter().zip(predicted) {
        for (&a, &b) in t.iter().zip(p) {
            match (a, b) {
                (true, true) => tp += 1,
                (false, true) => fp += 1,
                (true, false) => fneg += 1,
                _ => {}
            }
        }
    }
    ratio(2 * tp, 2 * tp + fp + fneg)
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct CurvePoint {
    pub threshold: f32,
    /// Share of messages below the threshold (escalated).
    pub escalated: f64,
    /// Accuracy on the messages kept.
    pub kept_accuracy: f64,
}

/// For each threshold 0.00, 0.01, ... 0.99: escalate messages whose confidence is below it.
pub fn escalation_curve(confidence: &[f32], correct: &[bool]) -> Vec<CurvePoint> {
    (0..100)
        .map(|step| {
            let threshold = step as f32 / 100.0;
            let kept: Vec<bool> = confidence.iter().zip(correct).filter(|(c, _)| **c >= threshold).map(|(_, ok)| *ok).collect();
            CurvePoint {
                threshold,
                escalated: 1.0 - ratio(kept.len(), confidence.len()),
                kept_accuracy: if kept.is_empty() { 1.0 } else { ratio(kept.iter().filter(|ok| **ok).count(), kept.len()) },
            }
        })
        .collect()
}

/// The lowest threshold whose kept accuracy reaches `target` (escalating the fewest messages),
/// if any does while keeping at least one message.
pub fn threshold_for_accuracy(curve: &[CurvePoint], target: f64) -> Option<CurvePoint> {
    curve.iter().find(|p| p.kept_accuracy >= target && p.escalated < 1.0).copied()
}

/// Area under the ROC curve of `scores` separating positives (higher score expected) from
/// negatives: the probability a random positive outscores a random negative (ties count half).
pub fn auroc(positives: &[f32], negatives: &[f32]) -> f64 {
    if positives.is_empty() || negatives.is_empty() {
        return f64::NAN;
    }
    let mut all: Vec<(f32, bool)> = positives.iter().map(|&s| (s, true)).chain(negatives.iter().map(|&s| (s, false))).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Rank-sum (Mann-Whitney U) with average ranks for ties.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let average_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += all[i..=j].iter().filter(|(_, p)| *p).count() as f64 * average_rank;
        i = j + 1;
    }
    let (np, nn) = (positives.len() as f64, negatives.len() as f64);
    (rank_sum - np * (np + 1.0) / 2.0) / (np * nn)
}

/// The value below which `q` (0..1) of `values` fall.
pub fn quantile(values: &[f32], q: f64) -> f32 {
    if values.is_empty() {
        return f32::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let index = ((sorted.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    sorted[index]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("l{i}")).collect()
    }

    #[test]
    fn report_counts_by_hand() {
        // truth 0,0,1,1,2 ; predicted 0,1,1,1,0
        let r = report(&[0, 0, 1, 1, 2], &[0, 1, 1, 1, 0], &names(3), 5);
        assert!((r.accuracy - 0.6).abs() < 1e-12);
        assert!((r.per_label[0].precision - 0.5).abs() < 1e-12 && (r.per_label[0].recall - 0.5).abs() < 1e-12);
        assert!((r.per_label[1].precision - 2.0 / 3.0).abs() < 1e-12 && r.per_label[1].recall == 1.0);
        assert_eq!(r.per_label[2].f1, 0.0);
        let expected_macro = (0.5 + 0.8 + 0.0) / 3.0;
        assert!((r.macro_f1 - expected_macro).abs() < 1e-12);
        assert_eq!(r.confused.len(), 2);
        assert_eq!(r.confused[0].count, 1);
    }

    #[test]
    fn escalation_curve_trades_coverage_for_accuracy() {
        let confidence = [0.9, 0.8, 0.3, 0.2];
        let correct = [true, true, false, true];
        let curve = escalation_curve(&confidence, &correct);
        assert_eq!(curve[0].escalated, 0.0);
        assert!((curve[0].kept_accuracy - 0.75).abs() < 1e-12);
        let p = threshold_for_accuracy(&curve, 0.99).unwrap();
        assert!((p.threshold - 0.31).abs() < 1e-6, "{p:?}");
        assert!((p.escalated - 0.5).abs() < 1e-12);
        assert!(threshold_for_accuracy(&escalation_curve(&[0.5], &[false]), 0.9).is_none());
    }

    #[test]
    fn auroc_extremes_and_ties() {
        assert_eq!(auroc(&[0.9, 0.8], &[0.1, 0.2]), 1.0);
        assert_eq!(auroc(&[0.1], &[0.9]), 0.0);
        assert_eq!(auroc(&[0.5, 0.5], &[0.5]), 0.5);
        assert!((auroc(&[0.3, 0.9], &[0.5]) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn micro_f1_and_quantile() {
        assert!((micro_f1(&[vec![true, false]], &[vec![true, true]]) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 1.0), 3.0);
    }
}
