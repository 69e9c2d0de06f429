"""Flow matching, transformers and rich conditioning behind the contract (issue 12), on tiny diffusers models
built from configs in code (no download): SD3 (flow matching), DiT (learned sigma), an SDXL-like U-Net
(added_cond_kwargs), with conditioning passed as mappings."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import autoguidance as ag  # noqa: E402
from autoguidance.adapters import DiffusersDenoiser  # noqa: E402
from autoguidance.adapters.diffusers import flow_times  # noqa: E402
from autoguidance.perturb import IdentityAttention, SkipLayers  # noqa: E402
from autoguidance.sampling import sample_flow_euler  # noqa: E402
from conftest import assert_same_state, state_snapshot  # noqa: E402
from helpers import assert_batch_close  # noqa: E402

N = 2


def tiny_sd3(layers=3, seed=0):
    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
        pos_embed_max_size=16).eval().requires_grad_(False)


def tiny_dit(layers=2, seed=0):
    torch.manual_seed(seed)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=layers,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4).eval().requires_grad_(False)


def tiny_sdxl_unet(seed=0, blocks=(16, 32)):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=blocks,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, norm_num_groups=8, attention_head_dim=8, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 10).eval().requires_grad_(False)


def flow_scheduler(shift=3.0):
    return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def sd3_cond(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(n, 5, 12, generator=g), "pooled_projections": torch.randn(n, 10, generator=g)}


SD3_UNCOND = {"encoder_hidden_states": torch.zeros(1, 5, 12), "pooled_projections": torch.zeros(10)}


def sdxl_cond(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(n, 5, 12, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(n, 10, generator=g),
                                  "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]]).expand(n, 6)}}


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3()


# -- the denoiser equals the x0 implied by the model's output and the scheduler's formulas -----------------------

def test_sd3_flow_denoiser_equals_the_schedulers_x0(sd3):
    sched = flow_scheduler()
    sched.set_timesteps(6)
    D = DiffusersDenoiser(sd3, sched)
    assert D.is_flow and D.prediction_type == "flow" and D.conditional
    cond = sd3_cond()
    x_t = torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for i in [0, 2, 5]:                                # t = 1 (pure noise) included
            t = sched.sigmas[i]
            v = sd3(x_t, timestep=sched.timesteps[i].expand(N), return_dict=False, **cond)[0]
            ref = x_t - t * v                              # x0 of the flow x_t = (1 - t) x0 + t n, v = n - x0
            torch.testing.assert_close(D.flow(x_t, t, cond), ref, atol=1e-5, rtol=0)
            if t < 1:                                      # the same in EDM form: x = x_t / (1 - t), sigma = t / (1 - t)
                edm = D(x_t / (1 - t), t / (1 - t), cond)
                torch.testing.assert_close(edm, ref, atol=1e-5, rtol=0)


def test_dit_learned_sigma_equals_ddpm_x0():
    dit = tiny_dit()
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range", clip_sample=False)
    D = DiffusersDenoiser(dit, sched)
    cond = {"class_labels": torch.tensor([3, 7])}
    x_vp = torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in [10, 500, 900]:
            out = dit(x_vp, timestep=torch.tensor([t, t]), return_dict=False, **cond)[0]
            assert out.shape[1] == 8                                       # learned variance channels
            ref = sched.step(out, t, x_vp).pred_original_sample
            a = sched.alphas_cumprod[t].double()
            sigma = ((1 - a) / a).sqrt()
            x = (x_vp.double() * (1 + sigma**2).sqrt()).float()
            torch.testing.assert_close(D(x, float(sigma), cond), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sdxl_unet_with_added_cond_kwargs_equals_the_schedulers_x0(prediction_type):
    unet = tiny_sdxl_unet()
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False, prediction_type=prediction_type)
    D = DiffusersDenoiser(unet, sched)
    cond = sdxl_cond()
    flat = {"encoder_hidden_states": cond["encoder_hidden_states"], **cond["added_cond_kwargs"]}
    x_vp = torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in [10, 600]:
            out = unet(x_vp, t, return_dict=False, **cond)[0]
            ref = sched.step(out, t, x_vp).pred_original_sample
            a = sched.alphas_cumprod[t].double()
            sigma = ((1 - a) / a).sqrt()
            x = (x_vp.double() * (1 + sigma**2).sqrt()).float()
            torch.testing.assert_close(D(x, float(sigma), cond), ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(D(x, float(sigma), flat), ref, atol=1e-5, rtol=1e-5)  # flat SDXL keys


# -- flow sampling from pure noise equals the scheduler's loop -------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_equals_the_diffusers_scheduler_loop(sd3, shift):
    sched = flow_scheduler(shift)
    cond = sd3_cond()
    noise = torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sched.set_timesteps(5)
    x = noise.clone()
    with torch.no_grad():
        for tt in sched.timesteps:
            v = sd3(x, timestep=tt.expand(N), return_dict=False, **cond)[0]
            x = sched.step(v, tt, x).prev_sample
    D = DiffusersDenoiser(sd3, flow_scheduler(shift))
    ts = flow_times(flow_scheduler(shift), 5)
    assert float(ts[0]) == 1.0 and float(ts[-1]) == 0.0
    with torch.no_grad():
        ours = sample_flow_euler(D, noise.clone(), ts, labels=cond, progress=False)
        ours_w1 = sample_flow_euler(ag.cfg(D, 1.0, uncond_labels=SD3_UNCOND), noise.clone(), ts, labels=cond,
                                    progress=False)
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_w1, x, atol=1e-5, rtol=0)


def test_flow_times_follow_dynamic_shift():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    ts = flow_times(sched, 4, mu=0.8)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    ref.set_timesteps(4, mu=0.8)
    assert torch.equal(ts, ref.sigmas.float())


# -- every guidance method on every model, the model untouched afterwards ----------------------------------------

def _methods(D, guide_D, uncond):
    return {
        "cfg": ag.cfg(D, 2.0, uncond_labels=uncond),
        "autoguidance": ag.autoguidance(D, guide_D, 2.0),
        "insitu": ag.insitu(D, 2.0, 0.1, where="*.ff.net.2" if "Transformer" in type(D.unet).__name__ else None),
        "skip-layer": ag.perturbation_guidance(D, 2.0, SkipLayers(layers=[1])),
        "identity-attention": ag.perturbation_guidance(D, 2.0, IdentityAttention()),
    }


def test_every_method_on_sd3_from_pure_noise(sd3):
    D, guide = DiffusersDenoiser(sd3, flow_scheduler()), DiffusersDenoiser(tiny_sd3(2, seed=5), flow_scheduler())
    before = state_snapshot(sd3)
    cond, noise = sd3_cond(), torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ts = flow_times(flow_scheduler(), 3)
    with torch.no_grad():
        plain = sample_flow_euler(D, noise, ts, labels=cond, progress=False, seeds=[0, 1])
        for name, G in _methods(D, guide, SD3_UNCOND).items():
            out = sample_flow_euler(G, noise, ts, labels=cond, progress=False, seeds=[0, 1])
            assert torch.isfinite(out).all(), name
            assert not torch.allclose(out, plain), name
            assert G.stats["forward_calls"] == 3 * (2 if name == "autoguidance" else 1), name
    assert_same_state(before, state_snapshot(sd3))


def test_identity_attention_on_joint_attention_keeps_the_text_tokens(sd3):
    attn = sd3.transformer_blocks[0].attn
    h, e = torch.randn(N, 16, 16), torch.randn(N, 5, 16)
    rows = torch.tensor([False, True])
    with torch.no_grad():
        exact = attn(hidden_states=h, encoder_hidden_states=e)
        with IdentityAttention(where="transformer_blocks.0.attn").active(sd3, rows, torch.zeros(2, dtype=torch.long),
                                                                        torch.ones(2)):
            pert = attn(hidden_states=h, encoder_hidden_states=e)
    torch.testing.assert_close(pert[0][1], attn.to_out[0](attn.to_v(h[1])))
    assert torch.equal(pert[0][0], exact[0][0]) and torch.equal(pert[1], exact[1])


def test_skip_layers_returns_the_inputs_of_a_joint_block_in_output_order(sd3):
    block = sd3.transformer_blocks[1]
    h, e, temb = torch.randn(N, 16, 16), torch.randn(N, 5, 16), torch.randn(N, 16)
    rows = torch.tensor([True, False])
    with torch.no_grad():
        exact = block(h, e, temb)
        with SkipLayers(layers=[1]).active(sd3, rows, torch.zeros(2, dtype=torch.long), torch.ones(2)):
            out = block(h, e, temb)
    assert torch.equal(out[0][0], e[0]) and torch.equal(out[1][0], h[0])
    assert torch.equal(out[0][1], exact[0][1]) and torch.equal(out[1][1], exact[1][1])
    last = sd3.transformer_blocks[2]                     # context_pre_only: (None, hidden_states)
    with torch.no_grad(), SkipLayers(layers=[-1]).active(sd3, rows, torch.zeros(2, dtype=torch.long), torch.ones(2)):
        out = last(h, e, temb)
    assert out[0] is None and torch.equal(out[1][0], h[0])
    with pytest.raises(ag.perturb.SiteError, match=r"layers=\[0\.\.2\]"):
        SkipLayers(layers=[7]).sites(sd3)


@pytest.mark.parametrize("kind", ["dit", "sdxl"])
def test_every_method_on_dit_and_sdxl(kind):
    if kind == "dit":
        net, gnet = tiny_dit(), tiny_dit(1, seed=4)
        sched = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range")
        cond, uncond = {"class_labels": torch.tensor([3, 7])}, {"class_labels": torch.tensor(10)}
    else:
        net, gnet = tiny_sdxl_unet(), tiny_sdxl_unet(seed=4, blocks=(8, 16))
        sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
        cond, uncond = sdxl_cond(), {"encoder_hidden_states": torch.zeros(5, 12),
                                     "added_cond_kwargs": {"text_embeds": torch.zeros(10)}}
    D, guide = DiffusersDenoiser(net, sched), DiffusersDenoiser(gnet, sched)
    before = state_snapshot(net)
    kw = dict(num_steps=3, sigma_min=D.sigma_min, sigma_max=D.sigma_max, progress=False, labels=cond)
    with torch.no_grad():
        plain = ag.generate(D, [0, 1], [4, 8, 8], **kw)
        for name, G in _methods(D, guide, uncond).items():
            if kind == "sdxl" and name == "skip-layer":
                G = ag.perturbation_guidance(D, 2.0, SkipLayers(layers=[0], blocks="mid_block.attentions"))
            out = ag.generate(G, [0, 1], [4, 8, 8], **kw)
            assert torch.isfinite(out).all() and not torch.allclose(out, plain), name
    assert_same_state(before, state_snapshot(net))


# -- bad input: one-line errors naming the fix ------------------------------------------------------------------

def test_errors_name_the_fix(sd3):
    with pytest.raises(TypeError, match="does not know PNDM|FlowMatchEulerDiscreteScheduler"):
        DiffusersDenoiser(sd3, object())
    D = DiffusersDenoiser(sd3, flow_scheduler())
    x = torch.randn(N, 4, 8, 8)
    bad = sd3_cond(3)
    with pytest.raises(ValueError, match=r"'encoder_hidden_states' has shape \[3, 5, 12\] but the batch has 2 rows"):
        D(x, 1.0, bad)
    with pytest.raises(ValueError, match="misses 'pooled_projections'"):
        D(x, 1.0, {"encoder_hidden_states": torch.randn(N, 5, 12)})
    with pytest.raises(ValueError, match="labels=None.*guide pass would equal its main pass"):
        ag.cfg(D, 2.0, uncond_labels=SD3_UNCOND)(x, 1.0)
    with pytest.raises(ValueError, match="uncond_labels="):
        ag.cfg(D, 2.0)(x, 1.0, sd3_cond())
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(ValueError, match="unconditional.*guide pass would equal"):
        ag.cfg(DiffusersDenoiser(unet, diffusers.DDPMScheduler()), 2.0)
    for msg in [str(e) for e in _errors(D)]:
        assert "\n" not in msg, msg


def _errors(D):
    out = []
    for f in [lambda: D(torch.randn(N, 4, 8, 8), 1.0, sd3_cond(3)),
              lambda: ag.cfg(D, 2.0, uncond_labels=SD3_UNCOND)(torch.randn(N, 4, 8, 8), 1.0)]:
        try:
            f()
        except ValueError as e:
            out.append(e)
    return out


# -- Flux: double and single blocks, packed latents [N, L, C] ---------------------------------------------------

def tiny_flux(seed=0):
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(2, 2, 4)).eval().requires_grad_(False)


def test_flux_denoiser_equals_x0_and_every_method_runs():
    flux = tiny_flux()
    ids = {"img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(5, 3)}      # fixed for every row
    D = DiffusersDenoiser(flux, flow_scheduler(), unet_kwargs=ids)
    cond = sd3_cond()
    x_t = torch.randn(N, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for t in [1.0, 0.4]:
            v = flux(x_t, timestep=torch.full((N,), t), return_dict=False, **cond, **ids)[0]   # Flux: t, not 1000 t
            torch.testing.assert_close(D.flow(x_t, t, cond), x_t - t * v, atol=1e-5, rtol=0)
    before = state_snapshot(flux)
    ts = flow_times(flow_scheduler(), 3)
    gD = DiffusersDenoiser(tiny_flux(seed=3), flow_scheduler(), unet_kwargs=ids)
    methods = _methods(D, gD, SD3_UNCOND)
    methods["skip-single"] = ag.perturbation_guidance(D, 2.0, SkipLayers(layers=[0, 1], blocks="single_transformer_blocks"))
    with torch.no_grad():
        plain = sample_flow_euler(D, x_t, ts, labels=cond, progress=False)
        for name, G in methods.items():
            out = sample_flow_euler(G, x_t, ts, labels=cond, progress=False)
            assert torch.isfinite(out).all() and not torch.allclose(out, plain), name
    assert_same_state(before, state_snapshot(flux))


def test_sites_prints_pasteable_block_lists_and_attention(tmp_path, capsys):
    from autoguidance.cli.sites import paste_guide

    text = paste_guide(tiny_sd3())
    assert "SkipLayers(blocks='transformer_blocks', layers=[0, 1, 2])" in text
    assert "IdentityAttention(where=['transformer_blocks.0.attn'" in text
    tiny_sd3().save_config(tmp_path)
    from autoguidance.cli import main
    assert main(["sites", str(tmp_path)]) == 0
    assert "layers=[0..2]" in capsys.readouterr().out


def test_video_latents_5d_through_the_contract_with_stg():
    torch.manual_seed(0)
    wan = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=12,
        freq_dim=16, ffn_dim=16, num_layers=2, rope_max_seq_len=32).eval().requires_grad_(False)
    D = DiffusersDenoiser(wan, flow_scheduler())
    cond = {"encoder_hidden_states": torch.randn(N, 5, 12)}
    x_t = torch.randn(N, 4, 3, 8, 8, generator=torch.Generator().manual_seed(2))       # [N, C, T, H, W]
    with torch.no_grad():
        v = wan(x_t, timestep=torch.full((N,), 700.0), return_dict=False, **cond)[0]
        torch.testing.assert_close(D.flow(x_t, 0.7, cond), x_t - 0.7 * v, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="misses 'encoder_hidden_states'"):
            D.flow(x_t, 0.7, {})
    before = state_snapshot(wan)
    ts = flow_times(flow_scheduler(), 3)
    stg = ag.perturbation_guidance(D, 2.0, SkipLayers(layers=[1]))          # STG: the default block list 'blocks'
    cfg = ag.cfg(D, 2.0, uncond_labels={"encoder_hidden_states": torch.zeros(5, 12)})
    with torch.no_grad():
        plain = sample_flow_euler(D, x_t, ts, labels=cond, progress=False)
        for G in (stg, cfg):
            out = sample_flow_euler(G, x_t, ts, labels=cond, progress=False)
            assert out.shape == x_t.shape and torch.isfinite(out).all() and not torch.allclose(out, plain)
    assert_same_state(before, state_snapshot(wan))


def test_insitu_unet_on_dit_guides_the_prediction_and_keeps_the_main_variance():
    from autoguidance.adapters import InSituGuidedUNet

    dit = tiny_dit()
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range")
    wrapped = InSituGuidedUNet(dit, sched, w=3.0, perturbation=SkipLayers(layers=[0]))
    x, t, cl = torch.randn(N, 4, 8, 8), torch.tensor([400, 400]), torch.tensor([1, 2])
    with torch.no_grad():
        out = wrapped(x, t, class_labels=cl, return_dict=False)[0]
        exact = dit(x, t, class_labels=cl, return_dict=False)[0]
    assert out.shape == exact.shape
    assert_batch_close(out[:, 4:], exact[:, 4:])          # the wrapper's call has 2N rows, `exact`'s N
    assert not torch.allclose(out[:, :4], exact[:, :4])


def test_block_drop_on_tuple_returning_joint_blocks(sd3):
    from autoguidance.perturb import BlockDrop

    D = DiffusersDenoiser(sd3, flow_scheduler())
    before = state_snapshot(sd3)
    G = ag.perturbation_guidance(D, 2.0, BlockDrop(1.0, where=["unet.transformer_blocks.1"], path="input"))
    G_skip = ag.perturbation_guidance(D, 2.0, SkipLayers(layers=[1]))
    x, cond = torch.randn(N, 4, 8, 8), sd3_cond()
    with torch.no_grad():
        # the same 2N-row call of the same blocks in both: bit for bit
        torch.testing.assert_close(G.flow(x, 0.8, cond), G_skip.flow(x, 0.8, cond), atol=0, rtol=0)
    assert_same_state(before, state_snapshot(sd3))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_class_conditional_unet2d_with_a_mapping(prediction_type):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, num_class_embeds=5).eval().requires_grad_(False)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False, prediction_type=prediction_type)
    D = DiffusersDenoiser(unet, sched)
    cond = {"class_labels": torch.tensor([1, 3])}
    x_vp = torch.randn(N, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t = 300
        ref = sched.step(unet(x_vp, t, **cond).sample, t, x_vp).pred_original_sample
        a = sched.alphas_cumprod[t].double()
        sigma = ((1 - a) / a).sqrt()
        x = (x_vp.double() * (1 + sigma**2).sqrt()).float()
        torch.testing.assert_close(D(x, float(sigma), cond), ref, atol=1e-5, rtol=1e-5)
    before = state_snapshot(unet)
    guide = DiffusersDenoiser(diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=5).eval(), sched)
    methods = _methods(D, guide, {"class_labels": torch.tensor(4)})
    methods["skip-layer"] = ag.perturbation_guidance(D, 2.0, SkipLayers(layers=[0], blocks="down_blocks.0.resnets"))
    kw = dict(num_steps=3, sigma_min=D.sigma_min, sigma_max=D.sigma_max, progress=False, labels=cond)
    with torch.no_grad():
        plain = ag.generate(D, [0, 1], [3, 8, 8], **kw)
        for name, G in methods.items():
            out = ag.generate(G, [0, 1], [3, 8, 8], sampler="dpmpp_2m", **kw) if name == "cfg" else \
                ag.generate(G, [0, 1], [3, 8, 8], **kw)
            assert torch.isfinite(out).all(), name
            if name != "cfg":
                assert not torch.allclose(out, plain), name
    assert_same_state(before, state_snapshot(unet))


def test_pixart_transformer_with_a_mapping_and_none_entries():
    torch.manual_seed(0)
    m = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=16, caption_channels=12, norm_num_groups=4,
        use_additional_conditions=False).eval().requires_grad_(False)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range", clip_sample=False)
    D = DiffusersDenoiser(m, sched)
    cond = {"encoder_hidden_states": torch.randn(N, 5, 12), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    x_vp = torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = 400
    with torch.no_grad():
        ref = sched.step(m(x_vp, timestep=torch.tensor([t, t]), return_dict=False, **cond)[0], t,
                         x_vp).pred_original_sample
        a = sched.alphas_cumprod[t].double()
        sigma = ((1 - a) / a).sqrt()
        x = (x_vp.double() * (1 + sigma**2).sqrt()).float()
        torch.testing.assert_close(D(x, float(sigma), cond), ref, atol=1e-5, rtol=1e-5)
        before = state_snapshot(m)
        for G in [ag.cfg(D, 2.0, uncond_labels={"encoder_hidden_states": torch.zeros(5, 12)}),
                  ag.perturbation_guidance(D, 2.0, SkipLayers(layers=[1])),
                  ag.perturbation_guidance(D, 2.0, IdentityAttention())]:
            assert not torch.allclose(G(x, float(sigma), cond), ref)
    assert_same_state(before, state_snapshot(m))


def test_the_wrapped_model_is_reachable_as_model_for_perturbation_sites():
    import torch
    from autoguidance.adapters import DiffusersDenoiser
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                               pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)
    D = DiffusersDenoiser(tr, FlowMatchEulerDiscreteScheduler())
    assert D.model is D.unet is tr
    assert isinstance(D.model, torch.nn.Module)
