"""Tiny random-weight diffusers pipelines, built from configs in code (nothing is downloaded): one place for the tests
and for the pipeline-by-method table (`scripts/pipelines_table.py`).

    from autoguidance.adapters.tiny import KINDS, build, inputs
    pipe = build("flux")                                  # a FluxPipeline of a few thousand parameters
    images = pipe(**inputs("flux", n=2, steps=2)).images  # the call's arguments for 2 images, 2 steps

Each kind is a pipeline class of diffusers 0.42 with every model tiny (2x2 to 8x8 latents, one or two layers) and a
tokenizer over a small vocabulary written here (CLIP: byte-pair files without merges; T5 / UMT5 / Gemma: a word-level
`tokenizers` object). The weights are random, so images are noise: these pipelines test plumbing (what is called
with what, and whether two ways of computing the same thing agree), never quality. Building leaves the global
torch RNG as it was.
"""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["KINDS", "build", "inputs", "model_of", "clip_tokenizer", "word_tokenizer", "tiny_clip", "tiny_vae",
           "tiny_unet", "tiny_dit", "tiny_sd3", "tiny_flux", "tiny_wan", "ddim", "flow_match", "PROMPTS",
           "cfg_options", "no_cfg_options", "images"]

PROMPTS = ("a cat", "dog", "a red fox", "owl")


# -- tokenizers and text encoders -----------------------------------------------------------------------------------

def clip_tokenizer(folder: Optional[Path] = None, max_length: int = 8):
    """A `CLIPTokenizer` over the 26 letters (as word starts and word ends), no merges."""
    import transformers

    folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="ag-tiny-clip-"))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
    for c in string.ascii_lowercase:
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                                      model_max_length=max_length)


def word_tokenizer(max_length: int = 16):
    """A fast tokenizer (T5 / UMT5 / Gemma stand-in): one token per character, `</s>` appended, `<pad>` = 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<bos>": 3}
    for c in string.ascii_lowercase + " ,.":
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<bos>", model_max_length=max_length)


WORD_VOCAB = 33


def tiny_clip(projection: bool = False, hidden: int = 12, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=54, hidden_size=hidden, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=8, projection_dim=5,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(cfg).eval().requires_grad_(False)


def _t5(d_model: int = 16, seed: int = 0, umt5: bool = False):
    import transformers

    torch.manual_seed(seed)
    kw = dict(vocab_size=WORD_VOCAB, d_model=d_model, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
              relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    if umt5:
        return transformers.UMT5EncoderModel(transformers.UMT5Config(**kw)).eval().requires_grad_(False)
    return transformers.T5EncoderModel(transformers.T5Config(**kw)).eval().requires_grad_(False)


def _gemma(hidden: int = 8, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Gemma2Config(vocab_size=WORD_VOCAB, hidden_size=hidden, intermediate_size=16,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4,
                                    max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=3,
                                    attn_implementation="eager")
    return transformers.Gemma2Model(cfg).eval().requires_grad_(False)


# -- models ---------------------------------------------------------------------------------------------------------

def _eval(m):
    return m.eval().requires_grad_(False)


def tiny_vae(shift: Optional[float] = None, latent_channels: int = 4):
    import diffusers

    torch.manual_seed(0)
    kw = {} if shift is None else {"shift_factor": shift}
    return _eval(diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                         up_block_types=("UpDecoderBlock2D",), latent_channels=latent_channels,
                                         norm_num_groups=8, sample_size=8, **kw))


def tiny_unet(cross: int = 12, sdxl: bool = False, seed: int = 0, blocks=(16, 32), in_channels: int = 4,
              linear_projection: bool = False, pooled: int = 5, time_ids: int = 6):
    import diffusers

    torch.manual_seed(seed)
    kw = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
              projection_class_embeddings_input_dim=time_ids * 4 + pooled) if sdxl else {}
    return _eval(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=blocks,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross, norm_num_groups=8, attention_head_dim=8, use_linear_projection=linear_projection,
        **kw))


def tiny_dit(seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    return _eval(diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=4))


def tiny_sd3(seed: int = 0, layers: int = 3):
    import diffusers

    torch.manual_seed(seed)
    return _eval(diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
        pos_embed_max_size=16))


def tiny_flux(seed: int = 0, guidance: bool = False):
    import diffusers

    torch.manual_seed(seed)
    return _eval(diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=12, guidance_embeds=guidance, axes_dims_rope=[2, 2, 4]))


def tiny_pixart(seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    return _eval(diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=16,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6))


def tiny_sana(seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    return _eval(diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=8))


def tiny_wan(seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    return _eval(diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=16, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=16))


def tiny_ltx(seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    return _eval(diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=16))


def tiny_cogvideox(seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    return _eval(diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=16, num_layers=2, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16))


# -- schedulers -----------------------------------------------------------------------------------------------------

def ddim(prediction_type: str = "epsilon"):
    import diffusers

    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                   prediction_type=prediction_type)


def euler():
    import diffusers

    return diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                            beta_start=0.00085, beta_end=0.012)


def flow_match(shift: float = 3.0):
    import diffusers

    return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


# -- pipelines ------------------------------------------------------------------------------------------------------

def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd(kind: str, folder):
    import diffusers

    v = kind == "sd2"
    in_ch = 9 if kind == "sd-inpaint" else 4
    parts = dict(vae=tiny_vae(), text_encoder=tiny_clip(), tokenizer=clip_tokenizer(folder),
                 unet=tiny_unet(in_channels=in_ch, linear_projection=v),
                 scheduler=ddim("v_prediction" if v else "epsilon"), safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False)
    cls = {"sd": diffusers.StableDiffusionPipeline, "sd2": diffusers.StableDiffusionPipeline,
           "sd-img2img": diffusers.StableDiffusionImg2ImgPipeline,
           "sd-inpaint": diffusers.StableDiffusionInpaintPipeline}[kind]
    return cls(**parts)


def _controlnet(folder):
    import diffusers

    torch.manual_seed(0)
    cn = _eval(diffusers.ControlNetModel(block_out_channels=(16, 32), layers_per_block=1, in_channels=4,
                                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                         cross_attention_dim=12, conditioning_embedding_out_channels=(8,),
                                         norm_num_groups=8, attention_head_dim=8))
    return diffusers.StableDiffusionControlNetPipeline(
        vae=tiny_vae(), text_encoder=tiny_clip(), tokenizer=clip_tokenizer(folder), unet=tiny_unet(), controlnet=cn,
        scheduler=ddim(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sdxl(kind: str, folder):
    import diffusers

    tok = clip_tokenizer(folder)
    if kind == "sdxl-refiner":       # only the second text encoder; aesthetic scores in the time ids
        return diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=tiny_vae(), text_encoder=None, text_encoder_2=tiny_clip(projection=True, seed=1), tokenizer=None,
            tokenizer_2=tok, unet=tiny_unet(cross=12, sdxl=True, time_ids=5), scheduler=euler(),
            requires_aesthetics_score=True)
    cls = {"sdxl": diffusers.StableDiffusionXLPipeline, "sdxl-img2img": diffusers.StableDiffusionXLImg2ImgPipeline,
           "sdxl-inpaint": diffusers.StableDiffusionXLInpaintPipeline}[kind]
    unet = tiny_unet(cross=24, sdxl=True, in_channels=9 if kind == "sdxl-inpaint" else 4)
    return cls(vae=tiny_vae(), text_encoder=tiny_clip(), text_encoder_2=tiny_clip(projection=True, seed=1),
               tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=euler())


def _sd3(folder):
    import diffusers

    tok = clip_tokenizer(folder)
    return diffusers.StableDiffusion3Pipeline(
        transformer=tiny_sd3(), scheduler=flow_match(), vae=tiny_vae(shift=0.0),
        text_encoder=tiny_clip(projection=True), tokenizer=tok, text_encoder_2=tiny_clip(projection=True, seed=1),
        tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)


def _flux(kind: str, folder):
    import diffusers

    return diffusers.FluxPipeline(
        scheduler=flow_match(), vae=tiny_vae(shift=0.0, latent_channels=4), text_encoder=tiny_clip(hidden=12),
        tokenizer=clip_tokenizer(folder), text_encoder_2=_t5(16), tokenizer_2=word_tokenizer(),
        transformer=tiny_flux(guidance=kind == "flux-dev"), image_encoder=None, feature_extractor=None)


def _dit(folder):
    import diffusers

    return diffusers.DiTPipeline(transformer=tiny_dit(), vae=tiny_vae(), scheduler=ddim())


def _pixart(kind: str, folder):
    import diffusers

    cls = diffusers.PixArtAlphaPipeline if kind == "pixart-alpha" else diffusers.PixArtSigmaPipeline
    return cls(tokenizer=word_tokenizer(), text_encoder=_t5(16), vae=tiny_vae(), transformer=tiny_pixart(),
               scheduler=ddim())


def _sana(folder):
    import diffusers

    torch.manual_seed(0)
    vae = _eval(diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407))
    sched = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                  prediction_type="flow_prediction")
    return diffusers.SanaPipeline(tokenizer=word_tokenizer(), text_encoder=_gemma(8), vae=vae,
                                  transformer=tiny_sana(), scheduler=sched)


def _wan(kind: str, folder):
    import diffusers

    torch.manual_seed(0)
    vae = _eval(diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                                           temperal_downsample=[False], scale_factor_spatial=2, latents_mean=[0.0] * 4,
                                           latents_std=[1.0] * 4))
    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              flow_shift=3.0)
    two = kind == "wan22"
    return diffusers.WanPipeline(tokenizer=word_tokenizer(), text_encoder=_t5(16, umt5=True), vae=vae,
                                 transformer=tiny_wan(), scheduler=sched,
                                 transformer_2=tiny_wan(seed=1) if two else None,
                                 boundary_ratio=0.9 if two else None)


def _ltx(folder):
    import diffusers

    torch.manual_seed(0)
    vae = _eval(diffusers.AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False))
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return diffusers.LTXPipeline(scheduler=flow_match(), vae=vae, text_encoder=_t5(16), tokenizer=word_tokenizer(),
                                 transformer=tiny_ltx())


def _cogvideox(folder):
    import diffusers

    torch.manual_seed(0)
    vae = _eval(diffusers.AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4))
    sched = diffusers.CogVideoXDDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction",
                                             timestep_spacing="trailing", clip_sample=False,
                                             rescale_betas_zero_snr=True, snr_shift_scale=3.0)
    return diffusers.CogVideoXPipeline(tokenizer=word_tokenizer(), text_encoder=_t5(16), vae=vae,
                                       transformer=tiny_cogvideox(), scheduler=sched)


#: kind -> (builder(kind, tokenizer folder), what it is)
KINDS: dict[str, tuple[Callable, str]] = {
    "sd":           (_sd, "StableDiffusionPipeline, DDIM, epsilon (SD 1.x)"),
    "sd2":          (_sd, "StableDiffusionPipeline, DDIM, v-prediction, linear projections (SD 2.x)"),
    "sd-img2img":   (_sd, "StableDiffusionImg2ImgPipeline"),
    "sd-inpaint":   (_sd, "StableDiffusionInpaintPipeline, 9-channel U-Net"),
    "sdxl":         (_sdxl, "StableDiffusionXLPipeline, Euler"),
    "sdxl-img2img": (_sdxl, "StableDiffusionXLImg2ImgPipeline"),
    "sdxl-inpaint": (_sdxl, "StableDiffusionXLInpaintPipeline, 9-channel U-Net"),
    "sdxl-refiner": (_sdxl, "StableDiffusionXLImg2ImgPipeline, second text encoder only, aesthetic score"),
    "controlnet":   (lambda k, f: _controlnet(f), "StableDiffusionControlNetPipeline"),
    "sd3":          (lambda k, f: _sd3(f), "StableDiffusion3Pipeline without T5, flow matching"),
    "flux":         (_flux, "FluxPipeline (schnell-like: no guidance embedding)"),
    "flux-dev":     (_flux, "FluxPipeline with a guidance embedding (guidance-distilled, Flux-dev-like)"),
    "dit":          (lambda k, f: _dit(f), "DiTPipeline, class labels, learned variance"),
    "pixart-alpha": (_pixart, "PixArtAlphaPipeline, T5"),
    "pixart-sigma": (_pixart, "PixArtSigmaPipeline, T5"),
    "sana":         (lambda k, f: _sana(f), "SanaPipeline, Gemma 2, DPM-Solver with flow sigmas"),
    "wan21":        (_wan, "WanPipeline (2.1), UMT5, UniPC flow prediction, CFG as two calls"),
    "wan22":        (_wan, "WanPipeline (2.2), two experts (transformer, transformer_2), boundary 0.9"),
    "ltx":          (lambda k, f: _ltx(f), "LTXPipeline, T5, video"),
    "cogvideox":    (lambda k, f: _cogvideox(f), "CogVideoXPipeline, T5, CogVideoX DDIM, v-prediction, video"),
}


def build(kind: str, folder: Optional[Path] = None):
    """The tiny pipeline of `kind` (a key of `KINDS`), progress bars off. `folder`: where the CLIP tokenizer's files
    go (default: a new temporary folder). The global torch RNG is left as it was."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}: expected one of {', '.join(KINDS)}")
    with torch.random.fork_rng(devices=[]):
        return _quiet(KINDS[kind][0](kind, folder))


def model_of(pipe) -> torch.nn.Module:
    """The model a pipeline's loop calls: its `unet`, else its `transformer`."""
    unet = getattr(pipe, "unet", None)
    return unet if isinstance(unet, torch.nn.Module) else pipe.transformer


def cfg_options(kind: str, scale: float = 4.0) -> dict:
    """The call options that turn the pipeline's own CFG on (Flux: true CFG with a negative prompt per image)."""
    if kind in ("flux", "flux-dev"):
        return {"true_cfg_scale": scale, "negative_prompt": ["blurry", "dark"]}
    return {"guidance_scale": scale}


def no_cfg_options(kind: str) -> dict:
    """The call options of the pipeline without CFG."""
    return {} if kind in ("flux", "flux-dev") else {"guidance_scale": 1.0}


def images(out):
    """The images (or video frames) of a pipeline's output, as a float64 numpy array."""
    import numpy as np

    return np.asarray(out.images if hasattr(out, "images") else out.frames, dtype=np.float64)


def _image(n: int, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def inputs(kind: str, n: int = 2, steps: int = 2, seed: int = 10, prompts=None, **overrides) -> dict:
    """Keyword arguments of a call of the tiny `kind` pipeline for `n` images (one generator per image, seeds
    `seed + i`), `steps` steps, output_type 'np' (video kinds: 'np' frames). `prompts` replaces the default
    prompts (a list of `n`); `overrides` are added last."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}: expected one of {', '.join(KINDS)}")
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    kw: dict = {"num_inference_steps": steps, "generator": gens, "output_type": "np"}
    if kind == "dit":
        kw["class_labels"] = list(range(n))
    else:
        kw["prompt"] = list(prompts) if prompts is not None else [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    if kind in ("sd-img2img", "sdxl-img2img", "sdxl-refiner"):
        kw.update(image=_image(n), strength=0.75, num_inference_steps=steps + 1)
    elif kind in ("sd-inpaint", "sdxl-inpaint"):
        mask = torch.zeros(n, 1, 8, 8)
        mask[:, :, 2:6, 2:6] = 1
        kw.update(image=_image(n), mask_image=mask, height=8, width=8)
        if kind == "sdxl-inpaint":
            kw.update(strength=0.99)
    elif kind == "controlnet":
        kw.update(image=_image(n, seed=1), height=8, width=8)
    elif kind in ("flux", "flux-dev"):
        kw.update(height=16, width=16, max_sequence_length=16)
    elif kind in ("pixart-alpha", "pixart-sigma"):
        kw.update(height=8, width=8, max_sequence_length=16, use_resolution_binning=False)
    elif kind == "sana":
        kw.update(height=32, width=32, max_sequence_length=16, use_resolution_binning=False,
                  complex_human_instruction=None)
    elif kind in ("wan21", "wan22"):
        kw.update(height=16, width=16, num_frames=1, max_sequence_length=16)
    elif kind == "ltx":
        kw.update(height=32, width=32, num_frames=9, max_sequence_length=16, decode_timestep=0.0)
    elif kind == "cogvideox":
        kw.update(height=16, width=16, num_frames=9, max_sequence_length=16)
    elif kind in ("sd", "sd2", "sdxl", "sd3"):
        kw.update(height=8, width=8)
    kw.update(overrides)
    return kw
