import math

import pytest
import torch

import autoguidance as ag
from autoguidance.train.ema import PowerFunctionEMA, power_function_beta, std_to_gamma
from autoguidance.train.toy import build_toy_net, toy_loss, train_toy
from autoguidance.toy import tree_mixture


def test_ema_exponent_matches_its_relative_std():
    for std in (0.010, 0.05, 0.1):
        g = std_to_gamma(std)
        assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(std, rel=1e-9)
    assert power_function_beta(0.01, 1) == 0.0
    with pytest.raises(ValueError, match="EMA relative std"):
        std_to_gamma(0.5)


def test_ema_of_a_constant_is_the_constant_and_tracks_late_values():
    m = torch.nn.Linear(1, 1, bias=False)
    ema = PowerFunctionEMA(m, stds=(0.05, 0.1))
    for t in range(1, 101):
        with torch.no_grad():
            m.weight.fill_(float(t))
        ema.update(m)
    short, long = ema.averages[0.05].weight.item(), ema.averages[0.1].weight.item()
    assert 80 < long < short < 100    # a longer EMA averages further back


@pytest.mark.parametrize("family", ["logp", "denoiser"])
def test_training_lowers_the_exact_loss_and_saves_snapshots(family, tmp_path):
    gt = tree_mixture("A")
    g = torch.Generator().manual_seed(9)
    sigma = (torch.randn(2048, generator=g) * 1.5 - 2.3).exp()
    x = gt.sample(2048, sigma, generator=g)
    score = gt.score(x, sigma)
    torch.manual_seed(0)
    init = build_toy_net(family, width=16).eval()
    before = toy_loss(init, x, sigma, score).mean().item()
    net = train_toy(family, width=16, iters=60, batch=512, out=tmp_path / "ck", snapshots=[30], progress=False)
    after = toy_loss(net, x, sigma, score).mean().item()
    assert after < 0.7 * before
    assert ag.load(tmp_path / "ck-iter-000030").checkpoint_meta["iters_done"] == 30
    back = ag.load(tmp_path / "ck")
    assert back.checkpoint_meta["iters_done"] == 60 and back.config["width"] == 16
    # same seed, same result
    again = train_toy(family, width=16, iters=60, batch=512, progress=False)
    for a, b in zip(net.parameters(), again.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw, match", [
    (dict(family="mlp"), "unknown toy family"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(classes="C"), "unknown toy class"),
    (dict(iters=0), "iters and batch must be >= 1"),
    (dict(iters=10, snapshots=[20]), "snapshot iterations"),
])
def test_bad_training_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        train_toy(**{"iters": 2, "batch": 8, "progress": False, **kw})
