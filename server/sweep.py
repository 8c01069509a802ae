"""A privacy-utility sweep (``fedaudit sweep``): one non-private baseline plus DP-SGD runs
at several noise multipliers or target epsilons, all on the same data, partition,
seed and model, each stored like any ``fedaudit run``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from server.runner import preflight, prepare_run, run_simulation_job
from shared.config import RunConfig
from shared.errors import BadInput
from shared.store import RunStore

NOISE_MODE = "noise-multiplier"
TARGET_MODE = "target-epsilon"


@dataclass(frozen=True)
class SweepPoint:
    label: str
    config: RunConfig


def parse_values(text: str, flag: str) -> list[float]:
    """``"0.8,1.2,2"`` -> ``[0.8, 1.2, 2.0]``; every value finite and > 0, no duplicates."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise BadInput(f"{flag} needs a comma-separated list of numbers, e.g. 0.8,1.2,2.0")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise BadInput(f"{flag}: {item!r} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise BadInput(f"{flag}: every value must be > 0, got {item}")
        values.append(value)
    if len(set(values)) != len(values):
        raise BadInput(f"{flag} lists a value twice")
    return values


def sweep_points(base: RunConfig, *, noise_multipliers: Sequence[float] | None = None, target_epsilons: Sequence[float] | None = None) -> list[SweepPoint]:
    """The baseline and the private configs of a sweep, in run order.

    Exactly one of ``noise_multipliers`` and ``target_epsilons`` is given. Everything
    but the sample-level DP settings comes from ``base``. Client-level DP is not part of
    a sweep (its epsilon has another unit), so a ``base`` with it is refused.
    """
    if (noise_multipliers is None) == (target_epsilons is None):
        raise BadInput("give exactly one of --noise-multipliers and --target-epsilons")
    if base.client_dp:
        raise BadInput("sweep varies sample-level DP-SGD; turn client-level DP off (client-dp = false) for a sweep")
    if base.max_epsilon is not None:
        raise BadInput("sweep runs every point to the end; drop max-epsilon from the config")
    points = [SweepPoint("non-private", replace(base, dp=False, target_epsilon=None).validate())]
    if noise_multipliers is not None:
        for sigma in sorted(noise_multipliers, reverse=True):  # least private last: epsilon grows along the sweep
            points.append(SweepPoint(f"sigma={sigma:g}", replace(base, dp=True, noise_multiplier=float(sigma), target_epsilon=None).validate()))
    else:
        for eps in sorted(target_epsilons):
            points.append(SweepPoint(f"eps<={eps:g}", replace(base, dp=True, target_epsilon=float(eps)).validate()))
    return points


def run_sweep(
    points: list[SweepPoint],
    runs_dir: str | Path | None,
    *,
    mode: str,
    client_app_for: Callable[[Any], Any],
    verbose: bool = False,
    on_run_start: Callable[[int, SweepPoint, Any], None] | None = None,
    on_round: Callable[[Any], None] | None = None,
    on_run_end: Callable[[int, dict], None] | None = None,
) -> dict[str, Any]:
    """Check every point, then train and store each run in turn.

    ``client_app_for(job)`` gives each run's ClientApp (``clients.app.app_for_job``).

    Every config is checked (data, delta, noise calibration) before the first run
    starts, so bad input fails before anything is stored.

    Returns
    -------
    dict
        ``mode``, ``values``, ``data`` (dataset, clients, rounds, seed, partition,
        model), ``runs_dir`` and ``runs``: one row per run with ``label``, ``run_id``,
        ``status``, ``dp``, ``noise_multiplier`` (the calibrated one for a target
        epsilon), ``target_epsilon``, ``epsilon``, ``delta``, ``accuracy``,
        ``f1_macro``, ``wall_time``, ``run_dir`` and ``rounds`` (accuracy, loss and
        epsilon per round).
    """
    checked = [preflight(p.config) for p in points]  # every point's bad input before any run
    rows = []
    for i, point in enumerate(points):
        job = prepare_run(point.config, runs_dir)
        if on_run_start:
            on_run_start(i, point, job)
        outcome = run_simulation_job(job, client_app_for(job), verbose=verbose, on_round=on_round)
        s = outcome.summary
        rounds = RunStore(job.runs_dir).get_rounds(job.run_id)
        row = {
            "label": point.label,
            "run_id": job.run_id,
            "status": outcome.status,
            "error": outcome.error,
            "dp": point.config.dp,
            "noise_multiplier": job.config.noise_multiplier if point.config.dp else None,
            "target_epsilon": point.config.target_epsilon,
            "epsilon": s["epsilon"],
            "delta": s["delta"],
            "accuracy": s["accuracy"],
            "f1_macro": s["f1_macro"],
            "wall_time": s["wall_time"],
            "run_dir": s["run_dir"],
            "rounds": [{k: r[k] for k in ("round", "accuracy", "loss", "epsilon")} for r in rounds],
        }
        rows.append(row)
        if on_run_end:
            on_run_end(i, row)
    base = points[0].config
    values = [p.config.noise_multiplier if mode == NOISE_MODE else p.config.target_epsilon for p in points[1:]]
    return {
        "mode": mode,
        "values": values,
        "data": {
            "dataset": base.dataset_name,
            "clients": base.clients,
            "rounds": base.rounds,
            "seed": base.seed,
            "partition": base.partition,
            "model": checked[0].model_name,
        },
        "runs_dir": str(RunStore(runs_dir).root),
        "runs": rows,
    }
