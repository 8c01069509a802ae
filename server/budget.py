"""``fedaudit budget``: plan a privacy budget before training.

Only the ``--config`` form needs the run machinery (it loads the data for exact client
sizes); the raw mechanism and a run shape from flags use the planner alone, so the
command starts without importing Flower.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from shared import planner
from shared.config import resolve
from shared.errors import BadInput


def plan_budget(
    *,
    config: str | Path | None = None,
    sample_rate: float | None = None,
    steps: int | None = None,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float | None = None,
    rounds: int | None = None,
    clients: int | None = None,
    clients_per_round: float | None = None,
    local_epochs: int | None = None,
    batch_size: int | None = None,
    dataset_size: int | None = None,
    client_noise_multiplier: float | None = None,
    client_target_epsilon: float | None = None,
) -> dict:
    """``fedaudit budget``: a raw mechanism (``sample_rate``, ``steps``), a run.toml's
    shape (``config``, flags overriding it) or a run shape given by flags.

    A noise level or target epsilon given as a flag replaces both of the config's, so
    the flag is what gets planned; flags that do not apply to the chosen form are refused.
    """
    for one, other, a, b in (("--noise-multiplier", "--target-epsilon", noise_multiplier, target_epsilon),
                             ("--client-noise-multiplier", "--client-target-epsilon", client_noise_multiplier, client_target_epsilon)):
        if a is not None and b is not None:
            raise BadInput(f"give {one} (to get epsilon) or {other} (to get the noise), not both")
    shape_flags = {"--rounds": rounds, "--clients": clients, "--clients-per-round": clients_per_round, "--local-epochs": local_epochs,
                   "--batch-size": batch_size, "--dataset-size": dataset_size, "--client-noise-multiplier": client_noise_multiplier,
                   "--client-target-epsilon": client_target_epsilon, "--config": config}
    if sample_rate is not None:
        unused = [flag for flag, v in shape_flags.items() if v is not None]
        if unused:
            raise BadInput(f"{', '.join(unused)} {'describes' if len(unused) == 1 else 'describe'} a run shape; with --sample-rate give only --steps, --delta and a noise or target")
        return planner.raw_mechanism(sample_rate, steps, delta, noise_multiplier, target_epsilon)
    if steps is not None:
        raise BadInput("--steps goes with --sample-rate (the raw mechanism); a run shape has --rounds, --local-epochs and --batch-size")
    if config is not None:
        unused = [flag for flag, v in (("--clients", clients), ("--dataset-size", dataset_size)) if v is not None]
        if unused:
            raise BadInput(f"{', '.join(unused)}: with --config the clients and their sizes come from the config's data; drop {'it' if len(unused) == 1 else 'them'}")
        from server.runner import preflight

        cfg = resolve(config, rounds=rounds, batch_size=batch_size, local_epochs=local_epochs, delta=delta)
        # The flags replace the file's noise or target before anything is calibrated.
        if noise_multiplier is not None or target_epsilon is not None:
            cfg = replace(cfg, noise_multiplier=noise_multiplier if noise_multiplier is not None else cfg.noise_multiplier, target_epsilon=target_epsilon)
        if client_noise_multiplier is not None or client_target_epsilon is not None:
            cfg = replace(cfg, client_noise_multiplier=client_noise_multiplier if client_noise_multiplier is not None else cfg.client_noise_multiplier,
                          client_target_epsilon=client_target_epsilon)
        sample_given = noise_multiplier is not None or target_epsilon is not None
        client_given = client_noise_multiplier is not None or client_target_epsilon is not None
        if client_given:
            cfg = replace(cfg, client_dp=True)  # plan the config's run with client-level DP added
        if clients_per_round is not None:
            if not cfg.client_dp:
                raise BadInput("--clients-per-round plans client-level DP, which the config does not use;"
                               " add --client-noise-multiplier or --client-target-epsilon")
            cfg = replace(cfg, client_sample_rate=clients_per_round / cfg.clients)
        checked = preflight(cfg.validate())
        return planner.run_shape(
            rounds=cfg.rounds, clients=cfg.clients, client_sizes=checked.client_sizes, batch_size=cfg.batch_size, local_epochs=cfg.local_epochs,
            participation=cfg.participation_rate, delta=checked.delta,
            noise_multiplier=cfg.noise_multiplier if (sample_given or cfg.dp) and cfg.target_epsilon is None else None,
            target_epsilon=cfg.target_epsilon,
            client_noise_multiplier=cfg.client_noise_multiplier if (client_given or cfg.client_dp) and cfg.client_target_epsilon is None else None,
            client_target_epsilon=cfg.client_target_epsilon,
        )
    missing = [f for f, v in (("--rounds", rounds), ("--clients", clients), ("--batch-size", batch_size), ("--dataset-size", dataset_size)) if v is None]
    if missing:
        raise BadInput(f"give --sample-rate/--steps, a --config, or a run shape; missing {', '.join(missing)}")
    if clients < 1:
        raise BadInput(f"--clients must be >= 1, got {clients}")
    if dataset_size < clients:
        raise BadInput(f"--dataset-size {dataset_size} is smaller than --clients {clients}")
    return planner.run_shape(
        rounds=rounds, clients=clients, client_sizes=[dataset_size // clients], batch_size=batch_size,
        local_epochs=1 if local_epochs is None else local_epochs,
        participation=(clients if clients_per_round is None else clients_per_round) / clients, delta=delta,
        noise_multiplier=noise_multiplier, target_epsilon=target_epsilon,
        client_noise_multiplier=client_noise_multiplier, client_target_epsilon=client_target_epsilon,
    )
