#!/usr/bin/env python3
"""Reference values for eptc's metrics (tests/fixtures/metrics.json), computed
independently of eptc: mAP with mmcls's `average_precision` formula (reimplemented here
in numpy, as MedFMC uses it), ROC AUC with scikit-learn's `roc_auc_score`, accuracy
with scikit-learn's `accuracy_score`.

    python scripts/make_metric_fixtures.py --out tests/fixtures/metrics.json

Requirements: numpy, scikit-learn. Deterministic (fixed seed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, roc_auc_score


def mmcls_average_precision(pred: np.ndarray, target: np.ndarray) -> float:
    """mmcls.core.evaluation.mean_ap.average_precision (targets 1 / 0, no difficult)."""
    eps = np.finfo(np.float32).eps
    sort_inds = np.argsort(-pred, kind="stable")
    sort_target = target[sort_inds]
    pos_inds = sort_target == 1
    tp = np.cumsum(pos_inds)
    total_pos = tp[-1]
    pn = np.cumsum(sort_target != -1)
    tp[np.logical_not(pos_inds)] = 0
    precision = tp / np.maximum(pn, eps)
    return float(np.sum(precision) / np.maximum(total_pos, eps))


def per_class_auc(scores: np.ndarray, onehot: np.ndarray):
    """sklearn ROC AUC per class; None where a class has a single label value."""
    out = []
    for c in range(scores.shape[1]):
        y = onehot[:, c]
        out.append(None if y.min() == y.max() else float(roc_auc_score(y, scores[:, c])))
    return out


def case(name: str, scores: np.ndarray, onehot: np.ndarray, labels=None) -> dict:
    aucs = per_class_auc(scores, onehot)
    valid = [a for a in aucs if a is not None]
    d = {
        "name": name,
        "scores": scores.tolist(),
        "onehot": onehot.astype(int).tolist(),
        "map": 100.0 * float(np.mean([mmcls_average_precision(scores[:, c], onehot[:, c])
                                      for c in range(scores.shape[1])])),
        "auc_per_class": aucs,
        "auc_mean": 100.0 * float(np.mean(valid)),
        "auc_skipped": [c for c, a in enumerate(aucs) if a is None],
    }
    if labels is not None:
        d["labels"] = labels.tolist()
        d["accuracy"] = 100.0 * float(accuracy_score(labels, scores.argmax(1)))
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    cases = []

    # Multi-label: 40 images, 5 classes; class 3 never positive, class 4 always positive
    # (both left out of the AUC). Scores are distinct (no ties).
    n, c = 40, 5
    scores = rng.permutation(n * c).reshape(n, c) / (n * c) + rng.uniform(0, 1e-4, (n, c))
    onehot = (rng.uniform(size=(n, c)) < 0.35).astype(int)
    onehot[:, 3] = 0
    onehot[:, 4] = 1
    cases.append(case("multilabel", scores.astype(np.float32).astype(np.float64), onehot))

    # Multi-class: 30 images, 4 classes, softmax scores; class 2 never the label.
    n, c = 30, 4
    logits = rng.normal(size=(n, c))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.choice([0, 1, 3], size=n)
    probs = probs.astype(np.float32).astype(np.float64)
    cases.append(case("multiclass", probs, np.eye(c, dtype=int)[labels], labels))

    # AUC with ties: scores rounded to one decimal (sklearn averages tied ranks).
    n, c = 50, 3
    scores = np.round(rng.uniform(size=(n, c)), 1)
    onehot = (rng.uniform(size=(n, c)) < 0.5).astype(int)
    d = case("ties", scores, onehot)
    del d["map"]  # mmcls's AP depends on the sort order of ties
    cases.append(d)

    args.out.write_text(json.dumps({"cases": cases}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
