"""Local training and evaluation on one client's records."""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shared.planner import batches_per_epoch

OPTIMIZERS = ("sgd", "adam")

# The name of the book-keeping step beside Opacus's modes. Opacus itself is imported only
# when a private step is built: importing it here cost every ClientApp start about 2 s.
BOOKKEEPING = "bookkeeping"
# Fastest correct DP-SGD step per built-in model, measured by `python -m bench.dp_step`:
# book-keeping (shared/dp_optimizer.py) where every trainable layer is linear, and
# Opacus's expanded weights with the fused optimizer for the cnn's convolutions.
GRAD_SAMPLE_MODE = {"logreg": BOOKKEEPING, "mlp": BOOKKEEPING, "cnn": "ew"}


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float


@dataclass
class TrainResult:
    loss: float
    num_examples: int
    steps: int
    sample_rate: float  # Poisson sampling rate actually used (0 without DP)


def _optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def _proximal_term(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    return sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))


def derived_seed(run_seed: int, round_: int, client: int) -> int:
    """A distinct, reproducible training seed per (run seed, round, client)."""
    return run_seed * 1_000_003 + round_ * 10_007 + client


def _step(opt, model: nn.Module, anchor: list[torch.Tensor] | None, proximal_mu: float, private: bool) -> None:
    """One optimizer step; under DP, FedProx's proximal gradient is added after Opacus.

    Opacus builds ``p.grad`` from per-sample gradients only, so a proximal term in the
    loss would be dropped. Its gradient mu (w - w0) depends on no record, so adding it
    to the clipped, noised gradient costs no privacy and gives the same update rule as
    the non-private loss term.
    """
    if anchor is None or not private:
        opt.step()
        return
    if opt.pre_step():
        with torch.no_grad():
            for p, a in zip(model.parameters(), anchor):
                p.grad.add_(p - a, alpha=proximal_mu)
        opt.original_optimizer.step()


def poisson_loader(dataset: TensorDataset, num_batches: int, generator: torch.Generator) -> DataLoader:
    """Poisson sampling at q = 1/num_batches, for exactly ``num_batches`` steps an epoch.

    Opacus's ``DPDataLoader`` does two things the ledger must not inherit. It runs
    int(1/q) batches, one short of 1/q for some q (int(1/(1/93)) = 92), so a planned
    epoch and a trained one differed. And it compares float32 uniforms with q, which
    includes each record with probability ceil(float32(q) 2^24)/2^24: above q (by 4.9e-8
    at q = 1/93), so a ledger holding q would under-state epsilon. Uniforms in float64
    are multiples of 2^-53, so the inclusion probability exceeds q by less than 2^-53.
    Empty batches come out as zero-length tensors, collated the way Opacus does it.
    """
    from opacus.data_loader import DPDataLoader
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    class FloatSixtyFourSampler(UniformWithReplacementSampler):
        def __iter__(self):
            for _ in range(self.steps):
                draws = torch.rand(self.num_samples, generator=self.generator, dtype=torch.float64)
                yield (draws < self.sample_rate).nonzero(as_tuple=False).reshape(-1).tolist()

    sample_rate = 1.0 / num_batches
    sampler = FloatSixtyFourSampler(num_samples=len(dataset), sample_rate=sample_rate, generator=generator, steps=num_batches)
    # Only its collate function is used: it turns an empty batch into zero-length tensors.
    collate = DPDataLoader(dataset, sample_rate=sample_rate).collate_fn
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    loader.sample_rate = sample_rate
    return loader


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    optimizer: str = "sgd",
    dp: DPSettings | None = None,
    grad_sample_mode: str = "hooks",
    proximal_mu: float = 0.0,
    seed: int | None = 0,
    public_records: int | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` passes over the local records.

    In private mode the data loader samples each record independently with
    probability ``q = 1 / ceil(n / batch_size)`` (Poisson sampling, which the
    accountant assumes), gradients are clipped per sample and noised by Opacus.

    ``public_records`` (default: all of them) is how many leading records the rest of
    the federation may know about; the records after them are secret audit canaries.
    ``n`` in ``q`` and the step count, and the reported loss, use only the public ones,
    so neither the ledger nor the loss moves with the canaries. Sampling every record
    with that ``q`` is still exactly the mechanism the ledger accounts for: Poisson
    sampling's guarantee depends on ``q``, not on how many records are sampled.

    ``seed`` drives the shuffling or Poisson batches and the noise; ``None`` draws a
    fresh seed from OS entropy, which private training needs unless reproducibility
    was asked for (see :func:`clients.app.training_seed`).
    """
    if seed is None:
        # Fresh OS entropy: the noise and the sampled batches stay unknown to anyone
        # who knows the run's config. torch's generator is not a CSPRNG (see README).
        seed = secrets.randbits(63)
    # The CPU generator is the only one training draws from. torch.manual_seed would
    # also queue a lazy CUDA seeding with a formatted stack trace: ~0.5 ms a call at a
    # Ray actor's stack depth, on every message.
    torch.default_generator.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    public = len(y) if public_records is None else int(public_records)
    if not 0 < public <= len(y):
        raise ValueError(f"public_records must be in 1..{len(y)}, got {public}")
    counted = torch.arange(len(y)) < public
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y), counted)
    opt = _optimizer(optimizer, model.parameters(), learning_rate)
    criterion = nn.CrossEntropyLoss(reduction="none")
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    sample_rate = 0.0
    train_model: nn.Module = model

    recorder = None
    if dp is None:
        # drop_last: a ragged final batch of one or two records made whole-federation
        # accuracy swing by 10+ points between rounds.
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, drop_last=True)
    else:
        from opacus import PrivacyEngine

        from shared.dp_optimizer import BookkeepingDPOptimizer, FusedDPOptimizer, LinearInputsAndGradients

        # Our own Poisson loader, so that q comes from the public record count.
        num_batches = batches_per_epoch(public, batch_size)
        loader = poisson_loader(dataset, num_batches, generator)
        sample_rate = float(loader.sample_rate)
        # The mean divides by the expected batch size of the public records, n q:
        # Opacus's int(len(dataset) q) would move with the number of canaries included.
        expected_batch_size = public / num_batches

        if grad_sample_mode == BOOKKEEPING:
            # Per-record norms and clipped sums from each linear layer's inputs and output
            # gradients, with the summed loss below (shared/dp_optimizer.py).
            recorder = LinearInputsAndGradients(model, loss_reduction="sum")
            try:
                opt = BookkeepingDPOptimizer(opt, recorder=recorder, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                                             expected_batch_size=expected_batch_size, generator=generator)
            except BaseException:
                recorder.close()
                raise
        else:
            # The engine's own accountant is unused: the client's ledger in Context.state
            # is the single source of truth, and it spans every round.
            engine = PrivacyEngine(accountant="prv", secure_mode=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train_model, opt, loader = engine.make_private(
                    module=model,
                    optimizer=opt,
                    data_loader=loader,
                    noise_multiplier=dp.noise_multiplier,
                    max_grad_norm=dp.max_grad_norm,
                    # The loader above already samples each record with probability q.
                    poisson_sampling=False,
                    # Per-sample gradients of the summed loss; the optimizer takes the mean.
                    loss_reduction="sum",
                    grad_sample_mode=grad_sample_mode,
                    noise_generator=generator,
                )
            # The same mechanism in fewer operations (shared/dp_optimizer.py).
            opt = FusedDPOptimizer.replacing(opt, expected_batch_size=expected_batch_size, generator=generator)

    train_model.train()
    steps, loss_sum, seen = 0, 0.0, 0
    try:
        for _ in range(epochs):
            for xb, yb, counted_b in loader:
                opt.zero_grad(set_to_none=True)
                if len(yb) == 0:
                    # An empty Poisson batch is still a step of the mechanism: the update
                    # is pure noise, and the ledger must count it. Expanded-weights mode
                    # cannot run a forward pass on zero records, so give Opacus the empty
                    # per-sample gradients directly.
                    for p in model.parameters():
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                    _step(opt, model, anchor, proximal_mu, private=True)
                    steps += 1
                    continue
                per_record = criterion(train_model(xb), yb)
                loss = per_record.mean() if dp is None else per_record.sum()
                if anchor is not None and dp is None:
                    loss = loss + proximal_mu / 2 * _proximal_term(model, anchor)
                loss.backward()
                _step(opt, model, anchor, proximal_mu, private=dp is not None)
                steps += 1
                loss_sum += float(per_record.detach()[counted_b].sum())
                seen += int(counted_b.sum())
    finally:
        # Detach the hooks so the caller's model is a plain module again.
        if recorder is not None:
            recorder.close()
        if hasattr(train_model, "_close"):
            train_model._close()
    return TrainResult(loss=loss_sum / max(seen, 1), num_examples=public, steps=steps, sample_rate=sample_rate)
