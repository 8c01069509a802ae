"""End to end through the real CLI, Flower Simulation Engine and Opacus:
3 clients, 2 rounds, private and non-private (session fixtures in conftest)."""

import json
import sqlite3
import tomllib
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant
from safetensors.numpy import load_file

from tests.conftest import run_cli, run_json

pytestmark = pytest.mark.simulation


def _db(run: dict) -> sqlite3.Connection:
    conn = sqlite3.connect(Path(run["run_dir"]).parent / "runs.db")
    conn.row_factory = sqlite3.Row
    return conn


@pytest.mark.parametrize("fixture", ["private_run", "nonprivate_run"])
def test_run_store_holds_a_complete_run(fixture, request):
    run = request.getfixturevalue(fixture)
    assert run["status"] == "completed" and run["rounds"] == 2
    assert 0.3 < run["accuracy"] <= 1.0
    run_dir = Path(run["run_dir"])
    config = tomllib.loads((run_dir / "config.toml").read_text())
    assert config["clients"] == 3 and config["rounds"] == 2 and config["dp"] == (fixture == "private_run")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001.safetensors", "round-0002.safetensors"]
    final = load_file(run_dir / "model.safetensors")
    last_checkpoint = load_file(run_dir / "checkpoints" / "round-0002.safetensors")
    assert final.keys() == last_checkpoint.keys()
    assert all((final[k] == last_checkpoint[k]).all() for k in final)
    with _db(run) as conn:
        row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run["run_id"],)).fetchone()
        assert row["status"] == "completed" and row["finished_at"] >= row["created_at"]
        assert json.loads(row["config"])["rounds"] == 2
        rounds = conn.execute("SELECT * FROM rounds WHERE run_id = ? ORDER BY round", (run["run_id"],)).fetchall()
        assert [r["round"] for r in rounds] == [1, 2]
        assert all(r["accuracy"] is not None and r["model_sha256"] for r in rounds)
        clients = conn.execute("SELECT * FROM client_rounds WHERE run_id = ?", (run["run_id"],)).fetchall()
        assert len(clients) == 6  # 3 clients x 2 rounds
    # the client table was reported: sizes and label histograms
    assert [c["client"] for c in run["clients"]] == [0, 1, 2]
    assert all(sum(c["label_histogram"]) == c["num_train"] for c in run["clients"])
    assert run["clients_trained"] == 3


def test_private_json_reports_epsilon_and_delta(private_run, nonprivate_run):
    assert private_run["epsilon"] > 0 and private_run["delta"] == 1e-5
    assert nonprivate_run["epsilon"] is None and nonprivate_run["delta"] is None


def test_epsilon_is_cumulative_and_matches_a_fresh_accountant(private_run, e2e_dir):
    shown = run_json("show", private_run["run_id"], runs_dir=e2e_dir)
    assert set(shown) >= {"run_id", "config", "rounds"}
    histories: dict[int, list] = {}
    previous: dict[int, float] = {}
    for rnd in shown["rounds"]:
        assert set(rnd) >= {"round", "accuracy", "loss", "epsilon", "clients"}
        for client in rnd["clients"]:
            assert set(client) >= {"client", "epsilon", "num_examples"}
            cid = client["client"]
            histories.setdefault(cid, []).append((client["noise_multiplier"], client["sample_rate"], client["steps"]))
            # A fresh Opacus accountant fed this client's whole history so far.
            accountant = PRVAccountant()
            for sigma, q, steps in histories[cid]:
                for _ in range(steps):
                    accountant.step(noise_multiplier=sigma, sample_rate=q)
            assert client["epsilon"] == pytest.approx(accountant.get_epsilon(delta=shown["delta"]), rel=1e-6)
            assert client["epsilon"] > previous.get(cid, 0.0)  # strictly rising
            previous[cid] = client["epsilon"]
        assert rnd["epsilon"] == pytest.approx(max(previous.values()))
    assert private_run["epsilon"] == pytest.approx(max(previous.values()))
    assert shown["privacy"]["rounds_trained"] == {"0": [1, 2], "1": [1, 2], "2": [1, 2]}
    # Every client's own ledger agreed with the server's record: nothing was raised.
    assert not [n for n in private_run["notes"] if "below the spend the server has on record" in n]


def test_same_seed_same_accuracy(nonprivate_run, nonprivate_rerun):
    assert nonprivate_rerun["run_id"] != nonprivate_run["run_id"]
    assert nonprivate_rerun["accuracy"] == nonprivate_run["accuracy"]
    first, second = (load_file(str(Path(r["run_dir"]) / "model.safetensors")) for r in (nonprivate_run, nonprivate_rerun))
    assert all((first[k] == second[k]).all() for k in first)


def test_private_run_noise_is_not_the_seeds(private_run, private_rerun):
    # The same seed and ledger give the same epsilon. But a default private run draws its
    # noise and Poisson batches from fresh OS entropy: the server, which knows the seed,
    # replaying the run with seed-derived randomness does not get the same model.
    assert private_rerun["epsilon"] == private_run["epsilon"]
    configs = [tomllib.loads((Path(r["run_dir"]) / "config.toml").read_text()) for r in (private_run, private_rerun)]
    assert [c["reproducible-noise"] for c in configs] == [False, True]
    first, second = (load_file(str(Path(r["run_dir"]) / "model.safetensors")) for r in (private_run, private_rerun))
    assert any((first[k] != second[k]).any() for k in first)


def test_runs_lists_every_run(private_run, nonprivate_run, e2e_dir):
    listed = run_json("runs", runs_dir=e2e_dir)["runs"]
    ids = {r["run_id"] for r in listed}
    assert {private_run["run_id"], nonprivate_run["run_id"]} <= ids
    by_id = {r["run_id"]: r for r in listed}
    assert (by_id[private_run["run_id"]]["dataset"], by_id[private_run["run_id"]]["dp"]) == ("digits", True)
    assert by_id[nonprivate_run["run_id"]]["dp"] is False
    table = run_cli("runs", runs_dir=e2e_dir)
    assert table.returncode == 0 and private_run["run_id"] in table.stdout and "digits" in table.stdout


def test_show_table_lists_the_settings_that_acted(private_run, e2e_dir):
    text = run_cli("show", private_run["run_id"], runs_dir=e2e_dir).stdout
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in text.splitlines() if line.count("│") == 3}
    assert rows["dataset"] == "digits" and rows["delta"] == "1e-05" and rows["noise-multiplier"] != "-"
    assert rows["model"] == "logreg" == run_json("show", private_run["run_id"], runs_dir=e2e_dir)["model"]
    assert not {"samples", "features", "classes", "proximal-mu", "server-lr", "client-clip", "attack", "data"} & set(rows)


def test_settings_in_use_keeps_what_each_choice_switches_on():
    from shared.config import RunConfig
    from shared.summary import settings_in_use

    synthetic = RunConfig(dataset="synthetic", strategy="fedprox", dp=False, client_dp=True, malicious=1).to_dict()
    shown = settings_in_use(synthetic, None)
    assert {"samples", "features", "classes", "proximal-mu", "client-clip", "attack"} <= set(shown)
    assert not {"server-lr", "noise-multiplier", "max-grad-norm", "target-epsilon"} & set(shown)
    from_file = settings_in_use(RunConfig(data="x.csv", label="y").to_dict(), 1e-4)
    assert from_file["data"] == "x.csv" and from_file["label"] == "y" and "dataset" not in from_file
    assert from_file["delta"] == 1e-4
    picked = settings_in_use(RunConfig(dataset="digits").to_dict(), 1e-5, "logreg")
    assert picked["model"] == "logreg"  # the dataset's choice, not "-"
    assert settings_in_use(RunConfig(dataset="digits", model="cnn").to_dict(), 1e-5, "cnn")["model"] == "cnn"
