//! Fitting one head: regularisation chosen by stratified cross-validation on the training
//! part, the lexical layer's share chosen on the same out-of-fold predictions (never on the
//! validation split, which only measures), then one final fit on the whole training part.

use ndarray::{Array2, Axis};
use serde::Serialize;

use super::logreg::{self, Design, Fit, FitOptions, SparseRows, Target};
use super::metrics::{self, Report};
use super::{split, MultiLabels, SingleLabels, TrainOptions};
use crate::model::linear::LexicalFeatures;

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

/// One lexical feature family's TF-IDF rows for every example (vocabulary from the training
/// part only).
pub(super) struct LexicalCandidate {
    pub features: LexicalFeatures,
    pub rows: SparseRows,
}

pub(super) struct Context<'a> {
    pub embeddings: &'a Array2<f32>,
    /// Families cross-validation chooses among (the first, word pieces, is also the baseline).
    pub lexical: &'a [LexicalCandidate],
    pub train_rows: &'a [usize],
    pub validation_rows: &'a [usize],
    pub options: &'a TrainOptions,
    pub progress: &'a dyn super::Progress,
}

/// What cross-validation chose for a single-label head: enough to fit it again on other rows
/// (the refit on every row, and `triage eval` re-deriving a held-out figure).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HeadSettings {
    pub c: f64,
    pub lexical_c: f64,
    /// Share of the lexical layer in the averaged probabilities (0: embedding layer alone).
    pub lexical_share: f32,
    pub lexical_features: LexicalFeatures,
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
    pub lexical_features: LexicalFeatures,
    /// Cross-validated accuracy (training part) of the embedding layer, of the word-piece and
    /// the chosen lexical layer alone, and of the average as written.
    pub cv_accuracy_embedding: f64,
    pub cv_accuracy_lexical: Vec<(LexicalFeatures, f64)>,
    pub cv_accuracy_combined: f64,
    /// On the validation split, fitted on the training part: the average as chosen, the
    /// embedding layer alone, the chosen lexical layer alone, and the TF-IDF + logistic
    /// regression baseline (word pieces).
    pub validation: Report,
    pub validation_embedding_only: Report,
    pub validation_lexical_only: Report,
    pub validation_tfidf_baseline: Report,
    /// The shipped head refitted on every usable row: its recipe's out-of-fold figures.
    pub refit: Option<RefitReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RefitReport {
    pub examples: usize,
    pub folds: usize,
    /// Out-of-fold over every usable row (each row predicted by heads that never saw it).
    pub accuracy: f64,
    pub macro_f1: f64,
    /// Standard deviation of the accuracy across folds.
    pub fold_accuracy_std: f64,
    /// The same recipe without the lexical layer, on the same folds.
    pub accuracy_embedding_only: f64,
}

pub struct SingleHeadFit {
    pub report: SingleReport,
    pub settings: HeadSettings,
    pub dense: Fit,
    pub lexical: Option<Fit>,
    /// Where the escalation threshold is calibrated: the validation split, or the
    /// out-of-fold predictions over every row when the head was refitted.
    pub calibration_confidence: Vec<f32>,
    pub calibration_correct: Vec<bool>,
}

impl SingleHeadFit {
    /// Averaged probabilities, exactly as the worker computes them.
    pub fn probabilities(&self, embeddings: &Array2<f32>, lexical: &SparseRows) -> Array2<f32> {
        layer_probabilities(&self.dense, self.lexical.as_ref(), self.settings.lexical_share, embeddings, lexical)
    }

    /// Top confidence per row.
    pub fn confidence_on(&self, embeddings: &Array2<f32>, lexical: &SparseRows) -> Vec<f32> {
        top_confidence(&self.probabilities(embeddings, lexical))
    }
}

pub fn top_confidence(p: &Array2<f32>) -> Vec<f32> {
    p.outer_iter().map(|r| r.iter().copied().fold(0.0, f32::max)).collect()
}

pub fn mix(dense: &Array2<f32>, lexical: &Array2<f32>, share: f32) -> Array2<f32> {
    if share <= 0.0 {
        return dense.clone();
    }
    dense * (1.0 - share) + lexical * share
}

pub fn argmax(row: ndarray::ArrayView1<'_, f32>) -> usize {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
}

pub fn predicted(p: &Array2<f32>) -> Vec<usize> {
    p.outer_iter().map(|r| argmax(r.view())).collect()
}

fn accuracy(p: &Array2<f32>, y: &[usize]) -> f64 {
    p.outer_iter().zip(y).filter(|(r, &t)| argmax(r.view()) == t).count() as f64 / y.len().max(1) as f64
}

/// Fit a single-label head's layers with given settings (no lexical layer at share 0).
pub fn fit_layers(
    dense_x: &Array2<f32>,
    lexical_x: &SparseRows,
    y: &[usize],
    labels: usize,
    settings: &HeadSettings,
) -> (Fit, Option<Fit>) {
    let target = Target::Classes { y, labels };
    let dense = logreg::fit(dense_x, target, FitOptions { c: settings.c, ..FitOptions::default() }, None);
    let lexical = (settings.lexical_share > 0.0)
        .then(|| logreg::fit(lexical_x, target, FitOptions { c: settings.lexical_c, ..FitOptions::default() }, None));
    (dense, lexical)
}

/// Averaged probabilities of fitted layers.
pub fn layer_probabilities(dense: &Fit, lexical: Option<&Fit>, share: f32, dense_x: &Array2<f32>, lexical_x: &SparseRows) -> Array2<f32> {
    let p_dense = dense.probabilities(dense_x, false);
    match lexical {
        Some(l) if share > 0.0 => mix(&p_dense, &l.probabilities(lexical_x, false), share),
        _ => p_dense,
    }
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
    let dense_x = ctx.embeddings.select(Axis(0), &rows);
    let folds = split::stratified_folds(&y, o.folds, o.seed);
    let fits = o.folds * (o.c_grid.len() + o.lexical_c_grid.len() * ctx.lexical.len()) + 3;
    ctx.progress.stage(&format!("fitting head `{}` ({labels} labels, {}-fold CV)", head.name, o.folds), fits as u64);

    let dense_oof = cross_validate(&dense_x, CvTarget::Classes(&y, labels), &o.c_grid, &folds, ctx.progress);
    let dense_scores: Vec<f64> = dense_oof.iter().map(|p| accuracy(p, &y)).collect();
    let best_dense = best_index(&dense_scores);

    let shares: &[f32] = match o.lexical {
        LexicalMode::Off => &[0.0],
        LexicalMode::On => &[0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0],
        LexicalMode::Auto => &[0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0],
    };
    // Per family: its best C alone, then the share that mixes best with the embedding layer.
    struct Scored {
        c_index: usize,
        alone: f64,
        share: f32,
        combined: f64,
    }
    let mut scored = Vec::new();
    for candidate in ctx.lexical {
        let lexical_x = candidate.rows.subset(&rows);
        let oof = cross_validate(&lexical_x, CvTarget::Classes(&y, labels), &o.lexical_c_grid, &folds, ctx.progress);
        let scores: Vec<f64> = oof.iter().map(|p| accuracy(p, &y)).collect();
        let c_index = best_index(&scores);
        let share_scores: Vec<f64> = shares.iter().map(|&s| accuracy(&mix(&dense_oof[best_dense], &oof[c_index], s), &y)).collect();
        let best_share = best_index(&share_scores);
        scored.push(Scored { c_index, alone: scores[c_index], share: shares[best_share], combined: share_scores[best_share] });
    }
    // The cheaper family (listed first) unless a richer one is strictly better.
    let chosen = best_index(&scored.iter().map(|s| s.combined).collect::<Vec<_>>());
    let settings = HeadSettings {
        c: o.c_grid[best_dense],
        lexical_c: o.lexical_c_grid[scored[chosen].c_index],
        lexical_share: scored[chosen].share,
        lexical_features: ctx.lexical[chosen].features,
    };

    let lexical_rows = &ctx.lexical[chosen].rows;
    let target = Target::Classes { y: &y, labels };
    let dense = logreg::fit(&dense_x, target, FitOptions { c: settings.c, ..FitOptions::default() }, None);
    // Fitted even at share 0, for the lexical-only row of the card.
    let lexical = logreg::fit(&lexical_rows.subset(&rows), target, FitOptions { c: settings.lexical_c, ..FitOptions::default() }, None);
    ctx.progress.advance(2);
    let baseline_c = o.lexical_c_grid[scored[0].c_index];
    let baseline = if chosen == 0 && settings.lexical_c == baseline_c {
        lexical.clone()
    } else {
        logreg::fit(&ctx.lexical[0].rows.subset(&rows), target, FitOptions { c: baseline_c, ..FitOptions::default() }, None)
    };
    ctx.progress.advance(1);
    ctx.progress.finish_stage();

    let dense_val = ctx.embeddings.select(Axis(0), &val);
    let p_dense = dense.probabilities(&dense_val, false);
    let p_lexical = lexical.probabilities(&lexical_rows.subset(&val), false);
    let p_baseline = baseline.probabilities(&ctx.lexical[0].rows.subset(&val), false);
    let p = mix(&p_dense, &p_lexical, settings.lexical_share);
    let chosen_labels = predicted(&p);
    let calibration_correct: Vec<bool> = chosen_labels.iter().zip(&y_val).map(|(a, b)| a == b).collect();
    let report = SingleReport {
        name: head.name.clone(),
        column: head.column.clone(),
        labels: head.labels.clone(),
        c: settings.c,
        lexical_c: settings.lexical_c,
        lexical_share: settings.lexical_share,
        lexical_features: settings.lexical_features,
        cv_accuracy_embedding: dense_scores[best_dense],
        cv_accuracy_lexical: ctx.lexical.iter().zip(&scored).map(|(c, s)| (c.features, s.alone)).collect(),
        cv_accuracy_combined: scored[chosen].combined,
        validation: metrics::report(&y_val, &chosen_labels, &head.labels, 10),
        validation_embedding_only: metrics::report(&y_val, &predicted(&p_dense), &head.labels, 10),
        validation_lexical_only: metrics::report(&y_val, &predicted(&p_lexical), &head.labels, 10),
        validation_tfidf_baseline: metrics::report(&y_val, &predicted(&p_baseline), &head.labels, 10),
        refit: None,
    };
    ctx.progress.note(&format!(
        "head `{}`: validation accuracy {:.3} (embedding alone {:.3}, lexical alone {:.3}, TF-IDF baseline {:.3}), macro-F1 {:.3}; C {}, lexical {:?} C {} share {}",
        head.name,
        report.validation.accuracy,
        report.validation_embedding_only.accuracy,
        report.validation_lexical_only.accuracy,
        report.validation_tfidf_baseline.accuracy,
        report.validation.macro_f1,
        settings.c,
        settings.lexical_features,
        settings.lexical_c,
        settings.lexical_share
    ));
    let lexical = (settings.lexical_share > 0.0).then_some(lexical);
    SingleHeadFit { report, settings, dense, lexical, calibration_confidence: top_confidence(&p), calibration_correct }
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
    let baseline = logreg::fit(
        &ctx.lexical[0].rows.subset(rows),
        Target::Multi { y: y.view() },
        FitOptions { c: lexical_c, ..FitOptions::default() },
        None,
    );
    ctx.progress.advance(1);
    ctx.progress.finish_stage();
    let val = ctx.validation_rows;
    let val_truth = as_bools(&multi_hot(&head.y, val, labels));
    let validation_micro_f1 =
        metrics::micro_f1(&val_truth, &decide(&fit.probabilities(&ctx.embeddings.select(Axis(0), val), true), threshold));
    let baseline_f1 = metrics::micro_f1(&val_truth, &decide(&baseline.probabilities(&ctx.lexical[0].rows.subset(val), true), threshold));
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
