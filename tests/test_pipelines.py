"""Guidance inside diffusers pipelines (issue 13): `guided_pipeline` on tiny SD, SDXL, DiT and SD3 pipelines built
from configs in code (`autoguidance.adapters.tiny`: text encoders and tokenizers too, over a tiny vocabulary);
nothing is downloaded. The other pipeline kinds and issue 21's cases: tests/test_pipelines_*.py."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import autoguidance as ag  # noqa: E402
from autoguidance.adapters import guided_pipeline, tiny  # noqa: E402
from autoguidance.perturb import Dropout, IdentityAttention, SkipLayers  # noqa: E402
from conftest import assert_same_state, state_snapshot  # noqa: E402

PROMPTS = ["a cat", "dog"]


# -- tiny pipelines (autoguidance.adapters.tiny: the one place the tests and the pipeline table build them) ----

def sd_pipe(tmp_path):
    return tiny.build("sd", tmp_path)


def tiny_unet(seed=0, blocks=(16, 32)):
    return tiny.tiny_unet(seed=seed, blocks=blocks)


def run(pipe, kind, n=2, steps=3, **kw):
    g = [torch.Generator().manual_seed(10 + i) for i in range(n)]
    if kind == "dit":
        return pipe(class_labels=list(range(n)), num_inference_steps=steps, generator=g, output_type="np",
                    **kw).images
    return pipe(PROMPTS[:n], num_inference_steps=steps, generator=g, output_type="np", **kw).images


model_of = tiny.model_of


def input_rows(model):
    """Rows of every real forward of `model` (a hook on its first submodule: the instance forward's outer call
    never reaches it)."""
    first = next(m for n, m in model.named_children())
    rows = []
    first.register_forward_pre_hook(lambda m, a, k=None: rows.append(
        (a[0] if a else next(iter(k.values()))).shape[0]), with_kwargs=False)
    return rows


PIPES = ("sd", "sdxl", "dit", "sd3")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    return {k: tiny.build(k, tmp) for k in PIPES}


# -- equality with the pipeline's own loop ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(PIPES))
def test_no_guidance_and_library_cfg_equal_the_pipelines_own(pipes, kind):
    pipe = pipes[kind]
    plain = run(pipe, kind, guidance_scale=1.0)
    own_cfg = run(pipe, kind, guidance_scale=4.0)
    assert (abs(plain - own_cfg)).max() > 1e-4                     # CFG changes the images
    with guided_pipeline(pipe, "insitu", w=1.0, seeds=[0, 1]) as gp:   # w = 1: no guide pass
        none = run(pipe, kind, guidance_scale=1.0)
        assert gp.last_rows == (2, 0)
        lib_cfg = run(pipe, kind, guidance_scale=4.0)               # the library does the pipeline's CFG
        assert gp.calls and gp.calls[-1] == ("main", 4)
    assert abs(none - plain).max() < 1e-5
    assert abs(lib_cfg - own_cfg).max() < 1e-5


@pytest.mark.parametrize("kind", list(PIPES))
def test_cfg_plus_insitu_is_one_call_of_3n_rows(pipes, kind):
    pipe = pipes[kind]
    model = model_of(pipe)
    before = state_snapshot(model)
    pert = Dropout(0.2) if kind != "sd3" else SkipLayers(layers=[1])
    with guided_pipeline(pipe, "perturbation", w=2.0, perturbation=pert, seeds=[5, 6]) as gp:
        rows = input_rows(model)
        try:
            guided = run(pipe, kind, guidance_scale=4.0, steps=2)
        finally:
            for m in model.children():
                m._forward_pre_hooks.clear()
                break
    assert rows == [6, 6]                                          # 3 passes x 2 images, ONE call per step
    assert gp.calls == [("main", 6), ("main", 6)]
    own_cfg = run(pipe, kind, guidance_scale=4.0, steps=2)
    assert abs(guided - own_cfg).max() > 1e-5
    assert_same_state(before, state_snapshot(model))


def test_an_image_is_the_same_alone_or_in_a_batch(pipes):
    pipe = pipes["sd"]
    with guided_pipeline(pipe, "insitu", w=3.0, p=0.2) as gp:      # seeds from the pipeline's generators
        both = run(pipe, "sd", guidance_scale=3.0)
        gp.seeds = None
        alone = pipe(PROMPTS[1:], num_inference_steps=3, generator=[torch.Generator().manual_seed(11)],
                     output_type="np", guidance_scale=3.0).images
    assert abs(both[1:] - alone).max() < 1e-5
    with guided_pipeline(pipe, "insitu", w=3.0, p=0.2, seeds=[7, 8]):
        other = run(pipe, "sd", guidance_scale=3.0)
    assert abs(other - both).max() > 1e-5                          # other seeds, other dropout masks


# -- the methods -----------------------------------------------------------------------------------------------------

def test_two_model_autoguidance_interval_and_ramp_run_end_to_end(pipes):
    pipe = pipes["sd"]
    own = run(pipe, "sd", guidance_scale=1.0)
    guide = tiny_unet(seed=3, blocks=(8, 16)).to(torch.float64)
    with guided_pipeline(pipe, "autoguidance", w=2.0, guide=guide) as gp:
        ag_img = run(pipe, "sd", guidance_scale=1.0)
    assert guide.dtype == torch.float32                            # moved to the pipeline's dtype
    assert ("guide0", 2) in gp.calls and abs(ag_img - own).max() > 1e-4
    # an interval that holds no step is no guidance at all: the model runs as it is
    with guided_pipeline(pipe, "insitu", w=3.0, interval=(1e3, 1e4), seeds=[0, 1]) as gp:
        out = run(pipe, "sd", guidance_scale=1.0)
    assert gp.calls == [] and abs(out - own).max() == 0
    # CFG only in a sigma interval: the steps outside it skip the unconditional pass
    with guided_pipeline(pipe, "cfg", interval=(2.0, 1e4)) as gp:
        run(pipe, "sd", guidance_scale=4.0, steps=4)
    assert sorted({r for _, r in gp.calls}) == [2, 4]
    # a w(sigma) ramp: guided where w != 1
    with guided_pipeline(pipe, "insitu", w=ag.Ramp(3.0, 1.0, sigma_from=5.0, sigma_to=0.5), seeds=[0, 1]) as gp:
        ramp = run(pipe, "sd", guidance_scale=1.0, steps=4)
    assert abs(ramp - own).max() > 1e-5 and ("main", 4) in gp.calls


def test_a_factory_method_and_identity_attention_on_sdxl(pipes):
    pipe = pipes["sdxl"]
    with guided_pipeline(pipe, lambda D: ag.perturbation_guidance(D, 2.0, IdentityAttention(), module=D.model),
                         seeds=[0, 1]) as gp:
        out = run(pipe, "sdxl", guidance_scale=3.0, steps=2)
    assert gp.calls == [("main", 6), ("main", 6)] and out.shape == (2, 8, 8, 3)


# -- the pipeline is left as found -------------------------------------------------------------------------------------

def test_pipeline_restored_after_an_exception_and_save_pretrained_round_trips(pipes, tmp_path):
    pipe = pipes["sd"]
    unet, text_encoder = pipe.unet, pipe.text_encoder
    before = state_snapshot(unet)
    plain = run(pipe, "sd", guidance_scale=3.0)
    with pytest.raises(RuntimeError, match="boom"):
        with guided_pipeline(pipe, "insitu", w=3.0, seeds=[0, 1]):
            assert "forward" in unet.__dict__
            pipe.save_pretrained(tmp_path / "inside")               # works inside the block
            raise RuntimeError("boom")
    assert pipe.unet is unet and pipe.text_encoder is text_encoder and "forward" not in unet.__dict__
    assert_same_state(before, state_snapshot(unet))
    assert abs(run(pipe, "sd", guidance_scale=3.0) - plain).max() == 0
    pipe.save_pretrained(tmp_path / "after")
    for folder in ("inside", "after"):
        back = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / folder, local_files_only=True)
        back.set_progress_bar_config(disable=True)
        assert abs(run(back, "sd", guidance_scale=3.0) - plain).max() < 1e-6


def test_bad_arguments_are_clear(pipes):
    pipe = pipes["sd"]
    with pytest.raises(ValueError, match="needs a guidance weight"):
        guided_pipeline(pipe, "insitu")
    with pytest.raises(ValueError, match="unknown method"):
        guided_pipeline(pipe, "magic", w=2.0)
    with pytest.raises(TypeError, match="guide="):
        guided_pipeline(pipe, "autoguidance", w=2.0)
    with pytest.raises(ValueError, match="one seed per image"):
        with guided_pipeline(pipe, "insitu", w=2.0, seeds=[0, 1, 2]):
            run(pipe, "sd", guidance_scale=3.0, steps=1)
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        with guided_pipeline(pipe, "cfg"):
            run(pipe, "sd", guidance_scale=1.0, steps=1)
    assert "forward" not in pipe.unet.__dict__


# -- the diffusers guider (modular pipelines) ----------------------------------------------------------------------

def _guider_loop(guider, unet, x, t, cond, uncond):
    """What a modular pipeline's denoise step does with a guider: one model call per batch."""
    guider.set_state(step=0, num_inference_steps=10, timestep=t)
    batches = guider.prepare_inputs({"encoder_hidden_states": (cond, uncond)})
    for b in batches:
        guider.prepare_models(unet)
        try:
            b.noise_pred = unet(x, t, encoder_hidden_states=b.encoder_hidden_states).sample
        finally:
            guider.cleanup_models(unet)
    return guider(batches).pred, len(batches)


@pytest.mark.parametrize("pert,kw", [("dropout", {"p": 0.2}), ("identityattention", {"p": 1.0})])
def test_guider_equals_the_context_managers_arithmetic(pert, kw):
    from autoguidance.adapters.diffusers import GuidedModelCall, PipelineScale
    from autoguidance.adapters.guider import AutoguidanceGuider
    from autoguidance.guidance import Pass
    from autoguidance.methods import make_perturbation
    from autoguidance.schedules import as_schedule

    unet, sched = tiny_unet(), tiny.ddim()
    before = state_snapshot(unet)
    g = torch.Generator().manual_seed(0)
    x, cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g), torch.zeros(2, 5, 12)
    t = torch.tensor(601)
    guider = AutoguidanceGuider.for_scheduler(sched, w=3.0, perturbation=pert, guidance_scale=4.0, seeds=[5, 6], **kw)
    with torch.no_grad():
        pred, batches = _guider_loop(guider, unet, x, t, cond, uncond)
        call = GuidedModelCall(unet, sched)
        guides = [(Pass(call.net, drop_labels=True), PipelineScale()),
                  (Pass(call.net, perturbation=make_perturbation(pert, kw["p"]), module=unet), as_schedule(3.0))]
        ref = call.forward((torch.cat([x, x]), t), {"encoder_hidden_states": torch.cat([uncond, cond])}, guides,
                           seeds=[5, 6], cfg=(False, 4.0)).sample[:2]
    assert batches == 3 and call.calls == [("main", 6)]
    torch.testing.assert_close(pred, ref, rtol=1e-4, atol=1e-4)
    assert_same_state(before, state_snapshot(unet))
    # an interval in sigma that excludes this step drops the degraded batch
    out = guider.new(sigma_lo=1e3)
    with torch.no_grad():
        _, batches = _guider_loop(out, unet, x, t, cond, uncond)
    assert batches == 2


def test_guider_is_serialisable_like_diffusers_guiders(tmp_path):
    from autoguidance.adapters.guider import AutoguidanceGuider

    guider = AutoguidanceGuider.for_scheduler(tiny.ddim(), w=2.5, p=0.15, guidance_scale=3.0, sigma_lo=0.28, sigma_hi=5.4,
                                              seeds=[1, 2, 3])
    guider.save_pretrained(tmp_path / "guider")
    back = AutoguidanceGuider.from_pretrained(tmp_path / "guider")
    strip = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert strip(back.config) == strip(guider.config) and back.config.seeds == [1, 2, 3]
    assert back.new(w=4.0).config.w == 4.0
    with pytest.raises(ValueError, match="guided_pipeline"):
        AutoguidanceGuider(perturbation="inputnoise")


def test_guider_in_a_modular_pipeline_gives_the_context_managers_images(pipes):
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    from autoguidance.adapters.guider import AutoguidanceGuider

    ref = pipes["sdxl"]
    mp = StableDiffusionXLAutoBlocks().init_pipeline()
    guider = AutoguidanceGuider.for_scheduler(ref.scheduler, w=3.0, p=0.2, guidance_scale=4.0, seeds=[5, 6],
                                              sigma_lo=0.5)
    mp.update_components(unet=ref.unet, vae=ref.vae, text_encoder=ref.text_encoder,
                         text_encoder_2=ref.text_encoder_2, tokenizer=ref.tokenizer, tokenizer_2=ref.tokenizer_2,
                         scheduler=ref.scheduler, guider=guider)
    mp.set_progress_bar_config(disable=True)
    g = [torch.Generator().manual_seed(10 + i) for i in range(2)]
    modular = mp(prompt=PROMPTS, num_inference_steps=3, generator=g, output="images", output_type="np",
                 height=8, width=8)
    with guided_pipeline(ref, "insitu", w=3.0, p=0.2, interval=(0.5, float("inf")), seeds=[5, 6]) as gp:
        classic = run(ref, "sdxl", guidance_scale=4.0)
    plain_cfg = run(ref, "sdxl", guidance_scale=4.0)
    assert abs(modular - classic).max() < 1e-5
    assert abs(classic - plain_cfg).max() > 1e-4 and sorted({r for _, r in gp.calls}) in ([6], [4, 6])
