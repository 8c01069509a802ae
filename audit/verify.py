"""Verify a run's tamper-evident audit log against the server's public signing key."""

from __future__ import annotations

import json
from pathlib import Path

from shared.auditlog import VerifyResult, verify_log
from shared.crypto import load_registry
from shared.errors import BadInput
from shared.store import ENDED_NORMALLY, RunStore


def verify_run(store: RunStore, run_id: str, keys_dir: str | Path | None = None) -> VerifyResult:
    """Check every entry's hash chain and the signed head of ``<run>/audit.jsonl``.

    The public key comes from the key registry the run used (or ``keys_dir``), never
    from the log itself. The signature must be for this run's id, the log must start
    with this run's ``run-start``, and a run the store shows as completed (or
    budget-exhausted) must have a log that ends with ``run-end``: an older signed head of
    the same log (a rollback) then does not pass for the whole run.
    """
    record = store.get_run(run_id)
    path = store.run_dir(run_id) / "audit.jsonl"
    if not path.exists():
        raise BadInput(f"run {run_id} has no audit log at {path}")
    keys = keys_dir or record.info.get("keys_dir")
    if not keys:
        raise BadInput(f"run {run_id} does not say which keys signed its log; pass --keys DIR")
    result = verify_log(path, load_registry(keys).server_ed25519, run_id)
    if not result.ok:
        return result
    entries = [json.loads(line) for line in path.read_bytes().splitlines()]
    if not entries or entries[0]["kind"] != "run-start" or entries[0]["payload"].get("run_id") != run_id:
        return VerifyResult(False, 0, 1, f"the log does not start with run {run_id}'s run-start entry")
    # Only a run that ended normally must have closed its log: a failed one may have
    # been stopped hard (a second Ctrl-C) before it could.
    if record.status in ENDED_NORMALLY and entries[-1]["kind"] != "run-end":
        return VerifyResult(False, len(entries), len(entries) + 1, f"the run ended ({record.status}) but its log stops before run-end (cut back to an older signed head?)")
    return result
