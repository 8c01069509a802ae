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


SMALL = ("--dataset", "digits", "--clients", "3", "--rounds", "2", "--seed", "7", "--model", "logreg")


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e-runs")


@pytest.fixture(scope="session")
def private_run(e2e_dir) -> dict:
    return run_json("run", *SMALL, "--dp", runs_dir=e2e_dir)


@pytest.fixture(scope="session")
def private_rerun(e2e_dir, private_run) -> dict:
    return run_json("run", *SMALL, "--dp", runs_dir=e2e_dir)


@pytest.fixture(scope="session")
def nonprivate_run(e2e_dir) -> dict:
    return run_json("run", *SMALL, "--no-dp", runs_dir=e2e_dir)
