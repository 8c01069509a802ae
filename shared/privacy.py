"""The privacy ledger and pure functions that turn it into epsilon.

A ledger is a list of ``(noise_multiplier, sample_rate, steps)`` entries, the same
shape as an Opacus accountant's ``history``. Each entry is one homogeneous stretch of
the Poisson-subsampled Gaussian mechanism. Epsilon is always computed from the whole
ledger, so it accumulates over every round a client (or the federation) took part in.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache

from shared.errors import BadInput

LedgerEntry = tuple[float, float, int]

ACCOUNTANTS = ("prv", "rdp")
HEADLINE_ACCOUNTANT = "prv"
SIGMA_SEARCH_MAX = 1000.0
# Opacus's PRV accountant works to a delta error of delta / 1000 and could not resolve
# delta below about 1e-13 (measured on five (sigma, q, T) settings): every query failed.
MIN_DELTA = 1e-12
# Epsilon has reached its sigma -> infinity limit long before (to 6 digits by 1e3), and
# Opacus's RDP analysis overflowed at some larger sigma (1e8) but not others (1e12).
MAX_NOISE_MULTIPLIER = 1e6


def compact(ledger: Iterable[Sequence[float]]) -> list[LedgerEntry]:
    """Merge entries with the same (sigma, q) so accountants compose fewer terms."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in ledger:
        key = (float(sigma), float(q))
        merged[key] = merged.get(key, 0) + int(steps)
    return [(s, q, n) for (s, q), n in merged.items() if n > 0]


def check_mechanism(sample_rate: float, noise_multiplier: float | None = None, delta: float | None = None) -> None:
    """Raise :class:`BadInput` with one clear line for out-of-range mechanism parameters."""
    if not (0.0 < sample_rate <= 1.0):
        raise BadInput(f"sample rate must be in (0, 1], got {sample_rate}")
    if noise_multiplier is not None and not (0 < noise_multiplier <= MAX_NOISE_MULTIPLIER):
        raise BadInput(f"noise multiplier must be in (0, {MAX_NOISE_MULTIPLIER:g}], got {noise_multiplier}")
    if delta is not None and not (MIN_DELTA <= delta < 1.0):
        raise BadInput(f"delta must be in [{MIN_DELTA:g}, 1): the accountant cannot bound epsilon below {MIN_DELTA:g}; got {delta}")


@lru_cache(maxsize=4096)
def _rdp_per_step(sigma: float, q: float):
    """RDP of one step of the Poisson-subsampled Gaussian at Opacus's default orders.

    This is the expensive part of every query (a Python loop per fractional order),
    and a client's (sigma, q) is the same every round, so it is computed once.
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    curve = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    curve.flags.writeable = False
    return curve


def _rdp_epsilon(entries: Sequence[LedgerEntry], delta: float) -> float:
    """Opacus ``RDPAccountant(history=entries).get_epsilon(delta)``: RDP composes by adding
    ``steps * curve`` over the entries, as the accountant does. :func:`epsilon` passes
    the entries sorted (equal ledgers share a cache entry), so the float sum may differ
    from a ledger-ordered one in the last bits."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    total = sum(_rdp_per_step(sigma, q) * steps for sigma, q, steps in entries)
    with warnings.catch_warnings():
        # RDP warns when the optimal order sits at the edge of its alpha grid; the
        # bound it returns is still valid, only less tight.
        warnings.filterwarnings("ignore", message="Optimal order")
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta)
    return float(eps)


PRV_EPS_ERROR = 0.01  # Opacus PRVAccountant.get_epsilon's default


@lru_cache(maxsize=1)
def _truncated_prv_class():
    from opacus.accountants.analysis.prv import TruncatedPrivacyRandomVariable

    class ScalarFastTruncatedPRV(TruncatedPrivacyRandomVariable):
        """Opacus's truncated PRV, whose scalar cdf gives the same floats in half the time.

        ``mean()`` integrates the cdf with ``scipy.integrate.quad``, one Python float at a
        time, over a thousand calls per query: about 70% of a PRV query after a few
        rounds. Each scalar call of the parent's cdf evaluates the untruncated cdf twice
        (at ``t`` and at the constant ``t_min``) inside two ``np.where``; here the
        constant is computed once, in the same way, and the branches are plain
        comparisons. The values are bit for bit the parent's (``tests/test_privacy.py``),
        so epsilon still equals a fresh Opacus accountant's. Arrays take the parent's path.
        """

        def __init__(self, prv, t_min: float, t_max: float) -> None:
            super().__init__(prv, t_min, t_max)
            self._cdf_at_t_min = self._prv.cdf(t_min)

        def cdf(self, t):
            if not isinstance(t, float):
                return super().cdf(t)
            if t < self.t_min:
                return 0.0
            if t < self.t_max:
                return (self._prv.cdf(t) - self._cdf_at_t_min) / self._remaining_mass
            return 1.0

    return ScalarFastTruncatedPRV


def _truncated_prv(prv, t_min: float, t_max: float):
    return _truncated_prv_class()(prv, t_min, t_max)


def _prv_epsilon(entries: Sequence[LedgerEntry], delta: float) -> float:
    """Opacus ``PRVAccountant(history=entries).get_epsilon(delta)``: its upper bound.

    The same steps as the accountant, built from ``opacus.accountants.analysis.prv``;
    only the RDP bounds that size the truncation domain (Gopi et al. 2021, remark 5.6)
    come from the cached per-step curves. Those bounds cost about 90% of an
    uncached query. ``tests/test_privacy.py`` checks equality with the accountant.
    """
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        compose_heterogeneous,
        discretize,
    )

    eps_error, delta_error = PRV_EPS_ERROR, delta / 1000
    total_steps = sum(steps for *_, steps in entries)
    half_width = max(
        [_rdp_epsilon(entries, delta_error / 4)]
        + [_rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total_steps)) for sigma, q, _ in entries]
    )
    half_width = max(half_width, eps_error) + 3
    mesh = eps_error / math.sqrt(total_steps * math.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-half_width, half_width, mesh)
    with warnings.catch_warnings():
        # log(0) in the PRV's density at q = 1 or the domain's edge: numpy warns, the
        # accountant handles the resulting infinities itself.
        warnings.simplefilter("ignore", RuntimeWarning)
        discrete = [
            discretize(_truncated_prv(PoissonSubsampledGaussianPRV(q, sigma), domain.t_min, domain.t_max), domain)
            for sigma, q, _ in entries
        ]
        composed = compose_heterogeneous(dprvs=discrete, num_self_compositions=[steps for *_, steps in entries])
        return float(composed.compute_epsilon(delta, delta_error, eps_error)[2])


# Opacus's PRV accountant sizes its grid by the privacy loss: near epsilon 600 it takes
# seconds, and at a noise multiplier of 0.01 it ran for minutes into gigabytes. Beyond
# this RDP bound PRV is not run and reports infinity (still a true upper bound); the
# run summary then reports the finite RDP bound (shared.summary.summarize).
PRV_LIMIT = 1000.0


@lru_cache(maxsize=4096)
def _epsilon_cached(ledger: tuple[LedgerEntry, ...], delta: float, accountant: str) -> float:
    if accountant == "prv":
        if _rdp_epsilon(ledger, delta) > PRV_LIMIT:
            return math.inf
        return _prv_epsilon(ledger, delta)
    return _rdp_epsilon(ledger, delta)


def epsilon(ledger: Iterable[Sequence[float]], delta: float, accountant: str = HEADLINE_ACCOUNTANT) -> float:
    """Epsilon spent by a ledger at ``delta``.

    Parameters
    ----------
    ledger : iterable of (noise_multiplier, sample_rate, steps)
        Every stretch of the subsampled Gaussian mechanism applied so far.
    delta : float
        Target delta, in (0, 1).
    accountant : {"prv", "rdp"}
        Opacus accountant used to compose the ledger.

    Returns
    -------
    float
        The epsilon upper bound; 0.0 for an empty ledger.
    """
    if accountant not in ACCOUNTANTS:
        raise BadInput(f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")
    entries = compact(ledger)
    if not entries:
        return 0.0
    for sigma, q, _ in entries:
        check_mechanism(q, sigma, delta)
    try:
        return _epsilon_cached(tuple(sorted(entries)), float(delta), accountant)
    except (ZeroDivisionError, OverflowError, MemoryError, ValueError):
        # Opacus's accountants break down for a vanishing noise multiplier.
        smallest = min(s for s, _, _ in entries)
        raise BadInput(f"noise multiplier {smallest:g} is too small for the {accountant.upper()} accountant to bound epsilon") from None


def epsilons(ledger: Iterable[Sequence[float]], delta: float) -> dict[str, float]:
    """Both accountants' epsilon: ``{"epsilon_rdp": ..., "epsilon_prv": ...}``."""
    entries = compact(ledger)
    return {f"epsilon_{name}": epsilon(entries, delta, name) for name in ("rdp", "prv")}


def noise_for_target(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = HEADLINE_ACCOUNTANT,
    tolerance: float = 0.01,
) -> float:
    """A noise multiplier whose epsilon is <= target and within ``tolerance`` of it.

    Bisection on sigma. The returned sigma always satisfies ``epsilon <= target``; the
    search stops once ``target - epsilon < tolerance`` (or sigma stops changing), so it
    is the smallest such sigma up to that tolerance on epsilon.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise BadInput(f"target epsilon must be a finite number > 0, got {target_epsilon}")
    check_mechanism(sample_rate, None, delta)
    if steps < 1:
        raise BadInput(f"steps must be >= 1, got {steps}")

    def eps_at(sigma: float) -> float:
        return epsilon([(sigma, sample_rate, steps)], delta, accountant)

    if eps_at(SIGMA_SEARCH_MAX) > target_epsilon:
        raise BadInput(
            f"target epsilon {target_epsilon} cannot be reached with noise multiplier <= "
            f"{SIGMA_SEARCH_MAX:g} at sample rate {sample_rate} over {steps} steps"
        )
    low, high = 0.0, 1.0
    while eps_at(high) > target_epsilon:
        low, high = high, high * 2
    # Invariant: eps(high) <= target < eps(low) (eps(0) is infinite).
    while True:
        mid = (low + high) / 2
        if mid == low or mid == high:
            break
        eps_mid = eps_at(mid)
        if eps_mid > target_epsilon:
            low = mid
        else:
            high = mid
            if target_epsilon - eps_mid < tolerance:
                break
    return high


def check_delta(delta: float, smallest_client_records: int | None = None, num_clients: int | None = None) -> None:
    """Refuse a delta of 1/n or more for the privacy unit: one such guarantee allows
    releasing a whole record (sample level) or a whole client's data (client level)."""
    n = smallest_client_records
    if n and delta >= 1.0 / n:
        raise BadInput(f"--delta {delta:g} must be below 1/(smallest client's records) = 1/{n} = {1.0 / n:.3g}")
    if num_clients and delta >= 1.0 / num_clients:
        raise BadInput(f"--delta {delta:g} must be below 1/(number of clients) = 1/{num_clients} for client-level DP")


def default_delta(smallest_client_records: int | None = None, num_clients: int | None = None) -> float:
    """A delta safely below 1/n for the privacy unit.

    Sample-level: below 1/(records of the smallest client). Client-level: below
    1/(number of clients). We take 1e-5, or 1/(10 n) rounded down to one significant
    digit when that is smaller.
    """
    candidates = [1e-5]
    for n in (smallest_client_records, num_clients):
        if n:
            bound = 1.0 / (10.0 * n)
            exponent = math.floor(math.log10(bound))
            candidates.append(math.floor(bound / 10**exponent) * 10**exponent)
    return min(candidates)
