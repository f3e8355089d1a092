"""Significance tests of a comparison (measures.py): the paired bootstrap over queries, Almost Stochastic Order
against deepsig (the independent reference, requirements-dev.txt), and Bonferroni's threshold."""
import math
from statistics import NormalDist

import numpy as np
import pytest

import measures

# Fixed scores of two systems over 10 seeds: A has the higher mean, but its lower quantiles are below B's, so the
# violation ratio is strictly between 0 and 1. min(A) > min(B): deepsig's numerator leaves out the first grid point
# t = dt, where A is then not below B, so on these samples its violation ratio is the paper's integral exactly.
A = np.array([0.571, 0.642, 0.598, 0.655, 0.583, 0.627, 0.612, 0.566, 0.634, 0.605])
B = np.array([0.562, 0.596, 0.588, 0.604, 0.579, 0.611, 0.593, 0.601, 0.585, 0.599])


# ---- paired bootstrap over queries
def test_paired_bootstrap_of_identical_systems_has_p_one():
    a = np.random.default_rng(0).random(50)
    res = measures.paired_bootstrap_test(a, a.copy(), n_resamples=2000, seed=1)
    # d = 0 everywhere: every resampled mean is 0 and |0 - 0| >= |0| always -> p = (1 + B) / (1 + B)
    assert res["mean"] == 0.0 and res["p_value"] == 1.0


def test_paired_bootstrap_of_a_constant_shift_has_the_smallest_p():
    b = np.random.default_rng(0).random(50)
    res = measures.paired_bootstrap_test(b + 0.01, b, n_resamples=2000, seed=1)
    # d = 0.01 everywhere: every resampled mean is 0.01 and |m_b - m| = 0 < |m| -> p = 1 / (1 + B)
    assert res["mean"] == pytest.approx(0.01) and res["p_value"] == pytest.approx(1 / 2001)


def test_paired_bootstrap_is_seeded():
    rng = np.random.default_rng(2)
    a, b = rng.random(40), rng.random(40)
    assert measures.paired_bootstrap_test(a, b, 500, seed=7) == measures.paired_bootstrap_test(a, b, 500, seed=7)


def test_paired_bootstrap_rejects_unpaired_scores():
    with pytest.raises(ValueError, match="same queries"):
        measures.paired_bootstrap_test(np.zeros(5), np.zeros(6))


# ---- Almost Stochastic Order
def test_violation_ratio_equals_deepsig_on_fixed_samples():
    aso_ref = pytest.importorskip("deepsig.aso")
    for a, b in ((A, B), (B + 0.02, A[::-1] - 0.01)):
        assert a.min() > b.min()  # the case where deepsig's first-point rule changes nothing
        ref = aso_ref.compute_violation_ratio(scores_a=a, scores_b=b, dt=0.005)
        assert float(measures.violation_ratio(a, b, 0.005)) == pytest.approx(ref, rel=1e-12, abs=1e-15)


def test_violation_ratio_written_out_for_two_points():
    # n = m = 2: F^-1(t) = x_(ceil(2t)): the smaller value on t <= 1/2, the larger above. A = (0, 3), B = (1, 2): A is
    # below B by 1 on t <= 1/2 and above by 1 after; the grid t = 0.005 k, k = 1..199, has 100 points with t <= 1/2
    # -> violation share 100 / 199 (each point weighs (+-1)^2 dt).
    assert float(measures.violation_ratio([0.0, 3.0], [1.0, 2.0])) == pytest.approx(100 / 199)
    # A = (2, 4) entirely above B = (0, 1): no violation
    assert float(measures.violation_ratio([2.0, 4.0], [0.0, 1.0])) == 0.0


def test_aso_eps_min_matches_deepsig_within_the_monte_carlo_error():
    aso_ref = pytest.importorskip("deepsig.aso")
    n_boot = 250  # deepsig's loop is slow (one np.vectorize call per quantile); the tolerance below follows n_boot
    ours = measures.aso(A, B, n_bootstrap=n_boot, seed=0)
    ref = aso_ref.aso(A, B, confidence_level=0.95, num_bootstrap_iterations=n_boot, dt=0.005, seed=0,
                      show_progress=False)
    # Both are eps_W2 + sigma_hat / const * z_0.95 with the same eps_W2; they differ by the bootstrap estimates of
    # sigma_hat (independent random draws) and by deepsig's first-point rule inside its resamples (a bias of about
    # -0.001 on these samples, measured over 200 seeds). The Monte-Carlo standard deviation of one eps_min is
    # measured from our own seeds; the difference of two independent ones has sqrt(2) times that; 4 of those bound
    # it (a two-sided normal 4-sigma band), + 0.002 for the first-point rule.
    spread = np.std([measures.aso(A, B, n_bootstrap=n_boot, seed=s)["eps_min"] for s in range(1, 41)])
    assert 0 < ours["violation_ratio"] < 0.5 and spread > 0
    assert abs(ours["eps_min"] - ref) <= 4 * math.sqrt(2) * spread + 0.002, (ours["eps_min"], ref, spread)


def test_aso_eps_min_is_the_upper_bound_formula():
    res = measures.aso(A, B, confidence_level=0.95, n_bootstrap=500, seed=3)
    const = math.sqrt(10 * 10 / 20)
    sigma = np.std(const * (res["bootstrap"] - res["violation_ratio"]))
    assert res["sigma"] == pytest.approx(sigma)
    assert res["eps_min"] == pytest.approx(res["violation_ratio"] + sigma / const * NormalDist().inv_cdf(0.95))


def test_aso_of_a_dominating_system_is_zero():
    # A = B + 1 with B's range < 1: every resample of A lies above every resample of B -> no violation anywhere
    res = measures.aso(B + 1.0, B, n_bootstrap=200, seed=0)
    assert res["violation_ratio"] == 0.0 and res["sigma"] == 0.0 and res["eps_min"] == 0.0


def test_aso_bonferroni_uses_alpha_over_k():
    res1 = measures.aso(A, B, n_bootstrap=500, seed=3)
    res3 = measures.aso(A, B, num_comparisons=3, n_bootstrap=500, seed=3)
    assert res3["confidence_level"] == pytest.approx(1 - 0.05 / 3)
    const = math.sqrt(10 * 10 / 20)
    # the same bootstrap (same seed), a larger quantile: z_{1 - alpha/3} instead of z_{1 - alpha}
    assert res3["eps_min"] == pytest.approx(res1["violation_ratio"] + res1["sigma"] / const *
                                            NormalDist().inv_cdf(1 - 0.05 / 3))


def test_aso_is_seeded():
    assert measures.aso(A, B, n_bootstrap=300, seed=5)["eps_min"] == measures.aso(A, B, n_bootstrap=300, seed=5)["eps_min"]


# ---- Bonferroni over datasets
def test_bonferroni_threshold_is_alpha_over_m():
    res = measures.bonferroni([0.001, 0.02, 0.013, 0.2], alpha=0.05)
    assert res["threshold"] == pytest.approx(0.0125) and res["m"] == 4
    assert res["significant"] == [True, False, False, False]  # 0.013 > 0.05 / 4 although < 0.05
