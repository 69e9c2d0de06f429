"""diffusers behind the denoiser contract (`autoguidance.adapters.diffusers`), with tiny U-Nets built from configs
in code (no download)."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import autoguidance as ag  # noqa: E402
from autoguidance.adapters.diffusers import DiffusersDenoiser, InSituGuidedUNet, VPSchedule  # noqa: E402
from autoguidance.perturb import BlockDrop, Dropout, IdentityAttention, InputNoise, WeightNoise  # noqa: E402
from conftest import assert_same_state, state_snapshot  # noqa: E402
from helpers import assert_batch_close  # noqa: E402


def tiny_unet(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
               down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
               norm_num_groups=8, attention_head_dim=8)
    return diffusers.UNet2DModel(**{**cfg, **overrides}).eval().requires_grad_(False)


def tiny_cond_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, norm_num_groups=8, attention_head_dim=8).eval().requires_grad_(False)


def scheduler(prediction_type="epsilon"):
    return diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False, prediction_type=prediction_type)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoiser_agrees_with_the_schedulers_x0_prediction(prediction_type, quantize):
    unet, sched = tiny_unet(), scheduler(prediction_type)
    D = DiffusersDenoiser(unet, sched, quantize=quantize)
    assert D.prediction_type == prediction_type
    x_vp = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for t in [5, 250, 600, 950]:
        with torch.no_grad():
            ref = sched.step(unet(x_vp, t).sample, t, x_vp).pred_original_sample
            a = sched.alphas_cumprod[t].double()
            sigma = ((1 - a) / a).sqrt()
            x = (x_vp.double() * (1 + sigma**2).sqrt()).float()        # the same input in EDM coordinates
            out = D(x, float(sigma))
        err = (out - ref).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref.abs().max().item()), (t, err)


def test_sigma_timestep_mapping():
    s = VPSchedule(scheduler())
    ac = scheduler().alphas_cumprod.double()
    assert s.sigma_min == pytest.approx(math.sqrt((1 - ac[0]) / ac[0]))
    assert s.sigma_max == pytest.approx(math.sqrt((1 - ac[-1]) / ac[-1]))
    t = torch.tensor([0.0, 3.0, 3.25, 499.5, 999.0])
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(t)), t.double(), rtol=0, atol=1e-6)
    assert s.sigma_to_t(torch.tensor([1e-5, 1e5])).tolist() == [0.0, 999.0]      # clamped to the schedule
    with pytest.raises(TypeError, match="alphas_cumprod"):
        VPSchedule(object())


def test_insitu_guided_sample_runs_end_to_end_through_our_sampler():
    unet = tiny_unet()
    D = DiffusersDenoiser(unet, scheduler())
    before = state_snapshot(unet)
    G = ag.insitu(D, 3.0, 0.1)          # dropout at the unet's own nn.Dropout sites (resnets, attention outputs)
    kw = dict(num_steps=4, sigma_min=D.sigma_min, sigma_max=D.sigma_max, progress=False)
    guided = ag.generate(G, range(3), [3, 8, 8], **kw)
    plain = ag.generate(D, range(3), [3, 8, 8], **kw)
    assert guided.shape == (3, 3, 8, 8) and torch.isfinite(guided).all() and not torch.allclose(guided, plain)
    assert G.stats["forward_calls"] == 7          # Heun, 4 steps: 7 D calls, each ONE batched unet call
    assert torch.equal(ag.generate(G, range(3), [3, 8, 8], **kw), guided)    # seeded
    assert_same_state(before, state_snapshot(unet))
    for pert in [BlockDrop(0.3), WeightNoise(0.1), IdentityAttention(), InputNoise(0.2)]:
        out = ag.generate(ag.perturbation_guidance(D, 2.0, pert), range(2), [3, 8, 8], **kw)
        assert torch.isfinite(out).all(), pert.name
    assert_same_state(before, state_snapshot(unet))


def test_class_labels_one_hot_and_null_class():
    unet = tiny_unet(num_class_embeds=4)      # classes 0..2, and 3 = the null class
    D = DiffusersDenoiser(unet, scheduler(), null_class=3)
    assert D.labels_as == "class"
    x, sigma = torch.randn(3, 3, 8, 8), torch.full((3,), 2.0)
    labels = torch.tensor([[0, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.float32)
    x_vp, t, kw = D.unet_inputs(x, sigma, labels)
    assert kw["class_labels"].tolist() == [1, 3, 0]
    with torch.no_grad():
        ref = x - 2.0 * unet(x_vp, t, class_labels=torch.tensor([1, 3, 0])).sample
        torch.testing.assert_close(D(x, sigma, labels), ref, rtol=1e-5, atol=1e-5)
        G = ag.cfg(D, 2.0)
        G(x, sigma, labels)
    assert G.stats["forward_calls"] == 1          # conditional and unconditional rows in one call
    with pytest.raises(ValueError, match="null_class"):
        DiffusersDenoiser(unet, scheduler())(x, sigma, labels)
    with pytest.raises(ValueError, match="one-hot"):
        D(x, sigma, labels * 0.5 + 0.1)
    with pytest.raises(ValueError, match="unconditional"):
        DiffusersDenoiser(tiny_unet(), scheduler())(x, sigma, labels)


def test_condition_model_with_text_labels_and_fixed_states():
    unet = tiny_cond_unet()
    sched = diffusers.DDIMScheduler(prediction_type="v_prediction")
    ehs = torch.randn(2, 5, 12)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 3.0])
    D = DiffusersDenoiser(unet, sched)
    assert D.labels_as == "text"
    with torch.no_grad():
        x_vp, t, _ = D.unet_inputs(x, sigma, ehs.flatten(1))
        v = unet(x_vp, t, encoder_hidden_states=ehs).sample
        s = sigma.reshape(-1, 1, 1, 1)
        ref = x / (1 + s**2) - s / (1 + s**2).sqrt() * v
        torch.testing.assert_close(D(x, sigma, ehs.flatten(1)), ref, rtol=1e-5, atol=1e-5)
        fixed = DiffusersDenoiser(unet, sched, encoder_hidden_states=ehs[0])
        torch.testing.assert_close(fixed(x, sigma), D(x, sigma, ehs[0].flatten().expand(2, -1)), rtol=0, atol=0)
        null = DiffusersDenoiser(unet, sched, null_text=ehs[1])
        torch.testing.assert_close(null(x, sigma, torch.zeros(2, 60)), D(x, sigma, ehs[1].flatten().expand(2, -1)),
                                   rtol=0, atol=0)
    sites = IdentityAttention().sites(D)
    assert sites and all(p.endswith("attn1") for p, _ in sites)   # self-attention only, not cross-attention
    out = ag.generate(ag.perturbation_guidance(D, 2.0, IdentityAttention()), range(2), [4, 8, 8],
                      labels=ehs.flatten(1), num_steps=2, sigma_min=D.sigma_min, sigma_max=D.sigma_max, progress=False)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="cross-attention"):
        with IdentityAttention(where="*attn2").active(D, torch.ones(2, dtype=torch.bool), torch.arange(2),
                                                      torch.ones(2)):
            D(x, sigma, ehs.flatten(1))


def test_identity_attention_rule_matches_attention_over_a_single_token():
    """With one token the softmax map is exactly the identity, so identity attention must change nothing."""
    unet = tiny_unet()
    attn = unet.down_blocks[1].attentions[0]
    model = torch.nn.ModuleDict({"attn": attn})
    h = torch.randn(3, 32, 1, 1)
    clean = attn(h)
    with IdentityAttention(where="attn").active(model, torch.ones(3, dtype=torch.bool), torch.arange(3),
                                                torch.ones(3)):
        same = attn(h)
        other = attn(torch.randn(3, 32, 4, 4))
    torch.testing.assert_close(same, clean, rtol=1e-5, atol=1e-6)
    assert other.shape == (3, 32, 4, 4)


def test_block_drop_on_resnet_blocks_returns_the_shortcut():
    unet = tiny_unet()
    assert unet.down_blocks[0].resnets[0].conv_shortcut is None
    assert unet.down_blocks[1].resnets[0].conv_shortcut is not None
    for block in [unet.down_blocks[0].resnets[0], unet.down_blocks[1].resnets[0]]:   # without / with shortcut
        model = torch.nn.ModuleDict({"b": block})
        x, temb = torch.randn(2, block.in_channels, 4, 4), torch.randn(2, block.time_emb_proj.in_features)
        with BlockDrop(1.0).active(model, torch.ones(2, dtype=torch.bool), torch.arange(2), torch.ones(2)):
            y = block(x, temb)
        skip = block.conv_shortcut(x) if block.conv_shortcut is not None else x
        torch.testing.assert_close(y, skip / block.output_scale_factor, rtol=0, atol=0)


def _pipe(unet, sched):
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_guided_unet_is_one_batched_call_equal_to_two():
    unet, sched = tiny_unet(), scheduler()
    pert = Dropout(0.2)
    wrapped = InSituGuidedUNet(unet, sched, 3.0, pert, seeds=[7, 8])
    sample, t = torch.randn(2, 3, 8, 8), torch.tensor(400)
    calls = []
    handle = unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    with torch.no_grad():
        guided = wrapped(sample, t).sample
        handle.remove()
        exact = unet(sample, t).sample
        keys = wrapped._keys(2, t.expand(2).double())
        sigma = wrapped.schedule.t_to_sigma(t.expand(2)).float()
        with pert.active(unet, torch.ones(2, dtype=torch.bool), keys, sigma):
            bad = unet(sample, t).sample
    assert calls == [4]                                      # exact and degraded rows in one call
    assert_batch_close(guided, bad + 3.0 * (exact - bad))            # one call of 4 rows against two of 2
    assert wrapped.config.sample_size == 8 and wrapped.dtype == torch.float32


def test_guided_unet_with_input_noise_guides_x0_at_the_same_point():
    """eps is carried back to (x_t, t): the x0 of the guided eps is D_bad + w (D_good - D_bad)."""
    unet, sched = tiny_unet(), scheduler()
    pert, w = InputNoise(0.2), 2.5
    wrapped = InSituGuidedUNet(unet, sched, w, pert, seeds=[1, 2])
    D = DiffusersDenoiser(unet, sched)
    sample, t = torch.randn(2, 3, 8, 8), torch.tensor(300)
    with torch.no_grad():
        eps = wrapped(sample, t).sample
        sigma = wrapped.schedule.t_to_sigma(t.expand(2))
        x = (sample.double() * (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1))
        keys = wrapped._keys(2, t.expand(2).double())
        x_bad, s_bad = pert.transform_inputs(x, sigma, torch.ones(2, dtype=torch.bool), keys)
        d_good, d_bad = D(x.float(), sigma.float()), D(x_bad.float(), s_bad.float())
    x0 = x - sigma.reshape(-1, 1, 1, 1) * eps.double()
    torch.testing.assert_close(x0.float(), d_bad + w * (d_good - d_bad), rtol=1e-4, atol=1e-4)


def test_guided_unet_in_a_pipelines_own_loop():
    unet, sched = tiny_unet(), scheduler()
    before = state_snapshot(unet)
    pipe = _pipe(unet, sched)
    run = lambda: pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                       output_type="np").images
    plain = run()
    pipe.unet = InSituGuidedUNet(unet, sched, 3.0, seeds=[0, 1])
    guided, again = run(), run()
    assert guided.shape == plain.shape and (guided != plain).any() and (guided == again).all()
    assert pipe.unet.last_rows == (2, 2)
    pipe.unet = pipe.unet.unet
    assert (run() == plain).all()
    assert_same_state(before, state_snapshot(unet))
    with pytest.raises(ValueError, match="multiple of the number of seeds"):
        InSituGuidedUNet(unet, sched, 3.0, seeds=[0, 1, 2])(torch.randn(2, 3, 8, 8), 10)
    no_guide = InSituGuidedUNet(unet, sched, 1.0)
    no_guide(torch.randn(2, 3, 8, 8), 10)
    assert no_guide.last_rows == (2, 0)                # w = 1: no degraded pass at all


def test_missing_diffusers_names_the_extra():
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import autoguidance.adapters.diffusers as a\n"
            "try:\n    a.DiffusersDenoiser(None, None)\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install autoguidance[diffusers]" in out.stdout, out.stderr
