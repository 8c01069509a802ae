"""Flower strategies, and the wrapper that decides who takes part in each round.

Flower's strategies sample nodes with the global ``random`` module. We choose the
participants ourselves, from a seeded generator over partition ids, and hand the inner
strategy a view of the grid that holds only them. The inner strategy's own
configure/aggregate logic is untouched.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Bulyan, FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum, Strategy

from shared.errors import BadInput

# Participation is decided by ParticipatingClients; the inner strategy takes whoever
# it is shown.
_ALL_SHOWN = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)


def build_strategy(
    name: str,
    *,
    proximal_mu: float = 0.01,
    server_lr: float = 0.1,
    client_lr: float = 0.1,
    aggregator: str = "fedavg",
    num_malicious: int = 0,
    clients_per_round: int = 1,
) -> Strategy:
    """Flower's own strategy for ``name``; a robust ``aggregator`` replaces FedAvg's mean."""
    if aggregator == "median":
        return FedMedian(**_ALL_SHOWN)
    if aggregator == "trimmed-mean":
        return FedTrimmedAvg(beta=0.2, **_ALL_SHOWN)
    if aggregator == "krum":
        return Krum(num_malicious_nodes=num_malicious, **_ALL_SHOWN)
    if aggregator == "multikrum":
        return MultiKrum(num_malicious_nodes=num_malicious, num_nodes_to_select=max(1, clients_per_round - num_malicious), **_ALL_SHOWN)
    if aggregator == "bulyan":
        return Bulyan(num_malicious_nodes=num_malicious, **_ALL_SHOWN)
    if name == "fedavg":
        return FedAvg(**_ALL_SHOWN)
    if name == "fedprox":
        return FedProx(proximal_mu=proximal_mu, **_ALL_SHOWN)
    if name == "fedadam":
        return FedAdam(eta=server_lr, eta_l=client_lr, **_ALL_SHOWN)
    raise BadInput(f"unknown strategy {name!r}; choose one of fedavg, fedprox, fedadam")


class GridView:
    """A Grid that exposes only some node ids; everything else goes to the real grid."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]):
        self._grid = grid
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class ParticipatingClients(Strategy):
    """Wrap a strategy so the wrapper, not Flower, picks each round's participants.

    ``fixed``: a seeded sample of round(fraction * N) clients without replacement.
    ``poisson``: every client joins independently with probability ``fraction``;
    client-level DP accounting holds only for this.

    ``node_of`` maps partition id -> node id. Sampling is over sorted partition ids,
    so a seed gives the same participants in every run and on every engine, unless
    ``secret_sampling``: then each round's training sample comes from fresh OS entropy,
    so knowing the seed does not reveal it (client-level DP's sampling assumption).

    ``eval_fraction`` < 1 evaluates only a seeded sample of round(eval_fraction * N)
    clients each round (see :meth:`evaluators`); 1 evaluates every client. Only the
    partition ids in ``evaluated`` (default: all) can evaluate: canary clients hold no data.
    """

    def __init__(self, inner: Strategy, node_of: dict[int, int], fraction: float, seed: int, mode: str = "fixed", eval_fraction: float = 1.0, evaluated: Iterable[int] | None = None,
                 secret_sampling: bool = False):
        if mode not in ("fixed", "poisson"):
            raise ValueError(mode)
        self.inner = inner
        self.node_of = dict(sorted(node_of.items()))
        # Who is asked to evaluate: every client by default; canary clients hold no data.
        self.evaluated = sorted(self.node_of if evaluated is None else set(evaluated) & set(self.node_of))
        self.fraction = fraction
        self.seed = seed
        self.mode = mode
        self.eval_fraction = eval_fraction
        self.secret_sampling = secret_sampling

    def participants(self, server_round: int) -> list[int]:
        ids = list(self.node_of)
        rng = np.random.default_rng(None if self.secret_sampling else [self.seed, server_round])
        if self.mode == "poisson":
            return [pid for pid, u in zip(ids, rng.random(len(ids))) if u < self.fraction]
        count = max(1, int(round(len(ids) * self.fraction)))
        return sorted(rng.choice(ids, size=count, replace=False).tolist())

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        nodes = [self.node_of[p] for p in self.participants(server_round)]
        if not nodes:
            # Poisson sampling can pick nobody. Flower's strategies would wait for a
            # node forever, so skip them; FedOpt-style strategies still need to know
            # the current global model for their next aggregate.
            if hasattr(self.inner, "current_arrays"):
                self.inner.current_arrays = {k: a.numpy() for k, a in arrays.items()}
            return []
        return self.inner.configure_train(server_round, arrays, config, GridView(grid, nodes))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def evaluators(self, server_round: int) -> list[int]:
        """The partition ids that evaluate the model of ``server_round``.

        Every client when ``eval_fraction`` is 1. Otherwise a fixed-size sample drawn
        independently of the training sample (its own seeded stream), so the clients that
        just trained are not favoured and the estimate of federated accuracy stays unbiased.
        """
        ids = list(self.evaluated)
        if self.eval_fraction >= 1.0:
            return ids
        rng = np.random.default_rng([self.seed, server_round, 0xE7A1])
        count = max(1, int(round(len(ids) * self.eval_fraction)))
        return sorted(rng.choice(ids, size=count, replace=False).tolist())

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        nodes = [self.node_of[p] for p in self.evaluators(server_round)]
        return self.inner.configure_evaluate(server_round, arrays, config, GridView(grid, nodes))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()
