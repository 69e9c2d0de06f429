import math

import pytest
import torch

import autoguidance as ag
from autoguidance.guidance import Guided
from autoguidance.rng import current_keys
from autoguidance.schedules import Constant, Interval, Ramp
from helpers import GaussianDenoiser, assert_batch_close, tiny_denoiser_mlp


def test_combination_is_d_bad_plus_w_times_difference():
    good, bad = GaussianDenoiser(0.3, 0.5), GaussianDenoiser(-0.2, 0.7)
    x, s = torch.randn(8, 2), torch.full((8,), 0.8)
    for w in (0.0, 1.0, 2.5):
        D = ag.autoguidance(good, bad, w)(x, s)
        torch.testing.assert_close(D, bad(x, s) + w * (good(x, s) - bad(x, s)))


def test_w_equal_one_skips_the_guide_pass_and_interval_runs_it_only_inside():
    good, bad = GaussianDenoiser(0.3), GaussianDenoiser(-0.2)
    D = ag.autoguidance(good, bad, 1.0)
    x = torch.randn(5, 2)
    torch.testing.assert_close(D(x, 1.0), good(x, 1.0))
    assert D.stats["main"] == 5 and D.stats["guide0"] == 0 and bad.calls == []  # the guide never ran
    bad.calls.clear()
    D = ag.autoguidance(good, bad, 2.0, interval=(0.28, 2.9))
    sigma = torch.tensor([0.1, 0.28, 0.3, 2.9, 3.0])
    out = D(x, sigma)
    assert bad.calls == [2]                      # rows with sigma in (0.28, 2.9] only
    expect = good(x, sigma).clone()
    inside = (sigma > 0.28) & (sigma <= 2.9)
    expect[inside] = (bad(x, sigma) + 2.0 * (good(x, sigma) - bad(x, sigma)))[inside]
    torch.testing.assert_close(out, expect)


def test_cfg_on_one_net_is_one_batched_call_with_zero_labels():
    net = GaussianDenoiser()
    labels = torch.nn.functional.one_hot(torch.tensor([0, 2, 1]), 3).float() * 0.5
    x = torch.randn(3, 2)
    D = ag.cfg(net, 3.0)
    out = D(x, 0.5, labels)
    assert net.calls == [6]                       # cond and uncond rows side by side
    cond, unc = net(x, 0.5, labels), net(x, 0.5, torch.zeros_like(labels))
    torch.testing.assert_close(out, unc + 3.0 * (cond - unc))


def test_cfg_with_separate_unconditional_net_and_labels_none():
    net, unc = GaussianDenoiser(0.3), GaussianDenoiser(0.0, 0.9)
    x = torch.randn(4, 2)
    out = ag.cfg(net, 4.0, uncond=unc)(x, 0.7)
    torch.testing.assert_close(out, unc(x, 0.7) + 4.0 * (net(x, 0.7) - unc(x, 0.7)))


def test_cfg_autoguidance_composition_matches_appendix_b2():
    m, g, u = GaussianDenoiser(0.3), GaussianDenoiser(0.1, 0.6), GaussianDenoiser(0.0, 0.9)
    x, s = torch.randn(6, 2), 0.9
    w, a = 2.5, 0.4
    w_u, w_c = (1 - a) * (w - 1) + 1, a * (w - 1) + 1
    out = ag.cfg_autoguidance(m, g, w, a, uncond=u)(x, s)
    Dm = m(x, s)
    torch.testing.assert_close(out, Dm + (w_u - 1) * (Dm - u(x, s)) + (w_c - 1) * (Dm - g(x, s)))
    # a = 1 is pure autoguidance, a = 0 pure CFG
    torch.testing.assert_close(ag.cfg_autoguidance(m, g, w, 1.0, uncond=u)(x, s), ag.autoguidance(m, g, w)(x, s))
    torch.testing.assert_close(ag.cfg_autoguidance(m, g, w, 0.0, uncond=u)(x, s), ag.cfg(m, w, uncond=u)(x, s))


def test_insitu_weight_converts_the_papers_w_prime():
    assert ag.insitu_weight(2.0) == 3.0
    assert ag.insitu_weight(1.10) == pytest.approx(2.10)
    with pytest.raises(ValueError):
        ag.insitu_weight(-1.5)


def test_insitu_batched_call_equals_two_separate_calls():
    net = tiny_denoiser_mlp()
    x, s = torch.randn(32, 2), torch.full((32,), 0.4)
    D = ag.insitu(net, 3.0, 0.2, max_batch=None)
    out = D(x, s)
    assert D.stats["forward_calls"] == 1
    # the same degraded rows, evaluated alone through the perturbation engine
    pert = D.guides[0].pass_.perturbation
    keys = current_keys(32)
    with pert.active(net, torch.ones(32, dtype=torch.bool), keys, s):
        bad = net(x, s)
    good = net(x, s)
    assert (bad - good).abs().max() > 1e-3          # dropout really changed the guide pass
    assert_batch_close(out, bad + 3.0 * (good - bad))    # one call of 64 rows against two of 32


def test_max_batch_splits_calls_without_changing_the_result():
    net = tiny_denoiser_mlp()
    x, s = torch.randn(40, 2), torch.full((40,), 0.4)
    full = ag.insitu(net, 3.0, 0.2)(x, s)
    D = ag.insitu(net, 3.0, 0.2, max_batch=7)
    split = D(x, s)
    assert_batch_close(split, full)
    assert D.stats["forward_calls"] == 12              # 80 rows (exact + dropout) in chunks of 7


def test_schedules():
    sigma = torch.tensor([0.01, 0.5, 3.0, 10.0])
    assert torch.equal(Constant(2.0)(sigma), torch.full((4,), 2.0))
    assert Interval(2.0, 0.28, 2.9)(sigma).tolist() == [1.0, 2.0, 1.0, 1.0]
    r = Ramp(3.0, 1.0, sigma_from=5.0, sigma_to=0.05)(sigma)
    assert r[0] == 1.0 and r[3] == 3.0 and 1.0 < r[1] < r[2] < 3.0
    assert r[1].item() == pytest.approx(1.0 + 2.0 * math.log(0.5 / 0.05) / math.log(100))


@pytest.mark.parametrize("make, match", [
    (lambda n: ag.autoguidance(n, n, -0.5), "w must be >= 0"),
    (lambda n: ag.autoguidance(n, n, float("nan")), "finite"),
    (lambda n: ag.insitu(n, 3.0, 1.0), r"p must be in \[0, 1\)"),
    (lambda n: ag.insitu(n, 3.0, -0.1), r"p must be in \[0, 1\)"),
    (lambda n: ag.cfg(n, 2.0, interval=(2.9, 0.28)), "inverted"),
    (lambda n: ag.cfg(n, 2.0, interval=(-1.0, 0.5)), "non-negative"),
    (lambda n: ag.cfg_autoguidance(n, n, 2.0, 1.5), "a must be in"),
    (lambda n: Guided(n, max_batch=0), "max_batch"),
])
def test_bad_guidance_settings_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make(GaussianDenoiser())


def test_bad_call_inputs_are_rejected():
    D = ag.autoguidance(GaussianDenoiser(), GaussianDenoiser(), 2.0)
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        D(torch.zeros(2, 2), 0.0)
    with pytest.raises(ValueError, match="per-sample tensor of shape"):
        D(torch.zeros(2, 2), torch.ones(3))
    with pytest.raises(ValueError, match="labels must be None or a tensor of shape"):
        D(torch.zeros(2, 2), 1.0, torch.zeros(3, 4))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        D([[0.0, 0.0]], 1.0)


def test_input_noise_guidance_works_on_a_plain_function_and_hooks_need_a_module():
    f = GaussianDenoiser()
    x = torch.randn(6, 2)
    out = ag.perturbation_guidance(f, 2.0, ag.InputNoise(0.2))(x, 0.5)
    assert out.shape == x.shape and not torch.allclose(out, f(x, 0.5))
    with pytest.raises(TypeError, match="pass module="):
        ag.perturbation_guidance(f, 2.0, ag.Dropout(0.1, where="x"))(x, 0.5)
