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
