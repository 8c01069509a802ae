"""Canaries for the empirical privacy audits, and the secret of where they went.

Two kinds:

- **Sample-level canaries** (Steinke, Nasr and Jagielski 2023): ``--canaries M`` takes
  M mislabelled records out of the test split (:func:`shared.data.carve_canaries`).
  Each is included independently with probability 1/2, and an included canary joins
  the training data of one client chosen at random.
- **Canary clients** (Andrew et al. 2023): ``--canary-clients M`` adds M nodes to a
  client-level DP federation. Canary client j sends ``C * u_j`` as its update whenever
  it is sampled, where ``u_j`` is a random unit direction drawn from a secret seed.
  The audit compares the final model's change with these directions and with
  directions of canaries that were never sent.

The secret (inclusion bits, holders, direction seed) is drawn from the operating
system's randomness, not from the run's public seed, and is written to
``canaries.json`` in the run folder with mode 0600. Only the CLI, the clients that
hold canaries and the audit read it: it is never put in a message.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import BadInput, read_input
from shared.store import atomic_write_bytes

SECRET_FILE = "canaries.json"


@dataclass(frozen=True)
class CanarySecret:
    """Where the canaries of one run went.

    ``included[i]`` says whether sample canary i was trained on, and ``holder[i]`` which
    client holds it (-1 when excluded). ``direction_seed`` draws the canary clients'
    update directions; ``canary_clients`` of them were inserted.
    """

    included: tuple[bool, ...] = ()
    holder: tuple[int, ...] = ()
    canary_clients: int = 0
    direction_seed: int = 0

    @property
    def m(self) -> int:
        return len(self.included)

    def held_by(self, client: int) -> list[int]:
        """Pool indices of the canaries that ``client`` trains on."""
        return [i for i, h in enumerate(self.holder) if h == client]

    def holders(self) -> list[int]:
        return sorted({h for h in self.holder if h >= 0})

    def to_json(self) -> bytes:
        return json.dumps(
            {"included": list(self.included), "holder": list(self.holder), "canary_clients": self.canary_clients, "direction_seed": str(self.direction_seed)}
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> CanarySecret:
        data = json.loads(raw)
        return cls(
            included=tuple(bool(x) for x in data["included"]),
            holder=tuple(int(x) for x in data["holder"]),
            canary_clients=int(data["canary_clients"]),
            direction_seed=int(data["direction_seed"]),
        )


def draw_secret(canaries: int, clients: int, canary_clients: int = 0) -> CanarySecret:
    """Include each canary with probability 1/2 in a uniformly random client's data."""
    rng = np.random.default_rng(secrets.randbits(128))
    included = rng.random(canaries) < 0.5
    holder = np.where(included, rng.integers(0, clients, size=canaries), -1)
    return CanarySecret(tuple(bool(x) for x in included), tuple(int(h) for h in holder), canary_clients, secrets.randbits(63))


def save_secret(path: str | os.PathLike[str], secret: CanarySecret) -> None:
    path = Path(path)
    atomic_write_bytes(path, secret.to_json())
    os.chmod(path, 0o600)


def load_secret(path: str | os.PathLike[str]) -> CanarySecret:
    raw = read_input(path, "canary secret")
    try:
        return CanarySecret.from_json(raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"canary secret {path} is unreadable: {exc}") from None


def canary_direction(seed: int, index: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Canary j's unit direction over all of the model's arrays (isotropic: a normalised Gaussian).

    Drawn in sorted key order, so the clients and the audit get the same direction
    whatever order they list the arrays in.
    """
    rng = np.random.default_rng([seed, index])
    parts = {k: rng.standard_normal(size=shapes[k]) for k in sorted(shapes)}
    norm = np.sqrt(sum(float(np.sum(p * p)) for p in parts.values()))
    return {k: p / norm for k, p in parts.items()}


def flat_direction(seed: int, index: int, shapes: dict[str, tuple[int, ...]]) -> np.ndarray:
    """Canary ``index``'s unit direction flattened in ``shapes``' key order (for cosines)."""
    direction = canary_direction(seed, index, shapes)
    return np.concatenate([direction[k].ravel() for k in shapes])


def flat_directions(seed: int, indices: range, shapes: dict[str, tuple[int, ...]]) -> np.ndarray:
    """Rows of :func:`flat_direction`."""
    return np.stack([flat_direction(seed, j, shapes) for j in indices])
