"""DP-FedAvg's aggregation rule, on arrays (no simulation)."""

import numpy as np
import pytest

from server.client_dp import ClientLevelDP, clip_update


def test_clip_update_bounds_the_global_norm():
    clipped, norm = clip_update({"a": np.full(4, 3.0), "b": np.array(4.0)}, 1.0)
    assert norm == pytest.approx(np.sqrt(4 * 9 + 16))
    total = np.sqrt(sum(float(np.sum(v**2)) for v in clipped.values()))
    assert total == pytest.approx(1.0)
    small, _ = clip_update({"a": np.full(4, 0.1)}, 1.0)
    assert np.allclose(small["a"], 0.1)


def test_noise_goes_on_the_sum_and_the_denominator_is_fixed():
    dp = ClientLevelDP(inner=None, noise_multiplier=0.0, clip=1.0, sample_rate=0.5, num_clients=8, seed=0)
    dp.current = {"w": np.zeros(3, dtype=np.float32), "scalar": np.array(0.0, dtype=np.float32)}
    updates = [{"w": np.array([3.0, 0, 0]), "scalar": np.array(0.0)}, {"w": np.array([0.5, 0, 0]), "scalar": np.array(0.0)}]
    mean = dp.noised_mean_update(1, updates)
    # clipped to 1.0 and 0.5, summed (1.5), divided by q*N = 4, not by the 2 who took part
    assert mean["w"][0] == pytest.approx(1.5 / 4)
    assert isinstance(mean["scalar"], np.ndarray) and mean["scalar"].shape == ()
    noisy = ClientLevelDP(inner=None, noise_multiplier=2.0, clip=0.5, sample_rate=0.5, num_clients=8, seed=0)
    noisy.current = {"w": np.zeros(20000, dtype=np.float32)}
    sample = noisy.noised_mean_update(1, [])["w"]
    assert sample.std() == pytest.approx(2.0 * 0.5 / 4, rel=0.05)  # N(0, z^2 C^2) on the sum, / qN
