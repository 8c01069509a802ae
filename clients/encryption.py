"""Client side of the encrypted model exchange: a Flower ClientApp mod.

Model weights never cross the message layer in plaintext. In a train or evaluate
message the server replaces the ``"arrays"`` ArrayRecord by a ConfigRecord under
``"sealed"`` holding ``{"blob": bytes}``: the :func:`shared.crypto.pack_arrays` bytes of
the model, sealed with AES-256-GCM under the key this client shares with the server
(X25519 + HKDF-SHA256, see :func:`shared.crypto.derive_key`). The associated data binds
the blob to (run id, round, client id, message type, direction).

:func:`encryption_mod` opens the incoming payload into a normal ``"arrays"``
ArrayRecord, calls the handler, and seals the reply's ``"arrays"`` the same way in the
client-to-server direction. Handlers never see the difference::

    app = ClientApp(mods=[encryption_mod])

Key material comes from the node's own config when it has a ``"keys-dir"`` entry (a
real SuperNode started with ``fedaudit supernode``): that directory holds this client's
private key and the registry, and the node then insists on sealed payloads whatever the
message says; ``""`` there means the node holds no keys and takes plaintext only.
Without that entry (simulation, where every node shares one host) the key directory
comes from the message config: ``"keys-dir"`` (the key directory written by
:func:`shared.crypto.init_keys`) and optionally ``"keys-passphrase-env"`` (name of the
environment variable holding the key passphrase, ``""`` for none). A config without
``"keys-dir"`` (or with ``""``) means encryption is off and the mod passes every message
through unchanged.

If the payload cannot be opened (tampered, wrong key, replayed into another round or
client, keys missing) the client does not train: the mod returns an error reply.

Only the model arrays are sealed. The config the server sends and the metrics a client
returns travel in the clear and are not authenticated.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from shared.crypto import (
    CLIENT_TO_SERVER,
    REGISTRY,
    SERVER_TO_CLIENT,
    Registry,
    EnvelopeError,
    associated_data,
    derive_key,
    load_client_private_key,
    load_registry,
    open_sealed,
    pack_arrays,
    seal,
    unpack_arrays,
)
from shared.errors import BadInput
from shared.protocol import (
    ARRAYS_KEY,
    BLOB_KEY,
    CONFIG_KEY,
    KEYS_DIR,
    KEYS_PASSPHRASE_ENV,
    NODE_KEYS_DIR,
    NODE_KEYS_PASSPHRASE_ENV,
    SEALED_KEY,
    replace_record,
)
# Message categories whose model payload is sealed; "query" messages carry no model.
SEALED_TYPES = ("train", "evaluate")

log = logging.getLogger(__name__)


class EncryptionModError(Exception):
    """Why a message cannot be opened or sealed; becomes the error reply's reason."""


# --------------------------------------------------------------------------- keys


def _raw(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@functools.lru_cache(maxsize=4)
def _registry_at(keys_dir: str, stamp: tuple[int, int, int]) -> Registry:
    return load_registry(keys_dir)


def _registry(keys_dir: str) -> Registry:
    """The key registry, parsed once per process while the file stays the same.

    Parsing builds every client's public key: at 1,000 clients about 3 ms, which every
    message for a client missing from :func:`client_keys`' cache would otherwise pay.
    The (inode, size, mtime) stamp makes a replaced registry be read again.
    """
    try:
        st = (Path(keys_dir) / REGISTRY).stat()
    except OSError:
        return load_registry(keys_dir)  # raises the usual BadInput
    return _registry_at(keys_dir, (st.st_ino, st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=64)
def client_keys(keys_dir: str, client_id: int, passphrase_env: str = ""):
    """This client's X25519 private key and the server's X25519 public key, cached per process.

    Raises :class:`BadInput` if a file is missing or unreadable, or if the private key
    does not belong to ``client_id`` according to the registry. Failures are not cached.
    """
    private = load_client_private_key(keys_dir, client_id, passphrase_env or None)
    registry = _registry(keys_dir)
    if _raw(private.public_key()) != _raw(registry.client(client_id)):
        raise BadInput(f"key file for client {client_id} in {keys_dir} does not match the key registry")
    return private, registry.server_x25519


@functools.lru_cache(maxsize=256)
def session_key(keys_dir: str, client_id: int, passphrase_env: str, run_id: str) -> bytes:
    """The AES-256-GCM key client ``client_id`` shares with the server for ``run_id``."""
    private, server_public = client_keys(keys_dir, client_id, passphrase_env)
    return derive_key(private, server_public, run_id)


# --------------------------------------------------------------------------- sealed records


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> ordered ``{name: ndarray}``."""
    return {name: array.numpy() for name, array in record.items()}


def numpy_to_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Ordered ``{name: ndarray}`` -> ArrayRecord (copies, so read-only views are fine)."""
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in arrays.items()})


def seal_arrays(key: bytes, arrays: Mapping[str, np.ndarray], aad: bytes) -> ConfigRecord:
    """The sealed ConfigRecord ``{"blob": nonce || ciphertext || tag}`` for ``arrays``."""
    return ConfigRecord({BLOB_KEY: seal(key, pack_arrays(arrays), aad)})


def sealed_blob(content: RecordDict) -> bytes:
    """The sealed blob in ``content``; :class:`EnvelopeError` if absent or malformed."""
    record = content.get(SEALED_KEY)
    if not isinstance(record, ConfigRecord):
        raise EnvelopeError(f"no sealed model payload (no ConfigRecord {SEALED_KEY!r})")
    blob = record.get(BLOB_KEY)
    if not isinstance(blob, bytes):
        raise EnvelopeError(f"sealed payload has no bytes {BLOB_KEY!r}")
    return blob


def open_arrays(key: bytes, content: RecordDict, aad: bytes) -> dict[str, np.ndarray]:
    """Open the sealed payload of ``content``; :class:`EnvelopeError` on any failure."""
    return unpack_arrays(open_sealed(key, sealed_blob(content), aad))




def message_category(msg: Message) -> str:
    """``"train"`` for message type ``"train"`` or ``"train.<action>"``, and so on."""
    return msg.metadata.message_type.split(".", 1)[0]


def _config(msg: Message) -> ConfigRecord | None:
    if not msg.has_content():
        return None
    config = msg.content.get(CONFIG_KEY)
    return config if isinstance(config, ConfigRecord) else None


def node_encryption_settings(context: Context | None) -> tuple[str, str] | None:
    """``(keys_dir, passphrase_env)`` from the node config; ``("", "")`` for a node
    that holds no keys; None when the node config does not say (simulation)."""
    if context is None or NODE_KEYS_DIR not in context.node_config:
        return None
    keys_dir = context.node_config[NODE_KEYS_DIR]
    passphrase_env = context.node_config.get(NODE_KEYS_PASSPHRASE_ENV, "")
    return (keys_dir if isinstance(keys_dir, str) else ""), (passphrase_env if isinstance(passphrase_env, str) else "")


def encryption_settings(msg: Message, context: Context | None = None) -> tuple[str, str] | None:
    """``(keys_dir, passphrase_env)`` of the node, else of the message config; None if encryption is off."""
    node = node_encryption_settings(context)
    if node is not None:
        return node if node[0] else None
    config = _config(msg)
    if config is None:
        return None
    keys_dir = config.get(KEYS_DIR, "")
    if not isinstance(keys_dir, str) or not keys_dir:
        return None
    passphrase_env = config.get(KEYS_PASSPHRASE_ENV, "")
    return keys_dir, passphrase_env if isinstance(passphrase_env, str) else ""


def envelope_context(msg: Message, context: Context) -> tuple[str, int, int, str]:
    """``(run_id, round, client_id, category)`` for the associated data of ``msg``."""
    config = _config(msg)
    try:
        run_id = str(config["run-id"])
        round_ = int(config["server-round"])
    except (KeyError, TypeError, ValueError) as e:
        raise EncryptionModError(f"message config lacks a valid {e} needed to open the sealed model") from None
    try:
        client_id = int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError):
        raise EncryptionModError("node config has no valid 'partition-id'; cannot pick this client's key") from None
    return run_id, round_, client_id, message_category(msg)


# --------------------------------------------------------------------------- the mod


def _error_reply(msg: Message, reason: str) -> Message:
    log.error("encryption_mod: %s", reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"encryption_mod: {reason}"), reply_to=msg)


def _plaintext_records(content: RecordDict) -> list[str]:
    return [name for name, value in content.items() if isinstance(value, ArrayRecord)]


def encryption_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Open the server's sealed model, run the handler, seal the reply's model.

    Passes the message through untouched if it is not a train/evaluate message or
    if its config has no ``"keys-dir"`` (encryption off).
    """
    if message_category(msg) not in SEALED_TYPES or not msg.has_content():
        return call_next(msg, context)
    settings = encryption_settings(msg, context)
    if settings is None:
        if SEALED_KEY in msg.content:
            where = "this node was started without keys" if node_encryption_settings(context) else f"the config has no {KEYS_DIR!r}"
            return _error_reply(msg, f"the model is sealed but {where}; cannot open it")
        return call_next(msg, context)
    keys_dir, passphrase_env = settings

    try:
        run_id, round_, client_id, category = envelope_context(msg, context)
    except EncryptionModError as e:
        return _error_reply(msg, str(e))
    where = f"client {client_id}, round {round_}, {category}"
    plaintext = _plaintext_records(msg.content)
    if plaintext:
        return _error_reply(msg, f"{where}: the server sent plaintext arrays {plaintext} while encryption is on; refusing")
    try:
        key = session_key(keys_dir, client_id, passphrase_env, run_id)
    except BadInput as e:
        return _error_reply(msg, f"{where}: cannot load this client's keys: {e}")
    aad_in = associated_data(run_id, round_, client_id, category, SERVER_TO_CLIENT)
    try:
        arrays = open_arrays(key, msg.content, aad_in)
    except EnvelopeError as e:
        return _error_reply(msg, f"{where}: cannot open the server's sealed model ({e.reason}); not training")

    opened = Message(metadata=msg.metadata, content=replace_record(msg.content, SEALED_KEY, ARRAYS_KEY, numpy_to_arrays(arrays)))
    reply = call_next(opened, context)
    if reply.has_error() or not reply.has_content():
        return reply

    content = reply.content
    others = [name for name in _plaintext_records(content) if name != ARRAYS_KEY]
    if others:
        return _error_reply(msg, f"{where}: the reply carries ArrayRecords {others} that encryption_mod cannot seal")
    if ARRAYS_KEY not in content:
        return reply  # evaluate replies carry metrics only
    aad_out = associated_data(run_id, round_, client_id, category, CLIENT_TO_SERVER)
    sealed = seal_arrays(key, arrays_to_numpy(content[ARRAYS_KEY]), aad_out)
    return Message(metadata=reply.metadata, content=replace_record(content, ARRAYS_KEY, SEALED_KEY, sealed))
