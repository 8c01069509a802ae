"""Run a Flower process in the foreground and stop it, and everything it started, cleanly.

``fedaudit superlink`` and ``fedaudit supernode`` run Flower's ``flower-superlink`` and
``flower-supernode`` as children. On SIGTERM or SIGINT the signal is forwarded to the
child; whatever it started (flwr-serverapp, flower-superexec, flwr-clientapp) and is
still alive after a grace period is killed with SIGKILL, by the PIDs recorded from
/proc, never by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def _stat_fields(pid: int | str) -> list[str]:
    """Fields 3.. of /proc/PID/stat (state, ppid, ...); [] once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    # The command name may hold spaces and parentheses: fields start after the last ")".
    return stat[stat.rfind(")") + 2 :].split()


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc); [] where /proc is missing."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    found = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(entry.name)
            if len(fields) > 1 and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def start_time(pid: int) -> str:
    """When ``pid`` started, in clock ticks since boot ("" once it is gone): tells a
    reused PID from the process that had it (the process-tree tests rely on it)."""
    fields = _stat_fields(pid)
    return fields[19] if len(fields) > 19 else ""


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before children."""
    out, todo = [], [pid]
    while todo:
        for child in children_of(todo.pop()):
            if child not in out:
                out.append(child)
                todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    return not fields or fields[0] != "Z"  # a zombie is dead for our purposes


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_descendants() -> None:
    """SIGKILL every process below this one (a hard stop: Ray's workers and daemons)."""
    for pid in descendants(os.getpid()):
        _signal(pid, signal.SIGKILL)


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux), so none escapes stop_tree."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_tree(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10.0, root: int | None = None) -> int | None:
    """Send ``sig`` to ``proc``, wait up to ``grace`` seconds, then SIGKILL ``proc`` and
    every descendant still alive (PIDs recorded before and after the signal).

    ``root`` (default ``proc.pid``) is whose descendants are tracked: a subreaper passes
    its own PID, so processes orphaned by ``proc`` are found too.
    """
    root = proc.pid if root is None else root

    def tree() -> list[int]:
        return [p for p in descendants(root) if p != os.getpid()]

    known = tree()
    if proc.poll() is None:
        _signal(proc.pid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        known += [p for p in tree() if p not in known]
        if root != proc.pid:
            _reap_others(proc)
        if proc.poll() is not None and not any(alive(p) for p in known):
            break
        time.sleep(0.2)
    known += [p for p in tree() if p not in known]
    for pid in reversed(known):
        if alive(pid):
            _signal(pid, signal.SIGKILL)
    if proc.poll() is None:
        _signal(proc.pid, signal.SIGKILL)
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return None


def _reap_others(proc: subprocess.Popen) -> None:
    # Orphans re-parented to a subreaper must be waited for, or they stay zombies;
    # proc itself is left to Popen so its exit code is kept.
    for pid in children_of(os.getpid()):
        if pid != proc.pid:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def open_log(log_path: Path):
    """``--log-file`` opened for appending; one that cannot be is :class:`BadInput`."""
    try:
        return open(log_path, "ab")
    except OSError as exc:
        from shared.errors import BadInput

        raise BadInput(f"cannot open --log-file {log_path}: {exc.strerror}") from None


def run_foreground(cmd: list[str], env: dict, *, quiet: bool, log_path: Path | None = None, on_start=None) -> int:
    """Run ``cmd`` until it exits or this process gets SIGTERM/SIGINT; return its exit code.

    With ``quiet``, the child's output goes to ``log_path`` (or nowhere) instead of the console.
    """
    stream = None
    if quiet:
        stream = open_log(log_path) if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=stream, stderr=subprocess.STDOUT if stream is not None else None)
    except FileNotFoundError:
        from shared.errors import BadInput

        raise BadInput(f"cannot start {cmd[0]}: not found (is flwr installed in this environment?)") from None
    subreaper = become_subreaper()
    received: list[int] = []

    def handler(signum, _frame):
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        if on_start:
            on_start(proc)
        root = os.getpid() if subreaper else proc.pid
        while proc.poll() is None and not received:
            if subreaper:
                _reap_others(proc)
            time.sleep(0.2)
        if received:
            # Ctrl-C in a terminal already reached the child (same process group);
            # forwarding is still right for a SIGTERM sent to this process alone.
            code = stop_tree(proc, signal.SIGTERM if received[0] == signal.SIGHUP else received[0], root=root)
            return 128 + received[0] if code is None or code < 0 else code
        stop_tree(proc, signal.SIGTERM, grace=5.0, root=root)  # the child exited: stop anything it left
        return proc.returncode
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if stream not in (None, subprocess.DEVNULL):
            stream.close()
        _reap()


# --------------------------------------------------------------------------- Flower's processes
def flower_env(extra: dict | None = None) -> dict:
    """The environment for Flower's processes: runtime dependency installation off
    (otherwise the SuperLink runs `uv sync` and fetches gigabytes of CUDA torch), no
    telemetry, and this Python's scripts first on PATH for the processes Flower spawns."""
    import sys

    env = dict(os.environ)
    env.update({"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def flower_script(name: str) -> str:
    import shutil
    import sys

    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        from shared.errors import BadInput

        raise BadInput(f"cannot find `{name}` (part of flwr); install flwr in this environment")
    return found


def _port(port: int, flag: str) -> int:
    from shared.errors import BadInput

    if not 0 < port < 65536:
        raise BadInput(f"{flag} {port} is out of range 1..65535")
    return port


def superlink_command(*, certs=None, insecure: bool = False, host: str = "127.0.0.1", port: int = 9093, database: str | Path = ":flwr-in-memory-state:") -> list[str]:
    from shared.certs import server_paths
    from shared.errors import BadInput

    if insecure and certs:
        raise BadInput("--insecure and --certs contradict each other; give one")
    if not insecure and not certs:
        raise BadInput("TLS is on by default: give --certs DIR (from `fedaudit certs init DIR`), or --insecure for plain text")
    cmd = [flower_script("flower-superlink"), "--host", host, "--port", str(_port(port, "--port")), "--database", str(database),
           "--disable-runtime-dependency-installation"]
    if insecure:
        return cmd + ["--insecure"]
    paths = server_paths(certs)
    return cmd + ["--ssl-ca-certfile", str(paths.ca_cert), "--ssl-certfile", str(paths.server_cert), "--ssl-keyfile", str(paths.server_key)]


def node_config(values: dict) -> str:
    """``--node-config`` text: strings quoted, numbers bare."""
    from shared.errors import BadInput

    parts = []
    for key, value in values.items():
        if isinstance(value, str):
            if '"' in value or "\n" in value:
                raise BadInput(f"{key} {value!r} may not contain quotes or newlines")
            parts.append(f'{key}="{value}"')
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def supernode_command(*, superlink: str, root_certificates=None, insecure: bool = False, port: int = 9094, host: str = "127.0.0.1", config: dict) -> list[str]:
    from shared.errors import BadInput

    if insecure and root_certificates:
        raise BadInput("--insecure and --root-certificates contradict each other; give one")
    cmd = [flower_script("flower-supernode"), "--superlink", superlink, "--host", host, "--port", str(_port(port, "--port")),
           "--node-config", node_config(config)]
    if insecure:
        return cmd + ["--insecure"]
    return cmd + (["--root-certificates", str(root_certificates)] if root_certificates else [])
