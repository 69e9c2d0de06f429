"""Combination rules inside diffusers pipelines (issue 22, part 4): `guided_pipeline(pipe, method, rule=...)` on the
tiny SD (U-Net, DDIM, epsilon) and SD3 (flow transformer, flow-matching Euler) pipelines equals a hand-written loop
that applies each rule's formula, written out here, to the model outputs; stateful rules do not depend on the batch
or on the previous pipeline call; zero-init and step schedules read the step of the pipeline's loop; the pipeline's
`guidance_rescale` is the rescale rule; the modular guider takes the same rules; `autoguidance pipe` takes the rule
flags of `autoguidance sample`. Bad rule options end in one line. Tiny pipelines from `autoguidance.adapters.tiny`,
2-3 steps."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import autoguidance as ag  # noqa: E402
from autoguidance.adapters import guided_pipeline, tiny  # noqa: E402
from autoguidance.methods import make_perturbation  # noqa: E402
from autoguidance.perturb import IdentityAttention, SkipLayers  # noqa: E402
from autoguidance.rules import APG, FDG, MAMBO, TCFG, CFGZeroStar, Linear, Rescale  # noqa: E402
from autoguidance.rules.fdg import from_pyramid, laplacian_pyramid  # noqa: E402
from conftest import assert_same_state, state_snapshot  # noqa: E402
from helpers import assert_batch_close  # noqa: E402

PROMPTS = ["a cat", "dog"]
S = 4.0                        # the pipeline's CFG scale in every test


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    return {k: tiny.build(k, tmp) for k in ("sd", "sd3", "sdxl", "dit", "sd-img2img")}


# -- the rules' formulas, written out (per row over all but the batch axis, float64) -------------------------------

def _dims(v):
    return tuple(range(1, v.ndim))


def _dot(a, b):
    return (a * b).sum(_dims(a), keepdim=True)


def _norm(a):
    return _dot(a, a).sqrt()


def f_linear(i, c, us, ws, st):
    return c + sum((w - 1) * (c - u) for u, w in zip(us, ws))


def _rescaled(c, g, phi):
    return phi * g * c.std(_dims(c), keepdim=True) / g.std(_dims(g), keepdim=True) + (1 - phi) * g


def f_rescale(phi):
    def f(i, c, us, ws, st):
        return _rescaled(c, f_linear(i, c, us, ws, st), phi)
    return f


def f_apg(eta, r, beta, form="conditional"):
    def f(i, c, us, ws, st):
        g = c
        for k, (u, w) in enumerate(zip(us, ws)):
            d = c - u
            if beta:
                d = d + beta * st[k] if k in st else d          # the running average, from the call's first step
                st[k] = d
            if r > 0:
                d = d * torch.clamp(r / _norm(d), max=1.0)
            par = _dot(d, c) / _dot(c, c) * c
            upd = (d - par) + eta * par
            g = g + ((w - 1) * upd if form == "conditional" else w * upd - (c - u))   # u + w upd, diffusers'
        return g
    return f


def f_cfg_zero(k0):
    def f(i, c, us, ws, st):
        if i < k0:
            return torch.zeros_like(c)                           # zero model output, no pass
        return c + sum((w - 1) * (c - _dot(c, u) / _dot(u, u) * u) for u, w in zip(us, ws))
    return f


def f_tcfg(i, c, us, ws, st):
    g = c
    for u, w in zip(us, ws):
        _, _, vh = torch.linalg.svd(torch.stack([c.flatten(1), u.flatten(1)], 1), full_matrices=False)
        v1 = vh[:, 0]                                            # the first right-singular vector of [c; u]
        u_t = ((u.flatten(1) * v1).sum(1, keepdim=True) * v1).reshape(u.shape)
        g = g + (w - 1) * (c - u_t)
    return g


def f_fdg(scales):
    def f(i, c, us, ws, st):
        g = c
        for u, w in zip(us, ws):
            pc, pu = laplacian_pyramid(c, len(scales)), laplacian_pyramid(u, len(scales))
            g = g + from_pyramid([s * (w - 1) * (a - b) for s, a, b in zip(scales, pc, pu)], c.shape[2:])
        return g
    return f


def f_mambo(alpha):
    def f(i, c, us, ws, st):
        return c + sum((w - 1) * torch.exp(-alpha * _norm(c - u) / _norm(u)) * (c - u) for u, w in zip(us, ws))
    return f


CASES = [
    (Linear(), f_linear),
    (Rescale(0.7), f_rescale(0.7)),
    (APG(eta=0.0, norm_threshold=0.8, momentum=-0.5), f_apg(0.0, 0.8, -0.5)),
    (APG(eta=0.5, momentum=-0.5, form="unconditional"), f_apg(0.5, 0.0, -0.5, "unconditional")),
    (CFGZeroStar(zero_init_steps=1), f_cfg_zero(1)),
    (TCFG(), f_tcfg),
    (FDG(scales=(1.0, 0.5)), f_fdg((1.0, 0.5))),
    (MAMBO(alpha=4.0), f_mambo(4.0)),
]


# -- the pipelines' loops, written out ----------------------------------------------------------------------------

def _active(pert, model, n):
    """A perturbation on every row of a call (deterministic perturbations: the keys do not matter)."""
    if pert is None:
        return None
    return pert.active(model, torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.int64), torch.ones(n))


def sd_loop(pipe, combine, w=None, pert=None, steps=3, n=2, phi=0.0):
    """StableDiffusionPipeline's loop (DDIM, epsilon) with the model outputs combined by `combine`: the pipeline's
    CFG pair (u at weight S) and, with `pert`, a perturbed pass of the prompt (weight w); then phi's rescale."""
    unet = pipe.unet
    pe, ne = pipe.encode_prompt(PROMPTS[:n], "cpu", 1, True)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(n)]
    x = pipe.prepare_latents(n, unet.config.in_channels, 8, 8, pe.dtype, "cpu", gens)
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(steps, device="cpu")
    state: dict = {}
    for i, t in enumerate(sched.timesteps):
        c = unet(x, t, encoder_hidden_states=pe).sample.double()
        u = unet(x, t, encoder_hidden_states=ne).sample.double()
        us, ws = [u], [S]
        if pert is not None:
            with _active(pert, unet, n):
                us.append(unet(x, t, encoder_hidden_states=pe).sample.double())
            ws.append(w)
        g = combine(i, c, us, ws, state)
        if phi:
            g = _rescaled(c, g, phi)                             # the pipeline's rescale after the rule
        x = sched.step(g.float(), t, x).prev_sample
    return x


def sd3_loop(pipe, combine, w=None, pert=None, steps=3, n=2):
    """StableDiffusion3Pipeline's loop (flow-matching Euler, velocity) with the outputs combined by `combine`."""
    T = pipe.transformer
    pe, ne, pp, npp = pipe.encode_prompt(PROMPTS[:n], None, None, device="cpu", do_classifier_free_guidance=True)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(n)]
    x = pipe.prepare_latents(n, T.config.in_channels, 8, 8, pe.dtype, "cpu", gens)
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(steps, device="cpu")
    state: dict = {}
    for i, t in enumerate(sched.timesteps):
        ts = t.expand(n)
        c = T(hidden_states=x, timestep=ts, encoder_hidden_states=pe, pooled_projections=pp,
              return_dict=False)[0].double()
        u = T(hidden_states=x, timestep=ts, encoder_hidden_states=ne, pooled_projections=npp,
              return_dict=False)[0].double()
        us, ws = [u], [S]
        if pert is not None:
            with _active(pert, T, n):
                us.append(T(hidden_states=x, timestep=ts, encoder_hidden_states=pe, pooled_projections=pp,
                            return_dict=False)[0].double())
            ws.append(w)
        x = sched.step(combine(i, c, us, ws, state).float(), t, x, return_dict=False)[0]
    return x


LOOPS = {"sd": sd_loop, "sd3": sd3_loop}


def latents(pipe, kind, n=2, steps=3, **kw):
    return pipe(**tiny.inputs(kind, n=n, steps=steps, prompts=PROMPTS[:n], output_type="latent",
                              guidance_scale=S, **kw)).images


# -- the core: a rule over a constant guide and a per-row one --------------------------------------------------

def test_a_rule_over_a_constant_guide_and_a_guide_on_some_rows_combines_both():
    """What a pipeline's CFG (constant scale) beside a step or sigma schedule asks of `Guided`: before, a non-linear
    rule raised TypeError there (`touched` was None)."""
    from autoguidance.guidance import Guide, Guided, Pass
    from autoguidance.rules import combine
    from helpers import GaussianDenoiser

    net, g1, g2 = GaussianDenoiser(0.3, 0.5), GaussianDenoiser(0.1, 0.7), GaussianDenoiser(-0.2, 0.6)
    rule = MAMBO(alpha=2.0)
    D = Guided(Pass(net), [Guide(Pass(g1), ag.Constant(3.0)), Guide(Pass(g2), ag.Interval(2.0, sigma_lo=1.0))],
               rule=rule)
    x = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.tensor([0.5, 2.0, 0.5, 3.0], dtype=torch.float64)     # the second guide in rows 1 and 3 only
    out = D(x, sigma)
    for rows, us, ws in (([0, 2], [g1], [3.0]), ([1, 3], [g1, g2], [3.0, 2.0])):
        xr, sr = x[rows], sigma[rows]
        want, _ = combine(rule, net(xr, sr), [u(xr, sr) for u in us], ws)
        torch.testing.assert_close(out[rows], want)


