"""Verify a run's tamper-evident audit log against the server's public signing key."""

from __future__ import annotations

from pathlib import Path

from shared.auditlog import VerifyResult, verify_log
from shared.crypto import load_registry
from shared.errors import BadInput
from shared.store import RunStore


def verify_run(store: RunStore, run_id: str, keys_dir: str | Path | None = None) -> VerifyResult:
    """Check every entry's hash chain and the signed head of ``<run>/audit.jsonl``.

    The public key comes from the key registry the run used (or ``keys_dir``), never
    from the log itself.
    """
    record = store.get_run(run_id)
    path = store.run_dir(run_id) / "audit.jsonl"
    if not path.exists():
        raise BadInput(f"run {run_id} has no audit log at {path}")
    keys = keys_dir or record.info.get("keys_dir")
    if not keys:
        raise BadInput(f"run {run_id} does not say which keys signed its log; pass --keys DIR")
    return verify_log(path, load_registry(keys).server_ed25519)
