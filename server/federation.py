"""The federated round loop that a fedaudit ServerApp runs.

Per round: sample participants, train, commit the privacy spend, aggregate, run
per-client evaluation, evaluate centrally on the server's test split, checkpoint.
The spend is committed before the new global model exists anywhere else.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from server.strategies import ParticipatingClients, build_strategy
from shared import privacy
from shared.config import RunConfig
from shared.data import prepare
from shared.evaluation import evaluate, predict_proba
from shared.models import build_model
from shared.protocol import CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES, PARTITION_ID, spec_to_record
from shared.store import RunStore, atomic_write_bytes
from shared.weights import digest, load_numpy, state_to_numpy

NODE_WAIT_SECONDS = 300


class FederationError(RuntimeError):
    """The federation could not continue (no replies, nodes missing, ...)."""


@dataclass
class RoundReport:
    round: int
    rounds: int
    accuracy: float
    loss: float
    epsilon: float | None
    participants: int
    seconds: float


@dataclass
class ServerJob:
    """Everything the ServerApp needs for one run."""

    run_id: str
    config: RunConfig
    delta: float
    runs_dir: str
    model_name: str
    timeout: float = 3600.0
    on_round: Callable[[RoundReport], None] | None = None
    on_clients: Callable[[list[dict]], None] | None = None
    result: dict = field(default_factory=dict)


def _config_record(job: ServerJob) -> ConfigRecord:
    c = job.config
    values = {
        "run-id": job.run_id,
        "model": job.model_name,
        "local-epochs": c.local_epochs,
        "batch-size": c.batch_size,
        "lr": c.lr,
        "optimizer": c.optimizer,
        "dp": c.dp,
        "noise-multiplier": c.noise_multiplier,
        "max-grad-norm": c.max_grad_norm,
        "delta": job.delta,
        "proximal-mu": c.proximal_mu if c.strategy == "fedprox" else 0.0,
        **spec_to_record(c.data_spec),
    }
    return ConfigRecord(values)


def _metrics(msg: Message) -> dict:
    return dict(msg.content[METRICS_KEY])


def _wait_for_nodes(grid: Grid, count: int) -> list[int]:
    deadline = time.time() + NODE_WAIT_SECONDS
    while len(nodes := list(grid.get_node_ids())) < count:
        if time.time() > deadline:
            raise FederationError(f"only {len(nodes)} of {count} client nodes connected within {NODE_WAIT_SECONDS}s")
        time.sleep(0.5)
    return nodes


def describe_clients(grid: Grid, job: ServerJob, base: ConfigRecord) -> dict[int, int]:
    """Ask every node for its partition id and data summary; return partition -> node."""
    nodes = _wait_for_nodes(grid, job.config.clients)
    messages = [Message(RecordDict({CONFIG_KEY: base}), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=job.timeout))
    failed = [r for r in replies if r.has_error()]
    if failed:
        raise FederationError(f"{len(failed)} client(s) failed to describe themselves: {failed[0].error.reason}")
    node_of, summaries = {}, []
    for reply in replies:
        m = _metrics(reply)
        pid = int(m[PARTITION_ID])
        node_of[pid] = reply.metadata.src_node_id
        summaries.append({"client": pid, "num_train": int(m[NUM_EXAMPLES]), "num_val": int(m["num-val"]), "label_histogram": list(m["label-histogram"])})
    summaries.sort(key=lambda s: s["client"])
    RunStore(job.runs_dir).record_clients(job.run_id, summaries)
    if job.on_clients:
        job.on_clients(summaries)
    return node_of


def _save_weights(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save

    atomic_write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))


def _weighted_mean(rows: list[dict], key: str) -> float:
    pairs = [(r[key], r[NUM_EXAMPLES]) for r in rows if r[NUM_EXAMPLES] and r[key] == r[key]]
    total = sum(n for _, n in pairs)
    return float(sum(v * n for v, n in pairs) / total) if total else float("nan")


def _macro_f1(model, x, y) -> float | None:
    from sklearn.metrics import f1_score

    if len(y) == 0:
        return None
    return float(f1_score(y, predict_proba(model, x).argmax(axis=1), average="macro"))


def run_federation(grid: Grid, job: ServerJob) -> dict:
    """Run all rounds of ``job`` on ``grid``; returns the final summary."""
    c = job.config
    store = RunStore(job.runs_dir)
    run_dir = store.run_dir(job.run_id)
    spec = c.data_spec
    prepared = prepare(spec)
    meta = prepared.meta
    with torch.random.fork_rng():
        # The initial global model is part of the run's seed: same seed, same start.
        torch.manual_seed(c.seed)
        model = build_model(job.model_name, meta.num_features, meta.num_classes, meta.image_side)
    atomic_write_bytes(
        run_dir / "model.json",
        json.dumps({"model": job.model_name, "num_features": meta.num_features, "num_classes": meta.num_classes, "image_side": meta.image_side}).encode(),
    )

    base = _config_record(job)
    node_of = describe_clients(grid, job, base)
    strategy = ParticipatingClients(
        build_strategy(c.strategy, proximal_mu=c.proximal_mu, server_lr=c.server_lr, client_lr=c.lr),
        node_of,
        c.fraction,
        c.seed,
    )

    arrays = ArrayRecord({k: Array(v) for k, v in state_to_numpy(model).items()})
    latest_epsilon: dict[int, float] = {}
    accuracy = loss = float("nan")
    for rnd in range(1, c.rounds + 1):
        started = time.time()
        train_messages = strategy.configure_train(rnd, arrays, ConfigRecord(dict(base)), grid)
        replies = list(grid.send_and_receive(train_messages, timeout=job.timeout))
        good = sorted((r for r in replies if not r.has_error()), key=lambda r: _metrics(r)[PARTITION_ID])
        if not good:
            reasons = "; ".join(sorted({r.error.reason.splitlines()[0] for r in replies if r.has_error()})) or "no replies"
            raise FederationError(f"round {rnd}: no client returned an update ({reasons})")

        spend = []
        for reply in good:
            m = _metrics(reply)
            row = {"client": int(m[PARTITION_ID]), "num_examples": int(m[NUM_EXAMPLES]), "train_loss": float(m["train-loss"])}
            if c.dp:
                row.update(
                    epsilon=float(m["epsilon"]),
                    noise_multiplier=float(m["round-noise-multiplier"]),
                    sample_rate=float(m["round-sample-rate"]),
                    steps=int(m["round-steps"]),
                )
                latest_epsilon[row["client"]] = row["epsilon"]
            spend.append(row)
        run_epsilon = max(latest_epsilon.values()) if c.dp else None
        store.commit_spend(job.run_id, rnd, spend, run_epsilon)

        new_arrays, _ = strategy.aggregate_train(rnd, good)
        if new_arrays is None:
            raise FederationError(f"round {rnd}: the strategy could not aggregate the client updates")
        arrays = new_arrays
        weights = {k: v.numpy() for k, v in arrays.items()}

        eval_replies = list(grid.send_and_receive(strategy.configure_evaluate(rnd, arrays, ConfigRecord(dict(base)), grid), timeout=job.timeout))
        client_eval = []
        for reply in eval_replies:
            if reply.has_error():
                continue
            m = _metrics(reply)
            client_eval.append({"client": int(m[PARTITION_ID]), NUM_EXAMPLES: int(m[NUM_EXAMPLES]), "accuracy": float(m["accuracy"]), "loss": float(m["loss"])})

        load_numpy(model, weights)
        loss, accuracy = evaluate(model, prepared.x_test, prepared.y_test)
        checkpoint = run_dir / "checkpoints" / f"round-{rnd:04d}.safetensors"
        _save_weights(checkpoint, weights)
        seconds = time.time() - started
        store.record_round(
            job.run_id,
            rnd,
            {
                "accuracy": accuracy,
                "loss": loss,
                "federated_accuracy": _weighted_mean(client_eval, "accuracy"),
                "federated_loss": _weighted_mean(client_eval, "loss"),
                "train_loss": _weighted_mean([{NUM_EXAMPLES: r["num_examples"], "v": r["train_loss"]} for r in spend], "v"),
                "seconds": seconds,
                "model_sha256": digest(weights),
            },
            client_eval,
        )
        if job.on_round:
            job.on_round(RoundReport(rnd, c.rounds, accuracy, loss, run_epsilon, len(good), seconds))

    _save_weights(run_dir / "model.safetensors", {k: v.numpy() for k, v in arrays.items()})
    store.update_run(job.run_id, info={"f1_macro": _macro_f1(model, prepared.x_test, prepared.y_test)})
    job.result = {"accuracy": accuracy, "loss": loss, "epsilon": max(latest_epsilon.values()) if c.dp else None}
    return job.result
