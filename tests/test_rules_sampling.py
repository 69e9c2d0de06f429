"""Rules inside `Guided` and the samplers: per-image, per-run state; CFG-Zero*'s zero-init without any pass; the step
schedules (step lists, step windows, a sigma threshold) with the guide pass skipped where w = 1; several guides; flow
time; CFG++ against hand-written DDIM / flow loops."""
import pytest
import torch

import autoguidance as ag
from autoguidance import rules
from autoguidance.guidance import Guide, Guided, Pass
from autoguidance.rules import APG, FDG, MAMBO, TCFG, CFGZeroStar, Rescale, combine, from_space, to_space
from autoguidance.schedules import Interval, StepList, StepWindow, as_schedule

from helpers import GaussianDenoiser, tiny_denoiser_mlp

ALL_RULES = [Rescale(), APG(eta=0.0, norm_threshold=2.0, momentum=-0.5), CFGZeroStar(), TCFG(), MAMBO(),
             Rescale(space="eps"), APG(space="v", momentum=-0.5), CFGZeroStar(space="v")]


class FlowGaussian(GaussianDenoiser):
    """The exact denoiser of N(m, s^2 I) also in flow time (x_t = (1 - t) x0 + t n), finite at t = 1."""

    def flow(self, x_t, t, labels=None):
        a = (1 - t).reshape(-1, *([1] * (x_t.ndim - 1)))
        tt = t.reshape(a.shape)
        return self.m + a * self.s ** 2 / (a ** 2 * self.s ** 2 + tt ** 2) * (x_t - a * self.m)


class Counting(torch.nn.Module):
    """A float64 Gaussian denoiser that counts the rows it is called on."""

    def __init__(self, m, s):
        super().__init__()
        self.d, self.rows = GaussianDenoiser(m, s), 0

    def forward(self, x, sigma, labels=None):
        self.rows += len(x)
        return self.d(x, sigma, labels)


def gen(D, seeds, steps=6, shape=(1, 4, 4), sampler="euler", **kw):
    return ag.generate(D, seeds, list(shape), num_steps=steps, sampler=sampler, progress=False, sigma_max=10.0,
                       **kw)


def close(a, b, atol_rel=1e-5):
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= atol_rel * scale


# -- state ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.describe())
def test_an_image_depends_neither_on_its_batch_nor_on_the_previous_run(rule):
    net, guide = GaussianDenoiser(0.3, 0.5), GaussianDenoiser(0.1, 0.7)
    D = ag.autoguidance(net, guide, 2.5, rule=rule)
    batch = gen(D, range(6), sampler="heun")
    again = gen(D, range(6), sampler="heun")
    assert torch.equal(batch, again)                              # same batch, same call: bit for bit
    alone = gen(D, [4], sampler="heun")
    split = gen(D, range(6), sampler="heun", batch=4)
    close(alone[0], batch[4])
    close(split, batch)
    plain = gen(ag.autoguidance(net, guide, 2.5), range(6), sampler="heun")
    assert float((plain - batch).abs().max()) > 1e-3               # the rule did something


def test_apg_momentum_is_used_and_lives_in_the_run():
    net, guide = tiny_denoiser_mlp(0), tiny_denoiser_mlp(1)
    with_m = gen(ag.autoguidance(net, guide, 3.0, rule=APG(momentum=-0.5)), range(4), shape=(2,))
    without = gen(ag.autoguidance(net, guide, 3.0, rule=APG()), range(4), shape=(2,))
    assert float((with_m - without).abs().max()) > 1e-3
    D = ag.autoguidance(net, guide, 3.0, rule=APG(momentum=-0.5))
    with pytest.raises(ValueError, match="keeps a state per image .* inside one of the library's samplers"):
        D(torch.zeros(2, 2), torch.ones(2))
    APG(momentum=0.0)  # stateless APG runs anywhere
    ag.autoguidance(net, guide, 3.0, rule=APG())(torch.zeros(2, 2), torch.ones(2))


def test_per_row_weights_update_momentum_only_where_the_guide_runs():
    net, guide = tiny_denoiser_mlp(0), tiny_denoiser_mlp(1)
    rule = APG(eta=0.0, momentum=-0.5)
    D = ag.autoguidance(net, guide, Interval(3.0, 0.5, 5.0), rule=rule)
    x = gen(D, range(5), shape=(2,), sampler="heun", steps=8)
    x1 = gen(D, [3], shape=(2,), sampler="heun", steps=8)
    close(x1[0], x[3])
    assert 0 < D.stats["guide0"] < D.stats["main"]


# -- CFG-Zero*'s zero-init -----------------------------------------------------------------------------------------

def test_zero_init_computes_no_pass_and_leaves_x_in_place():
    main, bad = Counting(0.3, 0.5), Counting(0.1, 0.7)
    D = ag.autoguidance(main, bad, 2.0, rule=CFGZeroStar(zero_init_steps=2))
    xs = []
    x0 = 10.0 * torch.randn(3, 1, 4, 4, dtype=torch.float64)
    ag.sample_heun(D, x0, ag.sigmas_karras(5, sigma_max=10.0, dtype=torch.float64), progress=False,
                   callback=lambda d: xs.append(d["x"]))
    assert torch.equal(xs[0], x0) and torch.equal(xs[1], x0)     # zero model output: x stays for two steps
    assert not torch.equal(xs[2], x0)
    calls = 2 * 5 - 1
    assert D.stats["zero_init"] == 3 * 4                         # the two Heun steps' four calls
    assert main.rows == 3 * (calls - 4) and bad.rows == 3 * (calls - 4)
    with pytest.raises(ValueError, match="zero_init_steps needs the sampler's step index"):
        D(x0, torch.full((3,), 2.0, dtype=torch.float64))
    ag.autoguidance(main, bad, 2.0, rule=CFGZeroStar(zero_init_steps=0))(x0, torch.full((3,), 2.0))


def test_zero_init_in_flow_time_keeps_x_t():
    main, bad = Counting(0.3, 0.5), Counting(0.1, 0.7)
    D = ag.autoguidance(main, bad, 2.0, rule=CFGZeroStar(zero_init_steps=1, space="v"))
    ts = torch.tensor([0.9, 0.6, 0.3, 0.0], dtype=torch.float64)
    xs = []
    x0 = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    ag.sample_flow_euler(D, x0, ts, progress=False, callback=lambda d: xs.append(d["x"]))
    assert torch.equal(xs[0], x0) and main.rows == 2 * 2


# -- step schedules --------------------------------------------------------------------------------------------------

def test_step_list_runs_the_guide_only_at_steps_where_w_is_not_one():
    main, bad = Counting(0.3, 0.5), Counting(0.1, 0.7)
    D = ag.autoguidance(main, bad, StepList((3.0, 3.0, 1.0, 2.0)), rule=APG(momentum=-0.5))
    gen(D, range(3), steps=4)
    assert bad.rows == 3 * 3 and main.rows == 3 * 4
    # the same as a linear CFG whose w changes per step by hand
    main2, bad2 = Counting(0.3, 0.5), Counting(0.1, 0.7)
    lin = ag.autoguidance(main2, bad2, StepList((7.0,) * 3 + (3.0,)))
    ref_ws = iter([7.0, 7.0, 7.0, 3.0])
    by_hand = gen(lambda x, s, l=None: main2(x, s) + (next(ref_ws) - 1) * (main2(x, s) - bad2(x, s)), range(3),
                  steps=4)
    close(gen(lin, range(3), steps=4), by_hand)


def test_step_list_with_heun_counts_the_correction_call_in_its_step():
    main, bad = Counting(0.3, 0.5), Counting(0.1, 0.7)
    D = ag.autoguidance(main, bad, StepList((1.0, 2.0, 1.0)))
    gen(D, range(2), steps=3, sampler="heun")
    assert bad.rows == 2 * 2                                     # step 1: Heun's two calls


def test_step_window_is_diffusers_start_stop():
    main, bad = Counting(0.3, 0.5), Counting(0.1, 0.7)
    D = ag.autoguidance(main, bad, StepWindow(3.0, start=0.25, stop=0.75), rule=Rescale())
    gen(D, range(2), steps=8)
    assert bad.rows == 2 * (6 - 2)                               # steps int(2) .. int(6) - 1


def test_sigma_threshold_stops_the_guide_pass():
    main, bad = Counting(0.3, 0.5), Counting(0.1, 0.7)
    D = ag.autoguidance(main, bad, Interval(4.0, sigma_lo=1.0), rule=MAMBO())
    sig = ag.sigmas_karras(8, sigma_max=10.0)
    gen(D, range(2), steps=8)
    assert bad.rows == 2 * int((sig[:-1] > 1.0).sum())


def test_step_schedules_are_refused_outside_a_sampler_and_with_the_wrong_length():
    D = ag.autoguidance(Counting(0.3, 0.5), Counting(0.1, 0.7), StepList((2.0, 2.0)))
    with pytest.raises(ValueError, match="StepList needs the sampler's step index"):
        D(torch.zeros(2, 1, 4, 4), torch.ones(2))
    with pytest.raises(ValueError, match="StepList has 2 values but the sampler runs 3 steps"):
        gen(D, range(2), steps=3)
    with pytest.raises(ValueError, match="StepWindow needs 0 <= start < stop <= 1"):
        StepWindow(2.0, 0.5, 0.2)
    with pytest.raises(ValueError, match="guidance weight w must be >= 0"):
        as_schedule(StepList((2.0, -1.0)))


def test_perturbation_strength_can_follow_a_step_list():
    net = tiny_denoiser_mlp(0, dropout=0.1)
    D = ag.insitu(net, 2.0, StepList((0.1, 0.0, 0.2)))
    x = gen(D, range(3), shape=(2,), steps=3)
    assert torch.isfinite(x).all()


# -- several guides ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", [Rescale(0.5), APG(eta=0.0), CFGZeroStar(zero_init_steps=0), TCFG(), MAMBO(2.0),
                                  FDG(scales=(1.0, 0.5), parallel_weights=(0.5, 1.0))], ids=lambda r: r.name)
def test_several_guides_combine_as_the_rule_says(rule):
    main, b1, b2 = GaussianDenoiser(0.3, 0.5), GaussianDenoiser(0.1, 0.7), GaussianDenoiser(-0.2, 0.4)
    D = Guided(Pass(main), [Guide(Pass(b1), as_schedule(2.5)), Guide(Pass(b2), as_schedule(1.5))], rule=rule)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)
    c, u1, u2 = main(x, sigma), b1(x, sigma), b2(x, sigma)
    expect, _ = combine(rule, c, [u1, u2], [2.5, 1.5])
    close(D(x, sigma), expect, 1e-12)


@pytest.mark.parametrize("rule", ALL_RULES + [TCFG(space="eps"), MAMBO(space="v")], ids=lambda r: r.describe())
def test_flow_call_equals_the_edm_call_at_the_same_point(rule):
    rule = CFGZeroStar(zero_init_steps=0, space=rule.space) if isinstance(rule, CFGZeroStar) else rule
    rule = APG(space=rule.space) if isinstance(rule, APG) else rule        # stateless: called outside a sampler
    D = ag.autoguidance(GaussianDenoiser(0.3, 0.5), GaussianDenoiser(0.1, 0.7), 3.0, rule=rule)
    x_t = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    col = (1 - t).reshape(-1, 1, 1, 1)
    close(D.flow(x_t, t), D(x_t / col, t / (1 - t)), 1e-10)
    # and in the rule's space the result is the rule applied to the passes' predictions there
    c, u = GaussianDenoiser(0.3, 0.5)(x_t / col, t / (1 - t)), GaussianDenoiser(0.1, 0.7)(x_t / col, t / (1 - t))
    g, _ = combine(rule, to_space(c, x_t, rule.space, t=t), [to_space(u, x_t, rule.space, t=t)], [3.0])
    close(D.flow(x_t, t), from_space(g, x_t, rule.space, t=t), 1e-10)


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.describe())
def test_flow_sampling_from_pure_noise_works_with_every_rule(rule):
    D = ag.autoguidance(FlowGaussian(0.3, 0.5), FlowGaussian(0.1, 0.7), 2.0, rule=rule)
    ts = torch.linspace(1.0, 0.0, 6, dtype=torch.float64)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    if rule.space == "eps":
        with pytest.raises(ValueError, match="undefined at flow time t = 1"):
            ag.sample_flow_euler(D, x, ts, progress=False)
        return
    assert torch.isfinite(ag.sample_flow_euler(D, x, ts, progress=False)).all()


# -- CFG++ -----------------------------------------------------------------------------------------------------------

def test_cfgpp_euler_equals_a_hand_written_ddim_loop():
    """Chung et al. 2024, DDIM form: x_{t-1} = sqrt(abar') x0_w + sqrt(1 - abar') eps_u, in VP variables
    (x_vp = x / sqrt(1 + sigma^2), abar = 1 / (1 + sigma^2))."""
    good, bad = GaussianDenoiser(0.3, 0.5), GaussianDenoiser(0.1, 0.7)
    lam = 0.625                                                      # exact in float32, as Guided casts w
    sig = ag.sigmas_karras(6, sigma_max=10.0, dtype=torch.float64)
    x = 10.0 * torch.randn(3, 1, 4, 4, dtype=torch.float64)
    ours = ag.sample_euler(ag.autoguidance(good, bad, lam), x, sig, progress=False, cfgpp=True)
    x_vp = x / (1 + sig[0] ** 2).sqrt()
    for s, s_next in zip(sig[:-1], sig[1:]):
        abar, abar_next = 1 / (1 + s ** 2), 1 / (1 + s_next ** 2)
        x_edm = x_vp / abar.sqrt()                                  # the net's input in EDM form
        d_u, d_c = bad(x_edm, s), good(x_edm, s)
        x0_w = d_u + lam * (d_c - d_u)
        eps_u = (x_vp - abar.sqrt() * d_u) / (1 - abar).sqrt()
        x_vp = abar_next.sqrt() * x0_w + (1 - abar_next).sqrt() * eps_u
    close(ours, x_vp, 1e-10)                                       # abar = 1 at sigma = 0: x_vp is x there


def test_cfgpp_flow_euler_equals_a_hand_written_loop():
    good, bad = GaussianDenoiser(0.3, 0.5), GaussianDenoiser(0.1, 0.7)
    lam = 0.75
    ts = torch.tensor([0.95, 0.7, 0.4, 0.1, 0.0], dtype=torch.float64)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    ours = ag.sample_flow_euler(ag.autoguidance(good, bad, lam), x, ts, progress=False, cfgpp=True)
    for t, tn in zip(ts[:-1], ts[1:]):
        xe, s = x / (1 - t), t / (1 - t)
        d_u, d_c = bad(xe, s), good(xe, s)
        x0_w = d_u + lam * (d_c - d_u)
        eps_u = (x - (1 - t) * d_u) / t
        x = (1 - tn) * x0_w + tn * eps_u
    close(ours, x, 1e-10)


def test_cfgpp_heun_is_plain_heun_without_a_difference_and_euler_cfgpp_on_its_last_step():
    good = GaussianDenoiser(0.3, 0.5)
    sig = ag.sigmas_karras(5, sigma_max=10.0, dtype=torch.float64)
    x = 10.0 * torch.randn(2, 1, 4, 4, dtype=torch.float64)
    same = ag.sample_heun(ag.autoguidance(good, good, 0.4), x, sig, progress=False, cfgpp=True)
    close(same, ag.sample_heun(good, x, sig, progress=False), 1e-10)
    bad = GaussianDenoiser(0.1, 0.7)
    one = torch.tensor([3.0, 0.0], dtype=torch.float64)          # one step to 0: Heun is Euler there
    D = ag.autoguidance(good, bad, 0.4)
    close(ag.sample_heun(D, x, one, progress=False, cfgpp=True), ag.sample_euler(D, x, one, progress=False,
                                                                                 cfgpp=True), 1e-12)
    different = ag.sample_heun(D, x, sig, progress=False, cfgpp=True)
    assert float((different - ag.sample_heun(D, x, sig, progress=False)).abs().max()) > 1e-3


def test_cfgpp_composes_with_a_rule_and_is_refused_where_it_cannot_run():
    good, bad = GaussianDenoiser(0.3, 0.5), GaussianDenoiser(0.1, 0.7)
    sig = ag.sigmas_karras(4, sigma_max=10.0, dtype=torch.float64)
    x = 10.0 * torch.randn(2, 1, 4, 4, dtype=torch.float64)
    assert torch.isfinite(ag.sample_euler(ag.autoguidance(good, bad, 0.5, rule=APG(momentum=-0.5)), x, sig,
                                          progress=False, cfgpp=True)).all()
    with pytest.raises(ValueError, match="needs a guided denoiser that returns both"):
        ag.sample_euler(good, x, sig, progress=False, cfgpp=True)
    two = ag.cfg_autoguidance(good, bad, 2.0, 0.5, uncond=bad)
    with pytest.raises(ValueError, match="needs exactly one guide"):
        ag.sample_euler(two, x, sig, progress=False, cfgpp=True)
    with pytest.raises(ValueError, match="cfgpp must be True or False"):
        ag.sample_euler(ag.autoguidance(good, bad, 0.5), x, sig, progress=False, cfgpp="yes")


def test_rules_are_importable_from_the_package_face():
    assert ag.APG is rules.APG and ag.rules.Rescale is Rescale and ag.StepList is StepList
    assert set(rules.RULES) == {"linear", "rescale", "apg", "cfg-zero", "tcfg", "fdg", "mambo"}
