//! `triage train` and `triage eval`: from a labelled CSV / JSON-lines file to a model directory
//! the worker loads as it is, on CPU, without Python.
//!
//! The encoder stays frozen: every text is embedded once by an existing model directory (its
//! `embedding` head), batched by the same engine the worker uses; the heads are linear layers
//! fitted in Rust ([`logreg`]). A second, lexical layer per label (TF-IDF over the word pieces
//! the tokenizer already produced) is averaged in when it helps on cross-validation: the two
//! make different mistakes. From the validation split come the metrics, a confidence threshold
//! calibrated for a target accuracy, and the out-of-distribution gate's threshold.

pub mod card;
pub mod cascade;
pub mod data;
mod embed;
pub mod eval;
pub mod few_shot;
pub mod fine_tune;
mod fitting;
pub mod logreg;
pub mod metrics;
mod refit;
pub mod shadow;
pub mod split;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::Array2;
use serde::Serialize;

use crate::engine::EngineConfig;
use crate::model::linear::{self, LexicalFeatures, LexicalInput, LexicalVocabulary};
use crate::model::{InferenceOptions, Model, ModelError, Template};
pub use data::{Columns, DataError, Dataset};
pub use embed::{embed, EmbedRun};
pub use fitting::{HeadSettings, LexicalMode, SingleHeadFit};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Invalid(String),
    #[error("{}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// Where a long step reports how far it is (a progress bar, log lines, or nothing).
pub trait Progress: Sync {
    fn stage(&self, name: &str, total: u64);
    fn advance(&self, n: u64);
    fn finish_stage(&self);
    fn note(&self, line: &str);
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn stage(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish_stage(&self) {}
    fn note(&self, _: &str) {}
}

/// C values tried for the lexical (TF-IDF) layer and the TF-IDF baseline.
pub const LEXICAL_C_GRID: &[f64] = &[10.0, 30.0];

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub data: PathBuf,
    pub columns: Columns,
    /// A model directory with an `embedding` head (default: the default model).
    pub encoder: PathBuf,
    pub out: PathBuf,
    pub name: Option<String>,
    /// How the worker assembles text (default: the text placeholders joined by newlines).
    pub template: Option<String>,
    pub seed: u64,
    pub validation_fraction: f64,
    /// Hold out one of several stratified folds instead of `validation_fraction`.
    pub validation_fold: Option<split::ValidationFold>,
    /// Labels with fewer examples are left out (with a warning).
    pub min_examples: usize,
    pub lexical: LexicalMode,
    /// The lexical layer's features; None: chosen by cross-validation.
    pub lexical_features: Option<LexicalFeatures>,
    /// After cross-validation chose the settings, fit the shipped heads on every usable row
    /// (figures and thresholds then come from out-of-fold predictions over every row).
    pub refit_full: bool,
    /// Write the confidence threshold reaching this accuracy on what is not escalated.
    pub target_accuracy: Option<f64>,
    /// Texts unlike the training data, to measure the OOD gate (its AUROC).
    pub foreign: Option<PathBuf>,
    pub foreign_text: Option<Vec<(String, String)>>,
    /// A TOML file with a `[priority]` table (from_head, default, map) copied into model.toml.
    pub priority: Option<PathBuf>,
    /// Regularisation strengths tried by cross-validation (larger: weaker penalty).
    pub c_grid: Vec<f64>,
    pub lexical_c_grid: Vec<f64>,
    pub folds: usize,
    pub inference: InferenceOptions,
    pub engine: EngineConfig,
    /// Overwrite a model.toml already in `out`.
    pub force: bool,
    /// Markdown placed in the model card after its first paragraph (architecture, data
    /// credit and licence, business rules: what the measurements cannot say).
    pub card_notes: Option<PathBuf>,
    /// Few-shot examples written per label (`few_shot.jsonl`, for `triage escalate`); 0: none.
    pub few_shot: usize,
    /// Fine-tune the encoder on the first single-label head before fitting the heads
    /// (`encoder` must then be an fp32 pooled encoder directory).
    pub fine_tune: Option<fine_tune::FineTuneOptions>,
    /// Another model directory trained on the same data: its validation figures are set beside
    /// this one's in the card (e.g. the frozen recipe beside a fine-tuned one).
    pub compare: Option<PathBuf>,
}

impl TrainOptions {
    /// What fixes the validation split.
    pub fn holdout(&self) -> split::Holdout {
        split::Holdout { fraction: self.validation_fraction, fold: self.validation_fold, seed: self.seed }
    }

    pub fn new(data: PathBuf, columns: Columns, encoder: PathBuf, out: PathBuf) -> Self {
        TrainOptions {
            data,
            columns,
            encoder,
            out,
            name: None,
            template: None,
            seed: 42,
            validation_fraction: 0.2,
            validation_fold: None,
            min_examples: 5,
            lexical: LexicalMode::Auto,
            lexical_features: None,
            refit_full: true,
            target_accuracy: None,
            foreign: None,
            foreign_text: None,
            priority: None,
            c_grid: vec![1.0, 4.0, 16.0, 64.0],
            lexical_c_grid: LEXICAL_C_GRID.to_vec(),
            folds: 3,
            inference: InferenceOptions::default(),
            engine: EngineConfig::default(),
            force: false,
            card_notes: None,
            few_shot: 3,
            fine_tune: None,
            compare: None,
        }
    }

    /// Check the settings no data can fix, and return them in canonical form (C grid sorted).
    pub fn checked(&self) -> Result<TrainOptions, TrainError> {
        let bad = |m: String| Err(TrainError::Invalid(m));
        if let Some(t) = self.target_accuracy {
            if !(t > 0.0 && t < 1.0) {
                return bad(format!("target accuracy {t} must be a fraction between 0 and 1 (e.g. 0.95)"));
            }
        }
        if self.c_grid.is_empty() || self.c_grid.iter().any(|c| !(c.is_finite() && *c > 0.0)) {
            return bad("the C grid must hold positive numbers (e.g. 1,4,16,64)".into());
        }
        if !(2..=10).contains(&self.folds) {
            return bad(format!("{} cross-validation folds: use 2 to 10", self.folds));
        }
        if self.min_examples < 2 {
            return bad(format!("min_examples {}: a label needs at least 2 examples to be split", self.min_examples));
        }
        if !(0.05..=0.5).contains(&self.validation_fraction) {
            return bad(format!("validation fraction {} must be within 0.05..0.5", self.validation_fraction));
        }
        if let Some(f) = &self.fine_tune {
            f.checked()?;
        }
        let mut options = self.clone();
        options.c_grid.sort_by(f64::total_cmp);
        options.c_grid.dedup();
        Ok(options)
    }
}

/// Labels of one head, as indices into `labels` (sorted names).
#[derive(Debug, Clone, PartialEq)]
pub struct SingleLabels {
    pub name: String,
    pub column: String,
    pub labels: Vec<String>,
    pub y: Vec<Option<usize>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MultiLabels {
    pub name: String,
    pub columns: Vec<String>,
    pub labels: Vec<String>,
    pub y: Vec<Vec<usize>>,
}

/// The examples with labels turned into indices, rare labels left out; the split is a
/// function of this and the seed alone, so `triage eval` re-derives it exactly.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub dataset: Dataset,
    pub single: Vec<SingleLabels>,
    pub multi: Vec<MultiLabels>,
    pub warnings: Vec<String>,
}

pub fn prepare(dataset: Dataset, columns: &Columns, min_examples: usize) -> Result<Prepared, TrainError> {
    let mut warnings = dataset.warnings.clone();
    let mut single = Vec::new();
    for (h, (name, column)) in columns.labels.iter().enumerate() {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for e in &dataset.examples {
            if let Some(l) = &e.labels[h] {
                *counts.entry(l).or_default() += 1;
            }
        }
        let (kept, rare): (Vec<_>, Vec<_>) = counts.iter().partition(|(_, &n)| n >= min_examples);
        if !rare.is_empty() {
            let listed: Vec<String> = rare.iter().take(12).map(|(l, n)| format!("{l} ({n})")).collect();
            let more = if rare.len() > 12 { format!(" and {} more", rare.len() - 12) } else { String::new() };
            warnings.push(format!(
                "head `{name}`: {} label(s) with fewer than {min_examples} examples left out: {}{more}",
                rare.len(),
                listed.join(", ")
            ));
        }
        let labels: Vec<String> = kept.iter().map(|(l, _)| l.to_string()).collect();
        if labels.len() < 2 {
            return Err(TrainError::Invalid(format!(
                "head `{name}` (column `{column}`): {} label(s) with at least {min_examples} examples; a classifier needs two or more",
                labels.len()
            )));
        }
        let missing = dataset.examples.iter().filter(|e| e.labels[h].is_none()).count();
        if missing > 0 {
            let rows: Vec<String> = dataset.examples.iter().filter(|e| e.labels[h].is_none()).take(8).map(|e| e.row.to_string()).collect();
            warnings
                .push(format!("head `{name}`: {missing} row(s) have no `{column}` value and do not train it (rows {}…)", rows.join(", ")));
        }
        let y = dataset.examples.iter().map(|e| e.labels[h].as_ref().and_then(|l| labels.binary_search(l).ok())).collect();
        single.push(SingleLabels { name: name.clone(), column: column.clone(), labels, y });
    }
    let mut multi = Vec::new();
    for (h, (name, cols)) in columns.multi_label.iter().enumerate() {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for e in &dataset.examples {
            for t in &e.tags[h] {
                *counts.entry(t).or_default() += 1;
            }
        }
        let labels: Vec<String> = counts.iter().filter(|(_, &n)| n >= min_examples).map(|(l, _)| l.to_string()).collect();
        let rare = counts.len() - labels.len();
        if rare > 0 {
            warnings.push(format!("head `{name}`: {rare} tag(s) with fewer than {min_examples} examples left out ({} kept)", labels.len()));
        }
        if labels.is_empty() {
            return Err(TrainError::Invalid(format!("head `{name}`: no tag has at least {min_examples} examples")));
        }
        let y = dataset.examples.iter().map(|e| e.tags[h].iter().filter_map(|t| labels.binary_search(t).ok()).collect()).collect();
        multi.push(MultiLabels { name: name.clone(), columns: cols.clone(), labels, y });
    }
    Ok(Prepared { dataset, single, multi, warnings })
}

impl Prepared {
    /// (train, validation) row indices, stratified on the first single-label head.
    pub fn split(&self, holdout: &split::Holdout) -> (Vec<usize>, Vec<usize>) {
        let strata: Vec<usize> = match self.single.first() {
            Some(head) => head.y.iter().map(|y| y.map_or(head.labels.len(), |i| i)).collect(),
            None => vec![0; self.dataset.examples.len()],
        };
        holdout.rows(&strata)
    }

    /// Each example's text as the worker renders it.
    pub fn render(&self, template: &Template, max_chars: usize) -> Vec<crate::model::Rendered> {
        self.dataset.examples.iter().map(|e| e.render(template, max_chars)).collect()
    }
}

/// The template for the text placeholders: the given one (which must use only them), else
/// the placeholders joined by newlines.
pub fn template_for(columns: &Columns, given: Option<&str>) -> Result<(String, Template), TrainError> {
    let text = match given {
        Some(t) => t.to_string(),
        None => columns.text.iter().map(|(p, _)| format!("{{{p}}}")).collect::<Vec<_>>().join("\n"),
    };
    let template = Template::parse(&text).map_err(TrainError::Invalid)?;
    let unknown: Vec<&str> = template.fields().filter(|f| !columns.text.iter().any(|(p, _)| p == f)).collect();
    let text_fields: Vec<&str> = columns.text.iter().map(|(p, _)| p.as_str()).collect();
    if !template.fields().any(|f| text_fields.contains(&f)) {
        return Err(TrainError::Invalid(format!("template `{text}` uses none of the text fields {}", text_fields.join(", "))));
    }
    if !unknown.is_empty() {
        // Placeholders with no training column are allowed (always empty in training), but only
        // if they were asked for explicitly: say so, since the worker will fill them.
        tracing::warn!(placeholders = %unknown.join(", "), "template placeholders without a training column: they are empty in training");
    }
    Ok((text, template))
}

/// The lexical layer's input for every example: its word pieces and the text they came from.
pub fn lexical_inputs<'a>(ids: &'a [Vec<u32>], texts: &'a [crate::model::Rendered]) -> Vec<LexicalInput<'a>> {
    ids.iter().zip(texts).map(|(ids, t)| LexicalInput { ids, text: &t.text }).collect()
}

/// A lexical vocabulary built from the rows in `fit_rows` (features in at least `min_df` of
/// them).
pub fn lexical_vocabulary(docs: &[LexicalInput<'_>], fit_rows: &[usize], min_df: u32, features: LexicalFeatures) -> LexicalVocabulary {
    let mut df: std::collections::HashMap<linear::FeatureKey, u32> = std::collections::HashMap::new();
    for &r in fit_rows {
        for key in linear::feature_counts(docs[r], features).into_keys() {
            *df.entry(key).or_default() += 1;
        }
    }
    LexicalVocabulary::from_document_frequencies(df.into_iter().filter(|(_, d)| *d >= min_df).collect(), fit_rows.len())
}

pub fn lexical_rows(vocabulary: &LexicalVocabulary, docs: &[LexicalInput<'_>]) -> logreg::SparseRows {
    logreg::SparseRows::from_rows(vocabulary.len(), docs.iter().map(|d| vocabulary.transform(*d)))
}

/// Everything a training run measured; written as metrics.json and rendered in the card.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub model: String,
    pub data: String,
    pub rows_read: usize,
    pub examples: usize,
    pub warnings: Vec<String>,
    pub train_examples: usize,
    pub validation_examples: usize,
    /// 1-based data rows of the validation split, so other tools can score the same split.
    pub validation_data_rows: Vec<usize>,
    pub seed: u64,
    pub encoder: String,
    pub embedding_dim: usize,
    pub embed_seconds: f64,
    pub fit_seconds: f64,
    /// The shipped heads were refitted on every usable row (figures: out-of-fold).
    pub refit_full: bool,
    /// Where the escalation threshold and the OOD gate were calibrated.
    pub calibrated_on: String,
    pub single: Vec<fitting::SingleReport>,
    pub multi: Vec<fitting::MultiReport>,
    pub escalation: Option<EscalationReport>,
    pub ood: Option<OodReport>,
    /// The encoder was fine-tuned on the training part first (how, and how long).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fine_tune: Option<fine_tune::FineTuneReport>,
    /// `--compare`: another model's validation figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compared: Option<Compared>,
}

/// Another model directory's validation figures (its metrics.json), for a side-by-side.
#[derive(Debug, Clone, Serialize)]
pub struct Compared {
    pub model_dir: String,
    /// Its validation rows are this run's (the figures are comparable).
    pub same_split: bool,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub embedding_accuracy: f64,
}

impl Compared {
    /// Read `dir/metrics.json`; comparable when its validation rows are `validation_data_rows`.
    pub fn read(dir: &Path, data: &str, validation_data_rows: &[usize]) -> Result<Compared, TrainError> {
        let path = dir.join("metrics.json");
        let text = std::fs::read_to_string(&path).map_err(|e| TrainError::Invalid(format!("--compare: {}: {e}", path.display())))?;
        let metrics: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TrainError::Invalid(format!("--compare: {}: {e}", path.display())))?;
        let number = |pointer: &str| {
            metrics.pointer(pointer).and_then(serde_json::Value::as_f64).ok_or_else(|| {
                TrainError::Invalid(format!("--compare: {} has no {pointer} (not written by triage train?)", path.display()))
            })
        };
        let rows: Option<Vec<usize>> = metrics
            .get("validation_data_rows")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|n| n.as_u64().map(|n| n as usize)).collect());
        let same_data = metrics.get("data").and_then(|d| d.as_str()) == Some(data);
        Ok(Compared {
            model_dir: dir.display().to_string(),
            same_split: same_data && rows.as_deref() == Some(validation_data_rows),
            accuracy: number("/single/0/validation/accuracy")?,
            macro_f1: number("/single/0/validation/macro_f1")?,
            embedding_accuracy: number("/single/0/validation_embedding_only/accuracy")?,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EscalationReport {
    pub head: String,
    pub curve: Vec<metrics::CurvePoint>,
    pub target_accuracy: Option<f64>,
    pub recommended: Option<metrics::CurvePoint>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OodReport {
    pub threshold: f32,
    /// Share of in-domain validation messages above the threshold.
    pub in_domain_flagged: f64,
    pub foreign: Option<ForeignReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ForeignReport {
    pub data: String,
    pub examples: usize,
    /// AUROC of the OOD score separating foreign from in-domain validation texts.
    pub auroc: f64,
    /// The same for 1 - softmax confidence (what a confidence threshold alone would catch).
    pub confidence_auroc: f64,
    /// Share of foreign texts above the threshold.
    pub caught: f64,
    /// Mean top confidence of the category head on foreign vs in-domain texts.
    pub foreign_mean_confidence: f64,
    pub in_domain_mean_confidence: f64,
}

/// Train and write the model directory; returns what was measured.
pub fn train(options: &TrainOptions, progress: &dyn Progress) -> Result<TrainReport, TrainError> {
    let mut options = options.checked()?;
    if options.fine_tune.is_some() && options.refit_full {
        // Refitting on every row would score rows the encoder learned from: its out-of-fold
        // figures and the thresholds calibrated on them would be optimistic.
        progress
            .note("fine-tuning: the heads are fitted on the training part and calibrated on the validation split (no refit on every row)");
        options.refit_full = false;
    }
    let options = &mut options;
    if options.out.join(crate::model::descriptor::DESCRIPTOR_FILE).exists() && !options.force {
        return Err(TrainError::Invalid(format!("{} already holds a model.toml; pass --force to replace it", options.out.display())));
    }
    if options.columns.labels.is_empty() && options.columns.multi_label.is_empty() {
        return Err(TrainError::Invalid("nothing to learn: give at least one --label or --multi-label column".into()));
    }
    let priority = options.priority.as_deref().map(read_priority).transpose()?;
    let (template_text, template) = template_for(&options.columns, options.template.as_deref())?;

    let dataset = data::read(&options.data, &options.columns)?;
    let prepared = prepare(dataset, &options.columns, options.min_examples)?;
    for w in &prepared.warnings {
        progress.note(&format!("warning: {w}"));
    }
    let holdout = options.holdout();
    let (train_rows, validation_rows) = prepared.split(&holdout);
    progress.note(&format!(
        "{} usable rows of {} read: {} train, {} validation (stratified, {})",
        prepared.dataset.examples.len(),
        prepared.dataset.rows_read,
        train_rows.len(),
        validation_rows.len(),
        holdout
    ));

    // Read before any long step: a wrong --compare fails now, not after the training.
    let validation_data_rows: Vec<usize> = validation_rows.iter().map(|&r| prepared.dataset.examples[r].row).collect();
    let compared = options
        .compare
        .as_deref()
        .map(|dir| Compared::read(dir, &options.data.display().to_string(), &validation_data_rows))
        .transpose()?;
    let fine_tuned = match options.fine_tune.clone() {
        Some(settings) => {
            let head = prepared
                .single
                .first()
                .ok_or_else(|| TrainError::Invalid("--fine-tune needs a single-label head (--label) to learn".into()))?;
            let base = Model::load(&options.encoder, &options.inference)?;
            let texts = prepared.render(&template, base.encoder().max_chars());
            let examples = fine_tune::Examples {
                texts: &texts,
                labels: &head.y,
                label_count: head.labels.len(),
                train_rows: &train_rows,
                seed: options.seed,
            };
            let target = options.out.join(fine_tune::ENCODER_DIR);
            let report =
                fine_tune::fine_tune(&settings, &base, &options.encoder, &examples, &options.out.join(".fine-tune"), &target, progress)?;
            options.encoder = target;
            Some(report)
        }
        None => None,
    };
    let options = &*options;
    let encoder = Arc::new(Model::load(&options.encoder, &options.inference)?);
    let texts = prepared.render(&template, encoder.encoder().max_chars());
    let run = embed(encoder.clone(), &texts, &options.engine, progress, "embedding")?;
    progress.note(&format!("embedded {} texts in {:.1}s ({:.0}/s)", texts.len(), run.seconds, texts.len() as f64 / run.seconds.max(1e-9)));

    let fit_start = std::time::Instant::now();
    let docs = lexical_inputs(&run.ids, &texts);
    let families: Vec<LexicalFeatures> = match options.lexical_features {
        Some(f) => vec![f],
        None => vec![LexicalFeatures::WordPieces, LexicalFeatures::WordPiecesAndCharacters],
    };
    let mut candidates: Vec<fitting::LexicalCandidate> = families
        .iter()
        .map(|&features| {
            let vocabulary = lexical_vocabulary(&docs, &train_rows, refit::MIN_DOCUMENT_FREQUENCY, features);
            fitting::LexicalCandidate { features, rows: lexical_rows(&vocabulary, &docs) }
        })
        .collect();
    if options.lexical_features.is_some_and(|f| f != LexicalFeatures::WordPieces) {
        // The baseline is always word pieces.
        let vocabulary = lexical_vocabulary(&docs, &train_rows, refit::MIN_DOCUMENT_FREQUENCY, LexicalFeatures::WordPieces);
        candidates.insert(0, fitting::LexicalCandidate { features: LexicalFeatures::WordPieces, rows: lexical_rows(&vocabulary, &docs) });
    }
    let fit_head = |head: &SingleLabels, candidates: &[fitting::LexicalCandidate]| {
        let ctx = fitting::Context {
            embeddings: &run.embeddings,
            lexical: candidates,
            train_rows: &train_rows,
            validation_rows: &validation_rows,
            options,
            progress,
        };
        fitting::fit_single(&ctx, head)
    };
    // One vocabulary serves every head: the first head chooses its features.
    let mut single: Vec<SingleHeadFit> = Vec::new();
    for head in &prepared.single {
        let fit = match single.first() {
            None => fit_head(head, &candidates),
            Some(first) => {
                let features = first.settings.lexical_features;
                let chosen: Vec<fitting::LexicalCandidate> = candidates
                    .iter()
                    .filter(|c| c.features == features)
                    .map(|c| fitting::LexicalCandidate { features: c.features, rows: c.rows.clone() })
                    .collect();
                fit_head(head, &chosen)
            }
        };
        single.push(fit);
    }
    let features = single.first().map_or(LexicalFeatures::WordPieces, |s| s.settings.lexical_features);
    let ctx = fitting::Context {
        embeddings: &run.embeddings,
        lexical: &candidates,
        train_rows: &train_rows,
        validation_rows: &validation_rows,
        options,
        progress,
    };
    let mut multi: Vec<fitting::MultiHeadFit> = prepared.multi.iter().map(|h| fitting::fit_multi(&ctx, h)).collect();

    // The vocabulary written: from the training part, or from every row when refitting.
    let all_rows: Vec<usize> = (0..docs.len()).collect();
    let vocabulary_rows: &[usize] = if options.refit_full { &all_rows } else { &train_rows };
    let vocabulary = lexical_vocabulary(&docs, vocabulary_rows, refit::MIN_DOCUMENT_FREQUENCY, features);
    let lexical = lexical_rows(&vocabulary, &docs);
    let mut oof_ood: Option<Vec<f32>> = None;
    if options.refit_full {
        let examples = refit::Examples { embeddings: &run.embeddings, docs: &docs, final_lexical: &lexical };
        for (index, (fit, head)) in single.iter_mut().zip(&prepared.single).enumerate() {
            let refitted = refit::refit_single(&examples, head, &fit.settings, (options.folds, options.seed), progress);
            fit.dense = refitted.dense;
            fit.lexical = refitted.lexical;
            fit.calibration_confidence = refitted.oof_confidence;
            fit.calibration_correct = refitted.oof_correct;
            fit.report.refit = Some(refitted.report);
            if index == 0 {
                oof_ood = Some(refitted.oof_ood);
            }
        }
        for (fit, head) in multi.iter_mut().zip(&prepared.multi) {
            fit.fit = refit::refit_multi(&run.embeddings, &head.y, head.labels.len(), fit.report.c);
        }
    }
    let fit_seconds = fit_start.elapsed().as_secs_f64();
    let calibrated_on = match &single.first().and_then(|s| s.report.refit.as_ref()) {
        Some(r) => format!("out-of-fold predictions over all {} rows ({} folds)", r.examples, r.folds),
        None => format!("the validation split ({} rows)", validation_rows.len()),
    };

    let escalation = single.first().map(|head| {
        let curve = metrics::escalation_curve(&head.calibration_confidence, &head.calibration_correct);
        let recommended = options.target_accuracy.and_then(|t| metrics::threshold_for_accuracy(&curve, t));
        if let (Some(t), None) = (options.target_accuracy, recommended) {
            progress.note(&format!("warning: no confidence threshold reaches {:.1}% accuracy on {calibrated_on}", t * 100.0));
        }
        EscalationReport { head: head.report.name.clone(), curve, target_accuracy: options.target_accuracy, recommended }
    });

    let ood = single.first().map(|head| {
        let centroid_rows: &[usize] = if options.refit_full { &all_rows } else { &train_rows };
        let centroids = class_centroids(&run.embeddings, centroid_rows, &prepared.single[0].y, head.report.labels.len());
        let in_domain: Vec<f32> = match oof_ood.take() {
            Some(scores) => scores,
            None => {
                validation_rows.iter().map(|&r| centroids.distance_to_nearest(run.embeddings.row(r).as_slice().unwrap_or(&[]))).collect()
            }
        };
        let threshold = metrics::quantile(&in_domain, 0.99);
        (centroids, in_domain, threshold)
    });
    let ood_report = match &ood {
        Some((centroids, in_domain, threshold)) => {
            let foreign = match &options.foreign {
                Some(path) => Some(measure_foreign(
                    options,
                    path,
                    &template,
                    &encoder,
                    &vocabulary,
                    centroids,
                    in_domain,
                    *threshold,
                    &single[0],
                    progress,
                )?),
                None => None,
            };
            Some(OodReport {
                threshold: *threshold,
                in_domain_flagged: in_domain.iter().filter(|s| **s > *threshold).count() as f64 / in_domain.len().max(1) as f64,
                foreign,
            })
        }
        None => None,
    };

    let name = options
        .name
        .clone()
        .unwrap_or_else(|| options.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()));
    let report = TrainReport {
        model: name.clone(),
        data: options.data.display().to_string(),
        rows_read: prepared.dataset.rows_read,
        examples: prepared.dataset.examples.len(),
        warnings: prepared.warnings.clone(),
        train_examples: train_rows.len(),
        validation_examples: validation_rows.len(),
        validation_data_rows,
        seed: options.seed,
        encoder: format!("{} ({})", encoder.info().name, options.encoder.display()),
        embedding_dim: run.embeddings.ncols(),
        embed_seconds: run.seconds,
        fit_seconds,
        refit_full: options.refit_full,
        calibrated_on,
        single: single.iter().map(|s| s.report.clone()).collect(),
        multi: multi.iter().map(|m| m.report.clone()).collect(),
        escalation,
        ood: ood_report,
        fine_tune: fine_tuned,
        compared,
    };
    let example_rows: &[usize] = if options.refit_full { &all_rows } else { &train_rows };
    let text_refs: Vec<&str> = texts.iter().map(|t| t.text.as_str()).collect();
    let few_shot: Vec<few_shot::Example> = prepared
        .single
        .iter()
        .flat_map(|head| few_shot::choose(&head.name, &head.labels, &run.embeddings, &text_refs, example_rows, &head.y, options.few_shot))
        .collect();
    let output = card::Output {
        options,
        name: &name,
        template: &template_text,
        encoder: &encoder,
        embedding_output: &run.embedding_output,
        vocabulary: &vocabulary,
        single: &single,
        multi: &multi,
        centroids: ood.as_ref().map(|(c, _, _)| c),
        priority: priority.as_ref(),
        report: &report,
        data_rows: prepared.dataset.rows_read,
        few_shot: &few_shot,
    };
    card::write_model_dir(&output)?;
    progress.note(&format!("wrote {}", options.out.display()));
    Ok(report)
}

fn read_priority(path: &Path) -> Result<crate::model::PrioritySpec, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))?;
    let priority = table.remove("priority").ok_or_else(|| TrainError::Invalid(format!("{}: no [priority] table", path.display())))?;
    priority.try_into().map_err(|e| TrainError::Invalid(format!("{}: [priority]: {e}", path.display())))
}

/// Unit-length mean of each class's unit-length training embeddings.
pub fn class_centroids(embeddings: &Array2<f32>, rows: &[usize], y: &[Option<usize>], classes: usize) -> linear::DenseMatrix {
    let dim = embeddings.ncols();
    let mut sums = vec![0.0f32; classes * dim];
    for &r in rows {
        if let Some(c) = y[r] {
            let row = embeddings.row(r);
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            sums[c * dim..(c + 1) * dim].iter_mut().zip(row.iter()).for_each(|(s, v)| *s += v / norm);
        }
    }
    for centroid in sums.chunks_exact_mut(dim) {
        let norm = centroid.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        centroid.iter_mut().for_each(|v| *v /= norm);
    }
    linear::DenseMatrix { rows: classes, cols: dim, data: sums }
}

#[allow(clippy::too_many_arguments)]
fn measure_foreign(
    options: &TrainOptions,
    path: &Path,
    template: &Template,
    encoder: &Arc<Model>,
    vocabulary: &LexicalVocabulary,
    centroids: &linear::DenseMatrix,
    in_domain: &[f32],
    threshold: f32,
    category: &SingleHeadFit,
    progress: &dyn Progress,
) -> Result<ForeignReport, TrainError> {
    let text = options.foreign_text.clone().unwrap_or_else(|| options.columns.text.clone());
    let columns = Columns { text, labels: Vec::new(), multi_label: Vec::new() };
    let foreign = data::read(path, &columns)?;
    let texts: Vec<_> = foreign.examples.iter().map(|e| e.render(template, encoder.encoder().max_chars())).collect();
    let run = embed(encoder.clone(), &texts, &options.engine, progress, "embedding the foreign set")?;
    let scores: Vec<f32> = run.embeddings.outer_iter().map(|e| centroids.distance_to_nearest(e.as_slice().unwrap_or(&[]))).collect();
    let foreign_confidence = category.confidence_on(&run.embeddings, &lexical_rows(vocabulary, &lexical_inputs(&run.ids, &texts)));
    let to_doubt = |c: &[f32]| c.iter().map(|v| 1.0 - v).collect::<Vec<f32>>();
    let mean = |v: &[f32]| v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len().max(1) as f64;
    Ok(ForeignReport {
        data: path.display().to_string(),
        examples: texts.len(),
        auroc: metrics::auroc(&scores, in_domain),
        confidence_auroc: metrics::auroc(&to_doubt(&foreign_confidence), &to_doubt(&category.calibration_confidence)),
        caught: scores.iter().filter(|s| **s > threshold).count() as f64 / scores.len().max(1) as f64,
        foreign_mean_confidence: mean(&foreign_confidence),
        in_domain_mean_confidence: mean(&category.calibration_confidence),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> TrainOptions {
        let columns = Columns::parse(&["text".into()], &["label".into()], &[]).unwrap();
        TrainOptions::new("d.csv".into(), columns, "enc".into(), "out".into())
    }

    #[test]
    fn settings_no_data_can_fix_are_refused_with_the_value() {
        let refused = |o: TrainOptions| o.checked().unwrap_err().to_string();
        assert!(refused(TrainOptions { target_accuracy: Some(1.0), ..options() }).contains("target accuracy 1"));
        assert!(refused(TrainOptions { c_grid: vec![1.0, 0.0], ..options() }).contains("C grid"));
        assert!(refused(TrainOptions { c_grid: vec![], ..options() }).contains("C grid"));
        assert!(refused(TrainOptions { folds: 1, ..options() }).contains("1 cross-validation folds"));
        assert!(refused(TrainOptions { min_examples: 1, ..options() }).contains("min_examples 1"));
        assert!(refused(TrainOptions { validation_fraction: 0.9, ..options() }).contains("0.9"));
    }

    #[test]
    fn the_c_grid_is_sorted_and_deduplicated() {
        let o = TrainOptions { c_grid: vec![64.0, 1.0, 4.0, 1.0], ..options() }.checked().unwrap();
        assert_eq!(o.c_grid, vec![1.0, 4.0, 64.0]);
        assert_eq!(options().checked().unwrap().c_grid, options().c_grid, "the default grid is already canonical");
    }
}
