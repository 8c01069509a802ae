"""Submit a run to a running SuperLink and bring its results into the local run store.

This is the library behind ``fedaudit run --engine deployment``:

1. :func:`probe` tells an unreachable SuperLink from a TLS mismatch before anything is
   submitted (Flower itself only says "Connection to the SuperLink is unavailable").
2. :func:`stage_app` writes a minimal Flower app (fedaudit's ``server``, ``clients`` and
   ``shared`` packages and a pyproject.toml whose ``[tool.flwr.app.config]`` is this
   run's resolved config) and :func:`write_flwr_home` a private ``$FLWR_HOME`` holding the
   connection, so the user's ``~/.flwr`` is never touched.
3. ``flwr run APP fedaudit --stream`` submits it and follows the ServerApp's log, where
   :mod:`server.deployment` prints progress and, at the end, the results bundle
   (:mod:`shared.results`). If the stream breaks, ``flwr log`` reads the log again.
4. :func:`import_bundle` writes the bundle into the local run store: files first, then
   every row in one transaction, so a run never looks complete without its model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from server.deployment import DEFAULT_REPLY_TIMEOUT, ENGINE_KEY, REPLY_TIMEOUT_KEY, RUN_ID_KEY, TABLES
from server.federation import RoundReport
from shared.certs import check_ca_file
from shared.config import RunConfig
from shared.crypto import load_registry
from shared.errors import BadInput
from shared.processes import flower_script
from shared.quiet import without_terminal_codes
from shared.results import BundleError, LogReader, unb64
from shared.store import RunStore, atomic_write_bytes, new_run_id

CONNECTION = "fedaudit"
APP_PACKAGES = ("server", "clients", "shared")
PROBE_TIMEOUT = 5.0
_STARTED = re.compile(r"started run (\d+)")


# --------------------------------------------------------------------------- connection
class Unreachable(BadInput):
    """Nothing answers at the SuperLink's address."""


class TLSMismatch(BadInput):
    """Something answers, but not with the TLS settings given."""


@dataclass(frozen=True)
class Connection:
    host: str
    port: int
    root_certificates: Path | None = None  # None with TLS: the system's trusted CAs
    insecure: bool = False

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def describe(self) -> str:
        if self.insecure:
            return f"{self.address} (plain text, --insecure)"
        return f"{self.address} (TLS, CA {self.root_certificates or 'system trust store'})"


def parse_address(text: str) -> tuple[str, int]:
    text = (text or "").strip()
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^\s:/\[\]]+):(\d+)", text)
    if not match:
        raise BadInput(f"--superlink {text!r} must be HOST:PORT, e.g. 127.0.0.1:9093")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise BadInput(f"--superlink port {port} is out of range")
    return host, port


def connection(superlink: str | None, root_certificates: str | Path | None, insecure: bool) -> Connection:
    """Check the connection flags: TLS unless --insecure, never both."""
    if not superlink:
        raise BadInput("--engine deployment needs --superlink HOST:PORT")
    host, port = parse_address(superlink)
    if insecure and root_certificates:
        raise BadInput("--insecure and --root-certificates contradict each other; give one")
    ca = check_ca_file(root_certificates) if root_certificates else None
    return Connection(host, port, ca, insecure)


def probe(conn: Connection, timeout: float = PROBE_TIMEOUT) -> None:
    """Raise :class:`BadInput` with one line if the SuperLink is unreachable or the TLS
    settings do not match it; return quietly if a connection is likely to work."""
    where = f"SuperLink {conn.address}"
    try:
        sock = socket.create_connection((conn.host, conn.port), timeout=timeout)
    except socket.gaierror:
        raise Unreachable(f"{where} is unreachable: cannot resolve host {conn.host!r}") from None
    except ConnectionRefusedError:
        raise Unreachable(f"{where} is unreachable: nothing is listening there (connection refused); is `fedaudit superlink` running on that host and port?") from None
    except TimeoutError:
        raise Unreachable(f"{where} is unreachable: no answer within {timeout:g} s (host down, or the port is filtered by a firewall)") from None
    except OSError as exc:
        raise Unreachable(f"{where} is unreachable: {exc.strerror or exc}") from None
    with sock:
        sock.settimeout(timeout)
        if conn.insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            try:
                context.wrap_socket(sock, server_hostname=conn.host).close()
            except (ssl.SSLError, OSError):
                return  # no TLS: matches --insecure
            raise TLSMismatch(f"TLS mismatch: {where} speaks TLS but --insecure was given; pass --root-certificates CA_FILE instead")
        context = ssl.create_default_context(cafile=str(conn.root_certificates) if conn.root_certificates else None)
        try:
            context.wrap_socket(sock, server_hostname=conn.host).close()
        except ssl.SSLCertVerificationError as exc:
            ca = conn.root_certificates or "the system trust store"
            if exc.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
                raise TLSMismatch(f"TLS mismatch: {where}'s certificate is not valid for {conn.host!r}; recreate it with `fedaudit certs init DIR --host {conn.host}`") from None
            raise TLSMismatch(f"TLS mismatch: {where}'s certificate is not signed by {ca} ({exc.verify_message}); wrong --root-certificates?") from None
        except (ssl.SSLError, ConnectionResetError, TimeoutError, OSError):
            raise TLSMismatch(f"TLS mismatch: {where} does not speak TLS (probably started with --insecure); match it with --insecure, or restart it with --certs") from None


def write_flwr_home(directory: Path, conn: Connection) -> Path:
    """A private $FLWR_HOME with one SuperLink connection named ``fedaudit``."""
    entry: dict = {"address": conn.address}
    if conn.insecure:
        entry["insecure"] = True
    elif conn.root_certificates:
        entry["root-certificates"] = str(conn.root_certificates)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: entry}}))
    return directory


# --------------------------------------------------------------------------- the app
def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


def app_config(config: RunConfig, run_id: str, reply_timeout: float) -> dict:
    """``[tool.flwr.app.config]`` for one deployment run (Flower records hold no None)."""
    values = config.to_toml_dict()
    values.update({ENGINE_KEY: "deployment", RUN_ID_KEY: run_id, REPLY_TIMEOUT_KEY: float(reply_timeout), "runs-dir": ""})
    return values


def stage_app(directory: Path, config: RunConfig, run_id: str, reply_timeout: float) -> Path:
    """Write the Flower app to submit: fedaudit's packages plus a generated pyproject.toml."""
    root = project_root()
    for package in APP_PACKAGES:
        for source in (root / package).rglob("*.py"):
            target = directory / source.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    from shared import __version__

    pyproject = {
        "project": {"name": "fedaudit", "version": __version__, "description": "fedaudit deployment run", "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "fedaudit",
            "components": {"serverapp": "server.app:app", "clientapp": "clients.app:app"},
            "config": app_config(config, run_id, reply_timeout),
        }}},
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return directory


# --------------------------------------------------------------------------- import
def _registry_matches(a: Path, b: Path) -> bool:
    ra, rb = load_registry(a), load_registry(b)
    raw = lambda k: k.public_bytes_raw()  # noqa: E731
    return raw(ra.server_ed25519) == raw(rb.server_ed25519) and raw(ra.server_x25519) == raw(rb.server_x25519)


def import_bundle(store: RunStore, run_id: str, bundle: dict, local_info: dict, keys_dir: Path | None = None) -> list[str]:
    """Write the server's results for ``run_id`` into ``store``; return notes."""
    if bundle.get("run_id") != run_id:
        raise BundleError(f"results bundle is for run {bundle.get('run_id')!r}, expected {run_id!r}")
    notes = list(bundle.get("notes", []))
    run_dir = store.run_dir(run_id)
    files = bundle.get("files", {})
    for name, data in files.items():
        target = (run_dir / name).resolve()
        if run_dir.resolve() not in target.parents:
            raise BundleError(f"results bundle names a file outside the run folder: {name!r}")
        atomic_write_bytes(target, unb64(data))
    server_registry = run_dir / "keys"
    if keys_dir is not None:
        if not (server_registry / "registry.json").exists() or not _registry_matches(keys_dir, server_registry):
            notes.append(f"the server's public keys differ from the registry in --keys {keys_dir}: its audit log will not verify against it")
        trusted = keys_dir
    else:
        trusted = server_registry
        notes.append(f"audit log checked against the public keys the server sent ({server_registry / 'registry.json'}); pass --keys DIR to check it against your own copy")

    rows = bundle["rows"]
    (server_run,) = rows["runs"] or [None]
    if server_run is None:
        raise BundleError("results bundle holds no run record")
    server_info = json.loads(server_run["info"])
    info = {
        **server_info,
        **local_info,
        "engine": "deployment",
        "keys_dir": str(trusted),
        "server_keys_dir": server_info.get("keys_dir"),
        "server_run_dir": bundle.get("server_run_dir"),
        "notes": server_info.get("notes", []) + notes,
    }
    server_run = {**server_run, "info": json.dumps(info)}
    with store.connect() as conn:
        for table in TABLES:
            columns = {r["name"] for r in conn.execute(f"PRAGMA table_info({table})")}
            conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
            for row in ([server_run] if table == "runs" else rows.get(table, [])):
                keys = [k for k in row if k in columns]
                conn.execute(f"INSERT INTO {table} ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})", [row[k] for k in keys])
    return notes


# --------------------------------------------------------------------------- submit
@dataclass
class DeploymentJob:
    run_id: str
    config: RunConfig
    conn: Connection
    runs_dir: str
    keys_dir: Path | None = None
    reply_timeout: float = DEFAULT_REPLY_TIMEOUT
    flower_run_id: int | None = None
    notes: list = field(default_factory=list)


def prepare_deployment(config: RunConfig, conn: Connection, runs_dir, keys_dir=None, reply_timeout: float = DEFAULT_REPLY_TIMEOUT) -> DeploymentJob:
    """Check everything local, probe the SuperLink, then record the run as submitted."""
    if not reply_timeout > 0:
        raise BadInput(f"--reply-timeout must be > 0, got {reply_timeout}")
    if config.canaries or config.canary_clients:
        # Their secret would have to reach the nodes without passing through the SuperLink.
        raise BadInput("--canaries and --canary-clients work on the simulation engine only")
    if keys_dir is not None:
        keys_dir = Path(keys_dir).resolve()
        load_registry(keys_dir)
    flwr_binary()
    probe(conn)
    store = RunStore(runs_dir)
    run_id = new_run_id()
    submitted = {"superlink": conn.address, "tls": not conn.insecure, "at": time.time()}
    store.create_run(run_id, config.to_dict(), info={"engine": "deployment", "submitted": submitted, "notes": []})
    return DeploymentJob(run_id, config, conn, str(store.root), keys_dir, reply_timeout)


def flwr_binary() -> str:
    return flower_script("flwr")


def _env(flwr_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "NO_COLOR": "1", "TERM": "dumb", "PYTHONUNBUFFERED": "1"})
    return env


def _plain(line: str) -> str:
    return without_terminal_codes(line).strip()


def _follow(cmd: list[str], env: dict, cwd: Path, reader: LogReader, on_line: Callable[[str, dict | None], None], timeout: float | None = None) -> tuple[int, list[str]]:
    """Run a flwr command and feed its output line by line to ``reader`` and then to
    ``on_line`` with the event the line carried (parsed once); return (exit code, its own lines)."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace")
    own: list[str] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for line in proc.stdout:
            event = reader.feed(line)
            on_line(line, event)
            if event is None and "@@fedaudit" not in line:
                own.append(line.rstrip())
            if deadline is not None and time.monotonic() > deadline:
                break
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode, own


def _sigterm_as_ctrl_c():
    """SIGTERM (``kill``, ``timeout``) stops a deployment run as Ctrl-C does: on the
    SuperLink too, and recorded as failed. Returns the previous handler (None off the
    main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def run_deployment_job(
    job: DeploymentJob,
    *,
    verbose: bool = False,
    on_event: Callable[[dict], None] | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
    on_clients: Callable[[list[dict]], None] | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict:
    """Submit ``job``, follow it, import its results; return the run's summary."""
    from shared.summary import summarize

    store = RunStore(job.runs_dir)
    reader = LogReader()
    started = time.time()

    def on_line(line: str, event: dict | None) -> None:
        match = _STARTED.search(line)
        if match and job.flower_run_id is None:
            job.flower_run_id = int(match.group(1))
            store.update_run(job.run_id, info={"flower_run_id": job.flower_run_id})
        if event is not None:
            name = event.get("event")
            if name == "round" and on_round:
                on_round(RoundReport(**{k: event.get(k) for k in RoundReport.__dataclass_fields__}))
            elif name == "clients" and on_clients:
                on_clients(event["clients"])
            if on_event:
                on_event(event)
        elif verbose and echo and "@@fedaudit-chunk" not in line:
            echo(line.rstrip())

    error = None
    interrupted = False
    previous_term = _sigterm_as_ctrl_c()
    try:
        with tempfile.TemporaryDirectory(prefix="fedaudit-deploy-") as tmp:
            tmp_path = Path(tmp)
            env = _env(write_flwr_home(tmp_path / "flwr-home", job.conn))
            app_dir = stage_app(tmp_path / "app", job.config, job.run_id, job.reply_timeout)
            flwr = flwr_binary()
            try:
                code, own = _follow([flwr, "run", str(app_dir), CONNECTION, "--stream"], env, tmp_path, reader, on_line)
                if not reader.has_bundle and job.flower_run_id is not None and reader.last("end") is None:
                    # The stream broke off early: read the whole log again once the run is over.
                    _, more = _follow([flwr, "log", str(job.flower_run_id), CONNECTION, "--stream"], env, tmp_path, reader, on_line)
                    own += more
            except KeyboardInterrupt:
                # Ctrl-C: stop it on the SuperLink too, and report it like any failed run.
                interrupted = True
                # Set first: a second Ctrl-C during `flwr stop` still records the run failed.
                error = "interrupted: the run was stopped on the SuperLink" if job.flower_run_id is not None else "interrupted before the SuperLink took the run"
                if job.flower_run_id is not None:
                    subprocess.run([flwr, "stop", str(job.flower_run_id), CONNECTION], env=env, cwd=tmp_path, capture_output=True, timeout=60)
            if interrupted:
                pass  # recorded as failed below, with the error set above
            elif job.flower_run_id is None:
                tail = "; ".join(line for line in own if line.strip())[-400:]
                error = f"flwr run could not submit the run (exit code {code}): {tail or 'no output'}"
            elif reader.has_bundle:
                notes = import_bundle(store, job.run_id, reader.bundle(), {"flower_run_id": job.flower_run_id, "submitted_at": started,
                                                                             "submitted": store.get_run(job.run_id).info.get("submitted")}, job.keys_dir)
                job.notes.extend(notes)
            else:
                failure = reader.last("error") or reader.last("end") or {}
                last = next((_plain(line) for line in reversed(own) if _plain(line)), "")
                error = failure.get("error") or (
                    f"no results from the ServerApp (flower run {job.flower_run_id}); last log line: {last[:300] or 'none'}; rerun with --verbose to see the log")
    except BundleError as exc:
        error = f"could not read the server's results: {exc}"
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        if error is not None:
            store.finish_run(job.run_id, "failed", error)
            store.update_run(job.run_id, info={"seconds": time.time() - started})
    summary = summarize(store, job.run_id)
    summary["engine"] = "deployment"
    summary["flower_run_id"] = job.flower_run_id
    summary["superlink"] = job.conn.address
    summary["notes"] = list(summary.get("notes", []))
    return summary
