"""Encrypted model exchange, without a simulation: server wrapper <-> client mod on real
Flower Message objects, passed through Flower's own protobuf serialisation."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from clients import encryption as client_enc
from clients.encryption import KEYS_DIR, KEYS_PASSPHRASE_ENV, SEALED_KEY, encryption_mod
from server import encryption as server_enc
from server.encryption import EncryptedExchange, EncryptionError
from server.strategies import ParticipatingClients, build_strategy
from shared.crypto import NONCE_SIZE, init_keys, load_registry, load_server_keys
from tests.tamper import MODES, make_tamper_mod

RUN_ID = "run-enc-1"
NODES = {101: 0, 102: 1, 103: 2}  # node id -> client id
NUM_EXAMPLES = {0: 10, 1: 20, 2: 30}
PASS_VAR = "FEDAUDIT_TEST_ENC_PASSPHRASE"


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def global_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "fc.weight": rng.standard_normal((10, 64)).astype(np.float32),
        "fc.bias": rng.standard_normal(10).astype(np.float32),
        "steps": np.array(7, dtype=np.int64),
    }


def as_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Instruction messages take their run/node/task ids from the running ServerApp."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture
def keys(tmp_path, monkeypatch):
    monkeypatch.delenv(PASS_VAR, raising=False)
    client_enc.client_keys.cache_clear()
    client_enc.session_key.cache_clear()
    return init_keys(tmp_path / "keys", 3)


def base_config(keys_dir, **extra) -> dict:
    return {"run-id": RUN_ID, KEYS_DIR: str(keys_dir) if keys_dir else "", KEYS_PASSPHRASE_ENV: "", **extra}


def make_server(keys_dir, client_of_node=NODES) -> EncryptedExchange:
    server_x, _ = load_server_keys(keys_dir)
    inner = ParticipatingClients(build_strategy("fedavg"), {c: n for n, c in NODES.items()}, 1.0, seed=0)
    return EncryptedExchange(inner, server_x, load_registry(keys_dir), RUN_ID, client_of_node)


def context_for(node: int, states: dict | None = None) -> Context:
    state = states.setdefault(node, RecordDict()) if states is not None else RecordDict()
    return Context(run_id=1, node_id=node, node_config={"partition-id": NODES.get(node, 99)}, state=state, run_config={})


def wire(msg: Message) -> Message:
    """What the other side receives: the message through Flower's protobuf serialisation."""
    return message_from_proto(message_to_proto(msg))


def wire_bytes(msg: Message) -> bytes:
    proto = message_to_proto(msg).SerializeToString()
    objects = b"".join(obj.deflate() for obj in get_all_nested_objects(msg).values())
    return proto + objects


def train_handler(msg: Message, context: Context) -> Message:
    """Stand-in for training: every value + (client id + 1)."""
    cid = int(context.node_config["partition-id"])
    arrays = {k: np.asarray(v + (cid + 1)) for k, v in as_numpy(msg.content["arrays"]).items()}
    metrics = MetricRecord({"num-examples": NUM_EXAMPLES[cid], "partition-id": cid, "train-loss": 0.5})
    return Message(RecordDict({"metrics": metrics, "arrays": as_record(arrays)}), reply_to=msg)


def to_node(messages, node: int) -> Message:
    (msg,) = [m for m in messages if m.metadata.dst_node_id == node]
    return msg


def clients_of(messages) -> list[int]:
    return sorted(int(m.content["metrics"]["partition-id"]) for m in messages)


def run_clients(messages, mods, states=None, handler=train_handler) -> list[Message]:
    app = ClientApp(mods=list(mods))  # a real ClientApp, so Flower orders the mods
    app.train()(handler)
    app.evaluate()(handler)
    replies = []
    for msg in messages:
        received = wire(msg)
        replies.append(wire(app(received, context_for(received.metadata.dst_node_id, states))))
    return replies


def expected_aggregate(arrays, clients) -> dict[str, np.ndarray]:
    total = sum(NUM_EXAMPLES[c] for c in clients)
    shift = sum((c + 1) * NUM_EXAMPLES[c] for c in clients) / total
    return {k: v + shift for k, v in arrays.items()}


def train_round(server, rnd, arrays, keys_dir, mods=(encryption_mod,), states=None):
    messages = list(server.configure_train(rnd, as_record(arrays), ConfigRecord(base_config(keys_dir)), FakeGrid(NODES)))
    replies = run_clients(messages, mods, states)
    aggregated, metrics = server.aggregate_train(rnd, replies)
    return messages, replies, aggregated


def assert_no_plaintext(msg: Message, arrays: dict[str, np.ndarray]) -> None:
    assert not any(isinstance(v, ArrayRecord) for v in msg.content.values()), list(msg.content)
    assert isinstance(msg.content[SEALED_KEY], ConfigRecord)
    data = wire_bytes(msg)
    for name, a in arrays.items():
        raw = np.ascontiguousarray(a).tobytes()
        probe = raw[: min(len(raw), 64)]
        if len(probe) >= 16:
            assert probe not in data, f"plaintext bytes of {name} are on the wire"


# --------------------------------------------------------------------------- round trip


def test_round_trip_aggregates_and_nothing_travels_in_plaintext(keys):
    server = make_server(keys)
    arrays = global_arrays()
    messages, replies, aggregated = train_round(server, 1, arrays, keys)

    assert len(messages) == 3
    assert len({id(m.content) for m in messages}) == 3  # one RecordDict per destination
    for msg in messages:
        assert_no_plaintext(msg, arrays)
    for reply in replies:
        assert not reply.has_error(), reply.error.reason
        cid = int(reply.content["metrics"]["partition-id"])
        assert_no_plaintext(reply, {k: v + cid + 1 for k, v in arrays.items() if v.dtype.kind == "f"})

    want = expected_aggregate(arrays, [0, 1, 2])
    got = as_numpy(aggregated)
    assert list(got) == list(arrays)
    for k in ("fc.weight", "fc.bias"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5)
    assert server.rejections == {}
    assert clients_of(server.last_accepted) == [0, 1, 2]
    assert all(isinstance(m.content["arrays"], ArrayRecord) for m in server.last_accepted)


def test_serialisation_check_would_see_plaintext(keys):
    """Positive control: the same check finds the weights in an unsealed message."""
    arrays = global_arrays()
    plain = Message(RecordDict({"arrays": as_record(arrays)}), dst_node_id=101, message_type=MessageType.TRAIN)
    data = wire_bytes(plain)
    assert arrays["fc.weight"].tobytes()[:64] in data


def test_nonces_are_never_reused(keys):
    server = make_server(keys)
    nonces = []
    for rnd in (1, 2, 3):
        for kind in ("train", "evaluate"):
            configure = server.configure_train if kind == "train" else server.configure_evaluate
            for msg in configure(rnd, as_record(global_arrays()), ConfigRecord(base_config(keys)), FakeGrid(NODES)):
                nonces.append(msg.content[SEALED_KEY]["blob"][:NONCE_SIZE])
    assert len(nonces) == 18 and len(set(nonces)) == 18


def test_verify_then_aggregate_like_the_round_loop(keys):
    server = make_server(keys)
    arrays = global_arrays()
    messages = list(server.configure_train(1, as_record(arrays), ConfigRecord(base_config(keys)), FakeGrid(NODES)))
    replies = run_clients(messages, [make_tamper_mod("tamper", 2), encryption_mod])
    good = server.verify_train(1, replies)
    assert clients_of(good) == [0, 1]
    assert server.verify_train(1, replies) and len(server.rejections[1]) == 1  # no double counting
    aggregated, _ = server.aggregate_train(1, good)  # opened messages pass as they are
    assert len(server.rejections[1]) == 1
    np.testing.assert_allclose(as_numpy(aggregated)["fc.bias"], expected_aggregate(arrays, [0, 1])["fc.bias"], rtol=1e-5)


def test_a_second_reply_from_one_node_is_rejected(keys):
    server = make_server(keys)
    messages = list(server.configure_train(1, as_record(global_arrays()), ConfigRecord(base_config(keys)), FakeGrid(NODES)))
    replies = run_clients(messages, [encryption_mod])
    copy = Message(metadata=replies[1].metadata, content=replies[1].content)
    good = server.verify_train(1, [*replies, copy])
    assert clients_of(good) == [0, 1, 2]
    (rejection,) = server.rejections[1]
    assert rejection["kind"] == "duplicate" and rejection["node"] == replies[1].metadata.src_node_id


# --------------------------------------------------------------------------- attacks


@pytest.mark.parametrize(
    "mode, kind",
    [
        ("tamper", "tampered"),
        ("replay", "replayed"),
        ("swap", "moved"),
        ("poison-nan", "non-finite"),
        ("poison-shape", "wrong-shape"),
    ],
)
def test_misbehaving_client_is_rejected_and_others_aggregated(keys, mode, kind):
    victim = 1
    server = make_server(keys)
    mods = [make_tamper_mod(mode, victim, str(keys)), encryption_mod]
    states: dict = {}
    arrays = global_arrays()
    rounds = (1, 2) if mode == "replay" else (1,)
    for rnd in rounds:
        _, replies, aggregated = train_round(server, rnd, arrays, keys, mods, states)
        assert not any(r.has_error() for r in replies)
        if mode == "replay" and rnd == 1:
            assert server.rejections == {}  # round 1 is genuine
            arrays = as_numpy(aggregated)
    last = rounds[-1]
    assert list(server.rejections) == [last]
    (rejection,) = server.rejections[last]
    assert rejection["kind"] == kind, rejection
    assert rejection["client"] == victim and rejection["node"] == 102
    assert clients_of(server.last_accepted) == [0, 2]
    want = expected_aggregate(arrays, [0, 2])
    np.testing.assert_allclose(as_numpy(aggregated)["fc.weight"], want["fc.weight"], rtol=1e-5)


def test_rejection_reasons_are_specific(keys):
    reasons = {}
    for mode in ("tamper", "swap", "poison-nan", "poison-shape"):
        server = make_server(keys)
        train_round(server, 1, global_arrays(), keys, [make_tamper_mod(mode, 0), encryption_mod])
        reasons[mode] = server.rejections[1][0]["reason"]
    assert "tampered" in reasons["tamper"]
    assert "client 1's" in reasons["swap"] and "moved" in reasons["swap"]
    assert "NaN" in reasons["poison-nan"]
    assert "fc.weight" in reasons["poison-shape"]


def test_all_modes_are_covered():
    assert set(MODES) == {"tamper", "replay", "swap", "poison-nan", "poison-shape", "tamper-in"}
    with pytest.raises(ValueError, match="unknown tamper mode"):
        make_tamper_mod("nope", 0)


def test_client_refuses_to_train_on_a_tampered_model(keys):
    server = make_server(keys)
    trained = []

    def handler(msg, context):
        trained.append(int(context.node_config["partition-id"]))
        return train_handler(msg, context)

    messages = list(server.configure_train(1, as_record(global_arrays()), ConfigRecord(base_config(keys)), FakeGrid(NODES)))
    replies = run_clients(messages, [make_tamper_mod("tamper-in", 2), encryption_mod], handler=handler)
    assert sorted(trained) == [0, 1]
    (error,) = [r.error for r in replies if r.has_error()]
    assert "cannot open the server's sealed model" in error.reason and "client 2, round 1, train" in error.reason
    aggregated, _ = server.aggregate_train(1, replies)
    assert aggregated is not None and server.rejections == {}  # an error reply is not a rejection


def test_client_with_wrong_keys_refuses_and_wrong_key_reply_is_rejected(keys, tmp_path):
    other = init_keys(tmp_path / "other-keys", 3)
    server = make_server(keys)
    messages = list(server.configure_train(1, as_record(global_arrays()), ConfigRecord(base_config(keys)), FakeGrid(NODES)))
    # The client is pointed at another key directory: it cannot open the model.
    received = wire(to_node(messages, 101))
    received.content["config"] = ConfigRecord(base_config(other, **{"server-round": 1}))
    reply = encryption_mod(received, context_for(101), train_handler)
    assert reply.has_error() and "cannot open" in reply.error.reason

    # A reply sealed under another server's key fails authentication on this server.
    other_server = make_server(other)
    messages = list(other_server.configure_train(1, as_record(global_arrays()), ConfigRecord(base_config(other)), FakeGrid(NODES)))
    replies = run_clients(messages, [encryption_mod])
    server._global_spec[1] = server_enc._spec(global_arrays())
    assert server.aggregate_train(1, replies) == (None, None)
    assert {r["kind"] for r in server.rejections[1]} == {"tampered"}


def test_reply_from_unknown_node_and_plaintext_reply_are_rejected(keys):
    server = make_server(keys)
    arrays = global_arrays()
    messages = list(server.configure_train(1, as_record(arrays), ConfigRecord(base_config(keys)), FakeGrid(NODES)))
    replies = run_clients(messages, [encryption_mod])
    stranger = Message(RecordDict(), dst_node_id=999, message_type=MessageType.TRAIN)
    replies.append(Message(replies[0].content, reply_to=stranger))
    plain = Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 5, "partition-id": 1}), "arrays": as_record(arrays)}),
        reply_to=wire(to_node(messages, 102)),
    )
    replies = [plain if r.metadata.src_node_id == 102 else r for r in replies]
    server.aggregate_train(1, replies)
    kinds = {r["node"]: r["kind"] for r in server.rejections[1]}
    assert kinds == {999: "unknown-client", 102: "plaintext"}
    assert clients_of(server.last_accepted) == [0, 2]


def test_reflected_server_message_is_recognised(keys):
    server = make_server(keys)
    messages = list(server.configure_train(1, as_record(global_arrays()), ConfigRecord(base_config(keys)), FakeGrid(NODES)))
    replies = run_clients(messages, [encryption_mod])
    first = to_node(messages, 101)
    echoed = Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 5, "partition-id": 0}), SEALED_KEY: first.content[SEALED_KEY]}),
        reply_to=wire(first),
    )
    server.aggregate_train(1, [echoed, *(r for r in replies if r.metadata.src_node_id != 101)])
    assert server.rejections[1][0]["kind"] == "reflected"


def test_diagnosis_stays_within_its_budget(keys, monkeypatch):
    monkeypatch.setattr(server_enc, "DIAGNOSIS_BUDGET_BYTES", 1)
    server = make_server(keys)
    train_round(server, 1, global_arrays(), keys, [make_tamper_mod("swap", 0), encryption_mod])
    (rejection,) = server.rejections[1]
    assert rejection["kind"] == "tampered"
    assert rejection["reason"] == "authentication failed (tampered, replayed, moved or wrong key)"


def test_refusal_is_neither_accepted_nor_rejected(keys):
    server = make_server(keys)

    def handler(msg, context):
        cid = int(context.node_config["partition-id"])
        if cid == 1:
            metrics = MetricRecord({"num-examples": 0, "partition-id": cid, "refused": 1})
            return Message(RecordDict({"metrics": metrics}), reply_to=msg)
        return train_handler(msg, context)

    messages = list(server.configure_train(1, as_record(global_arrays()), ConfigRecord(base_config(keys)), FakeGrid(NODES)))
    replies = run_clients(messages, [encryption_mod], handler=handler)
    assert len(server.verify_train(1, replies)) == 2
    aggregated, _ = server.aggregate_train(1, replies)
    assert aggregated is not None and server.rejections == {}


def test_nothing_valid_gives_none(keys):
    server = make_server(keys)
    _, _, aggregated = train_round(server, 1, global_arrays(), keys, [make_tamper_mod("tamper", 0), encryption_mod])
    assert aggregated is not None
    messages = list(server.configure_train(2, as_record(global_arrays()), ConfigRecord(base_config(keys)), FakeGrid(NODES)))
    replies = run_clients([to_node(messages, 101)], [make_tamper_mod("tamper", 0), encryption_mod])
    assert server.aggregate_train(2, replies) == (None, None)


# --------------------------------------------------------------------------- evaluate, off, errors


def test_evaluate_messages_are_sealed(keys):
    server = make_server(keys)
    arrays = global_arrays(3)
    seen = {}

    def evaluate_handler(msg, context):
        cid = int(context.node_config["partition-id"])
        seen[cid] = as_numpy(msg.content["arrays"])
        metrics = MetricRecord({"num-examples": NUM_EXAMPLES[cid], "accuracy": 0.5 + cid / 10, "partition-id": cid})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    messages = list(server.configure_evaluate(4, as_record(arrays), ConfigRecord(base_config(keys)), FakeGrid(NODES)))
    for msg in messages:
        assert msg.metadata.message_type == MessageType.EVALUATE
        assert_no_plaintext(msg, arrays)
    replies = run_clients(messages, [encryption_mod], handler=evaluate_handler)
    assert sorted(seen) == [0, 1, 2]
    for got in seen.values():
        for k in arrays:
            np.testing.assert_array_equal(got[k], arrays[k])
    metrics = server.aggregate_evaluate(4, replies)
    assert metrics["accuracy"] == pytest.approx((0.5 * 10 + 0.6 * 20 + 0.7 * 30) / 60)


def test_a_train_blob_does_not_open_as_evaluate(keys):
    server = make_server(keys)
    train_msg = to_node(server.configure_train(1, as_record(global_arrays()), ConfigRecord(base_config(keys)), FakeGrid(NODES)), 101)
    evaluate_msg = to_node(server.configure_evaluate(1, as_record(global_arrays()), ConfigRecord(base_config(keys)), FakeGrid(NODES)), 101)
    moved = wire(evaluate_msg)
    moved.content[SEALED_KEY] = train_msg.content[SEALED_KEY]
    reply = encryption_mod(moved, context_for(101), train_handler)
    assert reply.has_error() and "evaluate" in reply.error.reason


def test_encryption_off_passes_through(keys):
    arrays = global_arrays()
    content = RecordDict({"arrays": as_record(arrays), "config": ConfigRecord(base_config(None, **{"server-round": 1}))})
    msg = Message(content, dst_node_id=101, message_type=MessageType.TRAIN)
    calls = []

    def handler(m, context):
        calls.append(m)
        return train_handler(m, context)

    reply = encryption_mod(msg, context_for(101), handler)
    assert calls == [msg]  # the very same message object
    assert isinstance(reply.content["arrays"], ArrayRecord) and SEALED_KEY not in reply.content

    no_key = RecordDict({"arrays": as_record(arrays), "config": ConfigRecord({"run-id": RUN_ID, "server-round": 1})})
    msg = Message(no_key, dst_node_id=101, message_type=MessageType.TRAIN)
    assert isinstance(encryption_mod(msg, context_for(101), handler).content["arrays"], ArrayRecord)


def test_queries_pass_through_even_with_keys(keys):
    msg = Message(RecordDict({"config": ConfigRecord(base_config(keys))}), dst_node_id=101, message_type=MessageType.QUERY)
    reply_content = RecordDict({"metrics": MetricRecord({"partition-id": 0})})
    reply = encryption_mod(msg, context_for(101), lambda m, c: Message(reply_content, reply_to=m))
    assert reply.content is reply_content


def test_client_refuses_plaintext_when_encryption_is_on_and_sealed_without_keys(keys):
    arrays = global_arrays()
    config = ConfigRecord(base_config(keys, **{"server-round": 1}))
    msg = Message(RecordDict({"arrays": as_record(arrays), "config": config}), dst_node_id=101, message_type=MessageType.TRAIN)
    reply = encryption_mod(msg, context_for(101), train_handler)
    assert reply.has_error() and "plaintext" in reply.error.reason

    server = make_server(keys)
    sealed = wire(to_node(server.configure_train(1, as_record(arrays), ConfigRecord(base_config(keys)), FakeGrid(NODES)), 101))
    sealed.content["config"] = ConfigRecord(base_config(None, **{"server-round": 1}))
    reply = encryption_mod(sealed, context_for(101), train_handler)
    assert reply.has_error() and "keys-dir" in reply.error.reason


def test_server_refuses_to_seal_for_unknown_nodes_or_without_keys_dir(keys):
    server = make_server(keys, client_of_node={101: 0, 102: 1})
    with pytest.raises(EncryptionError, match="node 103.*not a known client"):
        list(server.configure_train(1, as_record(global_arrays()), ConfigRecord(base_config(keys)), FakeGrid(NODES)))
    server = make_server(keys)
    with pytest.raises(EncryptionError, match="keys-dir"):
        server.configure_train(1, as_record(global_arrays()), ConfigRecord(base_config(None)), FakeGrid(NODES))
    with pytest.raises(EncryptionError, match="run-id"):
        server.configure_evaluate(1, as_record(global_arrays()), ConfigRecord({**base_config(keys), "run-id": "other"}), FakeGrid(NODES))


def test_keys_are_cached_per_process_and_passphrases_work(tmp_path, monkeypatch):
    monkeypatch.setenv(PASS_VAR, "correct horse")
    client_enc.client_keys.cache_clear()
    client_enc.session_key.cache_clear()
    keys_dir = init_keys(tmp_path / "locked", 3, PASS_VAR)
    server_x, _ = load_server_keys(keys_dir, PASS_VAR)
    inner = ParticipatingClients(build_strategy("fedavg"), {c: n for n, c in NODES.items()}, 1.0, seed=0)
    server = EncryptedExchange(inner, server_x, load_registry(keys_dir), RUN_ID, NODES)
    config = {**base_config(keys_dir), KEYS_PASSPHRASE_ENV: PASS_VAR}
    for rnd in (1, 2):
        messages = list(server.configure_train(rnd, as_record(global_arrays()), ConfigRecord(dict(config)), FakeGrid(NODES)))
        replies = run_clients(messages, [encryption_mod])
        assert not any(r.has_error() for r in replies)
        assert server.aggregate_train(rnd, replies)[0] is not None
    assert client_enc.client_keys.cache_info().currsize == 3
    assert client_enc.client_keys.cache_info().misses == 3

    monkeypatch.delenv(PASS_VAR)
    client_enc.client_keys.cache_clear()
    client_enc.session_key.cache_clear()
    messages = list(server.configure_train(3, as_record(global_arrays()), ConfigRecord(dict(config)), FakeGrid(NODES)))
    (reply,) = run_clients([to_node(messages, 101)], [encryption_mod])
    assert reply.has_error() and "missing passphrase" in reply.error.reason


def test_tamper_app_wires_production_handlers():
    pytest.importorskip("flwr.clientapp")
    from clients.app import describe, evaluate_local, train
    from tests.tamper_app import build_app

    app = build_app("replay", 1)
    assert {"query.default", "train.default", "evaluate.default"} <= set(app._registered_funcs)
    assert callable(describe) and callable(train) and callable(evaluate_local)


def test_wraps_client_level_dp_outermost(keys):
    """EncryptedExchange must be the outermost wrapper: ClientLevelDP clips plaintext updates."""
    from server.client_dp import ClientLevelDP

    server_x, _ = load_server_keys(keys)
    participating = ParticipatingClients(build_strategy("fedavg"), {c: n for n, c in NODES.items()}, 1.0, seed=0, mode="poisson")
    dp = ClientLevelDP(participating, noise_multiplier=0.0, clip=1e6, sample_rate=1.0, num_clients=3, seed=0)
    server = EncryptedExchange(dp, server_x, load_registry(keys), RUN_ID, NODES)
    arrays = {k: v for k, v in global_arrays().items() if v.ndim}  # ClientLevelDP cannot rebuild 0-d arrays
    _, _, aggregated = train_round(server, 1, arrays, keys, [make_tamper_mod("poison-nan", 2), encryption_mod])
    assert [r["kind"] for r in server.rejections[1]] == ["non-finite"]
    assert len(dp.update_norms[1]) == 2
    # Fixed denominator q*N = 3: the mean update is (1 + 2) / 3 = 1 on every float weight.
    np.testing.assert_allclose(as_numpy(aggregated)["fc.bias"], arrays["fc.bias"] + 1.0, rtol=1e-5)

    # Everyone rejected: the mechanism still releases (here noise-free, so unchanged).
    _, _, aggregated = train_round(server, 2, arrays, keys, [make_tamper_mod("tamper", 0), make_tamper_mod("tamper", 1), make_tamper_mod("tamper", 2), encryption_mod])
    assert len(server.rejections[2]) == 3 and server.last_accepted == []
    np.testing.assert_allclose(as_numpy(aggregated)["fc.bias"], arrays["fc.bias"], rtol=1e-6)
