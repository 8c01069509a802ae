"""Tests for shared.auditlog: the hash chain, the signed head and tamper detection."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shared.auditlog import GENESIS, AuditLog, canonical, sig_path, verify_log
from shared.errors import BadInput

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()
N = 5


def write_log(path: Path, n: int = N) -> Path:
    log = AuditLog(path, KEY)
    for i in range(n):
        log.append("round", {"round": i + 1, "epsilon": 0.5 * (i + 1), "clients": [0, 1, 2], "note": "ok"})
    return path


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """Bytes of a real 5-entry log and its sidecar, built once for the byte-level tests."""
    path = write_log(tmp_path_factory.mktemp("orig") / "audit.jsonl")
    return path.read_bytes(), sig_path(path).read_bytes()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, original):
    """A reusable path: each check overwrites the log (and restores the sidecar)."""
    path = tmp_path_factory.mktemp("scratch") / "audit.jsonl"
    written = {}

    def check(data: bytes, sig: bytes | None = None):
        sig = original[1] if sig is None else sig
        path.write_bytes(data)
        if written.get("sig") != sig:  # disk writes dominate these tests' run time
            sig_path(path).write_bytes(sig)
            written["sig"] = sig
        return verify_log(path, PUB)

    return check


def lines_of(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


def line_at(data: bytes, pos: int) -> int:
    """1-based number of the line that holds byte ``pos`` (its newline included)."""
    return data[:pos].count(b"\n") + 1


def test_intact_log_verifies(tmp_path):
    path = write_log(tmp_path / "audit.jsonl")
    result = verify_log(path, PUB)
    assert result.ok and result.entries == N and result.first_bad is None
    entries = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert [e["seq"] for e in entries] == list(range(1, N + 1))
    assert entries[0]["prev"] == GENESIS
    for before, after in zip(entries, entries[1:]):
        assert after["prev"] == hashlib.sha256(canonical(before)).hexdigest()
    head = json.loads(sig_path(path).read_bytes())
    assert head["seq"] == N and head["hash"] == entries[-1]["hash"]


def test_append_returns_stored_entry(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", KEY)
    entry = log.append("start", {"config": {"rounds": 3}, "ids": (1, 2)})
    assert entry == json.loads((tmp_path / "audit.jsonl").read_bytes())
    assert entry["payload"] == {"config": {"rounds": 3}, "ids": [1, 2]} and entry["seq"] == log.seq == 1


def test_empty_log_verifies(tmp_path):
    path = tmp_path / "audit.jsonl"
    AuditLog(path, KEY)
    assert verify_log(path, PUB) == verify_log(path, PUB)
    result = verify_log(path, PUB)
    assert result.ok and result.entries == 0


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_any_changed_byte_is_detected(original, scratch, data):
    log = original[0]
    pos = data.draw(st.integers(0, len(log) - 1), label="position")
    new = data.draw(st.integers(0, 255), label="byte")
    assume(new != log[pos])
    result = scratch(log[:pos] + bytes([new]) + log[pos + 1 :])
    assert not result.ok
    assert result.first_bad == line_at(log, pos)
    assert result.entries == result.first_bad - 1


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_changed_signature_byte_is_detected(original, scratch, data):
    sig = original[1]
    pos = data.draw(st.integers(0, len(sig) - 1), label="position")
    new = data.draw(st.integers(0, 255), label="byte")
    assume(new != sig[pos])
    result = scratch(original[0], sig[:pos] + bytes([new]) + sig[pos + 1 :])
    assert not result.ok and result.first_bad is None


def test_intact_copy_verifies(original, scratch):
    assert scratch(original[0]).ok


def test_truncation_anywhere_is_detected(original, scratch):
    log = original[0]
    # Every cut next to a line boundary, plus a stride through the middle of lines.
    boundaries = {p + d for p, b in enumerate(log) if b == ord("\n") for d in (-1, 0, 1)}
    for cut in sorted(c for c in boundaries | set(range(0, len(log), 7)) if 0 <= c < len(log)):
        result = scratch(log[:cut])
        assert not result.ok, cut
        assert result.first_bad == line_at(log, cut), cut


@pytest.mark.parametrize("k", range(N))
def test_deleted_entry_is_detected(original, scratch, k):
    lines = lines_of(original[0])
    del lines[k]
    result = scratch(b"".join(lines))
    assert not result.ok and result.first_bad == k + 1
    assert ("truncated" if k == N - 1 else "seq") in result.reason


@pytest.mark.parametrize("k", range(N))
def test_duplicated_entry_is_detected(original, scratch, k):
    lines = lines_of(original[0])
    lines.insert(k + 1, lines[k])
    result = scratch(b"".join(lines))
    assert not result.ok and result.first_bad == k + 2


@pytest.mark.parametrize("i, j", [(0, 1), (1, 3), (3, 4), (0, 4)])
def test_swapped_entries_are_detected(original, scratch, i, j):
    lines = lines_of(original[0])
    lines[i], lines[j] = lines[j], lines[i]
    result = scratch(b"".join(lines))
    assert not result.ok and result.first_bad == i + 1


def test_consistently_rewritten_chain_needs_the_key(original, scratch):
    # An attacker without the key can rebuild a valid-looking chain, but not re-sign it.
    entries = [json.loads(line) for line in original[0].splitlines()]
    entries[1]["payload"]["epsilon"] = 0.01
    prev, out = GENESIS, b""
    for e in entries:
        body = {k: v for k, v in e.items() if k != "hash"} | {"prev": prev}
        line = canonical({**body, "hash": hashlib.sha256(canonical(body)).hexdigest()})
        out += line + b"\n"
        prev = hashlib.sha256(line).hexdigest()
    result = scratch(out)
    assert not result.ok and result.entries == N and "signed head" in result.reason


def test_unsigned_extra_entry_is_detected(tmp_path):
    path = write_log(tmp_path / "audit.jsonl")
    sig = sig_path(path).read_bytes()
    AuditLog.open_existing(path, KEY).append("forged", {})
    sig_path(path).write_bytes(sig)  # roll back the head to before the extra entry
    result = verify_log(path, PUB)
    assert not result.ok and result.first_bad == N + 1 and "not signed" in result.reason


def test_missing_or_foreign_signature(tmp_path):
    path = write_log(tmp_path / "audit.jsonl")
    other = write_log(tmp_path / "other.jsonl")
    result = verify_log(path, Ed25519PrivateKey.generate().public_key())
    assert not result.ok and "does not verify" in result.reason and result.first_bad is None
    sig_path(path).write_bytes(sig_path(other).read_bytes())  # valid signature, other log
    result = verify_log(path, PUB)
    assert not result.ok and "signed head" in result.reason
    sig_path(path).unlink()
    result = verify_log(path, PUB)
    assert not result.ok and "missing" in result.reason and result.first_bad is None


def test_missing_log(tmp_path):
    result = verify_log(tmp_path / "nope.jsonl", PUB)
    assert not result.ok and "cannot read" in result.reason


def test_resume_appends_to_verified_log(tmp_path):
    path = write_log(tmp_path / "audit.jsonl")
    log = AuditLog.open_existing(path, KEY)
    assert log.seq == N
    assert log.append("resume", {"from": N})["seq"] == N + 1
    log.append("round", {"round": N + 1})
    result = verify_log(path, PUB)
    assert result.ok and result.entries == N + 2


def test_resume_refuses_tampered_log_or_other_key(tmp_path):
    path = write_log(tmp_path / "audit.jsonl")
    with pytest.raises(BadInput, match="cannot resume audit log .*does not verify"):
        AuditLog.open_existing(path, Ed25519PrivateKey.generate())
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(BadInput, match="cannot resume audit log .*truncated"):
        AuditLog.open_existing(path, KEY)


def test_new_log_refuses_existing_file(tmp_path):
    path = write_log(tmp_path / "audit.jsonl")
    with pytest.raises(BadInput, match="already exists"):
        AuditLog(path, KEY)
    assert verify_log(path, PUB).ok


@pytest.mark.parametrize("payload", [{"x": float("nan")}, {"x": float("inf")}, {"x": object()}, {"x": {1: 1, "a": 2}}])
def test_non_json_payload_is_refused_and_log_stays_valid(tmp_path, payload):
    path = write_log(tmp_path / "audit.jsonl", 2)
    log = AuditLog.open_existing(path, KEY)
    with pytest.raises(ValueError, match="not plain JSON"):
        log.append("bad", payload)
    assert log.append("good", {})["seq"] == 3
    assert verify_log(path, PUB).ok


def test_bad_kind_or_payload_type(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", KEY)
    with pytest.raises(ValueError):
        log.append("", {})
    with pytest.raises(TypeError):
        log.append("x", [1])


def test_outside_change_stops_appends(tmp_path):
    path = write_log(tmp_path / "audit.jsonl", 2)
    log = AuditLog.open_existing(path, KEY)
    with open(path, "ab") as f:
        f.write(b"junk\n")
    with pytest.raises(RuntimeError, match="changed since it was opened"):
        log.append("round", {})


# ----------------------------------------------------------------------------- bound to its run


def test_a_log_signed_for_one_id_does_not_verify_as_another(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, KEY, "run-a")
    log.append("run-start", {"run_id": "run-a"})
    assert verify_log(path, PUB, "run-a").ok
    result = verify_log(path, PUB, "run-b")
    assert not result.ok and "another run's log" in result.reason
    with pytest.raises(BadInput, match="cannot resume"):
        AuditLog.open_existing(path, KEY, "run-b")


def _two_runs_with_one_key(tmp_path):
    from shared.crypto import init_keys, load_server_keys
    from shared.store import RunStore

    store = RunStore(tmp_path / "runs")
    keys = init_keys(tmp_path / "keys", 2)
    _, signing = load_server_keys(str(keys), None)
    logs = {}
    for run_id in ("run-a", "run-b"):
        store.create_run(run_id, {}, info={"keys_dir": str(keys)})
        store.run_dir(run_id).mkdir(parents=True, exist_ok=True)
        log = AuditLog(store.run_dir(run_id) / "audit.jsonl", signing, run_id)
        log.append("run-start", {"run_id": run_id})
        log.append("round", {"round": 1})
        logs[run_id] = log
    return store, logs


def test_verify_run_rejects_another_runs_log_and_signature(tmp_path):
    from audit.verify import verify_run

    store, _ = _two_runs_with_one_key(tmp_path)
    assert verify_run(store, "run-b").ok
    for name in ("audit.jsonl", "audit.jsonl.sig"):
        (store.run_dir("run-b") / name).write_bytes((store.run_dir("run-a") / name).read_bytes())
    assert not verify_run(store, "run-b").ok


def test_verify_run_rejects_an_ended_run_whose_log_was_cut_back_to_an_older_signed_head(tmp_path):
    from audit.verify import verify_run

    store, logs = _two_runs_with_one_key(tmp_path)
    path = store.run_dir("run-a") / "audit.jsonl"
    older = path.read_bytes(), sig_path(path).read_bytes()  # a copy an attacker kept
    logs["run-a"].append("round", {"round": 2})
    logs["run-a"].append("run-end", {"status": "completed"})
    store.finish_run("run-a", "completed", None)
    assert verify_run(store, "run-a").ok
    path.write_bytes(older[0])
    sig_path(path).write_bytes(older[1])
    result = verify_run(store, "run-a")
    assert not result.ok and "stops before run-end" in result.reason


def _old_format_log(path: Path) -> Path:
    """A log whose head is signed the way fedaudit signed it before heads named their run."""
    from shared.auditlog import LEGACY_HEAD_DOMAIN

    write_log(path, 2)
    record = json.loads(sig_path(path).read_text())
    legacy = KEY.sign(LEGACY_HEAD_DOMAIN + canonical({"seq": record["seq"], "hash": record["hash"]}))
    sig_path(path).write_bytes(canonical({**record, "signature": legacy.hex()}) + b"\n")
    return path


def test_a_log_signed_in_the_old_format_is_named_as_such(tmp_path):
    path = _old_format_log(tmp_path / "audit.jsonl")
    result = verify_log(path, PUB)
    assert not result.ok and "old v1 format" in result.reason


def test_a_log_in_the_old_format_can_still_be_resumed_and_is_then_bound(tmp_path):
    path = _old_format_log(tmp_path / "audit.jsonl")
    AuditLog.open_existing(path, KEY, "run-a").append("run-resume", {})
    assert verify_log(path, PUB, "run-a").ok and not verify_log(path, PUB, "run-b").ok
