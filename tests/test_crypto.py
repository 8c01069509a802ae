"""Tests for shared.crypto: key files, the AES-GCM envelope and array packing."""

from __future__ import annotations

import json
import os
import stat
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.crypto import (
    CLIENT_TO_SERVER,
    SERVER_TO_CLIENT,
    EnvelopeError,
    associated_data,
    derive_key,
    init_keys,
    load_client_private_key,
    load_registry,
    load_server_keys,
    open_sealed,
    pack_arrays,
    seal,
    unpack_arrays,
)
from shared.errors import BadInput

PASS_VAR = "FEDAUDIT_TEST_PASSPHRASE"
CONTEXT = {"run_id": "run-1", "round": 3, "client_id": 2, "message_type": "fit-ins", "direction": SERVER_TO_CLIENT}


def raw(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@pytest.fixture
def keydir(tmp_path, monkeypatch):
    monkeypatch.delenv(PASS_VAR, raising=False)
    return init_keys(tmp_path / "keys", 3)


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


# --------------------------------------------------------------------------- keys


def test_key_files_are_private(keydir):
    pems = sorted(p.name for p in keydir.glob("*.pem"))
    assert pems == sorted(["server.x25519.pem", "server.ed25519.pem"] + [f"client-{i}.x25519.pem" for i in range(3)])
    for name in pems:
        assert stat.S_IMODE((keydir / name).stat().st_mode) == 0o600, name
    assert not list(keydir.glob(".*.tmp"))


def test_registry_holds_all_public_keys(keydir):
    registry = load_registry(keydir)
    server_x, server_ed = load_server_keys(keydir)
    assert raw(registry.server_x25519) == raw(server_x.public_key())
    assert raw(registry.server_ed25519) == raw(server_ed.public_key())
    assert sorted(registry.clients) == [0, 1, 2]
    for i in range(3):
        assert raw(registry.client(i)) == raw(load_client_private_key(keydir, i).public_key())
    on_disk = json.loads((keydir / "registry.json").read_text())
    assert set(on_disk) == {"server", "clients"} and set(on_disk["clients"]) == {"0", "1", "2"}
    with pytest.raises(BadInput, match="client 7 is not in the key registry"):
        registry.client(7)


def test_refuses_to_overwrite_keys(keydir):
    before = {p.name: p.read_bytes() for p in keydir.iterdir()}
    with pytest.raises(BadInput, match="already holds keys"):
        init_keys(keydir, 3)
    assert {p.name: p.read_bytes() for p in keydir.iterdir()} == before


def test_existing_directory_without_keys_is_fine(tmp_path):
    (tmp_path / "README").write_text("keys go here")
    init_keys(tmp_path, 1)
    assert (tmp_path / "client-0.x25519.pem").exists()


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "3"])
def test_bad_client_count(tmp_path, n):
    with pytest.raises(BadInput, match="number of clients"):
        init_keys(tmp_path / "keys", n)


def test_passphrase_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv(PASS_VAR, "correct horse")
    keydir = init_keys(tmp_path / "keys", 2, passphrase_env=PASS_VAR)
    for pem in keydir.glob("*.pem"):
        assert pem.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    client = load_client_private_key(keydir, 1, passphrase_env=PASS_VAR)
    server_x, _ = load_server_keys(keydir, passphrase_env=PASS_VAR)
    assert raw(client.public_key()) == raw(load_registry(keydir).client(1))
    assert raw(server_x.public_key()) == raw(load_registry(keydir).server_x25519)


def test_an_empty_passphrase_is_refused_when_making_keys_and_reads_unencrypted_ones(tmp_path, monkeypatch):
    monkeypatch.setenv(PASS_VAR, "")
    with pytest.raises(BadInput, match="is not set or empty"):
        init_keys(tmp_path / "keys", 1, passphrase_env=PASS_VAR)
    keydir = init_keys(tmp_path / "keys", 1)
    assert (keydir / "client-0.x25519.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    load_client_private_key(keydir, 0, passphrase_env=PASS_VAR)


def test_wrong_passphrase_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.setenv(PASS_VAR, "right")
    keydir = init_keys(tmp_path / "keys", 1, passphrase_env=PASS_VAR)
    monkeypatch.setenv(PASS_VAR, "wrong")
    with pytest.raises(BadInput) as err:
        load_client_private_key(keydir, 0, passphrase_env=PASS_VAR)
    message = str(err.value)
    assert "\n" not in message
    assert "client-0.x25519.pem" in message and f"wrong or missing passphrase in ${PASS_VAR}" in message
    with pytest.raises(BadInput, match="wrong or missing passphrase"):
        load_server_keys(keydir, passphrase_env=PASS_VAR)


def test_missing_passphrase_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.setenv(PASS_VAR, "right")
    keydir = init_keys(tmp_path / "keys", 1, passphrase_env=PASS_VAR)
    monkeypatch.delenv(PASS_VAR)
    with pytest.raises(BadInput, match=rf"missing passphrase \(\${PASS_VAR} is not set\)"):
        load_client_private_key(keydir, 0, passphrase_env=PASS_VAR)
    with pytest.raises(BadInput, match="no passphrase variable was given"):
        load_client_private_key(keydir, 0)


def test_passphrase_for_unencrypted_key_is_bad_input(keydir, monkeypatch):
    monkeypatch.setenv(PASS_VAR, "anything")
    with pytest.raises(BadInput, match="is not encrypted"):
        load_client_private_key(keydir, 0, passphrase_env=PASS_VAR)


def test_missing_or_garbled_key_files(keydir, tmp_path):
    with pytest.raises(BadInput, match="client-9.x25519.pem not found"):
        load_client_private_key(keydir, 9)
    (keydir / "client-1.x25519.pem").write_bytes(b"not a key")
    with pytest.raises(BadInput, match="not a valid PEM private key"):
        load_client_private_key(keydir, 1)
    (keydir / "client-2.x25519.pem").write_bytes((keydir / "server.ed25519.pem").read_bytes())
    with pytest.raises(BadInput, match="expected X25519PrivateKey"):
        load_client_private_key(keydir, 2)
    with pytest.raises(BadInput, match="registry .* not found"):
        load_registry(tmp_path)
    (keydir / "registry.json").write_text('{"server": {}}')
    with pytest.raises(BadInput, match="registry .* is malformed"):
        load_registry(keydir)


def test_server_and_client_derive_the_same_key(keydir):
    registry = load_registry(keydir)
    server_x, _ = load_server_keys(keydir)
    keys = set()
    for i in range(3):
        client = load_client_private_key(keydir, i)
        on_server = derive_key(server_x, registry.client(i), "run-1")
        assert on_server == derive_key(client, registry.server_x25519, "run-1")
        assert len(on_server) == 32
        keys.add(on_server)
        keys.add(derive_key(server_x, registry.client(i), "run-2"))
    assert len(keys) == 6  # distinct per client and per run


# --------------------------------------------------------------------------- envelope


def test_envelope_round_trip(key):
    aad = associated_data(**CONTEXT)
    for plaintext in (b"", b"x", os.urandom(100_000)):
        blob = seal(key, plaintext, aad)
        assert len(blob) == len(plaintext) + 12 + 16
        assert open_sealed(key, blob, aad) == plaintext
        assert open_sealed(key, bytearray(blob), aad) == plaintext


@pytest.mark.parametrize(
    "field, value",
    [
        ("run_id", "run-2"),
        ("round", 4),
        ("client_id", 1),
        ("message_type", "fit-res"),
        ("direction", CLIENT_TO_SERVER),
    ],
)
def test_other_context_fails_to_open(key, field, value):
    blob = seal(key, b"weights", associated_data(**CONTEXT))
    with pytest.raises(EnvelopeError, match="authentication failed"):
        open_sealed(key, blob, associated_data(**{**CONTEXT, field: value}))


def test_associated_data_is_canonical():
    aad = associated_data(**CONTEXT)
    assert json.loads(aad) == CONTEXT
    assert associated_data(**{**CONTEXT, "round": np.int64(3), "client_id": np.uint8(2)}) == aad
    with pytest.raises(ValueError, match="direction"):
        associated_data(**{**CONTEXT, "direction": "sideways"})
    with pytest.raises(TypeError):
        associated_data(**{**CONTEXT, "round": 3.0})


def test_any_tampered_byte_fails(key):
    aad = associated_data(**CONTEXT)
    blob = seal(key, b"model update", aad)
    for i in range(len(blob)):
        for flip in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= flip
            with pytest.raises(EnvelopeError):
                open_sealed(key, bytes(bad), aad)


def test_wrong_key_or_short_blob_fails(key):
    aad = associated_data(**CONTEXT)
    blob = seal(key, b"model update", aad)
    with pytest.raises(EnvelopeError, match="authentication failed"):
        open_sealed(os.urandom(32), blob, aad)
    for cut in (0, 1, 12, 27):
        with pytest.raises(EnvelopeError, match="too short"):
            open_sealed(key, blob[:cut], aad)
    with pytest.raises(EnvelopeError):
        open_sealed(key, blob[:-1], aad)
    with pytest.raises(ValueError, match="32 bytes"):
        seal(os.urandom(16), b"x", aad)


def test_nonces_are_unique(key):
    nonces = {seal(key, b"", b"")[:12] for _ in range(20_000)}
    assert len(nonces) == 20_000


# --------------------------------------------------------------------------- array packing

ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(3.5, dtype=np.float64),  # 0-d
    np.zeros((0, 5), dtype=np.int64),  # empty
    np.array([True, False, True]),
    np.arange(-4, 4, dtype=np.int8),
    np.arange(6, dtype=np.uint16).reshape(1, 2, 3),
    (np.arange(4) + 1j).astype(np.complex64),
    np.arange(6, dtype=">f8"),  # big-endian
    np.asfortranarray(np.arange(6, dtype=np.float16).reshape(2, 3)),
    np.arange(20, dtype=np.float32)[::3],  # non-contiguous
]


def test_pack_round_trip():
    arrays = {f"layer{i}.w": a for i, a in enumerate(ARRAYS)}
    data = pack_arrays(arrays)
    assert pack_arrays(arrays) == data  # deterministic
    out = unpack_arrays(data)
    assert list(out) == list(arrays)  # order kept
    for name, a in arrays.items():
        assert out[name].dtype == a.dtype and out[name].shape == a.shape
        np.testing.assert_array_equal(out[name], a)
    assert unpack_arrays(pack_arrays({})) == {}


def test_pack_then_seal_round_trip(key):
    arrays = {"w": np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)}
    aad = associated_data(**CONTEXT)
    out = unpack_arrays(open_sealed(key, seal(key, pack_arrays(arrays), aad), aad))
    np.testing.assert_array_equal(out["w"], arrays["w"])


def test_pack_rejects_unsupported_input():
    with pytest.raises(ValueError, match="unsupported dtype"):
        pack_arrays({"o": np.array([object()])})
    with pytest.raises(ValueError, match="unsupported dtype"):
        pack_arrays({"s": np.array(["a"])})
    with pytest.raises(TypeError, match="names must be str"):
        pack_arrays({1: np.zeros(1)})


def _packed(header, body: bytes = b"") -> bytes:
    head = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<4sI", b"FDA1", len(head)) + head + body


def _entry(**kw):
    return {"arrays": [{"name": "a", "dtype": "<f4", "shape": [2], **kw}]}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"FDA",
        b"XXXX\x00\x00\x00\x00",
        struct.pack("<4sI", b"FDA1", 1000) + b"{}",
        _packed(b"not json"),
        _packed(b"[" * 100_000),
        _packed([1, 2]),
        _packed({"arrays": "nope"}),
        _packed({"arrays": [5]}),
        _packed({"arrays": [{"name": "a", "dtype": "<f4"}]}),
        _packed(_entry(dtype="|O"), b"\x00" * 8),
        _packed(_entry(dtype="O"), b"\x00" * 8),
        _packed(_entry(dtype="float32"), b"\x00" * 8),
        _packed(_entry(dtype="<U1"), b"\x00" * 8),
        _packed(_entry(dtype="V8"), b"\x00" * 8),
        _packed(_entry(dtype=5), b"\x00" * 8),
        _packed(_entry(shape=[-2]), b"\x00" * 8),
        _packed(_entry(shape=[2.0]), b"\x00" * 8),
        _packed(_entry(shape=True), b"\x00" * 8),
        _packed(_entry(shape=[0, 10**30])),
        _packed(_entry(name=7), b"\x00" * 8),
        _packed(_entry(), b"\x00" * 7),  # short data
        _packed(_entry(), b"\x00" * 9),  # trailing byte
        _packed({"arrays": _entry()["arrays"] * 2}, b"\x00" * 16),  # duplicate name
    ],
)
def test_unpack_rejects_malformed(data):
    with pytest.raises(EnvelopeError):
        unpack_arrays(data)


def test_unpack_rejects_every_truncation():
    data = pack_arrays({"a": np.arange(5, dtype=np.int32), "b": np.ones((2, 2))})
    for cut in range(len(data)):
        with pytest.raises(EnvelopeError):
            unpack_arrays(data[:cut])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.binary(max_size=60).map(lambda b: b"FDA1" + b))
def test_unpack_only_raises_envelope_error(data):
    try:
        unpack_arrays(data)
    except EnvelopeError:
        pass


def test_key_init_is_all_or_nothing(tmp_path, monkeypatch):
    import shared.crypto as crypto

    calls = {"n": 0}
    real = crypto._private_pem

    def failing(key, passphrase):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as if stopped half way
        return real(key, passphrase)

    monkeypatch.setattr(crypto, "_private_pem", failing)
    with pytest.raises(KeyboardInterrupt):
        crypto.init_keys(tmp_path / "keys", 10)
    assert not (tmp_path / "keys").exists()
    monkeypatch.setattr(crypto, "_private_pem", real)
    crypto.init_keys(tmp_path / "keys", 10)  # a retry works
    with pytest.raises(crypto.BadInput, match="<= 100,000"):
        crypto.init_keys(tmp_path / "more", 10**11)


def test_keys_are_never_silently_left_unencrypted(tmp_path, monkeypatch):
    from shared.errors import BadInput

    monkeypatch.delenv("FEDAUDIT_TEST_PASS", raising=False)
    with pytest.raises(BadInput, match="FEDAUDIT_TEST_PASS is not set or empty"):
        init_keys(tmp_path / "keys", 2, "FEDAUDIT_TEST_PASS")
    assert not (tmp_path / "keys").exists()
