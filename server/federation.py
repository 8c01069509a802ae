"""The federated round loop that a fedaudit ServerApp runs.

Per round: sample participants, train, commit the privacy spend, aggregate, run
per-client evaluation (every client, or a seeded sample of them with
``--eval-fraction``), evaluate centrally on the server's test split, checkpoint.
The spend is committed before the new global model exists anywhere else.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from flwr.serverapp.strategy import Strategy

from server.client_dp import ClientLevelDP
from server.encryption import EncryptedExchange
from server.outliers import score_updates
from shared import __version__
from shared.auditlog import AuditLog
from shared.crypto import load_registry, load_server_keys
from server.strategies import ParticipatingClients, build_strategy
from shared import planner, privacy
from shared.config import RunConfig
from shared.data import prepare
from shared.errors import BadInput
from shared.evaluation import evaluate, predict_proba
from shared.models import initial_model
from shared.protocol import ARRAYS_KEY, CONFIG_KEY, KEYS_DIR, KEYS_PASSPHRASE_ENV, METRICS_KEY, NUM_EXAMPLES, PARTITION_ID, spec_to_record
from shared.results import finite_or_none
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
    client_epsilon: float | None = None


@dataclass
class ServerJob:
    """Everything the ServerApp needs for one run."""

    run_id: str
    config: RunConfig
    delta: float
    runs_dir: str
    model_name: str
    resume_from: int = 0
    resuming: bool = False  # a resume, even of a run interrupted before its first checkpoint
    stop_after_round: int | None = None  # tests: end early as if interrupted
    timeout: float = 3600.0
    exhausted: set = field(default_factory=set)
    cancel: threading.Event = field(default_factory=threading.Event)  # set: stop before the next round
    cancel_reason: str = "Ctrl-C"  # what set ``cancel``, for the run's error
    notes: list = field(default_factory=list)
    keys_dir: str = ""
    malicious_clients: list = field(default_factory=list)
    keys_passphrase_env: str | None = None
    on_round: Callable[[RoundReport], None] | None = None
    on_clients: Callable[[list[dict]], None] | None = None
    result: dict = field(default_factory=dict)


def _config_record(job: ServerJob, meta=None) -> ConfigRecord:
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
        "reproducible-noise": c.reproducible_noise,
        "delta": job.delta,
        "max-epsilon": c.max_epsilon or 0.0,
        "client-clip": c.client_clip,
        "attack": c.attack if c.malicious else "",
        "malicious": ",".join(map(str, job.malicious_clients)),
        KEYS_DIR: job.keys_dir if c.encrypt else "",
        KEYS_PASSPHRASE_ENV: job.keys_passphrase_env or "",
        "proximal-mu": c.proximal_mu if c.strategy == "fedprox" else 0.0,
        **spec_to_record(c.data_spec),
    }
    if meta is not None:
        # The model's shape, so a node reading its own local data (deployment
        # `--data-dir`) need not rebuild the server's dataset to build the model.
        values.update({"model.num-features": meta.num_features, "model.num-classes": meta.num_classes, "model.image-side": meta.image_side or 0})
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


def check_sizes(job: ServerJob, sizes: list[int]) -> None:
    """Re-check, against what the nodes really hold, what preflight checked on the spec.

    On a real node started with ``--data-dir`` the records are the node's own, so delta
    (which must stay below 1/n of the smallest client) is checked again here.
    """
    c = job.config
    if not sizes:
        return
    smallest = min(sizes)
    if smallest < c.batch_size:
        raise FederationError(f"client {sizes.index(smallest)} holds {smallest} training records, fewer than --batch-size {c.batch_size}")
    if c.dp and job.delta >= 1.0 / smallest:
        raise FederationError(f"delta {job.delta:g} is not below 1/(smallest client's records) = 1/{smallest}; give a smaller --delta")


def describe_clients(grid: Grid, job: ServerJob, base: ConfigRecord) -> dict[int, int]:
    """Ask every node for its partition id and data summary; return partition -> node.

    Canary clients (partition ids from ``clients`` on) are in the map but not in the
    stored client summaries: they hold no data.
    """
    nodes = _wait_for_nodes(grid, job.config.nodes)
    messages = [Message(RecordDict({CONFIG_KEY: base}), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=job.timeout))
    failed = [r for r in replies if r.has_error()]
    if failed:
        raise FederationError(f"{len(failed)} client(s) failed to describe themselves: {failed[0].error.reason}")
    node_of, summaries, own_data = {}, [], []
    for reply in replies:
        m = _metrics(reply)
        pid = int(m[PARTITION_ID])
        # On real SuperNodes partition ids are set by hand (`fedaudit supernode --partition-id`).
        if not 0 <= pid < job.config.nodes:
            raise FederationError(f"a client node says it is client {pid}, outside 0..{job.config.nodes - 1} (--clients {job.config.clients})")
        if pid in node_of:
            raise FederationError(f"two client nodes both say they are client {pid}; give every SuperNode its own --partition-id")
        node_of[pid] = reply.metadata.src_node_id
        if pid >= job.config.clients:
            continue
        summaries.append({"client": pid, "num_train": int(m[NUM_EXAMPLES]), "num_val": int(m["num-val"]), "label_histogram": list(m["label-histogram"])})
        if m.get("own-data", 0):
            own_data.append(pid)
    summaries.sort(key=lambda s: s["client"])
    check_sizes(job, [s["num_train"] for s in summaries])
    store = RunStore(job.runs_dir)
    store.record_clients(job.run_id, summaries)
    store.update_run(job.run_id, info={"own_data_clients": sorted(own_data)})
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


def _load_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


def restore_ledgers(grid: Grid, job: ServerJob, node_of: dict[int, int], ledgers: dict[int, list]) -> None:
    """Give each fresh node back the spend it made before the run was interrupted."""
    messages = []
    for pid, ledger in ledgers.items():
        record = ConfigRecord({"sigma": [float(s) for s, _, _ in ledger], "q": [float(q) for _, q, _ in ledger], "steps": [int(n) for *_, n in ledger]})
        messages.append(Message(RecordDict({CONFIG_KEY: record}), message_type=f"{MessageType.QUERY}.restore_ledger", dst_node_id=node_of[pid]))
    replies = list(grid.send_and_receive(messages, timeout=job.timeout)) if messages else []
    failed = [r for r in replies if r.has_error()]
    if failed or len(replies) != len(messages):
        raise FederationError("could not restore the privacy ledger on every client; refusing to resume")


# Flower's in-memory grid (the Simulation Engine's) sleeps 0.1 s between polls for
# replies, so every send-and-receive ended up to 0.1 s after the last reply: most of a
# round on small models. Polling the in-process state this often costs well under 1%
# of a core.
SIMULATION_PULL_INTERVAL = 0.005

_logger = logging.getLogger(__name__)


def run_federation(grid: Grid, job: ServerJob) -> dict:
    """Run ``job`` on ``grid`` and keep its signed audit log (``audit.jsonl``).

    The log records the start, every round and the end, including a failure.
    """
    if isinstance(getattr(grid, "pull_interval", None), float):
        grid.pull_interval = min(grid.pull_interval, SIMULATION_PULL_INTERVAL)
    exchange_key, signing_key = load_server_keys(job.keys_dir, job.keys_passphrase_env)
    path = RunStore(job.runs_dir).run_dir(job.run_id) / "audit.jsonl"
    if job.resume_from or path.exists():
        log = AuditLog.open_existing(path, signing_key, job.run_id)
        log.append("run-resume", {"run_id": job.run_id, "after_round": job.resume_from})
    else:
        log = AuditLog(path, signing_key, job.run_id)
        # Read from package metadata: importing opacus here would spend ~1.5 s of CPU
        # while the client actors are starting on the same cores.
        from importlib.metadata import version

        log.append(
            "run-start",
            {
                "run_id": job.run_id,
                "config_sha256": job.config.digest(),
                "fedaudit": __version__,
                "flwr": version("flwr"),
                "opacus": version("opacus"),
                "encrypted": job.config.encrypt,
                "delta": job.delta,
            },
        )
    try:
        result = _run_rounds(grid, job, log, exchange_key)
    except BaseException as exc:
        log.append("run-end", {"status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        raise
    log.append("run-end", {"status": result["status"], "accuracy": finite_or_none(result["accuracy"]), "rounds": result["rounds"]})
    return result


def _plain_number(value: float | None) -> float | str | None:
    """``value`` for the audit log, which is plain JSON: an unbounded epsilon as "inf"."""
    return "inf" if value is not None and math.isinf(value) else value


def raise_to_kept_ledger(row: dict, kept: list[tuple[float, float, int]], client_ledger_steps: int | None, delta: float) -> bool:
    """Make ``row``'s epsilon at least what the server's own record of the client's spend gives.

    A client reports epsilon from the ledger in its ``Context.state``. Should that state
    be lost (a node restarted), it would count from zero again; the rows in ``runs.db``
    would not. ``kept`` is the client's spend in earlier rounds as stored; this round's,
    from ``row``, is added. A client whose ledger holds at least as many steps
    (``client_ledger_steps``, from its reply) is not re-accounted: that keeps the
    accountant's import and work off the server's round for every honest reply.
    Returns whether ``row`` was raised.
    """
    history = list(kept)
    if not row["refused"]:
        history.append((row["noise_multiplier"], row["sample_rate"], row["steps"]))
    if client_ledger_steps is not None and int(client_ledger_steps) >= sum(steps for *_, steps in history):
        return False
    try:
        floor_rdp = privacy.epsilon(history, delta, "rdp")
    except BadInput:  # a reply with an impossible rate or noise: nothing to compare with
        return False
    if row["epsilon_rdp"] >= floor_rdp * (1 - 1e-9):
        return False
    row["epsilon_rdp"] = floor_rdp
    row["epsilon"] = max(row["epsilon"], privacy.epsilon(history, delta))
    return True


def _add_note(store: RunStore, run_id: str, note: str) -> None:
    notes = store.get_run(run_id).info.get("notes", [])
    if note not in notes:
        store.update_run(run_id, info={"notes": [*notes, note]})


def _claims_its_own_id(reply: Message, node_client: dict[int, int]) -> bool:
    claimed = int(_metrics(reply)[PARTITION_ID])
    if node_client.get(reply.metadata.src_node_id) == claimed:
        return True
    _logger.warning("dropped a reply from node %s claiming to be client %s", reply.metadata.src_node_id, claimed)
    return False


def _count_unanswered(store: RunStore, job: ServerJob, rnd: int, sent: list[Message], replies: list[Message],
                      node_client: dict[int, int], latest: dict[int, tuple[float, float]]) -> None:
    """Count the spend of clients asked to train whose reply never came (timed out).

    Such a client may have trained and sent its update anyway (the SuperLink keeps a late
    reply), and its own ledger has the spend, but no reply means no ledger row here. So
    the round's mechanism (the client's last recorded one, else the planned one) is kept
    with the interrupted spend: epsilon can be over-reported by it, never under-reported.
    """
    answered = {r.metadata.src_node_id for r in replies}
    missing = sorted(node_client[m.metadata.dst_node_id] for m in sent if m.metadata.dst_node_id not in answered)
    missing = [pid for pid in missing if pid < job.config.clients]
    if not missing:
        return
    c = job.config
    ledgers = store.ledger(job.run_id)
    sizes = {row["client"]: row["num_train"] for row in store.get_clients(job.run_id)}
    rows = []
    for pid in missing:
        if ledgers.get(pid):
            sigma, q, steps = ledgers[pid][-1]
        else:
            sigma, q, steps = planner.planned_spend(sizes[pid], c.batch_size, c.local_epochs, c.noise_multiplier)
        rows.append({"round": rnd, "client": pid, "noise_multiplier": sigma, "sample_rate": q, "steps": steps})
    store.add_interrupted_spend(job.run_id, rows)
    full = store.ledger_with_interrupted(job.run_id)
    for pid in missing:
        latest[pid] = (privacy.epsilon(full[pid], job.delta), privacy.epsilon(full[pid], job.delta, "rdp"))


def _run_rounds(grid: Grid, job: ServerJob, log: AuditLog, exchange_key) -> dict:
    c = job.config
    store = RunStore(job.runs_dir)
    run_dir = store.run_dir(job.run_id)
    prepared = prepare(c.data_spec)
    meta = prepared.meta
    model = initial_model(job.model_name, meta.num_features, meta.num_classes, meta.image_side, c.seed)
    atomic_write_bytes(
        run_dir / "model.json",
        json.dumps({"model": job.model_name, "num_features": meta.num_features, "num_classes": meta.num_classes, "image_side": meta.image_side}).encode(),
    )

    base = _config_record(job, meta)
    node_of = describe_clients(grid, job, base)
    node_client = {node: pid for pid, node in node_of.items()}
    strategy: Strategy = ParticipatingClients(
        build_strategy(
            c.strategy, proximal_mu=c.proximal_mu, server_lr=c.server_lr, client_lr=c.lr,
            aggregator=c.aggregator, num_malicious=c.malicious, clients_per_round=max(1, round(c.clients * c.fraction)),
        ),
        node_of,
        c.participation_rate if c.client_dp else c.fraction,
        c.seed,
        mode="poisson" if c.client_dp else "fixed",
        evaluated=range(c.clients),
        eval_fraction=c.eval_fraction,
        # Client-level DP's amplification by sampling needs a sample nobody can rederive.
        secret_sampling=c.client_dp and not c.reproducible_noise,
    )
    client_dp: ClientLevelDP | None = None
    if c.client_dp:
        client_dp = strategy = ClientLevelDP(
            strategy, c.client_noise_multiplier, c.client_clip, c.participation_rate, c.nodes, c.seed if c.reproducible_noise else None
        )
    exchange: EncryptedExchange | None = None
    if c.encrypt:
        # Outermost: the wrappers inside it (client-level clipping and noise) need plaintext.
        exchange = strategy = EncryptedExchange(
            strategy, exchange_key, load_registry(job.keys_dir), job.run_id, {node: pid for pid, node in node_of.items()}
        )

    weights = state_to_numpy(model)
    latest: dict[int, tuple[float, float]] = {}  # client -> (epsilon prv, epsilon rdp)
    start = job.resume_from + 1
    if job.resume_from:
        saved = _load_weights(run_dir / "checkpoints" / f"round-{job.resume_from:04d}.safetensors")
        weights = {k: saved[k] for k in weights}  # the model's own key order, not the file's
    # A crash before the first checkpoint still spent budget in round 1.
    earlier_releases = store.interrupted_releases(job.run_id) if job.resuming else 0
    if job.resuming:
        ledgers = store.ledger_with_interrupted(job.run_id)
        restore_ledgers(grid, job, node_of, ledgers)
        latest = {pid: (privacy.epsilon(l, job.delta), privacy.epsilon(l, job.delta, "rdp")) for pid, l in ledgers.items()}
    arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})

    status = "completed"
    completed = job.resume_from
    accuracy = loss = float("nan")
    load_numpy(model, weights)
    for rnd in range(start, c.rounds + 1):
        if job.cancel.is_set():
            raise FederationError(f"interrupted before round {rnd}")
        started = time.time()
        epsilons: dict[str, float | None] = {}
        if client_dp is not None:
            client_ledger = [(c.client_noise_multiplier, c.participation_rate, rnd + earlier_releases)]
            epsilons["client_epsilon"] = privacy.epsilon(client_ledger, job.delta)
            epsilons["client_epsilon_rdp"] = privacy.epsilon(client_ledger, job.delta, "rdp")
            if c.max_epsilon is not None and epsilons["client_epsilon"] > c.max_epsilon:
                status = "budget-exhausted"  # checked before any client is asked to train
                break

        train_messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(base)), grid))
        replies = list(grid.send_and_receive(train_messages, timeout=job.timeout))
        # A reply is filed under the client its node said it was at describe time; a
        # reply claiming another partition id would move spend and flags between clients.
        good = sorted((r for r in replies if not r.has_error() and _claims_its_own_id(r, node_client)), key=lambda r: _metrics(r)[PARTITION_ID])
        trained = [r for r in good if not _metrics(r).get("refused", 0)]
        if replies and not good:
            reasons = "; ".join(sorted({r.error.reason.splitlines()[0] for r in replies if r.has_error()}))
            raise FederationError(f"round {rnd}: no client returned an update ({reasons})")

        spend = []
        kept_ledgers = store.ledger_with_interrupted(job.run_id) if c.dp else {}
        for reply in good:
            m = _metrics(reply)
            if int(m[PARTITION_ID]) >= c.clients:
                continue  # a canary client: no records, no sample-level spend
            row = {"client": int(m[PARTITION_ID]), "num_examples": int(m[NUM_EXAMPLES]), "train_loss": float(m["train-loss"]), "refused": int(m.get("refused", 0))}
            if c.dp:
                row.update(epsilon=float(m["epsilon"]), epsilon_rdp=float(m["epsilon-rdp"]))
                if not row["refused"]:
                    row.update(noise_multiplier=float(m["round-noise-multiplier"]), sample_rate=float(m["round-sample-rate"]), steps=int(m["round-steps"]))
                if raise_to_kept_ledger(row, kept_ledgers.get(row["client"], []), m.get("ledger-steps"), job.delta):
                    _add_note(store, job.run_id, f"round {rnd}: client {row['client']} reported epsilon below the spend the"
                              " server has on record for it (its own ledger was lost?); the server's figure is used")
                latest[row["client"]] = (row["epsilon"], row["epsilon_rdp"])
            spend.append(row)
        if c.dp:
            # A dropped reply counts as unanswered: its client spent, but no row says so.
            _count_unanswered(store, job, rnd, train_messages, [r for r in replies if r.has_error()] + good, node_client, latest)
            epsilons["epsilon"] = max((e for e, _ in latest.values()), default=0.0)
            epsilons["epsilon_rdp"] = max((e for _, e in latest.values()), default=0.0)
        store.commit_spend(job.run_id, rnd, spend, epsilons)

        rejected = []
        if exchange is not None:
            trained = exchange.verify_train(rnd, trained)
            rejected = [{k: v for k, v in r.items() if k != "node"} for r in exchange.rejections.get(rnd, [])]
        # Canary clients' replies are not client replies: they never satisfy --min-replies.
        real = [r for r in trained if int(_metrics(r)[PARTITION_ID]) < c.clients]
        asked = sum(1 for m in train_messages if node_client.get(m.metadata.dst_node_id, 0) < c.clients)
        answered = asked - sum(1 for r in spend if r["refused"])
        needed = min(c.min_replies, answered)
        if len(real) < needed:
            reasons = "; ".join(f"client {r['client']}: {r['reason']}" for r in rejected) or "replies missing"
            raise FederationError(f"round {rnd}: {len(real)} valid replies, fewer than --min-replies {c.min_replies} ({reasons})")

        updates = {int(_metrics(r)[PARTITION_ID]): {k: a.numpy() for k, a in r.content[ARRAYS_KEY].items()} for r in trained}
        scores = score_updates(weights, {pid: u for pid, u in updates.items() if pid < c.clients})
        store.record_flags(job.run_id, rnd, scores)

        # Refusing is permanent: a client's epsilon only grows and its per-round spend
        # is fixed, so once every client has refused, no client can train again.
        job.exhausted |= {r["client"] for r in spend if r["refused"]}
        if trained or client_dp is not None:
            new_arrays, _ = strategy.aggregate_train(rnd, trained)
            if new_arrays is None:
                raise FederationError(f"round {rnd}: the strategy could not aggregate the client updates")
            arrays = new_arrays
        elif not replies:
            raise FederationError(f"round {rnd}: no client was reachable")
        if len(job.exhausted) >= c.clients:
            status = "budget-exhausted"
            if not trained:
                break
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
        _save_weights(run_dir / "checkpoints" / f"round-{rnd:04d}.safetensors", weights)
        model_sha256 = digest(weights)
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
                "model_sha256": model_sha256,
            },
            client_eval,
        )
        completed = rnd
        log.append(
            "round",
            {
                "round": rnd,
                "participants": sorted(int(_metrics(r)[PARTITION_ID]) for r in trained),
                "refused": sorted(r["client"] for r in spend if r["refused"]),
                "rejected": rejected,
                "flagged": [x["client"] for x in scores if x["flagged"]],
                "epsilon_spent": {str(r["client"]): _plain_number(r["epsilon"]) for r in spend if r.get("epsilon") is not None},
                "epsilon": _plain_number(epsilons.get("epsilon")),
                "client_epsilon": _plain_number(epsilons.get("client_epsilon")),
                "model_sha256": model_sha256,
            },
        )
        if job.on_round:
            job.on_round(RoundReport(rnd, c.rounds, accuracy, loss, epsilons.get("epsilon"), len(real), seconds, epsilons.get("client_epsilon")))
        if status == "budget-exhausted" or (job.stop_after_round is not None and rnd >= job.stop_after_round):
            break

    load_numpy(model, weights)
    _save_weights(run_dir / "model.safetensors", weights)
    store.update_run(job.run_id, info={"f1_macro": _macro_f1(model, prepared.x_test, prepared.y_test)})
    job.result = {"status": status, "accuracy": accuracy, "loss": loss, "rounds": completed}
    return job.result
