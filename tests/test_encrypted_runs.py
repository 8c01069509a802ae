"""Encrypted exchange and the audit log on real Flower simulations, with misbehaving
clients injected through a test-only ClientApp mod (tests/tamper.py)."""

import json
import os
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli import app
from server.runner import prepare_run, run_simulation_job
from shared.auditlog import verify_log
from shared.config import resolve
from shared.crypto import load_registry
from tests.conftest import ROOT
from tests.tamper_app import build_multi_app

pytestmark = pytest.mark.simulation

VICTIMS = {1: "tamper", 2: "replay", 3: "swap", 4: "poison-nan", 5: "poison-shape"}
EXPECTED_KIND = {"tamper": "tampered", "replay": "replayed", "swap": "moved", "poison-nan": "non-finite", "poison-shape": "wrong-shape"}


@pytest.fixture(scope="session", autouse=True)
def importable_tests():
    # Ray workers import the test-only ClientApp by reference.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def tampered_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("tampered")
    job = prepare_run(resolve(None, clients=7, rounds=2, seed=3, model="logreg", min_replies=2), runs)
    outcome = run_simulation_job(job, build_multi_app(VICTIMS))
    return outcome, runs, job


def test_every_rejection_is_excluded_logged_and_the_run_finishes(tampered_run):
    outcome, runs, job = tampered_run
    assert outcome.status == "completed", outcome.error
    entries = _log(Path(runs) / job.run_id)
    assert [e["kind"] for e in entries] == ["run-start", "round", "round", "run-end"]
    for entry in entries[1:3]:
        rnd = entry["payload"]["round"]
        rejected = {r["client"]: r["kind"] for r in entry["payload"]["rejected"]}
        expected = {c: EXPECTED_KIND[m] for c, m in VICTIMS.items() if m != "replay" or rnd >= 2}
        assert rejected == expected, entry["payload"]["rejected"]
        assert all(r["reason"] for r in entry["payload"]["rejected"])
        honest = {0, 6} | ({2} if rnd == 1 else set())
        assert set(entry["payload"]["participants"]) == honest  # the rejected are excluded
    registry = load_registry(job.keys_dir)
    assert verify_log(Path(runs) / job.run_id / "audit.jsonl", registry.server_ed25519, job.run_id).ok


def test_too_few_valid_replies_fails_the_run_but_keeps_earlier_rounds(tmp_path):
    # Two of three clients replay from round 2: round 1 is fine, round 2 has 1 valid reply.
    job = prepare_run(resolve(None, clients=3, rounds=3, seed=3, model="logreg", min_replies=2), tmp_path)
    outcome = run_simulation_job(job, build_multi_app({0: "replay", 1: "replay"}))
    assert outcome.status == "failed"
    assert "fewer than --min-replies 2" in outcome.error and "replayed" in outcome.error
    conn = sqlite3.connect(tmp_path / "runs.db")
    assert conn.execute("SELECT status FROM runs").fetchone()[0] == "failed"
    assert [r[0] for r in conn.execute("SELECT round FROM rounds WHERE model_sha256 IS NOT NULL")] == [1]
    assert conn.execute("SELECT COUNT(*) FROM client_rounds WHERE round = 1 AND steps > 0").fetchone()[0] == 3
    entries = _log(tmp_path / job.run_id)
    assert entries[-1]["kind"] == "run-end" and entries[-1]["payload"]["status"] == "failed"
    assert verify_log(tmp_path / job.run_id / "audit.jsonl", load_registry(job.keys_dir).server_ed25519, job.run_id).ok


def test_encrypted_and_plain_runs_reach_the_same_accuracy(nonprivate_run, nonprivate_rerun):
    # Non-private, so that the two runs compute exactly the same thing (private runs
    # draw fresh noise each time).
    assert nonprivate_run["encrypted"] is True and nonprivate_rerun["encrypted"] is False
    assert nonprivate_rerun["accuracy"] == nonprivate_run["accuracy"]


def test_verify_cli_on_a_real_log(private_run, e2e_dir):
    result = CliRunner().invoke(app, ["verify", private_run["run_id"], "--runs-dir", str(e2e_dir)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "verified 4 entries"


@pytest.fixture(scope="session")
def real_log(private_run):
    path = Path(private_run["run_dir"]) / "audit.jsonl"
    keys = json.loads(sqlite3.connect(Path(private_run["run_dir"]).parent / "runs.db").execute(
        "SELECT info FROM runs WHERE run_id = ?", (private_run["run_id"],)).fetchone()[0])["keys_dir"]
    public_key = load_registry(keys).server_ed25519
    assert verify_log(path, public_key, private_run["run_id"]).ok  # so the failures below are the edits'
    return path.read_bytes(), Path(str(path) + ".sig").read_bytes(), public_key, private_run["run_id"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_verify_catches_every_single_byte_change_of_a_real_log(real_log, tmp_path_factory, data):
    original, signature, public_key, run_id = real_log
    position = data.draw(st.integers(0, len(original) - 1))
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != original[position]))
    path = tmp_path_factory.mktemp("edit") / "audit.jsonl"
    edited = bytearray(original)
    edited[position] = byte
    path.write_bytes(bytes(edited))
    Path(str(path) + ".sig").write_bytes(signature)
    assert not verify_log(path, public_key, run_id).ok


def test_verify_catches_truncation_of_a_real_log(real_log, tmp_path):
    original, signature, public_key, run_id = real_log
    (tmp_path / "audit.jsonl.sig").write_bytes(signature)
    for cut in range(0, len(original), 37):
        (tmp_path / "audit.jsonl").write_bytes(original[:cut])
        assert not verify_log(tmp_path / "audit.jsonl", public_key, run_id).ok


def test_key_files_are_private_and_a_wrong_passphrase_is_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("FA_TEST_PASS", "correct horse")
    result = CliRunner().invoke(app, ["keys", "init", str(tmp_path / "keys"), "--clients", "3", "--passphrase-env", "FA_TEST_PASS"])
    assert result.exit_code == 0, result.output
    for pem in (tmp_path / "keys").glob("*.pem"):
        assert pem.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("FA_TEST_PASS", "wrong")
    result = CliRunner().invoke(app, ["run", "--clients", "3", "--keys", str(tmp_path / "keys"), "--keys-passphrase-env", "FA_TEST_PASS",
                                      "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert "wrong or missing passphrase" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "runs.db").exists()
