"""Privacy budgets on real Flower simulations: client-level DP, enforcement, and a
SIGKILL mid-round followed by --resume."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy import stats

from shared.store import RunStore
from tests.conftest import ROOT, run_json

pytestmark = pytest.mark.simulation


def _prv(history, delta):
    accountant = PRVAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta=delta)


@pytest.fixture(scope="session")
def budget_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("budget-runs")


@pytest.fixture(scope="session")
def client_level_run(budget_dir):
    return run_json(
        "run", "--clients", "10", "--rounds", "6", "--seed", "2", "--no-dp", "--client-dp",
        "--client-noise-multiplier", "0.7", "--client-clip", "0.5", "--client-sample-rate", "0.4", runs_dir=budget_dir,
    )


@pytest.fixture(scope="session")
def capped_run(budget_dir):
    return run_json("run", "--clients", "4", "--rounds", "12", "--seed", "4", "--max-epsilon", "2.0", runs_dir=budget_dir)


def test_client_level_epsilon_matches_the_accountant(client_level_run, budget_dir):
    run = client_level_run
    assert run["status"] == "completed" and run["epsilon"] is None
    shown = run_json("show", run["run_id"], runs_dir=budget_dir)
    delta = shown["delta"]
    assert delta < 1 / 10
    for rnd in shown["rounds"]:
        T = rnd["round"]
        assert rnd["client_epsilon"] == pytest.approx(_prv([(0.7, 0.4, T)], delta), rel=1e-6)
    rdp = RDPAccountant()
    rdp.history = [(0.7, 0.4, 6)]
    assert run["client_epsilon"] == pytest.approx(_prv([(0.7, 0.4, 6)], delta), rel=1e-6)
    assert run["client_epsilon_rdp"] == pytest.approx(rdp.get_epsilon(delta=delta), rel=1e-6)
    units = {u["unit"].split(" ")[0]: u for u in shown["privacy"]["units"]}
    assert set(units) == {"client"}
    assert units["client"]["releases"] == 6 and units["client"]["sample_rate"] == 0.4


def test_client_participation_is_poisson(client_level_run, budget_dir):
    conn = sqlite3.connect(budget_dir / "runs.db")
    rows = conn.execute("SELECT round, client FROM client_rounds WHERE run_id = ? AND num_examples > 0", (client_level_run["run_id"],)).fetchall()
    sizes = [sum(1 for r, _ in rows if r == rnd) for rnd in range(1, 7)]
    counts = np.bincount([c for _, c in rows], minlength=10)
    # 60 independent Bernoulli(0.4) draws: the total fits Binomial(60, 0.4) ...
    assert stats.binomtest(int(counts.sum()), 60, 0.4).pvalue > 0.001
    # ... each client's count fits Binomial(6, 0.4), and round sizes vary.
    dispersion = ((counts - 6 * 0.4) ** 2).sum() / (6 * 0.4 * 0.6)
    assert stats.chi2.sf(dispersion, 10) > 0.001
    assert len(set(sizes)) > 1


def test_enforcement_stops_with_budget_exhausted(capped_run, budget_dir):
    run = capped_run
    assert run["status"] == "budget-exhausted"
    assert 0 < run["epsilon"] <= 2.0 and run["budget_left"] == pytest.approx(2.0 - run["epsilon"])
    shown = run_json("show", run["run_id"], runs_dir=budget_dir)
    for rnd in shown["rounds"]:
        for client in rnd["clients"]:
            assert client["epsilon"] <= 2.0
    refused = shown["privacy"]["units"][0]["rounds_refused"]
    assert set(refused) == {"0", "1", "2", "3"}  # every client refused before the run ended
    assert len(shown["rounds"]) < 12


# ----------------------------------------------------------------------------- crash


# Reproducible noise, so the resumed run can be compared with an uninterrupted one.
CRASH = ("run", "--clients", "3", "--rounds", "6", "--local-epochs", "3", "--seed", "5", "--model", "logreg", "--reproducible-noise")


def _ledger(db: Path, run_id: str):
    conn = sqlite3.connect(db)
    return conn.execute(
        "SELECT round, client, noise_multiplier, sample_rate, steps FROM client_rounds WHERE run_id = ? AND steps > 0 ORDER BY round, client",
        (run_id,),
    ).fetchall()


def _max_epsilon(db: Path, run_id: str, delta: float) -> float:
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT client, noise_multiplier, sample_rate, steps FROM client_rounds WHERE run_id = ? AND steps > 0", (run_id,)).fetchall()
    rows += conn.execute("SELECT client, noise_multiplier, sample_rate, steps FROM interrupted_spend WHERE run_id = ?", (run_id,)).fetchall()
    per_client: dict = {}
    for client, sigma, q, steps in rows:
        per_client.setdefault(client, []).append((sigma, q, steps))
    return max((_prv(h, delta) for h in per_client.values()), default=0.0)


def test_sigkill_mid_round_then_resume(tmp_path):
    runs = tmp_path / "runs"
    db = runs / "runs.db"
    env = {**os.environ, "FEDAUDIT_RUNS_DIR": str(runs)}
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cli", *CRASH], cwd=ROOT, env=env, start_new_session=True,
                            stdout=log, stderr=log)
    killed_mid_round = False
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            time.sleep(0.02)
            if not db.exists():
                continue
            try:
                conn = sqlite3.connect(db)
                spent = conn.execute("SELECT COUNT(*) FROM client_rounds WHERE round = 3 AND steps > 0").fetchone()[0]
                saved = conn.execute("SELECT COUNT(*) FROM rounds WHERE round = 3 AND model_sha256 IS NOT NULL").fetchone()[0]
                conn.close()
            except sqlite3.OperationalError:
                continue
            if spent:
                killed_mid_round = not saved
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert spent, "the run never reached round 3: " + (tmp_path / "run.log").read_text()[-2000:]
    run_id = sqlite3.connect(db).execute("SELECT run_id FROM runs").fetchone()[0]
    delta = sqlite3.connect(db).execute("SELECT delta FROM runs").fetchone()[0]
    before = _max_epsilon(db, run_id, delta)
    assert sqlite3.connect(db).execute("SELECT status FROM runs").fetchone()[0] == "running"  # never looks complete
    # ...but it is not shown as still running once its process is gone.
    listed = run_json("runs", runs_dir=runs)["runs"][0]
    assert listed["status"] == "interrupted" and f"fedaudit run --resume {run_id}" in listed["error"]

    resumed = run_json("run", "--resume", run_id, runs_dir=runs)
    assert resumed["status"] == "completed" and resumed["rounds"] == 6
    assert resumed["epsilon"] >= before  # the ledger never goes down
    record = RunStore(runs).get_run(run_id)
    assert 0 < record.wall_time < record.finished_at - record.created_at  # the stopped time is left out

    fresh = run_json(*CRASH, runs_dir=runs)
    assert fresh["accuracy"] == resumed["accuracy"]
    assert _ledger(db, run_id) == [tuple(r) for r in _ledger(db, fresh["run_id"])]
    # Over-reporting is allowed, only by the round that was in flight.
    one_round = _prv([(r[2], r[3], r[4]) for r in _ledger(db, fresh["run_id"]) if r[1] == 0][:1], delta)
    assert fresh["epsilon"] <= resumed["epsilon"] <= fresh["epsilon"] + one_round + 1e-9
    if killed_mid_round:
        assert resumed["epsilon"] > fresh["epsilon"]


def test_a_running_run_is_shown_interrupted_only_once_its_process_is_known_to_be_gone(tmp_path):
    from shared.store import this_process

    store = RunStore(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    me = this_process()
    owners = {
        "alive": me,
        "exited": {**me, "pid": child.pid},
        "pid-reused": {**me, "start": str(int(me["start"]) - 1)},  # this PID, another start time
        "other-host": {**me, "host": me["host"] + "-elsewhere", "pid": child.pid},
        "unrecorded": None,
    }
    for run_id, owner in owners.items():
        store.create_run(run_id, {}, info={} if owner is None else {"owner": owner})
    shown = {r.run_id: r.shown_status for r in store.list_runs()}
    assert shown == {"alive": "running", "exited": "interrupted", "pid-reused": "interrupted",
                     "other-host": "running", "unrecorded": "running"}
    assert "fedaudit run --resume exited" in store.get_run("exited").shown_error
    store.finish_run("exited", "failed", "boom")
    assert store.get_run("exited").shown_status == "failed" and store.get_run("exited").shown_error == "boom"


def test_wall_time_leaves_out_the_time_a_resumed_run_lay_stopped(tmp_path, monkeypatch):
    import shared.store as store_module
    from shared.store import this_process

    clock = {"now": 1000.0}
    monkeypatch.setattr(store_module.time, "time", lambda: clock["now"])
    store = RunStore(tmp_path)

    def at(seconds, action, *args):
        clock["now"] = seconds
        action(*args)

    at(1000.0, store.create_run, "r", {})
    at(1010.0, store.record_round, "r", 1, {"accuracy": 0.5}, [])
    at(1015.0, store.commit_spend, "r", 2, [], {})  # killed after committing round 2's spend
    at(5000.0, store.start_another_attempt, "r", this_process())  # resumed an hour later
    at(5030.0, store.record_round, "r", 2, {"accuracy": 0.6}, [])
    at(5040.0, store.finish_run, "r", "failed", "Ctrl-C")  # stopped cleanly this time
    at(9000.0, store.start_another_attempt, "r", this_process())
    at(9005.0, store.finish_run, "r", "completed")
    assert store.get_run("r").wall_time == pytest.approx(15 + 40 + 5)

    at(100.0, store.create_run, "dead-at-once", {})  # killed before it recorded anything
    at(200.0, store.start_another_attempt, "dead-at-once", this_process())
    at(230.0, store.finish_run, "dead-at-once", "completed")
    assert store.get_run("dead-at-once").wall_time == pytest.approx(30)
    at(300.0, store.create_run, "plain", {})
    at(312.5, store.finish_run, "plain", "completed")
    assert store.get_run("plain").wall_time == pytest.approx(12.5)


def test_sigterm_stops_a_simulation_run_after_its_round_and_records_it_failed(tmp_path):
    # Ray's core worker turns SIGTERM into an abort (exit 134), which left the run
    # recorded as running; the run takes SIGTERM back once Ray is up.
    runs = tmp_path / "runs"
    db = runs / "runs.db"
    env = {**os.environ, "FEDAUDIT_RUNS_DIR": str(runs)}
    args = ("run", "--clients", "3", "--rounds", "30", "--local-epochs", "3", "--seed", "5", "--model", "logreg", "--json")
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        rounds = 0
        while not rounds and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
            try:
                rounds = sqlite3.connect(db).execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
            except sqlite3.OperationalError:  # not created yet
                continue
        assert rounds, "the run never finished round 1"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, err[-2000:]
    summary = json.loads(out)
    assert summary["status"] == "failed" and "interrupted (SIGTERM)" in summary["error"]
    assert summary["rounds"] < 30
    status, error = sqlite3.connect(db).execute("SELECT status, error FROM runs").fetchone()
    assert status == "failed" and f"--resume {summary['run_id']}" in error


def test_resuming_a_run_killed_in_round_one_counts_that_round(tmp_path):
    # Killed after round 1's spend was committed but before its checkpoint: there is
    # nothing to restart from, yet the clients spent budget and, under client-level DP,
    # the noised model may have gone out. Both must count in the resumed run.
    from shared import privacy
    from shared.config import RunConfig
    from shared.crypto import init_keys

    runs = tmp_path / "runs"
    store = RunStore(runs)
    config = RunConfig(dataset="digits", clients=3, rounds=1, model="logreg", client_dp=True, delta=1e-5).validate()
    keys = init_keys(store.run_dir("killed") / "keys", config.nodes)
    store.create_run("killed", config.to_dict(), info={"model": "logreg", "keys_dir": str(keys)})
    store.update_run("killed", delta=1e-5)
    earlier = (1.2, 1 / 27, 27)
    one_release = [(config.client_noise_multiplier, config.participation_rate, 1)]
    spend = [{"client": c, "num_examples": 431, "train_loss": 1.0, "epsilon": privacy.epsilon([earlier], 1e-5), "epsilon_rdp": 0.0,
              "noise_multiplier": earlier[0], "sample_rate": earlier[1], "steps": earlier[2]} for c in range(3)]
    store.commit_spend("killed", 1, spend, {"epsilon": spend[0]["epsilon"], "client_epsilon": privacy.epsilon(one_release, 1e-5)})
    store.finish_run("killed", "failed", "killed")

    resumed = run_json("run", "--resume", "killed", runs_dir=runs)
    assert resumed["status"] == "completed" and resumed["rounds"] == 1
    conn = sqlite3.connect(runs / "runs.db")
    rows = conn.execute("SELECT client, epsilon, noise_multiplier, sample_rate, steps FROM client_rounds WHERE run_id = 'killed'").fetchall()
    assert len(rows) == 3
    for client, reported, *now in rows:
        both = privacy.epsilon([earlier, tuple(now)], 1e-5)
        assert reported == pytest.approx(both, rel=1e-6) and both > privacy.epsilon([tuple(now)], 1e-5), client
    assert resumed["epsilon"] == pytest.approx(max(r[1] for r in rows), rel=1e-9)
    two_releases = [(config.client_noise_multiplier, config.participation_rate, 2)]
    (stored,) = conn.execute("SELECT client_epsilon FROM rounds WHERE run_id = 'killed'").fetchone()
    assert stored == pytest.approx(privacy.epsilon(two_releases, 1e-5))
    assert resumed["client_epsilon"] == pytest.approx(stored)
