"""Per-round outlier scores for client updates: norm and cosine to the mean update.

Both are turned into robust (modified) z-scores, 0.6745 (x - median) / MAD (Iglewicz and
Hoaglin), so a minority of attackers cannot drag the reference point the way they drag
a mean and standard deviation. A client is flagged when its norm is unusually large
(z_norm > 3.5) or its direction unusually far from the others' (z_cosine < -3.5).
Both tests are one-sided: a small or well-aligned honest update is not suspicious.
"""

from __future__ import annotations

import numpy as np

Z_THRESHOLD = 3.5


def _flat(update: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(update[k]).astype(np.float64) for k in sorted(update)])


def robust_z(values: np.ndarray) -> np.ndarray:
    median = np.median(values)
    mad = np.median(np.abs(values - median))
    if mad == 0:
        spread = np.abs(values - median)
        return np.where(spread > 1e-12, np.inf, 0.0)
    return 0.6745 * (values - median) / mad


def score_updates(global_weights: dict[str, np.ndarray], client_weights: dict[int, dict[str, np.ndarray]]) -> list[dict]:
    """Norm, cosine to the mean update, their robust z-scores and the flag, per client.

    Parameters
    ----------
    global_weights : dict of arrays
        The global model the clients started from.
    client_weights : dict client id -> dict of arrays
        What each client sent back.
    """
    clients = sorted(client_weights)
    if not clients:
        return []
    updates = np.stack([_flat({k: client_weights[c][k] - global_weights[k] for k in global_weights}) for c in clients])
    mean = updates.mean(axis=0)
    norms = np.linalg.norm(updates, axis=1)
    mean_norm = np.linalg.norm(mean)
    cosines = updates @ mean / np.maximum(norms * mean_norm, 1e-12)
    if len(clients) < 3:
        z_norm = z_cos = np.zeros(len(clients))
    else:
        z_norm, z_cos = robust_z(norms), robust_z(cosines)
    return [
        {
            "client": c,
            "norm": float(norms[i]),
            "cosine": float(cosines[i]),
            "z_norm": float(z_norm[i]),
            "z_cosine": float(z_cos[i]),
            "flagged": bool(z_norm[i] > Z_THRESHOLD or z_cos[i] < -Z_THRESHOLD),
        }
        for i, c in enumerate(clients)
    ]
