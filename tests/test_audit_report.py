"""fedaudit audit / compare / sweep: robustness in a normalised space, gates and exit
codes, the JSON layout and the HTML reports.

Trained runs come from the session fixtures in conftest (real runs made by the CLI);
only the sweep test starts its own (small) simulations."""

from __future__ import annotations

import base64
import html
import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from audit import robustness as rb
from audit.html import AUDIT_PLOTS, COMPARE_PLOTS, SWEEP_PLOTS
from audit.report import Gates, audit_run, check_gates, compare_reports, load_run
from cli import app
from shared.errors import BadInput
from shared.store import RunStore
from tests.conftest import run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_plots(page: str, plots: dict[str, str]) -> None:
    """Every plot is an <img> with its id and alt text, embedded as a real PNG."""
    assert "<!DOCTYPE html>" in page
    for plot_id, alt in plots.items():
        match = re.search(rf'<img class="plot" id="{plot_id}" alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
        assert match, f"plot {plot_id} missing"
        assert html.unescape(match.group(1)) == alt
        assert base64.b64decode(match.group(2)).startswith(PNG_MAGIC)
    assert len(set(re.findall(r'<img[^>]* id="([^"]+)"', page))) == len(re.findall(r"<img", page))  # ids distinct
    # self-contained: nothing fetched from anywhere
    assert not re.search(r'(src|href)="(https?:)?//', page)


# --------------------------------------------------------------------------- robustness, no run needed
class Linear2(nn.Module):
    def __init__(self, w: np.ndarray, b: np.ndarray):
        super().__init__()
        self.lin = nn.Linear(w.shape[1], 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.from_numpy(w))
            self.lin.bias.copy_(torch.from_numpy(b))

    def forward(self, x):
        return self.lin(x)


def test_attacks_scale_eps_by_each_features_range():
    """A binary linear model has a closed-form worst case: the margin falls by
    eps * sum_j width_j |w_y,j - w_other,j|. FGSM and PGD must both reach it, which
    holds only if eps is applied as a fraction of each feature's own range."""
    rng = np.random.default_rng(0)
    d, n = 6, 400
    w = rng.normal(size=(2, d)).astype(np.float32)
    b = rng.normal(size=2).astype(np.float32)
    x = rng.uniform(-1, 1, size=(n, d)).astype(np.float32)
    model = Linear2(w, b).eval()
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()  # every record starts correct
    scale = np.linspace(0.5, 3.0, d).astype(np.float32)
    lo, hi = -10 * scale, 10 * scale  # wide box: the clamp never binds at these eps
    width = hi - lo
    eps = [0.002, 0.005, 0.01, 0.02]

    margin = (x @ (w[y] - w[1 - y]).T).diagonal() + b[y] - b[1 - y]
    cost = np.abs(w[0] - w[1]) @ width
    expected = [float(np.mean(margin - e * cost > 0)) for e in eps]

    fgsm = rb.adversarial_accuracy(model, x, y, "fgsm", eps, (lo, hi))
    pgd = rb.adversarial_accuracy(model, x, y, "pgd", eps, (lo, hi))
    assert [p["accuracy"] for p in fgsm] == pytest.approx(expected, abs=1.5 / n)
    assert [p["accuracy"] for p in pgd] == pytest.approx(expected, abs=1.5 / n)
    assert expected[0] > expected[-1]  # the test is not vacuous
    assert [p["alpha"] for p in pgd] == pytest.approx([2.5 * e / rb.DEFAULT_PGD_STEPS for e in eps])


def test_range_scaled_maps_the_unit_box_onto_the_feature_box():
    lo, hi = np.array([-1.0, 0.0, 5.0], np.float32), np.array([1.0, 10.0, 5.0], np.float32)  # last feature constant
    wrapped = rb.RangeScaled(nn.Identity(), lo, hi)
    x = np.array([[0.0, 2.5, 5.0], [1.0, 10.0, 5.0]], np.float32)
    u = wrapped.to_unit(x)
    assert u.numpy() == pytest.approx(np.array([[0.5, 0.25, 0.0], [1.0, 1.0, 0.0]]))
    assert wrapped(u).numpy() == pytest.approx(x)


def test_feature_bounds():
    a = np.array([[0.0, -2.0], [1.0, 3.0]], np.float32)
    lo, hi = rb.feature_bounds(a, np.array([[-1.0, 0.0]], np.float32))
    assert lo.tolist() == [-1.0, -2.0] and hi.tolist() == [1.0, 3.0]
    lo, hi = rb.feature_bounds(a, fixed=(-5, 5))
    assert lo.tolist() == [-5, -5] and hi.tolist() == [5, 5]
    with pytest.raises(BadInput, match="outside the fixed bounds"):
        rb.feature_bounds(a, fixed=(-1, 1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps": [0.0]}, "attack eps must be > 0"),
        ({"eps": [1.5]}, "<= 1"),
        ({"eps": []}, "attack eps is empty"),
        ({"attack": "cw"}, "unknown attack"),
        ({"steps": 0}, "steps must be a positive integer"),
    ],
)
def test_adversarial_accuracy_rejects_bad_input(kwargs, message):
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(BadInput, match=message):
        rb.adversarial_accuracy(nn.Linear(3, 2), x, np.zeros(4, int), **kwargs)


@pytest.mark.parametrize("attack", [rb.noise_accuracy, rb.adversarial_accuracy])
@pytest.mark.parametrize(
    "bounds, y, message",
    [
        ((np.zeros(1), np.ones(1)), None, r"shape \(3,\)"),
        ((np.ones(3), np.zeros(3)), None, "hi >= lo"),
        ((np.full(3, 0.5), np.ones(3)), None, "outside the given bounds"),
        (None, np.array([0, 1, 2, 0]), "class 2 but the model has 2 outputs"),
    ],
)
def test_attacks_check_bounds_and_labels(attack, bounds, y, message):
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(BadInput, match=message):
        attack(nn.Linear(3, 2), x, np.zeros(4, int) if y is None else y, bounds=bounds)


def test_noise_rejects_nan_records():
    x = np.zeros((4, 3), np.float32)
    x[1, 2] = np.nan
    with pytest.raises(BadInput, match="NaN"):
        rb.noise_accuracy(nn.Linear(3, 2), x, np.zeros(4, int))


# --------------------------------------------------------------------------- on trained runs
EPS = (0.01, 0.02, 0.05, 0.1, 0.2)


@pytest.mark.simulation
# The seeded private run: PGD <= FGSM is a property checked on one fixed model, and a
# default private run's model changes with its fresh noise every session.
@pytest.mark.parametrize("fixture", ["private_rerun", "nonprivate_run"])
def test_trained_model_weakens_as_eps_grows_and_pgd_beats_fgsm(fixture, request, e2e_dir):
    run = load_run(RunStore(e2e_dir), request.getfixturevalue(fixture)["run_id"])
    data = run.data
    bounds = rb.feature_bounds(data.x_train, data.x_test, fixed=rb.DIGITS_BOUNDS)
    report = rb.robustness_report(run.model, data.x_test, data.y_test, bounds, eps=EPS)
    clean = report["clean_accuracy"]
    fgsm = [p["accuracy"] for p in report["fgsm"]]
    pgd = [p["accuracy"] for p in report["pgd"]]
    assert [p["eps"] for p in report["pgd"]] == list(EPS)
    assert all(a >= b for a, b in zip(fgsm, fgsm[1:])), fgsm
    assert all(a >= b for a, b in zip(pgd, pgd[1:])), pgd
    assert fgsm[-1] < clean - 0.3 and pgd[-1] < clean - 0.3  # the attacks bite
    assert all(p <= f <= clean for p, f in zip(pgd, fgsm)), (pgd, fgsm, clean)
    assert report["strongest_pgd"] == {"eps": 0.2, "accuracy": pgd[-1]}


@pytest.fixture(scope="module")
def audited(private_run, nonprivate_run, e2e_dir, tmp_path_factory):
    """One real `fedaudit audit --json --html --baseline` of the private run, gates passing."""
    html_path = tmp_path_factory.mktemp("audit-html") / "report.html"
    proc = run_cli(
        "audit", private_run["run_id"], "--baseline", nonprivate_run["run_id"], "--json", "--html", str(html_path),
        "--max-epsilon", "100", "--min-accuracy", "0.1", "--max-accuracy-drop", "0.9", "--min-robust-accuracy", "0",
        runs_dir=e2e_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), html_path.read_text(), proc


@pytest.mark.simulation
def test_audit_json_follows_the_documented_keys(audited, private_run, nonprivate_run):
    report, _, _ = audited
    assert report["audited"] is True
    u, r, p = report["utility"], report["robustness"], report["privacy"]
    for key in ("accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_per_class", "roc_auc",
                "confusion_matrix", "expected_calibration_error", "per_client", "generalisation", "efficiency"):
        assert key in u, key
    for key in ("noise", "fgsm", "pgd", "clean_accuracy", "strongest_pgd", "parameters"):
        assert key in r, key
    for key in ("epsilon", "delta", "client_epsilon", "accountant", "mia_auc", "mia_tpr_at_1pct_fpr", "mia_tpr_at_0_1pct_fpr",
                "empirical_epsilon_lower_bound", "canary_audit"):
        assert key in p, key
    assert p["canary_audit"] is None  # trained without --canaries
    assert 0 <= p["mia_tpr_at_0_1pct_fpr"] <= p["mia_tpr_at_1pct_fpr"] <= 1 and 0 <= p["mia_auc"] <= 1
    assert 0 <= p["empirical_epsilon_lower_bound"] <= p["epsilon"] and p["empirical_epsilon_confidence"] == 0.95
    # the stored final model gives what the server measured, and privacy is the run's
    assert u["accuracy"] == pytest.approx(private_run["accuracy"])
    assert u["f1_macro"] == pytest.approx(private_run["f1_macro"])
    assert p["epsilon"] == pytest.approx(private_run["epsilon"]) and p["delta"] == private_run["delta"]
    assert report["model"]["matches_last_round"] is True
    cm = np.array(u["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == report["data"]["n_test"] and np.trace(cm) / cm.sum() == pytest.approx(u["accuracy"])
    assert 0.5 < u["roc_auc"] <= 1.0
    assert u["per_client"]["n_clients"] == 3 and u["per_client"]["worst"] <= u["per_client"]["mean"]
    assert u["efficiency"]["parameters"] == 650 and u["efficiency"]["latency_ms_per_1000"] > 0
    assert u["generalisation"]["n_train"] > u["generalisation"]["n_test"]
    # robustness states its parameters
    params = r["parameters"]
    assert params["eps"] == list(rb.DEFAULT_EPS) and params["pgd_steps"] == rb.DEFAULT_PGD_STEPS and "alpha" in r["pgd"][0]
    assert [x["level"] for x in r["noise"]] == list(rb.DEFAULT_NOISE_LEVELS)
    # error analysis, baseline and gates
    assert report["error_analysis"]["most_confused"] and {"true", "predicted", "count"} <= set(report["error_analysis"]["most_confused"][0])
    hurt = report["error_analysis"]["classes_hurt_most"]
    assert len(hurt) == 10 and hurt[0]["recall_drop"] >= hurt[-1]["recall_drop"]
    assert report["baseline"]["run_id"] == nonprivate_run["run_id"]
    assert report["baseline"]["accuracy"] == pytest.approx(nonprivate_run["accuracy"])
    assert report["baseline"]["accuracy_drop"] == pytest.approx(nonprivate_run["accuracy"] - private_run["accuracy"])
    assert [g["gate"] for g in report["gates"]] == ["max-epsilon", "min-accuracy", "max-accuracy-drop", "min-robust-accuracy"]
    assert report["gates_passed"] is True
    assert [x["round"] for x in report["rounds"]] == [1, 2]
    assert "flags" in report


@pytest.mark.simulation
def test_audit_html_holds_every_plot(audited):
    _, page, proc = audited
    assert_plots(page, AUDIT_PLOTS)
    assert "HTML report written to" in proc.stderr


@pytest.mark.simulation
def test_gate_failures_exit_1_listing_each_measured_value(private_run, nonprivate_run, e2e_dir):
    result = cli("audit", private_run["run_id"], "--runs-dir", str(e2e_dir), "--json",
                 "--max-epsilon", "0.01", "--min-accuracy", "0.999", "--min-robust-accuracy", "0.99",
                 "--baseline", nonprivate_run["run_id"], "--max-accuracy-drop", "-0.5")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["gates_passed"] is False and not any(g["passed"] for g in report["gates"])
    failures = [line for line in result.stderr.splitlines() if line.startswith("gate failed: ")]
    assert len(failures) == 4
    measured = {g["gate"]: g["measured"] for g in report["gates"]}
    assert measured["max-epsilon"] == pytest.approx(private_run["epsilon"])
    assert measured["min-robust-accuracy"] == report["robustness"]["pgd"][-1]["accuracy"]
    for gate, value in measured.items():
        assert any(line.startswith(f"gate failed: {gate}: measured {value:.4f}") for line in failures), (gate, failures)


@pytest.mark.simulation
def test_max_epsilon_fails_a_non_private_run(nonprivate_run, e2e_dir):
    result = cli("audit", nonprivate_run["run_id"], "--runs-dir", str(e2e_dir), "--max-epsilon", "1000")
    assert result.exit_code == 1
    assert "gate failed: max-epsilon: measured -" in result.stderr and "non-private" in result.stderr


@pytest.mark.simulation
@pytest.mark.parametrize(
    "args, message",
    [
        (["nope"], "unknown run 'nope'"),
        (["{run}", "--max-accuracy-drop", "0.1"], "--max-accuracy-drop needs --baseline"),
        (["{run}", "--baseline", "nope", "--max-accuracy-drop", "0.1"], "unknown run 'nope'"),
        (["{run}", "--min-accuracy", "1.5"], "--min-accuracy must be in [0, 1]"),
        (["{run}", "--max-epsilon", "0"], "--max-epsilon must be > 0"),
        (["{run}", "--html", "{dir}"], "is a directory"),
    ],
)
def test_audit_bad_input_exits_2_with_one_line(args, message, private_run, e2e_dir, tmp_path):
    args = [a.format(run=private_run["run_id"], dir=tmp_path) for a in args]
    result = cli("audit", *args, "--runs-dir", str(e2e_dir))
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr


def test_check_gates_on_a_report():
    report = {
        "status": "completed",
        "utility": {"accuracy": 0.8},
        "privacy": {"epsilon": 2.0, "client_epsilon": 5.0},
        "baseline": {"run_id": "b", "accuracy_drop": 0.1},
        "robustness": {"strongest_pgd": {"eps": 0.1, "accuracy": 0.3}},
    }
    gates = check_gates(report, Gates(max_epsilon=4, min_accuracy=0.8, max_accuracy_drop=0.1, min_robust_accuracy=0.31))
    assert [(g["gate"], g["measured"], g["passed"]) for g in gates] == [
        ("max-epsilon", 5.0, False),  # every privacy unit counts
        ("min-accuracy", 0.8, True),
        ("max-accuracy-drop", 0.1, True),
        ("min-robust-accuracy", 0.3, False),
    ]
    assert check_gates(report, Gates()) == []


# --------------------------------------------------------------------------- compare
@pytest.mark.simulation
def test_compare_two_runs(private_run, nonprivate_run, e2e_dir, tmp_path):
    html_path = tmp_path / "compare.html"
    result = cli("compare", nonprivate_run["run_id"], private_run["run_id"], "--runs-dir", str(e2e_dir), "--json", "--html", str(html_path))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["reference"] == nonprivate_run["run_id"] and report["same_data"] is True
    a, b = report["runs"]
    assert a["metrics"]["utility.accuracy"] == pytest.approx(nonprivate_run["accuracy"])
    assert b["metrics"]["utility.accuracy"] == pytest.approx(private_run["accuracy"])
    assert a["metrics"]["privacy.epsilon"] is None and b["metrics"]["privacy.epsilon"] == pytest.approx(private_run["epsilon"])
    assert b["metrics"]["privacy.delta"] == private_run["delta"]
    for name in ("utility.f1_macro", "utility.roc_auc", "robustness.pgd@0.1", "robustness.fgsm@0.1", "robustness.noise@0.1",
                 "privacy.client_epsilon", "wall_time"):
        assert name in report["metric_names"]
    # The empirical privacy numbers sit side by side for the private and the non-private run.
    for name in ("privacy.mia_auc", "privacy.mia_tpr_at_1pct_fpr", "privacy.mia_tpr_at_0_1pct_fpr", "privacy.empirical_epsilon_lower_bound"):
        assert name in report["metric_names"] and all(0 <= run["metrics"][name] < math.inf for run in (a, b)), name
    assert a["metrics"]["privacy.mia_auc"] <= 1 and b["metrics"]["privacy.empirical_epsilon_lower_bound"] <= private_run["epsilon"]
    diff = report["differences"][0]
    assert diff["run_id"] == private_run["run_id"] and diff["against"] == nonprivate_run["run_id"]
    for name in report["metric_names"]:
        x, y = a["metrics"][name], b["metrics"][name]
        assert diff["differences"][name] == (pytest.approx(y - x) if x is not None and y is not None else None)
    assert [r["round"] for r in a["rounds"]] == [1, 2]
    assert_plots(html_path.read_text(), COMPARE_PLOTS)
    text = cli("compare", nonprivate_run["run_id"], private_run["run_id"], "--runs-dir", str(e2e_dir))
    assert text.exit_code == 0 and "utility.accuracy" in text.stdout


def test_compare_picks_up_empirical_privacy_numbers():
    """Any number under privacy.* of an audit report (an empirical estimate, say) is compared too."""
    def fake(run_id, acc, extra):
        return {
            "run_id": run_id, "status": "completed", "wall_time": 1.0,
            "data": {"dataset": "digits", "clients": 3, "partition": "iid", "seed": 0},
            "model": {"name": "logreg"},
            "utility": {"accuracy": acc, "balanced_accuracy": acc, "f1_macro": acc, "roc_auc": None, "expected_calibration_error": 0.1,
                        "per_client": {}, "generalisation": {"accuracy_gap": 0.0, "loss_gap": 0.0}, "efficiency": {"latency_ms_per_1000": 1.0}},
            "robustness": {"clean_accuracy": acc, "noise": [], "fgsm": [], "pgd": [], "parameters": {}},
            "privacy": {"dp": True, "client_dp": False, "epsilon": 2.0, "delta": 1e-5, **extra},
            "rounds": [],
        }

    report = compare_reports([fake("a", 0.9, {}), fake("b", 0.8, {"empirical": {"mia_auc": 0.55, "epsilon_lower_bound": 0.3}})])
    assert "privacy.empirical.mia_auc" in report["metric_names"]
    assert report["runs"][0]["metrics"]["privacy.empirical.mia_auc"] is None
    assert report["differences"][0]["differences"]["utility.accuracy"] == pytest.approx(-0.1)
    with pytest.raises(BadInput, match="at least two runs"):
        compare_reports([fake("a", 0.9, {})])


def test_compare_needs_two_runs(tmp_path):
    result = cli("compare", "only-one", "--runs-dir", str(tmp_path))
    assert result.exit_code == 2 and "at least two runs" in result.stderr


# --------------------------------------------------------------------------- sweep
@pytest.mark.parametrize(
    "args, message",
    [
        ([], "exactly one of --noise-multipliers and --target-epsilons"),
        (["--noise-multipliers", "1", "--target-epsilons", "3"], "exactly one of"),
        (["--noise-multipliers", "0.8,abc"], "'abc' is not a number"),
        (["--noise-multipliers", "0.8,-1"], "must be > 0"),
        (["--target-epsilons", "3,3"], "lists a value twice"),
        (["--noise-multipliers", "1", "--dataset", "imagenet"], "unknown dataset"),
        # found by the check of every point, before any progress display starts
        (["--noise-multipliers", "1", "--clients", "100"], "fewer than --batch-size"),
    ],
)
def test_sweep_bad_input_exits_2_and_stores_nothing(args, message, tmp_path):
    runs = tmp_path / "runs"
    result = cli("sweep", *args, "--runs-dir", str(runs))
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (runs / "runs.db").exists()


@pytest.mark.simulation
def test_sweep_stores_every_run_and_draws_the_curve(tmp_path):
    runs_dir, html_path = tmp_path / "runs", tmp_path / "sweep.html"
    proc = run_cli(
        "sweep", "--dataset", "digits", "--clients", "3", "--rounds", "2", "--seed", "7", "--model", "logreg",
        "--noise-multipliers", "0.8,2.0", "--json", "--html", str(html_path), runs_dir=runs_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    runs = report["runs"]
    assert [r["label"] for r in runs] == ["non-private", "sigma=2", "sigma=0.8"]
    assert all(r["status"] == "completed" for r in runs)
    assert runs[0]["dp"] is False and runs[0]["epsilon"] is None
    assert [r["noise_multiplier"] for r in runs[1:]] == [2.0, 0.8]
    assert 0 < runs[1]["epsilon"] < runs[2]["epsilon"]  # less noise, more epsilon
    assert runs[1]["delta"] == runs[2]["delta"]
    assert report["data"] == {"dataset": "digits", "clients": 3, "rounds": 2, "seed": 7, "partition": "iid", "model": "logreg"}
    # every run is stored like a `fedaudit run`, with the same data settings
    store = RunStore(runs_dir)
    assert {r.run_id for r in store.list_runs()} == {r["run_id"] for r in runs}
    configs = [store.get_run(r["run_id"]).config for r in runs]
    assert {(c["dataset"], c["clients"], c["rounds"], c["seed"], c["partition"], c["model"]) for c in configs} == {("digits", 3, 2, 7, "iid", "logreg")}
    assert [c["dp"] for c in configs] == [False, True, True]
    assert "sweep runs" in proc.stderr  # the progress display across runs
    assert_plots(html_path.read_text(), SWEEP_PLOTS)
    # a sweep's runs can be audited like any run (library call, no subprocess)
    report = audit_run(store, runs[2]["run_id"], baseline_id=runs[0]["run_id"], reference_models=0)
    assert report["utility"]["accuracy"] == pytest.approx(runs[2]["accuracy"])


def test_sweep_points_keep_the_data_and_vary_only_dp():
    from server.sweep import sweep_points
    from shared.config import resolve

    base = resolve(None, dataset="digits", clients=3, rounds=2, seed=7, target_epsilon=5.0)
    points = sweep_points(base, target_epsilons=[8, 1, 3])
    assert [p.label for p in points] == ["non-private", "eps<=1", "eps<=3", "eps<=8"]
    assert [p.config.dp for p in points] == [False, True, True, True]
    assert [p.config.target_epsilon for p in points] == [None, 1.0, 3.0, 8.0]
    assert {(p.config.dataset, p.config.clients, p.config.rounds, p.config.seed) for p in points} == {("digits", 3, 2, 7)}
    points = sweep_points(base, noise_multipliers=[0.8, 2.0])
    assert [(p.config.noise_multiplier, p.config.target_epsilon) for p in points[1:]] == [(2.0, None), (0.8, None)]
    with pytest.raises(BadInput, match="client-level DP"):
        sweep_points(resolve(None, client_dp=True, clients=4), noise_multipliers=[1.0])


@pytest.mark.parametrize("command", ["audit", "compare", "sweep"])
def test_new_commands_have_help(command):
    result = cli(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output and "--json" in result.output and "--html" in result.output


def test_no_gate_passes_on_a_run_that_did_not_finish():
    from audit.report import Gates, check_gates

    report = {"status": "failed", "utility": {"accuracy": 0.99}, "privacy": {"epsilon": 1.0}}
    results = check_gates(report, Gates(min_accuracy=0.5))
    assert [r["gate"] for r in results if not r["passed"]] == ["run-ended-normally"]
    assert all(r["passed"] for r in check_gates({**report, "status": "completed"}, Gates(min_accuracy=0.5)))
    assert check_gates(report, Gates()) == []  # no gates asked, nothing to fail


def test_audit_cli_prints_the_unfinished_run_gate(monkeypatch, tmp_path):
    import audit.report

    def fake_audit_run(store, run_id, gates, **kwargs):
        report = {"run_id": run_id, "status": "failed", "utility": {"accuracy": 0.9}, "privacy": {}}
        return {**report, "gates": check_gates(report, gates)}

    monkeypatch.setattr(audit.report, "audit_run", fake_audit_run)
    result = cli("audit", "r", "--min-accuracy", "0.5", "--json", "--runs-dir", str(tmp_path))
    assert result.exit_code == 1, result.output
    assert "gate failed: run-ended-normally" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("damage", ["model-json", "safetensors", "negative-shape"])
def test_a_damaged_final_model_is_one_line_exit_2(damage, tmp_path):
    from shared.config import RunConfig

    store = RunStore(tmp_path)
    store.create_run("r", RunConfig(dataset="digits", clients=2, rounds=1).validate().to_dict(), info={})
    store.update_run("r", status="completed")
    run_dir = store.run_dir("r")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "model.json").write_text('{"model": "logreg"' if damage == "model-json" else json.dumps(
        {"model": "logreg", "num_features": -1 if damage == "negative-shape" else 64, "num_classes": 10}))
    (run_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    result = CliRunner().invoke(app, ["audit", "r", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "final model files" in result.stderr and "damaged" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_damaged_audit_log_leaves_the_members_unknown_rather_than_guessed(tmp_path):
    from types import SimpleNamespace

    from audit.mia import member_clients
    from shared.errors import BadInput

    (tmp_path / "audit.jsonl").write_text('{"kind": "round", "payload": {"participants": [0]}}\n{"kind": "rou')
    run = SimpleNamespace(config=SimpleNamespace(clients=3), model_path=tmp_path / "model.safetensors", record=SimpleNamespace(info={}))
    with pytest.raises(BadInput, match="audit log .* is damaged"):
        member_clients(run)
    (tmp_path / "audit.jsonl").write_text('{"kind": "round", "payload": {"participants": [0, 2]}}\n')
    assert member_clients(run) == [0, 2]


def test_gates_on_a_run_stopped_before_its_final_model_fail_with_exit_1(tmp_path):
    from shared.config import RunConfig

    store = RunStore(tmp_path)
    store.create_run("stopped", RunConfig(dataset="digits", clients=2, rounds=3).validate().to_dict(), info={})
    store.update_run("stopped", status="failed", error="interrupted before round 2")
    result = CliRunner().invoke(app, ["audit", "stopped", "--min-accuracy", "0.5", "--max-epsilon", "8", "--json", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["audited"] is False and report["gates_passed"] is False
    assert [g["gate"] for g in report["gates"]] == ["run-ended-normally", "max-epsilon", "min-accuracy"]
    assert "gate failed: run-ended-normally" in result.stderr
    plain = CliRunner().invoke(app, ["audit", "stopped", "--runs-dir", str(tmp_path)])
    assert plain.exit_code == 2 and "has no final model" in plain.stderr
    unknown = CliRunner().invoke(app, ["audit", "stopped", "--min-accuracy", "0.5", "--baseline", "nope", "--runs-dir", str(tmp_path)])
    assert unknown.exit_code == 2, unknown.output


def test_a_zero_joint_bound_names_no_source():
    from audit.report import joint_lower_bound

    chance = {"m": 100, "r": 50, "v": 25, "delta": 1e-5}  # half the guesses right: no evidence of leakage
    joint = joint_lower_bound(None, chance)
    assert joint["empirical_epsilon_lower_bound"] == 0.0 and joint["empirical_epsilon_source"] is None
