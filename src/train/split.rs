//! Stratified hold-out split and stratified k folds, reproducible from a seed.

use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Indices of each class, shuffled with `seed`.
fn shuffled_by_class(labels: &[usize], seed: u64) -> Vec<Vec<usize>> {
    let classes = labels.iter().copied().max().map_or(0, |m| m + 1);
    let mut by_class = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l].push(i);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for members in &mut by_class {
        members.shuffle(&mut rng);
    }
    by_class
}

/// (train, validation) indices: each class contributes round(fraction x its size) to
/// validation (at least one when it has two or more), so both parts keep the class mix.
pub fn stratified_split(labels: &[usize], fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let (mut train, mut validation) = (Vec::new(), Vec::new());
    for members in shuffled_by_class(labels, seed) {
        let mut held = (members.len() as f64 * fraction).round() as usize;
        if held == 0 && members.len() >= 2 && fraction > 0.0 {
            held = 1;
        }
        validation.extend_from_slice(&members[..held]);
        train.extend_from_slice(&members[held..]);
    }
    train.sort_unstable();
    validation.sort_unstable();
    (train, validation)
}

/// A validation split made of one of `of` stratified folds (1-based `number`): running the
/// fold numbers 1..=of in turn holds out every row exactly once, so their validation figures
/// pooled are out-of-fold figures for recipes too costly to refit per fold inside one run
/// (fine-tuning the encoder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidationFold {
    pub number: usize,
    pub of: usize,
}

impl std::str::FromStr for ValidationFold {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("validation fold `{s}`: write NUMBER/FOLDS, e.g. 2/3 (folds 2 to 10, number 1 to FOLDS)");
        let (number, of) = s.split_once('/').ok_or_else(bad)?;
        let (number, of) = (number.trim().parse::<usize>().map_err(|_| bad())?, of.trim().parse::<usize>().map_err(|_| bad())?);
        if !(2..=10).contains(&of) || !(1..=of).contains(&number) {
            return Err(bad());
        }
        Ok(ValidationFold { number, of })
    }
}

impl std::fmt::Display for ValidationFold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.number, self.of)
    }
}

/// What fixes a model's validation split: the seed, and a stratified fraction or one fold of
/// several. Recorded in `[training]` so that eval and the cascade re-derive the same rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Holdout {
    pub fraction: f64,
    pub fold: Option<ValidationFold>,
    pub seed: u64,
}

impl Holdout {
    /// The split a model's `[training]` record says it held out.
    pub fn of_record(record: &crate::model::TrainingRecord) -> Result<Holdout, super::TrainError> {
        let fold = record
            .validation_fold
            .as_deref()
            .map(|f| f.parse().map_err(|e| super::TrainError::Invalid(format!("the model's [training] record: {e}"))))
            .transpose()?;
        Ok(Holdout { fraction: record.validation_fraction, fold, seed: record.seed })
    }

    /// (train, validation) indices into `labels`, stratified on them.
    pub fn rows(&self, labels: &[usize]) -> (Vec<usize>, Vec<usize>) {
        match self.fold {
            Some(f) => stratified_folds(labels, f.of, self.seed).swap_remove(f.number - 1),
            None => stratified_split(labels, self.fraction, self.seed),
        }
    }
}

/// For reports: "seed 42, 20%" or "seed 42, fold 2 of 3".
impl std::fmt::Display for Holdout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.fold {
            Some(fold) => write!(f, "seed {}, fold {} of {}", self.seed, fold.number, fold.of),
            None => write!(f, "seed {}, {:.0}%", self.seed, self.fraction * 100.0),
        }
    }
}

/// `k` folds as (fit, held-out) position lists into `labels`; each class is dealt round-robin.
pub fn stratified_folds(labels: &[usize], k: usize, seed: u64) -> Vec<(Vec<usize>, Vec<usize>)> {
    let mut fold_of = vec![0usize; labels.len()];
    let mut next = 0;
    for members in shuffled_by_class(labels, seed) {
        for i in members {
            fold_of[i] = next % k;
            next += 1;
        }
    }
    (0..k)
        .map(|f| {
            let held: Vec<usize> = (0..labels.len()).filter(|&i| fold_of[i] == f).collect();
            let fit: Vec<usize> = (0..labels.len()).filter(|&i| fold_of[i] != f).collect();
            (fit, held)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_folds_hold_out_every_row_once_and_parse_strictly() {
        let labels: Vec<usize> = (0..90).map(|i| i % 4).collect();
        let mut held = Vec::new();
        for number in 1..=3 {
            let fold: ValidationFold = format!("{number}/3").parse().unwrap();
            let (train, validation) = Holdout { fraction: 0.2, fold: Some(fold), seed: 7 }.rows(&labels);
            assert_eq!(train.len() + validation.len(), labels.len());
            assert!(train.iter().all(|r| !validation.contains(r)), "fold {fold}: train and validation overlap");
            assert_eq!(validation.len(), 30, "fold {fold}: a third held out");
            held.extend(validation);
        }
        held.sort_unstable();
        assert_eq!(held, (0..90).collect::<Vec<_>>(), "the three folds together hold out every row once");
        assert_eq!(Holdout { fraction: 0.2, fold: None, seed: 7 }.rows(&labels), stratified_split(&labels, 0.2, 7));
        for bad in ["0/3", "4/3", "1/1", "1/11", "2", "a/3", ""] {
            assert!(bad.parse::<ValidationFold>().is_err(), "{bad} accepted");
        }
        assert_eq!("2/3".parse::<ValidationFold>().unwrap().to_string(), "2/3");
        let fold = Some(ValidationFold { number: 2, of: 3 });
        assert_eq!(Holdout { fraction: 0.2, fold, seed: 42 }.to_string(), "seed 42, fold 2 of 3");
        assert_eq!(Holdout { fraction: 0.2, fold: None, seed: 42 }.to_string(), "seed 42, 20%");
    }

    #[test]
    fn split_is_stratified_disjoint_complete_and_reproducible() {
        let labels: Vec<usize> = (0..1000).map(|i| if i % 10 == 0 { 1 } else { 0 }).collect();
        let (train, validation) = stratified_split(&labels, 0.2, 42);
        assert_eq!(train.len() + validation.len(), 1000);
        assert_eq!(validation.len(), 200);
        assert_eq!(validation.iter().filter(|&&i| labels[i] == 1).count(), 20);
        assert!(validation.iter().all(|i| train.binary_search(i).is_err()));
        assert_eq!((train.clone(), validation.clone()), stratified_split(&labels, 0.2, 42));
        assert_ne!(validation, stratified_split(&labels, 0.2, 7).1);
    }

    #[test]
    fn small_classes_still_reach_validation() {
        let (_, validation) = stratified_split(&[0, 0, 0, 0, 0, 0, 0, 0, 1, 1], 0.1, 1);
        assert!(validation.iter().any(|&i| i >= 8));
    }

    #[test]
    fn folds_partition_the_rows_and_keep_every_class_in_each_fold() {
        let labels: Vec<usize> = (0..90).map(|i| i % 3).collect();
        let folds = stratified_folds(&labels, 3, 9);
        let mut seen: Vec<usize> = folds.iter().flat_map(|(_, held)| held.clone()).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..90).collect::<Vec<_>>());
        for (fit, held) in &folds {
            assert_eq!(fit.len() + held.len(), 90);
            for c in 0..3 {
                assert_eq!(held.iter().filter(|&&i| labels[i] == c).count(), 10);
            }
        }
    }
}
