"""Byzantine clients, robust aggregation and outlier flags on real simulations."""

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from clients.attacks import corrupt_update, flip_labels
from server.outliers import score_updates
from shared.store import RunStore

ROUNDS = 7
SHAPE = dict(clients=10, rounds=ROUNDS, dp=False, seed=0)
ATTACKED = dict(SHAPE, malicious=3, attack="sign-flip")


@pytest.fixture(scope="session")
def byzantine_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("byzantine")


def _run(runs_dir, **settings) -> dict:
    # In this process, not through the CLI (whose runs other tests cover): four runs
    # would pay the CLI's imports four times in a suite that must stay under 10 minutes.
    from clients.app import app_for_job
    from server.runner import prepare_run, run_simulation_job
    from shared.config import resolve

    job = prepare_run(resolve(None, **settings), runs_dir)
    outcome = run_simulation_job(job, app_for_job(job))
    assert outcome.status == "completed", outcome.error
    return outcome.summary


@pytest.fixture(scope="session")
def byzantine_runs(byzantine_dir):
    return {
        "clean": _run(byzantine_dir, **SHAPE),
        "fedavg": _run(byzantine_dir, **ATTACKED, aggregator="fedavg"),
        "median": _run(byzantine_dir, **ATTACKED, aggregator="median"),
        "krum": _run(byzantine_dir, **ATTACKED, aggregator="krum"),
    }


@pytest.mark.simulation
def test_sign_flip_breaks_fedavg_but_not_median_or_krum(byzantine_runs):
    clean = byzantine_runs["clean"]["accuracy"]
    assert clean > 0.9
    assert byzantine_runs["fedavg"]["accuracy"] < clean - 0.3  # loses clearly
    for robust in ("median", "krum"):
        assert byzantine_runs[robust]["accuracy"] >= clean - 0.05, robust


@pytest.mark.simulation
def test_outlier_detection_flags_the_attackers(byzantine_runs, byzantine_dir):
    store = RunStore(byzantine_dir)
    for name in ("fedavg", "median", "krum"):
        run_id = byzantine_runs[name]["run_id"]
        truth = set(store.get_run(run_id).info["malicious_clients"])
        assert len(truth) == 3
        flags = store.get_flags(run_id)
        assert {f["round"] for f in flags} == set(range(1, ROUNDS + 1))
        flagged = {f["client"] for f in flags if f["flagged"]}
        assert len(flagged & truth) >= 2, (name, flagged, truth)
    clean_flags = store.get_flags(byzantine_runs["clean"]["run_id"])
    assert sum(f["flagged"] for f in clean_flags) <= len(clean_flags) * 0.05


def test_attacks_change_what_is_sent():
    g = {"w": np.zeros(4, dtype=np.float32)}
    new = {"w": np.ones(4, dtype=np.float32)}
    assert np.allclose(corrupt_update("sign-flip", g, new, 0)["w"], -4)
    assert np.allclose(corrupt_update("scale", g, new, 0)["w"], 10)
    noisy = corrupt_update("gaussian", g, new, 0)["w"]
    assert noisy.std() > 0.1 and not np.allclose(noisy, 1)
    assert corrupt_update("label-flip", g, new, 0) is new
    assert flip_labels(np.array([0, 1, 9]), 10).tolist() == [9, 8, 0]


def test_scores_flag_a_flipped_update_among_honest_ones():
    rng = np.random.default_rng(0)
    g = {"w": np.zeros(50)}
    honest = {i: {"w": np.ones(50) + 0.1 * rng.normal(size=50)} for i in range(7)}
    honest[7] = {"w": -4 * np.ones(50)}
    scores = {s["client"]: s for s in score_updates(g, honest)}
    assert scores[7]["flagged"] and not any(scores[i]["flagged"] for i in range(7))
    assert scores[7]["norm"] > 3 * scores[0]["norm"]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--aggregator", "mean-ish"], "unknown aggregator"),
        (["--attack", "bribe", "--malicious", "1"], "unknown attack"),
        (["--malicious", "10", "--clients", "10"], "--malicious must be in"),
        (["--aggregator", "bulyan", "--malicious", "2", "--clients", "10"], "bulyan needs at least"),
        (["--aggregator", "krum", "--strategy", "fedadam"], "cannot be combined"),
    ],
)
def test_byzantine_bad_input(args, expected, tmp_path):
    result = CliRunner().invoke(app, ["run", *args, "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2 and expected in result.stderr


@pytest.mark.simulation
def test_audit_shows_flags_against_the_ground_truth(byzantine_runs, byzantine_dir):
    from audit.report import outlier_flags

    flags = outlier_flags(RunStore(byzantine_dir), byzantine_runs["median"]["run_id"])
    assert len(flags["malicious_clients"]) == 3
    assert flags["flagged_malicious"] >= 2
    assert flags["flagged_malicious"] + flags["flagged_honest"] == len(flags["flagged_clients"])
