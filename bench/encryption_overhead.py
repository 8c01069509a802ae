"""Encrypted round time / unencrypted round time, on real simulations in one process.

    python -m bench.encryption_overhead [--rounds 8] [--repeats 2]

Runs the same job (digits, 10 clients, DP on) with and without the encrypted exchange,
alternating (plain, encrypted, plain, encrypted, ...), and compares the median round
time over rounds 2+ (round 1 pays for actor start-up).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from clients.app import app_for_job
from server.runner import prepare_run, run_simulation_job
from shared.config import resolve
from shared.store import RunStore


def round_times(encrypt: bool, rounds: int, runs_dir: str) -> list[float]:
    job = prepare_run(resolve(None, dataset="digits", clients=10, rounds=rounds, encrypt=encrypt), runs_dir)
    outcome = run_simulation_job(job, app_for_job(job))
    assert outcome.status == "completed", outcome.error
    return [r["seconds"] for r in RunStore(runs_dir).get_rounds(job.run_id)][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    runs_dir = tempfile.mkdtemp(prefix="fedaudit-bench-enc-")
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for encrypt in (False, True):
            times[encrypt] += round_times(encrypt, args.rounds, runs_dir)
    plain, sealed = statistics.median(times[False]), statistics.median(times[True])
    print(f"median round time over {len(times[False])} rounds each (digits, 10 clients, DP):")
    print(f"  unencrypted {plain * 1000:8.1f} ms")
    print(f"  encrypted   {sealed * 1000:8.1f} ms")
    print(f"  encrypted / unencrypted = {sealed / plain:.3f}  (overhead {100 * (sealed / plain - 1):+.1f} %, target <= 2 %)")


if __name__ == "__main__":
    main()
