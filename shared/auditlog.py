"""A tamper-evident, append-only JSON Lines audit log with a signed head.

Each line is the canonical JSON of one entry::

    {"hash": ..., "kind": ..., "payload": {...}, "prev": ..., "seq": n, "time": ...}

``seq`` counts from 1 and equals the line number. ``prev`` is the SHA-256 of the
previous line's bytes (without its newline; 64 zeros for the first entry) and ``hash``
is the SHA-256 of the entry's canonical JSON without the ``hash`` field. Editing,
inserting, deleting or reordering lines therefore breaks the chain. Cutting entries off
the end keeps the chain intact, so after every append the head (last ``seq`` and
``hash``) is signed with the server's Ed25519 key into the sidecar ``<log>.sig``. The
signature also covers the log's id (the run id), so one run's log and signature do not
verify as another run's made with the same key.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.files import write_atomic
from shared.errors import BadInput

GENESIS = "0" * 64
HEAD_DOMAIN = b"fedaudit-audit-head-v2\n"
# Logs signed before the head named its run; recognised only to say so.
LEGACY_HEAD_DOMAIN = b"fedaudit-audit-head-v1\n"
ENTRY_FIELDS = frozenset({"seq", "time", "kind", "payload", "prev", "hash"})
SIG_FIELDS = frozenset({"seq", "hash", "signature"})


def canonical(obj: object) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, ASCII only, no NaN or infinity."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sig_path(path: str | os.PathLike[str]) -> Path:
    """Path of the signed-head sidecar of the log at ``path`` (``audit.jsonl.sig``)."""
    path = Path(path)
    return path.with_name(path.name + ".sig")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _head_message(log_id: str, seq: int, head_hash: str) -> bytes:
    # The domain prefix keeps this signature from being valid for any other message.
    return HEAD_DOMAIN + canonical({"log": log_id, "seq": seq, "hash": head_hash})


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_log`.

    Attributes
    ----------
    ok
        True only if every entry and the signed head check out.
    entries
        Number of entries that verified before the first problem (all of them if ok).
    first_bad
        1-based line number (= seq) of the first bad or missing entry, or None if the
        problem is not tied to one line (signature file, rewritten chain) or ok.
    reason
        One line describing the result.
    """

    ok: bool
    entries: int
    first_bad: int | None
    reason: str


class AuditLog:
    """Single-writer appender for a new audit log; see :meth:`open_existing` to resume one.

    Parameters
    ----------
    path
        Log file to create; it must not exist yet.
    signing_key
        The server's Ed25519 key, used to sign the head after every append.
    log_id
        What the log belongs to (the run id); signed with every head.
    """

    def __init__(self, path: str | os.PathLike[str], signing_key: Ed25519PrivateKey, log_id: str = "") -> None:
        path = Path(path)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            raise BadInput(f"audit log {path} already exists; resume it with AuditLog.open_existing") from None
        self._attach(path, signing_key, log_id, seq=0, prev=GENESIS, head=GENESIS, size=0)
        # Signing the empty head means a log emptied later is caught as truncated.
        self._sign()

    @classmethod
    def open_existing(cls, path: str | os.PathLike[str], signing_key: Ed25519PrivateKey, log_id: str = "") -> AuditLog:
        """Continue appending to an existing log after verifying it in full.

        Raises
        ------
        BadInput
            If the log does not verify against ``signing_key``'s public key.
        """
        path = Path(path)
        # A log from before the head named its run may still be continued (by the key
        # that signed it); from the next append on, its head is signed with the run id.
        result, state = _verify(path, signing_key.public_key(), log_id, accept_legacy=True)
        if state is None:
            raise BadInput(f"cannot resume audit log {path}: {result.reason}")
        prev, head, size = state
        log = cls.__new__(cls)
        log._attach(path, signing_key, log_id, seq=result.entries, prev=prev, head=head, size=size)
        return log

    def _attach(self, path: Path, key: Ed25519PrivateKey, log_id: str, *, seq: int, prev: str, head: str, size: int) -> None:
        self.path = path
        self._key = key
        self._log_id = log_id
        self._seq = seq
        self._prev = prev  # SHA-256 of the last line
        self._head = head  # hash field of the last entry
        self._size = size

    @property
    def seq(self) -> int:
        """Sequence number of the last entry (0 if the log is empty)."""
        return self._seq

    def append(self, kind: str, payload: dict) -> dict:
        """Append one entry, fsync it and re-sign the head; return the entry as stored.

        ``payload`` must be plain JSON: str keys, and no NaN or infinity (encode those
        as strings or None), so the stored line re-encodes to the same bytes.
        """
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"audit entry kind must be a non-empty string, got {kind!r}")
        if not isinstance(payload, dict):
            raise TypeError(f"audit payload must be a dict, got {type(payload).__name__}")
        body = {
            "seq": self._seq + 1,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "kind": kind,
            "payload": payload,
            "prev": self._prev,
        }
        try:
            entry_hash = _sha256(canonical(body))
            line = canonical({**body, "hash": entry_hash})
        except (TypeError, ValueError) as e:
            raise ValueError(f"audit payload for {kind!r} is not plain JSON: {e}") from None
        stored = json.loads(line)
        if canonical(stored) != line:
            raise ValueError(f"audit payload for {kind!r} does not survive a JSON round trip")

        with open(self.path, "ab") as f:
            # Another writer or an outside edit would make our chain state stale.
            if os.fstat(f.fileno()).st_size != self._size:
                raise RuntimeError(f"audit log {self.path} changed since it was opened; not appending")
            try:
                f.write(line + b"\n")
                f.flush()
                os.fsync(f.fileno())
            except BaseException:
                # Never leave a partial line: every later entry would sit behind it.
                f.truncate(self._size)
                raise
        self._seq += 1
        self._prev = _sha256(line)
        self._head = entry_hash
        self._size += len(line) + 1
        self._sign()
        return stored

    def _sign(self) -> None:
        signature = self._key.sign(_head_message(self._log_id, self._seq, self._head))
        record = {"seq": self._seq, "hash": self._head, "signature": signature.hex()}
        write_atomic(sig_path(self.path), canonical(record) + b"\n")


def _check_line(line: bytes, n: int, prev: str) -> tuple[dict | None, str]:
    """Return (entry, "") if ``line`` is a valid entry number ``n`` after ``prev``, else (None, why)."""
    try:
        entry = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):
        return None, "not valid JSON"
    if not isinstance(entry, dict) or set(entry) != ENTRY_FIELDS:
        return None, "not an audit entry"
    try:
        if canonical(entry) != line:
            return None, "not in canonical form"
    except ValueError:
        return None, "not plain JSON"
    if type(entry["seq"]) is not int or entry["seq"] != n:
        return None, f"seq is {entry['seq']!r}, expected {n}"
    if not (isinstance(entry["kind"], str) and isinstance(entry["time"], str) and isinstance(entry["payload"], dict)):
        return None, "field of the wrong type"
    if entry["prev"] != prev:
        return None, "prev does not match the previous line (entry removed, inserted or moved?)"
    body = {k: v for k, v in entry.items() if k != "hash"}
    if entry["hash"] != _sha256(canonical(body)):
        return None, "hash does not match the entry's content"
    return entry, ""


def _check_sig(path: Path, public_key: Ed25519PublicKey, log_id: str, accept_legacy: bool = False) -> tuple[int, str] | str:
    """Return the signed (seq, hash), or a one-line reason why the sidecar is not valid."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return f"signature file {path} is missing"
    malformed = f"signature file {path} is malformed"
    try:
        record = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return malformed
    if not (
        isinstance(record, dict)
        and set(record) == SIG_FIELDS
        and type(record["seq"]) is int
        and isinstance(record["hash"], str)
        and isinstance(record["signature"], str)
        and canonical(record) + b"\n" == raw
    ):
        return malformed
    try:
        signature = bytes.fromhex(record["signature"])
    except ValueError:
        return malformed
    # fromhex accepts upper case and spaces; demand our exact encoding.
    if signature.hex() != record["signature"]:
        return malformed
    try:
        public_key.verify(signature, _head_message(log_id, record["seq"], record["hash"]))
    except InvalidSignature:
        try:
            public_key.verify(signature, LEGACY_HEAD_DOMAIN + canonical({"seq": record["seq"], "hash": record["hash"]}))
        except InvalidSignature:
            return f"signature in {path} does not verify with the given public key for log {log_id!r} (wrong key, or another run's log)"
        if accept_legacy:
            return record["seq"], record["hash"]
        return f"{path} is signed in the old v1 format, which does not name the run, so it cannot show this is run {log_id!r}'s log"
    return record["seq"], record["hash"]


def _verify(path: Path, public_key: Ed25519PublicKey, log_id: str, accept_legacy: bool = False) -> tuple[VerifyResult, tuple[str, str, int] | None]:
    """Verify ``path``; if ok, also return the last line's SHA-256, the head hash and the size."""

    def bad(entries: int, first_bad: int | None, reason: str) -> tuple[VerifyResult, None]:
        return VerifyResult(False, entries, first_bad, reason), None

    try:
        data = path.read_bytes()
    except OSError as e:
        return bad(0, None, f"cannot read audit log {path}: {e.strerror}")
    lines = data.split(b"\n")
    tail = lines.pop()  # whatever follows the last newline: empty unless a line was cut
    prev = head = GENESIS
    for n, line in enumerate(lines, 1):
        entry, why = _check_line(line, n, prev)
        if entry is None:
            return bad(n - 1, n, f"line {n}: {why}")
        prev, head = _sha256(line), entry["hash"]
    count = len(lines)
    if tail:
        return bad(count, count + 1, f"line {count + 1}: truncated (no final newline)")

    signed = _check_sig(sig_path(path), public_key, log_id, accept_legacy)
    if isinstance(signed, str):
        return bad(count, None, signed)
    signed_seq, signed_hash = signed
    if count < signed_seq:
        return bad(count, count + 1, f"log truncated: signed head is seq {signed_seq} but the log ends at seq {count}")
    if count > signed_seq:
        return bad(signed_seq, signed_seq + 1, f"entries after the signed head (seq {signed_seq}) are not signed")
    if head != signed_hash:
        return bad(count, None, "last entry does not match the signed head (log rewritten?)")
    return VerifyResult(True, count, None, f"{count} entries verified"), (prev, head, len(data))


def verify_log(path: str | os.PathLike[str], public_key: Ed25519PublicKey, log_id: str = "") -> VerifyResult:
    """Check every entry of the log at ``path`` and its signed head against ``public_key``.

    Detects any changed byte, deleted, inserted or reordered entries, a cut-off last
    line, entries missing from (or added after) the signed head, and a missing or bad
    signature file. Never raises for a damaged log; the result says what is wrong.
    """
    return _verify(Path(path), public_key, log_id)[0]
