"""The ServerApp side of a Deployment Engine run (``fedaudit run --engine deployment``).

The ServerApp runs on the SuperLink host. It keeps its own run store there (the
SuperLink's ``--runs-dir``, passed down as ``$FEDAUDIT_RUNS_DIR``), signs the audit log
with the server keys found there (``--keys``, passed down as ``$FEDAUDIT_KEYS_DIR``),
and prints progress and, at the end, every result into its Flower log in the format of
:mod:`shared.results`, where the submitting CLI picks them up.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from server.federation import ServerJob, run_federation
from shared.errors import BadInput
from shared.results import b64, encode_bundle, event_line, finite_or_none
from shared.store import RUNS_DIR_ENV, RunStore

ENGINE_KEY = "fedaudit-engine"
RUN_ID_KEY = "run-id"
REPLY_TIMEOUT_KEY = "reply-timeout"
KEYS_DIR_KEY = "keys-dir"
KEYS_PASSPHRASE_KEY = "keys-passphrase-env"
DEPLOYMENT_KEYS = (ENGINE_KEY, RUN_ID_KEY, REPLY_TIMEOUT_KEY, KEYS_DIR_KEY, KEYS_PASSPHRASE_KEY)

KEYS_DIR_ENV = "FEDAUDIT_KEYS_DIR"
KEYS_PASSPHRASE_ENV_ENV = "FEDAUDIT_KEYS_PASSPHRASE_ENV"
DEFAULT_REPLY_TIMEOUT = 300.0

# Rows of the run store that make up a run, in the order they are written back.
TABLES = ("runs", "clients", "rounds", "client_rounds", "interrupted_spend", "interrupted_releases", "flags")
RESULT_FILES = ("audit.jsonl", "audit.jsonl.sig", "model.safetensors", "model.json", "config.toml")
# A bundle this large would strain Flower's log channel: the model is left on the server.
MAX_MODEL_BYTES = 4 * 1024 * 1024


@dataclass
class SuperLinkLaunch:
    """What ``fedaudit superlink`` starts: the command, the environment it adds and a banner."""

    command: list[str]
    environment: dict[str, str]
    banner: str


def _check_port_free(host: str, port: int) -> None:
    """Name a taken port before Flower's SuperLink would exit with code 1 and no reason."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As gRPC binds: a port a stopped SuperLink left in TIME_WAIT is free to use.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise BadInput(f"cannot listen on {host}:{port}: {exc.strerror} (another SuperLink on that port?)") from None


def _check_state_database(path: Path) -> None:
    """Flower's SuperLink exits 1 without a word on a state database it cannot open.
    Only reads: its folder is made once every check has passed."""
    import sqlite3
    from contextlib import closing

    if path.is_dir():
        raise BadInput(f"--database {path} is a folder; give a file for Flower's state database")
    if path.exists():
        try:
            with closing(sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)) as conn:
                conn.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            raise BadInput(f"--database {path} is not a usable SQLite database: {exc}") from None


def superlink_launch(*, certs: str | Path | None, insecure: bool, host: str, port: int, keys: str | Path | None,
                     keys_passphrase_env: str | None, runs_dir: str | Path | None, database: str | Path | None,
                     log_file: str | Path | None = None) -> SuperLinkLaunch:
    """Check a SuperLink's keys and run store, create the store, and say how to start it.

    The ServerApps the SuperLink starts find the server's run store and keys through
    the environment, so nothing secret travels in a run's config.
    """
    from server.runner import check_keys
    from shared.crypto import load_registry
    from shared.errors import make_dir
    from shared.processes import open_log, superlink_command
    from shared.store import resolve_runs_dir

    runs = resolve_runs_dir(runs_dir)
    environment = {RUNS_DIR_ENV: str(runs)}
    if keys is not None:
        keys = Path(keys).resolve()
        check_keys(keys, len(load_registry(keys).clients), keys_passphrase_env)
        environment[KEYS_DIR_ENV] = str(keys)
        if keys_passphrase_env:
            environment[KEYS_PASSPHRASE_ENV_ENV] = keys_passphrase_env
    database = Path(database or runs / "superlink.db").resolve()
    command = superlink_command(certs=certs, insecure=insecure, host=host, port=port, database=database)
    _check_port_free(host, port)
    if log_file is not None:
        open_log(Path(log_file)).close()  # named before anything is written
    _check_state_database(database)
    make_dir(runs, "run store")
    make_dir(database.parent, "folder of --database")
    mode = "plain text (--insecure)" if insecure else f"TLS with {Path(certs).resolve()}"
    banner = f"SuperLink on {host}:{port}, {mode}; server run store {runs}" + ("" if keys else "; no --keys: encrypted runs will be refused")
    return SuperLinkLaunch(command, environment, banner)


def is_deployment(run_config: dict) -> bool:
    return run_config.get(ENGINE_KEY) == "deployment"


def deployment_job(run_config: dict, environ: dict | None = None) -> ServerJob:
    """Build the job from the run config ``fedaudit run --engine deployment`` wrote."""
    from server.app import job_from_run_config

    env = os.environ if environ is None else environ
    settings = dict(run_config)
    run_id = str(settings.pop(RUN_ID_KEY, "") or "")
    timeout = float(settings.pop(REPLY_TIMEOUT_KEY, DEFAULT_REPLY_TIMEOUT) or DEFAULT_REPLY_TIMEOUT)
    keys_dir = str(settings.pop(KEYS_DIR_KEY, "") or "") or env.get(KEYS_DIR_ENV, "")
    passphrase_env = str(settings.pop(KEYS_PASSPHRASE_KEY, "") or "") or env.get(KEYS_PASSPHRASE_ENV_ENV, "") or None
    settings.pop(ENGINE_KEY, None)
    if not run_id:
        raise BadInput("deployment run config has no run-id")
    encrypt = bool(settings.get("encrypt", True))
    if encrypt and not keys_dir:
        raise BadInput("encryption is on but the SuperLink host has no keys: start it with `fedaudit superlink --keys DIR`")
    runs_dir = settings.get("runs-dir") or env.get(RUNS_DIR_ENV) or None
    settings["runs-dir"] = runs_dir or ""
    store = RunStore(runs_dir)
    placeholder = _take_placeholder(store, run_id)
    try:
        job = job_from_run_config(settings, run_id=run_id, keys_dir=keys_dir or None, keys_passphrase_env=passphrase_env)
    except BaseException:
        if placeholder is not None:  # give the CLI its row back, so it can record the failure
            with store.connect() as conn:
                conn.execute(f"INSERT INTO runs ({', '.join(placeholder)}) VALUES ({', '.join('?' * len(placeholder))})", list(placeholder.values()))
        raise
    job.timeout = timeout
    RunStore(job.runs_dir).update_run(run_id, info={"engine": "deployment", "reply_timeout": timeout})
    return job


def _take_placeholder(store: RunStore, run_id: str) -> dict | None:
    """When the SuperLink and the submitting CLI share one run store, the CLI's
    placeholder row (status running, no rounds) is taken over by the server: it is
    removed here, and returned so it can be put back if the server cannot start."""
    if not store.db_path.exists():
        return None
    with store.connect() as conn:
        row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        rounds = conn.execute("SELECT COUNT(*) FROM rounds WHERE run_id = ?", (run_id,)).fetchone()[0]
        if row["status"] != "running" or rounds or '"submitted"' not in row["info"]:
            raise BadInput(f"run {run_id} already exists in the server's run store {store.root}")
        conn.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
        return dict(row)


def export_run(store: RunStore, run_id: str, keys_dir: str | None) -> dict:
    """The run's rows and files, as one JSON-able bundle."""
    rows = {}
    with store.connect() as conn:
        for table in TABLES:
            rows[table] = [dict(r) for r in conn.execute(f"SELECT * FROM {table} WHERE run_id = ?", (run_id,))]
    run_dir = store.run_dir(run_id)
    files, notes = {}, []
    for name in RESULT_FILES:
        path = run_dir / name
        if not path.exists():
            continue
        if name == "model.safetensors" and path.stat().st_size > MAX_MODEL_BYTES:
            notes.append(f"final model ({path.stat().st_size} bytes) left on the SuperLink host at {path}")
            continue
        files[name] = b64(path.read_bytes())
    if keys_dir and (Path(keys_dir) / "registry.json").exists():
        files["keys/registry.json"] = b64((Path(keys_dir) / "registry.json").read_bytes())
    return {"format": 1, "run_id": run_id, "server_run_dir": str(run_dir), "rows": rows, "files": files, "notes": notes}


def run_deployment(grid, run_config: dict, emit: Callable[[str], None] | None = None) -> dict:
    """The ServerApp's main for a deployment run: run, record, then report into the log."""
    emit = emit or _print
    try:
        job = deployment_job(run_config)
    except Exception as exc:
        emit(event_line("error", stage="prepare", error=_one_line(exc)))
        emit(event_line("end", status="failed", error=_one_line(exc)))
        _let_logs_drain()
        raise
    store = RunStore(job.runs_dir)
    job.on_clients = lambda summaries: emit(event_line("clients", clients=summaries))
    job.on_round = lambda report: emit(event_line("round", **{k: finite_or_none(v) for k, v in asdict(report).items()}))
    emit(event_line("start", run_id=job.run_id, server_run_dir=str(store.run_dir(job.run_id)), delta=job.delta, notes=job.notes))
    started = time.time()
    error = None
    try:
        status = run_federation(grid, job)["status"]
    except Exception as exc:  # recorded as failed, reported, then re-raised for Flower
        status, error = "failed", _one_line(exc)
    except BaseException:
        # `flwr stop` ends the ServerApp through Flower's signal handler (SystemExit):
        # the server's store must not keep the run as running for good.
        store.finish_run(job.run_id, "failed", "stopped on the SuperLink before it finished")
        raise
    store.finish_run(job.run_id, status, error)
    store.update_run(job.run_id, info={"seconds": time.time() - started})
    if error:
        emit(event_line("error", stage="run", error=error))
    try:
        for line in encode_bundle(export_run(store, job.run_id, job.keys_dir)):
            emit(line)
    except Exception as exc:
        emit(event_line("error", stage="bundle", error=_one_line(exc)))
    emit(event_line("end", status=status, error=error))
    _let_logs_drain()
    if error:
        raise RuntimeError(error)
    return {"status": status}


def _print(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _let_logs_drain() -> None:
    # Flower uploads the ServerApp's output every 0.2 s and flushes for up to 3 s at
    # exit; a pause gives a large bundle time to go out before the run is marked done.
    time.sleep(1.5)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(exc, BadInput):  # already a sentence meant for the user
        return first
    return f"{type(exc).__name__}: {first}".rstrip(": ")


