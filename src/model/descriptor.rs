//! What a model directory says about itself: the heads its graph outputs, their labels, how to
//! assemble text, and how to derive a priority.
//!
//! Two sources, merged: `model.toml` (triage's own descriptor) and `config.json` (what an HF
//! Optimum export of a `*ForSequenceClassification` model ships). With only `config.json`, one
//! head named `category` reads the `logits` output, softmax or sigmoid by `problem_type`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ModelError;

pub const DESCRIPTOR_FILE: &str = "model.toml";
pub const OPTIMUM_CONFIG_FILE: &str = "config.json";
pub const DEFAULT_TEMPLATE: &str = "{subject}\n{body}";
pub const DEFAULT_MAX_LENGTH: usize = 128;
pub const DEFAULT_MULTI_LABEL_THRESHOLD: f32 = 0.5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    /// One label per message (argmax).
    SingleLabel,
    /// Any number of labels per message (each above its threshold).
    MultiLabel,
    /// A vector (e.g. the pooled sentence embedding), passed through.
    Embedding,
}

/// What turns the graph's raw output into probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// The graph already outputs probabilities.
    None,
    Softmax,
    Sigmoid,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeadSpec {
    pub name: String,
    /// Name of the graph output this head reads.
    pub output: String,
    pub kind: HeadKind,
    /// Defaults to `none` (the graph outputs probabilities).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activation: Option<Activation>,
    /// Multi-label: the default threshold (0.5 unless set).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "short::option_f32")]
    pub threshold: Option<f32>,
    /// Multi-label: per-label thresholds overriding `threshold`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", serialize_with = "short::map_f32")]
    pub thresholds: BTreeMap<String, f32>,
    /// Computed in Rust: `output` is the layer's input (e.g. the sentence embedding) and the
    /// layer is `<weights>.weight` / `<weights>.bias` in heads.safetensors (`triage train`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    /// Computed heads: share of a lexical layer's probabilities (`<weights>.lexical.*`) in the
    /// average with the dense layer's (0: no lexical layer).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "short::option_f32")]
    pub lexical_share: Option<f32>,
    // Last: a long list reads best after the head's short fields.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

impl HeadSpec {
    pub fn activation(&self) -> Activation {
        match (self.activation, &self.weights, self.kind) {
            (Some(a), _, _) => a,
            // A computed layer outputs logits.
            (None, Some(_), HeadKind::MultiLabel) => Activation::Sigmoid,
            (None, Some(_), _) => Activation::Softmax,
            (None, None, _) => Activation::None,
        }
    }

    pub fn is_computed(&self) -> bool {
        self.weights.is_some()
    }

    pub fn threshold_for(&self, label: &str) -> f32 {
        self.thresholds.get(label).copied().or(self.threshold).unwrap_or(DEFAULT_MULTI_LABEL_THRESHOLD)
    }
}

/// Where a message's priority comes from: the label of a head, optionally mapped.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrioritySpec {
    /// The single-label head whose label decides the priority.
    pub from_head: String,
    /// Priority for labels missing from `map`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// label -> priority. Empty: the head's label IS the priority (a priority head).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub map: BTreeMap<String, String>,
}

impl PrioritySpec {
    pub fn priority_of(&self, label: &str) -> Option<String> {
        if self.map.is_empty() {
            return Some(label.to_string());
        }
        self.map.get(label).or(self.default.as_ref()).cloned()
    }
}

/// `model.toml` as written by people or by `triage train` (which writes it through this type,
/// [`DescriptorFile::to_toml`], so what is written is what is read).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// Text assembly, e.g. "{subject}\n{body}"; placeholders name message fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The single-label head reported as the message's category (and used for escalation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category_head: Option<String>,
    /// Multi-label threshold overrides for a head derived from config.json.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "short::option_f32")]
    pub threshold: Option<f32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heads: Vec<HeadSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<PrioritySpec>,
    /// The escalation threshold this model recommends (routes may override it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub escalation: Option<EscalationSpec>,
    /// Out-of-distribution gate: distance of the embedding to the nearest class centroid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ood: Option<OodSpec>,
    /// The encoder's shape, for FLOP estimates (`triage bench --sweep`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architecture: Option<Architecture>,
    /// How `triage train` built the model; `triage eval` re-reads the data the same way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingRecord>,
}

impl DescriptorFile {
    /// The file's text: `header` (comment lines) and then the fields.
    pub fn to_toml(&self, header: &str) -> Result<String, toml::ser::Error> {
        Ok(format!("{header}{}", toml::to_string_pretty(self)?))
    }
}

/// Floats written as the shortest decimal that reads back to the same f32: a threshold of
/// 0.45 is written `0.45`, not the f64 widening `0.44999998807907104`.
mod short {
    use std::collections::BTreeMap;

    use serde::ser::SerializeMap;
    use serde::Serializer;

    pub fn f64_of(v: f32) -> f64 {
        v.to_string().parse().unwrap_or(f64::from(v))
    }

    pub fn f32<S: Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(f64_of(*v))
    }

    pub fn option_f32<S: Serializer>(v: &Option<f32>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_some(&f64_of(*v)),
            None => s.serialize_none(),
        }
    }

    pub fn map_f32<S: Serializer>(v: &BTreeMap<String, f32>, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(v.len()))?;
        for (k, x) in v {
            map.serialize_entry(k, &f64_of(*x))?;
        }
        map.end()
    }
}

/// A BERT-style encoder's shape.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Architecture {
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
}

impl Architecture {
    /// Floating-point operations (multiply and add counted apart) for `rows` sequences padded to
    /// `width` tokens: per layer and token, the Q/K/V/output projections (4 H^2 multiply-adds)
    /// and the feed-forward pair (2 H I), plus attention scores and context (2 x width x H).
    /// Embedding lookups, layer norms, softmax and GELU are left out (a few percent).
    pub fn flops(&self, rows: usize, width: usize) -> f64 {
        let (h, i, s) = (self.hidden as f64, self.intermediate as f64, width as f64);
        let per_token = 2.0 * (4.0 * h * h + 2.0 * h * i) + 2.0 * 2.0 * s * h;
        self.layers as f64 * per_token * rows as f64 * s
    }
}

/// A calibrated confidence threshold: below it, a message is escalated.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EscalationSpec {
    #[serde(serialize_with = "short::f32")]
    pub threshold: f32,
    /// What the threshold was calibrated for: accuracy on the messages NOT escalated.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "short::option_f32")]
    pub target_accuracy: Option<f32>,
    /// Share of validation messages it escalated.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "short::option_f32")]
    pub escalated_share: Option<f32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OodSpec {
    /// The graph output (an embedding) compared with `ood.centroids` in heads.safetensors.
    pub output: String,
    /// Scores above this are out of distribution (escalated when escalation is on).
    #[serde(serialize_with = "short::f32")]
    pub threshold: f32,
    /// Measured on a held-out foreign set, when one was given to `triage train`.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "short::option_f32")]
    pub auroc: Option<f32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingRecord {
    /// Text columns joined by the template, in order.
    pub text: Vec<String>,
    /// Single-label heads as "HEAD=COLUMN", in training order (the first stratifies the split).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Multi-label heads as "HEAD=COL1,COL2".
    #[serde(default)]
    pub multi_label: Vec<String>,
    pub seed: u64,
    pub validation_fraction: f64,
    /// The validation split was this fold ("2/3": the second of 3 stratified folds), not
    /// `validation_fraction`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_fold: Option<String>,
    /// Labels with fewer examples than this were left out.
    pub min_examples: usize,
    pub encoder: String,
    pub data: String,
    pub data_rows: usize,
    pub trained_at: String,
    /// The heads were refitted on every usable row after cross-validation chose their
    /// settings: `triage eval` then refits them on the training part to score the
    /// validation split honestly.
    #[serde(default)]
    pub refit_full: bool,
    /// What cross-validation chose for each head, so the same heads can be fitted again.
    #[serde(default)]
    pub fitted: Vec<FittedHead>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FittedHead {
    pub head: String,
    /// Regularisation of the embedding layer (larger: weaker penalty).
    pub c: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lexical_c: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lexical_features: Option<super::linear::LexicalFeatures>,
}

/// The fields of an HF `config.json` that matter here.
#[derive(Debug, Clone, Deserialize)]
struct OptimumConfig {
    #[serde(default)]
    id2label: BTreeMap<String, String>,
    problem_type: Option<String>,
    #[serde(rename = "_name_or_path")]
    name_or_path: Option<String>,
    model_type: Option<String>,
}

/// The resolved, validated description of a model directory.
#[derive(Debug, Clone)]
pub struct Descriptor {
    pub name: String,
    pub version: Option<String>,
    pub max_length: usize,
    pub template: String,
    pub heads: Vec<HeadSpec>,
    /// Index into `heads` of the category head, if the model has a single-label head.
    pub category_head: Option<usize>,
    pub priority: Option<PrioritySpec>,
    pub escalation: Option<EscalationSpec>,
    pub ood: Option<OodSpec>,
    pub training: Option<TrainingRecord>,
    pub architecture: Option<Architecture>,
}

impl Descriptor {
    /// Whether loading needs heads.safetensors.
    pub fn needs_weights(&self) -> bool {
        self.ood.is_some() || self.heads.iter().any(HeadSpec::is_computed)
    }

    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let own_path = dir.join(DESCRIPTOR_FILE);
        let optimum_path = dir.join(OPTIMUM_CONFIG_FILE);
        let own = if own_path.is_file() { Some(read_toml(&own_path)?) } else { None };
        let optimum = if optimum_path.is_file() { Some(read_optimum(&optimum_path)?) } else { None };
        let dir_name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        Self::resolve(own, optimum, &dir_name, dir)
    }

    /// A descriptor from `model.toml` text alone (tests, tools).
    pub fn parse(text: &str, dir: &Path) -> Result<Self, ModelError> {
        let own: DescriptorFile = toml::from_str(text).map_err(|e| ModelError::invalid(dir.join(DESCRIPTOR_FILE), e.to_string()))?;
        Self::resolve(Some(own), None, "model", dir)
    }

    fn resolve(own: Option<DescriptorFile>, optimum: Option<OptimumConfig>, dir_name: &str, dir: &Path) -> Result<Self, ModelError> {
        if own.is_none() && optimum.is_none() {
            return Err(ModelError::NoDescriptor { dir: dir.to_path_buf() });
        }
        let own = own.unwrap_or_default();
        let mut heads = own.heads.clone();
        let mut default_name = dir_name.to_string();
        if heads.is_empty() {
            let Some(cfg) = &optimum else {
                return Err(ModelError::invalid(
                    dir.join(DESCRIPTOR_FILE),
                    "declares no [[heads]] and there is no config.json to derive one from",
                ));
            };
            heads.push(optimum_head(cfg, own.threshold, &dir.join(OPTIMUM_CONFIG_FILE))?);
            if let Some(name) = cfg.name_or_path.as_deref().filter(|n| !n.is_empty()) {
                default_name = name.rsplit('/').next().unwrap_or(name).to_string();
            } else if let Some(kind) = &cfg.model_type {
                default_name = format!("{dir_name} ({kind})");
            }
        }
        let descriptor_path = dir.join(DESCRIPTOR_FILE);
        validate_heads(&heads, &descriptor_path)?;

        let category_head = match &own.category_head {
            Some(name) => {
                let index = heads
                    .iter()
                    .position(|h| &h.name == name)
                    .ok_or_else(|| ModelError::invalid(&descriptor_path, format!("category_head `{name}` is not one of the heads")))?;
                if heads[index].kind != HeadKind::SingleLabel {
                    return Err(ModelError::invalid(&descriptor_path, format!("category_head `{name}` must be a single_label head")));
                }
                Some(index)
            }
            None => heads.iter().position(|h| h.kind == HeadKind::SingleLabel),
        };
        if let Some(priority) = &own.priority {
            match heads.iter().find(|h| h.name == priority.from_head) {
                Some(h) if h.kind == HeadKind::SingleLabel => {}
                Some(_) => {
                    return Err(ModelError::invalid(
                        &descriptor_path,
                        format!("priority.from_head `{}` must be a single_label head", priority.from_head),
                    ))
                }
                None => {
                    return Err(ModelError::invalid(
                        &descriptor_path,
                        format!("priority.from_head `{}` is not one of the heads", priority.from_head),
                    ))
                }
            }
        }
        if let Some(e) = &own.escalation {
            if !(0.0..=1.0).contains(&e.threshold) {
                return Err(ModelError::invalid(&descriptor_path, format!("escalation.threshold {} is outside 0..1", e.threshold)));
            }
        }
        if let Some(o) = &own.ood {
            if !o.threshold.is_finite() || o.threshold < 0.0 {
                return Err(ModelError::invalid(&descriptor_path, format!("ood.threshold {} must be a number >= 0", o.threshold)));
            }
        }
        let max_length = own.max_length.unwrap_or(DEFAULT_MAX_LENGTH);
        if max_length < 8 {
            return Err(ModelError::invalid(&descriptor_path, format!("max_length {max_length} is too small (minimum 8)")));
        }
        Ok(Descriptor {
            name: own.name.unwrap_or(default_name),
            version: own.version,
            max_length,
            template: own.template.unwrap_or_else(|| DEFAULT_TEMPLATE.to_string()),
            heads,
            category_head,
            priority: own.priority,
            escalation: own.escalation,
            ood: own.ood,
            training: own.training,
            architecture: own.architecture,
        })
    }
}

fn read_toml(path: &Path) -> Result<DescriptorFile, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    toml::from_str(&text).map_err(|e| ModelError::invalid(path, e.to_string()))
}

fn read_optimum(path: &Path) -> Result<OptimumConfig, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::invalid(path, e.to_string()))
}

fn optimum_head(cfg: &OptimumConfig, threshold: Option<f32>, path: &PathBuf) -> Result<HeadSpec, ModelError> {
    if cfg.id2label.is_empty() {
        return Err(ModelError::invalid(path, "has no id2label: cannot name the classifier's labels"));
    }
    let mut labels = vec![None; cfg.id2label.len()];
    for (id, label) in &cfg.id2label {
        let index: usize = id.parse().map_err(|_| ModelError::invalid(path, format!("id2label key `{id}` is not a number")))?;
        let slot = labels
            .get_mut(index)
            .ok_or_else(|| ModelError::invalid(path, format!("id2label ids must be 0..{}; found {index}", cfg.id2label.len())))?;
        *slot = Some(label.clone());
    }
    let labels: Vec<String> = labels.into_iter().map(|l| l.unwrap_or_default()).collect();
    let (kind, activation) = match cfg.problem_type.as_deref() {
        Some("multi_label_classification") => (HeadKind::MultiLabel, Activation::Sigmoid),
        None | Some("single_label_classification") => (HeadKind::SingleLabel, Activation::Softmax),
        Some(other) => {
            return Err(ModelError::invalid(
                path,
                format!("problem_type `{other}` is not a classification (single_label_classification or multi_label_classification)"),
            ))
        }
    };
    Ok(HeadSpec {
        name: "category".into(),
        output: "logits".into(),
        kind,
        labels,
        activation: Some(activation),
        threshold,
        thresholds: BTreeMap::new(),
        weights: None,
        lexical_share: None,
    })
}

fn validate_heads(heads: &[HeadSpec], path: &Path) -> Result<(), ModelError> {
    let mut seen = std::collections::BTreeSet::new();
    for head in heads {
        if !seen.insert(head.name.as_str()) {
            return Err(ModelError::invalid(path, format!("head `{}` is declared twice", head.name)));
        }
        match head.kind {
            HeadKind::SingleLabel | HeadKind::MultiLabel if head.labels.is_empty() => {
                return Err(ModelError::invalid(path, format!("head `{}` has no labels", head.name)));
            }
            HeadKind::MultiLabel => {
                for (label, t) in head.thresholds.iter().map(|(l, t)| (l.as_str(), *t)).chain(head.threshold.map(|t| ("(default)", t))) {
                    if !(0.0..=1.0).contains(&t) {
                        return Err(ModelError::invalid(path, format!("head `{}`: threshold for {label} is {t}, outside 0..1", head.name)));
                    }
                }
                if let Some(unknown) = head.thresholds.keys().find(|l| !head.labels.contains(l)) {
                    return Err(ModelError::invalid(path, format!("head `{}`: threshold given for unknown label `{unknown}`", head.name)));
                }
            }
            _ => {}
        }
        if let Some(share) = head.lexical_share {
            if !(0.0..=1.0).contains(&share) || head.weights.is_none() || head.kind != HeadKind::SingleLabel {
                return Err(ModelError::invalid(
                    path,
                    format!("head `{}`: lexical_share must be within 0..1, on a single_label head with weights", head.name),
                ));
            }
        }
        if head.weights.is_some() && head.kind == HeadKind::Embedding {
            return Err(ModelError::invalid(path, format!("head `{}`: an embedding head cannot have weights", head.name)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written_by_train() -> DescriptorFile {
        let head = |name: &str, kind: HeadKind| HeadSpec {
            name: name.into(),
            output: "embedding".into(),
            kind,
            labels: Vec::new(),
            activation: None,
            threshold: None,
            thresholds: BTreeMap::new(),
            weights: None,
            lexical_share: None,
        };
        DescriptorFile {
            name: Some("support".into()),
            version: Some("2026-12-01".into()),
            max_length: Some(128),
            template: Some("{subject}\n{body}".into()),
            category_head: Some("queue".into()),
            threshold: None,
            heads: vec![
                HeadSpec {
                    weights: Some("queue".into()),
                    lexical_share: Some(0.3),
                    labels: vec!["billing".into(), "tech".into()],
                    ..head("queue", HeadKind::SingleLabel)
                },
                HeadSpec {
                    weights: Some("tags".into()),
                    threshold: Some(0.35),
                    thresholds: [("urgent".to_string(), 0.6f32)].into(),
                    labels: vec!["urgent".into(), "refund".into()],
                    ..head("tags", HeadKind::MultiLabel)
                },
                head("embedding", HeadKind::Embedding),
            ],
            priority: Some(PrioritySpec {
                from_head: "queue".into(),
                default: Some("normal".into()),
                map: [("billing".to_string(), "high".to_string())].into(),
            }),
            escalation: Some(EscalationSpec { threshold: 0.45, target_accuracy: Some(0.95), escalated_share: Some(0.047) }),
            ood: Some(OodSpec { output: "embedding".into(), threshold: 0.3123, auroc: Some(0.998) }),
            architecture: Some(Architecture { layers: 6, hidden: 384, intermediate: 1536 }),
            training: Some(TrainingRecord {
                text: vec!["subject".into(), "body".into()],
                labels: vec!["queue=queue".into()],
                multi_label: vec!["tags=tag_1,tag_2".into()],
                seed: 42,
                validation_fraction: 0.2,
                validation_fold: None,
                min_examples: 5,
                encoder: "runtime/encoders/minilm-l6".into(),
                data: "tickets.csv".into(),
                data_rows: 1000,
                trained_at: "2026-12-01T00:00:00Z".into(),
                refit_full: true,
                fitted: vec![FittedHead {
                    head: "queue".into(),
                    c: 64.0,
                    lexical_c: Some(30.0),
                    lexical_features: Some(crate::model::linear::LexicalFeatures::WordPiecesAndCharacters),
                }],
            }),
        }
    }

    #[test]
    fn what_train_writes_reads_back_identically() {
        let written = written_by_train();
        let text = written.to_toml("# header\n").unwrap();
        assert!(text.starts_with("# header\n"), "{text}");
        let read: DescriptorFile = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(read, written, "{text}");
        let resolved = Descriptor::parse(&text, Path::new("m")).unwrap();
        assert_eq!(resolved.category_head, Some(0));
        assert_eq!(resolved.escalation.unwrap().threshold, 0.45);
        assert_eq!(resolved.heads[1].threshold_for("urgent"), 0.6);
    }

    #[test]
    fn thresholds_are_written_without_float_noise() {
        let text = written_by_train().to_toml("").unwrap();
        for expected in
            ["threshold = 0.45", "threshold = 0.3123", "threshold = 0.35", "urgent = 0.6", "lexical_share = 0.3", "auroc = 0.998"]
        {
            assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
        }
        assert!(!text.contains("0.4499") && !text.contains("0.3499") && !text.contains("00000"), "{text}");
        assert!(!text.contains("activation") && !text.contains("thresholds = {}"), "unset fields are left out:\n{text}");
    }

    fn optimum(problem_type: Option<&str>) -> OptimumConfig {
        OptimumConfig {
            id2label: [("1".to_string(), "positive".to_string()), ("0".to_string(), "negative".to_string())].into(),
            problem_type: problem_type.map(String::from),
            name_or_path: Some("acme/ticket-bert".into()),
            model_type: Some("bert".into()),
        }
    }

    #[test]
    fn optimum_config_alone_gives_a_softmax_category_head_in_id_order() {
        let d = Descriptor::resolve(None, Some(optimum(None)), "dir", Path::new("/m")).unwrap();
        assert_eq!(d.heads.len(), 1);
        assert_eq!(d.heads[0].output, "logits");
        assert_eq!(d.heads[0].labels, vec!["negative", "positive"]);
        assert_eq!(d.heads[0].activation(), Activation::Softmax);
        assert_eq!(d.category_head, Some(0));
        assert_eq!(d.name, "ticket-bert");
        assert_eq!(d.max_length, DEFAULT_MAX_LENGTH);
    }

    #[test]
    fn multi_label_problem_type_gives_sigmoid() {
        let d = Descriptor::resolve(None, Some(optimum(Some("multi_label_classification"))), "dir", Path::new("/m")).unwrap();
        assert_eq!(d.heads[0].kind, HeadKind::MultiLabel);
        assert_eq!(d.heads[0].activation(), Activation::Sigmoid);
        assert_eq!(d.category_head, None);
    }

    #[test]
    fn regression_is_rejected_with_the_problem_type_named() {
        let err = Descriptor::resolve(None, Some(optimum(Some("regression"))), "dir", Path::new("/m")).unwrap_err();
        assert!(err.to_string().contains("regression"), "{err}");
    }

    #[test]
    fn own_descriptor_adds_priority_map_to_optimum_head() {
        let own: DescriptorFile = toml::from_str(
            r#"
            name = "sentiment"
            version = "3"
            [priority]
            from_head = "category"
            default = "normal"
            map = { negative = "high" }
            "#,
        )
        .unwrap();
        let d = Descriptor::resolve(Some(own), Some(optimum(None)), "dir", Path::new("/m")).unwrap();
        let p = d.priority.unwrap();
        assert_eq!(p.priority_of("negative").as_deref(), Some("high"));
        assert_eq!(p.priority_of("positive").as_deref(), Some("normal"));
        assert_eq!(d.name, "sentiment");
    }

    #[test]
    fn unknown_fields_and_bad_category_heads_are_rejected() {
        assert!(toml::from_str::<DescriptorFile>("nmae = \"x\"").is_err());
        let own: DescriptorFile = toml::from_str(
            r#"
            category_head = "tags"
            [[heads]]
            name = "tags"
            output = "tag_scores"
            kind = "multi_label"
            labels = ["a"]
            "#,
        )
        .unwrap();
        let err = Descriptor::resolve(Some(own), None, "dir", Path::new("/m")).unwrap_err();
        assert!(err.to_string().contains("single_label"), "{err}");
    }

    #[test]
    fn multi_label_thresholds_are_validated_and_resolved() {
        let own: DescriptorFile = toml::from_str(
            r#"
            [[heads]]
            name = "tags"
            output = "tag_scores"
            kind = "multi_label"
            labels = ["billing", "bug"]
            threshold = 0.4
            thresholds = { bug = 0.7 }
            "#,
        )
        .unwrap();
        let d = Descriptor::resolve(Some(own.clone()), None, "dir", Path::new("/m")).unwrap();
        assert_eq!(d.heads[0].threshold_for("bug"), 0.7);
        assert_eq!(d.heads[0].threshold_for("billing"), 0.4);
        let mut bad = own;
        bad.heads[0].thresholds.insert("nope".into(), 0.5);
        assert!(Descriptor::resolve(Some(bad), None, "dir", Path::new("/m")).unwrap_err().to_string().contains("nope"));
    }

    #[test]
    fn a_directory_without_any_descriptor_says_so() {
        let err = Descriptor::resolve(None, None, "dir", Path::new("/models/x")).unwrap_err();
        assert!(err.to_string().contains("/models/x"), "{err}");
    }

    #[test]
    fn minilm_l6_costs_about_21_megaflops_per_token() {
        let a = Architecture { layers: 6, hidden: 384, intermediate: 1536 };
        let per_token = a.flops(1, 16) / 16.0;
        assert!((per_token / 1e6 - 21.4).abs() < 0.2, "{per_token}");
        assert!(a.flops(2, 128) > 2.0 * a.flops(1, 128) - 1.0);
    }

    #[test]
    fn priority_head_without_map_uses_label_itself() {
        let p = PrioritySpec { from_head: "priority".into(), map: BTreeMap::new(), default: None };
        assert_eq!(p.priority_of("high").as_deref(), Some("high"));
    }
}
