"""The tree mixture against an independent float64 construction written from the spec (RESEARCH.md sec. 3)."""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from autoguidance.toy import tree_components, tree_mixture


def _spec_components(classes):
    """A second, deliberately plain implementation of the published construction (float64, full matrices)."""
    rnd = np.random.RandomState(2)
    out = []
    origin, scale = np.array([0.0030, 0.0325]), np.array([1.3136, 1.3844])

    def rec(cls, depth, pos, angle):
        if depth >= 7:
            return
        d = np.array([np.cos(angle), np.sin(angle)])
        dist = 0.292 * (0.8 ** depth) * (rnd.randn() * 0.2 + 1)
        thick = 0.2 * (0.8 ** depth) / dist
        size = scale * dist * 0.06
        for t in np.linspace(0.07, 0.93, num=8):
            cov = (np.outer(d, d) + (np.eye(2) - np.outer(d, d)) * thick ** 2) * np.outer(size, size)
            out.append((cls, dist * 0.5 ** depth, (pos + d * dist * t) * scale, cov))
        for sign in (1, -1):
            rec(cls, depth + 1, pos + d * dist, angle + sign * (0.7 ** depth) * (rnd.randn() * 0.2 + 1))

    rec("A", 0, origin, np.pi * 0.25)
    rec("B", 0, origin, np.pi * 1.25)
    sel = [c for c in out if c[0] in classes]
    phi = np.array([c[1] for c in sel])
    return phi / phi.sum(), np.array([c[2] for c in sel]), np.array([c[3] for c in sel])


def _spec_logp_score(classes, x, sigma):
    phi, mu, cov = _spec_components(classes)
    logps, scores = [], []
    for xi, si in zip(x, sigma):
        C = cov + si ** 2 * np.eye(2)
        inv = np.linalg.inv(C)
        diff = mu - xi
        maha = np.einsum("ki,kij,kj->k", diff, inv, diff)
        logn = np.log(phi) - 0.5 * (2 * np.log(2 * np.pi) + np.log(np.linalg.det(C)) + maha)
        lse = logsumexp(logn)
        r = np.exp(logn - lse)
        logps.append(lse)
        scores.append(np.einsum("k,kij,kj->i", r, inv, diff))
    return np.array(logps), np.array(scores)


def test_construction_facts():
    c = tree_components()
    assert (c.cls == "A").sum() == 1016 and (c.cls == "B").sum() == 1016
    assert c.segment[c.cls == "A"].max() == 126 and len(set(c.segment[c.cls == "B"])) == 127
    ab = tree_mixture("AB")
    assert ab.num_components == 2032
    x = ab.sample(200_000, generator=torch.Generator().manual_seed(0)).double()
    assert x.mean(0).abs().max() < 0.03          # the union is centred ...
    assert (x.std(0) - 0.5).abs().max() < 0.05   # ... with per-axis std ~ sigma_data = 0.5


@pytest.mark.parametrize("classes", ["A", "B", "AB"])
def test_logp_and_score_match_the_published_construction(classes):
    g = np.random.RandomState(7)
    n = 48
    # points on the tree, near it, and far away; sigma log-uniform over [0.002, 5]
    gt = tree_mixture(classes)
    near = gt.sample(n // 2, 0.02, generator=torch.Generator().manual_seed(3)).double().numpy()
    far = g.uniform(-3, 3, size=(n // 2, 2))
    x = np.concatenate([near, far])
    sigma = np.exp(g.uniform(np.log(0.002), np.log(5.0), size=n))
    ref_lp, ref_sc = _spec_logp_score(classes, x, sigma)
    xt, st = torch.tensor(x, dtype=torch.float32), torch.tensor(sigma, dtype=torch.float32)
    lp = gt.logp(xt, st).double().numpy()
    sc = gt.score(xt, st).double().numpy()
    assert np.all(np.isfinite(lp))
    # inputs are rounded to float32 first: compare with the reference at the rounded inputs
    ref_lp, ref_sc = _spec_logp_score(classes, xt.double().numpy(), st.double().numpy())
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-4, atol=1e-4)
    scale = np.linalg.norm(ref_sc, axis=1, keepdims=True)
    assert np.all(np.abs(sc - ref_sc) <= 1e-4 * scale + 1e-4), np.abs(sc - ref_sc).max()


def test_logp_is_finite_far_from_the_tree_where_a_plain_sum_underflows():
    gt = tree_mixture("A")
    x = torch.tensor([[50.0, -40.0], [3.0, 3.0]])
    lp = gt.logp(x, 0.002)
    assert torch.isfinite(lp).all() and lp[0] < -1e6
    assert torch.isfinite(gt.score(x, 0.002)).all()


def test_score_is_the_gradient_of_logp():
    gt = tree_mixture("A")
    x = gt.sample(64, 0.1, generator=torch.Generator().manual_seed(1)).double()
    s = torch.full((64,), 0.1)
    eps = 1e-3
    fd = torch.stack([(gt.logp((x + eps * e).float(), s) - gt.logp((x - eps * e).float(), s)) / (2 * eps)
                      for e in torch.eye(2, dtype=torch.float64)], 1)
    torch.testing.assert_close(gt.score(x.float(), s), fd.float(), rtol=2e-2, atol=2e-2)


def test_sampling_is_seeded_and_matches_the_mixture():
    gt = tree_mixture("A")
    a = gt.sample(1000, 0.3, generator=torch.Generator().manual_seed(5))
    b = gt.sample(1000, 0.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # moments of the diffused mixture: mean sum phi mu, covariance + sigma^2 I
    x = gt.sample(400_000, 0.3, generator=torch.Generator().manual_seed(6)).double()
    mean = (gt.phi[:, None].double() * gt.mu.double()).sum(0)
    torch.testing.assert_close(x.mean(0), mean, atol=4e-3, rtol=0)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown toy class 'C'"):
        tree_mixture("C")
    gt = tree_mixture("A")
    with pytest.raises(ValueError, match=r"shape \[N, 2\]"):
        gt.logp(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="sigma must be a scalar or have shape"):
        gt.score(torch.zeros(3, 2), torch.ones(4))
    with pytest.raises(ValueError, match="finite and >= 0"):
        gt.logp(torch.zeros(3, 2), -1.0)
