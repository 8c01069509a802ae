"""The Deployment Engine: certificates, the pre-submit probe, the results channel, and
real loopback federations (SuperLink + SuperNodes with TLS, started through the
`fedaudit superlink` / `fedaudit supernode` commands).

Tests marked ``deployment`` start real Flower processes and take minutes; skip them with
``-m "not deployment"``. Every process they start is stopped by its process group,
even when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from cli import app
from server.submit import Connection, TLSMismatch, Unreachable, app_config, probe
from shared.certs import init_certs
from shared.config import resolve
from shared.errors import BadInput
from shared.results import BundleError, LogReader, encode_bundle
from tests.conftest import ROOT, run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- certificates
def test_certs_init_makes_a_ca_and_a_server_certificate_for_the_hosts(tmp_path):
    result = CliRunner().invoke(app, ["certs", "init", str(tmp_path / "certs"), "--host", "127.0.0.1", "--host", "fl.example.org", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["hosts"]) == {"127.0.0.1", "fl.example.org"}
    cert = x509.load_pem_x509_certificate(Path(report["server_cert"]).read_bytes())
    ca = x509.load_pem_x509_certificate(Path(report["ca_cert"]).read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert oct((tmp_path / "certs" / "server.key").stat().st_mode & 0o777) == "0o600"
    again = CliRunner().invoke(app, ["certs", "init", str(tmp_path / "certs")])
    assert again.exit_code == 2 and "refusing to overwrite" in again.stderr


def test_certs_default_hosts_are_loopback(tmp_path):
    paths = init_certs(tmp_path / "c")
    from shared.certs import certificate_hosts

    assert set(certificate_hosts(paths.server_cert)) == {"127.0.0.1", "localhost"}
    with pytest.raises(BadInput, match="neither an IP address nor a DNS name"):
        init_certs(tmp_path / "d", ["bad host"])


# --------------------------------------------------------------------------- probe (no Flower)
class _Server:
    """A throw-away TCP server on loopback, plain or TLS, that accepts and hangs up."""

    def __init__(self, context: ssl.SSLContext | None = None):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.context = context
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                if self.context is not None:
                    conn = self.context.wrap_socket(conn, server_side=True)
                else:
                    conn.settimeout(2)
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    def close(self):
        self.sock.close()


@pytest.fixture
def certs(tmp_path):
    return init_certs(tmp_path / "certs")


@pytest.fixture
def tls_server(certs):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    server = _Server(context)
    yield server
    server.close()


def test_probe_unreachable_is_not_called_a_tls_problem():
    with pytest.raises(Unreachable, match="nothing is listening"):
        probe(Connection("127.0.0.1", free_port(), insecure=True))


def test_probe_accepts_matching_tls(tls_server, certs):
    probe(Connection("127.0.0.1", tls_server.port, certs.ca_cert))
    probe(Connection("localhost", tls_server.port, certs.ca_cert))


def test_probe_insecure_against_tls_is_a_mismatch(tls_server):
    with pytest.raises(TLSMismatch, match="speaks TLS but --insecure was given"):
        probe(Connection("127.0.0.1", tls_server.port, insecure=True))


def test_probe_wrong_ca_is_a_mismatch(tls_server, tmp_path):
    other = init_certs(tmp_path / "other")
    with pytest.raises(TLSMismatch, match="not signed by"):
        probe(Connection("127.0.0.1", tls_server.port, other.ca_cert))


def test_probe_tls_against_plain_text_is_a_mismatch(certs):
    server = _Server()
    try:
        with pytest.raises(TLSMismatch, match="does not speak TLS"):
            probe(Connection("127.0.0.1", server.port, certs.ca_cert))
        probe(Connection("127.0.0.1", server.port, insecure=True))
    finally:
        server.close()


def test_run_against_nothing_is_one_line_exit_2_and_writes_nothing(tmp_path):
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["run", "--engine", "deployment", "--superlink", f"127.0.0.1:{free_port()}", "--insecure", "--runs-dir", str(runs)])
    message = result.stderr.strip()
    assert result.exit_code == 2, result.output
    assert message.startswith("error: SuperLink 127.0.0.1:") and "unreachable" in message
    assert len(message.splitlines()) == 1 and "Traceback" not in result.output
    assert not runs.exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "--engine", "deployment"], "needs --superlink HOST:PORT"),
        (["run", "--engine", "deployment", "--superlink", "localhost"], "must be HOST:PORT"),
        (["run", "--engine", "deployment", "--superlink", "127.0.0.1:9", "--insecure", "--root-certificates", "x.crt"], "contradict"),
        (["run", "--engine", "deployment", "--superlink", "127.0.0.1:9", "--root-certificates", "/nonexistent/ca.crt"], "not found"),
        (["run", "--engine", "warp"], "unknown --engine"),
        (["run", "--insecure"], "--insecure needs --engine deployment"),
        (["superlink"], "TLS is on by default"),
        (["superlink", "--certs", "/nonexistent"], "not found"),
        (["supernode", "--superlink", "127.0.0.1:9", "--insecure", "--partition-id", "3", "--num-partitions", "2"], "--partition-id must be in"),
        (["supernode", "--superlink", "127.0.0.1:9", "--insecure", "--partition-id", "0", "--num-partitions", "2", "--data-dir", "{t}"],
         "no .csv or .parquet files in data folder"),
        (["supernode", "--superlink", "127.0.0.1:9", "--insecure", "--partition-id", "0", "--num-partitions", "2", "--data-dir", "{t}/files/text.csv"],
         "non-numeric column(s) in text.csv: colour"),
        (["supernode", "--superlink", "127.0.0.1:9", "--insecure", "--partition-id", "0", "--num-partitions", "2", "--data-dir", "{t}/files/gaps.csv"],
         "NaN or infinite values in column(s) of gaps.csv: b"),
        (["supernode", "--superlink", "127.0.0.1:9", "--insecure", "--partition-id", "0", "--num-partitions", "2", "--data-dir", "{t}/files/empty.csv"],
         "empty.csv has no data rows"),
        (["superlink", "--insecure", "--runs-dir", "{t}/a-file"], "cannot create run store"),
        (["superlink", "--insecure", "--runs-dir", "{t}/r", "--log-file", "{t}/missing/x.log"], "cannot open --log-file"),
        (["supernode", "--superlink", "127.0.0.1:9", "--insecure", "--partition-id", "0", "--num-partitions", "2", "--log-file", "{t}/missing/x.log"],
         "cannot open --log-file"),
        (["keys", "init", "{t}/a-file/keys", "--clients", "2"], "cannot create key directory"),
        (["certs", "init", "{t}/a-file/certs"], "cannot create certificate directory"),
    ],
)
def test_deployment_bad_input(args, expected, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "text.csv").write_text("a,colour,label\n1.0,red,0\n2.0,blue,1\n")
    (tmp_path / "files" / "gaps.csv").write_text("a,b,label\n1.0,,0\n2.0,3.0,1\n")
    (tmp_path / "files" / "empty.csv").write_text("a,b,label\n")
    args = [a.format(t=tmp_path) for a in args]
    result = CliRunner().invoke(app, [*args, *(["--runs-dir", str(tmp_path / "r")] if args[0] == "run" else [])])
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # nothing written


@pytest.mark.parametrize("command", ["certs init", "superlink", "supernode"])
def test_deployment_commands_have_help(command):
    result = CliRunner().invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


# --------------------------------------------------------------------------- results channel
def test_results_bundle_survives_a_noisy_log():
    bundle = {"run_id": "r", "rows": {"runs": [{"x": 1.5}]}, "files": {"a": os.urandom(100_000).hex()}}
    lines = ["INFO : starting", *encode_bundle(bundle)]
    assert sum(1 for line in lines if line.startswith("@@fedaudit-chunk")) > 1
    reader = LogReader()
    # Flower may prefix lines; the marker is found anywhere in a line.
    events = list(reader.feed_all(("prefix " + line if i % 2 else line) + "\n" for i, line in enumerate(lines)))
    assert [e["event"] for e in events] == ["bundle"]
    assert reader.bundle() == bundle


def test_results_bundle_detects_missing_and_corrupt_chunks():
    lines = encode_bundle({"run_id": "r", "blob": os.urandom(100_000).hex()})
    reader = LogReader()
    list(reader.feed_all(lines[:-1]))
    with pytest.raises(BundleError, match="incomplete"):
        reader.bundle()
    reader = LogReader()
    list(reader.feed_all([*lines[:-1], lines[-1][:-8] + "AAAAAAAA"]))
    with pytest.raises(BundleError):
        reader.bundle()


def test_app_config_holds_no_none_and_names_the_run():
    values = app_config(resolve(None, dataset="digits", clients=2, rounds=2), "run-1", 120.0)
    assert None not in values.values()
    assert values["run-id"] == "run-1" and values["fedaudit-engine"] == "deployment" and values["reply-timeout"] == 120.0


def test_server_takes_over_the_cli_placeholder_in_a_shared_store(tmp_path):
    from server.deployment import deployment_job
    from shared.store import RunStore

    store = RunStore(tmp_path / "runs")
    env = {"FEDAUDIT_RUNS_DIR": str(store.root)}
    store.create_run("r1", {}, info={"engine": "deployment", "submitted": {}})
    job = deployment_job(app_config(resolve(None, dataset="digits", clients=2, rounds=1, encrypt=False), "r1", 60.0), environ=env)
    assert job.run_id == "r1" and job.timeout == 60.0
    record = store.get_run("r1")
    assert record.info["engine"] == "deployment" and record.config["clients"] == 2
    # The server cannot start: the CLI's row is put back, so the failure can be recorded.
    store.create_run("r2", {}, info={"engine": "deployment", "submitted": {}})
    with pytest.raises(BadInput, match="fewer than --batch-size"):
        deployment_job(app_config(resolve(None, dataset="digits", clients=2, rounds=1, encrypt=False, batch_size=5000), "r2", 60.0), environ=env)
    assert store.get_run("r2").status == "running"
    with pytest.raises(BadInput, match="no keys"):
        deployment_job(app_config(resolve(None, dataset="digits", clients=2, rounds=1), "r3", 60.0), environ=env)


def _fake_flwr(tmp_path, body: str) -> str:
    script = tmp_path / "flwr"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize(
    "body, expected",
    [
        ("echo 'Successfully started run 42'\necho 'RuntimeError: boom'\n", "last log line: RuntimeError: boom"),
        ("echo 'Successfully started run 42'\necho '@@fedaudit {\"event\": \"error\", \"error\": \"only 1 of 2 client nodes connected\"}'\n", "only 1 of 2 client nodes"),
        ("echo 'Connection to the SuperLink is unavailable' >&2\nexit 1\n", "could not submit the run (exit code 1): Connection to the SuperLink"),
    ],
)
def test_a_failed_deployment_run_is_recorded_failed(tmp_path, monkeypatch, body, expected):
    import server.submit as submit
    from shared.store import RunStore

    monkeypatch.setattr(submit, "flwr_binary", lambda: _fake_flwr(tmp_path, body))
    store = RunStore(tmp_path / "runs")
    store.create_run("r1", {"dp": True}, info={"engine": "deployment", "submitted": {}})
    job = submit.DeploymentJob("r1", resolve(None, clients=2, rounds=1), Connection("127.0.0.1", 9, insecure=True), str(store.root))
    summary = submit.run_deployment_job(job)
    assert summary["status"] == "failed" and expected in summary["error"], summary["error"]
    assert store.get_run("r1").status == "failed"
    resumed = CliRunner().invoke(app, ["run", "--resume", "r1", "--runs-dir", str(store.root)])
    assert resumed.exit_code == 2 and "ran on the Deployment Engine" in resumed.stderr, resumed.output
    assert "Traceback" not in resumed.output and store.get_run("r1").status == "failed"


def test_node_config_keys_override_the_message(tmp_path, monkeypatch):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from clients.encryption import encryption_mod, encryption_settings
    from shared.crypto import init_keys

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    msg = Message(RecordDict({"config": ConfigRecord({"keys-dir": "/server/side/keys"})}), dst_node_id=1, message_type="train")

    def ctx(node_config):
        return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})

    assert encryption_settings(msg, ctx({"partition-id": 0})) == ("/server/side/keys", "")  # simulation
    assert encryption_settings(msg, ctx({"partition-id": 0, "keys-dir": "/node/keys"})) == ("/node/keys", "")
    assert encryption_settings(msg, ctx({"partition-id": 0, "keys-dir": ""})) is None  # a node without keys

    # A node holding keys refuses a plaintext model even when the server's config says encryption is off.
    keys = init_keys(tmp_path / "keys", 1)
    plain = Message(RecordDict({"config": ConfigRecord({"keys-dir": "", "run-id": "r", "server-round": 1}),
                                "arrays": ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})}), dst_node_id=1, message_type="train")
    trained = []
    reply = encryption_mod(plain, ctx({"partition-id": 0, "keys-dir": str(keys)}), lambda m, c: trained.append(1))
    assert reply.has_error() and "plaintext" in reply.error.reason and not trained


def test_the_server_rechecks_delta_and_batch_size_against_what_nodes_hold():
    """Nodes with --data-dir hold their own records: preflight's sizes are not theirs."""
    from server.federation import FederationError, ServerJob, check_sizes

    config = resolve(None, clients=2, batch_size=16)
    job = ServerJob(run_id="r", config=config, delta=1e-4, runs_dir="/nonexistent", model_name="logreg")
    check_sizes(job, [5000, 2000])
    with pytest.raises(FederationError, match="not below 1/.*= 1/12000"):
        check_sizes(job, [20000, 12000])
    with pytest.raises(FederationError, match="fewer than --batch-size 16"):
        check_sizes(job, [2000, 10])
    check_sizes(ServerJob(run_id="r", config=resolve(None, clients=2, dp=False), delta=1e-3, runs_dir="/x", model_name="logreg"), [900, 900])


def test_ray_address_is_refused_with_the_deployment_engine(tmp_path):
    proc = run_cli("run", "--engine", "deployment", "--superlink", "127.0.0.1:9", "--insecure", "--ray-address", "auto", runs_dir=tmp_path)
    assert proc.returncode == 2 and "--ray-address is for the simulation engine" in proc.stderr and "Traceback" not in proc.stderr


def test_local_node_data(tmp_path):
    from shared.data import local_client_data

    frame = pd.DataFrame(np.random.default_rng(0).normal(size=(50, 3)), columns=["a", "b", "c"])
    frame["label"] = np.arange(50) % 3
    frame.to_csv(tmp_path / "mine.csv", index=False)
    data = local_client_data(str(tmp_path), None, 0.2, 0, 3)
    assert len(data.y_train) == 40 and len(data.y_val) == 10
    with pytest.raises(BadInput, match="must lie in 0..1"):
        local_client_data(str(tmp_path / "mine.csv"), "label", 0.2, 0, 2)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def _cmdline(pid: int) -> list[str]:
    return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]


@pytest.mark.deployment
def test_plain_text_superlink_and_the_wrappers_sigterm(tmp_path):
    """Real `fedaudit superlink --insecure` and `fedaudit supernode` (one SuperLink for all
    of this: each start costs seconds).

    - Flower's processes get the flag and variable that disable runtime dependency installation.
    - TLS settings against the plain-text SuperLink are a named mismatch, and an encrypted run
      on a SuperLink without --keys is recorded as failed with the reason.
    - SIGTERM to a wrapper's PID alone (not its group) leaves none of its descendants alive.
    """
    from shared.processes import alive, descendants

    port = free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "PYTHONPATH": str(ROOT)}
    env.pop("FEDAUDIT_RUNS_DIR", None)
    commands = {
        "superlink": ["superlink", "--insecure", "--port", str(port), "--runs-dir", str(tmp_path / "server-runs")],
        "supernode": ["supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--partition-id", "0", "--num-partitions", "1",
                      "--port", str(free_port())],
    }
    processes = CliProcesses(tmp_path, env)
    try:
        for name, args in commands.items():
            wrapper = processes.start(name, *args)
            flower = f"flower-{name}"
            deadline = time.time() + 90
            while not any(flower in " ".join(_cmdline(p)) for p in descendants(wrapper.pid) if alive(p)):
                assert time.time() < deadline and wrapper.poll() is None, f"fedaudit {name} did not start {flower}"
                time.sleep(0.5)
            process = next(p for p in descendants(wrapper.pid) if flower in " ".join(_cmdline(p)))
            assert _environ(process).get("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION") == "1", name
            if name == "superlink":
                assert "--disable-runtime-dependency-installation" in _cmdline(process)
                _wait_for_port(port, wrapper)

        ca = init_certs(tmp_path / "certs").ca_cert
        runs = tmp_path / "runs"
        base = ("run", "--engine", "deployment", "--superlink", f"127.0.0.1:{port}", "--clients", "2", "--rounds", "1", "--runs-dir", str(runs))
        mismatch = run_cli(*base, "--root-certificates", str(ca), env=env, timeout=120)
        assert mismatch.returncode == 2 and "does not speak TLS" in mismatch.stderr and not runs.exists()
        failed = run_cli(*base, "--insecure", "--json", env=env, timeout=300)
        assert failed.returncode == 1, failed.stderr
        summary = json.loads(failed.stdout)
        assert summary["status"] == "failed" and "no keys" in summary["error"]
        listed = json.loads(run_cli("runs", "--json", runs_dir=runs).stdout)["runs"]
        assert [(r["run_id"], r["status"]) for r in listed] == [(summary["run_id"], "failed")]

        for name in reversed(list(commands)):
            wrapper = processes.procs[name]
            below = descendants(wrapper.pid)
            os.kill(wrapper.pid, signal.SIGTERM)  # the wrapper alone: it must forward the signal
            wrapper.wait(timeout=30)
            deadline = time.time() + 15
            while time.time() < deadline and any(alive(p) for p in below):
                time.sleep(0.2)
            assert below and not [p for p in below if alive(p)], f"{name} left processes running"
    finally:
        processes.stop()


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.time() < deadline and proc.poll() is None, "the SuperLink did not start listening"
            time.sleep(0.5)


def test_stop_tree_kills_orphaned_grandchildren():
    from shared.processes import alive, descendants, stop_tree

    # The shell ignores SIGTERM and its children would outlive it.
    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 300 & sleep 300 & wait"], start_new_session=True)
    try:
        deadline = time.time() + 10
        while len(descendants(proc.pid)) < 2 and time.time() < deadline:
            time.sleep(0.1)
        kids = descendants(proc.pid)
        assert len(kids) >= 2
        stop_tree(proc, grace=1.0)
        time.sleep(0.3)
        assert proc.poll() is not None
        assert not any(alive(k) for k in kids)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- loopback federations
class CliProcesses:
    """`fedaudit` CLI processes, each in its own process group with its output in
    ``base/NAME.out``; everything seen below them is remembered by PID and start time,
    so :meth:`stop` can kill leftovers by PID (and never a reused PID)."""

    def __init__(self, base: Path, env: dict):
        self.base, self.env = base, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.pids: dict[int, str] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.base / f"{name}.out", "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=ROOT, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        self._remember([proc.pid])
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a whole process group by its id (the PID of its leader)."""
        self._remember_descendants()
        try:
            os.killpg(self.procs[name].pid, sig)
        except ProcessLookupError:
            pass

    def _remember_descendants(self) -> None:
        from shared.processes import descendants

        for proc in self.procs.values():
            self._remember(descendants(proc.pid))

    def _remember(self, pids) -> None:
        from shared.processes import start_time

        for pid in pids:
            self.pids.setdefault(pid, start_time(pid))

    def stop(self) -> None:
        from shared.processes import start_time

        for name in self.procs:
            self.kill(name, signal.SIGTERM)
        deadline = time.time() + 20
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left, in its group or out of it, is killed by the PID it had (and
        # only if that PID still names the same process, not a reused one).
        for pid, started in self.pids.items():
            if started and start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            proc.wait(timeout=10)


class Federation:
    """A SuperLink and SuperNodes on 127.0.0.1 with TLS, each in its own process group."""

    def __init__(self, base: Path, nodes: int, data_dirs: dict[int, Path] | None = None):
        self.base = base
        self.env = {**os.environ, "FLWR_HOME": str(base / "flwr-home"), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.env.pop("FEDAUDIT_RUNS_DIR", None)
        self.processes = CliProcesses(base, self.env)
        self.certs = base / "certs"
        self.keys = base / "keys"
        self.server_runs = base / "server-runs"
        self.port = free_port()
        try:
            assert run_cli("certs", "init", str(self.certs), env=self.env).returncode == 0
            assert run_cli("keys", "init", str(self.keys), "--clients", str(nodes), env=self.env).returncode == 0
            link = self.processes.start("superlink", "superlink", "--certs", str(self.certs), "--port", str(self.port), "--keys",
                                        str(self.keys), "--runs-dir", str(self.server_runs), "--log-file", str(base / "superlink.log"))
            _wait_for_port(self.port, link)
            for i in range(nodes):
                extra = ["--data-dir", str(data_dirs[i])] if data_dirs and i in data_dirs else []
                self.processes.start(f"node{i}", "supernode", "--superlink", f"127.0.0.1:{self.port}", "--root-certificates",
                                     str(self.certs / "ca.crt"), "--partition-id", str(i), "--num-partitions", str(nodes),
                                     "--port", str(free_port()), "--keys", str(self.keys), "--log-file", str(base / f"node{i}.log"), *extra)
        except BaseException:
            self.stop()  # a half-started federation must not outlive the test
            raise

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.processes.kill(name, sig)

    def stop(self) -> None:
        self.processes.stop()

    def run(self, *args: str, runs_dir: Path, timeout: float = 900) -> subprocess.CompletedProcess:
        return run_cli("run", "--engine", "deployment", "--superlink", f"127.0.0.1:{self.port}", *args, "--runs-dir", str(runs_dir),
                       env=self.env, timeout=timeout)


class LoopbackJob:
    """The loopback federation and its deployment run, started in the background.

    The run is mostly waiting (a fresh process per message, and a minute for the
    SuperLink to notice the killed node), so tests/conftest.py starts it when the session
    starts and moves the tests that read it to the end: it overlaps the rest of the suite.

    Federation: a SuperLink and 2 TLS SuperNodes on 127.0.0.1; node 0 reads its own file
    (--data-dir). Run: an encrypted, private 2-round job; node 1 is SIGKILLed (its whole
    process group) once round 1 is in the server's store, and with --min-replies 1 the
    run goes on with node 0 (one federation for all the checks: each costs minutes).
    """

    def __init__(self, base: Path):
        self.base = base
        self.federation: Federation | None = None
        self._ready = threading.Event()
        self._outcome: tuple | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="loopback-deployment", daemon=True)

    def start(self) -> LoopbackJob:
        self._thread.start()
        return self

    def _work(self) -> None:
        try:
            self.federation = Federation(self.base, nodes=2, data_dirs={0: _node0_data(self.base)})
            self._ready.set()
            self._outcome = self._run(self.federation)
        except BaseException as exc:  # handed to the test that reads the outcome
            self._error = exc
        finally:
            self._ready.set()

    def _run(self, federation: Federation) -> tuple:
        runs = self.base / "local-runs"
        args = ["run", "--engine", "deployment", "--superlink", f"127.0.0.1:{federation.port}", "--root-certificates",
                str(federation.certs / "ca.crt"), "--dataset", "digits", "--clients", "2", "--rounds", "2", "--seed", "7",
                "--model", "logreg", "--dp", "--encrypt", "--min-replies", "1", "--reply-timeout", "150", "--runs-dir", str(runs), "--json"]
        started = time.time()
        out_path = self.base / "run.out"
        with open(out_path, "w") as out:
            run = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=ROOT, env=federation.env, stdout=out, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
            try:
                db = federation.server_runs / "runs.db"
                deadline = time.time() + 600
                while time.time() < deadline and run.poll() is None and not (db.exists() and _rounds_done(db) >= 1):
                    time.sleep(1)
                assert run.poll() is None, "the run ended before round 1 was recorded: " + run.stderr.read()[-3000:] + _logs(federation)
                assert time.time() < deadline, "round 1 was not recorded within 10 minutes" + _logs(federation)
                federation.kill("node1")
                _, stderr = run.communicate(timeout=900)
            finally:
                if run.poll() is None:
                    os.killpg(run.pid, signal.SIGKILL)
        assert run.returncode == 0, stderr[-3000:] + _logs(federation)
        return json.loads(out_path.read_text()), runs, time.time() - started

    def running_federation(self) -> Federation:
        self._ready.wait(timeout=900)
        if self.federation is None:
            raise RuntimeError(f"the loopback federation did not start: {self._error!r}")
        return self.federation

    def outcome(self) -> tuple:
        self._thread.join(timeout=1800)
        if self._error is not None:
            raise self._error
        assert self._outcome is not None, "the loopback run did not finish within 30 minutes"
        return self._outcome

    def stop(self) -> None:
        if self.federation is not None:
            self.federation.stop()


def test_a_usable_node_file_passes_the_start_up_check(tmp_path):
    from clients.node import supernode_config
    from shared.data import local_client_data

    folder = _node0_data(tmp_path)
    config = supernode_config(partition_id=0, num_partitions=2, keys=None, keys_passphrase_env=None, data_dir=folder)
    assert config["data-dir"] == str(folder.resolve())
    assert len(local_client_data(config["data-dir"], "label", 0.1, 0, 10).y_train) == 405  # what the run will read


def _node0_data(base: Path) -> Path:
    """Node 0's own file: 450 rows of its digits partition as a CSV (not the partition's
    ~720 rows, to tell the two apart)."""
    from shared.data import client_data

    part = client_data(resolve(None, dataset="digits", clients=2, seed=7).data_spec, 0)
    x, y = np.concatenate([part.x_train, part.x_val]), np.concatenate([part.y_train, part.y_val])
    frame = pd.DataFrame(x, columns=[f"p{i}" for i in range(x.shape[1])])
    frame["label"] = y
    (base / "node0-data").mkdir()
    frame.iloc[:450].to_csv(base / "node0-data" / "digits-part.csv", index=False)
    return base / "node0-data"


LOOPBACK_FIXTURES = {"loopback", "loopback_run"}
_loopback_job: LoopbackJob | None = None


def start_loopback(tmp_path_factory) -> LoopbackJob:
    """The session's loopback job, started once: by conftest.py at collection time, or
    here by the first test that needs it. conftest.py stops it when the session ends."""
    global _loopback_job
    if _loopback_job is None:
        _loopback_job = LoopbackJob(tmp_path_factory.mktemp("loopback")).start()
    return _loopback_job


def stop_loopback() -> None:
    if _loopback_job is not None:
        _loopback_job.stop()


@pytest.fixture(scope="session")
def loopback_job(tmp_path_factory) -> LoopbackJob:
    return start_loopback(tmp_path_factory)


@pytest.fixture(scope="session")
def loopback(loopback_job) -> Federation:
    return loopback_job.running_federation()


@pytest.fixture(scope="session")
def loopback_run(loopback_job) -> tuple:
    return loopback_job.outcome()


def _logs(federation: Federation) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(federation.base.glob("*.out")))


@pytest.mark.deployment
def test_loopback_tls_run_lands_in_the_local_store(loopback_run, loopback):
    summary, runs, seconds = loopback_run
    print(f"loopback deployment run (2 nodes, one killed, 2 rounds, TLS, DP, encrypted): {seconds:.1f} s")
    assert summary["status"] == "completed" and summary["engine"] == "deployment"
    assert summary["rounds"] == 2 and summary["encrypted"] is True
    assert summary["epsilon"] > 0 and summary["delta"] > 0
    assert summary["accuracy"] > 0.5
    # Node 0 read its own file (450 rows: 405 to train, 45 to validate), not its partition.
    sizes = {c["client"]: (c["num_train"], c["num_val"]) for c in summary["clients"]}
    assert sizes[0] == (405, 45) and sizes[1][0] > 400
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == runs.resolve()
    for name in ("model.safetensors", "model.json", "audit.jsonl", "audit.jsonl.sig", "config.toml", "keys/registry.json"):
        assert (run_dir / name).is_file(), name
    # The server kept its own copy on the SuperLink host.
    assert (loopback.server_runs / summary["run_id"] / "audit.jsonl").read_bytes() == (run_dir / "audit.jsonl").read_bytes()

    shown = json.loads(run_cli("show", summary["run_id"], "--json", runs_dir=runs).stdout)
    assert shown["status"] == "completed" and [r["round"] for r in shown["rounds"]] == [1, 2]
    ledger = [c for r in shown["rounds"] for c in r["clients"] if c["steps"]]
    assert {c["client"] for c in ledger} == {0, 1} and all(c["epsilon"] > 0 for c in ledger)


@pytest.mark.deployment
def test_run_survives_a_supernode_killed_mid_run(loopback_run):
    summary, runs, _ = loopback_run
    assert summary["status"] == "completed" and summary["rounds"] == 2
    shown = json.loads(run_cli("show", summary["run_id"], "--json", runs_dir=runs).stdout)
    trained = [{c["client"] for c in r["clients"] if c["num_examples"]} for r in shown["rounds"]]
    assert trained == [{0, 1}, {0}]  # node 1 was killed after round 1
    listed = json.loads(run_cli("runs", "--json", runs_dir=runs).stdout)["runs"]
    assert [r["run_id"] for r in listed] == [summary["run_id"]]


@pytest.mark.deployment
def test_loopback_audit_log_verifies(loopback_run, loopback):
    summary, runs, _ = loopback_run
    verified = run_cli("verify", summary["run_id"], "--json", runs_dir=runs)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["ok"] is True
    # Also against the operator's own copy of the public keys.
    own = run_cli("verify", summary["run_id"], "--keys", str(loopback.keys), "--json", runs_dir=runs)
    assert own.returncode == 0 and json.loads(own.stdout)["entries"] >= 4
    kinds = [json.loads(line)["kind"] for line in (Path(summary["run_dir"]) / "audit.jsonl").read_text().splitlines()]
    assert kinds[0] == "run-start" and kinds[-1] == "run-end" and kinds.count("round") == 2


@pytest.mark.deployment
def test_loopback_run_can_be_audited(loopback_run):
    summary, runs, _ = loopback_run
    proc = run_cli("audit", summary["run_id"], "--reference-models", "0", "--json", runs_dir=runs)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["utility"]["accuracy"] == pytest.approx(summary["accuracy"])


@pytest.mark.deployment
@pytest.mark.parametrize("args, expected", [(["--insecure"], "speaks TLS but --insecure was given"), (["--root-certificates", "OTHER"], "not signed by")])
def test_loopback_tls_mismatch_is_named_before_submitting(loopback, args, expected, tmp_path):
    if "OTHER" in args:
        args = ["--root-certificates", str(init_certs(tmp_path / "other").ca_cert)]
    proc = loopback.run(*args, "--rounds", "1", runs_dir=tmp_path / "runs", timeout=120)
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr.strip()
    assert message.startswith("error: TLS mismatch") and expected in message and len(message.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def _rounds_done(db: Path) -> int:
    import sqlite3

    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM rounds WHERE model_sha256 IS NOT NULL").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_ctrl_c_on_a_deployment_run_records_it_failed_and_returns_its_summary(tmp_path, monkeypatch):
    import server.submit as submit
    from shared.store import RunStore

    # `flwr run` sees the run start, then the user presses Ctrl-C (SIGINT to fedaudit).
    body = 'if [ "$1" = run ]; then echo "Successfully started run 42"; sleep 1; kill -INT $PPID; exec sleep 30; fi\n'
    monkeypatch.setattr(submit, "flwr_binary", lambda: _fake_flwr(tmp_path, body))
    store = RunStore(tmp_path / "runs")
    store.create_run("r1", {"dp": True}, info={"engine": "deployment", "submitted": {}})
    job = submit.DeploymentJob("r1", resolve(None, clients=2, rounds=1), Connection("127.0.0.1", 9, insecure=True), str(store.root))
    summary = submit.run_deployment_job(job)
    assert summary["status"] == "failed" and summary["error"] == "interrupted: the run was stopped on the SuperLink"
    assert store.get_run("r1").status == "failed"
    # SIGTERM (kill, timeout) the same way, and the previous handler is back afterwards.
    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(submit, "flwr_binary", lambda: _fake_flwr(tmp_path, body.replace("-INT", "-TERM")))
    store.create_run("r2", {"dp": True}, info={"engine": "deployment", "submitted": {}})
    job = submit.DeploymentJob("r2", resolve(None, clients=2, rounds=1), Connection("127.0.0.1", 9, insecure=True), str(store.root))
    assert submit.run_deployment_job(job)["status"] == "failed" and store.get_run("r2").status == "failed"
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_server_app_stopped_by_flower_records_its_run_failed(tmp_path, monkeypatch):
    import server.deployment as deployment
    from shared.store import RunStore

    store = RunStore(tmp_path / "runs")
    monkeypatch.setenv("FEDAUDIT_RUNS_DIR", str(store.root))
    store.create_run("r1", {}, info={"engine": "deployment", "submitted": {}})

    def stopped(grid, job):
        raise SystemExit(1)  # what Flower's SIGTERM handler raises after `flwr stop`

    monkeypatch.setattr(deployment, "run_federation", stopped)
    with pytest.raises(SystemExit):
        deployment.run_deployment(None, app_config(resolve(None, dataset="digits", clients=2, rounds=1, encrypt=False), "r1", 60.0), emit=lambda line: None)
    record = store.get_run("r1")
    assert record.status == "failed" and "stopped on the SuperLink" in record.error


def test_superlink_on_a_taken_port_is_named(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["superlink", "--insecure", "--port", str(port), "--runs-dir", str(tmp_path / "r")])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr, result.output


@pytest.mark.parametrize("kind, named", [("folder", "is a folder"), ("not-sqlite", "is not a usable SQLite database")])
def test_a_state_database_flower_cannot_open_is_named_before_the_superlink_starts(kind, named, tmp_path):
    database = tmp_path / "state.db"
    if kind == "folder":
        database.mkdir()
    else:
        database.write_text("garbage")
    result = CliRunner().invoke(app, ["superlink", "--insecure", "--port", str(free_port()), "--database", str(database), "--runs-dir", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: --database {database} {named}" + (
        "; give a file for Flower's state database" if kind == "folder" else ": file is not a database")
