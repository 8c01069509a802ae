"""Privacy planning: turn a run's shape into (q, T) per DP mode, and sigma <-> epsilon.

Sample level (DP-SGD on each client): q = 1/ceil(n/B) with Opacus's Poisson loader and
T = rounds x local epochs x ceil(n/B), for a client that trains in every round (the
worst case when clients are sampled). Clients of different sizes have different (q, T);
the run's epsilon is the largest client's, so calibration takes the largest sigma.

Client level (DP-FedAvg): q = participation probability and T = rounds.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

from shared import privacy
from shared.errors import BadInput


@dataclass(frozen=True)
class Mechanism:
    sample_rate: float
    steps: int


# Far beyond any real plan; past them the accountants run for hours.
MAX_SHAPE = 100_000
MAX_STEPS = 100_000_000


def batches_per_epoch(num_records: int, batch_size: int) -> int:
    """ceil(n / B): the local steps per epoch; Opacus's Poisson loader samples at q = 1 / this."""
    return -(-num_records // batch_size)


def planned_spend(num_records: int, batch_size: int, epochs: int, noise_multiplier: float) -> tuple[float, float, int]:
    """The (sigma, q, steps) a round will spend: Opacus's Poisson loader uses q = 1/ceil(n/B)."""
    batches = batches_per_epoch(num_records, batch_size)
    return (noise_multiplier, 1.0 / batches, epochs * batches)


def sample_level_mechanisms(client_sizes: list[int], batch_size: int, local_epochs: int, rounds: int) -> list[Mechanism]:
    for flag, value in (("--batch-size", batch_size), ("--local-epochs", local_epochs), ("--rounds", rounds)):
        if value < 1:
            raise BadInput(f"{flag} must be >= 1, got {value}")
        if value > MAX_SHAPE:
            raise BadInput(f"{flag} must be <= {MAX_SHAPE:,}, got {value:,}")
    shapes = set()
    for n in client_sizes:
        if n < 1:
            raise BadInput("every client needs at least one record")
        batches = batches_per_epoch(n, batch_size)
        shapes.add(Mechanism(1.0 / batches, rounds * local_epochs * batches))
    return sorted(shapes, key=lambda m: (m.sample_rate, m.steps))


def epsilon_for(mechanisms: list[Mechanism], noise_multiplier: float, delta: float) -> dict[str, float]:
    """Worst-case (largest) epsilon over the mechanisms, for both accountants."""
    worst = {"epsilon_rdp": 0.0, "epsilon_prv": 0.0}
    for m in mechanisms:
        eps = privacy.epsilons([(noise_multiplier, m.sample_rate, m.steps)], delta)
        worst = {k: max(worst[k], eps[k]) for k in worst}
    return worst


def noise_for(mechanisms: list[Mechanism], target_epsilon: float, delta: float) -> float:
    """Smallest sigma (to the search tolerance) with every mechanism's epsilon <= target."""
    return max(privacy.noise_for_target(target_epsilon, m.sample_rate, m.steps, delta) for m in mechanisms)


def _mode_report(mechanisms: list[Mechanism], delta: float, noise_multiplier: float | None, target_epsilon: float | None) -> dict:
    if target_epsilon is not None:
        noise_multiplier = noise_for(mechanisms, target_epsilon, delta)
    if noise_multiplier is None:
        raise BadInput("give --noise-multiplier (to get epsilon) or --target-epsilon (to get the noise multiplier)")
    privacy.check_mechanism(mechanisms[0].sample_rate, noise_multiplier, delta)
    worst = max(mechanisms, key=lambda m: privacy.epsilon([(noise_multiplier, m.sample_rate, m.steps)], delta))
    report = {"sample_rate": worst.sample_rate, "steps": worst.steps, "noise_multiplier": noise_multiplier, "delta": delta}
    report.update(epsilon_for(mechanisms, noise_multiplier, delta))
    if report["epsilon_prv"] == math.inf:
        report["note"] = f"epsilon is above {privacy.PRV_LIMIT:g}, where the PRV accountant is not run; epsilon_rdp is the bound"
    if target_epsilon is not None:
        report["target_epsilon"] = target_epsilon
    return report


def raw_mechanism(sample_rate: float, steps: int, delta: float | None, noise_multiplier: float | None = None, target_epsilon: float | None = None) -> dict:
    """``fedaudit budget --sample-rate Q --steps T --delta D (--noise-multiplier Z | --target-epsilon E)``."""
    if delta is None:
        raise BadInput("--delta is required with --sample-rate")
    privacy.check_mechanism(sample_rate, None, delta)
    if steps is None:
        raise BadInput("--steps is required with --sample-rate")
    if not 1 <= steps <= MAX_STEPS:
        raise BadInput(f"--steps must be in 1..{MAX_STEPS:,}, got {steps}")
    if target_epsilon is not None and not target_epsilon > 0:
        raise BadInput(f"--target-epsilon must be > 0, got {target_epsilon}")
    out = _mode_report([Mechanism(sample_rate, steps)], delta, noise_multiplier, target_epsilon)
    out["accountant"] = privacy.HEADLINE_ACCOUNTANT
    return out


# A plan without noise has only the mechanism's shape: no epsilon is claimed for it.
NO_NOISE_NOTE = "no {level}-level noise given: q and T only, no epsilon (add --{flag}noise-multiplier or --{flag}target-epsilon)"


def run_shape(
    *,
    rounds: int,
    clients: int,
    client_sizes: list[int],
    batch_size: int,
    local_epochs: int,
    participation: float,
    delta: float | None,
    noise_multiplier: float | None,
    target_epsilon: float | None,
    client_noise_multiplier: float | None,
    client_target_epsilon: float | None,
) -> dict:
    """q and T for each DP mode of a run's shape, with sigma or epsilon for each."""
    if rounds < 1 or clients < 1:
        raise BadInput("--rounds and --clients must be >= 1")
    if not (0.0 < participation <= 1.0):
        raise BadInput(f"clients per round / clients must be in (0, 1], got {participation:g}")
    if delta is None:
        from shared.privacy import default_delta

        delta = default_delta(min(client_sizes), clients)
    privacy.check_mechanism(participation, None, delta)
    report: dict = {"delta": delta, "accountant": privacy.HEADLINE_ACCOUNTANT, "rounds": rounds, "clients": clients}
    mechanisms = sample_level_mechanisms(client_sizes, batch_size, local_epochs, rounds)
    if noise_multiplier is not None or target_epsilon is not None:
        privacy.check_delta(delta, smallest_client_records=min(client_sizes))
        report["sample_level"] = _mode_report(mechanisms, delta, noise_multiplier, target_epsilon)
        report["sample_level"]["note"] = "worst-case client, assuming it trains in every round"
    else:
        m = mechanisms[-1]
        report["sample_level"] = {"sample_rate": m.sample_rate, "steps": m.steps, "note": NO_NOISE_NOTE.format(level="sample", flag="")}
    client_mech = [Mechanism(participation, rounds)]
    if client_noise_multiplier is not None or client_target_epsilon is not None:
        if participation * clients < 2:
            raise BadInput(f"client-level DP needs at least 2 clients per round in expectation, got {participation * clients:g}")
        privacy.check_delta(delta, num_clients=clients)
        report["client_level"] = _mode_report(client_mech, delta, client_noise_multiplier, client_target_epsilon)
    else:
        report["client_level"] = {"sample_rate": participation, "steps": rounds, "note": NO_NOISE_NOTE.format(level="client", flag="client-")}
    return report
