"""Time per round against clients per round and total clients; the 1,000-client scenario.

    python -m bench.scale [--quick] [--no-scenario] [--rounds 5]

Every case is a real ``fedaudit run`` (CLI in a subprocess, synthetic data, DP and
encryption on, the defaults) with 50 synthetic samples per client, so every client
holds the same ~36 training and ~4 validation records whatever the client count.
Round time is the ``seconds`` the run store records for each round: Ray start-up, the
one-off describe of every client and shutdown are outside it. Round 1 also pays each
Ray actor's first training (imports, torch and Opacus warm-up: seconds on a loaded
machine), so, as in bench/run_overhead.py, the median over rounds 2+ is reported and
round 1 is shown apart.

(a) clients per round at a fixed total: each round trains and evaluates k clients.
    Expected: time grows linearly with k (compare seconds per client).
(b) total clients at fixed clients per round: 10 train and 10 evaluate each round.
    Expected: flat (compare the largest total's round time with the smallest's), and so
    is the whole-tree peak memory (measured as in (c)).
(c) the issue's scenario: 1,000 clients, 100 per round, 5 rounds, with the peak memory
    of the whole process tree: the sum over every process descended from the CLI (Ray's
    GCS, raylet and workers included) of PSS from /proc/PID/smaps_rollup, which counts a
    page shared by n processes as 1/n in each so nothing is counted twice, sampled every
    0.5 s. The summed RSS is printed too (an over-count: shared pages counted per process).
    Run once evaluating 10% of the clients per round (``--eval-fraction 0.1``) and, unless
    --quick, once evaluating all 1,000 every round (the default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_PER_CLIENT = 50  # 80% train (36 train + 4 validation per client), 20% server test
GIB = 1024**3


# ----------------------------------------------------------------------------- process-tree memory


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                # The command name (field 2) may hold spaces: ppid is the 2nd field after ')'.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it."""
    children = _children_map()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in KiB; (0, 0) if it is gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


@dataclass
class TreeMemory:
    """Peak whole-tree memory of a running process, sampled on a background thread."""

    root: int
    interval: float = 0.5
    peak_pss: int = 0  # bytes
    peak_rss: int = 0  # bytes
    peak_processes: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        pids = process_tree(self.root)
        pss = rss = 0
        for pid in pids:
            p, r = _memory_kib(pid)
            pss, rss = pss + p, rss + r
        self.peak_pss = max(self.peak_pss, pss * 1024)
        self.peak_rss = max(self.peak_rss, rss * 1024)
        self.peak_processes = max(self.peak_processes, len(pids))
        self.samples += 1

    def __enter__(self) -> TreeMemory:
        def loop() -> None:
            while not self._stop.is_set():
                self.sample()
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# ----------------------------------------------------------------------------- one run


@dataclass
class Case:
    clients: int
    per_round: int
    rounds: int
    eval_per_round: int | None = None  # None: the same as per_round

    def args(self) -> list[str]:
        evaluated = self.per_round if self.eval_per_round is None else self.eval_per_round
        return [
            "--dataset", "synthetic", "--samples", str(SAMPLES_PER_CLIENT * self.clients), "--clients", str(self.clients),
            "--fraction", repr(self.per_round / self.clients), "--eval-fraction", repr(evaluated / self.clients),
            "--rounds", str(self.rounds), "--seed", "0",
        ]


@dataclass
class Result:
    case: Case
    round_seconds: list[float]
    wall: float
    trained: list[int]
    memory: TreeMemory | None = None

    @property
    def per_round(self) -> float:
        """Median seconds of rounds 2+ (round 1 also warms up every actor)."""
        return statistics.median(self.round_seconds[1:] or self.round_seconds)


def run_case(case: Case, *, measure_memory: bool = False, timeout: float = 1800.0) -> Result:
    """One ``fedaudit run`` in a subprocess (its own session, so it can be stopped as a group)."""
    from shared.store import RunStore

    runs_dir = tempfile.mkdtemp(prefix="fedaudit-bench-scale-")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "run", *case.args(), "--runs-dir", runs_dir, "--json"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    memory = TreeMemory(proc.pid) if measure_memory else None
    try:
        if memory:
            memory.__enter__()
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own child's session and group only
        proc.communicate()
        shutil.rmtree(runs_dir, ignore_errors=True)
        raise RuntimeError(f"run timed out after {timeout:.0f} s: {' '.join(case.args())}") from None
    finally:
        if memory:
            memory.__exit__()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        shutil.rmtree(runs_dir, ignore_errors=True)
        raise RuntimeError(f"fedaudit run failed ({proc.returncode}): {stderr[-2000:]}")
    summary = json.loads(stdout)
    rounds = RunStore(runs_dir).get_rounds(summary["run_id"])
    shutil.rmtree(runs_dir, ignore_errors=True)  # keys for every client and checkpoints: not worth keeping
    return Result(case, [r["seconds"] for r in rounds], wall, [r["participants"] for r in rounds], memory)


# ----------------------------------------------------------------------------- report


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) for c, w in zip(cells, widths))


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(title)
    print(_row(header, widths))
    for r in rows:
        print(_row(r, widths))
    print(flush=True)


def linear_fit(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least-squares ``y = a + b x``: returns (a, b, R^2)."""
    import numpy as np

    b, a = np.polyfit(x, y, 1)
    residual = np.asarray(y) - (a + b * np.asarray(x))
    total = float(np.sum((np.asarray(y) - np.mean(y)) ** 2))
    return float(a), float(b), 1.0 - float(np.sum(residual**2)) / total if total else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Fewer points and rounds, one scenario run (about 5 minutes instead of about 10).")
    parser.add_argument("--no-scenario", action="store_true", help="Skip the 1,000-client scenario (c).")
    parser.add_argument("--rounds", type=int, default=None, help="Rounds per grid run (default 5, or 3 with --quick).")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    if rounds < 2:
        parser.error("--rounds must be >= 2: round 1 warms up the actors and is not counted")
    per_round_grid = (10, 50) if args.quick else (10, 25, 50, 100)
    total_grid = (100, 1000) if args.quick else (100, 300, 1000)

    print(f"fedaudit run, synthetic data ({SAMPLES_PER_CLIENT} samples per client), mlp, DP and encryption on; "
          f"{os.cpu_count()} CPUs; round time = median of the stored per-round seconds of rounds 2+\n", flush=True)

    a = [run_case(Case(200, k, rounds)) for k in per_round_grid]
    base = a[0].per_round / a[0].case.per_round
    print_table(
        f"(a) clients per round at 200 clients in total ({rounds} rounds each; k train and k evaluate per round)",
        ["per round", "s / round", "s / client", "round 1 s", "vs k=" + str(a[0].case.per_round)],
        [[str(r.case.per_round), f"{r.per_round:.2f}", f"{r.per_round / r.case.per_round:.3f}", f"{r.round_seconds[0]:.2f}",
          f"{r.per_round / a[0].per_round:.2f}x time for {r.case.per_round / a[0].case.per_round:.1f}x clients"] for r in a],
    )
    fixed, slope, r2 = linear_fit([r.case.per_round for r in a], [r.per_round for r in a])
    fit = f" (R^2 = {r2:.3f}; 1 = exactly linear)" if len(a) > 2 else " (two points: no test of linearity)"
    print(f"    least-squares line: {fixed:.2f} s per round + {slope:.3f} s per client per round{fit}")
    print(f"    seconds per client, largest k / smallest k: {(a[-1].per_round / a[-1].case.per_round) / base:.2f} "
          f"(below 1: the fixed per-round cost is spread over more clients)\n")

    b = [run_case(Case(n, 10, rounds), measure_memory=True) for n in total_grid]
    print_table(
        f"(b) total clients at 10 per round ({rounds} rounds each; 10 train and 10 evaluate per round)",
        ["total", "s / round", "vs smallest", "round 1 s", "wall s", "peak PSS sum"],
        [[str(r.case.clients), f"{r.per_round:.2f}", f"{r.per_round / b[0].per_round:.2f}", f"{r.round_seconds[0]:.2f}", f"{r.wall:.0f}",
          f"{r.memory.peak_pss / GIB:.2f} GiB"] for r in b],
    )
    print(f"    flatness: round time at {b[-1].case.clients} / at {b[0].case.clients} clients = {b[-1].per_round / b[0].per_round:.2f} (1.00 = flat); "
          f"peak whole-tree PSS {b[-1].memory.peak_pss / b[0].memory.peak_pss:.2f}x\n")

    if args.no_scenario:
        return
    scenarios = [Case(1000, 100, 5, eval_per_round=100)] + ([] if args.quick else [Case(1000, 100, 5, eval_per_round=1000)])
    c = [run_case(s, measure_memory=True) for s in scenarios]
    print_table(
        "(c) 1,000 clients, 100 trained per round, 5 rounds; whole-process-tree memory sampled every 0.5 s",
        ["evaluated / round", "s / round (2+)", "rounds 1..5 (s)", "wall s", "peak PSS sum", "peak RSS sum", "processes"],
        [[str(r.case.eval_per_round), f"{r.per_round:.2f}", " ".join(f"{s:.1f}" for s in r.round_seconds), f"{r.wall:.0f}",
          f"{r.memory.peak_pss / GIB:.2f} GiB", f"{r.memory.peak_rss / GIB:.2f} GiB", str(r.memory.peak_processes)] for r in c],
    )
    worst = max(r.memory.peak_pss for r in c)
    print(f"    peak whole-tree PSS {worst / GIB:.2f} GiB: {'within' if worst <= 4 * GIB else 'OVER'} the 4 GiB limit")


if __name__ == "__main__":
    main()
