"""Privacy accounting against the oracle values in the reference (../shared/reference/privacy.md)."""

import json
import math
import re
import warnings

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from cli import app
from server.strategies import ParticipatingClients
from shared import planner, privacy
from shared.errors import BadInput

# q, sigma, T, opacus RDP, opacus PRV at delta 1e-5
ORACLES = [
    (256 / 60000, 1.1, 14062, 2.5966, 2.3917),
    (0.01, 1.0, 1000, 2.1014, 1.8384),
    (0.04, 1.5, 2250, 7.32911, 6.77913),
]


@pytest.mark.parametrize("q,sigma,steps,rdp,prv", ORACLES)
def test_accountants_meet_the_oracles(q, sigma, steps, rdp, prv):
    eps = privacy.epsilons([(sigma, q, steps)], 1e-5)
    assert eps["epsilon_rdp"] == pytest.approx(rdp, rel=0.01)
    assert eps["epsilon_prv"] == pytest.approx(prv, abs=0.01)


@pytest.mark.parametrize("q,sigma,steps,rdp,prv", ORACLES[1:])
def test_run_path_ledger_composes_to_the_oracles(q, sigma, steps, rdp, prv):
    # A run's ledger holds one entry per round; composing them is the same mechanism.
    rounds = [steps // 4, steps // 4, steps // 4, steps - 3 * (steps // 4)]
    ledger = [(sigma, q, n) for n in rounds]
    assert privacy.epsilon(ledger, 1e-5, "rdp") == pytest.approx(rdp, rel=0.01)
    assert privacy.epsilon(ledger, 1e-5, "prv") == pytest.approx(prv, abs=0.01)


# Homogeneous and mixed ledgers, small and large step counts: a digits client, the
# oracle shapes, and mechanisms that changed sigma or q between rounds.
ACCOUNTANT_LEDGERS = [
    [(1.2, 1 / 9, 9)],
    [(1.2, 1 / 9, 90)],
    [(1.1, 256 / 60000, 14062)],
    [(0.8, 0.2, 5), (1.3, 0.05, 40)],
    [(1.154, 0.1352, 236), (2.342, 0.3189, 225)],
    [(2.763, 0.0232, 14), (0.9, 0.5, 3), (1.7, 0.01, 500)],
]


@pytest.mark.parametrize("ledger", ACCOUNTANT_LEDGERS)
def test_cached_accounting_equals_a_fresh_opacus_accountant(ledger):
    """The cached per-step RDP curves change nothing: same floats as Opacus, first query or not."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    entries = sorted(privacy.compact(ledger))
    for name, accountant in (("rdp", RDPAccountant()), ("prv", PRVAccountant())):
        accountant.history = list(entries)
        expected = float(accountant.get_epsilon(delta=1e-5))
        privacy._epsilon_cached.cache_clear()
        assert privacy.epsilon(ledger, 1e-5, name) == expected  # curves possibly cached by the other accountant
        privacy._epsilon_cached.cache_clear()
        privacy._rdp_per_step.cache_clear()
        assert privacy.epsilon(ledger, 1e-5, name) == expected  # nothing cached


@pytest.mark.parametrize("q,sigma,t_max", [(0.2, 1.85, 12.5), (256 / 60000, 1.1, 3.7), (0.5, 0.7, 41.2), (1.0, 2.0, 9.0)])
def test_fast_truncated_prv_gives_opacus_floats(q, sigma, t_max):
    """The scalar cdf that quad integrates in mean(), and the mean itself, are Opacus's own floats."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, TruncatedPrivacyRandomVariable

    prv = PoissonSubsampledGaussianPRV(q, sigma)
    points = np.random.default_rng(0).uniform(-t_max - 1, t_max + 1, 3000).tolist() + [-t_max, t_max, 0.0, -1e-300]
    if q < 1:
        points.append(math.log(1 - q))
    with np.errstate(divide="ignore"):  # log(1 - q) at q = 1, inside Opacus's cdf
        theirs, ours = TruncatedPrivacyRandomVariable(prv, -t_max, t_max), privacy._truncated_prv(prv, -t_max, t_max)
        assert [float(ours.cdf(t)) for t in points] == [float(theirs.cdf(t)) for t in points]
        assert ours.cdf(np.array(points)).tolist() == theirs.cdf(np.array(points)).tolist()
        assert ours.mean() == theirs.mean()


@pytest.mark.parametrize("q,sigma,steps,rdp,prv", ORACLES)
def test_budget_command_meets_the_oracles(q, sigma, steps, rdp, prv):
    result = CliRunner().invoke(
        app, ["budget", "--sample-rate", str(q), "--noise-multiplier", str(sigma), "--steps", str(steps), "--delta", "1e-5", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["epsilon_rdp"] == pytest.approx(rdp, rel=0.01)
    assert report["epsilon_prv"] == pytest.approx(prv, abs=0.01)


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_planner_round_trip(target):
    result = CliRunner().invoke(
        app, ["budget", "--target-epsilon", str(target), "--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    sigma = report["noise_multiplier"]
    eps = privacy.epsilon([(sigma, 0.01, 1000)], 1e-5, "prv")
    assert target - 0.05 <= eps <= target
    assert report["epsilon_prv"] == pytest.approx(eps)


def test_ledger_epsilon_rises_strictly():
    ledger, previous = [], 0.0
    for _ in range(5):
        ledger.append((1.2, 1 / 9, 9))
        eps = privacy.epsilon(ledger, 1e-5)
        assert eps > previous
        previous = eps


def test_default_delta_is_below_one_over_n():
    assert privacy.default_delta(130) == 1e-5
    assert privacy.default_delta(50_000) < 1 / 50_000
    assert privacy.default_delta(None, 20) == 1e-5
    assert privacy.default_delta(200_000) == pytest.approx(5e-7)


def test_sample_level_planner_takes_the_worst_client():
    mechanisms = planner.sample_level_mechanisms([130, 129, 50], batch_size=16, local_epochs=1, rounds=20)
    assert {(round(1 / m.sample_rate), m.steps) for m in mechanisms} == {(9, 180), (4, 80)}
    sigma = planner.noise_for(mechanisms, 5.0, 1e-5)
    assert max(privacy.epsilon([(sigma, m.sample_rate, m.steps)], 1e-5) for m in mechanisms) <= 5.0


def test_poisson_participation_fits_binomial():
    clients, rounds, q = 40, 400, 0.3
    sampler = ParticipatingClients(inner=None, node_of={i: 1000 + i for i in range(clients)}, fraction=q, seed=3, mode="poisson")
    counts = np.zeros(clients)
    sizes = []
    for r in range(1, rounds + 1):
        chosen = sampler.participants(r)
        sizes.append(len(chosen))
        counts[chosen] += 1
    # Each client's count ~ Binomial(T, q): the mean, and a binomial dispersion test
    # (sum of squared standardised deviations ~ chi-square with N degrees of freedom).
    assert counts.mean() == pytest.approx(rounds * q, rel=0.05)
    dispersion = ((counts - rounds * q) ** 2).sum() / (rounds * q * (1 - q))
    assert stats.chi2.sf(dispersion, clients) > 0.001
    # Round sizes vary (Poisson), unlike Flower's fixed-size sampling.
    assert len(set(sizes)) > 5
    sizes = np.array(sizes)
    assert sizes.mean() == pytest.approx(clients * q, rel=0.05)
    size_dispersion = ((sizes - clients * q) ** 2).sum() / (clients * q * (1 - q))
    assert stats.chi2.sf(size_dispersion, rounds) > 0.001


BUDGET_BAD = {
    "delta zero": (["--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "10", "--delta", "0"], "delta must be in [1e-12, 1)"),
    "delta one": (["--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "10", "--delta", "1"], "delta must be in [1e-12, 1)"),
    # below it PRV fails on every ledger; the message names delta, not sigma
    "delta vanishing": (["--sample-rate", "0.07", "--noise-multiplier", "1.85", "--steps", "28", "--delta", "1e-300"], "delta must be in [1e-12, 1)"),
    "noise huge": (["--sample-rate", "0.07", "--noise-multiplier", "1e300", "--steps", "28", "--delta", "1e-5"], "noise multiplier must be in (0, 1e+06]"),
    "target zero": (["--sample-rate", "0.01", "--target-epsilon", "0", "--steps", "10", "--delta", "1e-5"], "--target-epsilon must be > 0"),
    "unreachable": (["--sample-rate", "1.0", "--target-epsilon", "1e-4", "--steps", "100000", "--delta", "1e-5"], "cannot be reached"),
    "rate zero": (["--sample-rate", "0", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"], "sample rate must be in (0, 1]"),
    "rate above one": (["--sample-rate", "1.5", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"], "sample rate must be in (0, 1]"),
    "noise infinite": (["--sample-rate", "0.01", "--noise-multiplier", "inf", "--steps", "10", "--delta", "1e-5"], "noise multiplier must be in (0, 1e+06]"),
    "noise vanishing": (["--sample-rate", "0.01", "--noise-multiplier", "1e-300", "--steps", "10", "--delta", "1e-5"], "too small for the PRV accountant"),
    "target infinite": (["--sample-rate", "0.01", "--target-epsilon", "inf", "--steps", "10", "--delta", "1e-5"], "target epsilon must be a finite number > 0"),
    "no clients": (["--rounds", "5", "--clients", "0", "--batch-size", "8", "--dataset-size", "1000", "--noise-multiplier", "1"], "--clients must be >= 1"),
    "nobody per round": (
        ["--rounds", "5", "--clients", "10", "--clients-per-round", "0", "--batch-size", "8", "--dataset-size", "1000", "--noise-multiplier", "1"],
        "clients per round / clients must be in (0, 1]",
    ),
    "no local epochs": (
        ["--rounds", "5", "--clients", "10", "--local-epochs", "0", "--batch-size", "8", "--dataset-size", "1000", "--noise-multiplier", "1"],
        "--local-epochs must be >= 1",
    ),
    "client-level < 2 per round": (
        ["--rounds", "5", "--clients", "10", "--clients-per-round", "1", "--batch-size", "8", "--dataset-size", "1000", "--client-noise-multiplier", "1"],
        "at least 2 clients per round",
    ),
    # a run refuses these deltas; a plan of that run must too (each client holds 130 records)
    "sample-level delta above 1/records": (
        ["--rounds", "20", "--clients", "10", "--batch-size", "16", "--dataset-size", "1300", "--noise-multiplier", "1.2", "--delta", "0.5"],
        "must be below 1/(smallest client's records) = 1/130",
    ),
    "client-level delta above 1/clients": (
        ["--rounds", "20", "--clients", "10", "--clients-per-round", "5", "--batch-size", "16", "--dataset-size", "1300",
         "--client-noise-multiplier", "1", "--delta", "0.1"],
        "must be below 1/(number of clients) = 1/10",
    ),
}


@pytest.mark.parametrize("case", list(BUDGET_BAD))
def test_budget_bad_input(case):
    args, expected = BUDGET_BAD[case]
    result = CliRunner().invoke(app, ["budget", *args])
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1


RUN_BAD = {
    "delta zero": (["--delta", "0"], "--delta must be in [1e-12, 1)"),
    "delta one": (["--delta", "1"], "--delta must be in [1e-12, 1)"),
    # both used to pass the checks and fail in every client, after the run had started
    "delta vanishing": (["--delta", "1e-300"], "--delta must be in [1e-12, 1)"),
    "noise huge": (["--noise-multiplier", "1e300"], "--noise-multiplier must be <= 1e+06"),
    "client noise huge": (["--client-dp", "--client-noise-multiplier", "1e300"], "--client-noise-multiplier must be in (0, 1e+06]"),
    "target zero": (["--target-epsilon", "0"], "--target-epsilon must be > 0"),
    "target unreachable": (["--target-epsilon", "1e-5"], "cannot be reached"),
    "client sample rate zero": (["--client-dp", "--client-sample-rate", "0"], "--client-sample-rate must be in (0, 1]"),
    "client sample rate above one": (["--client-dp", "--client-sample-rate", "2"], "--client-sample-rate must be in (0, 1]"),
    "client-level < 2 per round": (["--client-dp", "--clients", "10", "--client-sample-rate", "0.1"], "at least 2 clients per round"),
    "client delta too large": (["--client-dp", "--clients", "4", "--delta", "0.3"], "must be below"),
}


@pytest.mark.parametrize("case", list(RUN_BAD))
def test_run_privacy_bad_input(case, tmp_path):
    args, expected = RUN_BAD[case]
    result = CliRunner().invoke(app, ["run", *args, "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "runs.db").exists()


def test_noise_for_target_rejects_bad_input():
    with pytest.raises(BadInput):
        privacy.noise_for_target(-1, 0.01, 100, 1e-5)


def test_run_target_epsilon_calibrates_sigma_before_training():
    from server.runner import preflight
    from shared.config import resolve

    checked = preflight(resolve(None, dataset="digits", clients=10, rounds=5, target_epsilon=3.0))
    sigma = checked.config.noise_multiplier
    assert any("noise multiplier" in n and f"{sigma:.4f}" in n for n in checked.notes)
    mechanisms = planner.sample_level_mechanisms(checked.client_sizes, checked.config.batch_size, 1, 5)
    worst = max(privacy.epsilon([(sigma, m.sample_rate, m.steps)], checked.delta) for m in mechanisms)
    assert 3.0 - 0.05 <= worst <= 3.0


def test_run_client_target_epsilon_calibrates_z():
    from server.runner import preflight
    from shared.config import resolve

    checked = preflight(resolve(None, clients=10, rounds=8, client_dp=True, client_sample_rate=0.5, client_target_epsilon=4.0))
    z = checked.config.client_noise_multiplier
    eps = privacy.epsilon([(z, 0.5, 8)], checked.delta)
    assert 4.0 - 0.05 <= eps <= 4.0


# ------------------------------------------------------------ DP randomness is not rederivable


def _private_weights(seed):
    import torch

    from shared.training import GRAD_SAMPLE_MODE, DPSettings, train_local
    from shared.models import build_model

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 8)).astype(np.float32), rng.integers(0, 3, 64)
    torch.manual_seed(0)
    model = build_model("logreg", 8, 3)
    with warnings.catch_warnings():  # Opacus's secure_mode advice, as in clients/app.py
        warnings.simplefilter("ignore")
        train_local(model, x, y, epochs=1, batch_size=16, learning_rate=0.1, dp=DPSettings(1.0, 1.0),
                    grad_sample_mode=GRAD_SAMPLE_MODE["logreg"], seed=seed)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_seeded_dp_training_repeats_and_unseeded_draws_fresh_noise():
    import torch

    assert torch.equal(_private_weights(11), _private_weights(11))
    assert not torch.equal(_private_weights(None), _private_weights(None))


def test_private_rounds_draw_fresh_entropy_unless_reproducible_noise_is_asked():
    from clients.app import training_seed

    base = {"dp": True, "data.seed": 7}
    assert training_seed(base, 1, 0) is None
    assert training_seed({**base, "reproducible-noise": False}, 1, 0) is None
    seeded = training_seed({**base, "reproducible-noise": True}, 1, 0)
    assert seeded == training_seed({**base, "reproducible-noise": True}, 1, 0) != training_seed({**base, "reproducible-noise": True}, 2, 0)
    assert training_seed({"dp": False, "data.seed": 7}, 1, 0) is not None  # nothing secret to protect


def test_client_level_sample_and_noise_are_fresh_unless_seeded():
    from server.client_dp import ClientLevelDP

    def sample(**kw):
        sampler = ParticipatingClients(inner=None, node_of={i: i for i in range(20)}, fraction=0.5, seed=3, mode="poisson", **kw)
        return [sampler.participants(r) for r in range(1, 6)]

    assert sample() == sample()
    assert sample(secret_sampling=True) != sample(secret_sampling=True)  # equal with probability 2^-100

    def noise(seed):
        dp = ClientLevelDP(inner=None, noise_multiplier=1.0, clip=1.0, sample_rate=0.5, num_clients=8, seed=seed)
        dp.current = {"w": np.zeros(50, dtype=np.float32)}
        return dp.noised_mean_update(1, [])["w"]

    assert np.array_equal(noise(0), noise(0))
    assert not np.array_equal(noise(None), noise(None))


def test_reproducible_noise_is_a_run_setting():
    from shared.config import resolve

    assert resolve(None).reproducible_noise is False
    assert resolve(None, reproducible_noise=True).reproducible_noise is True
    result = CliRunner().invoke(app, ["run", "--help"])
    assert "--reproducible-noise" in result.stdout


def test_fedprox_proximal_term_acts_under_dp():
    # Opacus rebuilds p.grad from per-sample gradients; the proximal pull must survive it.
    import torch

    from shared.training import GRAD_SAMPLE_MODE, DPSettings, train_local
    from shared.models import build_model

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(96, 8)).astype(np.float32), rng.integers(0, 3, 96)

    def drift(mu, dp):
        torch.manual_seed(0)
        model = build_model("logreg", 8, 3)
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train_local(model, x, y, epochs=3, batch_size=16, learning_rate=0.5, dp=dp, proximal_mu=mu,
                        grad_sample_mode=GRAD_SAMPLE_MODE["logreg"], seed=4)
        return float((torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm())

    for dp in (None, DPSettings(0.5, 1.0)):
        assert drift(1.0, dp) < 0.8 * drift(0.0, dp), dp  # pulled towards the global model


def test_restoring_a_ledger_never_lowers_a_nodes_epsilon():
    from clients.app import merged_ledger

    held = [(0.6, 0.1, 100)]  # spent more, in fewer steps, than the store's copy says
    restored = [(5.0, 0.1, 101)]
    now = merged_ledger(held, restored)
    assert privacy.epsilon(now, 1e-5) >= max(privacy.epsilon(held, 1e-5), privacy.epsilon(restored, 1e-5))
    assert sorted(now) == sorted(held + restored)
    # A node holding a prefix of the stored ledger, or nothing (a fresh node), ends with the stored one.
    stored = [(1.0, 0.1, 9), (1.0, 0.1, 9), (1.0, 0.1, 9)]
    assert merged_ledger(stored[:2], stored) == stored
    assert merged_ledger([], stored) == stored


def test_a_resumed_run_that_fails_at_once_still_reports_the_interrupted_spend(tmp_path):
    from shared.summary import summarize
    from shared.store import RunStore

    store = RunStore(tmp_path)
    store.create_run("r", {"dp": True})
    store.update_run("r", delta=1e-5)
    spend = lambda rnd: [{"client": 0, "num_examples": 100, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10}]  # noqa: E731
    one = privacy.epsilon([(1.0, 0.1, 10)], 1e-5)
    store.commit_spend("r", 1, spend(1), {"epsilon": one})
    store.record_round("r", 1, {"accuracy": 0.5, "model_sha256": "x"}, [])
    store.commit_spend("r", 2, spend(2), {"epsilon": privacy.epsilon([(1.0, 0.1, 20)], 1e-5)})  # then killed
    store.set_aside_interrupted("r", after_round=1)  # --resume, which then fails at once
    store.finish_run("r", "failed", "boom")
    summary = summarize(store, "r")
    assert summary["epsilon"] == pytest.approx(privacy.epsilon([(1.0, 0.1, 20)], 1e-5)) and summary["epsilon"] > one
    assert summary["epsilon_rdp"] == pytest.approx(privacy.epsilon([(1.0, 0.1, 20)], 1e-5, "rdp"))


def test_client_level_epsilon_counts_a_round_set_aside_on_resume(tmp_path):
    from shared.summary import summarize
    from shared.store import RunStore

    store = RunStore(tmp_path)
    store.create_run("r", {"dp": False, "client-dp": True, "client-noise-multiplier": 1.0, "client-sample-rate": 0.5, "fraction": 1.0})
    store.update_run("r", delta=1e-5)
    releases = lambda t: privacy.epsilon([(1.0, 0.5, t)], 1e-5)  # noqa: E731
    for rnd in (1, 2):
        store.commit_spend("r", rnd, [], {"client_epsilon": releases(rnd)})
        store.record_round("r", rnd, {"accuracy": 0.5, "model_sha256": "x"}, [])
    store.commit_spend("r", 3, [], {"client_epsilon": releases(3)})  # its noised model may be out; then killed
    store.set_aside_interrupted("r", after_round=2)
    assert store.interrupted_releases("r") == 1
    assert summarize(store, "r")["client_epsilon"] == pytest.approx(releases(3))  # not releases(2)
    assert summarize(store, "r")["client_epsilon_rdp"] == pytest.approx(privacy.epsilon([(1.0, 0.5, 3)], 1e-5, "rdp"))
    from shared.summary import describe_run

    assert describe_run(store, "r")["privacy"]["units"][0]["releases"] == 3  # beside the epsilon of 3 releases


def test_a_client_whose_reply_never_came_still_counts_that_rounds_spend(tmp_path):
    from types import SimpleNamespace

    from server.federation import ServerJob, _count_unanswered
    from shared.summary import summarize
    from shared.config import RunConfig
    from shared.store import RunStore

    store = RunStore(tmp_path)
    config = RunConfig(dataset="digits", clients=2, rounds=3, batch_size=16, local_epochs=2, noise_multiplier=1.1)
    store.create_run("r", {"dp": True})
    store.update_run("r", delta=1e-5)
    store.record_clients("r", [{"client": c, "num_train": 100, "num_val": 10, "label_histogram": [50, 50]} for c in (0, 1)])
    job = ServerJob(run_id="r", config=config, delta=1e-5, runs_dir=str(tmp_path), model_name="logreg")
    one = (1.1, 1 / 7, 14)  # ceil(100 / 16) = 7 batches, two epochs
    store.commit_spend("r", 1, [{"client": c, "num_examples": 100, "noise_multiplier": 1.1, "sample_rate": 1 / 7, "steps": 14} for c in (0, 1)],
                       {"epsilon": privacy.epsilon([one], 1e-5)})
    sent = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in (11, 12)]
    latest = {0: (privacy.epsilon([one], 1e-5), 0.0), 1: (privacy.epsilon([one], 1e-5), 0.0)}
    # Round 2: client 0 replies, client 1's reply never comes.
    _count_unanswered(store, job, 2, sent, [SimpleNamespace(metadata=SimpleNamespace(src_node_id=11))], {11: 0, 12: 1}, latest)
    assert store.interrupted_spend("r") == {1: [one]}  # its last recorded mechanism
    assert latest[1] == (pytest.approx(privacy.epsilon([one, one], 1e-5)), pytest.approx(privacy.epsilon([one, one], 1e-5, "rdp")))
    assert latest[0][0] == privacy.epsilon([one], 1e-5)  # untouched: its reply will say
    store.finish_run("r", "failed", "boom")
    assert summarize(store, "r")["epsilon"] == pytest.approx(privacy.epsilon([one, one], 1e-5))
    # A client that never replied at all is counted with the planned mechanism.
    store2 = RunStore(tmp_path / "b")
    store2.create_run("r", {"dp": True})
    store2.record_clients("r", [{"client": c, "num_train": 100, "num_val": 10, "label_histogram": [50, 50]} for c in (0, 1)])
    _count_unanswered(store2, ServerJob(run_id="r", config=config, delta=1e-5, runs_dir=str(tmp_path / "b"), model_name="logreg"),
                      1, sent, [], {11: 0, 12: 1}, {})
    assert store2.interrupted_spend("r") == {0: [one], 1: [one]}


def test_an_unbounded_prv_epsilon_reports_the_rdp_bound_not_null(tmp_path):
    from shared.summary import describe_run, summarize
    from shared.store import RunStore

    huge = [(0.5, 1.0, 1000)]  # PRV returns inf here (after about a minute), RDP a finite bound
    store = RunStore(tmp_path)
    store.create_run("r", {"dp": True})
    store.update_run("r", delta=1e-5)
    rdp = privacy.epsilon(huge, 1e-5, "rdp")
    client = {"client": 0, "num_examples": 10, "epsilon": float("inf"), "epsilon_rdp": rdp, "noise_multiplier": 1.0,
              "sample_rate": 0.5, "steps": 1000}
    store.commit_spend("r", 1, [client], {"epsilon": float("inf"), "epsilon_rdp": rdp})
    summary = summarize(store, "r")
    assert summary["epsilon"] == summary["epsilon_rdp"] == rdp
    assert summary["accountant"] == "rdp" and "RDP bound is reported" in summary["notes"][-1]
    # show: every epsilon is the RDP bound too, labelled so; none is null (which reads as no DP)
    shown = describe_run(store, "r")
    assert shown["privacy"]["accountant"] == "rdp" and shown["privacy"]["epsilon"] == rdp
    assert shown["rounds"][0]["epsilon"] == shown["rounds"][0]["clients"][0]["epsilon"] == rdp


def test_a_reply_claiming_another_clients_id_is_dropped():
    from types import SimpleNamespace

    from server.federation import _claims_its_own_id
    from shared.protocol import METRICS_KEY, PARTITION_ID

    def reply(node, pid):
        return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), content={METRICS_KEY: {PARTITION_ID: pid}})

    node_client = {11: 0, 12: 1}
    assert _claims_its_own_id(reply(11, 0), node_client)
    assert not _claims_its_own_id(reply(12, 0), node_client)  # node of client 1 files as client 0
    assert not _claims_its_own_id(reply(99, 0), node_client)  # a node nobody described


def test_prv_is_not_run_past_its_limit_and_says_infinity():
    # sigma 0.01 once ran Opacus's PRV for minutes into gigabytes.
    ledger = [(0.01, 0.01, 10)]
    assert privacy.epsilon(ledger, 1e-5, "rdp") > privacy.PRV_LIMIT
    assert privacy.epsilon(ledger, 1e-5) == float("inf")
    from shared.planner import raw_mechanism

    report = raw_mechanism(0.01, 10, 1e-5, noise_multiplier=0.01)
    assert report["epsilon_prv"] == float("inf") and "epsilon_rdp is the bound" in report["note"]


@pytest.mark.parametrize("signame, reason", [("SIGINT", "Ctrl-C"), ("SIGTERM", "SIGTERM")])
def test_ctrl_c_or_sigterm_asks_the_round_loop_to_stop_instead_of_hanging(signame, reason, tmp_path):
    import signal

    from server.federation import ServerJob
    from server.runner import _stop_on_interrupt
    from shared.config import RunConfig
    from shared.store import RunStore

    signum = getattr(signal, signame)
    job = ServerJob(run_id="r", config=RunConfig(), delta=1e-5, runs_dir=str(tmp_path), model_name="logreg")
    previous = _stop_on_interrupt(job, RunStore(tmp_path))
    try:
        # No KeyboardInterrupt, and for SIGTERM pytest would die here without the handler.
        signal.raise_signal(signum)
        assert job.cancel.is_set() and job.cancel_reason == reason
    finally:
        for restored, handler in previous.items():
            signal.signal(restored, handler)
    assert signal.getsignal(signum) is previous[signum]


def test_a_resume_refused_for_missing_keys_leaves_the_run_as_it_was(tmp_path):
    from server.runner import prepare_resume
    from shared.config import RunConfig
    from shared.errors import BadInput
    from shared.store import RunStore

    store = RunStore(tmp_path)
    store.create_run("r", RunConfig(dataset="digits", clients=3).to_dict(), info={"model": "logreg", "keys_dir": str(tmp_path / "gone")})
    store.commit_spend("r", 1, [{"client": 0, "num_examples": 10, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10}], {"epsilon": 1.0})
    store.finish_run("r", "failed", "boom")
    with pytest.raises(BadInput):
        prepare_resume("r", tmp_path)
    record = store.get_run("r")
    assert (record.status, record.error) == ("failed", "boom")
    assert store.interrupted_spend("r") == {}  # nothing set aside either


def test_a_ctrl_c_after_the_last_round_leaves_the_run_completed(tmp_path, monkeypatch):
    import os
    import signal

    import flwr.simulation
    import server.app
    from server import runner
    from server.federation import ServerJob
    from shared.config import RunConfig
    from shared.store import RunStore

    config = RunConfig(dataset="digits", clients=2, rounds=1, encrypt=False, dp=False).validate()
    RunStore(tmp_path).create_run("r", config.to_dict(), info={})
    job = ServerJob(run_id="r", config=config, delta=1e-5, runs_dir=str(tmp_path), model_name="logreg")

    def finished_then_interrupted(**kwargs):
        job.result = {"status": "completed", "accuracy": 0.9, "loss": 0.1, "rounds": 1}
        os.kill(os.getpid(), signal.SIGINT)  # while Flower and Ray shut down

    monkeypatch.setattr(flwr.simulation, "run_simulation", finished_then_interrupted)
    monkeypatch.setattr(server.app, "make_server_app", lambda job: None)
    monkeypatch.setattr(runner, "_start_ray", lambda backend_config: None)
    outcome = runner.run_simulation_job(job, None)
    assert job.cancel.is_set() and (outcome.status, outcome.error) == ("completed", None)


def test_an_unbounded_epsilon_goes_into_the_audit_log_as_text(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from server.federation import _plain_number
    from shared.auditlog import AuditLog

    log = AuditLog(tmp_path / "audit.jsonl", Ed25519PrivateKey.generate(), "r")
    entry = log.append("round", {"epsilon": _plain_number(float("inf")), "client_epsilon": _plain_number(None), "other": _plain_number(2.5)})
    assert entry["payload"] == {"epsilon": "inf", "client_epsilon": None, "other": 2.5}


def test_a_node_refuses_a_replayed_train_instruction_and_spends_nothing(tmp_path, monkeypatch):
    from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from clients.app import app, read_ledger
    from server.federation import _config_record
    from server.runner import prepare_run
    from shared.config import resolve
    from shared.models import initial_model
    from shared.protocol import ARRAYS_KEY, CONFIG_KEY

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    job = prepare_run(resolve(None, clients=3, rounds=2, seed=2, model="logreg", encrypt=False), tmp_path)
    config = _config_record(job)
    weights = {k: Array(v.detach().numpy()) for k, v in initial_model("logreg", 64, 10, 8, 2).state_dict().items()}
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})

    def instruction(round_):
        config["server-round"] = round_
        return Message(RecordDict({CONFIG_KEY: config, ARRAYS_KEY: ArrayRecord(weights)}), dst_node_id=1, message_type="train")

    app(instruction(1), context)
    spent = read_ledger(context)
    with pytest.raises(RuntimeError, match="refusing to train round 1 again"):
        app(instruction(1), context)  # the same round's instruction, replayed
    assert read_ledger(context) == spent
    app(instruction(2), context)
    assert len(read_ledger(context)) == 2


def test_budget_flags_win_over_the_config_they_override(tmp_path):
    from server.budget import plan_budget

    config = tmp_path / "run.toml"
    config.write_text('dataset = "digits"\nclients = 10\nrounds = 5\ntarget-epsilon = 3.0\n')
    planned = plan_budget(config=config)
    assert planned["sample_level"]["target_epsilon"] == 3.0
    given = plan_budget(config=config, noise_multiplier=1.3)
    assert given["sample_level"]["noise_multiplier"] == 1.3 and "target_epsilon" not in given["sample_level"]
    assert given["sample_level"]["epsilon_prv"] != pytest.approx(3.0, abs=0.05)
    assert plan_budget(config=config, rounds=10)["rounds"] == 10


@pytest.mark.parametrize("kwargs, message", [
    ({"clients": 20}, "--clients: with --config the clients and their sizes come from the config's data"),
    ({"dataset_size": 500}, "--dataset-size: with --config"),
])
def test_budget_refuses_flags_a_config_decides(kwargs, message, tmp_path):
    from server.budget import plan_budget

    config = tmp_path / "run.toml"
    config.write_text('dataset = "digits"\nclients = 10\n')
    with pytest.raises(BadInput, match=re.escape(message)):
        plan_budget(config=config, noise_multiplier=1.0, **kwargs)


def test_budget_plans_client_level_dp_for_a_config_without_it(tmp_path):
    from server.budget import plan_budget

    config = tmp_path / "run.toml"
    config.write_text('dataset = "digits"\nclients = 10\nrounds = 5\n')
    planned = plan_budget(config=config, clients_per_round=5, client_noise_multiplier=1.0)["client_level"]
    assert (planned["sample_rate"], planned["steps"]) == (0.5, 5)
    assert planned["epsilon_prv"] == pytest.approx(privacy.epsilon([(1.0, 0.5, 5)], planned["delta"]))
    # the flag the user gave is the one named, not one they never typed
    with pytest.raises(BadInput, match="--clients-per-round plans client-level DP"):
        plan_budget(config=config, clients_per_round=5)


def test_budget_refuses_run_shape_flags_with_a_raw_mechanism():
    result = CliRunner().invoke(app, ["budget", "--sample-rate", "0.1", "--steps", "10", "--delta", "1e-5", "--noise-multiplier", "1", "--rounds", "5"])
    assert result.exit_code == 2 and "--rounds describes a run shape" in result.stderr, result.output
    result = CliRunner().invoke(app, ["budget", "--steps", "10", "--rounds", "5", "--clients", "2", "--batch-size", "8", "--dataset-size", "100", "--noise-multiplier", "1"])
    assert result.exit_code == 2 and "--steps goes with --sample-rate" in result.stderr, result.output


def test_a_round_without_a_test_split_still_counts_and_the_default_dataset_is_named(tmp_path):
    from shared.store import RunStore
    from shared.summary import summarize

    store = RunStore(tmp_path)
    store.create_run("r", {"dp": False, "dataset": None, "test-fraction": 0.0})
    store.commit_spend("r", 1, [], {})
    assert summarize(store, "r")["rounds"] == 0  # in flight: no model yet
    store.record_round("r", 1, {"accuracy": None, "model_sha256": "x"}, [])
    summary = summarize(store, "r")
    assert (summary["rounds"], summary["accuracy"], summary["dataset"]) == (1, None, "digits")


def test_a_budget_plan_without_noise_says_it_claims_no_epsilon(tmp_path):
    from server.budget import plan_budget

    config = tmp_path / "run.toml"
    config.write_text('dataset = "digits"\nclients = 10\nrounds = 5\n')  # sample-level DP by default, no client-level
    planned = plan_budget(config=config)
    assert "epsilon_prv" in planned["sample_level"]
    assert "epsilon_prv" not in planned["client_level"] and "no client-level noise given" in planned["client_level"]["note"]
    shape_only = plan_budget(rounds=5, clients=10, batch_size=32, dataset_size=1000)
    assert "no sample-level noise given" in shape_only["sample_level"]["note"]


# ------------------------------------------------------------ the loader is the planned mechanism


@pytest.mark.parametrize("records, batch", [(372, 4), (396, 4), (50, 1), (431, 32)])
def test_dp_training_spends_exactly_the_planned_rate_and_steps(records, batch):
    # int(1/(1/93)) == 92: Opacus's own loader ran one step fewer than 1/q for such q.
    from shared.training import DPSettings, train_local
    from shared.models import build_model

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(records, 8)).astype(np.float32), rng.integers(0, 3, records)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_local(build_model("logreg", 8, 3), x, y, epochs=2, batch_size=batch, learning_rate=0.1,
                             dp=DPSettings(1.0, 1.0), grad_sample_mode="ew", seed=1)
    _, rate, steps = planner.planned_spend(records, batch, 2, 1.0)
    assert (result.sample_rate, result.steps) == (rate, steps) == (1 / -(-records // batch), 2 * -(-records // batch))


def test_poisson_loader_draws_in_float64_and_includes_each_record_at_rate_q(monkeypatch):
    # float32 draws include a record with probability ceil(float32(q) 2^24)/2^24 > q.
    import torch
    from torch.utils.data import TensorDataset

    from shared.training import poisson_loader

    dtypes = []
    real_rand = torch.rand

    def recording_rand(*args, **kwargs):
        dtypes.append(kwargs.get("dtype"))
        return real_rand(*args, **kwargs)

    monkeypatch.setattr(torch, "rand", recording_rand)
    loader = poisson_loader(TensorDataset(torch.arange(2000.0)), 93, torch.Generator().manual_seed(0))
    assert loader.sample_rate == 1 / 93 and len(loader) == 93
    counts = np.zeros(2000)
    batches = 0
    for _ in range(20):
        for (xb,) in loader:
            counts[xb.long().numpy()] += 1
            batches += 1
    assert batches == 20 * 93 and set(dtypes) == {torch.float64}
    trials = 20 * 93 * 2000
    assert abs(counts.sum() - trials / 93) < 5 * np.sqrt(trials / 93)


def test_the_server_raises_a_clients_epsilon_to_the_spend_it_has_on_record():
    from server.federation import raise_to_kept_ledger

    kept = [(1.0, 0.1, 10), (1.0, 0.1, 10)]  # two earlier rounds, as stored in runs.db
    this_round = {"refused": 0, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10}
    full = kept + [(1.0, 0.1, 10)]
    honest = {**this_round, "epsilon": privacy.epsilon(full, 1e-5), "epsilon_rdp": privacy.epsilon(full, 1e-5, "rdp")}
    assert not raise_to_kept_ledger(dict(honest), kept, 30, 1e-5)
    assert not raise_to_kept_ledger(dict(honest), kept, None, 1e-5)  # no step count: checked by RDP, and fine
    # A client whose Context.state was lost counts from zero: one round's epsilon.
    one = [(1.0, 0.1, 10)]
    forgetful = {**this_round, "epsilon": privacy.epsilon(one, 1e-5), "epsilon_rdp": privacy.epsilon(one, 1e-5, "rdp")}
    assert raise_to_kept_ledger(forgetful, kept, 10, 1e-5)
    assert forgetful["epsilon"] == honest["epsilon"] and forgetful["epsilon_rdp"] == honest["epsilon_rdp"]
    # A refusal adds nothing this round; the earlier spend still stands.
    refused = {"refused": 1, "epsilon": 0.0, "epsilon_rdp": 0.0}
    assert raise_to_kept_ledger(refused, kept, None, 1e-5) and refused["epsilon"] == privacy.epsilon(kept, 1e-5)
