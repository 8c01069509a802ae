"""Shared fixtures. Flower simulations cost ~15-20 s each to start Ray, so the
end-to-end runs are session-scoped and shared by every test that reads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, runs_dir: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `fedaudit` CLI in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    if runs_dir is not None:
        full_env["FEDAUDIT_RUNS_DIR"] = str(runs_dir)
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def run_json(*args: str, runs_dir: Path, expect_code: int = 0) -> dict:
    proc = run_cli(*args, "--json", runs_dir=runs_dir)
    assert proc.returncode == expect_code, proc.stderr[-3000:]
    return json.loads(proc.stdout)


# The environment a run gives its own Ray workers (shared/quiet.py), for the shared cluster's.
QUIET_WORKERS = {"RAY_ADDRESS": "", "FLWR_LOG_LEVEL": "ERROR", "FLWR_TELEMETRY_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
                 "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _uses_loopback(item) -> bool:
    return bool(set(getattr(item, "fixturenames", ())) & getattr(item.module, "LOOPBACK_FIXTURES", set()))


def pytest_collection_modifyitems(config, items):
    # The loopback deployment run starts with the session and runs alongside the other
    # tests (see tests/test_deployment.py:LoopbackJob); the tests that read it go last.
    items.sort(key=_uses_loopback)


def pytest_collection_finish(session):
    users = [item for item in session.items if _uses_loopback(item)]
    if users and not session.config.option.collectonly:
        users[0].module.start_loopback(session.config._tmp_path_factory)


def pytest_sessionfinish(session):
    for module in {item.module for item in session.items if _uses_loopback(item)}:
        module.stop_loopback()


@pytest.fixture(scope="session", autouse=True)
def shared_ray_cluster():
    """One Ray cluster for every simulation of the session.

    Each run would otherwise start and stop its own Ray (about 5 s of every ~18 s small
    run, measured). ``RAY_ADDRESS`` makes every ``ray.init`` of the session, in this
    process and in the CLI subprocesses, join this cluster instead; this is the same
    path as ``fedaudit run --ray-address``. The cluster is stopped by its process group.
    Set ``FEDAUDIT_TEST_OWN_RAY=1`` to let every run start its own Ray instead.
    """
    import signal
    import time

    if os.environ.get("RAY_ADDRESS") or os.environ.get("FEDAUDIT_TEST_OWN_RAY"):
        yield None
        return
    import shutil
    import tempfile

    port = _free_port()
    # A short path of its own: Ray's socket paths must stay short, and two sessions on
    # one machine must not share a temp dir.
    temp = Path(tempfile.mkdtemp(prefix="frt-", dir="/tmp"))
    log = temp / "ray-start.log"
    ray = Path(sys.executable).with_name("ray")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(ray), "start", "--head", "--block", "--num-cpus", str(os.cpu_count() or 2), "--node-ip-address", "127.0.0.1",
             "--port", str(port), "--disable-usage-stats", "--temp-dir", str(temp)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **QUIET_WORKERS},
        )
    try:
        deadline = time.time() + 180
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("could not start the test session's Ray cluster:\n" + log.read_text()[-2000:])
            time.sleep(0.5)
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        yield os.environ["RAY_ADDRESS"]
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)


SMALL = ("--dataset", "digits", "--clients", "3", "--rounds", "2", "--seed", "7", "--model", "logreg")


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e-runs")


@pytest.fixture(scope="session")
def private_run(e2e_dir) -> dict:
    return run_json("run", *SMALL, "--dp", runs_dir=e2e_dir)


@pytest.fixture(scope="session")
def private_rerun(e2e_dir, private_run) -> dict:
    # What the server could compute if the noise followed the seed: the same run with
    # its DP randomness derived from --seed.
    return run_json("run", *SMALL, "--dp", "--reproducible-noise", runs_dir=e2e_dir)


@pytest.fixture(scope="session")
def nonprivate_run(e2e_dir) -> dict:
    return run_json("run", *SMALL, "--no-dp", runs_dir=e2e_dir)


@pytest.fixture(scope="session")
def nonprivate_rerun(e2e_dir, nonprivate_run) -> dict:
    # Unencrypted as well: sealing the exchange must not change what is computed.
    return run_json("run", *SMALL, "--no-dp", "--no-encrypt", runs_dir=e2e_dir)
