"""The further feature spaces of the image tables: the self-supervised encoder (SimCLR) and pixel space (PCA)."""
import math

import pytest
import torch

from autoguidance.checkpoint import load
from autoguidance.data.digits import Digits
from autoguidance.metrics.features import extract, load_feature_net
from autoguidance.metrics.pixels import PixelPCA
from autoguidance.nets.encoder import ContrastiveEncoder
from autoguidance.train.contrastive import augment, knn_accuracy, nt_xent, train_contrastive
from helpers import assert_batch_close


def test_pixel_pca_is_the_covariance_eigenbasis_and_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 1, 6, 6, generator=g) * torch.linspace(0.1, 2.0, 36).reshape(1, 1, 6, 6)
    pca = PixelPCA.fit(x, dim=5)
    flat = x.reshape(500, -1).double()
    cov = torch.cov(flat.T)
    comps = pca.components
    # orthonormal, and each column an eigenvector of the covariance, with the largest eigenvalues first
    assert torch.allclose(comps.T @ comps, torch.eye(5, dtype=torch.float64), atol=1e-10)
    vals = torch.linalg.eigvalsh(cov).flip(0)[:5]
    assert torch.allclose(cov @ comps, comps * vals, atol=1e-8)
    f = pca.features(x)
    assert f.shape == (500, 5)
    assert torch.allclose(f.double(), (flat - flat.mean(0)) @ comps, atol=1e-5)
    again = PixelPCA.fit(x, dim=5)
    assert torch.equal(again.components, pca.components) and again.digest() == pca.digest()   # same inputs, same op
    with pytest.raises(ValueError, match="pixel-space features take images"):
        pca.features(torch.zeros(2, 1, 5, 5))
    with pytest.raises(ValueError, match="dim must be in"):
        PixelPCA.fit(x, dim=37)


def test_nt_xent_equals_the_definition():
    g = torch.Generator().manual_seed(1)
    z1 = torch.nn.functional.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=1)
    z2 = torch.nn.functional.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=1)
    tau = 0.3
    z = torch.cat([z1, z2])
    total = 0.0
    for i in range(8):
        pos = (i + 4) % 8
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(8) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / tau) / denom)
    assert math.isclose(float(nt_xent(z1, z2, tau)), total / 8, rel_tol=1e-10)


def test_augment_keeps_shape_and_range_and_is_seeded():
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and float(a.min()) >= -1 and float(a.max()) <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(4)))


def test_encoder_features_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    net = ContrastiveEncoder(channels=8).eval()
    x = torch.rand(10, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        whole = net.features(x)
        alone = torch.cat([net.features(x[i:i + 1]) for i in range(10)])
    assert whole.shape == (10, 32)
    assert_batch_close(alone, whole)         # GroupNorm: no batch statistics
    with pytest.raises(ValueError, match=r"takes images \[N, 1, 28, 28\]"):
        net.features(torch.zeros(2, 1, 14, 14))


def test_knn_accuracy_on_separable_features():
    train_f = torch.cat([torch.randn(50, 4) + 10, torch.randn(50, 4) - 10])
    train_y = torch.cat([torch.zeros(50), torch.ones(50)]).long()
    test_f = torch.stack([torch.full((4,), 9.0), torch.full((4,), -9.0), torch.full((4,), 11.0)])
    assert knn_accuracy(train_f, train_y, test_f, torch.tensor([0, 1, 1]), k=5) == pytest.approx(2 / 3)


def test_train_contrastive_saves_a_label_free_feature_net(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 28, 28, generator=g) * 2 - 1
    classes = torch.arange(64) % 10
    split = Digits("train", images, torch.nn.functional.one_hot(classes, 10).float(), classes, None)
    net = train_contrastive(split, split, tmp_path / "enc", epochs=1, batch=32, channels=8, progress=False)
    meta = net.checkpoint_meta
    assert meta["epochs"] == 1 and 0.0 <= meta["knn20_test_accuracy"] <= 1.0
    back = load_feature_net(tmp_path / "enc")
    assert isinstance(back, ContrastiveEncoder)
    f, logits = extract(back, images[:5])
    assert f.shape == (5, 32) and logits is None
    assert torch.equal(f, extract(load(tmp_path / "enc"), images[:5])[0])   # same weights, same call
