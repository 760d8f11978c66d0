//! Few-shot examples for the LLM tier: per label, the training messages nearest the label's
//! centroid in the encoder's space (the most typical ways customers say it), short and
//! distinct. Written beside the model as `few_shot.jsonl`; `triage escalate` shows
//! `llm.examples_per_label` of them with each label. They are training texts: whatever goes
//! to the LLM provider, these go too.

use ndarray::Array2;
use serde_json::json;

use crate::llm::prompt::MAX_EXAMPLE_CHARS;

/// One example: (head, label, text).
pub type Example = (String, String, String);

/// Up to `per_label` examples per label of a single-label head, most typical first, from
/// `rows` (whose embeddings, label indices and texts are given). Texts longer than an example
/// may be are taken only when a label has too few short ones; a text repeated (case and
/// spacing aside) is taken once.
pub fn choose(
    head: &str,
    labels: &[String],
    embeddings: &Array2<f32>,
    texts: &[&str],
    rows: &[usize],
    y: &[Option<usize>],
    per_label: usize,
) -> Vec<Example> {
    if per_label == 0 {
        return Vec::new();
    }
    let centroids = super::class_centroids(embeddings, rows, y, labels.len());
    let mut by_label: Vec<Vec<(f32, bool, usize)>> = vec![Vec::new(); labels.len()];
    for &r in rows {
        let Some(label) = y[r] else { continue };
        let row = embeddings.row(r);
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        let centroid = &centroids.data[label * centroids.cols..(label + 1) * centroids.cols];
        let cosine = row.iter().zip(centroid).map(|(a, b)| a * b).sum::<f32>() / norm;
        let short = texts[r].trim().chars().count() <= MAX_EXAMPLE_CHARS;
        by_label[label].push((cosine, short, r));
    }
    let mut out = Vec::new();
    for (label, mut candidates) in by_label.into_iter().enumerate() {
        // Short before long, then nearest first, then the earlier row (a stable order).
        candidates.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.total_cmp(&a.0)).then(a.2.cmp(&b.2)));
        let mut seen = std::collections::HashSet::new();
        for (_, _, r) in candidates {
            let text = texts[r].split_whitespace().collect::<Vec<_>>().join(" ");
            if text.is_empty() || !seen.insert(text.to_lowercase()) {
                continue;
            }
            out.push((head.to_string(), labels[label].clone(), text));
            if seen.len() == per_label {
                break;
            }
        }
    }
    out
}

/// The examples as `few_shot.jsonl` lines.
pub fn to_jsonl(examples: &[Example]) -> String {
    examples.iter().map(|(head, label, text)| json!({"head": head, "label": label, "text": text}).to_string() + "\n").collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_short_distinct_texts_are_chosen_per_label() {
        // Two labels in 2-d: label 0 around (1, 0), label 1 around (0, 1).
        let embeddings = ndarray::arr2(&[
            [1.0, 0.05], // 0: label 0, near its centre
            [1.0, 0.6],  // 1: label 0, farther
            [1.0, 0.0],  // 2: label 0, the nearest, but too long
            [0.9, 0.01], // 3: label 0, near, repeats row 0's text
            [0.0, 1.0],  // 4: label 1
            [0.3, 1.0],  // 5: unlabelled
        ]);
        let long = "x".repeat(MAX_EXAMPLE_CHARS + 1);
        let texts = ["Where is my card?", "card pls", long.as_str(), "  where is  my card? ", "PIN blocked", "?"];
        let y = [Some(0), Some(0), Some(0), Some(0), Some(1), None];
        let labels = vec!["card_arrival".to_string(), "pin_blocked".to_string()];
        let rows: Vec<usize> = (0..6).collect();
        let chosen = choose("intent", &labels, &embeddings, &texts, &rows, &y, 2);
        let texts_of = |label: &str| chosen.iter().filter(|(_, l, _)| l == label).map(|(_, _, t)| t.as_str()).collect::<Vec<_>>();
        assert_eq!(texts_of("card_arrival"), vec!["Where is my card?", "card pls"], "short first, a repeat once, nearest first");
        assert_eq!(texts_of("pin_blocked"), vec!["PIN blocked"], "a label with one example gives one");
        assert!(chosen.iter().all(|(h, _, _)| h == "intent"));
        assert!(choose("intent", &labels, &embeddings, &texts, &rows, &y, 0).is_empty());
        // Only long texts: one is taken rather than none.
        let only_long = choose("intent", &labels, &embeddings, &[long.as_str(); 6], &[2], &y, 1);
        assert_eq!(only_long.len(), 1);
        let line = to_jsonl(&chosen[..1]);
        assert_eq!(serde_json::from_str::<serde_json::Value>(line.trim()).unwrap()["label"], "card_arrival");
    }
}
