"""Model weights <-> Flower ArrayRecord / numpy, and a stable digest of them."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch
from torch import nn


def state_to_numpy(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in model.state_dict().items())


def load_numpy(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    state = OrderedDict((k, torch.from_numpy(np.ascontiguousarray(arrays[k]))) for k in model.state_dict())
    model.load_state_dict(state, strict=True)


def digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in key order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()
