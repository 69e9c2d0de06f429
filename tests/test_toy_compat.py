import pytest
import torch

from autoguidance.experiments.toy_compat import measure
from autoguidance.toy import tree_mixture


def _shifted(k):
    gt = tree_mixture("A")
    return lambda x, sigma, labels=None: gt.denoise(x, sigma) + k * torch.tensor([0.01, -0.02])


def test_a_guide_making_the_same_error_twice_as_big_is_perfectly_compatible():
    rows = measure(_shifted(1.0), _shifted(2.0), sigmas=(0.05, 0.5), n=256)
    for r in rows:
        assert r["cos"] == pytest.approx(1.0, abs=1e-5)
        assert r["w_star"] == pytest.approx(2.0, rel=1e-4)      # D_bad + 2 (D_good - D_bad) = D_true
        assert r["err_removed"] == pytest.approx(1.0, abs=1e-5)


def test_a_guide_with_the_opposite_error_points_away():
    rows = measure(_shifted(1.0), _shifted(-1.0), sigmas=(0.1,), n=256)
    assert rows[0]["cos"] == pytest.approx(-1.0, abs=1e-5) and rows[0]["w_star"] == pytest.approx(0.5, rel=1e-4)
