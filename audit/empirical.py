"""Empirical privacy estimators: what an attacker can actually demonstrate.

An accountant gives an upper bound on epsilon. These functions give statistical lower
bounds (and one point estimate) from attack outcomes on the trained model. On a
correctly implemented DP run a lower bound must not exceed the accountant's epsilon;
if it does, the DP implementation or the audit has a bug.

Formulas and oracle values: the reference notes given with the project
(``../shared/reference/privacy.md`` beside the checkout; read-only, never imported).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import optimize, special, stats
from sklearn import metrics as skm

from shared.errors import BadInput

# Bisection stops when the bracket is this narrow; oracles are checked to 1e-3.
EPSILON_TOLERANCE = 1e-7
ROC_MAX_POINTS = 200
DEFAULT_GUESS_FRACTION = 0.1
# Fractions of m tried for k+ and k- when scanning; 0 lets one side abstain entirely.
SCAN_FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def _check_int(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise BadInput(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_delta(delta: Any) -> float:
    if not (isinstance(delta, (int, float, np.floating)) and 0.0 <= delta < 1.0):
        raise BadInput(f"delta must be in [0, 1), got {delta!r}")
    return float(delta)


def _check_level(value: Any, name: str) -> float:
    if not (isinstance(value, (int, float, np.floating)) and 0.0 < value < 1.0):
        raise BadInput(f"{name} must be in (0, 1), got {value!r}")
    return float(value)


def _scores(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise BadInput(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        raise BadInput(f"{name} is empty")
    if not np.all(np.isfinite(array)):
        raise BadInput(f"{name} contains NaN or infinite values")
    return array


# ---------------------------------------------------------------------------
# One-run canary audit (Steinke, Nasr and Jagielski 2023)
# ---------------------------------------------------------------------------


def _one_run_p_value(eps: float, m: int, r: int, v: int, delta: float) -> float:
    q = special.expit(eps)
    beta = stats.binom.sf(v - 1, r, q)
    if v == 0:
        return min(1.0, float(beta))
    # P[v-i <= B <= v-1] for i = 1..v is a running sum of the pmf walking down from
    # v-1; summing in that direction also avoids cancellation between two cdfs near 1.
    # Below rq - sqrt(35 r) the pmf holds < e^-70 in total (Hoeffding), so stopping
    # there changes alpha by less than that while skipping most of a large r.
    lowest = max(0, min(v - 1, math.floor(r * q - math.sqrt(35.0 * r))))
    window_mass = np.cumsum(stats.binom.pmf(np.arange(v - 1, lowest - 1, -1), r, q))
    alpha = float(np.max(window_mass / np.arange(1, window_mass.size + 1)))
    return min(1.0, float(beta) + 2.0 * m * delta * alpha)


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Epsilon lower bound from a one-run canary audit (Steinke, Nasr and Jagielski 2023).

    With ``q = 1/(1+e^-eps)``, ``beta = P[Bin(r, q) >= v]`` and
    ``alpha = max_{i=1..v} P[v-i <= Bin(r, q) <= v-1] / i``, the p-value of "the run is
    (eps, delta)-DP" is ``min(1, beta + 2 m delta alpha)``. The bound is the largest eps
    whose p-value is below ``1 - confidence``, found by bisection.

    Parameters
    ----------
    m : int
        Number of canaries, each included independently with probability 1/2.
    r : int
        Number of guesses made (``k+ + k-``), ``r <= m``.
    v : int
        Number of correct guesses, ``v <= r``.
    delta : float
        The delta of the guarantee being tested, in [0, 1).
    confidence : float, default=0.95
        The bound holds with this probability over the canaries' inclusion.

    Returns
    -------
    float
        The epsilon lower bound; 0.0 when the guesses are no better than chance.
    """
    m = _check_int(m, "m", 1)
    r = _check_int(r, "r")
    v = _check_int(v, "v")
    if r > m:
        raise BadInput(f"r ({r} guesses) cannot exceed m ({m} canaries)")
    if v > r:
        raise BadInput(f"v ({v} correct) cannot exceed r ({r} guesses)")
    delta = _check_delta(delta)
    threshold = 1.0 - _check_level(confidence, "confidence")

    def rejected(eps: float) -> bool:
        return _one_run_p_value(eps, m, r, v, delta) < threshold

    if r == 0 or not rejected(0.0):
        return 0.0
    # p(eps) rises with eps (guessing well becomes less surprising) and reaches 1 as
    # q -> 1, so doubling finds a non-rejected upper end.
    low, high = 0.0, 1.0
    while rejected(high):
        low, high = high, 2.0 * high
    while high - low > EPSILON_TOLERANCE:
        mid = 0.5 * (low + high)
        if rejected(mid):
            low = mid
        else:
            high = mid
    return low


def canary_guesses(scores: Any, included: Any, k_plus: int, k_minus: int) -> tuple[int, int]:
    """Score the one-run audit's guesses: "in" for the top ``k_plus``, "out" for the bottom ``k_minus``.

    Parameters
    ----------
    scores : array-like of shape (m,)
        Attack score of each canary on the final model; higher = more likely included.
    included : array-like of bool of shape (m,)
        Whether each canary was really in the training data.
    k_plus, k_minus : int
        Number of "in" and "out" guesses; ``k_plus + k_minus <= m``. The rest abstain.

    Returns
    -------
    (r, v) : tuple of int
        Guesses made and guesses that were correct.
    """
    scores = _scores(scores, "scores")
    truth = _included(included, scores.size)
    k_plus = _check_int(k_plus, "k_plus")
    k_minus = _check_int(k_minus, "k_minus")
    if k_plus + k_minus > scores.size:
        raise BadInput(f"k_plus + k_minus = {k_plus + k_minus} exceeds the {scores.size} canaries")
    return _guess_counter(scores, truth)(k_plus, k_minus)


def _guess_counter(scores: np.ndarray, truth: np.ndarray) -> Callable[[int, int], tuple[int, int]]:
    """(k+, k-) -> (r, v) after one sort, so scanning many pairs costs no more sorts."""
    # Stable sort: ties are broken by position, which is independent of inclusion, so
    # they cannot leak the answer into the guesses.
    ranked = truth[np.argsort(-scores, kind="stable")]
    # included_above[k] = included canaries among the k highest scores.
    included_above = np.concatenate([[0], np.cumsum(ranked)])
    m, total = ranked.size, int(included_above[-1])

    def count(k_plus: int, k_minus: int) -> tuple[int, int]:
        correct_in = int(included_above[k_plus])
        correct_out = k_minus - (total - int(included_above[m - k_minus]))
        return k_plus + k_minus, correct_in + correct_out

    return count


def _included(included: Any, m: int) -> np.ndarray:
    truth = np.asarray(included)
    if truth.ndim != 1 or truth.size != m:
        raise BadInput(f"included must be a 1-D array with one entry per canary ({m}), got shape {truth.shape}")
    if truth.dtype != bool:
        if not np.all(np.isin(truth, (0, 1))):
            raise BadInput("included must hold booleans or 0/1")
        truth = truth.astype(bool)
    return truth


def _default_k(m: int) -> int:
    return max(1, int(round(DEFAULT_GUESS_FRACTION * m)))


def one_run_audit(
    scores: Any,
    included: Any,
    delta: float,
    k_plus: int | None = None,
    k_minus: int | None = None,
    scan: bool = False,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """One-run canary audit: guesses from canary scores, then the Steinke et al. bound.

    Parameters
    ----------
    scores : array-like of shape (m,)
        Attack score of each canary; higher = more likely included.
    included : array-like of bool of shape (m,)
        Whether each canary was included (each independently with probability 1/2).
    delta : float
        The delta of the guarantee being tested.
    k_plus, k_minus : int, optional
        Numbers of "in" and "out" guesses, which must be fixed before looking at the
        scores for the confidence to hold. A missing one defaults to 10% of m (at least 1).
    scan : bool, default=False
        Try a grid of (k+, k-) and report the best. The reported bound then no longer
        holds at ``confidence`` (it is the maximum of many tests), so ``scanned`` is set
        to flag it. Cannot be combined with explicit ``k_plus``/``k_minus``.
    confidence : float, default=0.95
        Confidence of the bound when not scanning.

    Returns
    -------
    dict
        ``m``, ``r``, ``v``, ``epsilon_lower_bound``, ``k_plus``, ``k_minus``,
        ``scanned``, ``delta``, ``confidence``.
    """
    scores = _scores(scores, "scores")
    m = scores.size
    truth = _included(included, m)
    if m < 2:
        raise BadInput(f"a canary audit needs at least 2 canaries, got {m}")
    delta = _check_delta(delta)
    _check_level(confidence, "confidence")

    if scan:
        if k_plus is not None or k_minus is not None:
            raise BadInput("pass either k_plus/k_minus or scan=True, not both")
        sizes = sorted({int(round(f * m)) for f in SCAN_FRACTIONS} | {1})
        candidates = [(kp, km) for kp in sizes for km in sizes if 0 < kp + km <= m]
    else:
        kp = _default_k(m) if k_plus is None else _check_int(k_plus, "k_plus")
        km = _default_k(m) if k_minus is None else _check_int(k_minus, "k_minus")
        if kp + km == 0:
            raise BadInput("k_plus + k_minus must be at least 1")
        candidates = [(kp, km)]

    if candidates[0][0] + candidates[0][1] > m:
        raise BadInput(f"k_plus + k_minus = {sum(candidates[0])} exceeds the {m} canaries")
    count = _guess_counter(scores, truth)
    best: dict[str, Any] | None = None
    for kp, km in candidates:
        r, v = count(kp, km)
        eps = one_run_epsilon_lower_bound(m, r, v, delta, confidence)
        if best is None or eps > best["epsilon_lower_bound"]:
            best = {"m": m, "r": r, "v": v, "epsilon_lower_bound": eps, "k_plus": kp, "k_minus": km}
    assert best is not None
    best.update(scanned=bool(scan), delta=delta, confidence=float(confidence))
    return best


# ---------------------------------------------------------------------------
# Lower bound from a membership test (Jagielski et al. 2020; Nasr et al. 2021)
# ---------------------------------------------------------------------------


def clopper_pearson_upper(k: Any, n: Any, alpha: float) -> Any:
    """One-sided Clopper-Pearson upper confidence bound on a binomial rate.

    Parameters
    ----------
    k : int or array-like of int
        Number of successes, ``0 <= k <= n``.
    n : int or array-like of int
        Number of trials, ``n >= 1``.
    alpha : float
        The true rate exceeds the bound with probability at most ``alpha``.

    Returns
    -------
    float or ndarray
        ``Beta(1-alpha; k+1, n-k)`` quantile, and 1.0 where ``k == n``.
    """
    alpha = _check_level(alpha, "alpha")
    k_arr = np.asarray(k)
    n_arr = np.asarray(n)
    if not (np.issubdtype(k_arr.dtype, np.integer) and np.issubdtype(n_arr.dtype, np.integer)):
        raise BadInput("k and n must be integer counts")
    if np.any(n_arr < 1) or np.any(k_arr < 0) or np.any(k_arr > n_arr):
        raise BadInput("counts must satisfy 0 <= k <= n and n >= 1")
    k_f, n_f = np.broadcast_arrays(k_arr.astype(float), n_arr.astype(float))
    full = k_f >= n_f
    # Where k == n the beta's second shape would be 0; the bound there is 1 anyway.
    bound = np.where(full, 1.0, stats.beta.ppf(1.0 - alpha, k_f + 1.0, np.where(full, 1.0, n_f - k_f)))
    return float(bound) if bound.ndim == 0 else bound


def _bound_from_rates(fnr_hi: np.ndarray, fpr_hi: np.ndarray, delta: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        # A term whose log argument is <= 0 gives no bound; nan drops it from the max.
        first = np.log(1.0 - delta - fnr_hi) - np.log(fpr_hi)
        second = np.log(1.0 - delta - fpr_hi) - np.log(fnr_hi)
    first = np.where(np.isnan(first), -np.inf, first)
    second = np.where(np.isnan(second), -np.inf, second)
    return np.maximum(0.0, np.maximum(first, second))


def _counts_bound(fn: Any, n_pos: int, fp: Any, n_neg: int, delta: float, alpha: float) -> np.ndarray:
    # alpha/2 per rate: a union bound makes both hold together at level alpha.
    return _bound_from_rates(
        np.asarray(clopper_pearson_upper(fn, n_pos, alpha / 2)),
        np.asarray(clopper_pearson_upper(fp, n_neg, alpha / 2)),
        delta,
    )


def epsilon_lower_bound_from_counts(
    fn: int, n_pos: int, fp: int, n_neg: int, delta: float, alpha: float = 0.05
) -> float:
    """Epsilon lower bound from a membership test's error counts.

    ``eps = max(0, log(1-delta-FNR_hi) - log(FPR_hi), log(1-delta-FPR_hi) - log(FNR_hi))``
    with FPR_hi and FNR_hi one-sided Clopper-Pearson upper bounds at level ``alpha/2``
    each, so the bound holds with confidence ``1 - alpha``.

    Parameters
    ----------
    fn : int
        Members the test called non-members.
    n_pos : int
        Members tested.
    fp : int
        Non-members the test called members.
    n_neg : int
        Non-members tested.
    delta : float
        The delta of the guarantee being tested, in [0, 1).
    alpha : float, default=0.05
        One minus the confidence.

    Returns
    -------
    float
        The epsilon lower bound, >= 0.
    """
    n_pos = _check_int(n_pos, "n_pos", 1)
    n_neg = _check_int(n_neg, "n_neg", 1)
    fn = _check_int(fn, "fn")
    fp = _check_int(fp, "fp")
    if fn > n_pos:
        raise BadInput(f"fn ({fn}) cannot exceed n_pos ({n_pos})")
    if fp > n_neg:
        raise BadInput(f"fp ({fp}) cannot exceed n_neg ({n_neg})")
    delta = _check_delta(delta)
    alpha = _check_level(alpha, "alpha")
    return float(_counts_bound(fn, n_pos, fp, n_neg, delta, alpha))


# ---------------------------------------------------------------------------
# Membership-inference metrics
# ---------------------------------------------------------------------------


def _downsample(fpr: np.ndarray, tpr: np.ndarray, max_points: int) -> tuple[list[float], list[float]]:
    if fpr.size <= max_points:
        keep = np.arange(fpr.size)
    else:
        keep = np.unique(np.round(np.linspace(0, fpr.size - 1, max_points)).astype(int))
    return fpr[keep].tolist(), tpr[keep].tolist()


def mia_metrics(member_scores: Any, nonmember_scores: Any) -> dict[str, Any]:
    """Membership-inference attack quality from the attack's scores.

    Parameters
    ----------
    member_scores : array-like of shape (n_members,)
        Attack scores of training members; higher = more likely member.
    nonmember_scores : array-like of shape (n_nonmembers,)
        Attack scores of held-out non-members.

    Returns
    -------
    dict
        ``auc``; ``tpr_at_1pct_fpr`` and ``tpr_at_0_1pct_fpr`` (largest TPR over ROC
        points with FPR <= 1% and <= 0.1%, the numbers Carlini et al. 2022 argue matter;
        with fewer than 1000 non-members the 0.1% one can only use FPR = 0);
        ``advantage`` (max TPR - FPR); ``roc_fpr`` and ``roc_tpr`` (the ROC curve,
        evenly thinned to at most 200 points, end points kept); ``n_members``,
        ``n_nonmembers``.
    """
    members = _scores(member_scores, "member_scores")
    nonmembers = _scores(nonmember_scores, "nonmember_scores")
    y = np.concatenate([np.ones(members.size, dtype=int), np.zeros(nonmembers.size, dtype=int)])
    s = np.concatenate([members, nonmembers])
    # Keep every corner so the low-FPR TPRs are read off the full curve, not a thinned one.
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)

    def tpr_at(max_fpr: float) -> float:
        # roc_curve starts at (0, 0), so the selection is never empty.
        return float(tpr[fpr <= max_fpr].max())

    curve_fpr, curve_tpr = _downsample(fpr, tpr, ROC_MAX_POINTS)
    return {
        "auc": float(skm.roc_auc_score(y, s)),
        "tpr_at_1pct_fpr": tpr_at(0.01),
        "tpr_at_0_1pct_fpr": tpr_at(0.001),
        "advantage": float(np.max(tpr - fpr)),
        "roc_fpr": curve_fpr,
        "roc_tpr": curve_tpr,
        "n_members": int(members.size),
        "n_nonmembers": int(nonmembers.size),
    }


def _threshold_counts(
    members: np.ndarray, nonmembers: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """FN and FP when "member" means ``score >= threshold``."""
    fn = np.searchsorted(np.sort(members), thresholds, side="left")
    fp = nonmembers.size - np.searchsorted(np.sort(nonmembers), thresholds, side="left")
    return fn, fp


def mia_epsilon_lower_bound(
    member_scores_cal: Any,
    nonmember_scores_cal: Any,
    member_scores_test: Any,
    nonmember_scores_test: Any,
    delta: float,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Epsilon lower bound from a membership-inference attack, threshold chosen on held-apart data.

    The threshold that maximises the bound on the calibration split is fixed, then the
    errors are counted on the test split and turned into a bound with
    :func:`epsilon_lower_bound_from_counts`. Choosing the threshold on the counted data
    would overstate the bound: it would be the best of many tests.

    Parameters
    ----------
    member_scores_cal, nonmember_scores_cal : array-like
        Calibration scores of members and non-members; higher = more likely member.
    member_scores_test, nonmember_scores_test : array-like
        Test scores, disjoint from the calibration ones.
    delta : float
        The delta of the guarantee being tested.
    alpha : float, default=0.05
        One minus the confidence of the test-split bound.

    Returns
    -------
    dict
        ``epsilon_lower_bound`` (on the test split), ``threshold`` (a score >= it is
        called member), ``fn``, ``n_pos``, ``fp``, ``n_neg`` (test counts),
        ``calibration_epsilon`` (the bound the threshold achieved on the calibration
        split, for reference only), ``delta``, ``alpha``.
    """
    cal_members = _scores(member_scores_cal, "member_scores_cal")
    cal_nonmembers = _scores(nonmember_scores_cal, "nonmember_scores_cal")
    test_members = _scores(member_scores_test, "member_scores_test")
    test_nonmembers = _scores(nonmember_scores_test, "nonmember_scores_test")
    delta = _check_delta(delta)
    alpha = _check_level(alpha, "alpha")

    # Every distinct calibration score, plus +inf (call nobody a member), covers every
    # distinct split of the calibration data.
    thresholds = np.append(np.unique(np.concatenate([cal_members, cal_nonmembers])), np.inf)
    fn_cal, fp_cal = _threshold_counts(cal_members, cal_nonmembers, thresholds)
    cal_bounds = _counts_bound(fn_cal, cal_members.size, fp_cal, cal_nonmembers.size, delta, alpha)
    best = int(np.argmax(cal_bounds))
    threshold = float(thresholds[best])

    fn_test, fp_test = _threshold_counts(test_members, test_nonmembers, np.array([threshold]))
    fn, fp = int(fn_test[0]), int(fp_test[0])
    return {
        "epsilon_lower_bound": epsilon_lower_bound_from_counts(
            fn, test_members.size, fp, test_nonmembers.size, delta, alpha
        ),
        "threshold": threshold,
        "fn": fn,
        "n_pos": int(test_members.size),
        "fp": fp,
        "n_neg": int(test_nonmembers.size),
        "calibration_epsilon": float(cal_bounds[best]),
        "delta": delta,
        "alpha": alpha,
    }


def max_mia_auc(epsilon: float, delta: float) -> float:
    """The highest ROC AUC any membership test can reach against an (epsilon, delta)-DP model.

    (epsilon, delta)-DP caps the true-positive rate at
    ``min(e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR))`` (Kairouz, Oh and Viswanath
    2015); integrating that curve over FPR gives ``1 - (1 - delta)^2 / (1 + e^eps)``.
    A measured AUC above this, beyond sampling error, means the DP claim is false.

    Parameters
    ----------
    epsilon : float
        The epsilon of the guarantee, >= 0 (``inf``: no guarantee, the ceiling is 1).
    delta : float
        The delta of the guarantee, in [0, 1).

    Returns
    -------
    float
        The ceiling, in [0.5, 1].
    """
    if not (isinstance(epsilon, (int, float, np.floating)) and epsilon >= 0):
        raise BadInput(f"epsilon must be a number >= 0, got {epsilon!r}")
    delta = _check_delta(delta)
    if math.isinf(epsilon):
        return 1.0
    # 1 / (1 + e^eps) as e^-eps / (1 + e^-eps): no overflow for large epsilon
    return 1.0 - (1.0 - delta) ** 2 * float(special.expit(-epsilon))


# ---------------------------------------------------------------------------
# Gaussian one-shot estimate (Andrew et al. 2023)
# ---------------------------------------------------------------------------


def gaussian_mechanism_delta(eps: float, mu: float) -> float:
    """delta(eps) of the Gaussian mechanism with sensitivity/noise ratio ``mu`` (Balle and Wang 2018).

    ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``.

    Parameters
    ----------
    eps : float
        The epsilon at which delta is wanted, >= 0 and finite.
    mu : float
        Sensitivity / noise standard deviation, >= 0 and finite (0: no leak).

    Returns
    -------
    float
        delta(eps), in [0, 1].
    """
    for value, name in ((eps, "eps"), (mu, "mu")):
        if not (math.isfinite(value) and value >= 0):
            raise BadInput(f"{name} must be a finite number >= 0, got {value}")
    if mu == 0.0:
        return 0.0
    # e^eps * Phi(x) in log space: e^eps overflows long before the product does.
    tail = math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2.0))
    return max(0.0, float(stats.norm.cdf(-eps / mu + mu / 2.0) - tail))


def _interval_mass(lo: float, hi: float, mean: float, std: float) -> float:
    """P[lo < X < hi] for X ~ N(mean, std^2), from whichever tail keeps precision."""
    if lo > mean:
        return float(stats.norm.sf(lo, mean, std) - stats.norm.sf(hi, mean, std))
    return float(stats.norm.cdf(hi, mean, std) - stats.norm.cdf(lo, mean, std))


def _hockey_stick(eps: float, mu_p: float, s_p: float, mu_q: float, s_q: float) -> float:
    """sup_S P(S) - e^eps Q(S) for P = N(mu_p, s_p^2), Q = N(mu_q, s_q^2).

    The sup is attained on S = {log p/q > eps}; log p/q is a quadratic a x^2 + b x + c,
    so S is a half-line, an interval or the complement of one.
    """
    a = 0.5 / s_q**2 - 0.5 / s_p**2
    b = mu_p / s_p**2 - mu_q / s_q**2
    c = 0.5 * mu_q**2 / s_q**2 - 0.5 * mu_p**2 / s_p**2 + math.log(s_q / s_p)

    def mass(mean: float, std: float) -> float:
        if a == 0.0:
            if b == 0.0:
                return 1.0 if c > eps else 0.0
            cut = (eps - c) / b
            return float(stats.norm.sf(cut, mean, std) if b > 0 else stats.norm.cdf(cut, mean, std))
        disc = b * b - 4.0 * a * (c - eps)
        if disc <= 0.0:
            # The quadratic never crosses eps: S is everything (a > 0) or nothing.
            return 1.0 if a > 0 else 0.0
        # Numerically stable roots: with nearly equal variances a is tiny and the
        # textbook formula cancels catastrophically for the finite root.
        half = -0.5 * (b + math.copysign(math.sqrt(disc), b))
        lo, hi = sorted((half / a, (c - eps) / half))
        inside = _interval_mass(lo, hi, mean, std)
        return 1.0 - inside if a > 0 else inside

    return max(0.0, mass(mu_p, s_p) - math.exp(eps) * mass(mu_q, s_q))


def gaussian_epsilon(mu1: float, s1: float, mu0: float, s0: float, delta: float) -> float:
    """Epsilon of telling N(mu1, s1^2) from N(mu0, s0^2) at ``delta``.

    With equal standard deviations this is the Gaussian mechanism with
    ``mu = |mu1 - mu0| / s`` and the analytic relation of :func:`gaussian_mechanism_delta`.
    Otherwise it is the exact privacy profile of the pair, taking the worse of the two
    directions (P vs Q and Q vs P), as Andrew et al.'s reference code does: unequal
    variances leak through the tails even at equal means.

    Parameters
    ----------
    mu1, s1 : float
        Mean and standard deviation of the first distribution (e.g. scores of included canaries).
    mu0, s0 : float
        Mean and standard deviation of the second (excluded canaries); both deviations > 0.
    delta : float
        In (0, 1).

    Returns
    -------
    float
        The smallest eps >= 0 with delta(eps) <= ``delta``, by bisection.
    """
    for value, name in ((mu1, "mu1"), (mu0, "mu0"), (s1, "s1"), (s0, "s0")):
        if not math.isfinite(value):
            raise BadInput(f"{name} must be finite, got {value}")
    if not (s1 > 0 and s0 > 0):
        raise BadInput(f"standard deviations must be > 0, got s1={s1}, s0={s0}")
    delta = _check_level(delta, "delta")

    if s1 == s0:
        mu = abs(mu1 - mu0) / s1

        def profile(eps: float) -> float:
            return gaussian_mechanism_delta(eps, mu)

    else:

        def profile(eps: float) -> float:
            return max(_hockey_stick(eps, mu1, s1, mu0, s0), _hockey_stick(eps, mu0, s0, mu1, s1))

    if profile(0.0) <= delta:
        return 0.0
    # delta(eps) falls with eps; grow the bracket until it drops below the target.
    low, high = 0.0, 1.0
    while profile(high) > delta:
        low, high = high, 2.0 * high
        if high > 1e4:
            return math.inf
    return float(optimize.brentq(lambda e: profile(e) - delta, low, high, xtol=EPSILON_TOLERANCE))


GAUSSIAN_METHODS = ("pooled", "exact")


def gaussian_epsilon_from_cosines(
    observed_cosines: Any, unobserved_cosines: Any, delta: float, method: str = "pooled"
) -> dict[str, Any]:
    """One-shot epsilon estimate from canary cosines (Andrew et al. 2023).

    Canary clients send random isotropic updates. The cosine between the final model
    delta and each inserted canary (observed) is compared with the cosines of canaries
    that were never sent (unobserved). Gaussians N(mu1, s1^2) and N(mu0, s0^2) are
    fitted to the two sets and the estimate is the epsilon of distinguishing them.

    Choice for unequal fitted variances (``method``):

    - ``"pooled"`` (default): one pooled sigma, then the Gaussian mechanism with
      ``mu = |mu1 - mu0| / sigma``. Under the Gaussian mechanism in high dimension both
      cosine distributions have the same variance (about 1/d), so a difference between
      s1 and s0 is mostly sampling noise; the exact profile turns that noise into tail
      divergence at small delta, far outside where the samples say anything, and
      overstates epsilon (two fits of the *same* distribution give eps well above 0).
    - ``"exact"``: the exact privacy profile of the two fitted Gaussians, worse of the
      two directions, as in Andrew et al.'s reference code. Use it when the variances
      genuinely differ (not a Gaussian mechanism) and there are many canaries.

    This is an estimate, not a bound: it carries no confidence level and can sit above
    or below the true epsilon by sampling error.

    Parameters
    ----------
    observed_cosines : array-like of shape (n_observed,)
        Cosines of inserted canaries; at least 2.
    unobserved_cosines : array-like of shape (n_unobserved,)
        Cosines of unobserved canaries; at least 2.
    delta : float
        Target delta, in (0, 1).
    method : {"pooled", "exact"}, default="pooled"
        How unequal fitted variances are handled, see above.

    Returns
    -------
    dict
        ``epsilon``, ``method``, ``mean_observed``, ``std_observed``,
        ``mean_unobserved``, ``std_unobserved`` (sample std, ddof=1), ``std_pooled``,
        ``n_observed``, ``n_unobserved``, ``delta``.
    """
    if method not in GAUSSIAN_METHODS:
        raise BadInput(f"unknown method {method!r}; choose one of {', '.join(GAUSSIAN_METHODS)}")
    observed = _scores(observed_cosines, "observed_cosines")
    unobserved = _scores(unobserved_cosines, "unobserved_cosines")
    for array, name in ((observed, "observed_cosines"), (unobserved, "unobserved_cosines")):
        if array.size < 2:
            raise BadInput(f"{name} needs at least 2 values to fit a Gaussian, got {array.size}")
        if np.any(np.abs(array) > 1.0 + 1e-9):
            raise BadInput(f"{name} must be cosines in [-1, 1]")
    delta = _check_level(delta, "delta")
    n1, n0 = observed.size, unobserved.size
    mu1, s1 = float(observed.mean()), float(observed.std(ddof=1))
    mu0, s0 = float(unobserved.mean()), float(unobserved.std(ddof=1))
    pooled = math.sqrt(((n1 - 1) * s1**2 + (n0 - 1) * s0**2) / (n1 + n0 - 2))
    if (method == "pooled" and pooled == 0.0) or (method == "exact" and (s1 == 0.0 or s0 == 0.0)):
        raise BadInput("cosines have zero spread; a Gaussian cannot be fitted")
    if method == "pooled":
        eps = gaussian_epsilon(mu1, pooled, mu0, pooled, delta)
    else:
        eps = gaussian_epsilon(mu1, s1, mu0, s0, delta)
    return {
        "epsilon": eps,
        "method": method,
        "mean_observed": mu1,
        "std_observed": s1,
        "mean_unobserved": mu0,
        "std_unobserved": s0,
        "std_pooled": pooled,
        "n_observed": int(n1),
        "n_unobserved": int(n0),
        "delta": delta,
    }
