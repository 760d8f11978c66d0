//! `triage eval`: a model directory against labelled data, through the worker's own inference
//! path, next to a TF-IDF + logistic-regression baseline fitted on the same split.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use super::logreg::Design;
use super::metrics::{self, Report};
use super::{data, embed, lexical_rows, lexical_vocabulary, prepare, Columns, Progress, TrainError};
use crate::engine::EngineConfig;
use crate::model::linear::LexicalFeatures;
use crate::model::{HeadKind, HeadOutput, HeadResult, InferenceOptions, LabelScore, Model, Prediction, TrainingRecord};

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub model: PathBuf,
    pub data: PathBuf,
    /// Score every row (a separate test file) instead of the model's validation split.
    pub all: bool,
    /// Columns; default: the ones the model was trained with (model.toml [training]).
    pub columns: Option<Columns>,
    pub inference: InferenceOptions,
    pub engine: EngineConfig,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeadEval {
    pub name: String,
    pub report: Report,
    /// Truth labels the model does not know (counted as errors).
    pub unknown_labels: usize,
    pub baseline: Option<Report>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MultiEval {
    pub name: String,
    pub micro_f1: f64,
    pub baseline_micro_f1: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub version: String,
    pub data: String,
    pub split: String,
    pub evaluated: usize,
    pub warnings: Vec<String>,
    pub heads: Vec<HeadEval>,
    pub multi: Vec<MultiEval>,
    /// At the model's calibrated threshold: (threshold, share escalated, accuracy on the rest).
    pub escalation: Option<(f32, f64, f64)>,
    /// At the model's OOD threshold: (threshold, share above it).
    pub ood: Option<(f32, f64)>,
    pub messages_per_second: f64,
}

pub fn evaluate(options: &EvalOptions, progress: &dyn Progress) -> Result<EvalReport, TrainError> {
    let model = Arc::new(Model::load(&options.model, &options.inference)?);
    let record = model.descriptor().training.clone();
    let columns = match (&options.columns, &record) {
        (Some(c), _) => c.clone(),
        (None, Some(r)) => Columns::parse(&r.text, &r.labels, &r.multi_label)?,
        (None, None) => {
            return Err(TrainError::Invalid(format!(
                "{} has no [training] record: say which columns to read (--text and --label HEAD=COLUMN)",
                options.model.display()
            )))
        }
    };
    for (head, _) in &columns.labels {
        match model.heads().heads().iter().find(|h| &h.name == head) {
            Some(h) if h.kind == HeadKind::SingleLabel => {}
            _ => return Err(TrainError::Invalid(format!("{} has no single-label head `{head}`", model.info().name))),
        }
    }
    let min_examples = record.as_ref().map_or(1, |r| r.min_examples);
    let prepared = prepare(data::read(&options.data, &columns)?, &columns, min_examples)?;
    let n = prepared.dataset.examples.len();
    let (train_rows, eval_rows, split) = match (&record, options.all) {
        (Some(r), false) => {
            let holdout = super::split::Holdout::of_record(r)?;
            let (t, v) = prepared.split(&holdout);
            let split = format!("the model's validation split ({holdout})");
            (t, v, split)
        }
        _ => (Vec::new(), (0..n).collect(), "every row".to_string()),
    };
    let texts_all = prepared.render(model.template(), model.encoder().max_chars());
    let Scored { predictions, seconds, refitted } = score(
        &model,
        record.as_ref(),
        &Split { prepared: &prepared, texts_all: &texts_all, train_rows: &train_rows, eval_rows: &eval_rows },
        options,
        progress,
    )?;
    let split = if refitted {
        format!("{split}, heads refitted on the training part with the model's recorded settings (the shipped heads saw every row)")
    } else {
        split
    };

    // The baseline sees the same word pieces the model does.
    let ids = texts_all
        .iter()
        .map(|t| model.encoder().encode_rendered(t).map(|e| e.ids).map_err(TrainError::Invalid))
        .collect::<Result<Vec<_>, _>>()?;
    let docs = super::lexical_inputs(&ids, &texts_all);
    let lexical = (!train_rows.is_empty()).then(|| {
        let vocabulary = lexical_vocabulary(&docs, &train_rows, super::refit::MIN_DOCUMENT_FREQUENCY, LexicalFeatures::WordPieces);
        lexical_rows(&vocabulary, &docs)
    });

    let mut heads = Vec::new();
    for head in &prepared.single {
        let spec = model.heads().heads().iter().find(|h| h.name == head.name).cloned();
        let model_labels = spec.map(|s| s.labels).unwrap_or_default();
        let mut labels = model_labels.clone();
        labels.push("(label unknown to the model)".into());
        let unknown = labels.len() - 1;
        let (mut truth, mut predicted, mut unknown_labels) = (Vec::new(), Vec::new(), 0);
        for (k, &r) in eval_rows.iter().enumerate() {
            let Some(t) = head.y[r] else { continue };
            let truth_index = model_labels.iter().position(|l| *l == head.labels[t]).unwrap_or(unknown);
            unknown_labels += usize::from(truth_index == unknown);
            let p = match predictions[k].head(&head.name) {
                Some(HeadOutput::Label(l)) => model_labels.iter().position(|m| *m == l.label).unwrap_or(unknown),
                _ => unknown,
            };
            truth.push(truth_index);
            predicted.push(p);
        }
        let mut report = metrics::report(&truth, &predicted, &labels, 10);
        report.per_label.retain(|l| l.support > 0 || model_labels.contains(&l.label));
        let baseline = lexical.as_ref().map(|x| {
            let fit_rows: Vec<usize> = train_rows.iter().copied().filter(|&r| head.y[r].is_some()).collect();
            let y: Vec<usize> = fit_rows.iter().filter_map(|&r| head.y[r]).collect();
            let grid = super::LEXICAL_C_GRID;
            let seed = record.as_ref().map_or(42, |r| r.seed);
            let fit = super::fitting::tfidf_baseline(&x.subset(&fit_rows), &y, head.labels.len(), grid, 3, seed);
            let rows: Vec<usize> = eval_rows.iter().copied().filter(|&r| head.y[r].is_some()).collect();
            let p = fit.probabilities(&x.subset(&rows), false);
            let pred: Vec<usize> = p.outer_iter().map(|r| super::fitting::argmax(r.view())).collect();
            let truth: Vec<usize> = rows.iter().filter_map(|&r| head.y[r]).collect();
            metrics::report(&truth, &pred, &head.labels, 5)
        });
        heads.push(HeadEval { name: head.name.clone(), report, unknown_labels, baseline });
    }

    let mut multi = Vec::new();
    for head in &prepared.multi {
        let truth: Vec<Vec<bool>> = eval_rows.iter().map(|&r| (0..head.labels.len()).map(|l| head.y[r].contains(&l)).collect()).collect();
        let predicted: Vec<Vec<bool>> = predictions
            .iter()
            .map(|p| {
                let tags: Vec<&str> = match p.head(&head.name) {
                    Some(HeadOutput::Tags(t)) => t.iter().map(|t| t.label.as_str()).collect(),
                    _ => Vec::new(),
                };
                head.labels.iter().map(|l| tags.contains(&l.as_str())).collect()
            })
            .collect();
        multi.push(MultiEval { name: head.name.clone(), micro_f1: metrics::micro_f1(&truth, &predicted), baseline_micro_f1: None });
    }

    let descriptor = model.descriptor();
    let escalation = descriptor.escalation.as_ref().zip(prepared.single.first()).map(|(e, head)| {
        let mut kept = (0usize, 0usize);
        let mut escalated = 0usize;
        for (k, &r) in eval_rows.iter().enumerate() {
            let Some(t) = head.y[r] else { continue };
            let Some(HeadOutput::Label(l)) = predictions[k].head(&head.name) else { continue };
            if l.score < e.threshold {
                escalated += 1;
            } else {
                kept.1 += 1;
                kept.0 += usize::from(l.label == head.labels[t]);
            }
        }
        let total = (escalated + kept.1).max(1) as f64;
        (e.threshold, escalated as f64 / total, kept.0 as f64 / kept.1.max(1) as f64)
    });
    let ood = descriptor.ood.as_ref().map(|o| {
        let above = predictions.iter().filter(|p| p.ood_score.is_some_and(|s| s > o.threshold)).count();
        (o.threshold, above as f64 / predictions.len().max(1) as f64)
    });
    Ok(EvalReport {
        model: model.info().name.clone(),
        version: model.info().version.clone(),
        data: options.data.display().to_string(),
        split,
        evaluated: eval_rows.len(),
        warnings: prepared.warnings.clone(),
        heads,
        multi,
        escalation,
        ood,
        messages_per_second: eval_rows.len() as f64 / seconds.max(1e-9),
    })
}

/// A model's predictions for `eval_rows`, honest about what it was trained on.
pub(super) struct Scored {
    pub predictions: Vec<Prediction>,
    /// Inference time, prorated to the evaluated rows.
    pub seconds: f64,
    /// The predictions come from heads refitted on the training part (the shipped heads saw
    /// every row, the validation split included).
    pub refitted: bool,
}

/// The examples a model is scored on: every row rendered with its template, and the split.
pub(super) struct Split<'a> {
    pub prepared: &'a super::Prepared,
    pub texts_all: &'a [crate::model::Rendered],
    pub train_rows: &'a [usize],
    pub eval_rows: &'a [usize],
}

pub(super) fn score(
    model: &Arc<Model>,
    record: Option<&TrainingRecord>,
    split: &Split<'_>,
    options: &EvalOptions,
    progress: &dyn Progress,
) -> Result<Scored, TrainError> {
    let Split { texts_all, train_rows, eval_rows, .. } = *split;
    let refitted = record.is_some_and(|r| r.refit_full) && !train_rows.is_empty();
    let (predictions, seconds) = if refitted {
        rederive(model, record, split, options, progress)?
    } else {
        let texts: Vec<_> = eval_rows.iter().map(|&r| texts_all[r].clone()).collect();
        embed::predict_all(model.clone(), &texts, &options.engine, progress, "classifying")?
    };
    Ok(Scored { predictions, seconds, refitted })
}

/// Predictions for `eval_rows` from heads fitted on `train_rows` alone with the settings the
/// model recorded, over the model's own embeddings (the encoder is the same frozen one).
fn rederive(
    model: &Arc<Model>,
    record: Option<&TrainingRecord>,
    split: &Split<'_>,
    options: &EvalOptions,
    progress: &dyn Progress,
) -> Result<(Vec<Prediction>, f64), TrainError> {
    let Split { prepared, texts_all, train_rows, eval_rows } = *split;
    let fitted = record.map(|r| r.fitted.as_slice()).unwrap_or_default();
    let settings_of = |head: &str| {
        fitted.iter().find(|f| f.head == head).ok_or_else(|| {
            TrainError::Invalid(format!(
                "{} says its heads were refitted on every row but records no settings for head `{head}`: retrain it with this version",
                options.model.display()
            ))
        })
    };
    let run = embed(model.clone(), texts_all, &options.engine, progress, "embedding (to refit the heads on the training part)")?;
    let seconds = run.seconds * eval_rows.len() as f64 / texts_all.len().max(1) as f64;
    let docs = super::lexical_inputs(&run.ids, texts_all);
    let mut heads: Vec<Vec<HeadResult>> = vec![Vec::new(); eval_rows.len()];
    let eval_embeddings = run.embeddings.select(ndarray::Axis(0), eval_rows);
    for head in &prepared.single {
        let f = settings_of(&head.name)?;
        let settings = super::HeadSettings {
            c: f.c,
            lexical_c: f.lexical_c.unwrap_or(1.0),
            lexical_share: model.heads().heads().iter().find(|h| h.name == head.name).and_then(|h| h.lexical_share).unwrap_or(0.0),
            lexical_features: f.lexical_features.unwrap_or(LexicalFeatures::WordPieces),
        };
        let rows: Vec<usize> = train_rows.iter().copied().filter(|&r| head.y[r].is_some()).collect();
        let y: Vec<usize> = rows.iter().filter_map(|&r| head.y[r]).collect();
        let vocabulary = lexical_vocabulary(&docs, &rows, super::refit::MIN_DOCUMENT_FREQUENCY, settings.lexical_features);
        let lexical = lexical_rows(&vocabulary, &docs);
        let (dense, lexical_fit) = super::fitting::fit_layers(
            &run.embeddings.select(ndarray::Axis(0), &rows),
            &lexical.subset(&rows),
            &y,
            head.labels.len(),
            &settings,
        );
        let p = super::fitting::layer_probabilities(
            &dense,
            lexical_fit.as_ref(),
            settings.lexical_share,
            &eval_embeddings,
            &lexical.subset(eval_rows),
        );
        for (k, row) in p.outer_iter().enumerate() {
            let best = super::fitting::argmax(row);
            let output = HeadOutput::Label(LabelScore { label: head.labels[best].clone(), score: row[best] });
            heads[k].push(HeadResult { head: head.name.clone(), output });
        }
    }
    for head in &prepared.multi {
        let f = settings_of(&head.name)?;
        let threshold = model.heads().heads().iter().find(|h| h.name == head.name).and_then(|h| h.threshold).unwrap_or(0.5);
        let y: Vec<Vec<usize>> = train_rows.iter().map(|&r| head.y[r].clone()).collect();
        let fit = super::refit::refit_multi(&run.embeddings.select(ndarray::Axis(0), train_rows), &y, head.labels.len(), f.c);
        let p = fit.probabilities(&eval_embeddings, true);
        for (k, row) in p.outer_iter().enumerate() {
            let tags = row
                .iter()
                .enumerate()
                .filter(|(_, v)| **v >= threshold)
                .map(|(l, v)| LabelScore { label: head.labels[l].clone(), score: *v })
                .collect();
            heads[k].push(HeadResult { head: head.name.clone(), output: HeadOutput::Tags(tags) });
        }
    }
    let centroids = prepared.single.first().map(|h| super::class_centroids(&run.embeddings, train_rows, &h.y, h.labels.len()));
    let category_head = model.descriptor().category_head.map(|i| model.heads().heads()[i].name.clone());
    let predictions = heads
        .into_iter()
        .zip(eval_embeddings.outer_iter())
        .map(|(heads, e)| Prediction {
            category: heads.iter().find(|h| Some(&h.head) == category_head.as_ref()).and_then(|h| match &h.output {
                HeadOutput::Label(l) => Some(l.clone()),
                _ => None,
            }),
            priority: None,
            tags: Vec::new(),
            heads,
            ood_score: centroids.as_ref().map(|c| c.distance_to_nearest(e.as_slice().unwrap_or(&[]))),
        })
        .collect();
    Ok((predictions, seconds))
}

/// The report as text for a terminal.
pub fn render(r: &EvalReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} {} on {}: {} ({} messages, {:.0} messages/s)",
        r.model, r.version, r.data, r.split, r.evaluated, r.messages_per_second
    );
    for w in &r.warnings {
        let _ = writeln!(s, "warning: {w}");
    }
    for h in &r.heads {
        let _ = writeln!(s, "\nhead `{}`", h.name);
        let _ = writeln!(s, "  {:<40} {:>9} {:>9}", "", "accuracy", "macro-F1");
        let _ = writeln!(s, "  {:<40} {:>9.3} {:>9.3}", "model", h.report.accuracy, h.report.macro_f1);
        match &h.baseline {
            Some(b) => {
                let _ = writeln!(s, "  {:<40} {:>9.3} {:>9.3}", "TF-IDF + logistic regression (same split)", b.accuracy, b.macro_f1);
            }
            None => {
                let _ = writeln!(s, "  (no baseline: it needs the model's training split; --all scores every row)");
            }
        }
        if h.unknown_labels > 0 {
            let _ = writeln!(s, "  {} messages have a label the model does not know (counted as errors)", h.unknown_labels);
        }
        let _ = writeln!(s, "  {:<44} {:>9} {:>7} {:>8}", "label", "precision", "recall", "support");
        for l in &h.report.per_label {
            let _ = writeln!(s, "  {:<44} {:>9.2} {:>7.2} {:>8}", truncate(&l.label, 44), l.precision, l.recall, l.support);
        }
        if !h.report.confused.is_empty() {
            let _ = writeln!(s, "  most confused (true -> predicted):");
            for c in &h.report.confused {
                let _ = writeln!(s, "    {:>4}  {} -> {}", c.count, c.truth, c.predicted);
            }
        }
    }
    for m in &r.multi {
        let _ = writeln!(s, "\nmulti-label head `{}`: micro-F1 {:.3}", m.name, m.micro_f1);
    }
    if let Some((t, escalated, kept)) = r.escalation {
        let _ = writeln!(
            s,
            "\nescalation at the model's threshold {t:.2}: {:.1}% escalated, accuracy {:.1}% on the rest",
            escalated * 100.0,
            kept * 100.0
        );
    }
    if let Some((t, above)) = r.ood {
        let _ = writeln!(s, "out-of-distribution score above {t:.3}: {:.1}% of these messages", above * 100.0);
    }
    s
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}
