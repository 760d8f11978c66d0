//! L2-regularised logistic regression (multinomial softmax, or independent sigmoids for
//! multi-label), fitted with L-BFGS over dense embeddings or sparse TF-IDF rows.
//!
//! The objective is scikit-learn's, scaled by 1/(C n) so tolerances do not depend on the data
//! size: mean loss + ||W||^2 / (2 C n); the bias is not penalised. Same C, same model, so
//! values known to work there (C around 10 for sentence embeddings) work here.

use ndarray::{Array2, ArrayView2, Axis};

/// Rows of features a linear layer reads.
pub trait Design: Sync {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    /// X W for W [cols, labels].
    fn forward(&self, w: ArrayView2<'_, f32>) -> Array2<f32>;
    /// X^T R for R [rows, labels].
    fn backward(&self, r: ArrayView2<'_, f32>) -> Array2<f32>;
    fn subset(&self, rows: &[usize]) -> Self
    where
        Self: Sized;
}

impl Design for Array2<f32> {
    fn rows(&self) -> usize {
        self.nrows()
    }
    fn cols(&self) -> usize {
        self.ncols()
    }
    fn forward(&self, w: ArrayView2<'_, f32>) -> Array2<f32> {
        self.dot(&w)
    }
    fn backward(&self, r: ArrayView2<'_, f32>) -> Array2<f32> {
        self.t().dot(&r)
    }
    fn subset(&self, rows: &[usize]) -> Self {
        self.select(Axis(0), rows)
    }
}

/// Compressed sparse rows.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseRows {
    pub cols: usize,
    pub indptr: Vec<usize>,
    pub indices: Vec<u32>,
    pub values: Vec<f32>,
}

impl SparseRows {
    pub fn from_rows(cols: usize, rows: impl IntoIterator<Item = Vec<(u32, f32)>>) -> Self {
        let mut out = SparseRows { cols, indptr: vec![0], indices: Vec::new(), values: Vec::new() };
        for row in rows {
            for (c, v) in row {
                out.indices.push(c);
                out.values.push(v);
            }
            out.indptr.push(out.indices.len());
        }
        out
    }

    fn row(&self, r: usize) -> impl Iterator<Item = (usize, f32)> + '_ {
        let span = self.indptr[r]..self.indptr[r + 1];
        self.indices[span.clone()].iter().zip(&self.values[span]).map(|(&c, &v)| (c as usize, v))
    }
}

impl Design for SparseRows {
    fn rows(&self) -> usize {
        self.indptr.len() - 1
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn forward(&self, w: ArrayView2<'_, f32>) -> Array2<f32> {
        let labels = w.ncols();
        let mut out = Array2::<f32>::zeros((self.rows(), labels));
        for (r, mut out_row) in out.outer_iter_mut().enumerate() {
            for (c, v) in self.row(r) {
                out_row.scaled_add(v, &w.row(c));
            }
        }
        out
    }
    fn backward(&self, residual: ArrayView2<'_, f32>) -> Array2<f32> {
        let mut out = Array2::<f32>::zeros((self.cols, residual.ncols()));
        for r in 0..self.rows() {
            let res = residual.row(r);
            for (c, v) in self.row(r) {
                out.row_mut(c).scaled_add(v, &res);
            }
        }
        out
    }
    fn subset(&self, rows: &[usize]) -> Self {
        SparseRows::from_rows(self.cols, rows.iter().map(|&r| self.row(r).map(|(c, v)| (c as u32, v)).collect::<Vec<_>>()))
    }
}

/// What the layer predicts.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// One class per row (softmax).
    Classes { y: &'a [usize], labels: usize },
    /// Any number of labels per row (sigmoid per label); `y` is [rows, labels] of 0/1.
    Multi { y: ArrayView2<'a, f32> },
}

impl Target<'_> {
    pub fn labels(&self) -> usize {
        match self {
            Target::Classes { labels, .. } => *labels,
            Target::Multi { y } => y.ncols(),
        }
    }
}

/// A fitted layer: W [cols, labels] (feature-major) and the bias.
#[derive(Debug, Clone, PartialEq)]
pub struct Fit {
    pub weight: Array2<f32>,
    pub bias: Vec<f32>,
    pub iterations: usize,
    pub converged: bool,
}

impl Fit {
    pub fn logits<X: Design>(&self, x: &X) -> Array2<f32> {
        let mut z = x.forward(self.weight.view());
        for mut row in z.outer_iter_mut() {
            row.iter_mut().zip(&self.bias).for_each(|(v, b)| *v += b);
        }
        z
    }

    /// Probabilities: softmax rows for classes, sigmoids for multi-label.
    pub fn probabilities<X: Design>(&self, x: &X, multi_label: bool) -> Array2<f32> {
        let mut z = self.logits(x);
        if multi_label {
            z.mapv_inplace(sigmoid);
        } else {
            z.outer_iter_mut().for_each(|mut row| softmax_in_place(row.as_slice_mut().unwrap_or(&mut [])));
        }
        z
    }

    /// Weights transposed to [labels, cols] (how a dense layer is stored).
    pub fn weight_label_major(&self) -> Vec<f32> {
        self.weight.t().iter().copied().collect()
    }
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    row.iter_mut().for_each(|v| *v /= sum);
}

#[derive(Debug, Clone, Copy)]
pub struct FitOptions {
    pub c: f64,
    pub max_iterations: usize,
    /// Stop when the largest gradient component is below this.
    pub tolerance: f64,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions { c: 10.0, max_iterations: 500, tolerance: 1e-5 }
    }
}

/// Fit a layer; `warm` (a fit with other C on the same features) speeds up a C sweep.
pub fn fit<X: Design>(x: &X, target: Target<'_>, options: FitOptions, warm: Option<&Fit>) -> Fit {
    let (n, d, l) = (x.rows(), x.cols(), target.labels());
    let penalty = 1.0 / (options.c * n.max(1) as f64);
    let start: Vec<f64> = match warm {
        Some(w) if w.weight.dim() == (d, l) => w.weight.iter().chain(&w.bias).map(|&v| f64::from(v)).collect(),
        _ => vec![0.0; d * l + l],
    };
    let objective = |params: &[f64], grad: &mut [f64]| -> f64 {
        let w = Array2::from_shape_fn((d, l), |(i, j)| params[i * l + j] as f32);
        let bias: Vec<f32> = params[d * l..].iter().map(|&v| v as f32).collect();
        let fit = Fit { weight: w, bias, iterations: 0, converged: false };
        let mut z = fit.logits(x);
        let mut loss = 0.0f64;
        match target {
            Target::Classes { y, .. } => {
                for (mut row, &label) in z.outer_iter_mut().zip(y) {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
                    loss += f64::from(sum.ln() + max - row[label]);
                    row.mapv_inplace(|v| (v - max).exp() / sum);
                    row[label] -= 1.0;
                }
            }
            Target::Multi { y } => {
                for (mut row, truth) in z.outer_iter_mut().zip(y.outer_iter()) {
                    for (v, &t) in row.iter_mut().zip(truth.iter()) {
                        // log(1 + e^v) - t v, computed stably.
                        let softplus = if *v > 0.0 { *v + (-*v).exp().ln_1p() } else { v.exp().ln_1p() };
                        loss += f64::from(softplus - t * *v);
                        *v = sigmoid(*v) - t;
                    }
                }
            }
        }
        let scale = 1.0 / n.max(1) as f32;
        let gw = x.backward(z.view());
        for (i, g) in gw.iter().enumerate() {
            grad[i] = f64::from(*g * scale) + penalty * params[i];
        }
        for (j, column) in z.axis_iter(Axis(1)).enumerate() {
            grad[d * l + j] = f64::from(column.sum() * scale);
        }
        let norm: f64 = params[..d * l].iter().map(|v| v * v).sum();
        loss / n.max(1) as f64 + 0.5 * penalty * norm
    };
    let (params, iterations, converged) = lbfgs(start, objective, options.max_iterations, options.tolerance);
    Fit {
        weight: Array2::from_shape_fn((d, l), |(i, j)| params[i * l + j] as f32),
        bias: params[d * l..].iter().map(|&v| v as f32).collect(),
        iterations,
        converged,
    }
}

/// Limited-memory BFGS with a backtracking (Armijo) line search. Returns (x, iterations,
/// whether the gradient tolerance was reached).
pub fn lbfgs(
    mut x: Vec<f64>,
    mut f: impl FnMut(&[f64], &mut [f64]) -> f64,
    max_iterations: usize,
    tolerance: f64,
) -> (Vec<f64>, usize, bool) {
    const MEMORY: usize = 7;
    let n = x.len();
    let mut g = vec![0.0; n];
    let mut fx = f(&x, &mut g);
    let mut history: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> = std::collections::VecDeque::new();
    let (mut x_new, mut g_new) = (vec![0.0; n], vec![0.0; n]);
    let inf_norm = |v: &[f64]| v.iter().fold(0.0f64, |m, a| m.max(a.abs()));
    for iteration in 0..max_iterations {
        if inf_norm(&g) < tolerance {
            return (x, iteration, true);
        }
        // Two-loop recursion: direction = -H g.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(history.len());
        for (s, y, rho) in history.iter().rev() {
            let a = rho * dot(s, &q);
            axpy(-a, y, &mut q);
            alphas.push(a);
        }
        let gamma = history.back().map_or_else(|| 1.0 / inf_norm(&g).max(1e-12), |(s, y, _)| dot(s, y) / dot(y, y));
        q.iter_mut().for_each(|v| *v *= gamma);
        for ((s, y, rho), a) in history.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(y, &q);
            axpy(a - b, s, &mut q);
        }
        let mut slope = -dot(&g, &q);
        if slope >= 0.0 {
            // Not a descent direction (numerical trouble): restart from steepest descent.
            history.clear();
            q = g.iter().map(|v| v / inf_norm(&g).max(1e-12)).collect();
            slope = -dot(&g, &q);
        }
        let mut step = 1.0;
        let mut accepted = false;
        for _ in 0..40 {
            for i in 0..n {
                x_new[i] = x[i] - step * q[i];
            }
            let f_new = f(&x_new, &mut g_new);
            if f_new.is_finite() && f_new <= fx + 1e-4 * step * slope {
                let s: Vec<f64> = x_new.iter().zip(&x).map(|(a, b)| a - b).collect();
                let y: Vec<f64> = g_new.iter().zip(&g).map(|(a, b)| a - b).collect();
                let sy = dot(&s, &y);
                if sy > 1e-12 {
                    if history.len() == MEMORY {
                        history.pop_front();
                    }
                    history.push_back((s, y, 1.0 / sy));
                }
                let improvement = fx - f_new;
                std::mem::swap(&mut x, &mut x_new);
                std::mem::swap(&mut g, &mut g_new);
                fx = f_new;
                accepted = true;
                if improvement.abs() <= 1e-12 * fx.abs().max(1.0) {
                    return (x, iteration + 1, inf_norm(&g) < tolerance);
                }
                break;
            }
            step *= 0.5;
        }
        if !accepted {
            return (x, iteration, false);
        }
    }
    let converged = inf_norm(&g) < tolerance;
    (x, max_iterations, converged)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(a: f64, x: &[f64], y: &mut [f64]) {
    y.iter_mut().zip(x).for_each(|(yi, xi)| *yi += a * xi);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn lbfgs_finds_the_minimum_of_a_quadratic() {
        let (x, _, converged) = lbfgs(
            vec![5.0, -3.0],
            |x, g| {
                g[0] = 2.0 * (x[0] - 1.0);
                g[1] = 20.0 * (x[1] + 2.0);
                (x[0] - 1.0).powi(2) + 10.0 * (x[1] + 2.0).powi(2)
            },
            200,
            1e-6,
        );
        assert!(converged);
        assert!((x[0] - 1.0).abs() < 1e-5 && (x[1] + 2.0).abs() < 1e-5, "{x:?}");
    }

    /// Three Gaussian blobs: softmax regression must separate them, and the gradient at the
    /// optimum must vanish (checked against a finite difference of the objective's minimum).
    fn blobs(n: usize, seed: u64) -> (Array2<f32>, Vec<usize>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let centres = [[2.0f32, 0.0], [-2.0, 0.0], [0.0, 2.5]];
        let mut x = Array2::<f32>::zeros((n, 2));
        let mut y = Vec::with_capacity(n);
        for i in 0..n {
            let c = i % 3;
            x[[i, 0]] = centres[c][0] + rng.random_range(-1.0..1.0);
            x[[i, 1]] = centres[c][1] + rng.random_range(-1.0..1.0);
            y.push(c);
        }
        (x, y)
    }

    #[test]
    fn softmax_regression_separates_blobs_and_generalises() {
        let (x, y) = blobs(300, 1);
        let fit = fit(&x, Target::Classes { y: &y, labels: 3 }, FitOptions::default(), None);
        assert!(fit.converged, "{} iterations", fit.iterations);
        let (xt, yt) = blobs(300, 2);
        let p = fit.probabilities(&xt, false);
        let correct = p.outer_iter().zip(&yt).filter(|(row, &t)| argmax(row.as_slice().unwrap()) == t).count();
        assert!(correct as f64 / 300.0 > 0.95, "{correct}/300");
        assert!(p.outer_iter().all(|r| (r.sum() - 1.0).abs() < 1e-4));
    }

    #[test]
    fn stronger_regularisation_shrinks_the_weights() {
        let (x, y) = blobs(150, 3);
        let loose = fit(&x, Target::Classes { y: &y, labels: 3 }, FitOptions { c: 100.0, ..FitOptions::default() }, None);
        let tight = fit(&x, Target::Classes { y: &y, labels: 3 }, FitOptions { c: 0.01, ..FitOptions::default() }, Some(&loose));
        let norm = |f: &Fit| f.weight.iter().map(|v| v * v).sum::<f32>();
        assert!(norm(&tight) < norm(&loose) / 10.0);
    }

    #[test]
    fn sparse_and_dense_designs_fit_the_same_model() {
        let (x, y) = blobs(120, 4);
        let sparse = SparseRows::from_rows(2, x.outer_iter().map(|r| vec![(0, r[0]), (1, r[1])]));
        let options = FitOptions { c: 1.0, tolerance: 1e-7, ..FitOptions::default() };
        let a = fit(&x, Target::Classes { y: &y, labels: 3 }, options, None);
        let b = fit(&sparse, Target::Classes { y: &y, labels: 3 }, options, None);
        assert!(a.weight.iter().zip(b.weight.iter()).all(|(p, q)| (p - q).abs() < 1e-3), "{:?} vs {:?}", a.weight, b.weight);
        let (via_sparse, via_dense) = (sparse.subset(&[2, 0]).forward(a.weight.view()), x.select(Axis(0), &[2, 0]).dot(&a.weight));
        assert!(via_sparse.iter().zip(via_dense.iter()).all(|(p, q)| (p - q).abs() < 1e-5));
    }

    #[test]
    fn multi_label_sigmoids_learn_independent_labels() {
        let (x, y) = blobs(300, 5);
        // label 0: "right half"; label 1: "class 2".
        let truth = Array2::from_shape_fn((300, 2), |(i, j)| if j == 0 { f32::from(x[[i, 0]] > 0.0) } else { f32::from(y[i] == 2) });
        let fit = fit(&x, Target::Multi { y: truth.view() }, FitOptions::default(), None);
        let p = fit.probabilities(&x, true);
        let agree = p.iter().zip(truth.iter()).filter(|(p, t)| (**p > 0.5) == (**t > 0.5)).count();
        assert!(agree as f64 / 600.0 > 0.93, "{agree}/600");
    }

    fn argmax(row: &[f32]) -> usize {
        row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
    }
}
