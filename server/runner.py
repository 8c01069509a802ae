"""Run a federated job end to end on Flower's Simulation Engine.

This is the library entry point behind ``fedaudit run``: it checks the input,
creates the run in the store, starts the simulation and records how it ended.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import tomli_w

from server.dispatch import prompt_dispatch
from server.federation import RoundReport, ServerJob
from shared import planner, privacy, processes
from shared.canaries import SECRET_FILE, draw_secret, save_secret
from shared.config import RunConfig, resolve
from shared.crypto import init_keys, load_registry, load_server_keys
from shared.data import client_sizes, prepare
from shared.errors import BadInput
from shared.models import build_model
from shared.store import ENDED_NORMALLY, RunStore, atomic_write_bytes, new_run_id, this_process
from shared.summary import summarize


@dataclass
class Preflight:
    config: RunConfig  # with any noise multiplier calibrated from a target epsilon
    delta: float
    model_name: str
    client_sizes: list[int]
    notes: list[str]


ACCOUNTANT_PROBE_BELOW = 0.5


def preflight(config: RunConfig) -> Preflight:
    """Every check that needs the data, done before anything is written."""
    cpus = os.cpu_count() or 1
    if config.ray_address is None and config.cpus_per_client > cpus:
        # Ray would start no client actor, and the simulation would crash after the run was stored.
        raise BadInput(f"--cpus-per-client {config.cpus_per_client:g} is more than this machine's {cpus} CPUs (a cluster's go with --ray-address)")
    spec = config.data_spec
    prepared = prepare(spec)
    meta = prepared.meta
    model_name = config.model or meta.default_model
    build_model(model_name, meta.num_features, meta.num_classes, meta.image_side)
    # From the partition offsets: no client's records are gathered, at any client count.
    sizes = client_sizes(spec)
    smallest = min(sizes)
    if smallest < config.batch_size:
        client = sizes.index(smallest)
        raise BadInput(f"client {client} has {smallest} training records, fewer than --batch-size {config.batch_size}")

    notes = []
    if config.delta is not None:
        delta = config.delta
    else:
        delta = privacy.default_delta(smallest if config.dp else None, config.nodes if config.client_dp else None)
        if config.dp or config.client_dp:  # a non-private run has no delta to speak of
            notes.append(f"delta = {delta:g} (default: below 1/(records of the smallest client)" + (" and 1/(number of clients)" if config.client_dp else "") + ")")
    privacy.check_delta(delta, smallest if config.dp else None, config.nodes if config.client_dp else None)

    if config.target_epsilon is not None:
        mechanisms = planner.sample_level_mechanisms(sizes, config.batch_size, config.local_epochs, config.rounds)
        sigma = planner.noise_for(mechanisms, config.target_epsilon, delta)
        config = replace(config, noise_multiplier=sigma)
        notes.append(f"noise multiplier = {sigma:.4f}, calibrated for sample-level epsilon <= {config.target_epsilon:g} at delta {delta:g}")
    if config.client_target_epsilon is not None:
        z = privacy.noise_for_target(config.client_target_epsilon, config.participation_rate, config.rounds, delta)
        config = replace(config, client_noise_multiplier=z)
        notes.append(f"client noise multiplier = {z:.4f}, calibrated for client-level epsilon <= {config.client_target_epsilon:g} at delta {delta:g}")
    # Opacus's accountants break down (division by zero, petabyte arrays) for a vanishing
    # noise multiplier. One step through the accountant turns that into bad input here,
    # not a failed round in every client. Only below ACCOUNTANT_PROBE_BELOW: the probe
    # imports opacus (~1.5 s), which a sample-level driver otherwise never needs.
    if config.dp and config.noise_multiplier < ACCOUNTANT_PROBE_BELOW:
        largest_q = 1.0 / planner.batches_per_epoch(min(sizes), config.batch_size)
        privacy.epsilon([(config.noise_multiplier, largest_q, 1)], delta)
    if config.client_dp and config.client_noise_multiplier < ACCOUNTANT_PROBE_BELOW:
        privacy.epsilon([(config.client_noise_multiplier, config.participation_rate, 1)], delta)
    return Preflight(config=config, delta=delta, model_name=model_name, client_sizes=sizes, notes=notes)


def malicious_clients(config: RunConfig) -> list[int]:
    """Which clients misbehave: a seeded choice, recorded as the run's ground truth."""
    import numpy as np

    if not config.malicious:
        return []
    rng = np.random.default_rng([config.seed, 0xBAD])
    return sorted(rng.choice(config.clients, size=config.malicious, replace=False).tolist())


def check_keys(keys_dir: str | Path, clients: int, passphrase_env: str | None) -> None:
    """The server's keys open and the registry holds every client: fail before the run."""
    keys_dir = Path(keys_dir)
    if not (keys_dir / "registry.json").exists():
        raise BadInput(f"no key registry in {keys_dir}; create keys with `fedaudit keys init {keys_dir} --clients {clients}`")
    load_server_keys(keys_dir, passphrase_env)
    registry = load_registry(keys_dir)
    missing = [i for i in range(clients) if i not in registry.clients]
    if missing:
        raise BadInput(f"key registry {keys_dir} has no key for client(s) {', '.join(map(str, missing[:5]))}; it holds {len(registry.clients)}")


def prepare_run(
    config: RunConfig,
    runs_dir: str | Path | None,
    run_id: str | None = None,
    keys_dir: str | Path | None = None,
    keys_passphrase_env: str | None = None,
) -> ServerJob:
    """Check the input, then create the run row and folder (and keys, if none given)."""
    checked = preflight(config)
    config = checked.config
    notes = list(checked.notes)
    if keys_dir is not None:
        keys_dir = Path(keys_dir).resolve()
        check_keys(keys_dir, config.nodes, keys_passphrase_env)
    store = RunStore(runs_dir)
    with store.connect():  # an unusable store is bad input before anything is written
        pass
    run_id = run_id or new_run_id()
    try:
        if keys_dir is None:
            keys_dir = store.run_dir(run_id) / "keys"
            init_keys(keys_dir, config.nodes)
            keys_passphrase_env = None
            notes.append(f"made fresh keys for this run in {keys_dir}")
        if config.canaries or config.canary_clients:
            # Kept in the run folder for the clients and the audit; never in a message.
            save_secret(store.run_dir(run_id) / SECRET_FILE, draw_secret(config.canaries, config.clients, config.canary_clients))
            notes.append(f"canaries: {config.canaries} sample-level, {config.canary_clients} canary clients; the inclusion secret is in {SECRET_FILE}")
        malicious = malicious_clients(config)
        if malicious:
            notes.append(f"clients {', '.join(map(str, malicious))} are malicious ({config.attack})")
        info = {
            "model": checked.model_name, "engine": "simulation", "notes": notes, "keys_dir": str(keys_dir),
            "keys_passphrase_env": keys_passphrase_env, "malicious_clients": malicious, "owner": this_process(),
        }
        atomic_write_bytes(store.run_dir(run_id) / "config.toml", tomli_w.dumps(config.to_toml_dict()).encode())
        store.create_run(run_id, config.to_dict(), info=info)
    except BaseException:
        shutil.rmtree(store.run_dir(run_id), ignore_errors=True)  # no folder without its run
        raise
    store.update_run(run_id, delta=checked.delta)
    return ServerJob(
        run_id=run_id, config=config, delta=checked.delta, runs_dir=str(store.root), model_name=checked.model_name, notes=notes,
        keys_dir=str(keys_dir), keys_passphrase_env=keys_passphrase_env, malicious_clients=malicious,
    )


def prepare_resume(run_id: str, runs_dir: str | Path | None, ray_address: str | None = None, owner_gone: bool = False) -> ServerJob:
    """Continue an interrupted run from its last checkpoint, ledger restored.

    Spend committed for the round that was in flight is set aside (not deleted) and
    still counted in every client's epsilon, so epsilon can only be over-reported.
    ``ray_address`` replaces the stored one: where a run executes is not part of what
    it computes, and a cluster's address may have changed since.

    A run still marked running by a process on another host (a run store shared between
    machines) is refused unless ``owner_gone``: this host cannot see that process, and
    two processes would train and write the same run.
    """
    store = RunStore(runs_dir)
    record = store.get_run(run_id)
    if record.status in ENDED_NORMALLY:
        raise BadInput(f"run {run_id} already ended with status {record.status}; nothing to resume")
    if record.running_here:  # two processes would train and write the same run
        raise BadInput(f"run {run_id} is still running (pid {record.info['owner'].get('pid')} on this host); stop it before resuming it")
    if record.running_elsewhere and not owner_gone:
        owner = record.info["owner"]
        raise BadInput(f"run {run_id} is marked running by pid {owner.get('pid')} on host {owner['host']}, which this host cannot check;"
                       " resume it there, or add --owner-gone once that process is stopped")
    if record.info.get("engine") == "deployment":
        raise BadInput(f"run {run_id} ran on the Deployment Engine; --resume continues simulation runs only (start a new deployment run)")
    if "keys_dir" not in record.info or "model" not in record.info:
        raise BadInput(f"run {run_id} was stopped before it was set up; there is nothing to resume (start it again)")
    config = RunConfig.from_stored(record.config)
    if ray_address is not None:
        config = replace(config, ray_address=ray_address)
    config = config.validate()
    last = store.last_checkpointed_round(run_id)
    while last and not (store.run_dir(run_id) / "checkpoints" / f"round-{last:04d}.safetensors").exists():
        last -= 1
    keys_env = record.info.get("keys_passphrase_env")
    check_keys(record.info["keys_dir"], config.nodes, keys_env)  # before the run is touched
    store.set_aside_interrupted(run_id, last)
    store.start_another_attempt(run_id, this_process())
    notes = [f"resuming run {run_id} after round {last}"]
    return ServerJob(
        run_id=run_id, config=config, delta=record.delta, runs_dir=str(store.root), model_name=record.info["model"], resume_from=last, resuming=True, notes=notes,
        keys_dir=record.info["keys_dir"], keys_passphrase_env=keys_env, malicious_clients=record.info.get("malicious_clients", []),
    )


@dataclass
class RunOutcome:
    run_id: str
    status: str
    error: str | None
    summary: dict


def ray_init_args(config: RunConfig, verbose: bool = False) -> dict:
    """The ``ray.init`` arguments of a run (Flower's RayBackend passes them through).

    With ``config.ray_address`` set, ``ray.init(address=...)`` connects to that running
    cluster instead of starting a local Ray: ``"auto"`` finds one started on this machine
    with ``ray start``, ``"HOST:PORT"`` names a head node's GCS, ``"ray://HOST:PORT"``
    uses Ray Client. Flower then starts ``cluster CPUs / cpus-per-client`` actors across
    every node, and ``ray.shutdown()`` at the end only disconnects from the cluster.
    """
    from shared import quiet

    args = quiet.ray_init_args(verbose)
    if config.ray_address:
        args["address"] = config.ray_address
    return args


def run_simulation_job(
    job: ServerJob,
    client_app,
    *,
    verbose: bool = False,
    on_round: Callable[[RoundReport], None] | None = None,
    on_clients: Callable[[list[dict]], None] | None = None,
) -> RunOutcome:
    """Run ``job`` on the Simulation Engine with ``client_app`` (``clients.app.app_for_job``,
    given by the caller: the server package does not import the clients package) and
    record its final status."""
    from shared import quiet

    quiet.configure(verbose)
    from flwr.simulation import run_simulation

    from server.app import make_server_app

    store = RunStore(job.runs_dir)
    job.on_round, job.on_clients = on_round, on_clients
    ray_dir = Path(os.environ.get("RAY_TMPDIR", "/tmp/fedaudit-ray"))
    ray_dir.mkdir(parents=True, exist_ok=True)
    os.environ["RAY_TMPDIR"] = str(ray_dir)
    backend_config = {
        "client_resources": {"num_cpus": job.config.cpus_per_client, "num_gpus": 0.0},
        "init_args": ray_init_args(job.config, verbose),
    }
    started = time.time()
    error = None
    previous = _stop_on_interrupt(job, store)
    try:
        _start_ray(backend_config)
        with prompt_dispatch():
            run_simulation(
                server_app=make_server_app(job),
                client_app=client_app,
                num_supernodes=job.config.nodes,
                backend_config=backend_config,
                verbose_logging=verbose,
            )
        if not job.result:
            error = "the simulation ended before the server finished its rounds"
    except Exception as exc:  # the run is recorded as failed with the reason
        error = f"{type(exc).__name__}: {exc}"
        if verbose:
            traceback.print_exc()
    finally:
        _stop_ray()
        for signum, handler in (previous or {}).items():
            signal.signal(signum, handler)
    if job.cancel.is_set() and error:  # a signal after the last round changes nothing
        error = f"interrupted ({job.cancel_reason}); continue it with: fedaudit run --resume {job.run_id}"
    status = "failed" if error else job.result.get("status", "completed")
    store.finish_run(job.run_id, status, error)
    store.update_run(job.run_id, info={"seconds": time.time() - started})
    return RunOutcome(job.run_id, status, error, summarize(store, job.run_id))


SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


def _stop_on_interrupt(job: ServerJob, store: RunStore) -> dict | None:
    """Make Ctrl-C or SIGTERM stop the run after its current round, and a second one at once.

    Python's KeyboardInterrupt lands in Flower's engine loop on the main thread while the
    ServerApp thread keeps waiting for replies that never come, so the run hung. The
    round loop checks ``job.cancel`` instead and fails the run cleanly (audit log and
    status written, Ray shut down). A second signal records the run failed and exits
    at once: 130 after Ctrl-C, 143 after SIGTERM. Returns the previous handlers by
    signal, or None when not on the main thread (signals cannot be handled there).
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        name = SIGNAL_NAMES[signum]
        if not job.cancel.is_set():
            job.cancel_reason = name
            job.cancel.set()
            sys.stderr.write(f"\ninterrupted ({name}): stopping after the current round ({name} again to stop at once)\n")
            return
        store.finish_run(job.run_id, "failed", f"interrupted ({job.cancel_reason}, then {name}); continue it with: fedaudit run --resume {job.run_id}")
        sys.stderr.write(f"\nstopped; run {job.run_id} is recorded as failed\n")
        processes.kill_descendants()
        os._exit(128 + signum)

    return {signum: signal.signal(signum, handler) for signum in SIGNAL_NAMES}


def _start_ray(backend_config: dict) -> None:
    """Start Ray before Flower does, then take SIGTERM back from it.

    Ray's core worker installs a SIGTERM handler that aborts the process (exit 134),
    which left a terminated run recorded as ``running``. Flower's RayBackend starts Ray
    only when it is not up yet, so building one here starts Ray with exactly Flower's
    arguments; the run's handler is then put back on top of Ray's.
    """
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    ours = signal.getsignal(signal.SIGTERM)
    RayBackend(backend_config)
    if threading.current_thread() is threading.main_thread() and callable(ours):
        signal.signal(signal.SIGTERM, ours)


def _stop_ray() -> None:
    # Flower shuts Ray down when its engine ends; this covers a run that failed before.
    import ray

    if ray.is_initialized():
        ray.shutdown()


def demo_configs() -> list[tuple[str, RunConfig]]:
    """The two runs of ``fedaudit demo``: identical but for DP."""
    base = dict(dataset="digits", clients=10, partition="iid", seed=0, delta=1e-5)
    return [("non-private", resolve(None, dp=False, **base)), ("private", resolve(None, dp=True, **base))]
