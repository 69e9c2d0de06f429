"""The reduced architectures of published models at their published sizes: parameters and FLOPs per call of main
and guide (the `distill` recipe's default reduction, `reduce.DEFAULTS`), built from their configs on the meta device
(no weights, no download).

    autoguidance guides sizes [--doc docs/guides.md]         # the table (and its place in the doc)

Each config is written here from the model's published `config.json` on the Hugging Face Hub (the repository and
file named in `source`; the values were read from copies of those files). FLOPs per call are counted by
`FlopCounterMode` (`budget.count_flops`) at the resolution and text length stated per model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .budget import count_flops
from .reduce import reduce_config

__all__ = ["PUBLISHED", "Published", "size_rows", "sizes_md"]


@dataclass(frozen=True)
class Published:
    name: str                      # how the table names it
    cls: str                       # the diffusers class
    config: dict                   # constructor settings (the published config.json's, defaults left out)
    latent: tuple                  # the latent size of one call ((H, W), Wan (F, H, W))
    text_len: int                  # text tokens of one call
    at: str                        # what the call is (resolution, frames)
    source: str                    # where the config comes from


PUBLISHED = (
    Published("SDXL base 1.0 U-Net", "UNet2DConditionModel", dict(
        sample_size=128, in_channels=4, out_channels=4, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[320, 640, 1280], layers_per_block=2, attention_head_dim=[5, 10, 20],
        transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        norm_num_groups=32), (128, 128), 77, "1024x1024, 77 tokens",
        "stabilityai/stable-diffusion-xl-base-1.0, unet/config.json"),
    Published("SD3 Medium", "SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192), (128, 128), 333, "1024x1024, 77 + 256 tokens",
        "stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json"),
    Published("SD3.5 Large", "SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm"), (128, 128), 333, "1024x1024, 77 + 256 tokens",
        "stabilityai/stable-diffusion-3.5-large, transformer/config.json"),
    Published("FLUX.1-dev", "FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=[16, 56, 56]), (128, 128), 512, "1024x1024, 512 tokens",
        "black-forest-labs/FLUX.1-dev, transformer/config.json"),
    Published("DiT-XL/2 256", "DiTTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=32,
        patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero"), (32, 32), 0, "256x256, class label",
        "facebook/DiT-XL-2-256, transformer/config.json"),
    Published("Wan 2.1 T2V 1.3B", "WanTransformer3DModel", dict(
        patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads"), (21, 60, 104), 512, "480x832, 81 frames, 512 tokens",
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json"),
    Published("Wan 2.1 T2V 14B", "WanTransformer3DModel", dict(
        patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads"), (21, 90, 160), 512, "720x1280, 81 frames, 512 tokens",
        "Wan-AI/Wan2.1-T2V-14B-Diffusers, transformer/config.json"),
)


def _params_and_flops(cls: str, config: dict, p: Published) -> tuple[int, int]:
    import diffusers

    from .mains_diffusers import example_inputs

    with torch.device("meta"):
        model = getattr(diffusers, cls).from_config(config)
        n = sum(t.numel() for t in model.parameters())
        x, kw = example_inputs(cls, dict(model.config), latent=p.latent, text_len=max(p.text_len, 1))
        return n, count_flops(lambda: model(x, timestep=torch.zeros(1), return_dict=False, **kw))


def size_rows(names: Optional[list] = None) -> list[dict]:
    """One row per published model (all, or those named): parameters and FLOPs per call of main and guide."""
    rows = []
    for p in PUBLISHED:
        if names is not None and p.name not in names:
            continue
        guide, _ = reduce_config(p.cls, p.config)
        n_m, f_m = _params_and_flops(p.cls, p.config, p)
        n_g, f_g = _params_and_flops(p.cls, guide, p)
        changed = {k: guide[k] for k in guide if guide[k] != p.config.get(k)}
        rows.append({"name": p.name, "class": p.cls, "at": p.at, "source": p.source, "main_parameters": n_m,
                     "guide_parameters": n_g, "main_flops": f_m, "guide_flops": f_g, "reduced": changed})
    return rows


def _fmt_n(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _fmt_t(flops: float) -> str:
    t = flops / 1e12
    return f"{t:,.0f}" if t >= 1000 else f"{t:.3g}"


def sizes_md(rows: list[dict]) -> str:
    lines = ["| model | call | main params | guide params | main TFLOPs / call | guide TFLOPs / call | "
             "guide / main (FLOPs) | reduced | config |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        red = ", ".join(f"{k} {v}" for k, v in r["reduced"].items())
        lines.append(f"| {r['name']} | {r['at']} | {_fmt_n(r['main_parameters'])} | {_fmt_n(r['guide_parameters'])} "
                     f"| {_fmt_t(r['main_flops'])} | {_fmt_t(r['guide_flops'])} | "
                     f"{r['guide_flops'] / r['main_flops']:.2f} | {red} | {r['source']} |")
    return "\n".join(lines) + "\n"
