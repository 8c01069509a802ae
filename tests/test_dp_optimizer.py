"""The fused DP-SGD step gives Opacus's gradients, on every built-in model."""

import warnings

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader, TensorDataset

from shared.dp_optimizer import FusedDPOptimizer
from shared.models import MODELS, build_model
from shared.training import GRAD_SAMPLE_MODE, DPSettings, train_local

BATCH = 16


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((BATCH, 64), generator=g) * 2 - 1, torch.randint(0, 10, (BATCH,), generator=g)


def _private(name: str, mode: str, noise: float, clip: float, fused: bool, seed: int = 3, generator=None, reduction="sum"):
    """An Opacus-private model and optimizer: fedaudit's fused one over per-sample gradients
    of the summed loss (as shared.training trains), or Opacus's own with a mean loss."""
    reduction = reduction if fused else "mean"
    torch.manual_seed(seed)
    model = build_model(name, 64, 10, 8)
    x, y = _batch()
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp_model, opt, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            noise_multiplier=noise, max_grad_norm=clip, grad_sample_mode=mode, poisson_sampling=False, loss_reduction=reduction,
        )
    if fused:
        opt = FusedDPOptimizer.replacing(opt, expected_batch_size=opt.expected_batch_size, generator=generator)
    return model, dp_model, opt, reduction


def _gradient(name: str, mode: str, noise: float, clip: float, fused: bool, generator=None, reduction="sum") -> torch.Tensor:
    model, dp_model, opt, reduction = _private(name, mode, noise, clip, fused, generator=generator, reduction=reduction)
    x, y = _batch()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(dp_model(x), y, reduction=reduction).backward()
    assert opt.pre_step()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("clip", [1e-2, 1.0, 1e6])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fused_step_gives_opacus_gradient(name, clip, reduction):
    mode = GRAD_SAMPLE_MODE[name]
    ours = _gradient(name, mode, 0.0, clip, fused=True, reduction=reduction)
    theirs = _gradient(name, mode, 0.0, clip, fused=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    # The mean of clipped gradients has norm at most the clip bound.
    assert float(ours.norm()) <= clip * (1 + 1e-5)
    if clip == 1e-2:  # and clipping acts
        assert float(ours.norm()) < 0.5 * float(_gradient(name, mode, 0.0, 1e6, fused=True).norm())


def test_fused_step_matches_an_explicit_per_record_computation():
    torch.manual_seed(3)
    model = build_model("mlp", 64, 10, 8)
    x, y = _batch()
    per_record = []
    for i in range(BATCH):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        per_record.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    grads = torch.stack(per_record)
    clip = float(grads.norm(dim=1).median()) / 2
    expected = (grads * (clip / (grads.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)).sum(0) / BATCH
    torch.testing.assert_close(_gradient("mlp", "ew", 0.0, clip, fused=True), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_fused_noise_has_the_mechanisms_standard_deviation(name):
    noise, clip = 2.0, 0.5
    clean = _gradient(name, "ew", 0.0, clip, fused=True)
    draws = torch.stack([_gradient(name, "ew", noise, clip, fused=True, generator=torch.Generator().manual_seed(i)) - clean
                         for i in range(20)])
    want = noise * clip / BATCH
    assert draws.std().item() == pytest.approx(want, rel=0.05)
    assert abs(draws.mean().item()) < 0.05 * want
    # independent coordinates: no two parameters share a draw
    assert abs(np.corrcoef(draws[:, 0], draws[:, -1])[0, 1]) < 0.7


def test_an_empty_batch_is_a_noise_only_step_dividing_by_the_expected_batch_size():
    model, _, opt, _ = _private("logreg", "ew", 1.0, 1.0, fused=True)
    opt = FusedDPOptimizer.replacing(opt, expected_batch_size=7.5, generator=torch.Generator().manual_seed(0))
    opt.zero_grad()
    for p in model.parameters():
        p.grad_sample = torch.zeros((0, *p.shape))
    assert opt.pre_step()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert g.std().item() == pytest.approx(1.0 / 7.5, rel=0.1)


def test_a_second_step_without_a_backward_pass_raises_as_in_opacus():
    model, dp_model, opt, _ = _private("logreg", "ew", 1.0, 1.0, fused=True)
    x, y = _batch()
    torch.nn.functional.cross_entropy(dp_model(x), y, reduction="sum").backward()
    opt.step()
    with pytest.raises(ValueError, match="not initialized"):
        opt.step()


def test_steps_outside_the_fast_path_are_left_to_opacus(monkeypatch):
    calls = []
    monkeypatch.setattr(DPOptimizer, "pre_step", lambda self, closure=None: calls.append(1) or True)
    for setting in ("secure_mode", "skip"):
        model, dp_model, opt, _ = _private("logreg", "ew", 1.0, 1.0, fused=True)
        if setting == "secure_mode":
            opt.secure_mode = True
        else:
            opt.signal_skip_step(True)
        x, y = _batch()
        torch.nn.functional.cross_entropy(dp_model(x), y, reduction="sum").backward()
        opt.pre_step()
    assert len(calls) == 2


def test_training_divides_by_the_public_records_expected_batch_size_whatever_the_canaries():
    # 64 public records in batches of 16: q = 1/4, so the expected batch is 16 records,
    # with or without the 8 secret canaries after them. A zero learning rate keeps the model
    # fixed, so the recorded divisor is the only thing compared.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(72, 64)).astype(np.float32), rng.integers(0, 10, 72)
    seen = []
    original = FusedDPOptimizer.replacing.__func__

    def spy(cls, optimizer, *, expected_batch_size, generator):
        seen.append(expected_batch_size)
        return original(cls, optimizer, expected_batch_size=expected_batch_size, generator=generator)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FusedDPOptimizer, "replacing", classmethod(spy))
        for records in (64, 72):
            train_local(build_model("logreg", 64, 10), x[:records], y[:records], epochs=1, batch_size=16, learning_rate=0.0,
                        dp=DPSettings(1.0, 1.0), grad_sample_mode="ew", public_records=64)
    assert seen == [16.0, 16.0]
