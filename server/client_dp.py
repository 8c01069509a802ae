"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018) as a strategy wrapper.

Each round is one Poisson-subsampled Gaussian mechanism over clients:

1. every participating client's whole update (new - global) is clipped to L2 norm C;
2. N(0, z^2 C^2) noise is added to the *sum* of clipped updates;
3. the sum is divided by the expected number of participants q*N, a fixed denominator
   (not the realised count, not example weights), so one client changes the sum by at
   most C whatever happens.

The noised mean update is handed to the inner strategy as a single reply, so FedAvg
applies it as is and FedAdam/FedProx post-process it; post-processing keeps the DP
guarantee. Participation must be Poisson (see ``ParticipatingClients``), which is what
the accountant assumes. Robust aggregators are refused with it (``RunConfig.validate``):
they would see one update.

Why not Flower's ``DifferentialPrivacyServerSideFixedClipping``: it samples a fixed
number of clients per round and divides by the realised count, so neither the Poisson
subsampling the accountant needs nor the fixed q*N denominator fits; and Flower's
wrappers keep no accountant. This wrapper composes the same way (any inner strategy).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from shared.protocol import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES


def clip_update(update: dict[str, np.ndarray], clip: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale ``update`` so its global L2 norm (over all arrays) is at most ``clip``."""
    norm = float(np.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in update.values())))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (u * factor).astype(u.dtype) for k, u in update.items()}, norm


class ClientLevelDP(Strategy):
    def __init__(self, inner: Strategy, noise_multiplier: float, clip: float, sample_rate: float, num_clients: int, seed: int | None):
        self.inner = inner
        self.noise_multiplier = noise_multiplier
        self.clip = clip
        self.sample_rate = sample_rate
        self.num_clients = num_clients
        self.seed = seed
        self.current: dict[str, np.ndarray] | None = None
        self.update_norms: dict[int, list[float]] = {}

    @property
    def denominator(self) -> float:
        return self.sample_rate * self.num_clients

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.current = {k: v.numpy() for k, v in arrays.items()}
        return self.inner.configure_train(server_round, arrays, config, grid)

    def noised_mean_update(self, server_round: int, updates: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        assert self.current is not None, "configure_train must run first"
        total = {k: np.zeros_like(v, dtype=np.float64) for k, v in self.current.items()}
        norms = []
        for update in updates:
            clipped, norm = clip_update(update, self.clip)
            norms.append(norm)
            for k in total:
                total[k] += clipped[k]
        self.update_norms[server_round] = norms
        # seed None: fresh OS entropy, so the noise cannot be rederived from the config.
        rng = np.random.default_rng(None if self.seed is None else [self.seed, server_round, 0xC11E])
        std = self.noise_multiplier * self.clip
        # np.asarray: arithmetic on a 0-d array yields a numpy scalar, which Flower's Array refuses.
        return {k: np.asarray((t + rng.normal(0.0, std, size=t.shape)) / self.denominator, dtype=self.current[k].dtype) for k, t in total.items()}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.current is not None, "configure_train must run first"
        updates = []
        for reply in replies:
            if reply.has_error():
                continue
            new = {k: v.numpy() for k, v in reply.content[ARRAYS_KEY].items()}
            updates.append({k: new[k].astype(np.float64) - self.current[k] for k in self.current})
        mean_update = self.noised_mean_update(server_round, updates)
        noised = {k: np.asarray(self.current[k] + mean_update[k], dtype=self.current[k].dtype) for k in self.current}
        # Even a round where nobody was sampled releases a (pure-noise) model: the
        # accountant counts every round, so the mechanism must run every round.
        synthetic = Message(
            RecordDict({ARRAYS_KEY: ArrayRecord({k: Array(v) for k, v in noised.items()}), METRICS_KEY: MetricRecord({NUM_EXAMPLES: 1})}),
            dst_node_id=0,
            message_type=MessageType.TRAIN,
        )
        arrays, _ = self.inner.aggregate_train(server_round, [synthetic])
        return arrays, MetricRecord({"participants": len(updates)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()
