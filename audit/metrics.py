"""Utility metrics of a classifier, computed with scikit-learn.

The report is JSON-ready: plain Python floats, ints and lists, labels converted from
numpy scalars, so a caller can write it straight into a run's summary.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

from shared.errors import BadInput

# Probabilities come from a softmax in float32, so rows can miss 1 by ~1e-6; anything
# further off means the caller passed logits or unnormalised scores.
PROBA_ROW_SUM_TOLERANCE = 1e-3


def _native(value: Any) -> Any:
    """A numpy scalar as the matching Python scalar, so labels survive ``json.dumps``."""
    return value.item() if isinstance(value, np.generic) else value


def _as_1d(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise BadInput(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        raise BadInput(f"{name} is empty")
    return array


def _check_proba(y_proba: Any, n_samples: int, n_classes: int | None) -> np.ndarray:
    """Validate probabilities and return them as an ``(n_samples, n_classes)`` float array.

    A 1-D array is read as the positive-class probability of a binary problem, as
    scikit-learn's binary metrics do.
    """
    proba = np.asarray(y_proba, dtype=float)
    if proba.ndim == 1:
        proba = np.column_stack([1.0 - proba, proba])
    if proba.ndim != 2:
        raise BadInput(f"y_proba must be 1-D (binary) or 2-D (n_samples, n_classes), got shape {proba.shape}")
    if proba.shape[0] != n_samples:
        raise BadInput(f"y_proba has {proba.shape[0]} rows but y_true has {n_samples} samples")
    if n_classes is not None and proba.shape[1] != n_classes:
        raise BadInput(f"y_proba has {proba.shape[1]} columns but there are {n_classes} classes")
    if proba.shape[1] < 2:
        raise BadInput(f"y_proba needs at least 2 columns, got {proba.shape[1]}")
    if not np.all(np.isfinite(proba)):
        raise BadInput("y_proba contains NaN or infinite values")
    if proba.min() < 0.0 or proba.max() > 1.0:
        raise BadInput("y_proba values must lie in [0, 1]; pass probabilities, not logits")
    row_sums = proba.sum(axis=1)
    worst = int(np.argmax(np.abs(row_sums - 1.0)))
    if abs(row_sums[worst] - 1.0) > PROBA_ROW_SUM_TOLERANCE:
        raise BadInput(f"y_proba rows must sum to 1; row {worst} sums to {row_sums[worst]:.6g}")
    return proba


def _resolve_labels(
    labels: Any, y_true: np.ndarray, y_pred: np.ndarray | None, n_columns: int | None
) -> np.ndarray:
    """The class labels, in the order of the probability columns.

    Without ``labels``, probability columns are taken to be classes ``0..k-1`` (the
    order ``predict_proba`` of an integer-labelled model uses); without probabilities,
    the sorted union of the observed labels, as scikit-learn does.
    """
    observed = y_true if y_pred is None else np.concatenate([y_true, y_pred])
    if labels is None:
        if n_columns is None:
            return np.unique(observed)
        resolved = np.arange(n_columns)
        hint = "; pass labels= to name the y_proba columns"
    else:
        resolved = np.asarray(labels)
        if resolved.ndim != 1 or resolved.size == 0:
            raise BadInput("labels must be a non-empty 1-D sequence")
        if np.unique(resolved).size != resolved.size:
            raise BadInput("labels contains duplicates")
        hint = ""
    unknown = np.setdiff1d(np.unique(observed), resolved)
    if unknown.size:
        first = _native(unknown[0])
        raise BadInput(f"label {first!r} in y_true/y_pred is not among the {resolved.size} classes{hint}")
    return resolved


def expected_calibration_error(y_true: Any, y_proba: Any, n_bins: int = 15, labels: Any = None) -> float:
    """Top-label expected calibration error with equal-width confidence bins.

    ECE = sum over bins B of |B|/n * |accuracy(B) - mean confidence(B)|, where a
    sample's confidence is its largest class probability and it is correct when that
    class is its true label (Guo et al. 2017).

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels.
    y_proba : array-like of shape (n_samples, n_classes) or (n_samples,)
        Class probabilities; a 1-D array is the positive-class probability of a binary problem.
    n_bins : int, default=15
        Number of equal-width bins on [0, 1]. Bins are closed on the right: (i/n, (i+1)/n].
    labels : array-like of shape (n_classes,), optional
        Label of each probability column; defaults to ``0..n_classes-1``.

    Returns
    -------
    float
        ECE in [0, 1]; 0 means perfectly calibrated.
    """
    y_true = _as_1d(y_true, "y_true")
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise BadInput(f"n_bins must be a positive integer, got {n_bins!r}")
    proba = _check_proba(y_proba, y_true.size, None if labels is None else len(labels))
    classes = _resolve_labels(labels, y_true, None, proba.shape[1])

    confidence = proba.max(axis=1)
    correct = classes[proba.argmax(axis=1)] == y_true
    # Edges as i/n rather than linspace so a confidence written as 0.6 lands in the
    # bin a reader computing by hand expects: linspace gives 0.6000000000000001.
    edges = np.arange(n_bins + 1) / n_bins
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)

    ece = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def _roc_auc(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> tuple[float | None, str | None]:
    missing = np.setdiff1d(classes, y_true)
    if missing.size:
        return None, f"class {_native(missing[0])!r} is absent from y_true, so its ROC curve is undefined"
    if classes.size == 2:
        return float(skm.roc_auc_score(y_true == classes[1], proba[:, 1])), None
    return float(skm.roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=classes)), None


def utility_report(y_true: Any, y_pred: Any, y_proba: Any, labels: Any = None) -> dict[str, Any]:
    """Accuracy, per-class quality, ROC AUC, confusion matrix and calibration in one dict.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels.
    y_pred : array-like of shape (n_samples,)
        Predicted labels.
    y_proba : array-like of shape (n_samples, n_classes) or (n_samples,), or None
        Class probabilities, columns in the order of ``labels``. A 1-D array is the
        positive-class probability of a binary problem. With None, ``roc_auc`` and
        ``expected_calibration_error`` are None.
    labels : array-like of shape (n_classes,), optional
        All class labels. Defaults to ``0..n_classes-1`` when ``y_proba`` is given,
        else to the sorted labels seen in ``y_true`` and ``y_pred``.

    Returns
    -------
    dict
        ``labels``, ``n_samples``, ``accuracy``, ``balanced_accuracy``,
        ``precision_macro``, ``recall_macro``, ``f1_macro``,
        ``precision_per_class``, ``recall_per_class``, ``f1_per_class``,
        ``support_per_class`` (dicts keyed by label), ``roc_auc`` (binary: on the
        positive-class probability, the positive class being ``labels[1]``;
        multiclass: one-vs-rest macro average), ``roc_auc_reason`` (why ``roc_auc``
        is None, else None), ``confusion_matrix`` (list of lists, rows = true label,
        columns = predicted, both in ``labels`` order) and ``expected_calibration_error``.
        Precision of a class never predicted counts as 0. The macro averages run over
        the classes present in ``y_true`` or ``y_pred`` (scikit-learn's default set):
        a class that neither holds nor gets any record has no score to average.
    """
    y_true = _as_1d(y_true, "y_true")
    y_pred = _as_1d(y_pred, "y_pred")
    if y_true.size != y_pred.size:
        raise BadInput(f"y_true has {y_true.size} samples but y_pred has {y_pred.size}")
    n_classes = None if labels is None else len(labels)
    proba = None if y_proba is None else _check_proba(y_proba, y_true.size, n_classes)
    classes = _resolve_labels(labels, y_true, y_pred, None if proba is None else proba.shape[1])

    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=classes, average=None, zero_division=0
    )
    names = [_native(c) for c in classes]
    seen = np.isin(classes, np.union1d(y_true, y_pred))

    def per_class(values: np.ndarray) -> dict[Any, float]:
        return {name: float(v) for name, v in zip(names, values)}

    if proba is None:
        auc, auc_reason, ece = None, "no probabilities given", None
    else:
        auc, auc_reason = _roc_auc(y_true, proba, classes)
        ece = expected_calibration_error(y_true, proba, labels=classes)

    with warnings.catch_warnings():
        # scikit-learn averages recall over classes present in y_true only, which is
        # what "balanced" should mean: an absent class has no recall to average. It
        # warns when y_pred names such a class; the report already says so via roc_auc_reason.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = float(skm.balanced_accuracy_score(y_true, y_pred))

    return {
        "labels": names,
        "n_samples": int(y_true.size),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": balanced,
        "precision_macro": float(precision[seen].mean()),
        "recall_macro": float(recall[seen].mean()),
        "f1_macro": float(f1[seen].mean()),
        "precision_per_class": per_class(precision),
        "recall_per_class": per_class(recall),
        "f1_per_class": per_class(f1),
        "support_per_class": {name: int(s) for name, s in zip(names, support)},
        "roc_auc": auc,
        "roc_auc_reason": auc_reason,
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=classes).tolist(),
        "expected_calibration_error": ece,
    }


def most_confused_pairs(confusion: Any, k: int = 5, labels: Any = None) -> list[tuple[Any, Any, int]]:
    """The ``k`` largest off-diagonal cells of a confusion matrix.

    Parameters
    ----------
    confusion : array-like of shape (n_classes, n_classes)
        Counts, rows = true class, columns = predicted class (scikit-learn's layout).
    k : int, default=5
        How many pairs to return at most.
    labels : array-like of shape (n_classes,), optional
        Names for the rows/columns; defaults to their indices.

    Returns
    -------
    list of (true, predicted, count)
        Sorted by count, largest first; ties in order of (true, predicted). Cells
        with a zero count are not confusions and are left out.
    """
    matrix = np.asarray(confusion)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.size == 0:
        raise BadInput(f"confusion must be a non-empty square matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)) or matrix.min() < 0:
        raise BadInput("confusion must hold non-negative counts")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise BadInput(f"k must be a positive integer, got {k!r}")
    names = list(range(matrix.shape[0])) if labels is None else [_native(x) for x in labels]
    if len(names) != matrix.shape[0]:
        raise BadInput(f"labels has {len(names)} entries but confusion has {matrix.shape[0]} classes")

    cells = [
        (-matrix[i, j], i, j)
        for i in range(matrix.shape[0])
        for j in range(matrix.shape[1])
        if i != j and matrix[i, j] > 0
    ]
    cells.sort()
    return [(names[i], names[j], _native(-neg)) for neg, i, j in cells[:k]]


def _recall_by_class(recall: Any, name: str) -> dict[Any, float]:
    try:
        if isinstance(recall, Mapping):
            values = {_native(key): float(v) for key, v in recall.items()}
        else:
            values = {i: float(v) for i, v in enumerate(_as_1d(recall, name))}
    except (TypeError, ValueError):
        raise BadInput(f"{name} must hold numbers (recalls in [0, 1])") from None
    if not values:
        raise BadInput(f"{name} is empty")
    bad = [key for key, v in values.items() if not 0.0 <= v <= 1.0]
    if bad:
        raise BadInput(f"{name}[{bad[0]!r}] = {values[bad[0]]} is not a recall in [0, 1]")
    return values


def per_class_drop(private_recall: Any, baseline_recall: Any, k: int | None = None) -> list[tuple[Any, float]]:
    """Classes whose recall fell most when training with privacy.

    DP noise drowns the gradient signal of small or hard classes first, so the
    macro average hides who pays for privacy; this ranks the classes.

    Parameters
    ----------
    private_recall, baseline_recall : mapping of label -> recall, or array-like of shape (n_classes,)
        Per-class recall of the private and the non-private model; arrays are indexed
        by class position. Both must cover the same classes.
    k : int, optional
        Return only the ``k`` most hurt classes.

    Returns
    -------
    list of (label, drop)
        ``drop = baseline - private`` for every class, largest drop first (negative
        drops, where privacy helped, come last); ties in label order of the input.
    """
    private = _recall_by_class(private_recall, "private_recall")
    baseline = _recall_by_class(baseline_recall, "baseline_recall")
    if set(private) != set(baseline):
        missing = sorted(set(private) ^ set(baseline), key=str)
        raise BadInput(f"private and baseline recall cover different classes, e.g. {missing[0]!r}")
    if k is not None and (not isinstance(k, (int, np.integer)) or k < 1):
        raise BadInput(f"k must be a positive integer, got {k!r}")
    drops = [(label, baseline[label] - private[label]) for label in baseline]
    drops.sort(key=lambda item: -item[1])  # stable: ties keep input order
    return drops if k is None else drops[:k]


def client_accuracy_summary(accuracies: Mapping[Any, float] | Sequence[float]) -> dict[str, Any]:
    """How evenly a federated model serves its clients.

    Parameters
    ----------
    accuracies : mapping of client id -> accuracy, or array-like of shape (n_clients,)
        Accuracy of the global model on each client's local test data, in [0, 1].

    Returns
    -------
    dict
        ``n_clients``, ``mean``, ``worst`` (minimum), ``best`` (maximum), ``spread``
        (max - min), ``std`` (population standard deviation, ddof=0: the clients are
        the whole federation, not a sample of it) and ``worst_client`` (its id, or its
        position for an array).
    """
    if isinstance(accuracies, Mapping):
        ids = [_native(key) for key in accuracies]
        values = np.asarray(list(accuracies.values()), dtype=float)
        if values.size == 0:
            raise BadInput("accuracies is empty")
    else:
        values = _as_1d(accuracies, "accuracies").astype(float)
        ids = list(range(values.size))
    if not np.all(np.isfinite(values)) or values.min() < 0.0 or values.max() > 1.0:
        raise BadInput("accuracies must be finite values in [0, 1]")
    worst = int(np.argmin(values))
    return {
        "n_clients": int(values.size),
        "mean": float(values.mean()),
        "worst": float(values[worst]),
        "best": float(values.max()),
        "spread": float(values.max() - values.min()),
        "std": float(values.std()),
        "worst_client": ids[worst],
    }
