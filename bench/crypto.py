"""Cost of the encrypted model exchange.

    python -m bench.crypto [--quick]

(a) AES-256-GCM seal and open throughput on model-sized payloads (1, 8, 64 MB of
    float32 in four arrays) beside serialising the same model with pack_arrays (the
    plaintext that is sealed), unpack_arrays, Flower's ArrayRecord (what travels when
    encryption is off), torch.save to BytesIO and safetensors.
(b) The per-round cost of encryption for the built-in digits models with 10 clients:
    a whole train + evaluate exchange through Flower Message objects (server wrapper ->
    client mod -> server wrapper, handlers that do no work), with and without
    encryption, beside the plain compute of one real round (bench.run_overhead's loop).

Every measurement is repeated with the variants interleaved, and medians are reported.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from clients.encryption import KEYS_DIR, KEYS_PASSPHRASE_ENV, encryption_mod  # noqa: E402
from server.encryption import EncryptedExchange  # noqa: E402
from server.strategies import ParticipatingClients, build_strategy  # noqa: E402
from shared.crypto import (  # noqa: E402
    SERVER_TO_CLIENT,
    associated_data,
    init_keys,
    load_registry,
    load_server_keys,
    open_sealed,
    pack_arrays,
    seal,
    unpack_arrays,
)
from shared.models import build_model  # noqa: E402
from shared.weights import state_to_numpy  # noqa: E402

MB = 1024 * 1024


def _median_times(ops: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(repeats):
        for name, op in ops.items():  # interleaved: one of each per repeat
            started = time.perf_counter()
            op()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def throughput(sizes_mb: list[int], repeats: int) -> None:
    from safetensors.numpy import save as safetensors_save

    key = os.urandom(32)
    aad = associated_data("bench", 1, 0, "train", SERVER_TO_CLIENT)
    print("(a) payload throughput, median of", repeats, "interleaved repeats")
    print(f"{'payload':>8} | {'seal':>16} | {'open':>16} | {'pack_arrays':>16} | {'unpack':>16} | {'ArrayRecord':>16} | {'torch.save':>16} | {'safetensors':>16}")
    for size in sizes_mb:
        rng = np.random.default_rng(size)
        n = size * MB // 4 // 4
        arrays = {f"layer{i}.weight": rng.standard_normal(n, dtype=np.float32) for i in range(4)}
        packed = pack_arrays(arrays)
        blob = seal(key, packed, aad)
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}

        def torch_save() -> None:
            torch.save(tensors, io.BytesIO())

        ops = {
            "seal": lambda: seal(key, packed, aad),
            "open": lambda: open_sealed(key, blob, aad),
            "pack_arrays": lambda: pack_arrays(arrays),
            "unpack": lambda: unpack_arrays(packed),
            "ArrayRecord": lambda: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "torch.save": torch_save,
            "safetensors": lambda: safetensors_save(arrays),
        }
        med = _median_times(ops, repeats)
        nbytes = len(packed)
        cells = [f"{1e3 * t:7.2f} ms {nbytes / t / 1e9:5.2f}GB/s" for t in med.values()]
        print(f"{size:>5} MB | " + " | ".join(cells))


class _Grid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def _handlers():
    # What clients/app.py does around training: model out of the ArrayRecord, new one back.
    def train(msg: Message, context: Context) -> Message:
        weights = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        metrics = MetricRecord({"num-examples": 10, "partition-id": int(context.node_config["partition-id"])})
        reply = ArrayRecord({k: Array(v) for k, v in weights.items()})
        return Message(RecordDict({"metrics": metrics, "arrays": reply}), reply_to=msg)

    def evaluate(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"]  # a real handler reads the model
        _ = [a.numpy() for a in arrays.values()]
        metrics = MetricRecord({"num-examples": 10, "accuracy": 0.5, "partition-id": int(context.node_config["partition-id"])})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return train, evaluate


def _app(mods) -> ClientApp:
    app = ClientApp(mods=mods)
    train, evaluate = _handlers()
    app.train()(train)
    app.evaluate()(evaluate)
    return app


def _crypto_core(weights: dict[str, np.ndarray], clients: int, repeats: int) -> float:
    """Median time of just the envelope work of one round: 1 pack, 3N seals, 3N opens, 2N+N packs/unpacks."""
    key = os.urandom(32)
    aad = associated_data("bench", 1, 0, "train", SERVER_TO_CLIENT)

    def round_() -> None:
        packed = pack_arrays(weights)  # server: once per message type and round
        for _ in range(2 * clients):  # train + evaluate models, server -> client
            unpack_arrays(open_sealed(key, seal(key, packed, aad), aad))
        for _ in range(clients):  # train replies, client -> server
            unpack_arrays(open_sealed(key, seal(key, pack_arrays(weights), aad), aad))

    round_()
    return _median_times({"core": round_}, repeats)["core"]


def per_round(clients: int, repeats: int, reference: bool) -> None:
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    for name in ("_run_id", "_node_id", "_task_id"):  # instruction messages need a task identity
        setattr(TaskIdentity, name, 1)
    keys_dir = init_keys(tempfile.mkdtemp(prefix="fedaudit-bench-keys-") + "/keys", clients)
    server_x, _ = load_server_keys(keys_dir)
    registry = load_registry(keys_dir)
    node_of = {c: 1000 + c for c in range(clients)}
    client_of = {n: c for c, n in node_of.items()}
    contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": c}, state=RecordDict(), run_config={}) for n, c in client_of.items()}
    plain_app, sealed_app = _app([]), _app([encryption_mod])
    grid = _Grid(client_of)

    print(f"\n(b) per-round cost, {clients} clients: train + evaluate exchange through Flower messages, median of {repeats}")
    results = {}
    for model_name in ("logreg", "mlp", "cnn"):
        weights = state_to_numpy(build_model(model_name, 64, 10, 8))
        arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})
        counter = iter(range(1, 10**9))
        # One strategy per run, as in the round loop (keys are derived once per client).
        plain_strategy = ParticipatingClients(build_strategy("fedavg"), node_of, 1.0, 0)
        sealed_strategy = EncryptedExchange(ParticipatingClients(build_strategy("fedavg"), node_of, 1.0, 0), server_x, registry, "bench-run", client_of)

        def exchange(encrypted: bool) -> None:
            rnd = next(counter)
            strategy = sealed_strategy if encrypted else plain_strategy
            app = sealed_app if encrypted else plain_app
            config = {"run-id": "bench-run", KEYS_DIR: str(keys_dir) if encrypted else "", KEYS_PASSPHRASE_ENV: ""}
            messages = strategy.configure_train(rnd, arrays, ConfigRecord(dict(config)), grid)
            replies = [app(m, contexts[m.metadata.dst_node_id]) for m in messages]
            new, _ = strategy.aggregate_train(rnd, replies)
            messages = strategy.configure_evaluate(rnd, new, ConfigRecord(dict(config)), grid)
            replies = [app(m, contexts[m.metadata.dst_node_id]) for m in messages]
            strategy.aggregate_evaluate(rnd, replies)

        exchange(True), exchange(False)  # warm-up: key loading, imports
        med = _median_times({"plain": lambda: exchange(False), "sealed": lambda: exchange(True)}, repeats)
        nbytes = len(pack_arrays(weights))
        results[model_name] = med
        core = _crypto_core(weights, clients, repeats)
        print(
            f"  {model_name:6} ({nbytes / 1024:5.1f} KiB): plain {1e3 * med['plain']:6.2f} ms, encrypted {1e3 * med['sealed']:6.2f} ms"
            f" -> encryption adds {1e3 * (med['sealed'] - med['plain']):5.2f} ms per round, all parties together"
            f" (of which AES-GCM + pack/unpack {1e3 * core:4.2f} ms; the rest is Flower Array <-> numpy conversions)"
        )

    if reference:
        try:
            from bench.run_overhead import plain_round
            from shared.config import resolve

            torch.set_num_threads(1)
            cfg = resolve(None, dataset="digits", clients=clients)
            model_name = cfg.model or "logreg"
            weights = state_to_numpy(build_model(model_name, 64, 10, 8))
            plain_round(cfg, model_name, weights, 1)  # warm-up
            times = [plain_round(cfg, model_name, weights, r)[0] for r in range(2, 5)]
            compute = statistics.median(times)
            added = results[model_name]["sealed"] - results[model_name]["plain"]
            print(
                f"  reference: one real round of plain compute ({model_name}, dp={cfg.dp}, {clients} clients, sequential) "
                f"{1e3 * compute:.1f} ms -> encryption is {100 * added / compute:.2f} % of it"
            )
        except Exception as e:  # the reference is optional
            print(f"  reference round time unavailable: {type(e).__name__}: {e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no 64 MB payload")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--no-reference", action="store_true", help="skip timing a real round of training")
    args = parser.parse_args()
    torch.set_num_threads(1)
    throughput([1, 8] if args.quick else [1, 8, 64], 3 if args.quick else 7)
    per_round(args.clients, 5 if args.quick else 15, not args.no_reference)


if __name__ == "__main__":
    main()
