//! Turning one row of each head's output into a message's prediction. Pure: no ONNX here.

use serde::Serialize;

use super::descriptor::{Activation, HeadKind, HeadSpec, PrioritySpec};

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
    /// Top label of the category head.
    pub category: Option<LabelScore>,
    pub priority: Option<String>,
    /// Labels above threshold from every multi-label head.
    pub tags: Vec<LabelScore>,
    /// Every head's output, in descriptor order.
    pub heads: Vec<HeadResult>,
}

impl Prediction {
    pub fn head(&self, name: &str) -> Option<&HeadOutput> {
        self.heads.iter().find(|h| h.head == name).map(|h| &h.output)
    }

    /// Confidence of a single-label head (the category head when `name` is None).
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

/// The post-processing recipe of a model: heads, which is the category, where priority comes from.
#[derive(Debug, Clone)]
pub struct HeadSet {
    pub heads: Vec<HeadSpec>,
    pub category: Option<usize>,
    pub priority: Option<PrioritySpec>,
}

impl HeadSet {
    /// `rows[i]` is this message's row of head `i`'s output.
    pub fn predict(&self, rows: &[&[f32]]) -> Prediction {
        debug_assert_eq!(rows.len(), self.heads.len());
        let mut heads = Vec::with_capacity(self.heads.len());
        let mut tags = Vec::new();
        for (spec, row) in self.heads.iter().zip(rows) {
            let output = match spec.kind {
                HeadKind::SingleLabel => HeadOutput::Label(top_label(spec, row)),
                HeadKind::MultiLabel => {
                    let above = labels_above_threshold(spec, row);
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
        tags.sort_by(|a, b| b.score.total_cmp(&a.score));
        Prediction { category, priority, tags, heads }
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

fn top_label(spec: &HeadSpec, row: &[f32]) -> LabelScore {
    let probs = activate(spec.activation(), row);
    let (index, score) =
        probs.iter().copied().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, p)| if p > best.1 { (i, p) } else { best });
    LabelScore { label: spec.labels.get(index).cloned().unwrap_or_default(), score }
}

fn labels_above_threshold(spec: &HeadSpec, row: &[f32]) -> Vec<LabelScore> {
    let probs = activate(spec.activation(), row);
    let mut out: Vec<LabelScore> = spec
        .labels
        .iter()
        .zip(probs)
        .filter(|(label, p)| *p >= spec.threshold_for(label))
        .map(|(label, score)| LabelScore { label: label.clone(), score })
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
        }
    }

    fn set() -> HeadSet {
        let mut tags = head("tags", HeadKind::MultiLabel, &["billing", "bug", "refund"], Some(Activation::Sigmoid));
        tags.thresholds.insert("refund".into(), 0.9);
        HeadSet {
            heads: vec![
                head("category", HeadKind::SingleLabel, &["returns", "billing"], None),
                head("priority", HeadKind::SingleLabel, &["low", "high"], Some(Activation::Softmax)),
                tags,
                head("embedding", HeadKind::Embedding, &[], None),
            ],
            category: Some(0),
            priority: Some(PrioritySpec { from_head: "priority".into(), map: BTreeMap::new(), default: None }),
        }
    }

    #[test]
    fn multi_head_rows_become_one_prediction() {
        let p = set().predict(&[&[0.2, 0.8], &[3.0, -1.0], &[2.0, -2.0, 1.5], &[0.6, 0.8]]);
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
        assert_eq!(s.predict(&[&[0.9, 0.1], &[0.0, 0.0], &[0.0; 3], &[]]).priority.as_deref(), Some("urgent"));
        assert_eq!(s.predict(&[&[0.1, 0.9], &[0.0, 0.0], &[0.0; 3], &[]]).priority.as_deref(), Some("normal"));
    }

    #[test]
    fn softmax_is_stable_and_sums_to_one() {
        let p = softmax(&[1000.0, 1000.0, -1000.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((p[0] - 0.5).abs() < 1e-6);
    }
}
