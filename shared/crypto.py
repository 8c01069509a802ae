"""Key management and the authenticated envelope for fedaudit messages.

Every client shares one X25519 key pair with the server. For each run, the server and a
client derive the same 256-bit AES key with X25519 + HKDF-SHA256, and seal each message
with AES-256-GCM. The associated data binds a ciphertext to its run, round, client,
message type and direction, so a message cannot be replayed into another context.

Arrays travel as :func:`pack_arrays` bytes: a JSON header (names, dtypes, shapes) and the
raw buffers, never pickle, so opening a message cannot execute code.

All primitives come from the ``cryptography`` package.
"""

from __future__ import annotations

import json
import math
import operator
import os
import shutil
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.errors import BadInput, make_dir, read_input
from shared.files import write_atomic

SERVER_X25519 = "server.x25519.pem"
SERVER_ED25519 = "server.ed25519.pem"
REGISTRY = "registry.json"
SERVER_TO_CLIENT = "server-to-client"
CLIENT_TO_SERVER = "client-to-server"
DIRECTIONS = (SERVER_TO_CLIENT, CLIENT_TO_SERVER)

KEY_INFO = b"fedaudit-envelope-v1"
NONCE_SIZE = 12
TAG_SIZE = 16
PACK_MAGIC = b"FDA1"
_PACK_PREFIX = struct.Struct("<4sI")  # magic, header length
# Only plain numeric kinds: they are fixed-size and carry no Python objects.
_ARRAY_KINDS = "biufc"


class EnvelopeError(Exception):
    """A sealed message or packed payload could not be opened: tampered, wrong key or context."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def client_key_file(client_id: int) -> str:
    """File name of client ``client_id``'s X25519 private key."""
    return f"client-{client_id}.x25519.pem"


# --------------------------------------------------------------------------- keys


def _passphrase(passphrase_env: str | None) -> bytes | None:
    if passphrase_env is not None and not passphrase_env.strip():
        # Read as "no variable", it would silently leave the private keys unencrypted.
        raise BadInput("the passphrase option names no variable: give the name of an environment variable holding the passphrase")
    value = os.environ.get(passphrase_env, "") if passphrase_env else ""
    return value.encode() if value else None


def _private_pem(key: X25519PrivateKey | Ed25519PrivateKey, passphrase: bytes | None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _raw_hex(public_key: X25519PublicKey | Ed25519PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


# Far beyond any federation here; a typo of extra zeros would fill the disk with keys.
MAX_KEY_CLIENTS = 100_000

def init_keys(directory: str | os.PathLike[str], num_clients: int, passphrase_env: str | None = None) -> Path:
    """Create the server's and every client's keys plus the public-key registry.

    Parameters
    ----------
    directory
        Key directory; created with mode 0700 if missing. It must not already hold keys.
    num_clients
        Number of clients; client ids are ``0 .. num_clients - 1``.
    passphrase_env
        Name of an environment variable holding the passphrase the private keys are
        encrypted with; it must be set and non-empty. Without it the keys are stored
        unencrypted.

    Returns
    -------
    Path
        The key directory.

    Raises
    ------
    BadInput
        If ``num_clients`` is not a positive integer, ``passphrase_env`` names an unset or
        empty variable, the directory already holds keys, or it cannot be written.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise BadInput(f"number of clients must be a positive integer, got {num_clients!r}")
    if num_clients > MAX_KEY_CLIENTS:
        raise BadInput(f"number of clients must be <= {MAX_KEY_CLIENTS:,}, got {num_clients:,}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise BadInput(f"key directory {directory} exists and is not a directory")
    if directory.is_dir() and (any(directory.glob("*.pem")) or (directory / REGISTRY).exists()):
        raise BadInput(f"key directory {directory} already holds keys; refusing to overwrite them")
    passphrase = _passphrase(passphrase_env)
    if passphrase_env and passphrase is None:
        # Asked to encrypt: writing the private keys in the clear instead would be silent.
        raise BadInput(f"the passphrase variable {passphrase_env} is not set or empty; set it, or leave the keys unencrypted")
    created = not directory.exists()
    make_dir(directory, "key directory", mode=0o700)
    try:
        return _write_keys(directory, num_clients, passphrase)
    except BaseException as exc:
        # All or nothing: a half-written key folder would be refused as "already holds
        # keys" by the next init and as "no key registry" by a run.
        for written in [*directory.glob("*.pem"), directory / REGISTRY]:
            written.unlink(missing_ok=True)
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        if isinstance(exc, OSError):
            raise BadInput(f"cannot write keys in {directory}: {exc.strerror}") from None
        raise


def _write_keys(directory: Path, num_clients: int, passphrase: bytes | None) -> Path:
    server_x = X25519PrivateKey.generate()
    server_ed = Ed25519PrivateKey.generate()
    write_atomic(directory / SERVER_X25519, _private_pem(server_x, passphrase), 0o600)
    write_atomic(directory / SERVER_ED25519, _private_pem(server_ed, passphrase), 0o600)
    clients = {}
    for i in range(num_clients):
        key = X25519PrivateKey.generate()
        write_atomic(directory / client_key_file(i), _private_pem(key, passphrase), 0o600)
        clients[str(i)] = _raw_hex(key.public_key())
    registry = {
        "server": {"x25519": _raw_hex(server_x.public_key()), "ed25519": _raw_hex(server_ed.public_key())},
        "clients": clients,
    }
    # Written last: a registry present means every key file it describes exists.
    write_atomic(directory / REGISTRY, (json.dumps(registry, indent=2, sort_keys=True) + "\n").encode())
    return directory


def _load_private(path: Path, passphrase_env: str | None, expected: type) -> object:
    pem = read_input(path, "key file")
    passphrase = _passphrase(passphrase_env)
    encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in pem
    var = f"${passphrase_env}"  # only used in messages where passphrase_env is set
    if encrypted and passphrase is None:
        why = f"{var} is not set" if passphrase_env else "no passphrase variable was given"
        raise BadInput(f"cannot decrypt key file {path}: missing passphrase ({why})")
    if not encrypted and passphrase is not None:
        raise BadInput(f"key file {path} is not encrypted but {var} is set; unset it or re-create the keys")
    try:
        key = serialization.load_pem_private_key(pem, passphrase)
    except (ValueError, TypeError):
        if encrypted:
            raise BadInput(f"cannot decrypt key file {path}: wrong or missing passphrase in {var}") from None
        raise BadInput(f"key file {path} is not a valid PEM private key") from None
    if not isinstance(key, expected):
        raise BadInput(f"key file {path} holds a {type(key).__name__}, expected {expected.__name__}")
    return key


def load_client_private_key(
    directory: str | os.PathLike[str], client_id: int, passphrase_env: str | None = None
) -> X25519PrivateKey:
    """Load client ``client_id``'s X25519 private key; :class:`BadInput` if missing or undecryptable."""
    return _load_private(Path(directory) / client_key_file(client_id), passphrase_env, X25519PrivateKey)


def load_server_keys(
    directory: str | os.PathLike[str], passphrase_env: str | None = None
) -> tuple[X25519PrivateKey, Ed25519PrivateKey]:
    """Load the server's X25519 (envelope) and Ed25519 (audit-log signing) private keys."""
    directory = Path(directory)
    return (
        _load_private(directory / SERVER_X25519, passphrase_env, X25519PrivateKey),
        _load_private(directory / SERVER_ED25519, passphrase_env, Ed25519PrivateKey),
    )


@dataclass(frozen=True)
class Registry:
    """The public keys of a key directory."""

    server_x25519: X25519PublicKey
    server_ed25519: Ed25519PublicKey
    clients: dict[int, X25519PublicKey]

    def client(self, client_id: int) -> X25519PublicKey:
        """Public key of ``client_id``; :class:`BadInput` if the registry has no such client."""
        try:
            return self.clients[client_id]
        except KeyError:
            raise BadInput(f"client {client_id} is not in the key registry ({len(self.clients)} clients)") from None


def load_registry(directory: str | os.PathLike[str]) -> Registry:
    """Load and parse ``registry.json``; :class:`BadInput` if missing or malformed."""
    path = Path(directory) / REGISTRY
    try:
        raw = json.loads(path.read_text())
        return Registry(
            server_x25519=X25519PublicKey.from_public_bytes(bytes.fromhex(raw["server"]["x25519"])),
            server_ed25519=Ed25519PublicKey.from_public_bytes(bytes.fromhex(raw["server"]["ed25519"])),
            clients={
                int(cid): X25519PublicKey.from_public_bytes(bytes.fromhex(key)) for cid, key in raw["clients"].items()
            },
        )
    except FileNotFoundError:
        raise BadInput(f"key registry {path} not found") from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise BadInput(f"key registry {path} is malformed: {type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------- envelope


def derive_key(own_private: X25519PrivateKey, peer_public: X25519PublicKey, run_id: str) -> bytes:
    """Derive the 32-byte AES-256-GCM key one client and the server share for ``run_id``.

    Both sides get the same key: the server passes its private key and the client's
    public key, the client passes its private key and the server's public key. Mixing
    the run id into HKDF's info gives every run an independent key.
    """
    shared = own_private.exchange(peer_public)
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=KEY_INFO + b"|" + run_id.encode())
    return hkdf.derive(shared)


def associated_data(run_id: str, round: int, client_id: int, message_type: str, direction: str) -> bytes:
    """Canonical associated data binding a sealed message to its context.

    ``round`` and ``client_id`` are normalised to ``int`` (numpy integers are fine) so
    that ``1`` and ``"1"`` cannot silently yield different bytes on the two sides.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    context = {
        "run_id": str(run_id),
        "round": operator.index(round),
        "client_id": operator.index(client_id),
        "message_type": str(message_type),
        "direction": direction,
    }
    return json.dumps(context, sort_keys=True, separators=(",", ":")).encode()


def _aead(key: bytes) -> AESGCM:
    # AESGCM also takes 128/192-bit keys; insist on the 256-bit key derive_key makes.
    if len(key) != 32:
        raise ValueError(f"envelope key must be 32 bytes, got {len(key)}")
    return AESGCM(key)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext`` with AES-256-GCM; return ``nonce || ciphertext || tag``.

    The nonce is 96 random bits. A random nonce repeats with probability about
    ``n**2 / 2**97`` after ``n`` messages under one key; NIST SP 800-38D caps random-nonce
    use at ``2**32`` messages per key. A key here lives for one (run, client) pair and
    seals a few messages per round, so ``n`` stays many orders of magnitude below that.
    """
    nonce = os.urandom(NONCE_SIZE)
    return nonce + _aead(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Verify and decrypt a :func:`seal` blob; :class:`EnvelopeError` on any failure."""
    if len(blob) < NONCE_SIZE + TAG_SIZE:
        raise EnvelopeError(f"sealed message too short ({len(blob)} bytes)")
    view = memoryview(blob)  # slicing a memoryview does not copy the ciphertext
    try:
        return _aead(key).decrypt(view[:NONCE_SIZE], view[NONCE_SIZE:], aad)
    except InvalidTag:
        raise EnvelopeError("authentication failed: wrong key, tampered message or mismatched context") from None
    except ValueError as e:
        raise EnvelopeError(str(e)) from None


# --------------------------------------------------------------------------- array packing


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialise named numeric arrays: ``b"FDA1"``, header length, JSON header, raw buffers.

    The output depends only on the names (in mapping order), dtypes, shapes and values,
    so equal inputs give equal bytes. Only bool, integer, float and complex dtypes are
    accepted; byte order is kept as given.
    """
    header, buffers = [], []
    for name, value in arrays.items():
        if not isinstance(name, str):
            raise TypeError(f"array names must be str, got {type(name).__name__}")
        array = np.asarray(value)
        if not array.flags.c_contiguous:  # ascontiguousarray would turn 0-d into 1-d
            array = array.copy(order="C")
        if array.dtype.kind not in _ARRAY_KINDS:
            raise ValueError(f"array {name!r} has unsupported dtype {array.dtype}")
        header.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape)})
        buffers.append(array.reshape(-1).view(np.uint8))
    head = json.dumps({"arrays": header}, sort_keys=True, separators=(",", ":")).encode()
    # join sizes its output once, so each buffer is copied exactly once.
    return b"".join([_PACK_PREFIX.pack(PACK_MAGIC, len(head)), head, *buffers])


def _dtype(spec: object) -> np.dtype:
    if not isinstance(spec, str):
        raise EnvelopeError("packed header: dtype must be a string")
    try:
        dtype = np.dtype(spec)
    except (TypeError, ValueError):
        raise EnvelopeError(f"packed header: invalid dtype {spec!r}") from None
    if dtype.kind not in _ARRAY_KINDS or dtype.str != spec:
        raise EnvelopeError(f"packed header: unsupported dtype {spec!r}")
    return dtype


def unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_arrays`; :class:`EnvelopeError` if ``data`` is malformed.

    The arrays are zero-copy views into ``data``, read-only when ``data`` is ``bytes``;
    call ``.copy()`` on any array you need to modify.
    """
    view = memoryview(data)
    if len(view) < _PACK_PREFIX.size:
        raise EnvelopeError("packed arrays too short")
    magic, head_len = _PACK_PREFIX.unpack_from(view)
    if magic != PACK_MAGIC:
        raise EnvelopeError("packed arrays: bad magic")
    offset = _PACK_PREFIX.size + head_len
    if offset > len(view):
        raise EnvelopeError("packed arrays: header longer than data")
    try:
        header = json.loads(bytes(view[_PACK_PREFIX.size : offset]))
        entries = header["arrays"]
        if not isinstance(entries, list):
            raise TypeError
    except (ValueError, TypeError, KeyError, RecursionError):
        raise EnvelopeError("packed arrays: malformed header") from None

    arrays: dict[str, np.ndarray] = {}
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape"}:
            raise EnvelopeError("packed header: each entry needs exactly name, dtype, shape")
        name, dtype, shape = entry["name"], _dtype(entry["dtype"]), entry["shape"]
        if not isinstance(name, str) or name in arrays:
            raise EnvelopeError(f"packed header: bad or duplicate array name {name!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise EnvelopeError(f"packed header: bad shape for {name!r}")
        count = math.prod(shape)
        end = offset + count * dtype.itemsize
        if end > len(view):
            raise EnvelopeError(f"packed arrays: data for {name!r} runs past the end")
        try:
            arrays[name] = np.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(tuple(shape))
        except (ValueError, OverflowError) as e:
            raise EnvelopeError(f"packed arrays: cannot rebuild {name!r}: {e}") from None
        offset = end
    if offset != len(view):
        raise EnvelopeError(f"packed arrays: {len(view) - offset} trailing bytes")
    return arrays
