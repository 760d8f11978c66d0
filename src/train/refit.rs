//! The shipped heads, refitted on every usable row once cross-validation on the training part
//! has chosen their settings; and the out-of-fold predictions (k-fold over every row, each
//! fold with its own lexical vocabulary and class centroids) that report and calibrate them.
//! A refitted head has seen every row, so nothing it predicts on its own data is reported:
//! every figure and threshold comes from heads fitted without the rows they predict.

use ndarray::{Array2, Axis};

use super::fitting::{fit_layers, layer_probabilities, predicted, top_confidence, HeadSettings, RefitReport};
use super::logreg::{self, Design, Fit, FitOptions, SparseRows, Target};
use super::{class_centroids, lexical_rows, lexical_vocabulary, metrics, split, Progress, SingleLabels};
use crate::model::linear::{LexicalInput, LexicalVocabulary};

/// Features appearing in fewer training texts than this are left out of a vocabulary.
pub const MIN_DOCUMENT_FREQUENCY: u32 = 2;

pub struct RefitSingle {
    pub dense: Fit,
    pub lexical: Option<Fit>,
    pub report: RefitReport,
    /// Out-of-fold top confidence and correctness, one per labelled row.
    pub oof_confidence: Vec<f32>,
    pub oof_correct: Vec<bool>,
    /// Out-of-fold distance to the nearest class centroid, one per labelled row.
    pub oof_ood: Vec<f32>,
}

/// Every example as the heads read it.
pub struct Examples<'a> {
    pub embeddings: &'a Array2<f32>,
    pub docs: &'a [LexicalInput<'a>],
    /// Every row's TF-IDF over the vocabulary of every row (what the worker will compute).
    pub final_lexical: &'a SparseRows,
}

/// Refit one single-label head on every labelled row, with `folds` out-of-fold folds (split by
/// `seed`).
pub fn refit_single(
    examples: &Examples<'_>,
    head: &SingleLabels,
    settings: &HeadSettings,
    (folds, seed): (usize, u64),
    progress: &dyn Progress,
) -> RefitSingle {
    let Examples { embeddings, docs, final_lexical } = *examples;
    let rows: Vec<usize> = (0..head.y.len()).filter(|&r| head.y[r].is_some()).collect();
    let y: Vec<usize> = rows.iter().filter_map(|&r| head.y[r]).collect();
    let labels = head.labels.len();
    let fold_rows = split::stratified_folds(&y, folds, seed);
    progress
        .stage(&format!("refitting head `{}` on all {} rows ({folds}-fold out-of-fold figures)", head.name, rows.len()), folds as u64 + 1);

    let mut oof = Array2::<f32>::zeros((rows.len(), labels));
    let mut oof_dense = Array2::<f32>::zeros((rows.len(), labels));
    let mut oof_ood = vec![0.0f32; rows.len()];
    let mut fold_accuracy = Vec::with_capacity(folds);
    for (fit, held) in &fold_rows {
        let (fit_rows, held_rows) = (pick(&rows, fit), pick(&rows, held));
        let vocabulary = lexical_vocabulary(docs, &fit_rows, MIN_DOCUMENT_FREQUENCY, settings.lexical_features);
        let x_fit = lexical_subset(&vocabulary, docs, &fit_rows);
        let x_held = lexical_subset(&vocabulary, docs, &held_rows);
        let (e_fit, e_held) = (embeddings.select(Axis(0), &fit_rows), embeddings.select(Axis(0), &held_rows));
        let y_fit: Vec<usize> = fit.iter().map(|&k| y[k]).collect();
        let (dense, lexical) = fit_layers(&e_fit, &x_fit, &y_fit, labels, settings);
        let p = layer_probabilities(&dense, lexical.as_ref(), settings.lexical_share, &e_held, &x_held);
        let p_dense = dense.probabilities(&e_held, false);
        let centroids = class_centroids(embeddings, &fit_rows, &head.y, labels);
        let mut correct = 0usize;
        for (k, &index) in held.iter().enumerate() {
            oof.row_mut(index).assign(&p.row(k));
            oof_dense.row_mut(index).assign(&p_dense.row(k));
            oof_ood[index] = centroids.distance_to_nearest(e_held.row(k).as_slice().unwrap_or(&[]));
            correct += usize::from(super::fitting::argmax(p.row(k)) == y[index]);
        }
        fold_accuracy.push(correct as f64 / held.len().max(1) as f64);
        progress.advance(1);
    }

    let e_all = embeddings.select(Axis(0), &rows);
    let (dense, lexical) = fit_layers(&e_all, &final_lexical.subset(&rows), &y, labels, settings);
    progress.advance(1);
    progress.finish_stage();

    let chosen = predicted(&oof);
    let oof_correct: Vec<bool> = chosen.iter().zip(&y).map(|(a, b)| a == b).collect();
    let quality = metrics::report(&y, &chosen, &head.labels, 0);
    let dense_correct = predicted(&oof_dense).iter().zip(&y).filter(|(a, b)| a == b).count();
    let mean = fold_accuracy.iter().sum::<f64>() / fold_accuracy.len().max(1) as f64;
    let variance = fold_accuracy.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (fold_accuracy.len().max(2) - 1) as f64;
    let report = RefitReport {
        examples: rows.len(),
        folds,
        accuracy: quality.accuracy,
        macro_f1: quality.macro_f1,
        fold_accuracy_std: variance.sqrt(),
        accuracy_embedding_only: dense_correct as f64 / rows.len().max(1) as f64,
    };
    progress.note(&format!(
        "head `{}` refitted on {} rows: out-of-fold accuracy {:.4} (± {:.4} across folds; embedding alone {:.4}), macro-F1 {:.4}",
        head.name, report.examples, report.accuracy, report.fold_accuracy_std, report.accuracy_embedding_only, report.macro_f1
    ));
    RefitSingle { dense, lexical, report, oof_confidence: top_confidence(&oof), oof_correct, oof_ood }
}

/// A multi-label head's layer on every row that has a tag list (C as chosen).
pub fn refit_multi(embeddings: &Array2<f32>, y: &[Vec<usize>], labels: usize, c: f64) -> Fit {
    let rows: Vec<usize> = (0..y.len()).collect();
    let mut target = Array2::<f32>::zeros((rows.len(), labels));
    for (k, tags) in y.iter().enumerate() {
        for &t in tags {
            target[[k, t]] = 1.0;
        }
    }
    logreg::fit(embeddings, Target::Multi { y: target.view() }, FitOptions { c, ..FitOptions::default() }, None)
}

fn pick(rows: &[usize], positions: &[usize]) -> Vec<usize> {
    positions.iter().map(|&k| rows[k]).collect()
}

fn lexical_subset(vocabulary: &LexicalVocabulary, docs: &[LexicalInput<'_>], rows: &[usize]) -> SparseRows {
    let picked: Vec<LexicalInput<'_>> = rows.iter().map(|&r| docs[r]).collect();
    lexical_rows(vocabulary, &picked)
}
