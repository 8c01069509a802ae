"""The fused and book-keeping DP-SGD steps give Opacus's gradients on the built-in models."""

import warnings

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader, TensorDataset

from shared.dp_optimizer import (
    BookkeepingDPOptimizer,
    FusedDPOptimizer,
    LinearInputsAndGradients,
    supports_bookkeeping,
)
from shared.models import MODELS, build_model
from shared.training import BOOKKEEPING, GRAD_SAMPLE_MODE, DPSettings, train_local

LINEAR_MODELS = [name for name in MODELS if GRAD_SAMPLE_MODE[name] == BOOKKEEPING]

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
    mode = "ew"
    ours = _gradient(name, mode, 0.0, clip, fused=True, reduction=reduction)
    theirs = _gradient(name, mode, 0.0, clip, fused=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    # The mean of clipped gradients has norm at most the clip bound.
    assert float(ours.norm()) <= clip * (1 + 1e-5)
    if clip == 1e-2:  # and clipping acts
        assert float(ours.norm()) < 0.5 * float(_gradient(name, mode, 0.0, 1e6, fused=True).norm())


def _explicitly_clipped_mean():
    """The mlp's mean of per-record clipped gradients at half the median norm, one record at a time."""
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
    return clip, expected


def test_fused_step_matches_an_explicit_per_record_computation():
    clip, expected = _explicitly_clipped_mean()
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


@pytest.mark.parametrize("mode", ["ew", BOOKKEEPING])
def test_training_divides_by_the_public_records_expected_batch_size_whatever_the_canaries(mode):
    # 64 public records in batches of 16: q = 1/4, so the expected batch is 16 records,
    # with or without the 8 secret canaries after them. A zero learning rate keeps the model
    # fixed, so the recorded divisor is the only thing compared.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(72, 64)).astype(np.float32), rng.integers(0, 10, 72)
    seen = []

    def spy(self, *args, **kwargs):
        seen.append(kwargs["expected_batch_size"])
        DPOptimizer.__init__(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FusedDPOptimizer, "__init__", spy)
        for records in (64, 72):
            train_local(build_model("logreg", 64, 10), x[:records], y[:records], epochs=1, batch_size=16, learning_rate=0.0,
                        dp=DPSettings(1.0, 1.0), grad_sample_mode=mode, public_records=64)
    assert seen == [16.0, 16.0]


# ----------------------------------------------------------------- book-keeping


def _bookkeeping(name: str, noise: float, clip: float, generator=None, reduction="sum", seed: int = 3, expected_batch_size=BATCH):
    torch.manual_seed(seed)
    model = build_model(name, 64, 10, 8)
    recorder = LinearInputsAndGradients(model, loss_reduction=reduction)
    opt = BookkeepingDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), recorder=recorder, noise_multiplier=noise,
                                 max_grad_norm=clip, expected_batch_size=expected_batch_size, generator=generator)
    return model, opt


def _bookkeeping_gradient(name: str, noise: float, clip: float, generator=None, reduction="sum") -> torch.Tensor:
    model, opt = _bookkeeping(name, noise, clip, generator, reduction)
    x, y = _batch()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y, reduction=reduction).backward()
    assert opt.pre_step()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_the_linear_models_train_with_bookkeeping_and_the_cnn_does_not():
    assert LINEAR_MODELS == ["logreg", "mlp"]
    assert not supports_bookkeeping(build_model("cnn", 64, 10, 8))
    with pytest.raises(ValueError, match="nn.Linear"):
        LinearInputsAndGradients(build_model("cnn", 64, 10, 8))
    nn = torch.nn
    assert supports_bookkeeping(nn.Sequential(nn.Flatten(), nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 2)))
    # A module that could mix records or split one into several rows is refused...
    assert not supports_bookkeeping(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    assert not supports_bookkeeping(nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=0)))
    assert not supports_bookkeeping(nn.Sequential(nn.Flatten(0, 1), nn.Linear(4, 4)))
    # ...and so is any parameter that is not one linear layer's own trainable weight or bias.
    stray = nn.Sequential(nn.Linear(4, 4))
    stray.scale = nn.Parameter(torch.ones(4))
    frozen = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    frozen[0].weight.requires_grad_(False)
    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight_norm's deprecation
        normed = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(4, 4)))
    parametrized = nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)))
    for model in (stray, frozen, tied, normed, parametrized):
        assert not supports_bookkeeping(model), model


@pytest.mark.parametrize("name", LINEAR_MODELS)
@pytest.mark.parametrize("clip", [1e-2, 1.0, 1e6])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_bookkeeping_gives_opacus_gradient(name, clip, reduction):
    ours = _bookkeeping_gradient(name, 0.0, clip, reduction=reduction)
    theirs = _gradient(name, "ew", 0.0, clip, fused=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert float(ours.norm()) <= clip * (1 + 1e-5)


def test_bookkeeping_matches_an_explicit_per_record_computation():
    clip, expected = _explicitly_clipped_mean()
    torch.testing.assert_close(_bookkeeping_gradient("mlp", 0.0, clip), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", LINEAR_MODELS)
def test_bookkeeping_noise_is_the_fused_optimizers_draw(name):
    # The same generator state gives the same noise coordinate for coordinate, so the
    # fused optimizer's standard-deviation test covers book-keeping too.
    for seed in (0, 1):
        ours = _bookkeeping_gradient(name, 2.0, 0.5, generator=torch.Generator().manual_seed(seed))
        fused = _gradient(name, "ew", 2.0, 0.5, fused=True, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(ours, fused, rtol=1e-4, atol=1e-6)
    clean = _bookkeeping_gradient(name, 0.0, 0.5)
    assert (ours - clean).std().item() == pytest.approx(2.0 * 0.5 / BATCH, rel=0.1)


def test_bookkeeping_on_an_empty_batch_is_a_noise_only_step():
    model, opt = _bookkeeping("mlp", 1.0, 1.0, generator=torch.Generator().manual_seed(0), expected_batch_size=7.5)
    opt.zero_grad()
    for p in model.parameters():
        p.grad_sample = torch.zeros((0, *p.shape))
    assert opt.pre_step()
    assert torch.cat([p.grad.reshape(-1) for p in model.parameters()]).std().item() == pytest.approx(1.0 / 7.5, rel=0.1)


def test_bookkeeping_refuses_what_would_make_its_norms_wrong():
    model, opt = _bookkeeping("mlp", 1.0, 1.0)
    x, y = _batch()
    torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    opt.step()
    with pytest.raises(ValueError, match="not initialized"):  # a second step without a backward pass
        opt.step()
    opt.zero_grad()
    model(x)
    with pytest.raises(RuntimeError, match="no gradient"):  # a forward pass without a backward pass
        opt.step()
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="twice"):  # a layer used twice in one step
        model(torch.cat([x, model.net[1](x)], 1)[:, :64])
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="one input row per record"):
        model.net[1](x.reshape(BATCH, 1, 64))
    opt.zero_grad()

    class SplitsRecords(torch.nn.Module):  # two rows per record, each of which would be clipped alone
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(32, 10)

        def forward(self, x):
            return self.linear(x.reshape(2 * len(x), 32))

    LinearInputsAndGradients(split := SplitsRecords())
    with pytest.raises(RuntimeError, match=r"one input row per record \(16 records\), got an input of shape \(32, 32\)"):
        split(x)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="two backward passes"):
        loss.backward()
    # Every parameter the optimizer steps must be one the recorder clips.
    extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="exactly the optimizer's parameters"):
        BookkeepingDPOptimizer(torch.optim.SGD([*model.parameters(), extra], lr=0.1), recorder=opt.recorder,
                               noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=BATCH)


def test_evaluation_under_no_grad_records_nothing():
    model, opt = _bookkeeping("logreg", 1.0, 1.0)
    with torch.no_grad():
        model(_batch()[0])
    assert not opt.recorder.pending


@pytest.mark.parametrize("name", LINEAR_MODELS)
@pytest.mark.parametrize("clip", [0.5, 100.0])  # every record clipped; most not
def test_training_with_bookkeeping_gives_the_weights_expanded_weights_give(name, clip):
    # Same seed: same Poisson batches, same noise, so the same model after two epochs,
    # empty batches included (q = 1/16 over 20 records makes them likely).
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 64)).astype(np.float32), rng.integers(0, 10, 20)

    def trained(mode):
        torch.manual_seed(0)
        model = build_model(name, 64, 10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = train_local(model, x, y, epochs=2, batch_size=2, learning_rate=0.5, dp=DPSettings(0.7, clip),
                                 grad_sample_mode=mode, seed=9, proximal_mu=0.1)
        return model, result

    model, result = trained(BOOKKEEPING)
    reference, expected = trained("ew")
    assert result.steps == expected.steps == 20 and result.sample_rate == expected.sample_rate
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                               torch.cat([p.detach().reshape(-1) for p in reference.parameters()]), rtol=1e-4, atol=1e-5)
    # Training removed its hooks: the caller's model is a plain module again.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_training_uses_the_step_the_benchmark_recorded_as_fastest():
    from bench import dp_step

    assert dp_step.BOOKKEEPING == BOOKKEEPING
    assert {name: mode.removesuffix(dp_step.FUSED) for name, mode in dp_step.fastest_modes().items()} == GRAD_SAMPLE_MODE


def test_training_removes_its_hooks_when_it_fails():
    model = build_model("mlp", 64, 10)
    x, y = np.zeros((20, 64), dtype=np.float32), np.full(20, 99)  # label 99 of 10 classes
    with pytest.raises(IndexError):
        train_local(model, x, y, epochs=1, batch_size=5, learning_rate=0.1, dp=DPSettings(1.0, 1.0), grad_sample_mode=BOOKKEEPING, seed=0)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_the_client_app_starts_without_importing_opacus():
    # Every simulation actor imports the ClientApp; Opacus (about 2 s) waits for a private step.
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, clients.app; print('opacus' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr[-2000:]
