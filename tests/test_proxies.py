"""The proxy study's estimators: Spearman, the on-data w*(sigma) (unbiased with x0 in place of D_true), SG-prev's
Delta, the tabulated w(sigma) schedule."""
import math

import pytest
import torch

from autoguidance.experiments.proxies import (correlations, level_stats, prev_step_delta, spearman,
                                              summarize_levels, trajectory_stats)
from autoguidance.guides import Tabulated


def test_spearman_matches_the_definition():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    scipy = pytest.importorskip("scipy.stats")
    a, b = [0.3, 0.1, 0.1, 0.9, 0.5, 0.2], [3, 1, 2, 2, 5, 0]
    assert spearman(a, b) == pytest.approx(scipy.spearmanr(a, b).correlation)


def _gauss_setup(n=20000):
    # x0 ~ N(0, I_4): D_true(x; s) = x / (1 + s^2). Main = 0.5 D_true, guide = 0.25 D_true: D_good + (w - 1) Delta
    # = D_true at w = 3, so w* = 3 at every sigma.
    x0 = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    truth = lambda x, s: x / (1 + s * s)

    def delta_fn(x, s, labels, i, trajectory=None):
        g = 0.5 * truth(x, s)
        return g, g - 0.25 * truth(x, s)
    return x0, truth, delta_fn


def test_wstar_on_data_is_unbiased_with_x0_in_place_of_d_true():
    x0, truth, fn = _gauss_setup()
    exact = level_stats(fn, x0, [0.5, 1.0, 2.0], seed=1, target=truth)
    est = level_stats(fn, x0, [0.5, 1.0, 2.0], seed=1)
    for e, r in zip(exact, est):
        assert e["w_star"] == pytest.approx(3.0, abs=1e-6)
        assert e["corr"] == pytest.approx(1.0, abs=1e-6)      # Delta is parallel to the exact error
        assert r["w_star"] == pytest.approx(3.0, abs=0.1)     # x0 adds noise, not bias
        assert 0 < r["corr"] < 1                              # ... and dilutes the correlation
        assert r["loss_bad"] > r["loss_good"]
    p = summarize_levels(est)
    assert p["data_corr"] > 0 and p["loss_gap"] > 0 and p["delta_size"] > 0


def test_trajectory_stats_and_prev_step_delta_run_on_a_toy_denoiser():
    x0, truth, fn = _gauss_setup(256)
    main = lambda x, s, labels=None: 0.5 * x / (1 + torch.as_tensor(s).reshape(-1, 1) ** 2)
    sig = torch.tensor([4.0, 1.0, 0.3, 0.0])
    rows = trajectory_stats(main, prev_step_delta(main, sig[:-1]), truth, 4.0 * torch.randn(256, 4), sig)
    assert [r["sigma"] for r in rows] == pytest.approx([4.0, 1.0, 0.3])
    assert rows[0]["dd"] == 0                                   # no previous level at the first one
    data = level_stats(prev_step_delta(main, sig[:-1]), x0, sig[:-1].tolist(), seed=2)
    assert data[0]["dd"] == 0 and data[1]["dd"] > 0


def test_correlations_use_the_registered_direction():
    rows = [{"set": "toy", "quality": q, "proxies": {"data_corr": c, "loss_gap": g}}
            for q, c, g in ((0.1, 0.0, 3.0), (-0.2, 0.5, 1.0), (0.3, -0.2, 5.0))]
    c = correlations(rows)["toy"]
    assert c["data_corr"]["spearman"] == pytest.approx(1.0)    # higher corr, lower (better) quality
    assert c["loss_gap"]["spearman"] == pytest.approx(1.0)     # smaller gap, better


def test_tabulated_schedule_interpolates_in_log_sigma():
    t = Tabulated([0.1, 10.0], [3.0, 1.0])
    v = t(torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0]))
    assert v.tolist() == pytest.approx([3.0, 3.0, 2.0, 1.0, 1.0])
    assert Tabulated([1.0], [2.0])(torch.tensor([0.5, 5.0])).tolist() == [2.0, 2.0]
    with pytest.raises(ValueError):
        Tabulated([1.0, -1.0], [1.0, 2.0])
