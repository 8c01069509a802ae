"""The run store: one SQLite database (``runs.db``) plus a folder per run.

Every write that matters is atomic: SQLite transactions for rows, and
write-to-temp-then-rename for files. A run is only ``completed`` once its final model
is on disk, so a crash never leaves a run that looks complete.

Connections are opened per operation: Flower runs the ServerApp in a non-main
thread, and a sqlite3 connection may not cross threads.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import BadInput
from shared.files import write_atomic
from shared.processes import alive, start_time
from shared.quiet import without_terminal_codes
from shared.results import finite_or_none

DEFAULT_RUNS_DIR = "fedaudit-runs"
RUNS_DIR_ENV = "FEDAUDIT_RUNS_DIR"

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    error TEXT,
    config TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    delta REAL,
    info TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    accuracy REAL,
    loss REAL,
    epsilon REAL,
    epsilon_rdp REAL,
    client_epsilon REAL,
    client_epsilon_rdp REAL,
    federated_accuracy REAL,
    federated_loss REAL,
    train_loss REAL,
    participants INTEGER,
    seconds REAL,
    model_sha256 TEXT,
    PRIMARY KEY (run_id, round)
);
-- The privacy ledger: one row per client per round it trained in.
CREATE TABLE IF NOT EXISTS client_rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    client INTEGER NOT NULL,
    num_examples INTEGER,
    train_loss REAL,
    epsilon REAL,
    epsilon_rdp REAL,
    refused INTEGER NOT NULL DEFAULT 0,
    noise_multiplier REAL,
    sample_rate REAL,
    steps INTEGER,
    val_accuracy REAL,
    val_loss REAL,
    PRIMARY KEY (run_id, round, client)
);
-- Spend committed for a round whose model was never checkpointed (the run was
-- interrupted). Kept so a resumed run can only over-report epsilon, never under-report.
CREATE TABLE IF NOT EXISTS interrupted_spend (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    client INTEGER NOT NULL,
    noise_multiplier REAL,
    sample_rate REAL,
    steps INTEGER,
    resumed_at REAL NOT NULL
);
-- Rounds after the last checkpoint that had started when the run was interrupted:
-- under client-level DP each may have released a noised model, and a resumed run
-- repeats the round, so each still counts as one release.
CREATE TABLE IF NOT EXISTS interrupted_releases (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    resumed_at REAL NOT NULL
);
-- Outlier scores of each client's update, per round.
CREATE TABLE IF NOT EXISTS flags (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    client INTEGER NOT NULL,
    norm REAL,
    cosine REAL,
    z_norm REAL,
    z_cosine REAL,
    flagged INTEGER NOT NULL,
    PRIMARY KEY (run_id, round, client)
);
CREATE TABLE IF NOT EXISTS clients (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    client INTEGER NOT NULL,
    num_train INTEGER,
    num_val INTEGER,
    label_histogram TEXT,
    PRIMARY KEY (run_id, client)
);
"""

STATUSES = ("running", "completed", "failed", "budget-exhausted")


# A run with one of these statuses finished its rounds (or its budget): nothing to resume,
# a closed audit log, and its model may be gated.
ENDED_NORMALLY = ("completed", "budget-exhausted")

# Shown, never stored: a run still marked running whose process is known to be gone
# (killed with SIGKILL, out of memory, the machine lost power). The stored status stays
# `running`, so --resume and every reader of runs.db see what was written.
INTERRUPTED = "interrupted"


def this_process() -> dict:
    """Who is running a run: host, PID and the PID's start time (a reused PID differs)."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": start_time(pid)}


def process_gone(owner: dict | None) -> bool:
    """True only when ``owner`` (from :func:`this_process`) is known to have exited.

    Another host's process cannot be checked from here, so its run is not called gone.
    """
    if not owner or owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    pid = owner["pid"]
    if not alive(pid):
        return True
    return bool(owner.get("start")) and start_time(pid) not in ("", owner["start"])


def resolve_runs_dir(runs_dir: str | Path | None = None) -> Path:
    return Path(runs_dir or os.environ.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR).resolve()


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a run-store file atomically, creating its folder; readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, 0o600)


def _nan_to_none(value: Any) -> Any:
    # Only NaN: SQLite stores an infinite epsilon as is, and None would read as "no DP".
    if isinstance(value, float) and value != value:
        return None
    return value


@dataclass
class RunRecord:
    run_id: str
    status: str
    error: str | None
    config: dict
    created_at: float
    finished_at: float | None
    delta: float | None
    info: dict

    @property
    def attempt_started(self) -> float:
        """When the current attempt (the first run, or the latest --resume) started."""
        return self.info.get("attempt_started", self.created_at)

    @property
    def earlier_attempts_seconds(self) -> float:
        return self.info.get("earlier_attempts_seconds", 0.0)

    @property
    def wall_time(self) -> float | None:
        """Seconds the run was running: a resumed run leaves out the time it lay stopped."""
        if self.finished_at is None:
            return None
        return self.earlier_attempts_seconds + self.finished_at - self.attempt_started

    @property
    def shown_status(self) -> str:
        """The stored status, or ``interrupted`` for a running run whose process is gone."""
        if self.status == "running" and process_gone(self.info.get("owner")):
            return INTERRUPTED
        return self.status

    @property
    def running_here(self) -> bool:
        """Still running in a live process on this host (another host's cannot be checked)."""
        owner = self.info.get("owner") or {}
        return self.status == "running" and owner.get("host") == socket.gethostname() and not process_gone(owner)

    @property
    def running_elsewhere(self) -> bool:
        """Marked running by a process on another host, which this host cannot check."""
        host = (self.info.get("owner") or {}).get("host")
        return self.status == "running" and host is not None and host != socket.gethostname()

    @property
    def shown_error(self) -> str | None:
        if self.shown_status != INTERRUPTED:
            return self.error
        return (f"interrupted: the process running it (pid {self.info['owner']['pid']}) is gone;"
                f" continue it with: fedaudit run --resume {self.run_id}")


class RunStore:
    def __init__(self, runs_dir: str | Path | None = None):
        self.root = resolve_runs_dir(runs_dir)
        self.db_path = self.root / "runs.db"

    # ------------------------------------------------------------------ plumbing
    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        conn = self._open()
        try:
            with conn:  # one transaction: commit on success, roll back on error
                yield conn
        finally:
            conn.close()

    def _require_folder(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise BadInput(f"the runs folder {self.root} is a file, not a folder")

    def _open(self) -> sqlite3.Connection:
        self._require_folder()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.db_path, timeout=30)
        except (OSError, sqlite3.Error) as exc:
            raise BadInput(f"cannot use the run store {self.db_path}: {getattr(exc, 'strerror', None) or exc}") from None
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(SCHEMA)
        except sqlite3.Error as exc:
            conn.close()
            raise BadInput(f"cannot use the run store {self.db_path}: {exc}") from None
        return conn

    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    # ------------------------------------------------------------------ runs
    def create_run(self, run_id: str, config: dict, info: dict | None = None) -> None:
        with self.connect() as conn:
            conn.execute(
                "INSERT INTO runs (run_id, status, config, created_at, info) VALUES (?, 'running', ?, ?, ?)",
                (run_id, json.dumps(config), time.time(), json.dumps(info or {})),
            )

    def update_run(self, run_id: str, **fields: Any) -> None:
        allowed = {"status", "error", "finished_at", "delta", "info"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"cannot update {unknown}")
        if "info" in fields:
            merged = {**self.get_run(run_id).info, **fields["info"]}
            fields["info"] = json.dumps(merged)
        assignments = ", ".join(f"{k} = ?" for k in fields)
        with self.connect() as conn:
            conn.execute(f"UPDATE runs SET {assignments} WHERE run_id = ?", (*fields.values(), run_id))

    def finish_run(self, run_id: str, status: str, error: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(status)
        # Stored errors are shown by `show` and --json: plain text, without Ray's colours.
        error = None if error is None else without_terminal_codes(error)
        self.update_run(run_id, status=status, error=error, finished_at=time.time())

    def start_another_attempt(self, run_id: str, owner: dict) -> None:
        """Mark a stopped run running again, keeping the seconds its earlier attempts ran.

        An attempt that was killed never recorded its end, so it counts up to its last
        recorded round (``last_active``); the time the run lay stopped is not counted.
        """
        record = self.get_run(run_id)
        ended = record.finished_at if record.finished_at is not None else record.info.get("last_active", record.attempt_started)
        earlier = record.earlier_attempts_seconds + max(0.0, ended - record.attempt_started)
        self.update_run(run_id, status="running", error=None, finished_at=None,
                        info={"owner": owner, "attempt_started": time.time(), "earlier_attempts_seconds": earlier})

    @staticmethod
    def _mark_active(conn: sqlite3.Connection, run_id: str) -> None:
        conn.execute("UPDATE runs SET info = json_set(info, '$.last_active', ?) WHERE run_id = ?", (time.time(), run_id))

    def get_run(self, run_id: str) -> RunRecord:
        if not self.db_path.exists():
            raise BadInput(f"no runs stored in {self.root}")
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise BadInput(f"unknown run {run_id!r} in {self.root}")
        return self._record(row)

    def list_runs(self) -> list[RunRecord]:
        self._require_folder()
        if not self.db_path.exists():
            return []
        with self.connect() as conn:
            rows = conn.execute("SELECT * FROM runs ORDER BY created_at").fetchall()
        return [self._record(r) for r in rows]

    def _record(self, row: sqlite3.Row) -> RunRecord:
        return RunRecord(
            run_id=row["run_id"],
            status=row["status"],
            error=row["error"],
            config=self._json_object(row, "config"),
            created_at=row["created_at"],
            finished_at=row["finished_at"],
            delta=row["delta"],
            info=self._json_object(row, "info"),
        )

    def _json_object(self, row: sqlite3.Row, column: str) -> dict:
        try:
            value = json.loads(row[column])
        except (TypeError, ValueError):
            value = None
        if not isinstance(value, dict):
            raise BadInput(f"the run store {self.db_path} is damaged: run {row['run_id']!r} has no readable {column}")
        return value

    # ------------------------------------------------------------------ clients
    def record_clients(self, run_id: str, clients: list[dict]) -> None:
        with self.connect() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO clients (run_id, client, num_train, num_val, label_histogram) VALUES (?, ?, ?, ?, ?)",
                [(run_id, c["client"], c["num_train"], c["num_val"], json.dumps(c["label_histogram"])) for c in clients],
            )

    def get_clients(self, run_id: str) -> list[dict]:
        with self.connect() as conn:
            rows = conn.execute("SELECT * FROM clients WHERE run_id = ? ORDER BY client", (run_id,)).fetchall()
        return [
            {"client": r["client"], "num_train": r["num_train"], "num_val": r["num_val"], "label_histogram": json.loads(r["label_histogram"])}
            for r in rows
        ]

    # ------------------------------------------------------------------ rounds and ledger
    def commit_spend(self, run_id: str, round_: int, clients: list[dict], epsilons: dict[str, float | None]) -> None:
        """Persist a round's privacy spend in one transaction.

        Called before the round's model is checkpointed or sent anywhere, so a crash
        can over-report epsilon but never under-report it. ``epsilons`` holds the
        run-level ``epsilon``/``epsilon_rdp`` (sample level, the largest client's) and
        ``client_epsilon``/``client_epsilon_rdp`` (client level).
        """
        keys = ("epsilon", "epsilon_rdp", "client_epsilon", "client_epsilon_rdp")
        with self.connect() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO client_rounds (run_id, round, client, num_examples, train_loss, epsilon, epsilon_rdp, "
                "refused, noise_multiplier, sample_rate, steps) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        run_id,
                        round_,
                        c["client"],
                        c.get("num_examples"),
                        _nan_to_none(c.get("train_loss")),
                        c.get("epsilon"),
                        c.get("epsilon_rdp"),
                        int(c.get("refused", 0)),
                        c.get("noise_multiplier"),
                        c.get("sample_rate"),
                        c.get("steps"),
                    )
                    for c in clients
                ],
            )
            conn.execute(
                f"INSERT INTO rounds (run_id, round, participants, {', '.join(keys)}) VALUES (?, ?, ?, ?, ?, ?, ?) "
                f"ON CONFLICT(run_id, round) DO UPDATE SET participants = excluded.participants, "
                + ", ".join(f"{k} = excluded.{k}" for k in keys),
                (run_id, round_, sum(1 for c in clients if not c.get("refused")), *(epsilons.get(k) for k in keys)),
            )
            self._mark_active(conn, run_id)

    def last_checkpointed_round(self, run_id: str) -> int:
        with self.connect() as conn:
            row = conn.execute(
                "SELECT MAX(round) AS r FROM rounds WHERE run_id = ? AND model_sha256 IS NOT NULL", (run_id,)
            ).fetchone()
        return int(row["r"] or 0)

    def set_aside_interrupted(self, run_id: str, after_round: int) -> list[dict]:
        """Move the spend of rounds after ``after_round`` out of the ledger, keeping it
        in ``interrupted_spend``; returns what was moved."""
        with self.connect() as conn:
            rows = [
                dict(r)
                for r in conn.execute(
                    "SELECT round, client, noise_multiplier, sample_rate, steps FROM client_rounds "
                    "WHERE run_id = ? AND round > ? AND steps IS NOT NULL AND steps > 0",
                    (run_id, after_round),
                )
            ]
            self._insert_interrupted(conn, run_id, rows)
            conn.execute(
                "INSERT INTO interrupted_releases (run_id, round, resumed_at) "
                "SELECT run_id, round, ? FROM rounds WHERE run_id = ? AND round > ? AND client_epsilon IS NOT NULL",
                (time.time(), run_id, after_round),
            )
            conn.execute("DELETE FROM client_rounds WHERE run_id = ? AND round > ?", (run_id, after_round))
            conn.execute("DELETE FROM rounds WHERE run_id = ? AND round > ?", (run_id, after_round))
        return rows

    @staticmethod
    def _insert_interrupted(conn: sqlite3.Connection, run_id: str, rows: list[dict]) -> None:
        conn.executemany(
            "INSERT INTO interrupted_spend (run_id, round, client, noise_multiplier, sample_rate, steps, resumed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(run_id, r["round"], r["client"], r["noise_multiplier"], r["sample_rate"], r["steps"], time.time()) for r in rows],
        )

    def add_interrupted_spend(self, run_id: str, rows: list[dict]) -> None:
        """Keep spend that no ledger row records (a reply that never came) as interrupted spend."""
        with self.connect() as conn:
            self._insert_interrupted(conn, run_id, rows)

    def interrupted_releases(self, run_id: str) -> int:
        """How many client-level releases interrupted rounds may have made (see the table)."""
        with self.connect() as conn:
            row = conn.execute("SELECT COUNT(*) AS n FROM interrupted_releases WHERE run_id = ?", (run_id,)).fetchone()
        return int(row["n"])

    def client_epsilons(self, run_id: str) -> tuple[float | None, float | None]:
        """The run's client-level (PRV, RDP) epsilon, interrupted releases included.

        None for a run without client-level DP or before its first round.
        """
        rows = [r for r in self.get_rounds(run_id) if r["client_epsilon"] is not None]
        extra = self.interrupted_releases(run_id)
        if not extra:
            if not rows:
                return None, None
            return max(r["client_epsilon"] for r in rows), max((r["client_epsilon_rdp"] for r in rows if r["client_epsilon_rdp"] is not None), default=None)
        from shared import privacy

        from shared.config import RunConfig

        record = self.get_run(run_id)
        config = RunConfig.from_stored(record.config)
        releases = max((r["round"] for r in rows), default=0) + extra
        ledger = [(config.client_noise_multiplier, config.participation_rate, releases)]
        return privacy.epsilon(ledger, record.delta), privacy.epsilon(ledger, record.delta, "rdp")

    def client_releases(self, run_id: str) -> int:
        """How many noised models a client-level DP run has released: its rounds, and
        the interrupted rounds whose model may already have gone out."""
        rounds = [r["round"] for r in self.get_rounds(run_id) if r["client_epsilon"] is not None]
        return max(rounds, default=0) + self.interrupted_releases(run_id)

    def interrupted_spend(self, run_id: str) -> dict[int, list[tuple[float, float, int]]]:
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT client, noise_multiplier, sample_rate, steps FROM interrupted_spend WHERE run_id = ? ORDER BY round, client", (run_id,)
            ).fetchall()
        out: dict[int, list[tuple[float, float, int]]] = {}
        for r in rows:
            out.setdefault(r["client"], []).append((r["noise_multiplier"], r["sample_rate"], r["steps"]))
        return out

    def record_round(self, run_id: str, round_: int, metrics: dict, client_eval: list[dict]) -> None:
        columns = ("accuracy", "loss", "federated_accuracy", "federated_loss", "train_loss", "seconds", "model_sha256")
        values = [_nan_to_none(metrics.get(c)) for c in columns]
        with self.connect() as conn:
            conn.execute(
                f"INSERT INTO rounds (run_id, round, {', '.join(columns)}) VALUES (?, ?, {', '.join('?' * len(columns))}) "
                f"ON CONFLICT(run_id, round) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in columns)}",
                (run_id, round_, *values),
            )
            self._mark_active(conn, run_id)
            for c in client_eval:
                conn.execute(
                    "INSERT INTO client_rounds (run_id, round, client, val_accuracy, val_loss) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(run_id, round, client) DO UPDATE SET val_accuracy = excluded.val_accuracy, val_loss = excluded.val_loss",
                    (run_id, round_, c["client"], _nan_to_none(c.get("accuracy")), _nan_to_none(c.get("loss"))),
                )

    def record_flags(self, run_id: str, round_: int, scores: list[dict]) -> None:
        with self.connect() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO flags (run_id, round, client, norm, cosine, z_norm, z_cosine, flagged) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(run_id, round_, s["client"], s["norm"], s["cosine"], finite_or_none(s["z_norm"]), finite_or_none(s["z_cosine"]), int(s["flagged"])) for s in scores],
            )

    def get_flags(self, run_id: str) -> list[dict]:
        with self.connect() as conn:
            rows = conn.execute("SELECT * FROM flags WHERE run_id = ? ORDER BY round, client", (run_id,)).fetchall()
        return [{k: r[k] for k in r.keys() if k != "run_id"} for r in rows]

    def get_rounds(self, run_id: str) -> list[dict]:
        with self.connect() as conn:
            rounds = [dict(r) for r in conn.execute("SELECT * FROM rounds WHERE run_id = ? ORDER BY round", (run_id,))]
            per_client = [dict(r) for r in conn.execute("SELECT * FROM client_rounds WHERE run_id = ? ORDER BY round, client", (run_id,))]
        by_round: dict[int, list[dict]] = {}
        for row in per_client:
            row.pop("run_id")
            by_round.setdefault(row["round"], []).append(row)
        for r in rounds:
            r.pop("run_id")
            r["clients"] = by_round.get(r["round"], [])
        return rounds

    def ledger_with_interrupted(self, run_id: str) -> dict[int, list[tuple[float, float, int]]]:
        """Each client's ledger plus the spend of an interrupted round, which still counts."""
        ledgers = self.ledger(run_id)
        for client, extra in self.interrupted_spend(run_id).items():
            ledgers[client] = ledgers.get(client, []) + extra
        return ledgers

    def trained_clients(self, run_id: str) -> list[int]:
        """Clients that trained in at least one round (refusals and evaluation-only rows aside)."""
        with self.connect() as conn:
            rows = conn.execute("SELECT DISTINCT client FROM client_rounds WHERE run_id = ? AND num_examples > 0 AND refused = 0 ORDER BY client",
                                (run_id,)).fetchall()
        return [r["client"] for r in rows]

    def ledger(self, run_id: str, up_to_round: int | None = None) -> dict[int, list[tuple[float, float, int]]]:
        """Each client's (noise multiplier, sample rate, steps) history, in round order."""
        query = "SELECT client, noise_multiplier, sample_rate, steps FROM client_rounds WHERE run_id = ? AND steps IS NOT NULL AND steps > 0 AND noise_multiplier IS NOT NULL"
        params: list[Any] = [run_id]
        if up_to_round is not None:
            query += " AND round <= ?"
            params.append(up_to_round)
        with self.connect() as conn:
            rows = conn.execute(query + " ORDER BY round, client", params).fetchall()
        out: dict[int, list[tuple[float, float, int]]] = {}
        for r in rows:
            out.setdefault(r["client"], []).append((r["noise_multiplier"], r["sample_rate"], r["steps"]))
        return out
