//! `triage eval --cascade fast,accurate`: what a cascade of models would do on the models'
//! common validation split, side by side in one run: accuracy of each tier alone and of the
//! cascade (each message answered by the first tier that does not doubt it, by the worker's
//! own rule: the tier's calibrated threshold and OOD gate), the share each tier answers, and
//! messages per second of each tier alone and of the cascade (the first tier on every message,
//! the next ones on what reached them, timed here).
//!
//! The models must have been trained on the same data with the same split (their [training]
//! records say so), or the split would hold rows one of them trained on. Models refitted on
//! every row are scored by heads refitted on the training part (as `triage eval` does).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use super::eval::{score, EvalOptions, Scored, Split};
use super::{data, embed, prepare, Columns, Progress, TrainError};
use crate::model::{Model, TrainingRecord};
use crate::worker::policy::{decide, EscalationPolicy};

#[derive(Debug, Clone, Serialize)]
pub struct TierReport {
    pub model: String,
    pub version: String,
    /// Alone, on every message of the split.
    pub accuracy: f64,
    pub standard_error: f64,
    pub messages_per_second: f64,
    /// Share of the split this tier would doubt alone (pass on, or escalate if last).
    pub doubted: f64,
    /// Share of the split this tier answers in the cascade.
    pub answered_in_cascade: f64,
    /// Predictions from heads refitted on the training part (see `triage eval`).
    pub refitted: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CascadeReport {
    pub data: String,
    pub split: String,
    pub evaluated: usize,
    pub head: String,
    pub tiers: Vec<TierReport>,
    pub accuracy: f64,
    pub standard_error: f64,
    /// Cascade accuracy minus the last tier's alone, and the standard error of that paired
    /// difference (a difference within about two of them is noise on this split).
    pub accuracy_vs_last: f64,
    pub accuracy_vs_last_standard_error: f64,
    pub messages_per_second: f64,
    /// Escalated by the last tier (what would reach the escalation topic).
    pub escalated: f64,
}

pub fn evaluate_cascade(
    models: &[PathBuf],
    data_path: &std::path::Path,
    base: &EvalOptions,
    progress: &dyn Progress,
) -> Result<CascadeReport, TrainError> {
    if models.len() < 2 {
        return Err(TrainError::Invalid("--cascade needs two or more model directories, first tier first".into()));
    }
    let mut loaded = Vec::new();
    for dir in models {
        loaded.push(Arc::new(Model::load(dir, &base.inference)?));
    }
    let records: Vec<&TrainingRecord> = loaded
        .iter()
        .zip(models)
        .map(|(m, dir)| {
            m.descriptor().training.as_ref().ok_or_else(|| {
                TrainError::Invalid(format!(
                    "{} has no [training] record: a cascade is evaluated on its tiers' common split",
                    dir.display()
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    same_split(&records, models)?;
    let record = records[0];
    let columns = Columns::parse(&record.text, &record.labels, &record.multi_label)?;
    let head = columns
        .labels
        .first()
        .map(|(h, _)| h.clone())
        .ok_or_else(|| TrainError::Invalid("the tiers have no single-label head to compare".into()))?;
    let prepared = prepare(data::read(data_path, &columns)?, &columns, record.min_examples)?;
    let holdout = super::split::Holdout::of_record(record)?;
    let (train_rows, eval_rows) = prepared.split(&holdout);
    let truth_index = prepared.single.iter().position(|h| h.name == head).unwrap_or(0);
    let truth_head = &prepared.single[truth_index];
    let rows: Vec<usize> = eval_rows.iter().copied().filter(|&r| truth_head.y[r].is_some()).collect();
    let n = rows.len();
    if n == 0 {
        return Err(TrainError::Invalid("the validation split has no labelled rows".into()));
    }

    // Per tier: honest predictions (correct? doubted?) and its speed alone, measured here.
    let mut correct: Vec<Vec<bool>> = Vec::new();
    let mut doubted: Vec<Vec<bool>> = Vec::new();
    let mut alone_seconds = Vec::new();
    let mut refitted = Vec::new();
    let mut texts_per_tier = Vec::new();
    for (model, dir) in loaded.iter().zip(models) {
        let options = EvalOptions { model: dir.clone(), ..base.clone() };
        let texts_all = prepared.render(model.template(), model.encoder().max_chars());
        let Scored { predictions, refitted: r, .. } = {
            let split = Split { prepared: &prepared, texts_all: &texts_all, train_rows: &train_rows, eval_rows: &rows };
            score(model, model.descriptor().training.as_ref(), &split, &options, progress)?
        };
        let policy = EscalationPolicy::of_model(model.descriptor(), model.heads().ood().is_some(), 0.5);
        correct.push(
            predictions
                .iter()
                .zip(&rows)
                .map(|(p, &r)| {
                    let truth = truth_head.y[r].map(|t| truth_head.labels[t].as_str());
                    p.category.as_ref().map(|c| c.label.as_str()) == truth
                })
                .collect(),
        );
        doubted.push(predictions.iter().map(|p| decide(p, &policy).is_some()).collect());
        refitted.push(r);
        let texts: Vec<_> = rows.iter().map(|&r| texts_all[r].clone()).collect();
        let (_, seconds) =
            embed::predict_all(model.clone(), &texts, &base.engine, progress, &format!("timing {} alone", model.info().name))?;
        alone_seconds.push(seconds);
        texts_per_tier.push(texts);
    }

    // The cascade: who answers each row, and the time the later tiers spend on what reaches them.
    let tiers = loaded.len();
    let answered_by: Vec<usize> = (0..n).map(|i| (0..tiers).find(|&t| !doubted[t][i]).unwrap_or(tiers - 1)).collect();
    let mut cascade_seconds = alone_seconds[0];
    for t in 1..tiers {
        let reaching: Vec<_> = (0..n).filter(|&i| answered_by[i] >= t).map(|i| texts_per_tier[t][i].clone()).collect();
        if !reaching.is_empty() {
            let stage = format!("timing {} on the {} messages reaching it", loaded[t].info().name, reaching.len());
            cascade_seconds += embed::predict_all(loaded[t].clone(), &reaching, &base.engine, progress, &stage)?.1;
        }
    }
    let cascade_correct: Vec<bool> = (0..n).map(|i| correct[answered_by[i]][i]).collect();
    let share = |v: &[bool]| v.iter().filter(|b| **b).count() as f64 / n as f64;
    let se = |p: f64| (p * (1.0 - p) / n as f64).sqrt();
    let accuracy = share(&cascade_correct);
    let last = tiers - 1;
    let diffs: Vec<f64> = (0..n).map(|i| f64::from(u8::from(cascade_correct[i])) - f64::from(u8::from(correct[last][i]))).collect();
    let mean_diff = diffs.iter().sum::<f64>() / n as f64;
    let var = diffs.iter().map(|d| (d - mean_diff).powi(2)).sum::<f64>() / (n.max(2) - 1) as f64;
    let tier_reports = (0..tiers)
        .map(|t| {
            let accuracy = share(&correct[t]);
            TierReport {
                model: loaded[t].info().name.clone(),
                version: loaded[t].info().version.clone(),
                accuracy,
                standard_error: se(accuracy),
                messages_per_second: n as f64 / alone_seconds[t].max(1e-9),
                doubted: share(&doubted[t]),
                answered_in_cascade: answered_by.iter().filter(|&&a| a == t).count() as f64 / n as f64,
                refitted: refitted[t],
            }
        })
        .collect();
    Ok(CascadeReport {
        data: data_path.display().to_string(),
        split: format!("the tiers' common validation split ({holdout})"),
        evaluated: n,
        head,
        tiers: tier_reports,
        accuracy,
        standard_error: se(accuracy),
        accuracy_vs_last: mean_diff,
        accuracy_vs_last_standard_error: (var / n as f64).sqrt(),
        messages_per_second: n as f64 / cascade_seconds.max(1e-9),
        escalated: (0..n).filter(|&i| answered_by[i] == last && doubted[last][i]).count() as f64 / n as f64,
    })
}

/// The tiers' [training] records must agree on everything that fixes the split.
fn same_split(records: &[&TrainingRecord], models: &[PathBuf]) -> Result<(), TrainError> {
    let first = records[0];
    for (record, dir) in records.iter().zip(models).skip(1) {
        let mut differ = Vec::new();
        if record.data != first.data || record.data_rows != first.data_rows {
            differ.push(format!("data {} ({} rows) vs {} ({} rows)", record.data, record.data_rows, first.data, first.data_rows));
        }
        if record.seed != first.seed {
            differ.push(format!("seed {} vs {}", record.seed, first.seed));
        }
        if record.validation_fraction != first.validation_fraction {
            differ.push(format!("validation fraction {} vs {}", record.validation_fraction, first.validation_fraction));
        }
        if record.validation_fold != first.validation_fold {
            differ.push(format!("validation fold {:?} vs {:?}", record.validation_fold, first.validation_fold));
        }
        if record.labels != first.labels || record.text != first.text {
            differ.push("text or label columns".into());
        }
        if record.min_examples != first.min_examples {
            differ.push(format!("min_examples {} vs {}", record.min_examples, first.min_examples));
        }
        if !differ.is_empty() {
            return Err(TrainError::Invalid(format!(
                "{} and {} were not trained on the same data and split ({}): retrain one with the other's settings",
                dir.display(),
                models[0].display(),
                differ.join("; ")
            )));
        }
    }
    Ok(())
}

pub fn render(r: &CascadeReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "cascade on {}: {} ({} messages, head `{}`)\n", r.data, r.split, r.evaluated, r.head);
    let _ = writeln!(s, "  {:<34} {:>9} {:>8} {:>11} {:>9} {:>10}", "", "accuracy", "± s.e.", "messages/s", "doubted", "answers");
    for (i, t) in r.tiers.iter().enumerate() {
        let name = format!("tier {} alone: {} {}", i + 1, t.model, t.version);
        let _ = writeln!(
            s,
            "  {:<34} {:>9.4} {:>8.4} {:>11.1} {:>8.1}% {:>9.1}%",
            truncate(&name, 34),
            t.accuracy,
            t.standard_error,
            t.messages_per_second,
            t.doubted * 100.0,
            t.answered_in_cascade * 100.0
        );
    }
    let _ = writeln!(
        s,
        "  {:<34} {:>9.4} {:>8.4} {:>11.1} {:>8.1}%",
        "cascade",
        r.accuracy,
        r.standard_error,
        r.messages_per_second,
        r.escalated * 100.0
    );
    if let Some(last) = r.tiers.last() {
        let _ = writeln!(
            s,
            "\n  cascade vs {} alone: accuracy {:+.4} (paired s.e. {:.4}), {:.2}x its messages/s; {:.1}% escalated by the last tier",
            last.model,
            r.accuracy_vs_last,
            r.accuracy_vs_last_standard_error,
            r.messages_per_second / last.messages_per_second.max(1e-9),
            r.escalated * 100.0
        );
    }
    if r.tiers.iter().any(|t| t.refitted) {
        let _ = writeln!(s, "  (tiers refitted on every row are scored by their heads refitted on the training part)");
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
