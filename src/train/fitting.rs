//! Fitting one head: regularisation chosen by stratified cross-validation on the training
//! part, the lexical layer's share chosen on the same out-of-fold predictions (never on the
//! validation split, which only measures), then one final fit on the whole training part.

use ndarray::{Array2, Axis};
use serde::Serialize;

use super::logreg::{self, Design, Fit, FitOptions, SparseRows, Target};
use super::metrics::{self, Report};
use super::{split, MultiLabels, SingleLabels, TrainOptions};

/// Whether a lexical layer is averaged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LexicalMode {
    /// When it improves cross-validated accuracy.
    Auto,
    On,
    Off,
}

impl std::str::FromStr for LexicalMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(LexicalMode::Auto),
            "on" | "true" => Ok(LexicalMode::On),
            "off" | "false" => Ok(LexicalMode::Off),
            other => Err(format!("`{other}`: expected auto, on or off")),
        }
    }
}

pub(super) struct Context<'a> {
    pub embeddings: &'a Array2<f32>,
    pub lexical: &'a SparseRows,
    pub train_rows: &'a [usize],
    pub validation_rows: &'a [usize],
    pub options: &'a TrainOptions,
    pub progress: &'a dyn super::Progress,
}

#[derive(Debug, Clone, Serialize)]
pub struct SingleReport {
    pub name: String,
    pub column: String,
    pub labels: Vec<String>,
    pub c: f64,
    pub lexical_c: f64,
    /// Share of the lexical layer in the averaged probabilities (0: embedding layer alone).
    pub lexical_share: f32,
    /// Cross-validated accuracy (training part) of the embedding layer and of the average.
    pub cv_accuracy_embedding: f64,
    pub cv_accuracy_combined: f64,
    /// On the validation split: the model as written, the embedding layer alone, and the
    /// TF-IDF + logistic regression baseline (the lexical layer alone).
    pub validation: Report,
    pub validation_embedding_only: Report,
    pub validation_tfidf_baseline: Report,
}

pub struct SingleHeadFit {
    pub report: SingleReport,
    pub dense: Fit,
    pub lexical: Fit,
    pub validation_confidence: Vec<f32>,
    pub validation_correct: Vec<bool>,
}

impl SingleHeadFit {
    /// Averaged probabilities, exactly as the worker computes them.
    pub fn probabilities(&self, embeddings: &Array2<f32>, lexical: &SparseRows) -> Array2<f32> {
        mix(&self.dense.probabilities(embeddings, false), &self.lexical.probabilities(lexical, false), self.report.lexical_share)
    }

    /// Top confidence per row.
    pub fn confidence_on(&self, embeddings: &Array2<f32>, lexical: &SparseRows) -> Vec<f32> {
        self.probabilities(embeddings, lexical).outer_iter().map(|r| r.iter().copied().fold(0.0, f32::max)).collect()
    }
}

fn mix(dense: &Array2<f32>, lexical: &Array2<f32>, share: f32) -> Array2<f32> {
    if share <= 0.0 {
        return dense.clone();
    }
    dense * (1.0 - share) + lexical * share
}

pub fn argmax(row: ndarray::ArrayView1<'_, f32>) -> usize {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
}

fn accuracy(p: &Array2<f32>, y: &[usize]) -> f64 {
    p.outer_iter().zip(y).filter(|(r, &t)| argmax(r.view()) == t).count() as f64 / y.len().max(1) as f64
}

/// Out-of-fold probabilities for every C of `grid` (ascending, warm-started), on rows `x` / `y`.
fn cross_validate<X: Design>(
    x: &X,
    target: CvTarget<'_>,
    grid: &[f64],
    folds: &[(Vec<usize>, Vec<usize>)],
    progress: &dyn super::Progress,
) -> Vec<Array2<f32>> {
    let (n, labels) = (x.rows(), target.labels());
    let mut oof: Vec<Array2<f32>> = grid.iter().map(|_| Array2::zeros((n, labels))).collect();
    for (fit_rows, held_rows) in folds {
        let (x_fit, x_held) = (x.subset(fit_rows), x.subset(held_rows));
        let mut warm: Option<Fit> = None;
        for (g, &c) in grid.iter().enumerate() {
            let options = FitOptions { c, ..FitOptions::default() };
            let fit = match target {
                CvTarget::Classes(y, l) => {
                    let y_fit: Vec<usize> = fit_rows.iter().map(|&i| y[i]).collect();
                    logreg::fit(&x_fit, Target::Classes { y: &y_fit, labels: l }, options, warm.as_ref())
                }
                CvTarget::Multi(y) => {
                    let y_fit = y.select(Axis(0), fit_rows);
                    logreg::fit(&x_fit, Target::Multi { y: y_fit.view() }, options, warm.as_ref())
                }
            };
            let p = fit.probabilities(&x_held, matches!(target, CvTarget::Multi(_)));
            for (k, &row) in held_rows.iter().enumerate() {
                oof[g].row_mut(row).assign(&p.row(k));
            }
            warm = Some(fit);
            progress.advance(1);
        }
    }
    oof
}

#[derive(Clone, Copy)]
enum CvTarget<'a> {
    Classes(&'a [usize], usize),
    Multi(&'a Array2<f32>),
}

impl CvTarget<'_> {
    fn labels(&self) -> usize {
        match self {
            CvTarget::Classes(_, l) => *l,
            CvTarget::Multi(y) => y.ncols(),
        }
    }
}

fn best_index(scores: &[f64]) -> usize {
    scores.iter().enumerate().fold((0, f64::NEG_INFINITY), |b, (i, &s)| if s > b.1 { (i, s) } else { b }).0
}

/// The TF-IDF + logistic-regression baseline alone: C chosen by the same cross-validation.
pub fn tfidf_baseline(lexical: &SparseRows, y: &[usize], labels: usize, grid: &[f64], folds: usize, seed: u64) -> Fit {
    let folds = split::stratified_folds(y, folds, seed);
    let oof = cross_validate(lexical, CvTarget::Classes(y, labels), grid, &folds, &super::Silent);
    let best = best_index(&oof.iter().map(|p| accuracy(p, y)).collect::<Vec<_>>());
    logreg::fit(lexical, Target::Classes { y, labels }, FitOptions { c: grid[best], ..FitOptions::default() }, None)
}

pub(super) fn fit_single(ctx: &Context<'_>, head: &SingleLabels) -> SingleHeadFit {
    let o = ctx.options;
    let rows: Vec<usize> = ctx.train_rows.iter().copied().filter(|&r| head.y[r].is_some()).collect();
    let val: Vec<usize> = ctx.validation_rows.iter().copied().filter(|&r| head.y[r].is_some()).collect();
    let y: Vec<usize> = rows.iter().filter_map(|&r| head.y[r]).collect();
    let y_val: Vec<usize> = val.iter().filter_map(|&r| head.y[r]).collect();
    let labels = head.labels.len();
    let (dense_x, lexical_x) = (ctx.embeddings.select(Axis(0), &rows), ctx.lexical.subset(&rows));
    let folds = split::stratified_folds(&y, o.folds, o.seed);
    let fits = o.folds * (o.c_grid.len() + o.lexical_c_grid.len()) + 2;
    ctx.progress.stage(&format!("fitting head `{}` ({labels} labels, {}-fold CV)", head.name, o.folds), fits as u64);

    let dense_oof = cross_validate(&dense_x, CvTarget::Classes(&y, labels), &o.c_grid, &folds, ctx.progress);
    let dense_scores: Vec<f64> = dense_oof.iter().map(|p| accuracy(p, &y)).collect();
    let best_dense = best_index(&dense_scores);
    let lexical_oof = cross_validate(&lexical_x, CvTarget::Classes(&y, labels), &o.lexical_c_grid, &folds, ctx.progress);
    let lexical_scores: Vec<f64> = lexical_oof.iter().map(|p| accuracy(p, &y)).collect();
    let best_lexical = best_index(&lexical_scores);

    let shares: &[f32] = match o.lexical {
        LexicalMode::Off => &[0.0],
        LexicalMode::On => &[0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0],
        LexicalMode::Auto => &[0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0],
    };
    let share_scores: Vec<f64> =
        shares.iter().map(|&s| accuracy(&mix(&dense_oof[best_dense], &lexical_oof[best_lexical], s), &y)).collect();
    let share = shares[best_index(&share_scores)];

    let target = Target::Classes { y: &y, labels };
    let dense = logreg::fit(&dense_x, target, FitOptions { c: o.c_grid[best_dense], ..FitOptions::default() }, None);
    ctx.progress.advance(1);
    let lexical = logreg::fit(&lexical_x, target, FitOptions { c: o.lexical_c_grid[best_lexical], ..FitOptions::default() }, None);
    ctx.progress.advance(1);
    ctx.progress.finish_stage();

    let (dense_val, lexical_val) = (ctx.embeddings.select(Axis(0), &val), ctx.lexical.subset(&val));
    let p_dense = dense.probabilities(&dense_val, false);
    let p_lexical = lexical.probabilities(&lexical_val, false);
    let p = mix(&p_dense, &p_lexical, share);
    let predicted = |p: &Array2<f32>| p.outer_iter().map(|r| argmax(r.view())).collect::<Vec<_>>();
    let chosen = predicted(&p);
    let validation_correct: Vec<bool> = chosen.iter().zip(&y_val).map(|(a, b)| a == b).collect();
    let validation_confidence: Vec<f32> = p.outer_iter().map(|r| r.iter().copied().fold(0.0, f32::max)).collect();
    let report = SingleReport {
        name: head.name.clone(),
        column: head.column.clone(),
        labels: head.labels.clone(),
        c: o.c_grid[best_dense],
        lexical_c: o.lexical_c_grid[best_lexical],
        lexical_share: share,
        cv_accuracy_embedding: dense_scores[best_dense],
        cv_accuracy_combined: share_scores[best_index(&share_scores)],
        validation: metrics::report(&y_val, &chosen, &head.labels, 10),
        validation_embedding_only: metrics::report(&y_val, &predicted(&p_dense), &head.labels, 10),
        validation_tfidf_baseline: metrics::report(&y_val, &predicted(&p_lexical), &head.labels, 10),
    };
    ctx.progress.note(&format!(
        "head `{}`: validation accuracy {:.3} (embedding alone {:.3}, TF-IDF baseline {:.3}), macro-F1 {:.3}; C {} lexical share {}",
        head.name,
        report.validation.accuracy,
        report.validation_embedding_only.accuracy,
        report.validation_tfidf_baseline.accuracy,
        report.validation.macro_f1,
        report.c,
        share
    ));
    SingleHeadFit { report, dense, lexical, validation_confidence, validation_correct }
}

#[derive(Debug, Clone, Serialize)]
pub struct MultiReport {
    pub name: String,
    pub columns: Vec<String>,
    pub labels: Vec<String>,
    pub c: f64,
    pub threshold: f32,
    pub cv_micro_f1: f64,
    pub validation_micro_f1: f64,
    /// TF-IDF + logistic regression, same threshold.
    pub validation_tfidf_baseline_micro_f1: f64,
    pub validation_examples: usize,
}

pub struct MultiHeadFit {
    pub report: MultiReport,
    pub fit: Fit,
}

fn multi_hot(y: &[Vec<usize>], rows: &[usize], labels: usize) -> Array2<f32> {
    let mut m = Array2::zeros((rows.len(), labels));
    for (k, &r) in rows.iter().enumerate() {
        for &l in &y[r] {
            m[[k, l]] = 1.0;
        }
    }
    m
}

fn decide(p: &Array2<f32>, threshold: f32) -> Vec<Vec<bool>> {
    p.outer_iter().map(|r| r.iter().map(|v| *v >= threshold).collect()).collect()
}

fn as_bools(m: &Array2<f32>) -> Vec<Vec<bool>> {
    m.outer_iter().map(|r| r.iter().map(|v| *v > 0.5).collect()).collect()
}

pub(super) fn fit_multi(ctx: &Context<'_>, head: &MultiLabels) -> MultiHeadFit {
    let o = ctx.options;
    let labels = head.labels.len();
    let rows = ctx.train_rows;
    let y = multi_hot(&head.y, rows, labels);
    let truth = as_bools(&y);
    // Folds stratified on each row's first tag (rows without tags form their own stratum).
    let strata: Vec<usize> = rows.iter().map(|&r| head.y[r].first().copied().unwrap_or(labels)).collect();
    let folds = split::stratified_folds(&strata, o.folds, o.seed);
    ctx.progress.stage(&format!("fitting multi-label head `{}` ({labels} tags)", head.name), (o.folds * o.c_grid.len() + 2) as u64);
    let dense_x = ctx.embeddings.select(Axis(0), rows);
    let oof = cross_validate(&dense_x, CvTarget::Multi(&y), &o.c_grid, &folds, ctx.progress);
    let scores: Vec<f64> = oof.iter().map(|p| metrics::micro_f1(&truth, &decide(p, 0.5))).collect();
    let best = best_index(&scores);
    let thresholds: Vec<f32> = (4..=13).map(|t| t as f32 * 0.05).collect();
    let threshold_scores: Vec<f64> = thresholds.iter().map(|&t| metrics::micro_f1(&truth, &decide(&oof[best], t))).collect();
    let threshold = thresholds[best_index(&threshold_scores)];
    let fit = logreg::fit(&dense_x, Target::Multi { y: y.view() }, FitOptions { c: o.c_grid[best], ..FitOptions::default() }, None);
    ctx.progress.advance(1);
    let lexical_c = o.lexical_c_grid.first().copied().unwrap_or(10.0);
    let baseline =
        logreg::fit(&ctx.lexical.subset(rows), Target::Multi { y: y.view() }, FitOptions { c: lexical_c, ..FitOptions::default() }, None);
    ctx.progress.advance(1);
    ctx.progress.finish_stage();
    let val = ctx.validation_rows;
    let val_truth = as_bools(&multi_hot(&head.y, val, labels));
    let validation_micro_f1 =
        metrics::micro_f1(&val_truth, &decide(&fit.probabilities(&ctx.embeddings.select(Axis(0), val), true), threshold));
    let baseline_f1 = metrics::micro_f1(&val_truth, &decide(&baseline.probabilities(&ctx.lexical.subset(val), true), threshold));
    ctx.progress.note(&format!(
        "head `{}`: validation micro-F1 {validation_micro_f1:.3} (TF-IDF baseline {baseline_f1:.3}) at threshold {threshold:.2}",
        head.name
    ));
    MultiHeadFit {
        report: MultiReport {
            name: head.name.clone(),
            columns: head.columns.clone(),
            labels: head.labels.clone(),
            c: o.c_grid[best],
            threshold,
            cv_micro_f1: threshold_scores[best_index(&threshold_scores)],
            validation_micro_f1,
            validation_tfidf_baseline_micro_f1: baseline_f1,
            validation_examples: val.len(),
        },
        fit,
    }
}
