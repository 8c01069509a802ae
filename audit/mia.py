"""Membership inference against a stored run's final model (record level).

Who is who
----------
- **Members**: the records the clients actually trained on (the union of every client's
  ``client_data(spec, pid).x_train``).
- **Non-members**: records from the same distribution that nobody trained on: the server
  test split plus every client's local validation split.
- The larger set is subsampled (seeded) to the size of the smaller one, so an attack that
  guesses at random has AUC 0.5 and the error counts of both kinds are comparable.

Attacks (score: higher = more likely a member)
----------------------------------------------
1. ``loss``: minus the cross-entropy of the true label (Yeom et al. 2018).
2. ``confidence``: the largest softmax probability (label-free; the probability of the
   true label would rank exactly as the loss attack does).
3. ``reference``: offline LiRA with a global variance (Carlini et al. 2022). ``K``
   reference models are trained on non-member records only, with the run's own recipe
   (:func:`train_federated`: same model, clients, rounds, local epochs, batch size, lr,
   optimizer, DP-SGD and client-level DP settings). References come in complementary
   pairs: reference ``2j`` trains on a seeded half ``H_j`` of the non-member pool and
   reference ``2j+1`` on the other half, so every non-member is OUT for exactly half of
   them. A record is scored only against references it was OUT of; members were OUT of
   every reference, and each member is given a random phantom half too, so members and
   non-members are compared against the same number of references (a fair null). With
   ``phi = log(p_y / (1 - p_y))`` (the logit-scaled confidence in the true label),
   ``score = (phi_target - mean_OUT phi_ref) / sigma``, ``sigma`` the pooled standard
   deviation of all OUT reference values (the "fixed variance" variant, robust with few
   references). A record with no OUT reference (only possible with ``K = 1``) is compared
   with the mean over all OUT values.

Evaluation
----------
Members and non-members are each split 50/50 (seeded) into a calibration half and a test
half. AUC, TPR at 1% and 0.1% FPR, advantage and the ROC are measured on the test half.
The epsilon lower bound (:func:`audit.empirical.mia_epsilon_lower_bound`) picks its
threshold on the calibration half and counts errors on the test half, with
Clopper-Pearson bounds. Reporting the best of several attacks is a multiple test, so each
attack's bound is computed at ``alpha / n_attacks`` (Bonferroni): the reported maximum
then holds at 95% confidence overall.

The reference models train with the clients' own function, :func:`shared.training.train_local`,
so the attack sees the same DP-SGD the federation ran; no federation is started.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from audit.empirical import mia_epsilon_lower_bound, mia_metrics
from shared.data import client_data
from shared.errors import BadInput
from shared.models import build_model
from shared.training import GRAD_SAMPLE_MODE, DPSettings, derived_seed, train_local

if TYPE_CHECKING:
    from audit.report import StoredRun

DEFAULT_REFERENCE_MODELS = 2
ATTACKS = ("loss", "confidence", "reference")
CONFIDENCE = 0.95
# Keeps log(p) and log(1 - p) finite for saturated softmax outputs.
_EPS_PROB = 1e-12


# --------------------------------------------------------------------------- recipe
@dataclass(frozen=True)
class Recipe:
    """How a run's model was trained: what a reference model must copy."""

    model: str
    num_features: int
    num_classes: int
    image_side: int | None = None
    clients: int = 1
    rounds: int = 1
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 0.5
    optimizer: str = "sgd"
    fraction: float = 1.0
    proximal_mu: float = 0.0
    dp: bool = False
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    client_dp: bool = False
    client_noise_multiplier: float = 1.0
    client_clip: float = 1.0
    client_sample_rate: float = 1.0
    # Canary clients count in the target run's fixed denominator q * (clients + canaries).
    canary_clients: int = 0

    @classmethod
    def from_run(cls, run: StoredRun) -> Recipe:
        c, info = run.config, run.model_info
        return cls(
            model=info["model"], num_features=info["num_features"], num_classes=info["num_classes"], image_side=info.get("image_side"),
            clients=c.clients, rounds=c.rounds, local_epochs=c.local_epochs, batch_size=c.batch_size, lr=c.lr, optimizer=c.optimizer,
            fraction=c.fraction, proximal_mu=c.proximal_mu if c.strategy == "fedprox" else 0.0,
            dp=c.dp, noise_multiplier=c.noise_multiplier, max_grad_norm=c.max_grad_norm,
            client_dp=c.client_dp, client_noise_multiplier=c.client_noise_multiplier, client_clip=c.client_clip,
            client_sample_rate=c.participation_rate, canary_clients=c.canary_clients,
        )


def _flat(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def train_federated(recipe: Recipe, x: np.ndarray, y: np.ndarray, seed: int = 0) -> nn.Module:
    """Simulate the run's federated recipe in-process (FedAvg over an IID partition).

    Each round the sampled clients run :func:`shared.training.train_local` from the
    global model; the server averages the updates weighted by example count, or, with
    client-level DP, clips each update to ``client_clip``, adds N(0, (z C)^2) to the sum
    and divides by ``q N`` (as ``server.client_dp`` does). FedProx keeps its proximal
    term; FedAdam and robust aggregators are approximated by FedAvg.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    if len(y) < 2:
        raise BadInput(f"a reference model needs at least 2 training records, got {len(y)}")
    rng = np.random.default_rng([seed, 0xFEDA])
    n_clients = max(1, min(recipe.clients, len(y) // 2))
    parts = np.array_split(rng.permutation(len(y)), n_clients)
    torch.manual_seed(seed)
    model = build_model(recipe.model, recipe.num_features, recipe.num_classes, recipe.image_side)
    dp = DPSettings(recipe.noise_multiplier, recipe.max_grad_norm) if recipe.dp else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for round_ in range(1, recipe.rounds + 1):
            if recipe.client_dp:
                chosen = [i for i in range(n_clients) if rng.random() < recipe.client_sample_rate]
            else:
                k = max(1, int(round(n_clients * recipe.fraction)))
                chosen = sorted(rng.choice(n_clients, size=k, replace=False).tolist())
            start = _flat(model)
            updates, weights = [], []
            for pid in chosen:
                local = copy.deepcopy(model)
                idx = parts[pid]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    train_local(
                        local, x[idx], y[idx], epochs=recipe.local_epochs, batch_size=recipe.batch_size, learning_rate=recipe.lr,
                        optimizer=recipe.optimizer, dp=dp, grad_sample_mode=GRAD_SAMPLE_MODE.get(recipe.model, "hooks"),
                        proximal_mu=recipe.proximal_mu, seed=derived_seed(seed, round_, pid),
                    )
                updates.append([p.detach() - s for p, s in zip(local.parameters(), start)])
                weights.append(len(idx))
            if recipe.client_dp:
                total = [torch.zeros_like(s) for s in start]
                for update in updates:
                    norm = float(torch.sqrt(sum((u.double() ** 2).sum() for u in update)))
                    factor = min(1.0, recipe.client_clip / norm) if norm > 0 else 1.0
                    total = [t + u * factor for t, u in zip(total, update)]
                gen = torch.Generator().manual_seed(seed * 7919 + round_)
                std = recipe.client_noise_multiplier * recipe.client_clip
                mean = [(t + std * torch.randn(t.shape, generator=gen)) / (recipe.client_sample_rate * (n_clients + recipe.canary_clients)) for t in total]
            elif updates:
                w = np.asarray(weights, dtype=float) / sum(weights)
                mean = [sum(float(wi) * u[j] for wi, u in zip(w, updates)) for j in range(len(start))]
            else:
                continue
            with torch.no_grad():
                for p, s, m in zip(model.parameters(), start, mean):
                    p.copy_(s + m)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model


# --------------------------------------------------------------------------- scores
@torch.no_grad()
def _logits(model: nn.Module, x: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    model.eval()
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = [model(torch.from_numpy(x[i : i + batch_size])).double().numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _true_class_log_probs(model: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(x):
        raise BadInput(f"y must be a 1-d array with one label per row of x ({len(x)}), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise BadInput(f"y must hold integer class ids, got dtype {y.dtype}")
    logp = _log_softmax(_logits(model, x))  # the cheap checks first, then the forward pass
    if len(y) and (y.min() < 0 or y.max() >= logp.shape[1]):
        raise BadInput(f"y holds labels outside the model's {logp.shape[1]} classes: {y.min()}..{y.max()}")
    return logp[np.arange(len(y)), y]


def loss_scores(model: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Minus the cross-entropy of the true label, per record (higher: more member-like).

    Parameters
    ----------
    model : torch.nn.Module
        The classifier under attack.
    x : ndarray of shape (n_records, n_features)
        Records, as the model takes them.
    y : ndarray of shape (n_records,)
        Their true class ids, in ``0 .. n_classes - 1``.

    Returns
    -------
    ndarray of shape (n_records,)
        ``log p_model(y_i | x_i)``.
    """
    return _true_class_log_probs(model, x, y)


def confidence_scores(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The largest softmax probability, per record (a label-free score).

    Parameters
    ----------
    model, x
        As for :func:`loss_scores`.

    Returns
    -------
    ndarray of shape (n_records,)
        ``max_c p_model(c | x_i)``.
    """
    return np.exp(_log_softmax(_logits(model, x)).max(axis=1))


def logit_confidence(model: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``log(p_y / (1 - p_y))``, computed stably from the logits (LiRA's statistic).

    Parameters
    ----------
    model, x, y
        As for :func:`loss_scores`.

    Returns
    -------
    ndarray of shape (n_records,)
        The logit-scaled confidence in the true label.
    """
    log_py = _true_class_log_probs(model, x, y)
    log_rest = np.log(np.clip(-np.expm1(log_py), _EPS_PROB, None))
    return log_py - log_rest


def reference_scores(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    is_member: np.ndarray,
    x_pool: np.ndarray,
    y_pool: np.ndarray,
    pool_index: np.ndarray,
    recipe: Recipe,
    reference_models: int,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Offline-LiRA scores of ``x`` (see the module docstring).

    ``x_pool``/``y_pool`` is the non-member pool the references are trained on;
    ``pool_index[i]`` is the pool position of record ``i`` when it is a non-member (-1 for
    members). Returns the scores and a few facts about the references.
    """
    k = int(reference_models)
    if k < 1:
        raise BadInput(f"reference_models must be >= 1, got {k}")
    rng = np.random.default_rng([seed, 0x11A])
    n_pool = len(y_pool)
    phi_target = logit_confidence(model, x, y)
    phi_refs = np.empty((k, len(y)))
    out = np.ones((k, len(y)), dtype=bool)  # out[j, i]: record i was not in reference j's training data
    # Phantom pool positions for members, so they use as many references as non-members.
    position = np.where(is_member, rng.integers(0, n_pool, size=len(y)), pool_index)
    half_masks = []
    for j in range(k):
        if j % 2 == 0:
            in_half = np.zeros(n_pool, dtype=bool)
            in_half[rng.permutation(n_pool)[: n_pool // 2]] = True
        else:
            in_half = ~half_masks[j - 1]
        half_masks.append(in_half)
        ref = train_federated(recipe, x_pool[in_half], y_pool[in_half], seed=seed * 101 + j + 1)
        phi_refs[j] = logit_confidence(ref, x, y)
        out[j] = ~in_half[position]
    pooled = phi_refs[out]
    sigma = float(np.std(pooled)) or 1.0
    counts = out.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_out = np.where(counts > 0, (phi_refs * out).sum(axis=0) / np.maximum(counts, 1), float(pooled.mean()))
    scores = (phi_target - mu_out) / sigma
    return scores, {"sigma": sigma, "out_references_per_record": float(counts.mean()), "training_records_per_reference": int(n_pool - n_pool // 2)}


# --------------------------------------------------------------------------- the attack
def _attack_result(scores: np.ndarray, is_member: np.ndarray, cal: np.ndarray, delta: float, alpha: float) -> dict[str, Any]:
    test = ~cal
    metrics = mia_metrics(scores[test & is_member], scores[test & ~is_member])
    bound = mia_epsilon_lower_bound(
        scores[cal & is_member], scores[cal & ~is_member], scores[test & is_member], scores[test & ~is_member], delta, alpha
    )
    return {**metrics, "epsilon_lower_bound": bound["epsilon_lower_bound"], "bound": bound}


def membership_inference(
    model: nn.Module,
    x_members: np.ndarray,
    y_members: np.ndarray,
    x_nonmembers: np.ndarray,
    y_nonmembers: np.ndarray,
    *,
    delta: float,
    recipe: Recipe | None = None,
    reference_models: int = DEFAULT_REFERENCE_MODELS,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """Run the loss, confidence and (with ``recipe`` and ``reference_models > 0``) reference attacks.

    Parameters
    ----------
    model : nn.Module
        The target model.
    x_members, y_members : arrays
        Records the model was trained on.
    x_nonmembers, y_nonmembers : arrays
        Records from the same distribution it was not trained on; they are also the
        reference models' training pool.
    delta : float
        The delta of the guarantee being tested (the run's delta; any small value, e.g.
        1e-5, for a non-private run).
    recipe : Recipe, optional
        How to train reference models; without it the reference attack is skipped.
    reference_models : int, default=2
        Number of reference models; 0 skips the reference attack.
    seed : int
        Seeds the balancing subsample, the calibration/test split and the references.
    confidence : float, default=0.95
        Overall confidence of ``empirical_epsilon_lower_bound`` (Bonferroni over attacks).

    Returns
    -------
    dict
        ``attacks`` (name -> metrics of :func:`audit.empirical.mia_metrics` plus
        ``epsilon_lower_bound`` and the ``bound`` details), ``mia_attack`` (the attack
        with the highest test AUC), ``mia_auc``, ``mia_tpr_at_1pct_fpr``,
        ``mia_tpr_at_0_1pct_fpr`` (of that attack), ``empirical_epsilon_lower_bound``
        (largest bound over attacks) and ``empirical_epsilon_attack``, ``members``,
        ``nonmembers`` (records used, each), ``reference_models``, ``delta``,
        ``confidence``, ``alpha_per_attack``, ``calibration_fraction``, ``method``.
    """
    if isinstance(reference_models, bool) or not isinstance(reference_models, (int, np.integer)) or reference_models < 0:
        raise BadInput(f"--reference-models must be an integer >= 0, got {reference_models!r}")
    x_m, y_m = np.asarray(x_members, dtype=np.float32), np.asarray(y_members, dtype=np.int64)
    x_n, y_n = np.asarray(x_nonmembers, dtype=np.float32), np.asarray(y_nonmembers, dtype=np.int64)
    n = min(len(y_m), len(y_n))
    if n < 4:
        raise BadInput(f"membership inference needs at least 4 members and 4 non-members, got {len(y_m)} and {len(y_n)}")
    rng = np.random.default_rng([seed, 0x31A])
    keep_m = np.sort(rng.choice(len(y_m), size=n, replace=False))
    keep_n = np.sort(rng.choice(len(y_n), size=n, replace=False))
    x = np.concatenate([x_m[keep_m], x_n[keep_n]])
    y = np.concatenate([y_m[keep_m], y_n[keep_n]])
    is_member = np.concatenate([np.ones(n, dtype=bool), np.zeros(n, dtype=bool)])
    # Calibration half of each group, chosen independently of the scores.
    cal = np.zeros(2 * n, dtype=bool)
    cal[rng.permutation(n)[: n // 2]] = True
    cal[n + rng.permutation(n)[: n // 2]] = True

    use_reference = recipe is not None and reference_models > 0
    names = ["loss", "confidence"] + (["reference"] if use_reference else [])
    alpha = (1.0 - confidence) / len(names)
    scores = {"loss": loss_scores(model, x, y), "confidence": confidence_scores(model, x)}
    info: dict[str, Any] = {}
    if use_reference:
        # The references train on the whole non-member pool (not just the balanced
        # subsample); pool_index maps the scored non-members into it.
        pool_index = np.concatenate([np.full(n, -1), keep_n])
        scores["reference"], info = reference_scores(model, x, y, is_member, x_n, y_n, pool_index, recipe, reference_models, seed)

    attacks = {name: _attack_result(scores[name], is_member, cal, delta, alpha) for name in names}
    if "reference" in attacks:
        attacks["reference"].update(info)
    best = max(names, key=lambda a: attacks[a]["auc"])
    bound_attack = max(names, key=lambda a: attacks[a]["epsilon_lower_bound"])
    return {
        "attacks": attacks,
        "mia_attack": best,
        "mia_auc": attacks[best]["auc"],
        "mia_tpr_at_1pct_fpr": attacks[best]["tpr_at_1pct_fpr"],
        "mia_tpr_at_0_1pct_fpr": attacks[best]["tpr_at_0_1pct_fpr"],
        "empirical_epsilon_lower_bound": attacks[bound_attack]["epsilon_lower_bound"],
        "empirical_epsilon_attack": bound_attack,
        "members": int(n),
        "nonmembers": int(n),
        "reference_models": int(reference_models) if use_reference else 0,
        "delta": float(delta),
        "confidence": float(confidence),
        "alpha_per_attack": float(alpha),
        "calibration_fraction": 0.5,
        "method": "loss: -cross-entropy; confidence: max softmax; reference: offline LiRA, global variance, OUT references only",
    }


def member_clients(run: StoredRun) -> list[int]:
    """The clients whose training records the final model was trained on.

    That is the clients whose update was accepted in at least one round (the audit log's
    ``participants``), less the malicious clients (their updates were not honest
    training on their records) and the nodes that trained on their own files (records
    the server's data spec does not hold). Counting a client that never took part as a
    member would make the model look more private than it is.
    """
    import json

    clients = set(range(run.config.clients))
    log = run.model_path.parent / "audit.jsonl"
    if log.exists():
        try:
            entries = [json.loads(line) for line in log.read_bytes().splitlines()]
            participants = {int(c) for e in entries if e["kind"] == "round" for c in e["payload"].get("participants", [])}
        except (ValueError, KeyError, TypeError, AttributeError):
            # Guessing the members instead would make the model look more private than it is.
            raise BadInput(f"the audit log {log} is damaged, so the members are unknown; check it with `fedaudit verify`") from None
        clients = participants & clients
    info = run.record.info
    return sorted(clients - set(info.get("malicious_clients", [])) - set(info.get("own_data_clients", [])))


def run_records(run: StoredRun) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A stored run's members (the training records of :func:`member_clients`) and
    non-members (server test split plus the validation splits of every client whose
    records the server's data spec holds)."""
    own_data = set(run.record.info.get("own_data_clients", []))
    parts = {pid: client_data(run.spec, pid) for pid in range(run.config.clients) if pid not in own_data}
    members = member_clients(run)
    data = run.data
    width = data.x_test.shape[1]
    x_m = np.concatenate([parts[p].x_train for p in members]) if members else np.zeros((0, width), np.float32)
    y_m = np.concatenate([parts[p].y_train for p in members]) if members else np.zeros(0, np.int64)
    x_n = np.concatenate([data.x_test, *[p.x_val for p in parts.values()]])
    y_n = np.concatenate([data.y_test, *[p.y_val for p in parts.values()]])
    return x_m, y_m, x_n, y_n


def audit_membership(run: StoredRun, delta: float | None, reference_models: int = DEFAULT_REFERENCE_MODELS) -> dict[str, Any]:
    """Membership inference against a stored run (see the module docstring).

    ``delta`` is the run's delta; a non-private run has none, and 1e-5 is used to state
    the bound (recorded in the result).
    """
    x_m, y_m, x_n, y_n = run_records(run)
    # Malicious clients' corrupted updates are not reproduced by the references.
    recipe = Recipe.from_run(run)
    result = membership_inference(
        run.model, x_m, y_m, x_n, y_n, delta=delta if delta else 1e-5, recipe=recipe,
        reference_models=reference_models, seed=run.config.seed,
    )
    return {**result, "member_clients": member_clients(run)}
