"""What canaries cost: accuracy and time of a run with canaries against the same run without.

    python -m bench.canary_cost [--rounds 20] [--canaries 100] [--canary-clients 10]

Pair 1 (sample level): the demo's private digits run, with and without ``--canaries M``.
Pair 2 (client level): a client-level DP run of 20 clients (q = 0.5, z = 1, C = 1), with
and without ``--canary-clients M``.

Accuracy is measured for both runs of a pair on the same records: the canary run's test
split (the plain run's test split minus the canary pool), so the canary pool's removal
from the test split does not count as a change. Time is the sum of the per-round
times (Ray start-up excluded) and the time the audit spends on the canary audit alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from audit.canary import client_canary_audit, sample_canary_audit
from audit.report import load_run
from clients.app import app_for_job
from server.runner import prepare_run, run_simulation_job
from shared.config import resolve
from shared.evaluation import evaluate
from shared.store import RunStore


def _run(runs: str, **settings) -> str:
    job = prepare_run(resolve(None, **settings), runs)
    outcome = run_simulation_job(job, app_for_job(job))
    if outcome.status != "completed":
        raise SystemExit(f"run failed: {outcome.error}")
    return outcome.run_id


def _round_seconds(store: RunStore, run_id: str) -> float:
    return sum(r["seconds"] for r in store.get_rounds(run_id))


def pair(runs: str, label: str, base: dict, extra: dict, audit) -> dict:
    store = RunStore(runs)
    plain_id, canary_id = _run(runs, **base), _run(runs, **base, **extra)
    plain, canary = load_run(store, plain_id), load_run(store, canary_id)
    x, y = canary.data.x_test, canary.data.y_test
    started = time.perf_counter()
    result = audit(canary, store, canary.record.delta)
    audit_seconds = time.perf_counter() - started
    row = {
        "pair": label,
        "accuracy_without": evaluate(plain.model, x, y)[1],
        "accuracy_with": evaluate(canary.model, x, y)[1],
        "round_seconds_without": _round_seconds(store, plain_id),
        "round_seconds_with": _round_seconds(store, canary_id),
        "canary_audit_seconds": audit_seconds,
        "result": {k: result[k] for k in ("epsilon_lower_bound", "epsilon_estimate", "epsilon_estimate_two_variance", "theoretical_epsilon", "m", "r", "v") if k in result},
    }
    row["accuracy_cost"] = row["accuracy_without"] - row["accuracy_with"]
    row["time_ratio"] = row["round_seconds_with"] / row["round_seconds_without"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--canaries", type=int, default=100)
    parser.add_argument("--canary-clients", type=int, default=10)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedaudit-canary-bench-") as runs:
        sample = dict(dataset="digits", clients=10, rounds=args.rounds, seed=0, delta=1e-5, dp=True)
        rows.append(pair(runs, f"sample level: --canaries {args.canaries}", sample, {"canaries": args.canaries}, sample_canary_audit))
        client = dict(dataset="digits", clients=20, rounds=args.rounds, seed=0, dp=False, client_dp=True,
                      client_sample_rate=0.5, client_noise_multiplier=1.0, client_clip=1.0)
        rows.append(pair(runs, f"client level: --canary-clients {args.canary_clients}", client, {"canary_clients": args.canary_clients}, client_canary_audit))
    print(f"{'pair':<36} {'acc without':>11} {'acc with':>9} {'cost':>7} {'round s without':>15} {'round s with':>12} {'ratio':>6} {'audit s':>8}")
    for r in rows:
        print(f"{r['pair']:<36} {r['accuracy_without']:>11.4f} {r['accuracy_with']:>9.4f} {r['accuracy_cost']:>+7.4f} "
              f"{r['round_seconds_without']:>15.2f} {r['round_seconds_with']:>12.2f} {r['time_ratio']:>6.2f} {r['canary_audit_seconds']:>8.2f}")
        print(f"  {r['result']}")


if __name__ == "__main__":
    main()
