"""Server side of the encrypted model exchange: a strategy wrapper.

:class:`EncryptedExchange` wraps any Flower strategy, in the same delegation style as
:class:`server.strategies.ParticipatingClients`. The inner strategy builds its train and
evaluate messages as usual; the wrapper then gives every destination a new RecordDict
in which the ``"arrays"`` ArrayRecord is replaced by a ConfigRecord ``"sealed"``
holding ``{"blob": bytes}``: the :func:`shared.crypto.pack_arrays` bytes of the model,
sealed with AES-256-GCM under the key the server shares with that client (X25519 +
HKDF-SHA256). The associated data binds each blob to (run id, round, client id,
message type, direction), so a blob opens only in the context it was sealed for.

Train replies are opened before the inner strategy sees them. A reply is rejected, and
left out of aggregation, if it comes from an unknown node, carries plaintext arrays or
no sealed payload, fails authentication, or holds arrays that are not finite or do not
match the global model's names, shapes and dtypes. Rejections are kept in
:attr:`EncryptedExchange.rejections`. When authentication fails the wrapper tries a
few other contexts (earlier rounds, other clients' keys, the server's own direction),
within a byte budget, to say whether the reply was replayed, moved between clients or
reflected, rather than tampered with.

Only the model arrays are sealed. Configs and metrics travel in the clear.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from shared.crypto import (
    CLIENT_TO_SERVER,
    SERVER_TO_CLIENT,
    EnvelopeError,
    Registry,
    associated_data,
    derive_key,
    open_sealed,
    pack_arrays,
    seal,
    unpack_arrays,
)
from shared.errors import BadInput
from shared.protocol import replace_record, ARRAYS_KEY, BLOB_KEY, CONFIG_KEY, KEYS_DIR, METRICS_KEY, REFUSED_KEY, SEALED_KEY

# At most this many ciphertext bytes are decrypted per rejected reply while working out
# *why* it failed authentication (replay, moved, reflected). Only failures pay for it.
DIAGNOSIS_BUDGET_BYTES = 256 * 1024 * 1024

log = logging.getLogger(__name__)


class EncryptionError(RuntimeError):
    """The server cannot seal a message (unknown node, missing keys-dir, ...)."""


class _Rejected(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _spec(arrays: Mapping[str, np.ndarray]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(name, a.dtype.str, tuple(a.shape)) for name, a in arrays.items()]


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def is_refusal(reply: Message) -> bool:
    """A train reply in which the client declined to train: refused = 1 and no model at all."""
    content = reply.content
    metrics = content.get(METRICS_KEY)
    if not isinstance(metrics, MetricRecord) or metrics.get(REFUSED_KEY, 0) != 1:
        return False
    return SEALED_KEY not in content and not any(isinstance(v, ArrayRecord) for v in content.values())


class EncryptedExchange(Strategy):
    """Wrap a strategy so every model payload travels sealed, both ways.

    Parameters
    ----------
    inner
        The strategy to wrap (e.g. ``ParticipatingClients(FedAvg(...), ...)``).
    server_private_key
        The server's X25519 private key (:func:`shared.crypto.load_server_keys`).
    registry
        The public-key registry (:func:`shared.crypto.load_registry`).
    run_id
        The run id; it must equal the ``"run-id"`` in the config the messages carry.
    client_of_node
        Node id -> client (partition) id, from the describe round.

    Attributes
    ----------
    rejections
        ``round -> [{"node", "client", "kind", "reason"}]`` for every train reply that
        was left out of aggregation. ``kind`` is one of ``unknown-client``,
        ``plaintext``, ``missing-payload``, ``tampered``, ``replayed``, ``moved``,
        ``reflected``, ``malformed``, ``wrong-shape``, ``non-finite``, ``duplicate``.
    last_accepted
        The train replies of the latest :meth:`verify_train` / :meth:`aggregate_train`
        call that were accepted, with their plaintext ``"arrays"`` restored (metrics
        untouched), in the order given.
    """

    def __init__(
        self,
        inner: Strategy,
        server_private_key: X25519PrivateKey,
        registry: Registry,
        run_id: str,
        client_of_node: Mapping[int, int],
    ) -> None:
        self.inner = inner
        self.server_private_key = server_private_key
        self.registry = registry
        self.run_id = str(run_id)
        self.client_of_node = {int(n): int(c) for n, c in client_of_node.items()}
        self.rejections: dict[int, list[dict]] = {}
        self.last_accepted: list[Message] = []
        self._keys: dict[int, bytes] = {}
        self._global_spec: dict[int, list] = {}
        self._memo_round: int | None = None
        # id(reply) -> (reply, opened reply or None if rejected), for the current round.
        self._memo: dict[int, tuple[Message, Message | None]] = {}
        self._accepted_nodes: set[int] = set()

    def __getattr__(self, name: str):
        # Reach wrapped helpers such as ParticipatingClients.participants.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # ------------------------------------------------------------------ keys

    def key_for(self, client_id: int) -> bytes:
        """The AES-256-GCM key shared with ``client_id`` for this run; BadInput if unknown."""
        key = self._keys.get(client_id)
        if key is None:
            key = derive_key(self.server_private_key, self.registry.client(client_id), self.run_id)
            self._keys[client_id] = key
        return key

    def _aad(self, round_: int, client_id: int, category: str, direction: str) -> bytes:
        return associated_data(self.run_id, round_, client_id, category, direction)

    # ------------------------------------------------------------------ sealing

    def _seal_all(
        self, server_round: int, messages: Iterable[Message], category: str, given: tuple[ArrayRecord, dict] | None = None
    ) -> list[Message]:
        # Pack each distinct ArrayRecord once (Flower's strategies share one across messages).
        packed: dict[int, tuple[ArrayRecord, bytes]] = {}
        if given is not None:
            packed[id(given[0])] = (given[0], pack_arrays(given[1]))
        out = []
        for msg in messages:
            content = msg.content
            node = msg.metadata.dst_node_id
            client_id = self.client_of_node.get(node)
            if client_id is None:
                raise EncryptionError(
                    f"round {server_round}: cannot seal the {category} message for node {node}: "
                    f"it is not a known client (known nodes: {sorted(self.client_of_node)})"
                )
            self._check_config(server_round, content)
            extra = [k for k, v in content.items() if isinstance(v, ArrayRecord) and k != ARRAYS_KEY]
            if extra or not isinstance(content.get(ARRAYS_KEY), ArrayRecord):
                raise EncryptionError(
                    f"round {server_round}: the {category} message must carry exactly one ArrayRecord "
                    f"{ARRAYS_KEY!r} (found {[k for k, v in content.items() if isinstance(v, ArrayRecord)]})"
                )
            record = content[ARRAYS_KEY]
            if id(record) not in packed:
                packed[id(record)] = (record, pack_arrays(_numpy(record)))
            plaintext = packed[id(record)][1]
            try:
                key = self.key_for(client_id)
            except BadInput as e:
                raise EncryptionError(f"round {server_round}: cannot seal for client {client_id}: {e}") from None
            aad = self._aad(server_round, client_id, category, SERVER_TO_CLIENT)
            sealed = ConfigRecord({BLOB_KEY: seal(key, plaintext, aad)})
            out.append(Message(metadata=msg.metadata, content=replace_record(content, ARRAYS_KEY, SEALED_KEY, sealed)))
        return out

    def _check_config(self, server_round: int, content: RecordDict) -> None:
        config = content.get(CONFIG_KEY)
        if not isinstance(config, ConfigRecord):
            raise EncryptionError(f"round {server_round}: message has no ConfigRecord {CONFIG_KEY!r}")
        keys_dir = config.get(KEYS_DIR, "")
        if not isinstance(keys_dir, str) or not keys_dir:
            raise EncryptionError(f"round {server_round}: config has no {KEYS_DIR!r}; clients could not open the sealed model")
        if str(config.get("run-id", "")) != self.run_id:
            raise EncryptionError(f"round {server_round}: config run-id {config.get('run-id')!r} differs from {self.run_id!r}")
        if config.get("server-round") != server_round:
            raise EncryptionError(
                f"round {server_round}: config server-round {config.get('server-round')!r} differs from the round being sealed"
            )

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        global_arrays = _numpy(arrays)
        self._global_spec[server_round] = _spec(global_arrays)
        messages = self.inner.configure_train(server_round, arrays, config, grid)
        return self._seal_all(server_round, messages, "train", (arrays, global_arrays))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._seal_all(server_round, self.inner.configure_evaluate(server_round, arrays, config, grid), "evaluate")

    # ------------------------------------------------------------------ opening

    def verify_train(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Open and check train replies; return the accepted ones with plaintext arrays.

        Error replies and refusals (metric ``"refused"`` = 1, no model payload) are
        skipped: neither accepted nor recorded as rejections.
        Calling it again with the same reply objects, or with the opened messages it
        returned, gives the same answer without recording rejections twice, so the
        round loop may call it before :meth:`aggregate_train`.
        """
        accepted = []
        for reply in replies:
            if reply.has_error() or is_refusal(reply):
                continue
            opened = self._verified(server_round, reply)
            if opened is not None:
                accepted.append(opened)
        self.last_accepted = accepted
        return list(accepted)

    def _verified(self, server_round: int, reply: Message) -> Message | None:
        if self._memo_round != server_round:
            self._memo_round, self._memo, self._accepted_nodes = server_round, {}, set()
        seen = self._memo.get(id(reply))
        if seen is not None and seen[0] is reply:
            return seen[1]
        try:
            opened = self._open_reply(server_round, reply)
        except _Rejected as r:
            node = reply.metadata.src_node_id
            entry = {"node": node, "client": self.client_of_node.get(node), "kind": r.kind, "reason": r.reason}
            self.rejections.setdefault(server_round, []).append(entry)
            log.warning("round %d: rejected train reply from node %s (client %s): %s", server_round, node, entry["client"], r.reason)
            opened = None
        self._memo[id(reply)] = (reply, opened)
        if opened is not None:  # the opened message verifies as itself
            self._memo[id(opened)] = (opened, opened)
        return opened

    def _open_reply(self, server_round: int, reply: Message) -> Message:
        node = reply.metadata.src_node_id
        client_id = self.client_of_node.get(node)
        if client_id is None:
            raise _Rejected("unknown-client", f"reply from node {node}, which is not a known client (wrong key or unknown client)")
        content = reply.content
        plaintext = [k for k, v in content.items() if isinstance(v, ArrayRecord)]
        if plaintext:
            raise _Rejected("plaintext", f"reply carries plaintext arrays {plaintext} instead of a sealed payload")
        record = content.get(SEALED_KEY)
        blob = record.get(BLOB_KEY) if isinstance(record, ConfigRecord) else None
        if not isinstance(blob, bytes):
            raise _Rejected("missing-payload", f"reply has no sealed model payload ({SEALED_KEY!r}.{BLOB_KEY!r})")
        try:
            key = self.key_for(client_id)
        except BadInput as e:
            raise _Rejected("unknown-client", f"wrong key or unknown client: {e}") from None
        try:
            data = open_sealed(key, blob, self._aad(server_round, client_id, "train", CLIENT_TO_SERVER))
        except EnvelopeError:
            raise _Rejected(*self._diagnose(server_round, client_id, blob)) from None
        try:
            arrays = unpack_arrays(data)
        except EnvelopeError as e:
            raise _Rejected("malformed", f"sealed payload is not a valid packed model: {e.reason}") from None
        self._check_arrays(server_round, arrays)
        # One instruction, one reply: a second valid reply would be averaged in twice.
        if node in self._accepted_nodes:
            raise _Rejected("duplicate", f"a second reply from node {node} (client {client_id}) in round {server_round}")
        self._accepted_nodes.add(node)
        restored = ArrayRecord({name: Array(np.asarray(a)) for name, a in arrays.items()})
        return Message(metadata=reply.metadata, content=replace_record(content, SEALED_KEY, ARRAYS_KEY, restored))

    def _check_arrays(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        expected = self._global_spec.get(server_round)
        if expected is None and self._global_spec:
            expected = self._global_spec[max(self._global_spec)]
        if expected is not None:
            names = [name for name, _, _ in expected]
            if list(arrays) != names:
                missing = [n for n in names if n not in arrays]
                extra = [n for n in arrays if n not in names]
                raise _Rejected(
                    "wrong-shape",
                    f"model arrays do not match the global model (missing {missing}, unexpected {extra}"
                    + (", order differs" if not missing and not extra else "") + ")",
                )
            for name, dtype, shape in expected:
                a = arrays[name]
                if a.dtype.str != dtype or tuple(a.shape) != shape:
                    raise _Rejected(
                        "wrong-shape",
                        f"array {name!r} is {a.dtype.str}{list(a.shape)}, the global model has {dtype}{list(shape)}",
                    )
        for name, a in arrays.items():
            if a.dtype.kind in "fc":
                bad = a.size - int(np.count_nonzero(np.isfinite(a)))
                if bad:
                    raise _Rejected("non-finite", f"array {name!r} holds {bad} non-finite value(s) (NaN or infinity)")

    def _diagnose(self, server_round: int, client_id: int, blob: bytes) -> tuple[str, str]:
        """Why ``blob`` failed to open for ``client_id``: try other contexts within a budget."""
        attempts = max(0, DIAGNOSIS_BUDGET_BYTES // max(len(blob), 1))
        complete = True

        def opens(key: bytes, aad: bytes) -> bool:
            nonlocal attempts, complete
            if attempts <= 0:
                complete = False
                return False
            attempts -= 1
            try:
                open_sealed(key, blob, aad)
                return True
            except EnvelopeError:
                return False

        own = self.key_for(client_id)
        # Reflected: the server's own message to this client, sent back.
        for category in ("train", "evaluate"):
            if opens(own, self._aad(server_round, client_id, category, SERVER_TO_CLIENT)):
                return "reflected", f"reply is the server's own sealed {category} message echoed back (reflected)"
        # Replayed: this client's own reply from an earlier round (or another message type).
        if opens(own, self._aad(server_round, client_id, "evaluate", CLIENT_TO_SERVER)):
            return "replayed", "reply was sealed as an evaluate reply, not a train reply (replayed or moved)"
        for earlier in range(server_round - 1, 0, -1):
            if opens(own, self._aad(earlier, client_id, "train", CLIENT_TO_SERVER)):
                return "replayed", f"reply was sealed for round {earlier}, not round {server_round} (replayed reply)"
        # Moved: sealed by or for another client (key and client id of someone else).
        for other in sorted(self.registry.clients):
            if other == client_id:
                continue
            if opens(self.key_for(other), self._aad(server_round, other, "train", CLIENT_TO_SERVER)):
                return "moved", (
                    f"reply was sealed as client {other}'s but came from the node of client {client_id} "
                    "(moved or swapped reply)"
                )
        if not complete:
            return "tampered", "authentication failed (tampered, replayed, moved or wrong key)"
        return "tampered", "authentication failed: tampered ciphertext or wrong key (it opens in no context the server tried)"

    # ------------------------------------------------------------------ aggregation

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Open and check the replies, then let the inner strategy aggregate the accepted ones.

        Error replies are passed on (Flower's strategies log and skip them); refusals and
        rejected replies are left out. Replies already returned by :meth:`verify_train`
        (sealed originals or the opened messages) are not checked twice.
        """
        passed, accepted = [], []
        for reply in replies:
            if reply.has_error():
                passed.append(reply)
                continue
            if is_refusal(reply):
                continue
            opened = self._verified(server_round, reply)
            if opened is not None:
                passed.append(opened)
                accepted.append(opened)
        self.last_accepted = accepted
        # Always delegate, even with nothing accepted: FedAvg and its subclasses then
        # return (None, None) themselves, while wrappers that must release a model every
        # round (ClientLevelDP adds noise to an empty sum) still run.
        return self.inner.aggregate_train(server_round, passed)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        # Evaluate replies carry only metrics.
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()
