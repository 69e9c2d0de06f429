"""Frechet distance and precision/recall/density/coverage on known cases; the feature net's interface."""
import numpy as np
import pytest
import torch

from autoguidance.metrics.features import extract
from autoguidance.nets import DigitsClassifier
from autoguidance.metrics.frechet import feature_stats, frechet_distance, frechet_distance_features
from autoguidance.metrics.prdc import knn_radii, prdc


def test_fd_of_a_set_with_itself_is_zero():
    f = np.random.RandomState(0).randn(400, 16)
    assert abs(frechet_distance_features(f, f)) < 1e-8


def test_fd_known_gaussians():
    # N(mu1, a I) vs N(mu2, b I): |mu1 - mu2|^2 + d (sqrt(a) - sqrt(b))^2
    d = 5
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    fd = frechet_distance(mu1, 4 * np.eye(d), mu2, np.eye(d))
    assert fd == pytest.approx(d * 0.25 + d * (2 - 1) ** 2)
    # non-commuting covariances against scipy's sqrtm
    from scipy.linalg import sqrtm
    rs = np.random.RandomState(1)
    a, b = rs.randn(d, d), rs.randn(d, d)
    s1, s2 = a @ a.T + np.eye(d), b @ b.T + np.eye(d)
    want = np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu1, s2) == pytest.approx(want, rel=1e-8)


def test_feature_stats_unbiased():
    f = np.random.RandomState(2).randn(50, 3)
    mu, s = feature_stats(f)
    assert np.allclose(s, np.cov(f, rowvar=False)) and np.allclose(mu, f.mean(0))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(f[:1])


def test_prdc_sanity():
    rs = np.random.RandomState(3)
    real = rs.randn(300, 8)
    same = prdc(real, real.copy())
    assert same["precision"] == 1 and same["recall"] == 1 and same["coverage"] == 1
    assert same["density"] == pytest.approx(6 / 5)   # each point in its own ball and its k = 5 neighbours
    far = prdc(real, rs.randn(300, 8) + 20)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    collapsed = prdc(real, rs.randn(300, 8) * 0.05)   # all samples at the mode: precise, not diverse
    assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.2 and collapsed["coverage"] < 0.3
    assert knn_radii(np.array([[0.0], [1.0], [3.0]]), 1).tolist() == [1.0, 1.0, 2.0]


def test_feature_net_shapes():
    net = DigitsClassifier()
    f, logits = extract(net, torch.rand(7, 1, 8, 8) * 2 - 1)
    assert f.shape == (7, 64) and logits.shape == (7, 10)
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        net.features(torch.zeros(2, 8, 8))


def test_feature_classifier_takes_its_resolution_and_names_the_shape():
    import pytest

    net = DigitsClassifier(resolution=14)
    assert net.features(torch.zeros(3, 1, 14, 14)).shape == (3, 64)
    assert net.config["resolution"] == 14 and "resolution" not in DigitsClassifier().config  # old configs load
    with pytest.raises(ValueError, match=r"takes images \[N, 1, 14, 14\]"):
        net.features(torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match="even number"):
        DigitsClassifier(resolution=7)
