"""fedaudit's Flower ClientApp (Message API).

Each node keeps its privacy ledger, the list of (noise multiplier, sample rate, steps)
it has spent, in ``context.state``. Epsilon is computed from the whole ledger, so it
accumulates across every round in which this client trained.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections import Counter

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from clients.attacks import corrupt_update, flip_labels  # noqa: E402
from clients.encryption import encryption_mod, message_category  # noqa: E402
from shared import privacy  # noqa: E402
from shared.canaries import CanarySecret, canary_direction, load_secret  # noqa: E402
from shared.evaluation import evaluate  # noqa: E402
from shared.data import ClientData, DataMeta, client_data, label_histogram, local_client_data, prepare  # noqa: E402
from shared.models import build_model  # noqa: E402
from shared.planner import planned_spend  # noqa: E402
from shared.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NODE_DATA_DIR, NUM_EXAMPLES, PARTITION_ID, spec_from_record  # noqa: E402
from shared.training import GRAD_SAMPLE_MODE, DPSettings, derived_seed, train_local  # noqa: E402
from shared.weights import load_numpy, state_to_numpy  # noqa: E402

LEDGER_KEY = "privacy-ledger"
TRAINED_KEY = "fedaudit.trained"  # the last round this node trained in
CANARY_KEY = "canary"


def partition_id(context: Context) -> int:
    return int(context.node_config["partition-id"])


def node_data(spec, context: Context, config):
    """This client's records: its own files on a real node started with ``--data-dir``,
    otherwise its partition of the dataset described by ``spec``."""
    data_dir = context.node_config.get(NODE_DATA_DIR, "")
    if data_dir:
        return local_client_data(data_dir, spec.label, spec.val_fraction, spec.seed + partition_id(context), data_meta(spec, config).num_classes)
    return client_data(spec, partition_id(context))


def data_meta(spec, config) -> DataMeta:
    """The model's shape: sent by the server when it can, else rebuilt from ``spec``."""
    if "model.num-features" in config:
        side = int(config["model.image-side"])
        return DataMeta(int(config["model.num-features"]), int(config["model.num-classes"]), side or None, str(config["model"]))
    return prepare(spec).meta


def read_ledger(context: Context) -> list[tuple[float, float, int]]:
    if LEDGER_KEY not in context.state:
        return []
    record = context.state[LEDGER_KEY]
    return list(zip(record["sigma"], record["q"], record["steps"]))


def write_ledger(context: Context, ledger: list[tuple[float, float, int]]) -> None:
    context.state[LEDGER_KEY] = ConfigRecord(
        {
            "sigma": [float(s) for s, _, _ in ledger],
            "q": [float(q) for _, q, _ in ledger],
            "steps": [int(n) for _, _, n in ledger],
        }
    )


def _model_for(config, meta):
    name = config["model"] or meta.default_model
    return name, build_model(name, meta.num_features, meta.num_classes, meta.image_side)


def _reply(msg: Message, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({METRICS_KEY: MetricRecord(metrics)})
    if arrays is not None:
        content[ARRAYS_KEY] = arrays
    return Message(content=content, reply_to=msg)


def is_canary_client(spec, pid: int) -> bool:
    """Nodes past the real clients are canary clients (``--canary-clients``)."""
    return pid >= spec.num_clients


def training_data(spec, pid: int, canaries: CanarySecret | None, data: ClientData | None = None) -> tuple[ClientData, int]:
    """The client's records (``data``, default its partition of ``spec``) plus the canaries
    it holds (training only, never validation)."""
    data = client_data(spec, pid) if data is None else data
    held = canaries.held_by(pid) if canaries is not None and spec.canaries else []
    if not held:
        return data, 0
    pool = prepare(spec)
    x = np.concatenate([data.x_train, pool.canary_x[held]])
    y = np.concatenate([data.y_train, pool.canary_y[held]])
    return ClientData(x, y, data.x_val, data.y_val), len(held)


def describe(msg: Message, context: Context, canaries: CanarySecret | None = None) -> Message:
    """Tell the server who this node is and how much data it holds."""
    config = msg.content[CONFIG_KEY]
    spec = spec_from_record(config)
    pid = partition_id(context)
    if is_canary_client(spec, pid):
        return _reply(msg, {PARTITION_ID: pid, NUM_EXAMPLES: 0, "num-val": 0, "label-histogram": [0], "ledger-steps": 0, CANARY_KEY: 1})
    data = node_data(spec, context, config)
    meta = data_meta(spec, config)
    return _reply(
        msg,
        {
            PARTITION_ID: pid,
            NUM_EXAMPLES: len(data.y_train),
            "num-val": len(data.y_val),
            "label-histogram": label_histogram(data.y_train, meta.num_classes),
            "ledger-steps": sum(n for _, _, n in read_ledger(context)),
            # The audit rebuilds members from the server's data spec, which a node's own
            # files are not part of.
            "own-data": int(bool(context.node_config.get(NODE_DATA_DIR, ""))),
        },
    )


def merged_ledger(held: list, restored: list) -> list[tuple[float, float, int]]:
    """What a node keeps when the store sends back its ledger on resume.

    A fresh node (the usual case) takes ``restored``. A node that kept its own ledger
    through the interruption keeps every entry of it as well: the multiset union holds
    both ledgers, so epsilon never drops below either.
    """
    union = Counter(map(tuple, restored)) | Counter(map(tuple, held))
    return [(float(s), float(q), int(n)) for s, q, n in union.elements()]


def restore_ledger(msg: Message, context: Context) -> Message:
    """Resume: a fresh node takes back the spend it made before the run was interrupted."""
    record = msg.content[CONFIG_KEY]
    restored = list(zip(record["sigma"], record["q"], record["steps"]))
    write_ledger(context, merged_ledger(read_ledger(context), restored))
    return _reply(msg, {PARTITION_ID: partition_id(context), "ledger-steps": sum(n for *_, n in read_ledger(context))})


def _refusal(msg: Message, pid: int, ledger, delta: float) -> Message:
    current = privacy.epsilon(ledger, delta)
    return _reply(
        msg,
        {
            NUM_EXAMPLES: 0,
            "train-loss": 0.0,
            PARTITION_ID: pid,
            "refused": 1,
            "epsilon": current,
            "epsilon-rdp": privacy.epsilon(ledger, delta, "rdp"),
            "round-noise-multiplier": 0.0,
            "round-sample-rate": 0.0,
            "round-steps": 0,
        },
    )


def canary_update(msg: Message, pid: int, spec, canaries: CanarySecret | None, clip: float) -> Message:
    """A canary client's reply: the global model moved by C along its secret direction."""
    if canaries is None:
        raise RuntimeError(f"node {pid} is a canary client but this ClientApp holds no canary secret")
    global_weights = _arrays(msg)
    direction = canary_direction(canaries.direction_seed, pid - spec.num_clients, {k: v.shape for k, v in global_weights.items()})
    sent = {k: (w + clip * direction[k]).astype(w.dtype) for k, w in global_weights.items()}
    metrics = {NUM_EXAMPLES: 1, "train-loss": 0.0, PARTITION_ID: pid, "refused": 0, CANARY_KEY: 1}
    return _reply(msg, metrics, ArrayRecord({k: Array(np.asarray(v)) for k, v in sent.items()}))


def training_seed(config, round_: int, pid: int) -> int | None:
    """The seed of one client's local training in one round, or None for fresh entropy.

    Under DP it seeds the Poisson batches and the Gaussian noise. Derived from the run
    seed, which the server and everyone holding the config know, they could replay the
    noise and subtract it; so a private round draws fresh OS entropy unless the run
    asked for reproducible noise. Non-private training has no secret to keep.
    """
    if config["dp"] and not config.get("reproducible-noise", False):
        return None
    return derived_seed(int(config["data.seed"]), round_, pid)


def check_not_replayed(context: Context, round_: int) -> None:
    """Refuse a train instruction for a round this node already trained in.

    The server asks each node once per round, so a second one is a replayed old message
    (it opens fine: it was sealed for that round). Training on it would spend budget again.
    """
    done = context.state[TRAINED_KEY]["round"] if TRAINED_KEY in context.state else 0
    if round_ <= done:
        raise RuntimeError(f"refusing to train round {round_} again: this node already trained in round {done} (a replayed instruction?)")
    context.state[TRAINED_KEY] = ConfigRecord({"round": round_})


def replay_guard_mod(msg: Message, context: Context, call_next) -> Message:
    """A node trains at most once per round (:func:`check_not_replayed`).

    It runs inside :func:`clients.encryption.encryption_mod`, so it judges an opened,
    authenticated instruction, and before the handler, so a refused one spends nothing.
    """
    if message_category(msg) == "train" and msg.has_content():
        check_not_replayed(context, int(msg.content[CONFIG_KEY]["server-round"]))
    return call_next(msg, context)


# The ClientApp's mods, outermost first: a ClientApp built from these handlers needs them all.
CLIENT_MODS = (encryption_mod, replay_guard_mod)


def train(msg: Message, context: Context, canaries: CanarySecret | None = None) -> Message:
    config = msg.content[CONFIG_KEY]
    spec = spec_from_record(config)
    pid = partition_id(context)
    if is_canary_client(spec, pid):
        return canary_update(msg, pid, spec, canaries, float(config["client-clip"]))
    data, held = training_data(spec, pid, canaries, node_data(spec, context, config))
    delta = float(config["delta"])
    cap = float(config.get("max-epsilon", 0.0))
    if config["dp"] and cap > 0:
        plan = planned_spend(len(data.y_train) - held, int(config["batch-size"]), int(config["local-epochs"]), float(config["noise-multiplier"]))
        ledger = read_ledger(context)
        if privacy.epsilon(ledger + [plan], delta) > cap:
            # A normal reply, not a failure: this client's budget cannot cover a round.
            return _refusal(msg, pid, ledger, delta)
    meta = data_meta(spec, config)
    model_name, model = _model_for(config, meta)
    global_weights = _arrays(msg)
    load_numpy(model, global_weights)

    # One thread per simulated client: tiny models on shared cores run far slower
    # with torch's default thread pool (measured in bench/dp_step.py).
    torch.set_num_threads(1)
    round_ = int(config["server-round"])
    attack = config.get("attack", "") if str(pid) in str(config.get("malicious", "")).split(",") else ""
    y_train = flip_labels(data.y_train, meta.num_classes) if attack == "label-flip" else data.y_train
    dp = None
    if config["dp"]:
        dp = DPSettings(float(config["noise-multiplier"]), float(config["max-grad-norm"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_local(
            model,
            data.x_train,
            y_train,
            epochs=int(config["local-epochs"]),
            batch_size=int(config["batch-size"]),
            learning_rate=float(config["lr"]),
            optimizer=str(config["optimizer"]),
            dp=dp,
            grad_sample_mode=GRAD_SAMPLE_MODE.get(model_name, "hooks"),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            seed=training_seed(config, round_, pid),
            # The canaries it holds must not show in anything it sends: its size, its
            # sample rate and steps (the ledger) and its loss all leave them out.
            public_records=len(data.y_train) - held,
        )

    metrics = {NUM_EXAMPLES: result.num_examples, "train-loss": result.loss, PARTITION_ID: pid, "refused": 0}
    if dp is not None:
        ledger = read_ledger(context) + [(dp.noise_multiplier, result.sample_rate, result.steps)]
        write_ledger(context, ledger)
        metrics.update(
            {
                "epsilon": privacy.epsilon(ledger, delta),
                "epsilon-rdp": privacy.epsilon(ledger, delta, "rdp"),
                "round-noise-multiplier": dp.noise_multiplier,
                "round-sample-rate": result.sample_rate,
                "round-steps": result.steps,
                "ledger-steps": sum(n for *_, n in ledger),
            }
        )
    sent = state_to_numpy(model)
    if attack:
        sent = corrupt_update(attack, global_weights, sent, seed=int(config["data.seed"]) * 7919 + round_ * 31 + pid)
    return _reply(msg, metrics, ArrayRecord({k: Array(v) for k, v in sent.items()}))


def _arrays(msg: Message) -> dict:
    return {k: v.numpy() for k, v in msg.content[ARRAYS_KEY].items()}


def evaluate_local(msg: Message, context: Context, canaries: CanarySecret | None = None) -> Message:
    config = msg.content[CONFIG_KEY]
    spec = spec_from_record(config)
    pid = partition_id(context)
    if is_canary_client(spec, pid):
        return _reply(msg, {NUM_EXAMPLES: 0, "loss": 0.0, "accuracy": 0.0, PARTITION_ID: pid, CANARY_KEY: 1})
    data = node_data(spec, context, config)
    _, model = _model_for(config, data_meta(spec, config))
    load_numpy(model, _arrays(msg))
    loss, accuracy = evaluate(model, data.x_val, data.y_val)
    return _reply(msg, {NUM_EXAMPLES: len(data.y_val), "loss": loss, "accuracy": accuracy, PARTITION_ID: pid})


@functools.lru_cache(maxsize=4)
def _cached_secret(path: str) -> CanarySecret:
    return load_secret(path)


class FedauditClientApp(ClientApp):
    """A ClientApp that pickles as the recipe for itself, not as its handlers.

    Flower's Ray backend pickles the ClientApp with every message it sends an actor:
    by value, about 3.7 KB and 0.36 ms of the driver's time each (2026-12-06), on the
    cores the clients train on. This one pickles as a call of :func:`shared_app` with
    its canaries file, which each worker process answers from its cache.
    """

    def __init__(self, canaries_file: str | None):
        super().__init__(mods=list(CLIENT_MODS))
        self.canaries_file = canaries_file

    def __reduce__(self):
        return shared_app, (self.canaries_file,)


@functools.lru_cache(maxsize=8)
def shared_app(canaries_file: str | None) -> ClientApp:
    """:func:`build_app`, built once per process for each ``canaries_file``."""
    return build_app(canaries_file)


def build_app(canaries_file: str | None = None) -> ClientApp:
    """fedaudit's ClientApp; with ``canaries_file``, it plays the run's canaries.

    The canary secret is read from the run store by the client side only: it never
    travels in a message, so the server cannot tell which canaries were included.
    """
    def canaries() -> CanarySecret | None:
        return _cached_secret(canaries_file) if canaries_file else None

    client_app = FedauditClientApp(canaries_file)

    @client_app.query()
    def _describe(msg: Message, context: Context) -> Message:
        return describe(msg, context, canaries())

    client_app.query("restore_ledger")(restore_ledger)

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, canaries())

    @client_app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate_local(msg, context, canaries())

    return client_app


app = shared_app(None)


def app_for_job(job) -> ClientApp:
    """The ClientApp for a simulation job (anything with ``run_id``, ``runs_dir`` and
    ``config``): one that plays the run's canaries when it has any.

    The caller hands it to the server's simulation driver, so the server package never
    imports this one.
    """
    if job.config.canaries or job.config.canary_clients:
        from shared.canaries import SECRET_FILE
        from shared.store import RunStore

        return shared_app(str(RunStore(job.runs_dir).run_dir(job.run_id) / SECRET_FILE))
    return app
