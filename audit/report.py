"""The audit of a stored run (``fedaudit audit``) and the comparison of several runs
(``fedaudit compare``).

Everything reads the run store and the final model on disk; nothing here needs a live
federation. The reports are JSON-ready dicts (plain floats, ints, lists, string keys
after ``json.dumps``); :mod:`audit.html` renders them.

Report layout (``audit_run``)::

    run_id, status, model{...}, data{...}
    utility{accuracy, balanced_accuracy, precision_macro, recall_macro, f1_macro,
            *_per_class, support_per_class, roc_auc, confusion_matrix,
            expected_calibration_error, per_client{...}, generalisation{...}, efficiency{...}}
    robustness{clean_accuracy, noise[], fgsm[], pgd[], strongest_pgd{}, parameters{}}
    error_analysis{most_confused[], classes_hurt_most[] | None}
    privacy{epsilon, delta, client_epsilon, accountant, ...,
            mia_auc, mia_tpr_at_1pct_fpr, mia_tpr_at_0_1pct_fpr, empirical_epsilon_lower_bound,
            mia{attacks{loss, confidence, reference}, ...}}   (see audit.mia)
    rounds[], flags, baseline{...} | None, gates[], gates_passed
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from audit import canary
from audit import mia as mia_attacks
from audit import robustness as rb
from audit.empirical import epsilon_lower_bound_from_counts, one_run_epsilon_lower_bound
from audit.metrics import client_accuracy_summary, most_confused_pairs, per_class_drop, utility_report
from shared.config import RunConfig
from shared.data import DataSpec, Prepared, client_data, prepare
from shared.errors import BadInput
from shared.evaluation import evaluate, predict_proba
from shared.models import build_model, parameter_count
from shared.store import ENDED_NORMALLY, RunRecord, RunStore
from shared.weights import digest, load_numpy

# Attacks run on at most this many test records (a seeded subsample beyond it).
MAX_ROBUSTNESS_RECORDS = 2000
LATENCY_RECORDS = 1000
LATENCY_REPEATS = 7
MOST_CONFUSED_K = 5


# --------------------------------------------------------------------------- loading
@dataclass
class StoredRun:
    """A stored run with its final model rebuilt and its data spec."""

    run_id: str
    record: RunRecord
    config: RunConfig
    spec: DataSpec
    model: nn.Module
    model_info: dict
    weights: dict[str, np.ndarray]
    model_path: Path

    @property
    def data(self) -> Prepared:
        return prepare(self.spec)


def load_run(store: RunStore, run_id: str) -> StoredRun:
    """The run's record, config, data spec and final model (``model.safetensors``).

    Raises :class:`BadInput` for an unknown run, or one whose final model is missing or damaged.
    """
    import json

    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    record = store.get_run(run_id)
    run_dir = store.run_dir(run_id)
    model_path, info_path = run_dir / "model.safetensors", run_dir / "model.json"
    if not model_path.exists() or not info_path.exists():
        raise BadInput(f"run {run_id} has no final model in {run_dir} (status {record.status})")
    config = RunConfig.from_stored(record.config)
    try:
        info = json.loads(info_path.read_text())
        model = build_model(info["model"], info["num_features"], info["num_classes"], info.get("image_side"))
        weights = load_file(model_path)
    except (ValueError, KeyError, TypeError, RuntimeError, OSError, SafetensorError) as exc:  # RuntimeError: torch, on a negative shape
        raise BadInput(f"run {run_id}: its final model files in {run_dir} are damaged ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    try:
        load_numpy(model, weights)
    except (KeyError, RuntimeError) as exc:
        raise BadInput(f"run {run_id}: model.safetensors does not fit a {info['model']} model: {str(exc).splitlines()[0]}") from None
    model.eval()
    return StoredRun(run_id, record, config, config.data_spec, model, info, weights, model_path)


# --------------------------------------------------------------------------- gates
@dataclass(frozen=True)
class Gates:
    """Pass/fail thresholds of ``fedaudit audit``; None means the gate is not checked."""

    max_epsilon: float | None = None
    min_accuracy: float | None = None
    max_accuracy_drop: float | None = None
    min_robust_accuracy: float | None = None
    max_mia_auc: float | None = None

    def validate(self, has_baseline: bool) -> Gates:
        if self.max_epsilon is not None and not self.max_epsilon > 0:
            raise BadInput(f"--max-epsilon must be > 0, got {self.max_epsilon:g}")
        for flag, value in (("--min-accuracy", self.min_accuracy), ("--min-robust-accuracy", self.min_robust_accuracy), ("--max-mia-auc", self.max_mia_auc)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise BadInput(f"{flag} must be in [0, 1], got {value:g}")
        if self.max_accuracy_drop is not None:
            if not has_baseline:
                raise BadInput("--max-accuracy-drop needs --baseline RUN_ID (the run to measure the drop against)")
            if not -1.0 <= self.max_accuracy_drop <= 1.0:
                raise BadInput(f"--max-accuracy-drop must be in [-1, 1], got {self.max_accuracy_drop:g}")
        return self


def _unfinished_report(record: RunRecord, gates: Gates) -> dict[str, Any]:
    """A run that stopped before its final model, audited as a CI gate: nothing can be
    measured, so every requested gate fails, ``run-ended-normally`` first."""
    failed = [{"gate": "run-ended-normally", "threshold": None, "measured": None, "passed": False,
               "detail": f"the run's status is {record.status!r} and it has no final model; gates need a completed run"}]
    for name, threshold in vars(gates).items():
        if threshold is not None:
            failed.append({"gate": name.replace("_", "-"), "threshold": threshold, "measured": None, "passed": False, "detail": "no final model to measure"})
    return {"run_id": record.run_id, "status": record.status, "error": record.error, "audited": False, "gates": failed, "gates_passed": False}


def check_gates(report: dict, gates: Gates) -> list[dict]:
    """Each requested gate with its threshold, the measured value and whether it passed.

    ``max_epsilon`` is checked against every privacy unit the run reports (sample- and
    client-level); a non-private run has unbounded epsilon and fails it.
    ``min_robust_accuracy`` is checked on PGD accuracy at the largest eps.
    ``max_mia_auc`` is checked on the AUC of the strongest membership-inference attack.
    """
    results = []

    def add(name: str, threshold: float, measured: float | None, passed: bool, detail: str) -> None:
        results.append({"gate": name, "threshold": threshold, "measured": measured, "passed": bool(passed), "detail": detail})

    # A gate must not pass on a run that did not finish, whatever its model scores.
    if any(v is not None for v in vars(gates).values()) and report.get("status") not in ENDED_NORMALLY:
        add("run-ended-normally", None, None, False, f"the run's status is {report.get('status')!r}; gates need a completed run")

    if gates.max_epsilon is not None:
        privacy = report["privacy"]
        spent = [e for e in (privacy.get("epsilon"), privacy.get("client_epsilon")) if e is not None]
        if spent:
            measured = max(spent)
            add("max-epsilon", gates.max_epsilon, measured, measured <= gates.max_epsilon, f"epsilon (largest over privacy units) must be <= {gates.max_epsilon:g}")
        else:
            add("max-epsilon", gates.max_epsilon, None, False, "the run is non-private: its epsilon is unbounded")
    if gates.min_accuracy is not None:
        acc = report["utility"]["accuracy"]
        add("min-accuracy", gates.min_accuracy, acc, acc >= gates.min_accuracy, f"test accuracy must be >= {gates.min_accuracy:g}")
    if gates.max_accuracy_drop is not None:
        drop = report["baseline"]["accuracy_drop"]
        add("max-accuracy-drop", gates.max_accuracy_drop, drop, drop <= gates.max_accuracy_drop,
            f"baseline {report['baseline']['run_id']} accuracy minus this run's must be <= {gates.max_accuracy_drop:g}")
    if gates.min_robust_accuracy is not None:
        strongest = report["robustness"]["strongest_pgd"]
        acc = strongest["accuracy"]
        add("min-robust-accuracy", gates.min_robust_accuracy, acc, acc >= gates.min_robust_accuracy,
            f"PGD accuracy at the strongest eps ({strongest['eps']:g} of each feature's range) must be >= {gates.min_robust_accuracy:g}")
    if gates.max_mia_auc is not None:
        auc = report["privacy"].get("mia_auc")
        if auc is None:
            add("max-mia-auc", gates.max_mia_auc, None, False, "no membership-inference result (too few non-member records)")
        else:
            attack = report["privacy"].get("mia", {}).get("mia_attack", "strongest")
            add("max-mia-auc", gates.max_mia_auc, auc, auc <= gates.max_mia_auc,
                f"membership-inference AUC of the strongest attack ({attack}) must be <= {gates.max_mia_auc:g}")
    return results


# --------------------------------------------------------------------------- pieces
def _training_records(spec: DataSpec, clients: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [client_data(spec, i) for i in range(clients)]
    return np.concatenate([p.x_train for p in parts]), np.concatenate([p.y_train for p in parts])


def per_client_accuracy(model: nn.Module, spec: DataSpec, clients: int) -> dict[str, Any]:
    """The model's accuracy on each client's local validation split, and a summary."""
    accuracies, sizes = {}, {}
    for i in range(clients):
        part = client_data(spec, i)
        if len(part.y_val):
            accuracies[i] = evaluate(model, part.x_val, part.y_val)[1]
            sizes[i] = int(len(part.y_val))
    if not accuracies:
        return {"n_clients": 0, "accuracies": {}, "reason": "no client has a validation split (--val-fraction 0)"}
    summary = client_accuracy_summary(accuracies)
    return {**summary, "accuracies": {str(k): v for k, v in accuracies.items()}, "val_records": {str(k): v for k, v in sizes.items()}}


def generalisation_gap(model: nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """Accuracy and cross-entropy on training records vs test records.

    Parameters
    ----------
    model : torch.nn.Module
        The trained classifier.
    x_train, y_train : ndarrays of shape (n_train, n_features) and (n_train,)
        Records it was trained on, and their class ids.
    x_test, y_test : ndarrays of shape (n_test, n_features) and (n_test,)
        Held-out records, and their class ids.

    Returns
    -------
    dict
        ``train_accuracy``, ``test_accuracy``, ``accuracy_gap`` (train - test),
        ``train_loss``, ``test_loss``, ``loss_gap`` (test - train), ``n_train``,
        ``n_test``; a positive gap means overfitting.
    """
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) == 0 or len(x) != len(y):
            raise BadInput(f"x_{name} and y_{name} must be non-empty and of equal length, got {len(x)} and {len(y)}")
    train_loss, train_acc = evaluate(model, x_train, y_train)
    test_loss, test_acc = evaluate(model, x_test, y_test)
    return {
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "accuracy_gap": train_acc - test_acc,
        "train_loss": train_loss,
        "test_loss": test_loss,
        "loss_gap": test_loss - train_loss,
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
    }


def efficiency(model: nn.Module, x: np.ndarray, model_path: Path | None = None, repeats: int = LATENCY_REPEATS) -> dict[str, Any]:
    """Parameter count, size in bytes and inference latency per 1,000 records.

    Latency: one single-threaded forward pass over 1,000 records (``x`` tiled), timed
    ``repeats`` times after a warm-up; the headline is the best time (as ``timeit`` advises: slower
    repeats measure other load on the machine, not the model), the median is kept too.
    """
    batch = np.ascontiguousarray(np.resize(x, (LATENCY_RECORDS, x.shape[1])).astype(np.float32))
    # One thread: a multi-threaded pass over small models mostly measures how fast the
    # thread pool wakes up on a busy machine, which swings by 100x from run to run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predict_proba(model, batch)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            predict_proba(model, batch)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {
        "parameters": parameter_count(model),
        "parameter_bytes": int(sum(p.numel() * p.element_size() for p in model.parameters())),
        "file_bytes": int(model_path.stat().st_size) if model_path is not None else None,
        "latency_ms_per_1000": 1000.0 * min(times),
        "latency_ms_per_1000_median": 1000.0 * statistics.median(times),
        "latency_repeats": repeats,
        "torch_threads": 1,
    }


def outlier_flags(store: RunStore, run_id: str) -> dict[str, Any] | None:
    """The server's per-round outlier scores of client updates, summarised.

    Returns
    -------
    dict or None
        ``scored_updates`` (rows recorded), ``flagged`` (flagged rows: round, client,
        scores), ``flagged_per_client`` (client -> flagged rounds), and when the run
        had malicious clients: ``malicious_clients`` (the ground truth),
        ``flagged_clients``, and ``flagged_malicious`` / ``flagged_honest`` (how many
        flagged clients were truly malicious, and how many were not). None when the
        run recorded no scores.
    """
    rows = store.get_flags(run_id)
    if not rows:
        return None
    flagged = [r for r in rows if r["flagged"]]
    per_client: dict[str, int] = {}
    for r in flagged:
        per_client[str(r["client"])] = per_client.get(str(r["client"]), 0) + 1
    report: dict[str, Any] = {"scored_updates": len(rows), "flagged": flagged, "flagged_per_client": per_client}
    truth = store.get_run(run_id).info.get("malicious_clients") or []
    if truth:
        clients = {r["client"] for r in flagged}
        report.update(
            malicious_clients=sorted(truth),
            flagged_clients=sorted(clients),
            flagged_malicious=len(clients & set(truth)),
            flagged_honest=len(clients - set(truth)),
        )
    return report


def _privacy(store: RunStore, run_id: str) -> dict[str, Any]:
    from shared.summary import summarize

    s = summarize(store, run_id)
    record = store.get_run(run_id)
    keys = ("epsilon", "epsilon_rdp", "delta", "client_epsilon", "client_epsilon_rdp", "accountant", "privacy_unit",
            "noise_multiplier", "client_noise_multiplier", "max_epsilon", "budget_left")
    return {
        "dp": bool(record.config.get("dp")),
        "client_dp": bool(record.config.get("client-dp")),
        **{k: s.get(k) for k in keys},
        "max_grad_norm": record.config.get("max-grad-norm") if record.config.get("dp") else None,
    }


MIA_KEYS = ("mia_auc", "mia_tpr_at_1pct_fpr", "mia_tpr_at_0_1pct_fpr", "empirical_epsilon_lower_bound")


def _with_mia(privacy: dict[str, Any], run: StoredRun, reference_models: int) -> dict[str, Any]:
    """Add the membership-inference headline numbers and the full result to ``privacy``."""
    x_m, y_m, x_n, y_n = mia_attacks.run_records(run)
    if min(len(y_m), len(y_n)) < 4:
        return {**privacy, **{k: None for k in MIA_KEYS}, "mia": None,
                "mia_skipped": f"membership inference needs >= 4 members and non-members, got {len(y_m)} and {len(y_n)}"}
    result = mia_attacks.audit_membership(run, privacy.get("delta"), reference_models)
    return {**privacy, **{k: result[k] for k in MIA_KEYS}, "mia": result,
            "empirical_epsilon_source": f"membership inference ({result['empirical_epsilon_attack']} attack)" if result["empirical_epsilon_lower_bound"] > 0 else None,
            "empirical_epsilon_confidence": result["confidence"]}


def _with_canaries(privacy: dict[str, Any], run: StoredRun, store: RunStore, canary_scan: bool) -> dict[str, Any]:
    """Add the canary audits; the headline lower bound becomes the best *valid* bound.

    ``canary_audit`` is always the audit with (k+, k-) fixed in advance, the valid one;
    with ``canary_scan`` the scan over guess counts is added beside it as
    ``canary_audit_scan``, so asking for the scan never hides the bound that holds.
    """
    audits = canary.sample_canary_audits(run, store, privacy.get("delta"), scans=(False, True) if canary_scan else (False,))
    sample = audits[0] if audits else None
    clients = canary.client_canary_audit(run, store, privacy.get("delta"))
    out = {**privacy, "canary_audit": sample, "client_canary_audit": clients}
    if canary_scan and audits:
        out["canary_audit_scan"] = audits[1]
    if sample is not None and sample["valid"]:
        out.update(joint_lower_bound(privacy.get("mia"), sample))
    return out


def joint_lower_bound(mia: dict[str, Any] | None, sample: dict[str, Any], confidence: float = mia_attacks.CONFIDENCE) -> dict[str, Any]:
    """The best lower bound over the MIA attacks and the one-run canary audit, valid at ``confidence``.

    Each audit states its own bound at 95%; the largest of several 95% bounds would
    hold only at about 90%. So every test is recounted at ``(1 - confidence) / tests``
    (Bonferroni) from its stored counts, and the headline is the best of those.
    """
    attacks = mia["attacks"] if mia else {}
    alpha = (1.0 - confidence) / (len(attacks) + 1)
    candidates = {
        f"membership inference ({name} attack)": epsilon_lower_bound_from_counts(
            a["bound"]["fn"], a["bound"]["n_pos"], a["bound"]["fp"], a["bound"]["n_neg"], a["bound"]["delta"], alpha)
        for name, a in attacks.items()
    }
    candidates["one-run canary audit"] = one_run_epsilon_lower_bound(sample["m"], sample["r"], sample["v"], sample["delta"], 1.0 - alpha)
    source = max(candidates, key=candidates.get)
    best = candidates[source]
    return {
        "empirical_epsilon_lower_bound": best,
        # A bound of 0 comes from no test in particular: none beat chance.
        "empirical_epsilon_source": source if best > 0 else None,
        "empirical_epsilon_confidence": confidence,
        "empirical_epsilon_tests": len(candidates),
    }


ROUND_KEYS = ("round", "accuracy", "loss", "federated_accuracy", "epsilon", "client_epsilon", "participants", "seconds", "model_sha256")


def _test_utility(run: StoredRun) -> dict[str, Any]:
    data = run.data
    if len(data.y_test) == 0:
        raise BadInput(f"run {run.run_id} has no server test split (--test-fraction 0): nothing to audit on")
    proba = predict_proba(run.model, data.x_test)
    labels = np.arange(run.model_info["num_classes"])
    return utility_report(data.y_test, proba.argmax(axis=1), proba, labels=labels)


def _subsample(x: np.ndarray, y: np.ndarray, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if len(y) <= limit:
        return x, y
    keep = np.sort(np.random.default_rng(seed).choice(len(y), size=limit, replace=False))
    return x[keep], y[keep]


def _baseline(run: StoredRun, utility: dict, baseline: StoredRun) -> tuple[dict, list[dict]]:
    if baseline.model_info["num_classes"] != run.model_info["num_classes"]:
        raise BadInput(
            f"baseline {baseline.run_id} has {baseline.model_info['num_classes']} classes but run {run.run_id} has {run.model_info['num_classes']}"
        )
    base_utility = _test_utility(baseline)
    same_data = baseline.spec == run.spec
    drops = per_class_drop(utility["recall_per_class"], base_utility["recall_per_class"])
    hurt = [
        {"class": label, "recall_drop": drop, "recall": utility["recall_per_class"][label], "baseline_recall": base_utility["recall_per_class"][label]}
        for label, drop in drops
    ]
    base_privacy = baseline.record.config
    info = {
        "run_id": baseline.run_id,
        "accuracy": base_utility["accuracy"],
        "f1_macro": base_utility["f1_macro"],
        "accuracy_drop": base_utility["accuracy"] - utility["accuracy"],
        "f1_drop": base_utility["f1_macro"] - utility["f1_macro"],
        "dp": bool(base_privacy.get("dp")),
        "same_data": same_data,
        "note": None if same_data else "the baseline used different data, split or seed: the drop compares different test sets",
    }
    return info, hurt


# --------------------------------------------------------------------------- the audit
def audit_run(
    store: RunStore,
    run_id: str,
    *,
    baseline_id: str | None = None,
    gates: Gates | None = None,
    noise_levels: tuple[float, ...] = rb.DEFAULT_NOISE_LEVELS,
    eps: tuple[float, ...] = rb.DEFAULT_EPS,
    pgd_steps: int = rb.DEFAULT_PGD_STEPS,
    max_robustness_records: int = MAX_ROBUSTNESS_RECORDS,
    reference_models: int = mia_attacks.DEFAULT_REFERENCE_MODELS,
    canary_scan: bool = False,
) -> dict[str, Any]:
    """Audit a stored run's final model: utility, robustness, errors, privacy, gates.

    Parameters
    ----------
    store : RunStore
    run_id : str
        A run with a final model (``model.safetensors``).
    baseline_id : str, optional
        A (usually non-private) run to measure the accuracy drop and per-class recall
        drop against; evaluated on its own test split.
    gates : Gates, optional
        Thresholds; validated here too (``max_accuracy_drop`` needs ``baseline_id``).
    noise_levels, eps, pgd_steps, max_robustness_records
        Robustness settings (see :mod:`audit.robustness`).
    reference_models : int, default=2
        Reference models of the membership-inference reference attack (see
        :mod:`audit.mia`); 0 runs only the loss and confidence attacks.
    canary_scan : bool, default=False
        For a run with ``--canaries``: also scan (k+, k-) and report the best guess
        count as ``privacy.canary_audit_scan``, beside the fixed-k ``canary_audit``.
        The scan is flagged as scanned and does not count as a valid lower bound.

    Returns
    -------
    dict
        See the module docstring; ``gates_passed`` is True when every requested gate passed
        (vacuously True with none).
    """
    gates = (gates or Gates()).validate(baseline_id is not None)
    if isinstance(reference_models, bool) or not isinstance(reference_models, int) or reference_models < 0:
        raise BadInput(f"--reference-models must be an integer >= 0, got {reference_models!r}")
    record = store.get_run(run_id)
    requested = [name for name, v in vars(gates).items() if v is not None]
    if requested and record.status not in ENDED_NORMALLY and not (store.run_dir(run_id) / "model.safetensors").exists():
        if baseline_id is not None:
            store.get_run(baseline_id)  # an unknown baseline is still bad input
        return _unfinished_report(record, gates)
    run = load_run(store, run_id)
    base = load_run(store, baseline_id) if baseline_id is not None else None
    data = run.data
    seed = run.config.seed

    utility = _test_utility(run)
    x_train, y_train = _training_records(run.spec, run.config.clients)
    utility["per_client"] = per_client_accuracy(run.model, run.spec, run.config.clients)
    utility["generalisation"] = generalisation_gap(run.model, x_train, y_train, data.x_test, data.y_test)
    utility["efficiency"] = efficiency(run.model, data.x_test, run.model_path)

    x_eval, y_eval = _subsample(data.x_test, data.y_test, max_robustness_records, seed)
    if run.spec.dataset == "digits":
        bounds = rb.feature_bounds(x_train, x_eval, fixed=rb.DIGITS_BOUNDS)
        source = "digits: fixed pixel scale [-1, 1] for every feature (data-independent)"
    else:
        bounds = rb.feature_bounds(x_train, x_eval)
        source = "per-feature min and max over the training records and the attacked test records"
    robustness = rb.robustness_report(run.model, x_eval, y_eval, bounds, noise_levels=noise_levels, eps=eps, pgd_steps=pgd_steps, seed=seed, bounds_source=source)
    robustness["evaluated_on"] = "server test split" + (f" (seeded subsample of {len(y_eval)} of {len(data.y_test)})" if len(y_eval) < len(data.y_test) else "")

    error_analysis: dict[str, Any] = {
        "most_confused": [
            {"true": t, "predicted": p, "count": c} for t, p, c in most_confused_pairs(utility["confusion_matrix"], MOST_CONFUSED_K, utility["labels"])
        ],
        "classes_hurt_most": None,
    }
    baseline = None
    if base is not None:
        baseline, error_analysis["classes_hurt_most"] = _baseline(run, utility, base)

    stored_rounds = store.get_rounds(run_id)
    rounds = [{k: r.get(k) for k in ROUND_KEYS} for r in stored_rounds]
    sha = digest(run.weights)
    last_sha = next((r["model_sha256"] for r in reversed(rounds) if r["model_sha256"]), None)
    report = {
        "run_id": run_id,
        "status": run.record.status,
        "audited": True,
        "model": {
            "name": run.model_info["model"],
            "num_features": run.model_info["num_features"],
            "num_classes": run.model_info["num_classes"],
            "sha256": sha,
            "matches_last_round": None if last_sha is None else sha == last_sha,
        },
        "data": {
            "dataset": run.spec.dataset or run.spec.data,
            "clients": run.config.clients,
            "partition": run.spec.partition,
            "seed": run.spec.seed,
            "n_train": int(len(y_train)),
            "n_test": int(len(data.y_test)),
        },
        "config": run.record.config,
        "wall_time": run.record.wall_time,
        "utility": utility,
        "robustness": robustness,
        "error_analysis": error_analysis,
        "privacy": _with_canaries(_with_mia(_privacy(store, run_id), run, reference_models), run, store, canary_scan),
        "rounds": rounds,
        "flags": outlier_flags(store, run_id),
        "baseline": baseline,
    }
    report["gates"] = check_gates(report, gates)
    report["gates_passed"] = all(g["passed"] for g in report["gates"])
    return report


# --------------------------------------------------------------------------- compare
def _flatten_numbers(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten_numbers(f"{prefix}.{k}", v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = value


# privacy.* keys shown by name in the comparison; any other number under privacy.*
# (an empirical privacy estimate, say) is added after them automatically.
PRIVACY_KEYS = ("epsilon", "epsilon_rdp", "client_epsilon", "delta", "noise_multiplier", "client_noise_multiplier")
# The full membership-inference result is skipped: its headline numbers are top-level keys.
PRIVACY_SKIP = {"max_epsilon", "budget_left", "max_grad_norm", "mia"}
# From the canary audits only these numbers are compared (not bins or internals).
CANARY_COMPARED = {"canary_audit": ("epsilon_lower_bound", "theoretical_epsilon", "m", "r", "v"),
                   "client_canary_audit": ("epsilon_estimate", "epsilon_estimate_two_variance", "theoretical_epsilon", "canary_clients")}


def comparison_metrics(report: dict) -> dict[str, Any]:
    """The flat ``name -> value`` row of one audit report that ``compare`` lines up."""
    u, r, p = report["utility"], report["robustness"], report["privacy"]
    row: dict[str, Any] = {
        "utility.accuracy": u["accuracy"],
        "utility.balanced_accuracy": u["balanced_accuracy"],
        "utility.f1_macro": u["f1_macro"],
        "utility.roc_auc": u["roc_auc"],
        "utility.expected_calibration_error": u["expected_calibration_error"],
        "utility.per_client.mean": u["per_client"].get("mean"),
        "utility.per_client.worst": u["per_client"].get("worst"),
        "utility.per_client.spread": u["per_client"].get("spread"),
        "utility.generalisation.accuracy_gap": u["generalisation"]["accuracy_gap"],
        "utility.generalisation.loss_gap": u["generalisation"]["loss_gap"],
        "robustness.clean_accuracy": r["clean_accuracy"],
    }
    for point in r["noise"]:
        row[f"robustness.noise@{point['level']:g}"] = point["accuracy"]
    for kind in ("fgsm", "pgd"):
        for point in r[kind]:
            row[f"robustness.{kind}@{point['eps']:g}"] = point["accuracy"]
    for key in PRIVACY_KEYS:
        row[f"privacy.{key}"] = p.get(key)
    extra: dict[str, Any] = {}
    for key, value in p.items():
        if key in CANARY_COMPARED:
            for name in CANARY_COMPARED[key]:
                extra[f"privacy.{key}.{name}"] = (value or {}).get(name)
        elif key not in PRIVACY_KEYS and key not in PRIVACY_SKIP:
            _flatten_numbers(f"privacy.{key}", value, extra)
    row.update(extra)
    row["rounds"] = sum(1 for x in report["rounds"] if x["accuracy"] is not None)
    row["wall_time"] = report["wall_time"]
    row["efficiency.latency_ms_per_1000"] = u["efficiency"]["latency_ms_per_1000"]
    return row


def compare_reports(reports: list[dict]) -> dict[str, Any]:
    """Line up audit reports: one metrics row per run and differences against the first."""
    if len(reports) < 2:
        raise BadInput("compare needs at least two runs")
    rows = [comparison_metrics(rep) for rep in reports]
    names: list[str] = []
    for row in rows:
        names.extend(k for k in row if k not in names)
    reference = rows[0]
    runs = []
    for rep, row in zip(reports, rows):
        metrics = {name: row.get(name) for name in names}
        runs.append({
            "run_id": rep["run_id"],
            "status": rep["status"],
            "dataset": rep["data"]["dataset"],
            "model": rep["model"]["name"],
            "dp": rep["privacy"]["dp"],
            "client_dp": rep["privacy"]["client_dp"],
            "metrics": metrics,
            "rounds": rep["rounds"],
            "robustness": {k: rep["robustness"][k] for k in ("clean_accuracy", "noise", "fgsm", "pgd")},
        })
    differences = []
    for run in runs[1:]:
        diff = {}
        for name in names:
            a, b = reference.get(name), run["metrics"].get(name)
            diff[name] = b - a if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        differences.append({"run_id": run["run_id"], "against": runs[0]["run_id"], "differences": diff})
    specs = {(rep["data"]["dataset"], rep["data"]["clients"], rep["data"]["partition"], rep["data"]["seed"]) for rep in reports}
    return {
        "reference": runs[0]["run_id"],
        "metric_names": names,
        "runs": runs,
        "differences": differences,
        "same_data": len(specs) == 1,
        "robustness_parameters": reports[0]["robustness"]["parameters"],
    }


def compare_runs(store: RunStore, run_ids: list[str], **audit_kwargs: Any) -> dict[str, Any]:
    """Audit every run (same robustness settings) and compare them; see :func:`compare_reports`."""
    if len(run_ids) < 2:
        raise BadInput("compare needs at least two runs")
    for run_id in run_ids:
        store.get_run(run_id)  # unknown ids fail before any work
    return compare_reports([audit_run(store, run_id, **audit_kwargs) for run_id in run_ids])

