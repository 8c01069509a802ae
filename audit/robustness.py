"""Robustness of a trained classifier: Gaussian input noise and L-infinity attacks.

fedaudit's inputs are not images in [0, 1]: digits pixels are mapped to [-1, 1] and
tabular features are standardised. torchattacks assumes [0, 1] inputs (it clamps
every adversarial example to that box), and its ``set_normalization_used`` expects
per-channel image statistics of shape (1, C, 1, 1), which does not fit flat feature
vectors. So the attacks run in a **min/max-normalised space**:

- every feature j gets a box [lo_j, hi_j] (:func:`feature_bounds`);
- :class:`RangeScaled` wraps the model so it takes u in [0, 1]^d and feeds it
  x = lo + u * (hi - lo); records are mapped to u = (x - lo) / (hi - lo);
- an attack budget ``eps`` is therefore a **fraction of each feature's range**
  (eps = 0.1 on digits, range 2, lets every pixel move by 0.2, i.e. 1.6 of 16 grey
  levels), and torchattacks' clamp to [0, 1] keeps adversarial records inside the box;
- Gaussian noise levels are standard deviations as the same fraction of each feature's
  range, added in the model's own input space without clipping (measurement noise).

A feature whose box has zero width (constant in the data) is never perturbed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.errors import BadInput

# Defaults used by `fedaudit audit`; all fractions of each feature's range.
DEFAULT_NOISE_LEVELS = (0.05, 0.1, 0.2, 0.3)
DEFAULT_EPS = (0.01, 0.02, 0.05, 0.1)
DEFAULT_PGD_STEPS = 10
# Step size as a multiple of eps / steps (Madry et al. 2018 use 2.5): PGD can walk to
# the edge of the ball and still move along it.
DEFAULT_PGD_ALPHA_FACTOR = 2.5
# PGD starts: one from the clean record, then this many uniform random starts in the
# eps-ball; a record counts as robust only if it survives every start (the usual
# worst case over restarts). The clean start makes PGD at least as strong as FGSM in
# practice (its first step is FGSM's direction); random starts find other optima.
DEFAULT_PGD_RANDOM_RESTARTS = 1
# Fixed digits pixel scale (shared/data.py: pixels / 8 - 1): data-independent bounds.
DIGITS_BOUNDS = (-1.0, 1.0)


def _features(x: Any, name: str = "x") -> np.ndarray:
    array = np.asarray(x, dtype=np.float32)
    if array.ndim != 2:
        raise BadInput(f"{name} must be two-dimensional (n_samples, n_features), got shape {array.shape}")
    if array.shape[0] == 0:
        raise BadInput(f"{name} is empty")
    if not np.all(np.isfinite(array)):
        raise BadInput(f"{name} contains NaN or infinite values")
    return array


def _labels(y: Any, n: int) -> np.ndarray:
    array = np.asarray(y)
    if array.ndim != 1 or array.size != n:
        raise BadInput(f"y must be one-dimensional with {n} labels, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer) or array.min() < 0:
        raise BadInput("y must hold non-negative integer class indices")
    return array.astype(np.int64)


def _levels(values: Sequence[float], name: str, upper: float | None = None) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise BadInput(f"{name} is empty")
    bad = [v for v in out if not (np.isfinite(v) and v > 0 and (upper is None or v <= upper))]
    if bad:
        limit = f" and <= {upper:g}" if upper is not None else ""
        raise BadInput(f"{name} must be > 0{limit}, got {bad[0]!r}")
    return sorted(out)


def feature_bounds(*arrays: Any, fixed: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature box [lo, hi] that defines the attack space.

    Parameters
    ----------
    *arrays : array-like of shape (n_samples, n_features)
        Records whose per-feature minimum and maximum span the box (pass the training
        records and the records to be attacked, so no clean record lies outside).
    fixed : (float, float), optional
        Known, data-independent bounds for every feature (digits: (-1, 1)); then the
        arrays only give the number of features.

    Returns
    -------
    (lo, hi) : two float32 arrays of shape (n_features,)
    """
    if not arrays:
        raise BadInput("feature_bounds needs at least one array")
    checked = [_features(a, f"arrays[{i}]") for i, a in enumerate(arrays)]
    widths = {a.shape[1] for a in checked}
    if len(widths) != 1:
        raise BadInput(f"arrays have different numbers of features: {sorted(widths)}")
    d = widths.pop()
    if fixed is not None:
        lo_v, hi_v = float(fixed[0]), float(fixed[1])
        if not hi_v > lo_v:
            raise BadInput(f"fixed bounds must have hi > lo, got {fixed!r}")
        stacked = np.concatenate(checked)
        if stacked.min() < lo_v or stacked.max() > hi_v:
            raise BadInput(f"records lie outside the fixed bounds [{lo_v:g}, {hi_v:g}]")
        return np.full(d, lo_v, dtype=np.float32), np.full(d, hi_v, dtype=np.float32)
    stacked = np.concatenate(checked)
    return stacked.min(axis=0).astype(np.float32), stacked.max(axis=0).astype(np.float32)


def _box(bounds: tuple[Any, Any] | None, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The feature box (lo, hi) for ``x``: ``bounds`` checked, or the range of ``x``."""
    if bounds is None:
        return feature_bounds(x)
    try:
        lo, hi = (np.asarray(b, dtype=np.float32) for b in bounds)
    except (TypeError, ValueError):
        raise BadInput("bounds must be a pair (lo, hi) of numeric arrays, one value per feature") from None
    if lo.shape != (x.shape[1],) or hi.shape != (x.shape[1],):
        raise BadInput(f"bounds must be two arrays of shape ({x.shape[1]},), one value per feature; got {lo.shape} and {hi.shape}")
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()) or (hi < lo).any():
        raise BadInput("bounds must be finite with hi >= lo for every feature")
    # Attacking a clipped copy would not attack the real record.
    if (x < lo).any() or (x > hi).any():
        raise BadInput("records lie outside the given bounds")
    return lo, hi


@torch.no_grad()
def _check_classes(model: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    classes = model(torch.from_numpy(x[:1])).shape[1]
    if y.max() >= classes:
        raise BadInput(f"y holds class {int(y.max())} but the model has {classes} outputs")


class RangeScaled(nn.Module):
    """``model`` seen from the min/max-normalised space: input u in [0, 1]^d, x = lo + u (hi - lo)."""

    def __init__(self, model: nn.Module, lo: np.ndarray, hi: np.ndarray):
        super().__init__()
        self.model = model
        self.register_buffer("lo", torch.as_tensor(lo, dtype=torch.float32))
        self.register_buffer("width", torch.as_tensor(hi - lo, dtype=torch.float32))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.model(self.lo + u * self.width)

    def to_unit(self, x: np.ndarray) -> torch.Tensor:
        width = self.width.numpy()
        safe = np.where(width > 0, width, 1.0)
        u = np.where(width > 0, (x - self.lo.numpy()) / safe, 0.0)
        return torch.from_numpy(np.clip(u, 0.0, 1.0).astype(np.float32))


@torch.no_grad()
def _correct(model: nn.Module, inputs: torch.Tensor, y: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    hits = [model(inputs[s : s + batch_size]).argmax(dim=1).numpy() == y[s : s + batch_size] for s in range(0, len(y), batch_size)]
    return np.concatenate(hits)


def _accuracy(model: nn.Module, inputs: torch.Tensor, y: np.ndarray) -> float:
    return float(_correct(model, inputs, y).mean())


def noise_accuracy(
    model: nn.Module, x: Any, y: Any, levels: Sequence[float] = DEFAULT_NOISE_LEVELS,
    bounds: tuple[np.ndarray, np.ndarray] | None = None, seed: int = 0,
) -> list[dict[str, float]]:
    """Accuracy under additive Gaussian input noise.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits for float32 inputs of shape (n, n_features).
    x : array-like of shape (n_samples, n_features)
    y : array-like of shape (n_samples,)
        Integer class indices.
    levels : sequence of float
        Noise standard deviations, each a fraction of every feature's range.
    bounds : (lo, hi), optional
        Feature box from :func:`feature_bounds`; default: the range of ``x``.
    seed : int
        Seed of the noise.

    Returns
    -------
    list of dict
        ``{"level", "std_mean", "accuracy"}`` per level in increasing order; ``std_mean``
        is the mean over features of the absolute noise standard deviation.
    """
    x = _features(x)
    y = _labels(y, len(x))
    levels = _levels(levels, "noise levels")
    lo, hi = _box(bounds, x)
    _check_classes(model, x, y)
    width = (hi - lo).astype(np.float32)
    rng = np.random.default_rng(seed)
    model.eval()
    out = []
    for level in levels:
        noisy = x + rng.normal(size=x.shape).astype(np.float32) * (level * width)
        out.append({"level": level, "std_mean": float(level * width.mean()), "accuracy": _accuracy(model, torch.from_numpy(noisy), y)})
    return out


def adversarial_accuracy(
    model: nn.Module, x: Any, y: Any, attack: str = "pgd", eps: Sequence[float] = DEFAULT_EPS,
    bounds: tuple[np.ndarray, np.ndarray] | None = None, steps: int = DEFAULT_PGD_STEPS,
    alpha_factor: float = DEFAULT_PGD_ALPHA_FACTOR, random_restarts: int = DEFAULT_PGD_RANDOM_RESTARTS, seed: int = 0,
) -> list[dict[str, float]]:
    """Accuracy under an untargeted L-infinity attack from torchattacks.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits.
    x : array-like of shape (n_samples, n_features)
    y : array-like of shape (n_samples,)
        Integer class indices.
    attack : {"fgsm", "pgd"}
        One signed-gradient step of size eps (FGSM), or projected gradient descent.
    eps : sequence of float
        Budgets, each a fraction of every feature's range, in (0, 1].
    bounds : (lo, hi), optional
        Feature box from :func:`feature_bounds`; default: the range of ``x``.
    steps, alpha_factor, random_restarts
        PGD only: ``steps`` iterations of step ``alpha = alpha_factor * eps / steps``,
        run once from the clean record and ``random_restarts`` more times from uniform
        random points in the eps-ball; a record is counted correct only if it
        survives every start.
    seed : int
        Seed of PGD's random starts.

    Returns
    -------
    list of dict
        ``{"eps", "accuracy"}`` (PGD also ``"alpha"``) per budget in increasing order.
    """
    import torchattacks

    x = _features(x)
    y = _labels(y, len(x))
    eps = _levels(eps, "attack eps", upper=1.0)
    if attack not in ("fgsm", "pgd"):
        raise BadInput(f"unknown attack {attack!r}; use fgsm or pgd")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise BadInput(f"PGD steps must be a positive integer, got {steps!r}")
    if not alpha_factor > 0:
        raise BadInput(f"PGD alpha factor must be > 0, got {alpha_factor!r}")
    if isinstance(random_restarts, bool) or not isinstance(random_restarts, (int, np.integer)) or random_restarts < 0:
        raise BadInput(f"PGD random restarts must be an integer >= 0, got {random_restarts!r}")
    lo, hi = _box(bounds, x)
    _check_classes(model, x, y)
    wrapped = RangeScaled(model, lo, hi).eval()
    u = wrapped.to_unit(x)
    labels = torch.from_numpy(y)
    out = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for e in eps:
            # torch.autograd.grad inside the attacks differentiates w.r.t. the inputs
            # only; the model's parameter .grad fields are never touched.
            if attack == "fgsm":
                adv = torchattacks.FGSM(wrapped, eps=e)(u, labels)
                out.append({"eps": e, "accuracy": _accuracy(wrapped, adv, y)})
                continue
            alpha = alpha_factor * e / steps
            survived = np.ones(len(y), dtype=bool)
            for random_start in [False] + [True] * int(random_restarts):
                atk = torchattacks.PGD(wrapped, eps=e, alpha=alpha, steps=int(steps), random_start=random_start)
                survived &= _correct(wrapped, atk(u, labels), y)
            out.append({"eps": e, "alpha": alpha, "accuracy": float(survived.mean())})
    return out


def robustness_report(
    model: nn.Module, x: Any, y: Any, bounds: tuple[np.ndarray, np.ndarray], *,
    noise_levels: Sequence[float] = DEFAULT_NOISE_LEVELS, eps: Sequence[float] = DEFAULT_EPS,
    pgd_steps: int = DEFAULT_PGD_STEPS, alpha_factor: float = DEFAULT_PGD_ALPHA_FACTOR,
    random_restarts: int = DEFAULT_PGD_RANDOM_RESTARTS, seed: int = 0, bounds_source: str = "",
) -> dict[str, Any]:
    """Clean accuracy, noise curve, FGSM and PGD curves, and the parameters used.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier to attack.
    x : array-like of shape (n_records, n_features)
        Records, inside ``bounds``.
    y : array-like of shape (n_records,)
        Their true class ids.
    bounds : (lo, hi)
        Per-feature bounds, arrays of shape (n_features,) (:func:`feature_bounds`);
        eps and noise are fractions of each feature's range ``hi - lo``.
    noise_levels, eps : sequences of float
        Gaussian noise standard deviations and L-infinity budgets to evaluate.
    pgd_steps, alpha_factor, random_restarts : PGD's steps, step size (a multiple of
        ``eps / pgd_steps``) and random starts.
    seed : int
        Seeds the noise and the random starts.
    bounds_source : str
        Where ``bounds`` came from, recorded in ``parameters``.

    Returns
    -------
    dict
        ``clean_accuracy``, ``n_records``, ``noise``, ``fgsm``, ``pgd`` (lists from
        :func:`noise_accuracy` and :func:`adversarial_accuracy`),
        ``strongest_pgd`` (``{"eps", "accuracy"}`` at the largest eps), and
        ``parameters`` (eps list, noise levels, PGD steps, alpha, starts, norm,
        space, bounds).
    """
    x = _features(x)
    y = _labels(y, len(x))
    lo, hi = _box(bounds, x)
    model.eval()
    clean = _accuracy(model, torch.from_numpy(x), y)
    noise = noise_accuracy(model, x, y, noise_levels, bounds, seed)
    fgsm = adversarial_accuracy(model, x, y, "fgsm", eps, bounds, seed=seed)
    pgd = adversarial_accuracy(model, x, y, "pgd", eps, bounds, pgd_steps, alpha_factor, random_restarts, seed)
    width = hi - lo
    return {
        "n_records": int(len(y)),
        "clean_accuracy": clean,
        "noise": noise,
        "fgsm": fgsm,
        "pgd": pgd,
        "strongest_pgd": {"eps": pgd[-1]["eps"], "accuracy": pgd[-1]["accuracy"]},
        "parameters": {
            "norm": "Linf",
            "library": "torchattacks",
            "space": "min/max-normalised: u = (x - lo) / (hi - lo) in [0, 1] per feature; eps and noise std are fractions of each feature's range",
            "bounds": bounds_source,
            "feature_range_mean": float(width.mean()),
            "constant_features": int((width == 0).sum()),
            "eps": [float(e) for e in sorted(eps)],
            "noise_levels": [float(v) for v in sorted(noise_levels)],
            "noise": "additive Gaussian, std = level x feature range, not clipped",
            "fgsm": "one step of size eps along the sign of the loss gradient, clamped to the box",
            "pgd_steps": int(pgd_steps),
            "pgd_alpha": f"{alpha_factor:g} x eps / steps",
            "pgd_starts": f"1 from the clean record + {int(random_restarts)} uniform random in the eps-ball; a record is robust only if it survives every start",
            "seed": int(seed),
        },
    }
