import json

import numpy as np
import pytest
from sklearn import metrics as skm

from audit.metrics import (
    client_accuracy_summary,
    expected_calibration_error,
    most_confused_pairs,
    per_class_drop,
    utility_report,
)
from shared.errors import BadInput


@pytest.fixture
def multiclass():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3))
    logits[np.arange(300), y_true] += 1.0  # better than chance, not perfect
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, proba.argmax(axis=1), proba


def test_utility_report_matches_sklearn_multiclass(multiclass):
    y_true, y_pred, proba = multiclass
    report = utility_report(y_true, y_pred, proba)

    assert report["labels"] == [0, 1, 2]
    assert report["n_samples"] == 300
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert report["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    assert report["precision_macro"] == pytest.approx(skm.precision_score(y_true, y_pred, average="macro"))
    assert report["recall_macro"] == pytest.approx(skm.recall_score(y_true, y_pred, average="macro"))
    assert report["f1_macro"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    per_class_f1 = skm.f1_score(y_true, y_pred, average=None)
    assert [report["f1_per_class"][c] for c in range(3)] == pytest.approx(per_class_f1)
    per_class_recall = skm.recall_score(y_true, y_pred, average=None)
    assert [report["recall_per_class"][c] for c in range(3)] == pytest.approx(per_class_recall)
    assert report["support_per_class"] == {c: int((y_true == c).sum()) for c in range(3)}
    assert report["roc_auc"] == pytest.approx(skm.roc_auc_score(y_true, proba, multi_class="ovr", average="macro"))
    assert report["roc_auc_reason"] is None
    assert report["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred).tolist()
    assert report["expected_calibration_error"] == pytest.approx(expected_calibration_error(y_true, proba))
    json.dumps(report)  # the report goes into run summaries as-is


def test_macro_averages_skip_a_class_absent_from_labels_and_predictions():
    # Three model classes, but the test split holds and predicts only two of them.
    y_true = np.array([0, 0, 1, 1])
    proba = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])
    report = utility_report(y_true, y_true, proba)
    assert report["labels"] == [0, 1, 2]
    assert report["recall_macro"] == report["f1_macro"] == report["precision_macro"] == 1.0
    assert report["balanced_accuracy"] == 1.0
    # A class that is predicted but never true still counts (as scikit-learn counts it).
    y_pred = np.array([0, 2, 1, 1])
    assert utility_report(y_true, y_pred, proba)["f1_macro"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))


def test_utility_report_binary_uses_positive_class_proba():
    y_true = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.2, 0.9, 0.6])
    y_pred = (p1 >= 0.5).astype(int)
    expected = skm.roc_auc_score(y_true, p1)

    two_columns = utility_report(y_true, y_pred, np.column_stack([1 - p1, p1]))
    one_column = utility_report(y_true, y_pred, p1)
    assert two_columns["roc_auc"] == pytest.approx(expected)
    assert one_column["roc_auc"] == pytest.approx(expected)
    assert two_columns["precision_macro"] == pytest.approx(skm.precision_score(y_true, y_pred, average="macro"))


def test_utility_report_string_labels_name_the_columns():
    y_true = np.array(["cat", "dog", "dog", "cat"])
    y_pred = np.array(["cat", "dog", "cat", "cat"])
    p_dog = np.array([0.2, 0.9, 0.4, 0.3])
    report = utility_report(y_true, y_pred, p_dog, labels=["cat", "dog"])
    assert report["labels"] == ["cat", "dog"]
    assert report["roc_auc"] == pytest.approx(skm.roc_auc_score(y_true == "dog", p_dog))
    assert report["recall_per_class"] == {"cat": 1.0, "dog": 0.5}


def test_roc_auc_is_none_with_reason_when_a_class_is_absent():
    y_true = [0, 0, 1, 1]
    proba = [[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]]
    report = utility_report(y_true, [0, 0, 1, 2], proba)
    assert report["roc_auc"] is None
    assert "2" in report["roc_auc_reason"] and "absent" in report["roc_auc_reason"]
    assert len(report["confusion_matrix"]) == 3


def test_utility_report_without_proba():
    report = utility_report([0, 1, 1], [0, 1, 0], None)
    assert report["roc_auc"] is None and report["expected_calibration_error"] is None
    assert report["accuracy"] == pytest.approx(2 / 3)


def test_ece_hand_checked():
    # Bins of width 0.2 (n_bins=5):
    #   conf 0.90 correct  -> bin (0.8, 1.0]: |1.0 - 0.90| * 1/4 = 0.025
    #   conf 0.75 wrong, 0.65 correct -> bin (0.6, 0.8]: |0.5 - 0.70| * 2/4 = 0.100
    #   conf 0.55 correct  -> bin (0.4, 0.6]: |1.0 - 0.55| * 1/4 = 0.1125
    y_true = [0, 1, 1, 1]
    proba = [[0.9, 0.1], [0.75, 0.25], [0.35, 0.65], [0.45, 0.55]]
    assert expected_calibration_error(y_true, proba, n_bins=5) == pytest.approx(0.2375)


def test_ece_bins_are_closed_on_the_right():
    # Confidence exactly 0.6 belongs to (0.4, 0.6] with 0.5, not to (0.6, 0.8] with 0.7:
    # bin (0.4, 0.6]: acc 1, mean conf 0.55 -> 0.45 * 2/3; bin (0.6, 0.8]: acc 1, conf 0.7 -> 0.3 * 1/3
    y_true = [0, 0, 0]
    proba = [[0.6, 0.4], [0.5, 0.5], [0.7, 0.3]]
    assert expected_calibration_error(y_true, proba, n_bins=5) == pytest.approx(0.45 * 2 / 3 + 0.3 / 3)


def test_ece_is_zero_when_perfectly_calibrated():
    y_true = [0, 0, 0, 1]  # confidence 0.75 everywhere, 3 of 4 correct
    proba = [[0.75, 0.25]] * 4
    assert expected_calibration_error(y_true, proba) == pytest.approx(0.0)


def test_most_confused_pairs():
    confusion = [[5, 3, 1], [3, 5, 0], [7, 0, 2]]
    assert most_confused_pairs(confusion, k=3) == [(2, 0, 7), (0, 1, 3), (1, 0, 3)]
    assert most_confused_pairs(confusion, labels=["a", "b", "c"]) == [
        ("c", "a", 7),
        ("a", "b", 3),
        ("b", "a", 3),
        ("a", "c", 1),
    ]
    assert most_confused_pairs([[4, 0], [0, 4]]) == []


def test_per_class_drop_sorted_by_drop():
    private = {"a": 0.9, "b": 0.5, "c": 0.85}
    baseline = {"a": 0.92, "b": 0.9, "c": 0.8}
    drops = per_class_drop(private, baseline)
    assert [label for label, _ in drops] == ["b", "a", "c"]
    assert drops[0][1] == pytest.approx(0.4)
    assert drops[-1][1] == pytest.approx(-0.05)
    assert per_class_drop([0.9, 0.5, 0.7], [0.9, 0.9, 0.8], k=1) == [(1, pytest.approx(0.4))]


def test_client_accuracy_summary():
    summary = client_accuracy_summary({"c1": 0.8, "c2": 0.6, "c3": 0.9, "c4": 0.7})
    assert summary["mean"] == pytest.approx(0.75)
    assert summary["worst"] == pytest.approx(0.6)
    assert summary["worst_client"] == "c2"
    assert summary["spread"] == pytest.approx(0.3)
    assert summary["std"] == pytest.approx(np.std([0.8, 0.6, 0.9, 0.7]))
    assert client_accuracy_summary([0.5, 0.7])["worst_client"] == 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: utility_report([0, 1], [0], [[0.5, 0.5], [0.5, 0.5]]), "samples"),
        (lambda: utility_report([], [], None), "empty"),
        (lambda: utility_report([0, 1], [0, 1], [[0.5, 0.6], [0.5, 0.5]]), "sum to 1"),
        (lambda: utility_report([0, 1], [0, 1], [[0.5, 0.5, 0.0]] * 2, labels=[0, 1]), "columns"),
        (lambda: utility_report([0, 1], [0, 1], [[0.5, 0.5]]), "rows"),
        (lambda: utility_report([0, 3], [0, 1], [[0.5, 0.5]] * 2), "not among"),
        (lambda: utility_report([0, 1], [0, 1], [[2.0, -1.0]] * 2), "logits"),
        (lambda: utility_report([0, 1], [0, 1], [[np.nan, 1.0]] * 2), "NaN"),
        (lambda: expected_calibration_error([0, 1], [[0.5, 0.5]] * 2, n_bins=0), "n_bins"),
        (lambda: most_confused_pairs([[1, 2, 3]]), "square"),
        (lambda: most_confused_pairs([[1, 2], [3, 4]], k=0), "k must"),
        (lambda: per_class_drop({"a": 0.5}, {"b": 0.5}), "different classes"),
        (lambda: per_class_drop([1.5], [0.5]), "recall"),
        (lambda: client_accuracy_summary([]), "empty"),
        (lambda: client_accuracy_summary([0.5, 80.0]), "[0, 1]"),
    ],
)
def test_bad_inputs_raise(call, message):
    with pytest.raises(BadInput) as info:
        call()
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_audit_functions_name_malformed_inputs():
    from audit.metrics import per_class_drop
    from audit.report import generalisation_gap
    from audit.robustness import robustness_report
    from shared.errors import BadInput
    from shared.models import build_model

    with pytest.raises(BadInput, match="private_recall must hold numbers"):
        per_class_drop({0: "high"}, {0: 0.5})
    model = build_model("logreg", 4, 2, None)
    x, y = np.zeros((3, 4), np.float32), np.array([0, 1, 0])
    with pytest.raises(BadInput, match="x_train and y_train must be non-empty and of equal length"):
        generalisation_gap(model, x, y[:2], x, y)
    with pytest.raises(BadInput, match="bounds must be a pair"):
        robustness_report(model, x, y, bounds=5)
    with pytest.raises(BadInput, match="bounds must be two arrays of shape"):
        robustness_report(model, x, y, bounds=(np.zeros(3), np.ones(3)))
