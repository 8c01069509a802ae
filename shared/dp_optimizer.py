"""Opacus's DP-SGD optimizer step, done in a few fused tensor operations.

Opacus's :class:`~opacus.optimizers.DPOptimizer` clips, noises and scales one parameter
at a time, with several small operations and Python bookkeeping for each. On
fedaudit's built-in models every tensor is tiny, so a step costs about the same few
microseconds per operation whatever its size, and that bookkeeping was most of the
DP-SGD overhead in ``optimizer.step()`` (``python -m bench.dp_step``).

:class:`FusedDPOptimizer` is the same mechanism with fewer operations. Per-sample
gradients still come from Opacus's ``GradSampleModule``, and the algorithm is the
one Opacus runs with ``clipping="flat"``:

- each record's gradient, over all parameters together, is scaled by
  ``min(1, C / (norm + 1e-6))``, Opacus's own factor;
- the clipped gradients are summed;
- Gaussian noise of standard deviation ``noise_multiplier * C`` is added to every
  coordinate of the sum;
- the result is divided by ``expected_batch_size``: the update is the mean over the
  expected batch (Opacus's ``loss_reduction="mean"``).

Opacus's per-sample gradients are those of each record's own loss under either loss
reduction. Taking them from the summed loss (``loss_reduction="sum"`` in
``make_private``) spares expanded weights one multiplication by the batch size per
parameter; the update is the same.

Per parameter, this is one norm and one ``addmv``; the noise is one draw for all of
them, and the division by the batch size is folded into the clip factor and the noise.
Steps this fast path does not cover are handed to Opacus's own code unchanged:
secure-mode noise, gradient accumulation, skipped steps and mixed parameter dtypes.
"""

from __future__ import annotations

from typing import Callable

import torch
from opacus.optimizers.optimizer import DPOptimizer


class FusedDPOptimizer(DPOptimizer):
    """:class:`~opacus.optimizers.DPOptimizer` with clipping, noise and scaling fused.

    It takes the same arguments as Opacus's optimizer and gives the same gradients: the
    tests compare the two on every built-in model.
    """

    @classmethod
    def replacing(cls, optimizer: DPOptimizer, *, expected_batch_size: float, generator: torch.Generator | None) -> FusedDPOptimizer:
        """The fused optimizer over the plain optimizer that ``optimizer`` wraps, averaging
        over ``expected_batch_size`` records whatever ``optimizer``'s loss reduction."""
        return cls(
            optimizer.original_optimizer,
            noise_multiplier=optimizer.noise_multiplier,
            max_grad_norm=optimizer.max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=generator,
            secure_mode=optimizer.secure_mode,
        )

    def _fast_path_applies(self, params: list[torch.nn.Parameter]) -> bool:
        # Opacus's own code handles the cases below, and raises its own errors.
        return bool(params) and not self.secure_mode and not self._step_skip_queue and len({p.dtype for p in params}) == 1 and all(
            isinstance(p.grad_sample, torch.Tensor) and p.summed_grad is None for p in params
        )

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        params = self.params
        if not self._fast_path_applies(params):
            return super().pre_step(closure)
        flat = [p.grad_sample.reshape(len(p.grad_sample), p.numel()).to(p.dtype) for p in params]
        # The mean's division is folded into the clip factor and the noise's deviation.
        scale = self.expected_batch_size if self.loss_reduction == "mean" else 1.0
        if len(flat[0]):
            norms = torch.stack([torch.linalg.vector_norm(g, dim=1) for g in flat], dim=1).norm(2, dim=1)
            factor = ((self.max_grad_norm / scale) / (norms + 1e-6)).clamp(max=1.0 / scale)
        else:  # an empty Poisson batch: the update is the noise alone
            factor = flat[0].new_zeros(0)
        std = self.noise_multiplier * self.max_grad_norm / scale
        size = sum(g.shape[1] for g in flat)
        if std > 0:
            noise = torch.normal(0.0, std, size=(size,), generator=self.generator, dtype=flat[0].dtype)
        else:
            noise = flat[0].new_zeros(size)
        for p, g, update in zip(params, flat, noise.split([g.shape[1] for g in flat])):
            p.grad = update.addmv_(g.t(), factor).view_as(p)
            # Consumed: a second step() without a new backward pass raises, as in Opacus.
            p.grad_sample = None
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True
