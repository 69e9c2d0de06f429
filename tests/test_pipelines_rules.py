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


# -- 1. every rule, in a U-Net and a flow-transformer pipeline, equals its formula on the model outputs ------------

@pytest.mark.parametrize("kind", ["sd", "sd3"])
@pytest.mark.parametrize("rule,formula", CASES, ids=lambda v: v.describe() if hasattr(v, "describe") else "")
def test_each_rule_on_the_pipelines_cfg_equals_its_formula_on_the_model_outputs(pipes, kind, rule, formula):
    pipe = pipes[kind]
    before = state_snapshot(tiny.model_of(pipe))
    with torch.no_grad():
        ref = LOOPS[kind](pipe, formula)
        with guided_pipeline(pipe, "none", rule=rule) as gp:
            ours = latents(pipe, kind)
    assert_batch_close(ours, ref)
    calls = 3 - rule.zero_init_steps                             # a zero-init step makes no model call
    assert gp.calls == [("main", 4)] * calls
    assert_same_state(before, state_snapshot(tiny.model_of(pipe)))


@pytest.mark.parametrize("kind,pert", [("sd", IdentityAttention()), ("sd3", SkipLayers(layers=[1]))])
@pytest.mark.parametrize("rule,formula", [CASES[2], CASES[7]], ids=["apg", "mambo"])
def test_the_pipelines_cfg_and_a_guide_combine_through_the_rule(pipes, kind, pert, rule, formula):
    pipe = pipes[kind]
    with torch.no_grad():
        ref = LOOPS[kind](pipe, formula, w=2.5, pert=pert)
        with guided_pipeline(pipe, "perturbation", w=2.5, perturbation=pert, rule=rule) as gp:
            ours = latents(pipe, kind)
        plain = LOOPS[kind](pipe, f_linear, w=2.5, pert=pert)
    assert gp.calls == [("main", 6)] * 3                         # CFG + guide: still ONE call per step
    assert_batch_close(ours, ref)
    assert float((ref - plain).abs().max()) > 1e-3               # the rule changes the result


# -- 2. one way to rescale ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_rescale_rule_under_method_none_equals_the_pipelines_own_guidance_rescale(pipes, kind):
    pipe = pipes[kind]
    with torch.no_grad():
        own = tiny.images(pipe(**tiny.inputs(kind, guidance_scale=S, guidance_rescale=0.7)))
        plain = tiny.images(pipe(**tiny.inputs(kind, guidance_scale=S)))
        with guided_pipeline(pipe, "none", rule=Rescale(0.7)):
            ours = tiny.images(pipe(**tiny.inputs(kind, guidance_scale=S)))
        with guided_pipeline(pipe, "none"):                      # the pipeline's own phi, taken over as the rule
            taken = tiny.images(pipe(**tiny.inputs(kind, guidance_scale=S, guidance_rescale=0.7)))
    assert abs(own - plain).max() > 1e-2                         # the rescale matters here
    assert_batch_close(ours, own)
    assert_batch_close(taken, own)


def test_the_pipelines_guidance_rescale_after_another_rule_is_that_rule_then_the_rescale(pipes):
    pipe = pipes["sd"]
    rule, formula = CASES[2]
    with torch.no_grad():
        ref = sd_loop(pipe, formula, phi=0.7)
        with guided_pipeline(pipe, "none", rule=rule):
            ours = latents(pipe, "sd", guidance_rescale=0.7)
        apg_alone = sd_loop(pipe, formula)
    assert_batch_close(ours, ref)
    assert float((ref - apg_alone).abs().max()) > 1e-3


@pytest.mark.parametrize("rule,match", [(Rescale(0.5), "rescale the same prediction twice"),
                                        (APG(space="x0"), "rescales the model output, and rule apg")])
def test_a_second_rescale_or_a_rule_in_another_space_beside_guidance_rescale_is_refused(pipes, rule, match):
    pipe = pipes["sd"]
    with pytest.raises(ValueError, match=match) as e:
        with torch.no_grad(), guided_pipeline(pipe, "none", rule=rule):
            pipe(**tiny.inputs("sd", guidance_scale=S, guidance_rescale=0.7))
    assert "\n" not in str(e.value) and "forward" not in pipe.unet.__dict__


# -- 3. the rule's space in a pipeline -----------------------------------------------------------------------------

def test_the_default_space_is_the_models_output_and_an_explicit_space_is_used(pipes):
    pipe = pipes["sd"]
    out = []
    with torch.no_grad():
        for space in (None, "x0", "eps"):
            with guided_pipeline(pipe, "none", rule=MAMBO(alpha=4.0, space=space)):
                out.append(latents(pipe, "sd"))
    assert_batch_close(out[2], out[0])                           # SD predicts eps: its output space IS eps
    assert float((out[1] - out[0]).abs().max()) > 1e-3           # x0 is another space for a non-affine rule


# -- 4. state per image and per pipeline call; the step from the pipeline's loop ------------------------------------

class _Stop(Exception):
    pass


def _stop_after_first_step(pipe, i, t, kwargs):
    raise _Stop


@pytest.mark.parametrize("kind", ["sd", "sd3"])
@pytest.mark.parametrize("rule", [APG(eta=0.0, norm_threshold=0.8, momentum=-0.5), CFGZeroStar(zero_init_steps=1)],
                         ids=["apg-momentum", "cfg-zero"])
def test_stateful_rules_depend_neither_on_the_batch_nor_on_the_previous_call(pipes, kind, rule):
    pipe = pipes[kind]
    with torch.no_grad(), guided_pipeline(pipe, "none", rule=rule):
        both = latents(pipe, kind)
        again = latents(pipe, kind)                              # the previous call's state is not carried over
        with pytest.raises(_Stop):                               # nor that of a call that stopped half way
            latents(pipe, kind, callback_on_step_end=_stop_after_first_step)
        after_stop = latents(pipe, kind)
        alone = pipe(**tiny.inputs(kind, n=1, steps=3, prompts=PROMPTS[1:], output_type="latent",
                                   guidance_scale=S, generator=[torch.Generator().manual_seed(11)])).images
    assert torch.equal(both, again) and torch.equal(both, after_stop)    # same batch, same call: bit for bit
    assert_batch_close(alone[0], both[1])                        # the image alone = the image in a batch


def test_apg_momentum_acts_across_the_steps_of_a_call(pipes):
    pipe = pipes["sd"]
    with torch.no_grad():
        with guided_pipeline(pipe, "none", rule=APG(momentum=-0.5)):
            momentum = latents(pipe, "sd")
        with guided_pipeline(pipe, "none", rule=APG()):
            none = latents(pipe, "sd")
    assert float((momentum - none).abs().max()) > 1e-3


def test_a_step_list_reads_the_step_of_the_pipelines_loop_and_skips_the_guide_where_w_is_one(pipes):
    pipe = pipes["sd"]
    with torch.no_grad():
        with guided_pipeline(pipe, "perturbation", w=ag.StepList([2.5, 1.0, 2.5]), perturbation=IdentityAttention(),
                             rule=APG(momentum=-0.5)) as gp:
            listed = latents(pipe, "sd")
        with guided_pipeline(pipe, "perturbation", w=2.5, perturbation=IdentityAttention(),
                             rule=APG(momentum=-0.5)) as gp_const:
            const = latents(pipe, "sd")
    assert [r for _, r in gp.calls] == [6, 4, 6] and [r for _, r in gp_const.calls] == [6, 6, 6]
    assert float((listed - const).abs().max()) > 1e-4
    with pytest.raises(ValueError, match="StepList has 3 values but the sampler runs 2 steps") as e:
        img2img = pipes["sd-img2img"]                            # strength 0.75 of 3 steps: the loop runs 2
        with torch.no_grad(), guided_pipeline(img2img, "perturbation", w=ag.StepList([2.5, 1.0, 2.5]),
                                              perturbation=IdentityAttention()):
            img2img(**tiny.inputs("sd-img2img", steps=2, guidance_scale=S))
    assert "\n" not in str(e.value)


def test_a_heun_scheduler_makes_two_calls_per_step_and_both_belong_to_it(tmp_path):
    pipe = tiny.build("sd", tmp_path)
    pipe.scheduler = diffusers.HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        with guided_pipeline(pipe, "perturbation", w=ag.StepList([2.5, 1.0, 2.5]),
                             perturbation=IdentityAttention()) as gp:
            latents(pipe, "sd")
        assert [r for _, r in gp.calls] == [6, 6, 4, 4, 6]       # steps 0, 0, 1, 1, 2 (the last is first-order)
        with guided_pipeline(pipe, "none", rule=CFGZeroStar(zero_init_steps=1)) as gp:
            latents(pipe, "sd")
        assert gp.calls == [("main", 4)] * 3                     # zero-init skips both calls of step 0


def test_a_loop_without_an_index_reads_its_step_from_the_schedulers_timesteps(pipes):
    pipe = pipes["dit"]                                          # DiT: `for t in scheduler.timesteps`
    with torch.no_grad():
        with guided_pipeline(pipe, "perturbation", w=ag.StepList([1.0, 2.0, 1.0]), perturbation=IdentityAttention(),
                             seeds=[0, 1]) as gp:
            pipe(**tiny.inputs("dit", steps=3, guidance_scale=S))
        assert [r for _, r in gp.calls] == [4, 6, 4]
        with pytest.raises(ValueError, match="predicts its variance") as e:
            with guided_pipeline(pipe, "none", rule=CFGZeroStar()):
                pipe(**tiny.inputs("dit", steps=3, guidance_scale=S))
    assert "\n" not in str(e.value)


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


# -- 5. bad rule options: one line ----------------------------------------------------------------------------------

def test_bad_rule_options_are_refused_in_one_line(pipes):
    pipe = pipes["sd"]
    cases = [
        (lambda: guided_pipeline(pipe, "none", rule="nope"), ValueError, "unknown rule 'nope'"),
        (lambda: guided_pipeline(pipe, "none", rule=3), TypeError, "rule must be an autoguidance.rules.Rule"),
        (lambda: guided_pipeline(pipe, lambda D: ag.insitu(D, 2.0, module=D.model, rule=APG()),
                                 rule=MAMBO()), ValueError, "give the rule in one place"),
    ]
    for make, exc, match in cases:
        with pytest.raises(exc, match=match) as e:
            make()
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="method none combines only the pipeline's own CFG") as e:
        with torch.no_grad(), guided_pipeline(pipe, "none", rule=APG()):
            pipe(**tiny.inputs("sd", steps=1, guidance_scale=1.0))
    assert "\n" not in str(e.value)
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    with pytest.raises(ValueError, match="keeps a state per image across the steps of a pipeline call") as e:
        with torch.no_grad(), guided_pipeline(pipe, "insitu", w=2.0, rule=APG(momentum=-0.5), seeds=[0, 1]):
            pipe.unet(x, torch.tensor(500), encoder_hidden_states=emb)     # not from the pipeline's own call
    assert "\n" not in str(e.value) and "forward" not in pipe.unet.__dict__


def test_a_factorys_own_rule_is_used(pipes):
    pipe = pipes["sd3"]
    rule, formula = CASES[7]
    pert = SkipLayers(layers=[1])
    with torch.no_grad():
        with guided_pipeline(pipe, lambda D: ag.perturbation_guidance(D, 2.5, pert, module=D.model, rule=rule)) as gp:
            ours = latents(pipe, "sd3")
        ref = sd3_loop(pipe, formula, w=2.5, pert=pert)
    assert gp.rule == rule
    assert_batch_close(ours, ref)


# -- 6. the modular guider -----------------------------------------------------------------------------------------

def _modular(ref, guider):
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    mp = StableDiffusionXLAutoBlocks().init_pipeline()
    mp.update_components(unet=ref.unet, vae=ref.vae, text_encoder=ref.text_encoder, text_encoder_2=ref.text_encoder_2,
                         tokenizer=ref.tokenizer, tokenizer_2=ref.tokenizer_2, scheduler=ref.scheduler, guider=guider)
    mp.set_progress_bar_config(disable=True)
    return mp


@pytest.mark.parametrize("rule", [APG(eta=0.0, norm_threshold=0.8, momentum=-0.5), CFGZeroStar(), Rescale(0.7)],
                         ids=lambda r: r.name)
def test_the_modular_guider_takes_the_same_rules_and_gives_the_context_managers_images(pipes, rule, tmp_path):
    from autoguidance.adapters.guider import AutoguidanceGuider

    ref = pipes["sdxl"]
    guider = AutoguidanceGuider.for_scheduler(ref.scheduler, w=3.0, perturbation="identityattention", p=1.0,
                                              guidance_scale=S, rule=rule)
    mp = _modular(ref, guider)
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(2)]  # noqa: E731
    with torch.no_grad():
        modular = mp(prompt=PROMPTS, num_inference_steps=3, generator=gens(), output="images", output_type="np",
                     height=8, width=8)
        again = mp(prompt=PROMPTS, num_inference_steps=3, generator=gens(), output="images", output_type="np",
                   height=8, width=8)
        with guided_pipeline(ref, "perturbation", w=3.0, perturbation=make_perturbation("identityattention", 1.0),
                             rule=rule):
            classic = tiny.images(ref(**tiny.inputs("sdxl", steps=3, guidance_scale=S)))
    assert abs(modular - classic).max() < 1e-5 and np.array_equal(modular, again)
    guider.save_pretrained(tmp_path / "guider")                  # the rule round-trips as data
    back = AutoguidanceGuider.from_pretrained(tmp_path / "guider")
    assert back.rule == rule and guider.new(w=2.0).rule == rule


def test_the_modular_guider_zero_init_asks_for_one_batch_and_an_explicit_space_is_refused(pipes):
    from autoguidance.adapters.guider import AutoguidanceGuider

    guider = AutoguidanceGuider.for_scheduler(pipes["sdxl"].scheduler, w=3.0, guidance_scale=S,
                                              rule=CFGZeroStar(zero_init_steps=1))
    guider.set_state(step=0, num_inference_steps=3, timestep=torch.tensor(900))
    assert guider.num_conditions == 1
    guider.set_state(step=1, num_inference_steps=3, timestep=torch.tensor(500))
    assert guider.num_conditions == 3
    with pytest.raises(ValueError, match="never sees the latents") as e:
        AutoguidanceGuider(rule=APG(space="x0"))
    assert "\n" not in str(e.value)


# -- 7. `autoguidance pipe` with the rule flags ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdpipe")
    tiny.build("sd", tmp).save_pretrained(tmp / "pipe")
    return tmp / "pipe"


def _pngs(out):
    from PIL import Image

    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted((out / "png").glob("*.png"))}


def test_pipe_takes_the_rule_flags_and_records_them(sd_folder, tmp_path, capsys):
    from autoguidance.cli import main

    base = ["pipe", str(sd_folder), "--prompt", "a cat", "--seeds", "0-1", "--steps", "3", "--guidance-scale", "4",
            "--method", "insitu", "--w", "2", "--no-progress"]
    apg = ["--rule", "apg", "--eta", "0", "--norm-threshold", "15", "--momentum", "-0.5"]
    assert main(base + ["--out", str(tmp_path / "linear")]) == 0
    assert main(base + apg + ["--out", str(tmp_path / "apg")]) == 0
    lin, rec = (json.loads((tmp_path / d / "run.json").read_text())["config"] for d in ("linear", "apg"))
    assert "rule" not in lin                                     # a run without a rule keeps its identity
    assert rec["rule"] == {"name": "apg", "eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5, "space": None,
                           "form": "conditional"}
    a, b = _pngs(tmp_path / "linear"), _pngs(tmp_path / "apg")
    assert any(abs(a[k] - b[k]).max() > 0 for k in a)
    capsys.readouterr()
    assert main(base + apg[:-1] + ["0", "--out", str(tmp_path / "apg")]) == 2    # another momentum: another run
    assert "holds a run with another config (differs in: rule)" in capsys.readouterr().err
    assert main(base + ["--w-steps", "2,1,2", "--out", str(tmp_path / "x")]) == 2  # --w-steps and --w
    assert "--w-steps gives w at every step" in capsys.readouterr().err
    steps = [f for f in base if f not in ("--w", "2")] + ["--w-steps", "2*1,1,2", "--rule", "cfg-zero",
                                                           "--zero-init-steps", "1"]
    assert main(steps + ["--out", str(tmp_path / "steps")]) == 0
    rec = json.loads((tmp_path / "steps" / "run.json").read_text())["config"]
    assert rec["w_steps"] == [2.0, 1.0, 2.0] and rec["rule"]["zero_init_steps"] == 1


@pytest.mark.parametrize("extra,match", [
    (["--rule", "apg", "--phi", "0.5"], "rule apg takes no --phi: its parameters are --eta"),
    (["--eta", "0"], "rule linear takes no --eta"),
    (["--rule", "rescale", "--phi", "2"], r"phi must be a finite number in \[0, 1\]"),
    (["--rule", "fdg", "--scales", "1,x"], "--scales must be numbers"),
    (["--window", "0.5,0.1", "--w", "2"], "StepWindow needs 0 <= start < stop <= 1"),
])
def test_pipe_bad_rule_flags_end_in_one_line(sd_folder, tmp_path, capsys, extra, match):
    import re

    from autoguidance.cli import main

    capsys.readouterr()
    argv = ["pipe", str(sd_folder), "--prompt", "a cat", "--seeds", "0", "--steps", "1", "--no-progress",
            "--method", "insitu", *([] if "--w" in extra else ["--w", "2"]), *extra, "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(match, err), err
