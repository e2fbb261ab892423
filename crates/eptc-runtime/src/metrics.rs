//! Evaluation metrics as MedFMC reports them (percentages):
//!
//! - **mAP** as mmcls computes it: per class, sort by score (descending, stable), average
//!   the precision at each positive; a class without positives scores 0; the mean over
//!   classes.
//! - **AUC**: per class, the ROC AUC of scikit-learn's `roc_auc_score` (tied scores get
//!   average ranks); a class whose labels are all 0 or all 1 has no AUC and is left out
//!   of the mean and reported (MedFMC's code reused the previous class's value there).
//! - **Accuracy**: top-1, for multi-class tasks.
//!
//! Scores are `[n, classes]` row-major; labels are multi-hot rows (`onehot`).

use serde::Serialize;

/// mmcls's average precision of one class: `scores` and 0/1 `labels` of every image.
pub fn average_precision(scores: &[f32], labels: &[bool]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Descending, stable: tied scores keep image order (numpy's `argsort(-pred,
    // kind="stable")`; mmcls's default sort may order ties differently).
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut tp, mut sum) = (0usize, 0.0f64);
    for (rank, &i) in order.iter().enumerate() {
        if labels[i] {
            tp += 1;
            sum += tp as f64 / (rank + 1) as f64;
        }
    }
    if tp == 0 {
        0.0
    } else {
        sum / tp as f64
    }
}

/// ROC AUC of one class (the Mann–Whitney statistic with average ranks for ties, which
/// equals scikit-learn's trapezoidal AUC); `None` when the labels are all equal.
pub fn roc_auc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let n = scores.len();
    let pos = labels.iter().filter(|&&l| l).count();
    let neg = n - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average 1-based ranks over runs of equal scores.
    let mut rank_sum_pos = 0.0f64;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_pos += avg * order[i..=j].iter().filter(|&&k| labels[k]).count() as f64;
        i = j + 1;
    }
    let (p, q) = (pos as f64, neg as f64);
    Some((rank_sum_pos - p * (p + 1.0) / 2.0) / (p * q))
}

/// Metrics of a set of predictions.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Metrics {
    /// Mean average precision over classes, percent.
    pub map: f64,
    /// Mean ROC AUC over the classes that have one, percent (`None` if no class has one).
    pub auc: Option<f64>,
    /// ROC AUC per class, percent; `None` for classes with a single label value.
    pub auc_per_class: Vec<Option<f64>>,
    /// Classes left out of the AUC (all labels 0 or all 1).
    pub auc_skipped: Vec<usize>,
    /// Top-1 accuracy, percent (multi-class tasks).
    pub accuracy: Option<f64>,
}

/// Compute the metrics of `scores` `[n, classes]` against multi-hot `onehot` rows;
/// `class_ids` (one per image) adds the top-1 accuracy. Panics if the lengths disagree
/// (a caller bug: the runtime builds both from the same data set).
pub fn evaluate(
    scores: &[f32],
    onehot: &[bool],
    classes: usize,
    class_ids: Option<&[usize]>,
) -> Metrics {
    assert!(
        classes > 0 && scores.len().is_multiple_of(classes),
        "scores are [n, classes]"
    );
    assert_eq!(
        scores.len(),
        onehot.len(),
        "scores and labels differ in size"
    );
    let n = scores.len() / classes;
    let column = |v: &[f32], c: usize| -> Vec<f32> { (0..n).map(|i| v[i * classes + c]).collect() };
    let label_col = |c: usize| -> Vec<bool> { (0..n).map(|i| onehot[i * classes + c]).collect() };
    let mut aps = Vec::with_capacity(classes);
    let mut aucs = Vec::with_capacity(classes);
    for c in 0..classes {
        let (s, l) = (column(scores, c), label_col(c));
        aps.push(average_precision(&s, &l));
        aucs.push(roc_auc(&s, &l).map(|a| 100.0 * a));
    }
    let valid: Vec<f64> = aucs.iter().flatten().copied().collect();
    let accuracy = class_ids.map(|ids| {
        assert_eq!(ids.len(), n, "one class id per image");
        let hits = ids
            .iter()
            .enumerate()
            .filter(|&(i, &y)| {
                let row = &scores[i * classes..(i + 1) * classes];
                // The first maximum, like numpy's argmax.
                let best = (0..classes).fold(0, |b, j| if row[j] > row[b] { j } else { b });
                best == y
            })
            .count();
        100.0 * hits as f64 / n.max(1) as f64
    });
    Metrics {
        map: 100.0 * aps.iter().sum::<f64>() / classes as f64,
        auc: (!valid.is_empty()).then(|| valid.iter().sum::<f64>() / valid.len() as f64),
        auc_skipped: aucs
            .iter()
            .enumerate()
            .filter(|(_, a)| a.is_none())
            .map(|(c, _)| c)
            .collect(),
        auc_per_class: aucs,
        accuracy,
    }
}
