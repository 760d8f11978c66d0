//! Turning one row of each head's output into a message's prediction. Pure: no ONNX here.

use serde::Serialize;

use super::descriptor::{Activation, HeadKind, HeadSpec, OodSpec, PrioritySpec};
use super::linear::{HeadWeights, LexicalInput, SparseRow};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelScore {
    pub label: String,
    pub score: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadOutput {
    /// A single-label head's top label.
    Label(LabelScore),
    /// A multi-label head's labels above threshold, highest first.
    Tags(Vec<LabelScore>),
    Embedding(Vec<f32>),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeadResult {
    pub head: String,
    pub output: HeadOutput,
}

/// Everything the model says about one message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub category: Option<LabelScore>,
    pub priority: Option<String>,
    pub tags: Vec<LabelScore>,
    pub heads: Vec<HeadResult>,
    /// Distance of the message's embedding to the nearest training class centroid (models
    /// with an out-of-distribution gate only): high means unlike anything seen in training.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ood_score: Option<f32>,
}

impl Prediction {
    pub fn head(&self, name: &str) -> Option<&HeadOutput> {
        self.heads.iter().find(|h| h.head == name).map(|h| &h.output)
    }

    pub fn confidence(&self, name: Option<&str>) -> Option<f32> {
        match name {
            None => self.category.as_ref().map(|c| c.score),
            Some(name) => match self.head(name)? {
                HeadOutput::Label(l) => Some(l.score),
                _ => None,
            },
        }
    }
}

/// The heads of a model and what they read: `predict` takes one row per graph output listed by
/// [`HeadSet::outputs`] (several heads may share one output, e.g. the sentence embedding).
#[derive(Debug, Clone)]
pub struct HeadSet {
    heads: Vec<HeadSpec>,
    category: Option<usize>,
    priority: Option<PrioritySpec>,
    weights: HeadWeights,
    ood: Option<OodSpec>,
    outputs: Vec<String>,
    /// For each head, its index into `outputs`; then the OOD gate's.
    head_output: Vec<usize>,
    ood_output: Option<usize>,
}

impl HeadSet {
    /// `weights` must hold a [`ComputedHead`] for every head with `weights` set (and centroids
    /// when `ood` is set): [`HeadWeights::load`] checks that.
    pub fn new(
        heads: Vec<HeadSpec>,
        category: Option<usize>,
        priority: Option<PrioritySpec>,
        weights: HeadWeights,
        ood: Option<OodSpec>,
    ) -> Self {
        let mut outputs: Vec<String> = Vec::new();
        let mut index_of = |name: &str| match outputs.iter().position(|o| o == name) {
            Some(i) => i,
            None => {
                outputs.push(name.to_string());
                outputs.len() - 1
            }
        };
        let head_output = heads.iter().map(|h| index_of(&h.output)).collect();
        let ood_output = ood.as_ref().map(|o| index_of(&o.output));
        HeadSet { heads, category, priority, weights, ood, outputs, head_output, ood_output }
    }

    pub fn heads(&self) -> &[HeadSpec] {
        &self.heads
    }

    /// Index into [`HeadSet::outputs`] of the output head `head` reads.
    pub fn output_of(&self, head: usize) -> usize {
        self.head_output[head]
    }

    /// Graph outputs `predict` reads, in the order it wants their rows.
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }

    pub fn ood(&self) -> Option<&OodSpec> {
        self.ood.as_ref()
    }

    /// Width of the row each head expects from its output: labels for graph heads, the layer's
    /// input size for computed heads, anything for embeddings (None).
    pub fn expected_width(&self, head: usize) -> Option<usize> {
        let spec = &self.heads[head];
        match (&spec.weights, spec.kind) {
            (Some(_), _) => self.weights.heads.get(&spec.name).map(|c| c.dense.inputs),
            (None, HeadKind::Embedding) => None,
            (None, _) => Some(spec.labels.len()),
        }
    }

    /// Probabilities of every label of a head, from its output row (and, for a lexical layer,
    /// the message's TF-IDF row, computed once per message by `predict`).
    fn probabilities(&self, head: usize, row: &[f32], lexical_row: Option<&SparseRow>) -> Vec<f32> {
        let spec = &self.heads[head];
        let computed = spec.weights.as_ref().and_then(|_| self.weights.heads.get(&spec.name));
        let Some(computed) = computed else {
            return activate(spec.activation(), row);
        };
        let dense = activate(spec.activation(), &computed.dense.logits(row));
        match (&computed.lexical, lexical_row) {
            (Some((layer, share)), Some(features)) if *share > 0.0 => {
                let lexical = activate(spec.activation(), &layer.logits(features));
                dense.iter().zip(&lexical).map(|(d, l)| (1.0 - share) * d + share * l).collect()
            }
            _ => dense,
        }
    }

    /// One message: `rows[i]` is its row of `outputs()[i]`; `lexical` its word pieces and text.
    pub fn predict(&self, rows: &[&[f32]], lexical: LexicalInput<'_>) -> Prediction {
        debug_assert_eq!(rows.len(), self.outputs.len());
        let mut heads = Vec::with_capacity(self.heads.len());
        let mut tags = Vec::new();
        // The vocabulary is loaded only when some head has a lexical layer.
        let lexical_row = self.weights.vocabulary.as_ref().map(|v| v.transform(lexical));
        for (index, spec) in self.heads.iter().enumerate() {
            let row = rows[self.head_output[index]];
            let output = match spec.kind {
                HeadKind::SingleLabel => HeadOutput::Label(top_label(spec, &self.probabilities(index, row, lexical_row.as_ref()))),
                HeadKind::MultiLabel => {
                    let above = labels_above_threshold(spec, &self.probabilities(index, row, lexical_row.as_ref()));
                    tags.extend(above.iter().cloned());
                    HeadOutput::Tags(above)
                }
                HeadKind::Embedding => HeadOutput::Embedding(row.to_vec()),
            };
            heads.push(HeadResult { head: spec.name.clone(), output });
        }
        let label_of = |index: usize| match &heads[index].output {
            HeadOutput::Label(l) => Some(l.clone()),
            _ => None,
        };
        let category = self.category.and_then(label_of);
        let priority = self.priority.as_ref().and_then(|p| {
            let index = self.heads.iter().position(|h| h.name == p.from_head)?;
            let label = label_of(index)?;
            p.priority_of(&label.label)
        });
        let ood_score = match (self.ood_output, &self.weights.centroids) {
            (Some(i), Some(centroids)) => Some(centroids.distance_to_nearest(rows[i])),
            _ => None,
        };
        tags.sort_by(|a, b| b.score.total_cmp(&a.score));
        Prediction { category, priority, tags, heads, ood_score }
    }
}

fn activate(activation: Activation, row: &[f32]) -> Vec<f32> {
    match activation {
        Activation::None => row.to_vec(),
        Activation::Sigmoid => row.iter().map(|&x| sigmoid(x)).collect(),
        Activation::Softmax => softmax(row),
    }
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = row.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

fn top_label(spec: &HeadSpec, probs: &[f32]) -> LabelScore {
    let (index, score) =
        probs.iter().copied().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, p)| if p > best.1 { (i, p) } else { best });
    LabelScore { label: spec.labels.get(index).cloned().unwrap_or_default(), score }
}

fn labels_above_threshold(spec: &HeadSpec, probs: &[f32]) -> Vec<LabelScore> {
    let mut out: Vec<LabelScore> = spec
        .labels
        .iter()
        .zip(probs)
        .filter(|(label, p)| **p >= spec.threshold_for(label))
        .map(|(label, score)| LabelScore { label: label.clone(), score: *score })
        .collect();
    out.sort_by(|a, b| b.score.total_cmp(&a.score));
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn head(name: &str, kind: HeadKind, labels: &[&str], activation: Option<Activation>) -> HeadSpec {
        HeadSpec {
            name: name.into(),
            output: format!("{name}_out"),
            kind,
            labels: labels.iter().map(|s| s.to_string()).collect(),
            activation,
            threshold: None,
            thresholds: BTreeMap::new(),
            weights: None,
            lexical_share: None,
        }
    }

    fn set() -> HeadSet {
        let mut tags = head("tags", HeadKind::MultiLabel, &["billing", "bug", "refund"], Some(Activation::Sigmoid));
        tags.thresholds.insert("refund".into(), 0.9);
        HeadSet::new(
            vec![
                head("category", HeadKind::SingleLabel, &["returns", "billing"], None),
                head("priority", HeadKind::SingleLabel, &["low", "high"], Some(Activation::Softmax)),
                tags,
                head("embedding", HeadKind::Embedding, &[], None),
            ],
            Some(0),
            Some(PrioritySpec { from_head: "priority".into(), map: BTreeMap::new(), default: None }),
            HeadWeights::default(),
            None,
        )
    }

    const NO_TEXT: LexicalInput<'static> = LexicalInput { ids: &[], text: "" };

    #[test]
    fn multi_head_rows_become_one_prediction() {
        let p = set().predict(&[&[0.2, 0.8], &[3.0, -1.0], &[2.0, -2.0, 1.5], &[0.6, 0.8]], NO_TEXT);
        assert_eq!(p.ood_score, None);
        assert_eq!(p.category, Some(LabelScore { label: "billing".into(), score: 0.8 }));
        assert_eq!(p.priority.as_deref(), Some("low"));
        // sigmoid(2)=0.88 passes 0.5; sigmoid(1.5)=0.82 misses refund's 0.9; bug fails.
        assert_eq!(p.tags.iter().map(|t| t.label.as_str()).collect::<Vec<_>>(), vec!["billing"]);
        assert_eq!(p.head("embedding"), Some(&HeadOutput::Embedding(vec![0.6, 0.8])));
        let Some(HeadOutput::Label(pr)) = p.head("priority") else { panic!("priority head missing") };
        assert!((pr.score - softmax(&[3.0, -1.0])[0]).abs() < 1e-6);
        assert_eq!(p.confidence(None), Some(0.8));
        assert_eq!(p.confidence(Some("embedding")), None);
    }

    #[test]
    fn priority_map_maps_the_category_label() {
        let mut s = set();
        s.priority = Some(PrioritySpec {
            from_head: "category".into(),
            map: [("returns".to_string(), "urgent".to_string())].into(),
            default: Some("normal".into()),
        });
        assert_eq!(s.predict(&[&[0.9, 0.1], &[0.0, 0.0], &[0.0; 3], &[]], NO_TEXT).priority.as_deref(), Some("urgent"));
        assert_eq!(s.predict(&[&[0.1, 0.9], &[0.0, 0.0], &[0.0; 3], &[]], NO_TEXT).priority.as_deref(), Some("normal"));
    }

    #[test]
    fn computed_heads_share_the_embedding_and_average_the_lexical_layer() {
        use crate::model::linear::{unigram, ComputedHead, DenseLayer, DenseMatrix, LexicalVocabulary, SparseLayer};
        let mut queue = head("queue", HeadKind::SingleLabel, &["billing", "returns"], None);
        queue.output = "sentence_embedding".into();
        queue.weights = Some("queue".into());
        queue.lexical_share = Some(0.5);
        let mut embedding = head("embedding", HeadKind::Embedding, &[], None);
        embedding.output = "sentence_embedding".into();
        let vocabulary = LexicalVocabulary::from_document_frequencies(vec![(unigram(7), 1)], 2);
        let dense = DenseLayer { labels: 2, inputs: 2, weight: vec![1.0, 0.0, 0.0, 1.0], bias: vec![0.0, 0.0] };
        // Token 7 pushes strongly towards `returns`.
        let lexical = SparseLayer { labels: 2, weight: vec![-5.0, 5.0], bias: vec![0.0, 0.0] };
        let weights = HeadWeights {
            heads: [("queue".to_string(), ComputedHead { dense, lexical: Some((lexical, 0.5)) })].into(),
            vocabulary: Some(vocabulary),
            centroids: Some(DenseMatrix { rows: 1, cols: 2, data: vec![1.0, 0.0] }),
        };
        let ood = OodSpec { output: "sentence_embedding".into(), threshold: 0.3, auroc: None };
        let set = HeadSet::new(vec![queue, embedding], Some(0), None, weights, Some(ood));
        assert_eq!(set.outputs(), ["sentence_embedding"]);
        assert_eq!(set.expected_width(0), Some(2));
        let dense_only = softmax(&[1.0, 0.0]);
        let without_token = set.predict(&[&[1.0, 0.0]], LexicalInput { ids: &[3], text: "" });
        let Some(c) = &without_token.category else { panic!("no category") };
        // Unknown token: the lexical layer is its bias alone (0.5 / 0.5).
        assert_eq!(c.label, "billing");
        assert!((c.score - (0.5 * dense_only[0] + 0.25)).abs() < 1e-6);
        let with_token = set.predict(&[&[1.0, 0.0]], LexicalInput { ids: &[7], text: "" });
        assert_eq!(with_token.category.as_ref().map(|c| c.label.as_str()), Some("returns"));
        assert!(without_token.ood_score.is_some_and(|s| s.abs() < 1e-6));
        let far = set.predict(&[&[0.0, 1.0]], NO_TEXT);
        assert!(far.ood_score.is_some_and(|s| (s - 1.0).abs() < 1e-6));
    }

    #[test]
    fn softmax_is_stable_and_sums_to_one() {
        let p = softmax(&[1000.0, 1000.0, -1000.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((p[0] - 0.5).abs() < 1e-6);
    }
}
