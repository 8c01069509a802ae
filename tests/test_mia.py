"""Membership inference (audit/mia.py): synthetic scores, the stored e2e runs, and a
deliberately overfit model trained in-process with the federated recipe."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import datasets

from audit.empirical import max_mia_auc, mia_epsilon_lower_bound, mia_metrics, one_run_audit
from audit.mia import Recipe, logit_confidence, membership_inference, train_federated
from audit.report import Gates, check_gates, load_run
from shared import privacy
from shared.errors import BadInput
from shared.store import RunStore

KEYS = ("attacks", "mia_attack", "mia_auc", "mia_tpr_at_1pct_fpr", "mia_tpr_at_0_1pct_fpr", "empirical_epsilon_lower_bound",
        "members", "nonmembers", "reference_models")
ATTACK_KEYS = ("auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "advantage", "roc_fpr", "roc_tpr", "epsilon_lower_bound")


# --------------------------------------------------------------------------- synthetic scores
def test_metrics_and_bound_on_synthetic_scores():
    rng = np.random.default_rng(0)
    null_m, null_n = rng.normal(size=2000), rng.normal(size=2000)
    null = mia_metrics(null_m[1000:], null_n[1000:])
    assert abs(null["auc"] - 0.5) < 0.05 and null["advantage"] < 0.1
    assert mia_epsilon_lower_bound(null_m[:1000], null_n[:1000], null_m[1000:], null_n[1000:], 1e-5)["epsilon_lower_bound"] < 0.3

    sep_m, sep_n = rng.normal(3.0, 1.0, 2000), rng.normal(size=2000)
    strong = mia_metrics(sep_m[1000:], sep_n[1000:])
    # AUC of two unit Gaussians 3 apart is Phi(3 / sqrt 2)
    assert strong["auc"] == pytest.approx(0.983, abs=0.01) and strong["tpr_at_1pct_fpr"] > 0.5
    bound = mia_epsilon_lower_bound(sep_m[:1000], sep_n[:1000], sep_m[1000:], sep_n[1000:], 1e-5)
    assert 1.0 < bound["epsilon_lower_bound"] < 5.6007  # 5.6006 is the most n = 1000 can show


def test_membership_inference_on_a_fixed_model_and_bad_input():
    class Echo:
        """A "model" whose logits are its inputs: members are made confident."""

        def eval(self):
            return self

        def __call__(self, x):
            return x

    rng = np.random.default_rng(1)
    y_m, y_n = rng.integers(0, 3, 200), rng.integers(0, 3, 300)
    x_m = rng.normal(size=(200, 3)).astype(np.float32)
    x_m[np.arange(200), y_m] += 4.0
    x_n = rng.normal(size=(300, 3)).astype(np.float32)
    res = membership_inference(Echo(), x_m, y_m, x_n, y_n, delta=1e-5, reference_models=0)
    assert set(KEYS) <= set(res) and set(res["attacks"]) == {"loss", "confidence"}
    assert res["members"] == res["nonmembers"] == 200 and res["reference_models"] == 0
    assert res["mia_auc"] > 0.9 and res["mia_auc"] == max(a["auc"] for a in res["attacks"].values())
    assert res["empirical_epsilon_lower_bound"] > 0.5 and res["alpha_per_attack"] == pytest.approx(0.025)
    with pytest.raises(BadInput, match="at least 4"):
        membership_inference(Echo(), x_m[:3], y_m[:3], x_n, y_n, delta=1e-5)
    with pytest.raises(BadInput, match="reference-models"):
        membership_inference(Echo(), x_m, y_m, x_n, y_n, delta=1e-5, reference_models=-1)


def test_max_mia_auc_gate():
    report = {"status": "completed", "privacy": {"mia_auc": 0.6, "mia": {"mia_attack": "loss"}}}
    assert [(g["gate"], g["measured"], g["passed"]) for g in check_gates(report, Gates(max_mia_auc=0.55))] == [("max-mia-auc", 0.6, False)]
    assert check_gates(report, Gates(max_mia_auc=0.6))[0]["passed"] is True
    with pytest.raises(BadInput, match="--max-mia-auc"):
        Gates(max_mia_auc=1.5).validate(False)


# --------------------------------------------------------------------------- the stored e2e runs
@pytest.mark.simulation
@pytest.mark.parametrize("fixture", ["private_run", "nonprivate_run"])
def test_mia_on_stored_runs(fixture, request, e2e_dir):
    from audit.mia import audit_membership

    summary = request.getfixturevalue(fixture)
    run = load_run(RunStore(e2e_dir), summary["run_id"])
    res = audit_membership(run, summary.get("delta"), reference_models=2)
    assert set(KEYS) <= set(res) and set(res["attacks"]) == {"loss", "confidence", "reference"}
    for attack in res["attacks"].values():
        assert set(ATTACK_KEYS) <= set(attack) and 0.0 <= attack["auc"] <= 1.0
    assert res["reference_models"] == 2 and res["members"] == res["nonmembers"] > 100
    assert 0.0 <= res["mia_auc"] <= 1.0 and res["empirical_epsilon_lower_bound"] >= 0.0
    if summary.get("epsilon") is not None:
        # sanity rule: on a correct DP run the empirical lower bound never exceeds epsilon
        assert res["empirical_epsilon_lower_bound"] <= summary["epsilon"]
        assert res["delta"] == summary["delta"]


# --------------------------------------------------------------------------- overfit vs strong DP
@pytest.fixture(scope="module")
def noisy_digits():
    """Digits with 30% random labels: a model can only fit those by memorising its members."""
    bunch = datasets.load_digits()
    x = (bunch.data.astype(np.float32) / 8.0 - 1.0)
    rng = np.random.default_rng(1)
    y = bunch.target.astype(np.int64)
    y = np.where(rng.random(len(y)) < 0.3, rng.integers(0, 10, len(y)), y)
    perm = rng.permutation(len(y))
    members, nonmembers = perm[:400], perm[400:1200]
    return x[members], y[members], x[nonmembers], y[nonmembers]


@pytest.fixture(scope="module")
def noisy_digits_canaries():
    """150 further digits as canaries: a seeded wrong label each, each included with p = 1/2."""
    bunch = datasets.load_digits()
    x = (bunch.data.astype(np.float32) / 8.0 - 1.0)
    pool = np.random.default_rng(1).permutation(len(x))[1200:1350]
    rng = np.random.default_rng(2)
    wrong = (bunch.target[pool] + rng.integers(1, 10, len(pool))) % 10
    return x[pool], wrong.astype(np.int64), rng.random(len(pool)) < 0.5


EPOCHS, BATCH = 40, 16


TARGET_EPSILON, DELTA = 1.0, 1e-5


@pytest.fixture(scope="module")
def overfit_audits(noisy_digits):
    """The attacks on the overfit recipe trained without DP and with DP at epsilon <= 1."""
    x_m, y_m, x_n, y_n = noisy_digits
    q, steps = 1.0 / math.ceil(len(y_m) / BATCH), EPOCHS * math.ceil(len(y_m) / BATCH)
    sigma = privacy.noise_for_target(TARGET_EPSILON, q, steps, DELTA)
    audits = {}
    for private in (False, True):
        recipe = Recipe("mlp", 64, 10, 8, clients=1, rounds=1, local_epochs=EPOCHS, batch_size=BATCH, lr=0.3,
                        dp=private, noise_multiplier=sigma if private else 1.0, max_grad_norm=1.0)
        model = train_federated(recipe, x_m, y_m, seed=1)
        audits[private] = membership_inference(model, x_m, y_m, x_n, y_n, delta=DELTA, recipe=recipe,
                                               reference_models=2, seed=0)
    return {"epsilon": privacy.epsilon([(sigma, q, steps)], DELTA), **audits}


def test_overfit_model_leaks_and_strong_dp_does_not(overfit_audits):
    leaky, private = overfit_audits[False], overfit_audits[True]
    for res in (leaky, private):
        assert res["reference_models"] == 2 and set(res["attacks"]) == {"loss", "confidence", "reference"}
    assert leaky["mia_auc"] > 0.6 and leaky["attacks"]["reference"]["auc"] > 0.6, leaky["attacks"]
    # the attack proves the non-private model is not epsilon-1 DP, and cannot prove it of the private one
    assert leaky["empirical_epsilon_lower_bound"] > TARGET_EPSILON
    assert overfit_audits["epsilon"] <= TARGET_EPSILON
    assert private["empirical_epsilon_lower_bound"] <= overfit_audits["epsilon"]
    # what DP itself guarantees (0.731 at epsilon 1), and the leak over chance at least halved
    assert private["mia_auc"] <= max_mia_auc(overfit_audits["epsilon"], DELTA), private["attacks"]
    assert private["mia_auc"] - 0.5 <= (leaky["mia_auc"] - 0.5) / 2, (private["attacks"], leaky["attacks"])


def test_the_overfit_configuration_also_leaks_its_canaries(noisy_digits, noisy_digits_canaries):
    """The same overfit recipe, its training data plus the included canaries: both the
    membership attacks and the one-run canary audit see the leak on one model."""
    x_m, y_m, x_n, y_n = noisy_digits
    x_c, y_c, included = noisy_digits_canaries
    recipe = Recipe("mlp", 64, 10, 8, clients=1, rounds=1, local_epochs=EPOCHS, batch_size=BATCH, lr=0.3,
                    dp=False, noise_multiplier=1.0, max_grad_norm=1.0)
    model = train_federated(recipe, np.concatenate([x_m, x_c[included]]), np.concatenate([y_m, y_c[included]]), seed=1)
    res = membership_inference(model, x_m, y_m, x_n, y_n, delta=1e-5, recipe=recipe, reference_models=2, seed=0)
    canaries = one_run_audit(logit_confidence(model, x_c, y_c), included, 1e-5)
    assert res["mia_auc"] > 0.6, res["attacks"]
    assert not canaries["scanned"]
    assert canaries["epsilon_lower_bound"] > 1.0, canaries


def test_members_are_only_clients_that_took_part_honestly_on_the_specs_records(tmp_path):
    import json
    from types import SimpleNamespace

    from audit.mia import member_clients, run_records
    from shared.config import RunConfig
    from shared.data import client_data

    config = RunConfig(dataset="breast-cancer", clients=5, rounds=2)
    log = tmp_path / "audit.jsonl"
    rounds = [{"round": 1, "participants": [0, 1]}, {"round": 2, "participants": [1, 3, 7]}]  # 7: a canary client
    log.write_text("".join(json.dumps({"kind": k, "payload": p}) + "\n" for k, p in
                           [("run-start", {}), *[("round", r) for r in rounds], ("run-end", {})]))
    run = SimpleNamespace(config=config, spec=config.data_spec, model_path=tmp_path / "model.safetensors",
                          record=SimpleNamespace(info={"malicious_clients": [3], "own_data_clients": [4]}))
    from shared.data import prepare

    run.data = prepare(config.data_spec)
    # Client 2 was never sampled, 3 is malicious, 4 trained on its own files.
    assert member_clients(run) == [0, 1]
    x_m, y_m, x_n, y_n = run_records(run)
    parts = [client_data(config.data_spec, p) for p in range(5)]
    assert len(y_m) == len(parts[0].y_train) + len(parts[1].y_train)
    assert len(y_n) == len(run.data.y_test) + sum(len(parts[p].y_val) for p in range(4))
    log.unlink()  # no log: every client that is neither malicious nor on its own data
    assert member_clients(run) == [0, 1, 2]


@pytest.mark.parametrize("y, message", [(np.array([0, 10]), "outside the model's 10 classes"), (np.array([0.5, 1.0]), "integer class ids"),
                                        (np.array([0, 1, 2]), "one label per row")])
def test_label_scores_check_their_labels(y, message):
    from audit.mia import loss_scores
    from shared.errors import BadInput
    from shared.models import build_model

    model = build_model("logreg", 64, 10, 8)
    with pytest.raises(BadInput, match=message):
        loss_scores(model, np.zeros((2, 64), np.float32), y)
    with pytest.raises(BadInput, match=message):
        logit_confidence(model, np.zeros((2, 64), np.float32), y)
