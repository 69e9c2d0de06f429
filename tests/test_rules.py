"""Each combination rule against its paper's formula (written out here) and its anchor's implementation (diffusers
0.42's guiders and `rescale_noise_cfg`), on random float64 tensors at rel 1e-6, both where they agree and in the
forms where they differ on purpose; the several-guide generalisations; the spaces."""
import math

import pytest
import torch

from autoguidance import rules
from autoguidance.rules import APG, FDG, MAMBO, TCFG, CFGZeroStar, Linear, Rescale, combine
from autoguidance.rules.base import from_space, to_space

guiders = pytest.importorskip("diffusers.guiders")

REL = 1e-6


def close(a, b, rel=REL):
    """|a - b| <= rel * max|b| (relative to the value scale)."""
    scale = float(b.abs().max())
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} x scale {scale:.3g}"


def pair(shape=(4, 3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(shape, generator=g, dtype=torch.float64)
    u = c + 0.6 * torch.randn(shape, generator=g, dtype=torch.float64)
    return c, u


def _state(guider, step, n=10):
    """The guider at `step` of `n`, as its `forward(pred_cond, pred_uncond)`."""
    guider.set_state(step=step, num_inference_steps=n, timestep=torch.tensor(999 - step))
    return guider.forward


# -- rescale -----------------------------------------------------------------------------------------------------

def test_rescale_equals_the_paper_and_diffusers_rescale_noise_cfg():
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    c, u = pair()
    w, phi = 4.0, 0.7
    g = u + w * (c - u)
    dims = [1, 2, 3]
    paper = phi * g * c.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True) + (1 - phi) * g
    ours, _ = combine(Rescale(phi), c, [u], [w])
    close(ours, paper)
    close(ours, rescale_noise_cfg(g, c, phi))


def test_rescale_with_several_guides_rescales_once_after_the_sum():
    c, u1 = pair(seed=1)
    _, u2 = pair(seed=2)
    g = c + 1.5 * (c - u1) + 0.5 * (c - u2)
    expect = 0.5 * g * c.std(dim=[1, 2, 3], keepdim=True) / g.std(dim=[1, 2, 3], keepdim=True) + 0.5 * g
    ours, _ = combine(Rescale(0.5), c, [u1, u2], [2.5, 1.5])
    close(ours, expect)


# -- APG ----------------------------------------------------------------------------------------------------------

def _apg_paper(c, u, w, eta, r, avg):
    """Sadat et al. 2024: avg = D + m avg; clip to r; c + (w - 1)(D_orth + eta D_par)."""
    d = avg
    if r > 0:
        d = d * torch.clamp(r / d.flatten(1).norm(dim=1), max=1.0).reshape(-1, 1, 1, 1)
    unit = c / c.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    par = (d * unit).sum(dim=[1, 2, 3], keepdim=True) * unit
    return c + (w - 1) * ((d - par) + eta * par)


def test_apg_paper_form_over_steps_with_momentum():
    w, eta, r, m = 3.0, 0.2, 5.0, -0.5
    rule = APG(eta=eta, norm_threshold=r, momentum=m)
    state, avg = None, None
    for step in range(4):
        c, u = pair(seed=10 + step)
        ours, (state,) = combine(rule, c, [u], [w], [state])
        avg = (c - u) if avg is None else (c - u) + m * avg
        close(ours, _apg_paper(c, u, w, eta, r, avg))


def test_apg_unconditional_form_equals_diffusers_default_and_conditional_its_original_formulation():
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    w, eta, r, m = 3.0, 0.3, 6.0, -0.75
    for form, original, scale in (("unconditional", False, w), ("conditional", True, w - 1)):
        rule = APG(eta=eta, norm_threshold=r, momentum=m, form=form)
        buf, state = MomentumBuffer(m), None
        for step in range(3):
            c, u = pair(seed=20 + step)
            ours, (state,) = combine(rule, c, [u], [w], [state])
            close(ours, normalized_guidance(c, u, scale, buf, eta, r, original))


def test_apg_forms_agree_only_for_the_plain_difference():
    c, u = pair(seed=3)
    plain = [combine(APG(eta=1.0, form=f), c, [u], [2.5])[0] for f in ("conditional", "unconditional")]
    close(plain[0], plain[1])
    close(plain[0], u + 2.5 * (c - u))
    proj = [combine(APG(eta=0.0, form=f), c, [u], [2.5])[0] for f in ("conditional", "unconditional")]
    assert float((proj[0] - proj[1]).abs().max()) > 1e-2


def test_apg_several_guides_each_have_their_own_momentum():
    rule = APG(eta=0.0, momentum=-0.5)
    states, avgs = None, [None, None]
    for step in range(3):
        c, u1 = pair(seed=30 + step)
        _, u2 = pair(seed=40 + step)
        ours, states = combine(rule, c, [u1, u2], [2.0, 1.5], states)
        expect = c
        for k, (u, w) in enumerate(((u1, 2.0), (u2, 1.5))):
            avgs[k] = (c - u) if avgs[k] is None else (c - u) - 0.5 * avgs[k]
            expect = expect + (_apg_paper(c, u, w, 0.0, 0.0, avgs[k]) - c)
        close(ours, expect)


# -- CFG-Zero* -------------------------------------------------------------------------------------------------------

def test_cfg_zero_star_equals_the_paper_and_diffusers_after_zero_init():
    c, u = pair(seed=4)
    w = 4.5
    alpha = (c * u).flatten(1).sum(1) / (u * u).flatten(1).sum(1)
    us = alpha.reshape(-1, 1, 1, 1) * u
    paper = us + w * (c - us)
    ours, _ = combine(CFGZeroStar(), c, [u], [w])
    close(ours, paper)
    # diffusers computes alpha in float32 (and adds 1e-8 to ||u||^2): agreement to float32 precision
    anchor = _state(guiders.ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=1), 1)(c, u).pred
    close(ours, anchor, rel=1e-6)
    zero = _state(guiders.ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=1), 0)(c, u).pred
    assert torch.count_nonzero(zero) == 0      # the anchor zeroes step 0 but needed both predictions for it


def test_cfg_zero_star_several_guides_each_get_their_alpha():
    c, u1 = pair(seed=5)
    _, u2 = pair(seed=6)
    expect = c
    for u, w in ((u1, 3.0), (u2, 2.0)):
        a = ((c * u).flatten(1).sum(1) / (u * u).flatten(1).sum(1)).reshape(-1, 1, 1, 1)
        expect = expect + (w - 1) * (c - a * u)
    close(combine(CFGZeroStar(), c, [u1, u2], [3.0, 2.0])[0], expect)


# -- TCFG ------------------------------------------------------------------------------------------------------------

def test_tcfg_equals_the_svd_formula_and_diffusers_function():
    from diffusers.guiders.tangential_classifier_free_guidance import normalized_guidance

    c, u = pair(seed=7)
    w = 3.0
    m = torch.stack([c.flatten(1), u.flatten(1)], 1)                     # [N, 2, D]
    v1 = torch.linalg.svd(m, full_matrices=False).Vh[:, 0]               # first right-singular vector, float64
    up = ((u.flatten(1) * v1).sum(1, keepdim=True) * v1).reshape(u.shape)
    ours, _ = combine(TCFG(), c, [u], [w])
    close(ours, up + w * (c - up))
    # diffusers' SVD runs in float32: agreement to its precision
    close(ours, normalized_guidance(c, u, w), rel=1e-5)


def test_tcfg_diffusers_guider_raises_attribute_error():
    """Its `is_conditional` reads `_num_outputs_prepared`, which nothing defines (so a pipeline cannot run it)."""
    guider = guiders.TangentialClassifierFreeGuidance(guidance_scale=3.0)
    with pytest.raises(AttributeError, match="is_conditional"):
        guider.is_conditional


# -- MAMBO-G ---------------------------------------------------------------------------------------------------------

def test_mambo_equals_the_paper_and_diffusers():
    from diffusers.guiders.magnitude_aware_guidance import mambo_guidance

    c, u = pair(seed=8)
    w, alpha = 6.0, 3.0
    r = ((c - u).flatten(1).norm(dim=1) / u.flatten(1).norm(dim=1)).reshape(-1, 1, 1, 1)
    wp = 1 + (w - 1) * torch.exp(-alpha * r)
    ours, _ = combine(MAMBO(alpha), c, [u], [w])
    close(ours, c + (wp - 1) * (c - u))
    # diffusers' torch.norm over three axes raises on torch 2.13 ("dim must be a 2-tuple"): call it on flat rows
    with pytest.raises(RuntimeError, match="2-tuple"):
        mambo_guidance(c, u, w, alpha)
    close(ours, mambo_guidance(c.flatten(1), u.flatten(1), w, alpha).reshape(c.shape))


# -- FDG -------------------------------------------------------------------------------------------------------------

kornia = pytest.importorskip("kornia")


def _fdg_paper(c, u, ws, pws, conditional=True):
    """The paper's steps with kornia's pyramid, written out: per level c_l + (w_l - 1)(p D_par + D_orth)."""
    pc = kornia.geometry.transform.build_laplacian_pyramid(c, len(ws))
    pu = kornia.geometry.transform.build_laplacian_pyramid(u, len(ws))
    out = []
    for cl, ul, wl, p in zip(pc, pu, ws, pws):
        d = cl - ul
        unit = cl / cl.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        par = (d * unit).sum(dim=[1, 2, 3], keepdim=True) * unit
        upd = p * par + (d - par)
        out.append(cl + (wl - 1) * upd if conditional else ul + wl * upd)
    img = out[-1]
    for band in reversed(out[:-1]):
        img = kornia.geometry.pyrup(img) + band
    return img


@pytest.mark.parametrize("size", [16, 14])      # 14: kornia pads to 16 and diffusers returns 16 x 16; we crop
def test_fdg_equals_the_paper_and_diffusers(size):
    c, u = pair((2, 3, size, size), seed=9)
    a = [6.0, 3.0]                               # diffusers' guidance_scales, high frequency first
    w, scales = a[0], tuple((x - 1) / (a[0] - 1) for x in a)
    for pws, form, original in (([1.0, 1.0], "conditional", False), ([0.5, 0.2], "unconditional", False),
                                ([0.5, 0.2], "conditional", True)):
        rule = FDG(scales=scales, parallel_weights=tuple(pws), form=form)
        ours, _ = combine(rule, c, [u], [w])
        assert ours.shape == c.shape
        paper = _fdg_paper(c, u, a, pws, conditional=form == "conditional")[..., :size, :size]
        close(ours, paper)
        # diffusers' original formulation adds guidance_scale * update to c: its scale is our w_l - 1
        ga = [x - 1 for x in a] if original else a
        anchor = _state(guiders.FrequencyDecoupledGuidance(guidance_scales=ga, parallel_weights=pws,
                                                           use_original_formulation=original), 1)(c, u).pred
        assert anchor.shape[-1] == 16            # padded, and not cropped back when size = 14
        close(ours, anchor[..., :size, :size])


def test_fdg_level_at_weight_one_keeps_the_conditional_band_where_diffusers_fails():
    c, u = pair((2, 3, 16, 16), seed=11)
    ours, _ = combine(FDG(scales=(0.0, 1.0)), c, [u], [4.0])
    paper = _fdg_paper(c, u, [1.0, 4.0], [1.0, 1.0])
    close(ours, paper)
    with pytest.raises(UnboundLocalError):       # level 0 disabled: the guider appends an unbound pred_cond_freq
        _state(guiders.FrequencyDecoupledGuidance(guidance_scales=[1.0, 4.0]), 1)(c, u)


# -- rules in general ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", [Linear(), Rescale(1.0), APG(eta=1.0), CFGZeroStar(), TCFG(), MAMBO(0.0),
                                  FDG(scales=(1.0, 1.0))])
def test_every_rule_at_w_one_returns_c(rule):
    """w = 1 is no guidance for every rule (Guided then skips the guide pass altogether)."""
    c, u = pair(seed=12)
    close(combine(rule, c, [u], [1.0])[0], c)


@pytest.mark.parametrize("space", ["eps", "v"])
def test_spaces_round_trip_in_edm_and_flow_coordinates(space):
    c, _ = pair(seed=13)
    x = torch.randn_like(c)
    sigma = torch.tensor([0.1, 1.0, 5.0, 40.0], dtype=torch.float64)
    close(from_space(to_space(c, x, space, sigma), x, space, sigma), c)
    t = sigma / (1 + sigma)
    x_t = x * (1 - t).reshape(-1, 1, 1, 1)
    close(from_space(to_space(c, x_t, space, t=t), x_t, space, t=t), c)
    # the same quantity in both coordinates (x_t = (1 - t) x, sigma = t / (1 - t))
    close(to_space(c, x, space, sigma), to_space(c, x_t, space, t=t))


def test_eps_is_refused_at_flow_time_one():
    c, _ = pair(seed=14)
    with pytest.raises(ValueError, match="undefined at flow time t = 1"):
        to_space(c, c, "eps", t=torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("make, match", [
    (lambda: APG(eta=math.nan), "eta must be a finite number"),
    (lambda: APG(norm_threshold=-1), "norm_threshold must be a finite number >= 0"),
    (lambda: APG(form="diffusers"), "form must be"),
    (lambda: Rescale(phi=1.5), r"phi must be a finite number in \[0, 1\]"),
    (lambda: Rescale(space="x"), "space must be one of x0, eps, v"),
    (lambda: CFGZeroStar(zero_init_steps=1.5), "zero_init_steps must be an integer"),
    (lambda: FDG(scales=(1.0,), parallel_weights=(1.0, 2.0)), "1 levels: give one per level"),
    (lambda: FDG(scales=3), "scales must be a list of numbers"),
    (lambda: rules.make_rule("apg", {"beta": 1}), "rule apg has no parameter beta"),
    (lambda: rules.make_rule("cfgpp"), "unknown rule 'cfgpp'"),
])
def test_bad_rule_parameters_are_refused_in_one_line(make, match):
    with pytest.raises(ValueError, match=match) as e:
        make()
    assert "\n" not in str(e.value)
