"""Epsilon query time: fedaudit's ledger accounting against a fresh Opacus accountant.

    python -m bench.accounting

For each ledger, a fresh ``PRVAccountant`` / ``RDPAccountant`` fed the ledger as its
history is timed against ``shared.privacy.epsilon`` on the same ledger, interleaved,
median of the repetitions. fedaudit's side is timed the way a client meets it in a run:
its one-step RDP curves are already cached (the client's (sigma, q) is the same every
round) but the ledger is new (its step count grew), so the per-ledger result cache is
cleared before every query. The first query for a new (sigma, q) costs what Opacus's does.
Both sides must return the same float; the bench stops if they do not.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

from shared import privacy

DELTA = 1e-5
# (label, ledger): a digits client after 1, 10 and 30 rounds of 9 steps, a 5-epoch
# client after 6 rounds, and a client whose sigma changed once.
LEDGERS = [
    ("digits client, round 1", [(1.2, 1 / 9, 9)]),
    ("digits client, round 10", [(1.2, 1 / 9, 90)]),
    ("digits client, round 30", [(1.2, 1 / 9, 270)]),
    ("5 local epochs, round 20", [(1.2, 1 / 9, 900)]),
    ("two mechanisms", [(1.2, 1 / 9, 90), (2.0, 1 / 9, 90)]),
]


def _opacus(ledger, accountant: str) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    fresh = PRVAccountant() if accountant == "prv" else RDPAccountant()
    fresh.history = sorted(privacy.compact(ledger))
    return float(fresh.get_epsilon(delta=DELTA))


def _ours(ledger, accountant: str) -> float:
    privacy._epsilon_cached.cache_clear()  # a new ledger, as in every round of a run
    return privacy.epsilon(ledger, DELTA, accountant)


def _timed(fn, *args) -> tuple[float, float]:
    started = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - started, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    print(f"{'ledger':<26} {'acct':<4} {'epsilon':>8} {'Opacus ms':>10} {'fedaudit ms':>12} {'speed-up':>9}")
    for label, ledger in LEDGERS:
        for accountant in ("prv", "rdp"):
            _ours(ledger, accountant)  # caches the one-step curves, as the run's first round does
            theirs, ours = [], []
            for _ in range(args.repeats):
                t_theirs, expected = _timed(_opacus, ledger, accountant)
                t_ours, got = _timed(_ours, ledger, accountant)
                if got != expected:
                    raise SystemExit(f"{label} {accountant}: fedaudit {got!r} != Opacus {expected!r}")
                theirs.append(t_theirs)
                ours.append(t_ours)
            a, b = statistics.median(theirs) * 1e3, statistics.median(ours) * 1e3
            print(f"{label:<26} {accountant:<4} {expected:>8.3f} {a:>10.1f} {b:>12.2f} {a / max(b, 1e-9):>8.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
