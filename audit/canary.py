"""Canary audits of a stored run: one-run sample-level, and one-shot client-level.

Sample level (Steinke, Nasr and Jagielski 2023)
------------------------------------------------
``fedaudit run --canaries M`` trains with M mislabelled held-out records, each included
with probability 1/2 (see :mod:`shared.canaries`). Each canary is scored on the final
model with LiRA's statistic ``log(p / (1 - p))`` of its (wrong) canary label: a model
that memorised a canary gives it a high score. The guesses are "in" for the ``k+``
highest scores and "out" for the ``k-`` lowest. By default ``k+ = k- = 10%`` of M, fixed
before the scores are seen, so the bound holds at 95% confidence; ``scan=True`` tries a
grid and reports the best, which is then flagged as scanned (no longer a valid bound).

The bound is compared with the theoretical epsilon that covers every canary: each
canary would have gone to a uniformly random client, so the relevant guarantee is the
largest sample-level epsilon over *all* clients (an excluded canary's would-be holder is
any of them). With only client-level DP, the client-level epsilon covers each record.

Client level (Andrew et al. 2023)
---------------------------------
``--canary-clients M`` adds M clients whose update is ``C * u_j`` for a secret random
unit direction ``u_j``. The audit measures the cosine between the final model's total
change (final minus initial global model) and each inserted ``u_j``, and the cosines of
directions drawn the same way but never sent (unobserved). Gaussians fitted to both give
the epsilon estimate. The headline fits one pooled variance (the mean shift in units of
the spread); the paper's fit of each group's own variance is shown beside it. With few
canary clients and Poisson participation (a canary's number of rounds varies, widening
its cosines a little) the separate fit turns that variance gap into tail divergence at
small delta: measured 25.5 and 33.8 (two runs) against an accountant's 15.1 with 10
canary clients, where the pooled fit gave 11.4. It is an estimate, not a bound, and is
reported next to the client-level theoretical epsilon.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from audit.empirical import gaussian_epsilon_from_cosines, one_run_audit
from audit.mia import logit_confidence
from shared import privacy
from shared.canaries import SECRET_FILE, flat_direction, load_secret
from shared.errors import BadInput
from shared.models import initial_model

if TYPE_CHECKING:
    from audit.report import StoredRun
    from shared.store import RunStore

# Unobserved canary directions drawn for the client-level estimate: free to draw, and
# the more there are, the tighter the fitted null distribution.
DEFAULT_UNOBSERVED = 1000
HISTOGRAM_BINS = 20


def _histogram(groups: dict[str, np.ndarray], bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Counts of each group over shared bin edges (for the report's histogram)."""
    values = np.concatenate([v for v in groups.values() if v.size])
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    return {"edges": edges.tolist(), **{name: np.histogram(v, bins=edges)[0].astype(int).tolist() for name, v in groups.items()}}


def record_level_epsilon(run: StoredRun, store: RunStore, delta: float | None) -> tuple[float | None, str | None]:
    """The theoretical epsilon protecting any one training record, and where it comes from.

    Sample-level DP: the largest epsilon over every client's whole ledger (in-flight spend
    included). Client-level DP only: the client-level epsilon, since a record's change is
    within one client's. None for a non-private run.
    """
    if not delta:
        return None, None
    if run.config.dp:
        ledgers = store.ledger_with_interrupted(run.run_id)
        return max((privacy.epsilon(ledger, delta) for ledger in ledgers.values()), default=0.0), "sample-level DP, largest over all clients"
    client_level = _client_level_epsilon(store, run.run_id)
    return client_level, ("client-level DP" if client_level is not None else None)


def _client_level_epsilon(store: RunStore, run_id: str) -> float | None:
    return store.client_epsilons(run_id)[0]


def sample_canary_audit(
    run: StoredRun,
    store: RunStore,
    delta: float | None,
    k_plus: int | None = None,
    k_minus: int | None = None,
    scan: bool = False,
) -> dict[str, Any] | None:
    """The one-run canary audit of a run trained with ``--canaries``; None without canaries.

    ``scan`` tries a grid of (k+, k-) instead of the fixed guesses (see
    :func:`sample_canary_audits`, which gives both from one scoring).

    Returns
    -------
    dict or None
        ``m``, ``r``, ``v``, ``epsilon_lower_bound``, ``k_plus``, ``k_minus``,
        ``scanned``, ``valid`` (a bound at ``confidence``: not scanned), ``delta``,
        ``confidence``, ``theoretical_epsilon`` (see :func:`record_level_epsilon`; None
        for a non-private run) and ``theoretical_source``, ``holders``,
        ``included``, ``score``, ``histogram``.
    """
    audits = sample_canary_audits(run, store, delta, k_plus, k_minus, scans=(scan,))
    return audits[0] if audits else None


def sample_canary_audits(
    run: StoredRun,
    store: RunStore,
    delta: float | None,
    k_plus: int | None = None,
    k_minus: int | None = None,
    scans: tuple[bool, ...] = (False,),
) -> list[dict[str, Any]] | None:
    """:func:`sample_canary_audit` once per entry of ``scans``, the canaries scored once."""
    m = run.config.canaries
    if not m:
        return None
    secret = load_secret(store.run_dir(run.run_id) / SECRET_FILE)
    data = run.data
    if secret.m != m or data.canary_x is None:
        raise BadInput(f"run {run.run_id}: the canary secret holds {secret.m} canaries but the run was configured with {m}")
    scores = logit_confidence(run.model, data.canary_x, data.canary_y)
    included = np.asarray(secret.included, dtype=bool)
    stated_delta = delta if delta else 1e-5
    theoretical, source = record_level_epsilon(run, store, delta)
    audits = []
    for scan in scans:
        result = one_run_audit(scores, included, stated_delta, k_plus=k_plus, k_minus=k_minus, scan=scan)
        result.update(
            valid=not result["scanned"],
            guesses="scanned over a grid of (k+, k-): the best is shown and is not a valid bound" if result["scanned"]
            else "fixed in advance: k+ = k- = 10% of the canaries unless given",
            theoretical_epsilon=theoretical,
            theoretical_source=source,
            holders=secret.holders(),
            included=int(included.sum()),
            score="log(p / (1 - p)) of the canary's wrong label on the final model",
            canary="a held-out test record with a seeded wrong label, included with probability 1/2 in one random client's training data",
            histogram=_histogram({"included": scores[included], "excluded": scores[~included]}),
        )
        audits.append(result)
    return audits


def _flat(weights: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(weights[k], dtype=np.float64).ravel() for k in keys])


def client_canary_audit(run: StoredRun, store: RunStore, delta: float | None, unobserved: int = DEFAULT_UNOBSERVED) -> dict[str, Any] | None:
    """Andrew et al.'s one-shot estimate for a run with ``--canary-clients``; None without them.

    Returns
    -------
    dict or None
        The fields of :func:`audit.empirical.gaussian_epsilon_from_cosines` plus
        ``epsilon_estimate`` (one pooled variance), ``epsilon_estimate_two_variance``
        (each group its own variance, as in the paper's fit), ``theoretical_epsilon``
        (client level), ``canary_clients``, ``unobserved``, ``histogram`` and ``method``.
    """
    m = run.config.canary_clients
    if not m:
        return None
    secret = load_secret(store.run_dir(run.run_id) / SECRET_FILE)
    info = run.model_info
    start = initial_model(info["model"], info["num_features"], info["num_classes"], info.get("image_side"), run.config.seed)
    initial = {k: v.detach().numpy() for k, v in start.state_dict().items()}
    keys = list(initial)
    change = _flat(run.weights, keys) - _flat(initial, keys)
    norm = float(np.linalg.norm(change))
    if norm == 0.0:
        raise BadInput(f"run {run.run_id}: the final model equals the initial one; there is nothing to measure")
    shapes = {k: initial[k].shape for k in keys}
    # One direction at a time: stacking M + 1000 of them would cost (M + 1000) x P floats.
    cosines = np.array([flat_direction(secret.direction_seed, j, shapes) @ change / norm for j in range(m + unobserved)])
    observed, never_sent = cosines[:m], cosines[m:]
    stated_delta = delta if delta else 1e-5
    # See the module docstring for why the pooled fit is the headline.
    result = gaussian_epsilon_from_cosines(observed, never_sent, stated_delta, method="pooled")
    two_variance = gaussian_epsilon_from_cosines(observed, never_sent, stated_delta, method="exact")["epsilon"]
    theoretical = _client_level_epsilon(store, run.run_id)
    result.update(
        epsilon_estimate=result.pop("epsilon"),
        epsilon_estimate_two_variance=two_variance,
        theoretical_epsilon=theoretical,
        canary_clients=m,
        unobserved=unobserved,
        statistic="cosine between the final model's total change and each canary direction",
        histogram=_histogram({"inserted": observed, "unobserved": never_sent}),
        note="an estimate (Gaussian fit), not a confidence bound",
    )
    return result
