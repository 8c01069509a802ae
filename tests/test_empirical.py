import math
import time

import numpy as np
import pytest
from scipy import stats

from audit.empirical import (
    _one_run_p_value,
    canary_guesses,
    clopper_pearson_upper,
    epsilon_lower_bound_from_counts,
    gaussian_epsilon,
    gaussian_epsilon_from_cosines,
    gaussian_mechanism_delta,
    max_mia_auc,
    mia_epsilon_lower_bound,
    mia_metrics,
    one_run_audit,
    one_run_epsilon_lower_bound,
)
from shared.errors import BadInput

DELTA = 1e-5


# Oracles: shared/reference/privacy.md
@pytest.mark.parametrize(
    "m, r, v, expected",
    [(1000, 600, 600, 5.2704), (1000, 100, 90, 1.6261), (1000, 200, 150, 0.8200), (1000, 10, 10, 1.0150)],
)
def test_one_run_bound_oracles(m, r, v, expected):
    assert one_run_epsilon_lower_bound(m, r, v, DELTA) == pytest.approx(expected, abs=5e-4)


def _literal_p_value(eps, m, r, v, delta):
    """privacy.md's p(eps), one cdf call per i."""
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha = max(
        ((stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - i - 1, r, q)) / i for i in range(1, v + 1)), default=0.0
    )
    return min(1.0, beta + 2 * m * delta * alpha)


def test_fast_p_value_matches_literal_definition():
    rng = np.random.default_rng(0)
    for _ in range(60):
        m = int(rng.integers(10, 500))
        r = int(rng.integers(1, m + 1))
        v = int(rng.integers(0, r + 1))
        eps = float(rng.uniform(0, 8))
        assert _one_run_p_value(eps, m, r, v, 1e-3) == pytest.approx(_literal_p_value(eps, m, r, v, 1e-3), abs=1e-12)


def test_one_run_bound_is_fast():
    start = time.perf_counter()
    one_run_epsilon_lower_bound(100_000, 20_000, 19_000, DELTA)
    assert time.perf_counter() - start < 2.0


def test_one_run_bound_monotone():
    # More correct guesses, or the same accuracy over more guesses, is stronger evidence.
    by_v = [one_run_epsilon_lower_bound(1000, 200, v, DELTA) for v in range(100, 201, 10)]
    assert all(a <= b for a, b in zip(by_v, by_v[1:]))
    assert one_run_epsilon_lower_bound(1000, 400, 360, DELTA) > one_run_epsilon_lower_bound(1000, 100, 90, DELTA)
    # Chance-level guessing proves nothing; a larger delta weakens the bound.
    assert one_run_epsilon_lower_bound(1000, 200, 100, DELTA) == 0.0
    assert one_run_epsilon_lower_bound(1000, 600, 600, 1e-3) < one_run_epsilon_lower_bound(1000, 600, 600, DELTA)
    assert one_run_epsilon_lower_bound(1000, 0, 0, DELTA) == 0.0


def test_one_run_audit_scan_is_fast():
    rng = np.random.default_rng(0)
    included = rng.random(100_000) < 0.5
    start = time.perf_counter()
    one_run_audit(rng.normal(size=100_000) + included, included, DELTA, scan=True)
    assert time.perf_counter() - start < 10.0


def test_canary_guesses():
    scores = [0.9, 0.8, 0.1, 0.5, 0.2, 0.7]
    included = [True, False, False, True, False, True]
    # Top 2 (0.9 in, 0.8 out) -> 1 correct; bottom 2 (0.1 out, 0.2 out) -> 2 correct.
    assert canary_guesses(scores, included, 2, 2) == (4, 3)
    assert canary_guesses(scores, included, 0, 1) == (1, 1)
    assert canary_guesses(scores, included, 6, 0) == (6, 3)


def test_one_run_audit_fixed_and_scanned():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    scores = rng.normal(size=1000) + 2.0 * included
    fixed = one_run_audit(scores, included, DELTA)
    assert (fixed["m"], fixed["k_plus"], fixed["k_minus"], fixed["r"]) == (1000, 100, 100, 200)
    assert fixed["scanned"] is False
    assert fixed["epsilon_lower_bound"] == pytest.approx(
        one_run_epsilon_lower_bound(1000, fixed["r"], fixed["v"], DELTA)
    )
    assert fixed["epsilon_lower_bound"] > 1.0

    scanned = one_run_audit(scores, included, DELTA, scan=True)
    assert scanned["scanned"] is True
    assert scanned["epsilon_lower_bound"] >= fixed["epsilon_lower_bound"]

    explicit = one_run_audit(scores, included, DELTA, k_plus=50, k_minus=0)
    assert (explicit["r"], explicit["k_minus"]) == (50, 0)


def test_one_run_audit_no_signal_gives_small_bound():
    rng = np.random.default_rng(1)
    included = rng.random(1000) < 0.5
    result = one_run_audit(rng.normal(size=1000), included, DELTA)
    assert result["epsilon_lower_bound"] < 0.5


@pytest.mark.parametrize(
    "fn, n_pos, fp, n_neg, expected",
    [(100, 1000, 10, 1000, 3.8720), (0, 1000, 0, 1000, 5.6006), (10, 500, 10, 500, 3.2740)],
)
def test_counts_bound_oracles(fn, n_pos, fp, n_neg, expected):
    assert epsilon_lower_bound_from_counts(fn, n_pos, fp, n_neg, DELTA) == pytest.approx(expected, abs=5e-4)


def test_counts_bound_sanity():
    assert epsilon_lower_bound_from_counts(500, 1000, 500, 1000, DELTA) == 0.0
    # Symmetric in the two error types; fewer errors give a larger bound.
    assert epsilon_lower_bound_from_counts(10, 1000, 100, 1000, DELTA) == pytest.approx(
        epsilon_lower_bound_from_counts(100, 1000, 10, 1000, DELTA)
    )
    assert epsilon_lower_bound_from_counts(50, 1000, 5, 1000, DELTA) > epsilon_lower_bound_from_counts(
        100, 1000, 10, 1000, DELTA
    )


def test_clopper_pearson_upper():
    assert clopper_pearson_upper(10, 10, 0.05) == 1.0
    # k = 0: the bound solves (1-p)^n = alpha.
    assert clopper_pearson_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100))
    bound = clopper_pearson_upper(30, 100, 0.05)
    assert stats.binom.cdf(30, 100, bound) == pytest.approx(0.05)
    vectorised = clopper_pearson_upper(np.array([0, 30]), 100, 0.05)
    assert np.allclose(vectorised, [clopper_pearson_upper(0, 100, 0.05), bound])


def test_mia_metrics_separable_vs_identical():
    rng = np.random.default_rng(0)
    separable = mia_metrics(rng.normal(10, 1, 2000), rng.normal(0, 1, 2000))
    assert separable["auc"] == pytest.approx(1.0)
    assert separable["tpr_at_1pct_fpr"] == pytest.approx(1.0)
    assert separable["tpr_at_0_1pct_fpr"] == pytest.approx(1.0)
    assert separable["advantage"] == pytest.approx(1.0)

    same = mia_metrics(rng.normal(0, 1, 5000), rng.normal(0, 1, 5000))
    assert same["auc"] == pytest.approx(0.5, abs=0.03)
    assert same["tpr_at_1pct_fpr"] < 0.03
    assert same["advantage"] < 0.05
    assert len(same["roc_fpr"]) == len(same["roc_tpr"]) <= 200
    assert (same["roc_fpr"][0], same["roc_tpr"][0]) == (0.0, 0.0)
    assert (same["roc_fpr"][-1], same["roc_tpr"][-1]) == (1.0, 1.0)


def test_mia_epsilon_lower_bound_uses_calibration_threshold():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(3, 1, 2000), rng.normal(0, 1, 2000)
    result = mia_epsilon_lower_bound(members[:1000], nonmembers[:1000], members[1000:], nonmembers[1000:], DELTA)
    test_members, test_nonmembers = members[1000:], nonmembers[1000:]
    assert result["fn"] == int((test_members < result["threshold"]).sum())
    assert result["fp"] == int((test_nonmembers >= result["threshold"]).sum())
    assert result["epsilon_lower_bound"] == pytest.approx(
        epsilon_lower_bound_from_counts(result["fn"], 1000, result["fp"], 1000, DELTA)
    )
    assert result["epsilon_lower_bound"] > 1.0

    noise = mia_epsilon_lower_bound(*(rng.normal(size=500) for _ in range(4)), DELTA)
    assert noise["epsilon_lower_bound"] < 0.5


def test_gaussian_mechanism_formula():
    # Gaussian mechanism, sensitivity 1 and sigma 1: delta(eps) curve from Balle and Wang.
    eps = gaussian_epsilon(1.0, 1.0, 0.0, 1.0, DELTA)
    assert gaussian_mechanism_delta(eps, 1.0) == pytest.approx(DELTA, rel=1e-4)
    # The exact two-Gaussian profile agrees with the formula as the variances meet.
    assert gaussian_epsilon(1.0, 1.0, 0.0, 1.0 + 1e-9, DELTA) == pytest.approx(eps, abs=1e-4)
    assert gaussian_epsilon(0.0, 1.0, 0.0, 1.0, DELTA) == 0.0


def test_gaussian_estimate_near_zero_for_identical_distributions():
    rng = np.random.default_rng(0)
    cosines = rng.normal(0.0, 0.01, 5000)
    assert gaussian_epsilon_from_cosines(cosines, cosines, DELTA)["epsilon"] == 0.0
    two_draws = gaussian_epsilon_from_cosines(rng.normal(0.0, 0.01, 5000), rng.normal(0.0, 0.01, 5000), DELTA)
    assert two_draws["epsilon"] < 0.3


def test_gaussian_estimate_grows_with_separation():
    rng = np.random.default_rng(0)
    unobserved = rng.normal(0.0, 0.01, 5000)
    noise = rng.normal(0.0, 0.01, 5000)
    shifts = (0.005, 0.01, 0.02, 0.04)
    estimates = [gaussian_epsilon_from_cosines(noise + shift, unobserved, DELTA)["epsilon"] for shift in shifts]
    assert all(a < b for a, b in zip(estimates, estimates[1:]))
    # A shift of one standard deviation is the Gaussian mechanism with mu = 1.
    assert estimates[1] == pytest.approx(gaussian_epsilon(1.0, 1.0, 0.0, 1.0, DELTA), rel=0.1)
    exact = gaussian_epsilon_from_cosines(noise + 0.01, unobserved, DELTA, method="exact")
    assert exact["method"] == "exact" and exact["epsilon"] > 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: one_run_epsilon_lower_bound(10, 20, 5, DELTA), "cannot exceed m"),
        (lambda: one_run_epsilon_lower_bound(10, 5, 6, DELTA), "cannot exceed r"),
        (lambda: one_run_epsilon_lower_bound(10, 5, 5, 1.5), "delta"),
        (lambda: one_run_epsilon_lower_bound(10, 5, 5, DELTA, confidence=1.0), "confidence"),
        (lambda: canary_guesses([1, 2], [True], 1, 1), "one entry per canary"),
        (lambda: canary_guesses([1, 2], [True, False], 2, 1), "exceeds"),
        (lambda: canary_guesses([1, 2], [2, 0], 1, 1), "booleans"),
        (lambda: one_run_audit([1.0, 2.0], [True, False], DELTA, k_plus=1, scan=True), "not both"),
        (lambda: one_run_audit([1.0, np.nan], [True, False], DELTA), "NaN"),
        (lambda: epsilon_lower_bound_from_counts(11, 10, 0, 10, DELTA), "fn"),
        (lambda: epsilon_lower_bound_from_counts(0, 0, 0, 10, DELTA), "n_pos"),
        (lambda: clopper_pearson_upper(1, 10, 0.0), "alpha"),
        (lambda: clopper_pearson_upper(1.5, 10, 0.05), "integer"),
        (lambda: mia_metrics([], [1.0]), "empty"),
        (lambda: mia_epsilon_lower_bound([1.0], [0.0], [1.0], [[0.0]], DELTA), "one-dimensional"),
        (lambda: gaussian_epsilon_from_cosines([0.1], [0.0, 0.1], DELTA), "at least 2"),
        (lambda: gaussian_epsilon_from_cosines([0.1, 2.0], [0.0, 0.1], DELTA), "cosines"),
        (lambda: gaussian_epsilon_from_cosines([0.1, 0.1], [0.1, 0.1], DELTA), "zero spread"),
        (lambda: gaussian_epsilon_from_cosines([0.1, 0.2], [0.0, 0.1], DELTA, method="x"), "method"),
        (lambda: gaussian_epsilon(1.0, 0.0, 0.0, 1.0, DELTA), "> 0"),
    ],
)
def test_bad_inputs_raise(call, message):
    with pytest.raises(BadInput) as info:
        call()
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bounds_are_finite_floats():
    assert isinstance(one_run_epsilon_lower_bound(1000, 600, 600, DELTA), float)
    assert math.isfinite(epsilon_lower_bound_from_counts(0, 1000, 0, 1000, 0.0))


@pytest.mark.parametrize("eps, mu", [(1.0, float("nan")), (-1.0, 1.0), (1.0, -0.5), (float("inf"), 1.0)])
def test_gaussian_mechanism_delta_checks_its_inputs(eps, mu):
    from shared.errors import BadInput

    with pytest.raises(BadInput, match="must be a finite number >= 0"):
        gaussian_mechanism_delta(eps, mu)


@pytest.mark.parametrize("eps, delta", [(0.0, 0.0), (1.0, 0.0), (1.0, 1e-5), (3.0, 0.1), (8.0, 1e-5)])
def test_max_mia_auc_is_the_area_under_the_dp_tradeoff_curve(eps, delta):
    fpr = np.linspace(0.0, 1.0, 200_001)
    tpr = np.minimum(np.minimum(math.exp(eps) * fpr + delta, 1.0), 1.0 - math.exp(-eps) * (1.0 - delta - fpr))
    assert max_mia_auc(eps, delta) == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-6)


def test_max_mia_auc_values_and_the_gaussian_mechanism_stays_under_it():
    assert max_mia_auc(0.0, 0.0) == 0.5 and max_mia_auc(float("inf"), 0.0) == 1.0
    assert max_mia_auc(1.0, 0.0) == pytest.approx(1.0 - 1.0 / (1.0 + math.e))  # 0.7311
    # mu-GDP's best test has AUC Phi(mu / sqrt 2); it is (eps, delta(eps))-DP for every eps
    for eps in (0.5, 1.0, 2.0, 4.0):
        assert stats.norm.cdf(1.0 / math.sqrt(2.0)) <= max_mia_auc(eps, gaussian_mechanism_delta(eps, 1.0))
    for eps, delta in ((-0.1, 0.0), (float("nan"), 0.0), (1.0, 1.0), (1.0, -1e-9)):
        with pytest.raises(BadInput, match="epsilon|delta"):
            max_mia_auc(eps, delta)
