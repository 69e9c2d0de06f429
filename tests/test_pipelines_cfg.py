"""The pipeline's own CFG inside `guided_pipeline` (issue 21): read from the pipeline's call, never from equal input
values (item 1); `guidance_rescale` kept (item 3); 9-channel inpainting U-Nets (item 4); every expert of Wan 2.2
guided (item 6); pipelines that call their model once per CFG branch taken over with the batched formula (item 7);
the modular guider without seeds (item 13). Tiny pipelines from `autoguidance.adapters.tiny`, 2-3 steps."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from autoguidance.adapters import guided_pipeline, tiny  # noqa: E402
from autoguidance.perturb import SkipLayers  # noqa: E402
from conftest import assert_same_state, state_snapshot  # noqa: E402

ATOL = 2e-5




@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    kinds = ("sd", "sdxl", "ltx", "sd-inpaint", "sdxl-inpaint", "flux", "flux-dev", "wan21", "wan22")
    return {k: tiny.build(k, tmp) for k in kinds}


def same_seed(kind: str, **kw) -> dict:
    """Two different prompts with the SAME seed: equal initial latents in both rows."""
    return tiny.inputs(kind, prompts=["a cat", "a red fox"], generator=[torch.Generator().manual_seed(3)
                                                                        for _ in range(2)], **kw)


# -- item 1: the layout is the pipeline's, not the values' ----------------------------------------------------------

@pytest.mark.parametrize("kind,kw", [("flux", {}), ("flux-dev", {"guidance_scale": 3.5}),
                                     ("wan21", {"guidance_scale": 1.0}), ("wan21", {"guidance_scale": 4.0})])
def test_same_seed_prompts_are_the_pipelines_own_images(pipes, kind, kw):
    pipe = pipes[kind]
    with torch.no_grad():
        own = tiny.images(pipe(**same_seed(kind, **kw)))
        with guided_pipeline(pipe, "none"):
            ours = tiny.images(pipe(**same_seed(kind, **kw)))
    assert abs(own[0] - own[1]).max() > 1e-3               # two prompts, two images
    assert abs(ours - own).max() < ATOL


class TwoRowPipe(diffusers.DiffusionPipeline):
    """A pipeline that batches its CFG but says nothing about it (no do_classifier_free_guidance, no latents)."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def __call__(self, x, t, cond, uncond, scale):
        out = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        u, c = out.chunk(2)
        return u + scale * (c - u)


def test_a_layout_that_cannot_be_read_is_refused_and_cfg_layout_gives_it():
    pipe = TwoRowPipe(tiny.tiny_unet(), tiny.ddim())
    g = torch.Generator().manual_seed(0)
    x, cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g), torch.zeros(2, 5, 12)
    t = torch.tensor(500)
    with torch.no_grad():
        own = pipe(x, t, cond, uncond, 3.0)
        with pytest.raises(ValueError, match="cfg_layout=") as info:
            with guided_pipeline(pipe, "none"):
                pipe(x, t, cond, uncond, 3.0)
        assert "\n" not in str(info.value)
        with guided_pipeline(pipe, "cfg", w=3.0, cfg_layout="uncond-cond") as gp:
            ours = pipe(x, t, cond, uncond, 3.0)
    assert gp.calls == [("main", 4)]
    torch.testing.assert_close(ours, own, atol=1e-5, rtol=1e-5)
    assert "forward" not in pipe.unet.__dict__ and not pipe.unet._forward_pre_hooks


# -- item 3: guidance_rescale ----------------------------------------------------------------------------------------

def test_guidance_rescale_is_the_rescale_rule_in_the_models_output_space(pipes):
    """One way to rescale (issue 22): the pipeline's phi becomes `Rescale(phi)` on the model output (the rule's
    formula is checked against diffusers' `rescale_noise_cfg` in tests/test_rules.py)."""
    from autoguidance.adapters.diffusers import GuidedModelCall
    from autoguidance.adapters.diffusers.model_call import OutputSpace
    from autoguidance.rules import Rescale

    call = GuidedModelCall(pipes["sd"].unet, pipes["sd"].scheduler)
    assert call.call_rule(0.7) == Rescale(0.7, space=OutputSpace("epsilon", False))
    assert call.call_rule(0.0) == call.rule


@pytest.mark.parametrize("kind", ["sd", "sdxl", "ltx"])
def test_guidance_rescale_is_kept_under_every_method(pipes, kind):
    pipe = pipes[kind]
    with torch.no_grad():
        own = tiny.images(pipe(**tiny.inputs(kind, guidance_scale=5.0, guidance_rescale=0.7)))
        own_plain = tiny.images(pipe(**tiny.inputs(kind, guidance_scale=5.0)))
        with guided_pipeline(pipe, "none"):
            none = tiny.images(pipe(**tiny.inputs(kind, guidance_scale=5.0, guidance_rescale=0.7)))
        with guided_pipeline(pipe, "insitu", w=2.0, p=0.3, where="*attn1.to_out.0", seeds=[0, 1]):
            g_rescaled = tiny.images(pipe(**tiny.inputs(kind, guidance_scale=5.0, guidance_rescale=0.7)))
            g_plain = tiny.images(pipe(**tiny.inputs(kind, guidance_scale=5.0)))
    assert abs(own - own_plain).max() > 1e-3                 # the rescale matters here
    assert abs(none - own).max() < ATOL
    assert abs(g_rescaled - g_plain).max() > 1e-3            # and acts on the guided prediction too


# -- item 4: inpainting U-Nets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd-inpaint", "sdxl-inpaint"])
def test_nine_channel_inpainting_unets_are_guided(pipes, kind):
    pipe = pipes[kind]
    assert pipe.unet.config.in_channels == 9
    before = state_snapshot(pipe.unet)
    with torch.no_grad():
        own = tiny.images(pipe(**tiny.inputs(kind, guidance_scale=4.0)))
        with guided_pipeline(pipe, "none"):
            none = tiny.images(pipe(**tiny.inputs(kind, guidance_scale=4.0)))
        with guided_pipeline(pipe, "insitu", w=3.0, p=0.3, where="*attn1.to_out.0", seeds=[0, 1]) as gp:
            guided = tiny.images(pipe(**tiny.inputs(kind, guidance_scale=4.0)))
    assert abs(none - own).max() < ATOL
    assert gp.calls and {r for _, r in gp.calls} == {6} and abs(guided - own).max() > 1e-4
    assert_same_state(before, state_snapshot(pipe.unet))


# -- item 6: every expert --------------------------------------------------------------------------------------------

def test_both_experts_of_wan22_are_guided_and_each_gets_its_guide(pipes):
    pipe = pipes["wan22"]
    with torch.no_grad():
        own = tiny.images(pipe(**tiny.inputs("wan22", guidance_scale=4.0, num_inference_steps=3)))
        with guided_pipeline(pipe, "perturbation", w=2.0, perturbation=SkipLayers(layers=[0])) as gp:
            guided = tiny.images(pipe(**tiny.inputs("wan22", guidance_scale=4.0, num_inference_steps=3)))
    assert gp.experts == ["transformer", "transformer_2"]
    names = [n for n, _ in gp.calls]
    assert "main" in names and "main/transformer_2" in names and {r for _, r in gp.calls} == {6}
    assert abs(guided - own).max() > 1e-4
    small = {"transformer": tiny.tiny_wan(seed=5), "transformer_2": tiny.tiny_wan(seed=6)}
    with pytest.raises(ValueError, match="one guide model per expert"):
        guided_pipeline(pipe, "autoguidance", w=2.0, guide=small["transformer"])
    with torch.no_grad(), guided_pipeline(pipe, "autoguidance", w=2.0, guide=small) as gp:
        pipe(**tiny.inputs("wan22", guidance_scale=1.0, num_inference_steps=3))
    assert {"guide0", "guide0/transformer_2"} <= {n for n, _ in gp.calls}


# -- item 7: pipelines that call the model once per CFG branch ------------------------------------------------------

def _wan_reference(pipe, n, steps, s, w, pert, prompts, negative):
    """WanPipeline's loop written out, with the batched pipelines' formula c + (s-1)(c-u) + (w-1)(c-b)."""
    T = pipe.transformer
    pe, ne = pipe.encode_prompt(prompts, negative, do_classifier_free_guidance=True, max_sequence_length=16,
                                device="cpu")
    gens = [torch.Generator().manual_seed(10 + i) for i in range(n)]
    x = pipe.prepare_latents(n, T.config.in_channels, 16, 16, 1, torch.float32, "cpu", gens)
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(steps, device="cpu")
    for t in sched.timesteps:
        ts = t.expand(n)
        c = T(hidden_states=x, timestep=ts, encoder_hidden_states=pe, return_dict=False)[0]
        u = T(hidden_states=x, timestep=ts, encoder_hidden_states=ne, return_dict=False)[0]
        with pert.active(T, torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.int64), torch.ones(n)):
            b = T(hidden_states=x, timestep=ts, encoder_hidden_states=pe, return_dict=False)[0]
        x = sched.step(c + (s - 1) * (c - u) + (w - 1) * (c - b), t, x, return_dict=False)[0]
    return x


def _flux_reference(pipe, n, steps, s, w, pert, prompts, negative):
    """FluxPipeline's loop (true CFG) written out, with the batched pipelines' formula."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    T = pipe.transformer
    pe, pp, tid = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=16)
    ne, npp, ntid = pipe.encode_prompt(negative, None, device="cpu", max_sequence_length=16)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(n)]
    x, iid = pipe.prepare_latents(n, T.config.in_channels // 4, 16, 16, pe.dtype, "cpu", gens)
    sched = copy.deepcopy(pipe.scheduler)
    c_ = sched.config
    mu = calculate_shift(x.shape[1], c_.get("base_image_seq_len", 256), c_.get("max_image_seq_len", 4096),
                         c_.get("base_shift", 0.5), c_.get("max_shift", 1.15))
    timesteps, _ = retrieve_timesteps(sched, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sched.set_begin_index(0)
    for t in timesteps:
        ts = t.expand(n).to(x.dtype) / 1000
        kw = dict(hidden_states=x, timestep=ts, guidance=None, img_ids=iid, return_dict=False)
        c = T(pooled_projections=pp, encoder_hidden_states=pe, txt_ids=tid, **kw)[0]
        u = T(pooled_projections=npp, encoder_hidden_states=ne, txt_ids=ntid, **kw)[0]
        with pert.active(T, torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.int64), torch.ones(n)):
            b = T(pooled_projections=pp, encoder_hidden_states=pe, txt_ids=tid, **kw)[0]
        x = sched.step(c + (s - 1) * (c - u) + (w - 1) * (c - b), t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("kind", ["wan21", "flux"])
def test_per_branch_pipelines_get_the_batched_formula_in_one_call(pipes, kind):
    pipe = pipes[kind]
    prompts, negative = ["a cat", "dog"], ["blurry", "dark"]
    s, w, steps = 3.0, 2.5, 3
    pert = SkipLayers(layers=[0])
    cfg = {"true_cfg_scale": s} if kind == "flux" else {"guidance_scale": s}
    with torch.no_grad():
        ref = (_flux_reference if kind == "flux" else _wan_reference)(pipe, 2, steps, s, w, pert, prompts, negative)
        with guided_pipeline(pipe, "perturbation", w=w, perturbation=pert) as gp:
            out = pipe(**tiny.inputs(kind, prompts=prompts, negative_prompt=negative, num_inference_steps=steps,
                                     output_type="latent", **cfg))
    ours = out.images if kind == "flux" else out.frames
    assert gp.calls == [("main", 6)] * steps                 # both branches and the guide: ONE call per step
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_method_cfg_on_flux_is_true_cfg_at_w(pipes):
    pipe = pipes["flux"]
    neg = ["blurry", "dark"]
    with torch.no_grad():
        own4 = tiny.images(pipe(**tiny.inputs("flux", true_cfg_scale=4.0, negative_prompt=neg)))
        with guided_pipeline(pipe, "cfg", w=4.0) as gp:
            ours = tiny.images(pipe(**tiny.inputs("flux", true_cfg_scale=2.0, negative_prompt=neg)))
        with pytest.raises(ValueError, match="true_cfg_scale > 1") as info:
            with guided_pipeline(pipe, "cfg", w=4.0):
                pipe(**tiny.inputs("flux"))                    # no negative prompt: no CFG to take over
    assert "\n" not in str(info.value)
    assert abs(ours - own4).max() < ATOL and gp.calls == [("main", 4)] * 2


# -- item 13: the modular guider without seeds ----------------------------------------------------------------------

def _modular(ref, guider):
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    mp = StableDiffusionXLAutoBlocks().init_pipeline()
    mp.update_components(unet=ref.unet, vae=ref.vae, text_encoder=ref.text_encoder, text_encoder_2=ref.text_encoder_2,
                         tokenizer=ref.tokenizer, tokenizer_2=ref.tokenizer_2, scheduler=ref.scheduler, guider=guider)
    mp.set_progress_bar_config(disable=True)
    return mp


def test_modular_guider_without_seeds_refuses_random_masks_and_keeps_positions(pipes):
    from autoguidance.adapters.guider import AutoguidanceGuider

    ref = pipes["sdxl"]
    run = lambda mp, prompts, seeds: mp(prompt=prompts, num_inference_steps=2, output="images",  # noqa: E731
                                        output_type="np", height=8, width=8,
                                        generator=[torch.Generator().manual_seed(s) for s in seeds])
    mp = _modular(ref, AutoguidanceGuider.for_scheduler(ref.scheduler, w=3.0, p=0.3, where="*attn1.to_out.0"))
    with pytest.raises(ValueError, match="seeds=") as info:
        run(mp, ["a cat", "dog"], [1, 2])
    assert "\n" not in str(info.value)
    # a deterministic perturbation needs no seeds: an image is the same alone or in a batch
    mp = _modular(ref, AutoguidanceGuider.for_scheduler(ref.scheduler, w=3.0, perturbation="identityattention", p=1.0))
    both = run(mp, ["a cat", "dog"], [1, 2])
    alone = run(mp, ["dog"], [2])
    assert abs(both[1] - alone[0]).max() < ATOL
