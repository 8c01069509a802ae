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

:class:`BookkeepingDPOptimizer` goes one step further for models whose only trainable
layers are ``nn.Linear`` (logreg and the MLP). Expanded weights and hooks build every
record's B x out x in weight gradient, which the non-private step never does, and on
the MLP that was most of the remaining cost. For a linear layer fed one row per record,
record i's weight gradient is the outer product g_i a_i^T of its output gradient and
its input, so its norm is ||g_i|| ||a_i|| (the identity behind Opacus's ghost clipping,
``opacus.grad_sample.linear.compute_linear_norm_sample``), and the sum of the clipped
gradients is one matrix product, (c * g)^T a. :class:`LinearInputsAndGradients` records
a and g with hooks during the ordinary forward and backward pass, so one backward pass
is enough (ghost clipping takes two). This is the book-keeping algorithm of Bu et al.,
"Differentially private optimization on large model at small cost" (ICML 2023). The
clip factor, noise and mean are the fused optimizer's.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from opacus.optimizers.optimizer import DPOptimizer
from torch import nn


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
        if len(flat[0]):
            factor = self._clip_factor(torch.stack([torch.linalg.vector_norm(g, dim=1) for g in flat], dim=1).norm(2, dim=1))
        else:  # an empty Poisson batch: the update is the noise alone
            factor = flat[0].new_zeros(0)
        noise = self._noise(sum(g.shape[1] for g in flat), flat[0].dtype)
        for p, g, update in zip(params, flat, noise.split([g.shape[1] for g in flat])):
            p.grad = update.addmv_(g.t(), factor).view_as(p)
            # Consumed: a second step() without a new backward pass raises, as in Opacus.
            p.grad_sample = None
        return self._stepped()

    def _mean_divisor(self) -> float:
        return self.expected_batch_size if self.loss_reduction == "mean" else 1.0

    def _clip_factor(self, norms: torch.Tensor) -> torch.Tensor:
        """Opacus's per-record factor min(1, C / (norm + 1e-6)), with the mean's
        division folded in."""
        scale = self._mean_divisor()
        return ((self.max_grad_norm / scale) / (norms + 1e-6)).clamp(max=1.0 / scale)

    def _noise(self, size: int, dtype: torch.dtype) -> torch.Tensor:
        """One draw of N(0, (sigma C)^2) for every coordinate, divided as the mean is."""
        std = self.noise_multiplier * self.max_grad_norm / self._mean_divisor()
        if std > 0:
            return torch.normal(0.0, std, size=(size,), generator=self.generator, dtype=dtype)
        return torch.zeros(size, dtype=dtype)

    def _stepped(self) -> bool:
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True


# Leaf modules that act on each record alone and hold no parameters: with them around the
# linear layers, record i's gradient is exactly what its own input and output gradient give.
RECORDWISE_LEAVES = (nn.Flatten, nn.Identity, nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU)


def supports_bookkeeping(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` is the own, trainable weight or bias of one
    linear layer, and every other leaf module is one of :data:`RECORDWISE_LEAVES` that
    keeps one row per record."""
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    linear = [m for m in leaves if isinstance(m, nn.Linear)]
    owned = [p for m in linear for p in m.parameters(recurse=False)]
    return (
        bool(linear)
        and all(isinstance(m, RECORDWISE_LEAVES) for m in leaves if not isinstance(m, nn.Linear))
        # Flatten(start_dim=0) would turn one record into several rows, each clipped alone.
        and all(m.start_dim >= 1 for m in leaves if isinstance(m, nn.Flatten))
        # A parametrised or weight-normed layer computes its weight from other tensors.
        and all(set(dict(m.named_parameters(recurse=False))) <= {"weight", "bias"} and not hasattr(m, "parametrizations") for m in linear)
        # A weight shared between layers gets gradients from both: its norm is no longer one layer's.
        and len({id(p) for p in owned}) == len(owned)
        and {id(p) for p in model.parameters()} == {id(p) for p in owned}
        and all(p.requires_grad for p in owned)
    )


class LinearInputsAndGradients:
    """Each ``nn.Linear`` layer's input and output gradient in one training step, from hooks.

    ``loss_reduction`` says how the loss that is backpropagated combines the records:
    ``"sum"`` gives each record's own output gradient, ``"mean"`` that divided by the batch
    size, which is undone here (as Opacus's ``GradSampleModule`` does). Passing the wrong
    one would scale every norm, so it must match the loss.

    Raises ``RuntimeError`` where the per-record norms would not be exact: a layer called
    twice in one step, an input that is not one row per record, or a second backward pass.
    """

    def __init__(self, model: nn.Module, *, loss_reduction: str = "sum"):
        if not supports_bookkeeping(model):
            raise ValueError("book-keeping needs a model whose only trainable layers are nn.Linear, among record-wise modules")
        if loss_reduction not in ("sum", "mean"):
            raise ValueError(f"loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self._inputs: dict[nn.Linear, torch.Tensor] = {}
        self._gradients: dict[nn.Linear, torch.Tensor] = {}
        self._records: int | None = None
        # The model's own input gives the number of records: every layer must see one row each.
        self._handles = [model.register_forward_pre_hook(self._record_batch)]
        self._handles += [layer.register_forward_hook(self._record_input) for layer in self.layers]

    @property
    def pending(self) -> bool:
        """Whether a forward pass has been recorded since the last :meth:`take`."""
        return bool(self._inputs)

    def _record_batch(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if torch.is_grad_enabled():
            self._records = len(inputs[0])

    def _record_input(self, layer: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return  # evaluation: nothing will be backpropagated
        if layer in self._inputs:
            raise RuntimeError("a linear layer ran twice in one step; book-keeping needs one call per layer per step")
        if inputs[0].dim() != 2 or len(inputs[0]) != self._records:
            raise RuntimeError(f"book-keeping needs one input row per record ({self._records} records), "
                               f"got an input of shape {tuple(inputs[0].shape)}")
        self._inputs[layer] = inputs[0].detach()
        output.register_hook(partial(self._record_gradient, layer))

    def _record_gradient(self, layer: nn.Linear, gradient: torch.Tensor) -> None:
        if layer in self._gradients:
            raise RuntimeError("two backward passes in one step; book-keeping does not accumulate gradients")
        self._gradients[layer] = gradient.detach() * len(gradient) if self.loss_reduction == "mean" else gradient.detach()

    def take(self) -> list[tuple[nn.Linear, torch.Tensor, torch.Tensor]]:
        """(layer, inputs, output gradients) for every layer of the recorded step, and forget them."""
        try:
            missing = [layer for layer in self.layers if layer not in self._gradients]
            if missing:
                raise RuntimeError(f"{len(missing)} linear layer(s) got no gradient in this step; call backward() before step()")
            return [(layer, self._inputs[layer], self._gradients[layer]) for layer in self.layers]
        finally:
            self.clear()

    def clear(self) -> None:
        self._inputs.clear()
        self._gradients.clear()

    def close(self) -> None:
        """Remove the hooks: the model is a plain module again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()


class BookkeepingDPOptimizer(FusedDPOptimizer):
    """The fused optimizer, with per-record norms and clipped sums from each linear layer's
    inputs and output gradients instead of per-sample gradients.

    ``recorder`` must cover exactly the optimizer's parameters. A step with nothing
    recorded (an empty Poisson batch given as zero-length ``p.grad_sample``) is the fused
    optimizer's. The mean divides by ``expected_batch_size``; secure-mode noise is not
    offered.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, recorder: LinearInputsAndGradients, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: float, generator: torch.Generator | None = None):
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction="mean", generator=generator)
        recorded = [p for layer in recorder.layers for p in layer.parameters()]
        if {id(p) for p in recorded} != {id(p) for p in self.params} or len(recorded) != len(self.params):
            # Any parameter left out would step on its raw, unclipped gradient.
            raise ValueError("the recorder's linear layers must hold exactly the optimizer's parameters")
        self.recorder = recorder
        for p in self.params:  # as GradSampleModule leaves them, for the fused and Opacus paths
            p.grad_sample = None
            p.summed_grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.recorder.clear()
        super().zero_grad(set_to_none)

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        if not self.recorder.pending:
            return super().pre_step(closure)
        if self._step_skip_queue:
            raise RuntimeError("book-keeping does not skip steps")
        records = [(layer, inputs.to(grads.dtype), grads) for layer, inputs, grads in self.recorder.take()]
        squared = None
        for layer, inputs, grads in records:
            # ||g a^T||^2 = ||g||^2 ||a||^2, and the bias's gradient is g itself.
            per_record = grads.square().sum(1) * (inputs.square().sum(1) + (layer.bias is not None))
            squared = per_record if squared is None else squared + per_record
        factor = self._clip_factor(squared.sqrt())
        params = self.params
        noise = self._noise(sum(p.numel() for p in params), params[0].dtype)
        update = dict(zip(map(id, params), noise.split([p.numel() for p in params])))
        for layer, inputs, grads in records:
            weight = layer.weight
            # Replaces the unclipped gradient autograd accumulated.
            weight.grad = update[id(weight)].view_as(weight).addmm_((grads * factor[:, None]).t(), inputs)
            if layer.bias is not None:
                layer.bias.grad = update[id(layer.bias)].addmv_(grads.t(), factor)
        return self._stepped()
