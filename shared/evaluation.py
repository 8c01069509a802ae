"""Model evaluation used by the server (test split), the clients (validation) and the audit."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        logits = model(torch.from_numpy(x[start : start + batch_size]))
        out.append(torch.softmax(logits, dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(loss, accuracy) of ``model`` on the records; (nan, nan) when there are none."""
    if len(y) == 0:
        return float("nan"), float("nan")
    proba = predict_proba(model, x)
    loss = float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, None))))
    acc = float(np.mean(proba.argmax(axis=1) == y))
    return loss, acc
