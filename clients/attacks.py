"""Byzantine client behaviours, for robustness experiments (``--malicious K --attack A``).

A malicious client still trains honestly on its data (so its privacy ledger is real),
then corrupts what it sends:

- ``sign-flip``: sends global - 4 x (its update): the flipped update, boosted so that a
  minority of attackers outweighs the honest majority under plain averaging;
- ``label-flip``: trains on labels mapped c -> (classes - 1 - c);
- ``gaussian``: sends global + N(0, 1) noise instead of an update;
- ``scale``: sends global + 10 x (its update).
"""

from __future__ import annotations

import numpy as np


SIGN_FLIP_BOOST = 4.0
SCALE_BOOST = 10.0


def flip_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    return (num_classes - 1 - y).astype(y.dtype)


def corrupt_update(attack: str, global_weights: dict[str, np.ndarray], new_weights: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """What a malicious client sends instead of ``new_weights``."""
    if attack == "sign-flip":
        return {k: (g - SIGN_FLIP_BOOST * (new_weights[k] - g)).astype(g.dtype) for k, g in global_weights.items()}
    if attack == "scale":
        return {k: (g + SCALE_BOOST * (new_weights[k] - g)).astype(g.dtype) for k, g in global_weights.items()}
    if attack == "gaussian":
        rng = np.random.default_rng(seed)
        return {k: (g + rng.normal(0.0, 1.0, size=g.shape)).astype(g.dtype) for k, g in global_weights.items()}
    if attack == "label-flip":
        return new_weights  # the damage is done in training
    raise ValueError(f"unknown attack {attack!r}")
