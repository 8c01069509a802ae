"""Canary audits: the secret, the canary pool, the client side, the audit on stored runs,
a 3-seed DP sanity check with real Opacus, and two real simulations through the CLI."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest

from audit.canary import sample_canary_audit
from audit.empirical import one_run_audit, one_run_epsilon_lower_bound
from audit.mia import Recipe, audit_membership, logit_confidence, membership_inference, train_federated
from audit.report import _with_canaries, comparison_metrics, load_run
from clients.app import training_data
from server.federation import _config_record
from server.runner import prepare_run
from shared import privacy
from shared.canaries import SECRET_FILE, canary_direction, draw_secret, flat_directions, load_secret, save_secret
from shared.config import resolve
from shared.data import DataSpec, client_data, prepare
from shared.errors import BadInput
from shared.store import RunStore
from tests.conftest import run_cli, run_json


# --------------------------------------------------------------------------- the secret
def test_each_canary_is_included_with_probability_half_in_a_random_client(tmp_path):
    secret = draw_secret(4000, clients=5, canary_clients=3)
    included = np.array(secret.included)
    holder = np.array(secret.holder)
    assert abs(included.mean() - 0.5) < 0.04  # 4000 fair coins: 5 standard deviations
    assert np.all((holder >= 0) == included) and set(holder[included]) == set(range(5))
    assert secret.canary_clients == 3
    assert draw_secret(4000, 5).included != secret.included  # OS randomness, not the public seed

    path = tmp_path / SECRET_FILE
    save_secret(path, secret)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_secret(path) == secret
    with pytest.raises(BadInput, match="not found"):
        load_secret(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(BadInput, match="unreadable"):
        load_secret(tmp_path / "bad.json")


def test_canary_directions_are_unit_deterministic_and_nearly_orthogonal():
    shapes = {"w": (10, 64), "b": (10,)}
    one = canary_direction(7, 0, shapes)
    assert math.isclose(sum(float(np.sum(v * v)) for v in one.values()), 1.0, rel_tol=1e-9)
    assert all(np.array_equal(one[k], canary_direction(7, 0, shapes)[k]) for k in shapes)
    rows = flat_directions(7, range(50), shapes)
    gram = rows @ rows.T
    assert np.allclose(np.diag(gram), 1.0)
    assert np.abs(gram[~np.eye(50, dtype=bool)]).max() < 0.25  # d = 650: cosines ~ N(0, 1/650)


# --------------------------------------------------------------------------- the pool
def test_the_canary_pool_comes_out_of_the_test_split_with_wrong_labels():
    plain = prepare(DataSpec(dataset="digits", num_clients=3, seed=4))
    spec = DataSpec(dataset="digits", num_clients=3, seed=4, canaries=40)
    pool = prepare(spec)
    assert len(pool.y_test) == len(plain.y_test) - 40 and len(pool.canary_y) == 40
    # Every canary is a test record, relabelled to some other class.
    for x, wrong in zip(pool.canary_x, pool.canary_y):
        rows = np.flatnonzero((plain.x_test == x).all(axis=1))
        assert rows.size and all(plain.y_test[r] != wrong for r in rows)
    # The clients' data and the training split are untouched.
    assert np.array_equal(pool.x_train, plain.x_train)
    assert all(np.array_equal(a, b) for a, b in zip(pool.client_indices, plain.client_indices))
    with pytest.raises(BadInput, match="more than half"):
        prepare(DataSpec(dataset="digits", num_clients=3, seed=4, canaries=300))


def test_a_client_trains_on_exactly_the_canaries_it_holds():
    spec = DataSpec(dataset="digits", num_clients=3, seed=4, canaries=40)
    secret = draw_secret(40, clients=3)
    pool = prepare(spec)
    for pid in range(3):
        base = client_data(spec, pid)
        data, held = training_data(spec, pid, secret)
        mine = secret.held_by(pid)
        assert held == len(mine) and len(data.y_train) == len(base.y_train) + held
        assert np.array_equal(data.x_train[len(base.y_train):], pool.canary_x[mine])
        assert np.array_equal(data.y_train[len(base.y_train):], pool.canary_y[mine])
        assert np.array_equal(data.x_val, base.x_val)  # canaries never enter validation
    data, held = training_data(spec, 0, None)
    assert held == 0


def test_local_training_hides_the_canaries_in_its_rate_steps_size_and_loss():
    """Canaries appended after the public records change none of what a client reports."""
    import torch

    from shared.training import DPSettings, train_local
    from shared.models import build_model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    y = rng.integers(0, 3, 120).astype(np.int64)
    x[100:] *= 50.0  # canaries the model gets badly wrong: they would dominate a shared loss

    def train(n, public=None, dp=None, lr=0.1, model=None):
        return train_local(model or build_model("logreg", 8, 3, None), x[:n], y[:n], epochs=2, batch_size=20, learning_rate=lr,
                           dp=dp, grad_sample_mode="ew", seed=1, public_records=public)

    alone, hiding = train(100, dp=DPSettings(1.0, 1.0)), train(120, public=100, dp=DPSettings(1.0, 1.0))
    # ceil(120/20) = 6 batches would give q = 1/6 and 12 steps; the public 100 give 1/5 and 10.
    assert (hiding.sample_rate, hiding.steps, hiding.num_examples) == (alone.sample_rate, alone.steps, alone.num_examples) == (0.2, 10, 100)

    # lr 0: the model never moves, so the reported loss is exactly the public records' mean.
    model = build_model("logreg", 8, 3, None)
    reported = train(120, public=100, lr=0.0, model=model).loss
    with torch.no_grad():
        expected = float(torch.nn.functional.cross_entropy(model(torch.from_numpy(x[:100])), torch.from_numpy(y[:100])))
    assert reported == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="public_records"):
        train(120, public=0)


def test_a_train_reply_is_the_same_with_or_without_the_canaries_it_holds(tmp_path, monkeypatch):
    """The reply's size, sample rate, steps and epsilon leave out the canaries a client trains on."""
    from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from clients.app import train
    from shared.models import initial_model
    from shared.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    job = prepare_run(resolve(None, clients=3, rounds=1, seed=2, model="logreg", canaries=150, batch_size=16, encrypt=False), tmp_path)
    secret = load_secret(RunStore(tmp_path).run_dir(job.run_id) / SECRET_FILE)
    pid = max(range(3), key=lambda c: len(secret.held_by(c)))
    assert len(secret.held_by(pid)) > 16  # enough to move ceil(n / B) if it were counted
    config = _config_record(job)
    config["server-round"] = 1
    weights = {k: Array(v.detach().numpy()) for k, v in initial_model("logreg", 64, 10, 8, 2).state_dict().items()}

    def reply(canaries):
        msg = Message(RecordDict({CONFIG_KEY: config, ARRAYS_KEY: ArrayRecord(weights)}), dst_node_id=1, message_type="train")
        context = Context(run_id=1, node_id=1, node_config={"partition-id": pid}, state=RecordDict(), run_config={})
        return dict(train(msg, context, canaries).content[METRICS_KEY])

    keys = ("num-examples", "round-sample-rate", "round-steps", "epsilon", "epsilon-rdp")
    with_canaries, without = reply(secret), reply(None)
    assert {k: with_canaries[k] for k in keys} == {k: without[k] for k in keys}


def test_the_client_app_travels_as_a_reference_to_its_recipe():
    """Flower's Ray backend pickles the ClientApp with every message: it must stay small,
    and come out as the worker's own app for the same canaries file."""
    import pickle

    import ray.cloudpickle

    from clients.app import app, build_app, shared_app

    for client_app, canaries_file in ((app, None), (shared_app("/runs/r1/canaries.json"), "/runs/r1/canaries.json")):
        for dumps in (pickle.dumps, ray.cloudpickle.dumps):
            payload = dumps(client_app)
            assert len(payload) < 200
            assert pickle.loads(payload) is client_app is shared_app(canaries_file)
    fresh = pickle.loads(pickle.dumps(build_app("/runs/r2/canaries.json")))
    assert fresh.canaries_file == "/runs/r2/canaries.json" and fresh is shared_app("/runs/r2/canaries.json")


def test_bad_canary_settings_are_refused():
    with pytest.raises(BadInput, match="needs --client-dp"):
        resolve(None, canary_clients=4)
    with pytest.raises(BadInput, match="0 or >= 2"):
        resolve(None, canaries=1)
    with pytest.raises(BadInput, match="0 or >= 2"):
        resolve(None, client_dp=True, canary_clients=1)
    assert resolve(None, client_dp=True, canary_clients=4, clients=6).nodes == 10


def test_the_secret_stays_in_the_run_store_and_out_of_every_message(tmp_path):
    job = prepare_run(resolve(None, clients=3, rounds=1, seed=2, model="logreg", canaries=30), tmp_path)
    path = RunStore(tmp_path).run_dir(job.run_id) / SECRET_FILE
    secret = load_secret(path)
    assert secret.m == 30 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    sent = dict(_config_record(job))
    # The server tells clients only how many canaries the pool holds (public).
    assert [k for k in sent if "canar" in k] == ["data.canaries"] and sent["data.canaries"] == 30
    assert not any(isinstance(v, str) and ("included" in v or "holder" in v) for v in sent.values())
    assert "included" not in json.dumps(RunStore(tmp_path).get_run(job.run_id).info)


# --------------------------------------------------------------------------- sanity, 3 seeds
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_empirical_bounds_never_exceed_the_theoretical_epsilon_under_dp(seed):
    """Real Opacus DP-SGD on digits with 150 canaries, three seeds: neither the canary
    bound nor the membership-inference bound may exceed the accountant's epsilon."""
    spec = DataSpec(dataset="digits", num_clients=1, seed=seed, canaries=150)
    pool = prepare(spec)
    secret = draw_secret(150, clients=1)
    data, held = training_data(spec, 0, secret)
    epochs, batch, sigma = 15, 32, 0.8
    steps_per_epoch = math.ceil(len(data.y_train) / batch)
    recipe = Recipe("mlp", 64, 10, 8, clients=1, rounds=1, local_epochs=epochs, batch_size=batch, lr=0.3,
                    dp=True, noise_multiplier=sigma, max_grad_norm=1.0)
    model = train_federated(recipe, data.x_train, data.y_train, seed=seed)
    theoretical = privacy.epsilon([(sigma, 1.0 / steps_per_epoch, epochs * steps_per_epoch)], 1e-5)
    result = one_run_audit(logit_confidence(model, pool.canary_x, pool.canary_y), np.array(secret.included), 1e-5)
    assert held == sum(secret.included)
    assert result["epsilon_lower_bound"] <= theoretical, (result, theoretical)
    public = len(data.y_train) - held
    mia = membership_inference(model, data.x_train[:public], data.y_train[:public], pool.x_test, pool.y_test, delta=1e-5, seed=seed)
    assert mia["members"] >= 200 and mia["empirical_epsilon_lower_bound"] <= theoretical, (mia["empirical_epsilon_lower_bound"], theoretical)


# --------------------------------------------------------------------------- real runs
# One seed end to end through the CLI; the three-seed sanity check is the in-process one
# above (each simulation here costs ~15 s of a suite that must stay under 10 minutes).
PRIVATE_SEEDS = (5,)


@pytest.fixture(scope="module")
def canary_runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("canary-runs")
    overfit = run_json("run", "--dataset", "digits", "--clients", "2", "--rounds", "3", "--local-epochs", "20", "--seed", "3",
                       "--model", "mlp", "--no-dp", "--canaries", "150", "--batch-size", "16", "--lr", "0.5", runs_dir=runs)
    private = {
        seed: run_json("run", "--dataset", "digits", "--clients", "3", "--rounds", "3", "--seed", str(seed), "--model", "logreg", "--dp",
                       "--client-dp", "--client-sample-rate", "1.0", "--client-clip", "1.0", "--client-noise-multiplier", "0.3",
                       "--canaries", "20", "--canary-clients", "6", runs_dir=runs)
        for seed in PRIVATE_SEEDS
    }
    return runs, overfit, private


@pytest.mark.simulation
def test_overfit_non_private_run_leaks_its_canaries(canary_runs, tmp_path):
    runs, overfit, _ = canary_runs
    assert overfit["status"] == "completed"
    html = tmp_path / "report.html"
    # The MIA gate fails on this leaky model: exit 1, and the report still prints.
    report = run_json("audit", overfit["run_id"], "--reference-models", "0", "--html", str(html), "--max-mia-auc", "0.5",
                      runs_dir=runs, expect_code=1)
    p = report["privacy"]
    ca = p["canary_audit"]
    assert (ca["m"], ca["r"], ca["k_plus"], ca["k_minus"]) == (150, 30, 15, 15)
    assert ca["valid"] and not ca["scanned"] and ca["theoretical_epsilon"] is None
    assert ca["epsilon_lower_bound"] > 1.0, ca
    assert p["mia_auc"] > 0.5 and 0 <= p["mia_tpr_at_0_1pct_fpr"] <= p["mia_tpr_at_1pct_fpr"] <= 1
    assert [(g["gate"], g["passed"]) for g in report["gates"]] == [("max-mia-auc", False)] and not report["gates_passed"]
    # The headline is jointly valid at 95%: two attacks and the canary audit, each recounted
    # at 5%/3, so it sits at or below the best of the three separate 95% bounds.
    assert (p["empirical_epsilon_confidence"], p["empirical_epsilon_tests"]) == (0.95, 3)
    assert 1.0 < p["empirical_epsilon_lower_bound"] <= max(ca["epsilon_lower_bound"], p["mia"]["empirical_epsilon_lower_bound"])
    recount = one_run_epsilon_lower_bound(ca["m"], ca["r"], ca["v"], ca["delta"], 1 - 0.05 / 3)
    assert recount < ca["epsilon_lower_bound"] and p["empirical_epsilon_lower_bound"] >= recount
    page = html.read_text()
    assert 'id="plot-canary-scores"' in page and 'id="plot-canary-cosines"' in page and "One-run audit" in page

    row = comparison_metrics(report)
    assert row["privacy.canary_audit.epsilon_lower_bound"] == ca["epsilon_lower_bound"]

    store = RunStore(runs)
    scanned = sample_canary_audit(load_run(store, overfit["run_id"]), store, None, scan=True)
    assert scanned["scanned"] and not scanned["valid"] and "not a valid bound" in scanned["guesses"]
    assert scanned["epsilon_lower_bound"] >= ca["epsilon_lower_bound"]
    # A scan is shown beside the fixed-k bound; it never replaces it, nor becomes the headline.
    privacy = {"empirical_epsilon_lower_bound": 0.0, "delta": None}
    plain = _with_canaries(privacy, load_run(store, overfit["run_id"]), store, canary_scan=False)
    both = _with_canaries(privacy, load_run(store, overfit["run_id"]), store, canary_scan=True)
    assert "canary_audit_scan" not in plain and both["canary_audit_scan"]["scanned"] and not both["canary_audit_scan"]["valid"]
    assert both["canary_audit"] == plain["canary_audit"] and both["canary_audit"]["valid"]
    assert both["empirical_epsilon_lower_bound"] == plain["empirical_epsilon_lower_bound"] > 0.0
    assert both["empirical_epsilon_source"] == plain["empirical_epsilon_source"]
    scan_report = run_json("audit", overfit["run_id"], "--reference-models", "0", "--canary-scan", runs_dir=runs)
    assert scan_report["privacy"]["canary_audit"]["valid"] and scan_report["privacy"]["canary_audit_scan"]["scanned"]


@pytest.mark.simulation
def test_private_run_with_canaries_and_canary_clients(canary_runs, tmp_path):
    runs, _, private_runs = canary_runs
    private = private_runs[PRIVATE_SEEDS[0]]
    assert private["status"] == "completed", private["error"]
    store = RunStore(runs)
    # Canary clients hold no data: they are not clients of the stored run.
    assert [c["client"] for c in store.get_clients(private["run_id"])] == [0, 1, 2]
    html = tmp_path / "report.html"
    report = run_json("audit", private["run_id"], "--reference-models", "0", "--html", str(html), runs_dir=runs)
    p = report["privacy"]
    ca, cc = p["canary_audit"], p["client_canary_audit"]
    page = html.read_text()
    assert "Canary clients (Andrew et al. 2023)" in page and "as the paper fits it" in page and "sample-level DP, largest over all clients" in page
    assert ca["m"] == 20 and ca["valid"]
    # Any client could have held an excluded canary: the largest client epsilon covers them all.
    assert ca["theoretical_epsilon"] == pytest.approx(private["epsilon"]) and ca["theoretical_source"].startswith("sample-level")
    assert cc["canary_clients"] == 6 and cc["unobserved"] == 1000
    assert cc["theoretical_epsilon"] == pytest.approx(private["client_epsilon"])
    # q = 1, z = 0.3, 3 rounds: the inserted canaries stand far out of the unobserved ones
    # (expected cosine ~0.17 against a spread of ~1/sqrt(650) = 0.04 per canary).
    assert cc["mean_observed"] > cc["mean_unobserved"] + 3 * cc["std_pooled"] / math.sqrt(6)
    assert 1.0 < cc["epsilon_estimate"] < math.inf and 1.0 < cc["epsilon_estimate_two_variance"] < math.inf

    # The audit reads the same secret the clients used: rescoring it by hand agrees.
    run = load_run(store, private["run_id"])
    again = sample_canary_audit(run, store, private["delta"])
    assert (again["r"], again["v"]) == (ca["r"], ca["v"])


@pytest.mark.simulation
@pytest.mark.parametrize("seed", PRIVATE_SEEDS)
def test_empirical_bounds_stay_below_the_theoretical_epsilon_on_dp_runs(canary_runs, seed):
    """The sanity rule on a real federated DP run: no valid lower bound above epsilon."""
    runs, _, private_runs = canary_runs
    summary = private_runs[seed]
    assert summary["status"] == "completed", summary["error"]
    store = RunStore(runs)
    run = load_run(store, summary["run_id"])
    canaries = sample_canary_audit(run, store, summary["delta"])
    assert canaries["valid"] and canaries["epsilon_lower_bound"] <= canaries["theoretical_epsilon"] <= summary["epsilon"] + 1e-9
    mia = audit_membership(run, summary["delta"], reference_models=0)
    assert mia["empirical_epsilon_lower_bound"] <= summary["epsilon"]


def test_canaries_need_the_cli_simulation_not_flwr_run():
    from server.app import job_from_run_config

    with pytest.raises(BadInput, match="canaries need"):
        job_from_run_config({"canaries": 10, "runs-dir": "/nonexistent"})


def test_bad_canary_flags_exit_2(tmp_path):
    proc = run_cli("run", "--canary-clients", "3", runs_dir=tmp_path)
    assert proc.returncode == 2 and "needs --client-dp" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("run", "--canaries", "10", "--engine", "deployment", "--superlink", "127.0.0.1:9", "--insecure", runs_dir=tmp_path)
    assert proc.returncode == 2 and "simulation engine only" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs.db").exists()  # nothing half-written
