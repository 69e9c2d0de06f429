import pytest
import torch

from autoguidance.metrics.toy import reference, sliced_w2, summarize, toy_metrics
from autoguidance.toy import tree_mixture


def test_exact_samples_score_as_the_truth():
    x = tree_mixture("A").sample(8192, generator=torch.Generator().manual_seed(11))
    m = toy_metrics(x)
    assert abs(m["outlier_rate"] - 0.01) < 0.004        # 1% by construction
    assert m["coverage_tv"] < 0.06 and m["sliced_w2"] < 0.02


def test_metrics_see_outliers_and_dropped_branches():
    gt = tree_mixture("A")
    x = gt.sample(8192, generator=torch.Generator().manual_seed(12))
    blurred = gt.sample(8192, 0.05, generator=torch.Generator().manual_seed(12))
    mb = toy_metrics(blurred)
    assert mb["outlier_rate"] > 0.2 and mb["mean_logp"] < toy_metrics(x)["mean_logp"]
    # drop every point whose nearest branch is in the first half of the tree: coverage TV grows
    seg = gt.segment[gt.most_responsible(x)]
    kept = x[seg >= 64]
    assert toy_metrics(kept)["coverage_tv"] > 0.3


def test_non_finite_samples_count_as_outliers():
    x = tree_mixture("A").sample(1000, generator=torch.Generator().manual_seed(13))
    x[:100] = float("nan")
    assert toy_metrics(x)["outlier_rate"] >= 0.1


def test_sliced_w2_and_summary():
    ref = reference("A")
    a = torch.randn(500, 2)
    assert sliced_w2(a, a, ref.directions) == 0.0
    assert sliced_w2(a, a + torch.tensor([0.3, 0.0]), ref.directions) == pytest.approx(
        0.3 * ref.directions[0].abs().square().mean().sqrt().item(), rel=1e-3)
    s = summarize([{"m": 1.0}, {"m": 3.0}])
    assert s["m"]["mean"] == 2.0 and s["m"]["std"] == pytest.approx(2 ** 0.5)
    with pytest.raises(ValueError, match=r"shape \[N, 2\]"):
        toy_metrics(torch.zeros(3))
