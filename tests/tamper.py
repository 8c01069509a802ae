"""TEST ONLY: a ClientApp mod that makes one client misbehave on the encrypted exchange.

    app = ClientApp(mods=[make_tamper_mod(mode, victim, keys_dir), encryption_mod])

Mods run outermost first, so the tamper mod sits *outside* :func:`encryption_mod`: it
sees the message exactly as it travels (sealed model in, sealed reply out), like an
attacker on the wire or a malicious client holding its own key. Modes that change the
plaintext (``swap``, ``poison-*``) open the sealed reply with the victim's key, change
it and seal it again, which is the same as changing the arrays before encryption_mod
seals them.

Modes (only the client whose partition id is ``victim_client`` is affected):

``tamper``        flip one byte of the sealed train reply's ciphertext.
``replay``        from round 2 on, send the sealed train reply of round 1 instead.
``swap``          seal the train reply as the next client in the registry (its key and
                  client id in the associated data): a reply moved between clients.
``poison-nan``    set one weight of the train reply to NaN.
``poison-shape``  give one array of the train reply a different shape.
``tamper-in``     flip one byte of the *incoming* sealed model: the client must refuse
                  to train and answer with an error.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from clients.encryption import (
    BLOB_KEY,
    KEYS_DIR,
    KEYS_PASSPHRASE_ENV,
    SEALED_KEY,
    message_category,
    replace_record,
    sealed_blob,
    session_key,
)
from shared.crypto import CLIENT_TO_SERVER, NONCE_SIZE, associated_data, load_registry, open_sealed, pack_arrays, seal, unpack_arrays

MODES = ("tamper", "replay", "swap", "poison-nan", "poison-shape", "tamper-in")
REPLAY_STATE = "tamper-replay"


def flip_byte(blob: bytes) -> bytes:
    """``blob`` with one ciphertext byte (just after the nonce) inverted."""
    data = bytearray(blob)
    data[NONCE_SIZE + (len(data) - NONCE_SIZE) // 2] ^= 0xFF
    return bytes(data)


def _with_blob(msg: Message, blob: bytes) -> Message:
    content = replace_record(msg.content, SEALED_KEY, SEALED_KEY, ConfigRecord({BLOB_KEY: blob}))
    return Message(metadata=msg.metadata, content=content)


def _poison(arrays: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    arrays = {k: np.array(v) for k, v in arrays.items()}  # writable copies
    if mode == "poison-nan":
        name = next(k for k, v in arrays.items() if v.dtype.kind == "f" and v.size)
        arrays[name].reshape(-1)[0] = np.nan
    else:  # poison-shape: one extra value on the first array
        name = next(iter(arrays))
        arrays[name] = np.append(arrays[name].reshape(-1), arrays[name].reshape(-1)[:1])
    return arrays


def _next_client(keys_dir: str, client_id: int) -> int:
    ids = sorted(load_registry(keys_dir).clients)
    later = [i for i in ids if i > client_id]
    other = later[0] if later else ids[0]
    if other == client_id:
        raise ValueError("swap needs at least two clients in the key registry")
    return other


def make_tamper_mod(mode: str, victim_client: int, keys_dir: str | None = None) -> Mod:
    """A mod that applies ``mode`` to client ``victim_client``'s train messages.

    ``keys_dir`` defaults to the ``"keys-dir"`` of each message's config.
    """
    if mode not in MODES:
        raise ValueError(f"unknown tamper mode {mode!r}; choose one of {MODES}")
    victim_client = int(victim_client)

    def tamper_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if int(context.node_config["partition-id"]) != victim_client or message_category(msg) != "train":
            return call_next(msg, context)
        config = msg.content["config"]
        if mode == "tamper-in":
            return call_next(_with_blob(msg, flip_byte(sealed_blob(msg.content))), context)

        reply = call_next(msg, context)
        if reply.has_error() or SEALED_KEY not in reply.content:
            return reply
        blob = sealed_blob(reply.content)
        round_ = int(config["server-round"])
        if mode == "tamper":
            return _with_blob(reply, flip_byte(blob))
        if mode == "replay":
            if round_ == 1:
                context.state[REPLAY_STATE] = ConfigRecord({BLOB_KEY: blob})
                return reply
            if REPLAY_STATE in context.state:
                return _with_blob(reply, context.state[REPLAY_STATE][BLOB_KEY])
            return reply

        # swap / poison-*: open the reply as the victim, change it, seal it again.
        directory = keys_dir or str(config[KEYS_DIR])
        passphrase_env = str(config.get(KEYS_PASSPHRASE_ENV, ""))
        run_id = str(config["run-id"])
        own_key = session_key(directory, victim_client, passphrase_env, run_id)
        own_aad = associated_data(run_id, round_, victim_client, "train", CLIENT_TO_SERVER)
        arrays = unpack_arrays(open_sealed(own_key, blob, own_aad))
        if mode == "swap":
            other = _next_client(directory, victim_client)
            key = session_key(directory, other, passphrase_env, run_id)
            aad = associated_data(run_id, round_, other, "train", CLIENT_TO_SERVER)
            return _with_blob(reply, seal(key, pack_arrays(arrays), aad))
        return _with_blob(reply, seal(own_key, pack_arrays(_poison(dict(arrays), mode)), own_aad))

    tamper_mod.__name__ = f"tamper_mod_{mode.replace('-', '_')}"
    return tamper_mod


__all__ = ["MODES", "flip_byte", "make_tamper_mod"]
