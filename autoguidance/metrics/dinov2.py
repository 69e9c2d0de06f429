"""DINOv2 ViT (Oquab et al. 2023) for FD_DINOv2, written here, loading the official `dinov2_vitl14_pretrain.pth`.

    net = load_dinov2("dinov2_vitl14_pretrain.pth")            # torch.load(weights_only=True), key set checked
    feats = net(preprocess(images_255))                         # [N, 1024]: class token after the final norm

Architecture (facebookresearch/dinov2 `vision_transformer.py`, hub model `dinov2_vitl14`): patch embedding
(`patch_embed.proj`, a stride-`patch` convolution), a class token, learned position embeddings for a 37 x 37 grid
(518 / 14) plus the class token, bicubically resized to the input's grid the way DINOv2 does it (scale factor
`(grid + 0.1) / 37`, no antialias), `depth` pre-norm blocks (LayerNorm eps 1e-6; fused `qkv` attention with
bias; layer scale `ls1.gamma` / `ls2.gamma`; MLP with exact GELU, ratio 4), then the final `norm`. The state
dict's keys are the official ones: `cls_token`, `pos_embed`, `mask_token`, `patch_embed.proj.*`,
`blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}`, `norm.*`.

`preprocess` is EDM2's (NVlabs/edm2 `calculate_metrics.py`, DINOv2Detector with resize_mode='torch'): images in
[0, 255] -> bicubic resize to 224 with antialias -> / 255 -> ImageNet mean / std.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .weights import read_state_dict, state_mismatch

__all__ = ["ViTConfig", "VITL14", "DINOv2", "preprocess", "load_dinov2", "check_dinov2_state", "OFFICIAL_FILE",
           "WHERE"]

OFFICIAL_FILE = "dinov2_vitl14_pretrain.pth"
# No official checksum is published for this file (facebookresearch/dinov2 lists only the URL), so the file is
# checked by structure: key set and shapes of ViT-L/14.
WHERE = ("dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/" + OFFICIAL_FILE +
         " (linked from github.com/facebookresearch/dinov2, 'Pretrained models')")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViTConfig:
    """Size of the ViT. `VITL14` is DINOv2 ViT-L/14; tests use tiny ones."""

    dim: int = 1024
    depth: int = 24
    heads: int = 16
    patch: int = 14
    grid: int = 37               # position-embedding grid (518 / 14)
    mlp_ratio: float = 4.0
    interpolate_offset: float = 0.1

    @staticmethod
    def from_state(state: dict, heads: Optional[int] = None) -> "ViTConfig":
        """The config a state dict implies (heads: given, else dim / 64 as in every DINOv2 size)."""
        dim = state["cls_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        grid = math.isqrt(state["pos_embed"].shape[1] - 1)
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        return ViTConfig(dim=dim, depth=depth, heads=heads or max(1, dim // 64),
                         patch=state["patch_embed.proj.weight"].shape[-1], grid=grid, mlp_ratio=hidden / dim)


VITL14 = ViTConfig()


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax((q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(n, t, d))


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(c.dim, eps=1e-6), _Attention(c.dim, c.heads), _LayerScale(c.dim)
        self.norm2, self.mlp = nn.LayerNorm(c.dim, eps=1e-6), _MLP(c.dim, int(c.dim * c.mlp_ratio))
        self.ls2 = _LayerScale(c.dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, c.dim, c.patch, stride=c.patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DINOv2(nn.Module):
    """`net(x [N, 3, H, W] normalised) -> [N, dim]`: the class token after the final norm. H, W multiples of the
    patch size (224 -> a 16 x 16 grid for /14); any batch size."""

    def __init__(self, config: ViTConfig = VITL14):
        super().__init__()
        c = self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + c.grid * c.grid, c.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, c.dim))   # unused here (masked training); in the file
        self.patch_embed = _PatchEmbed(c)
        self.blocks = nn.ModuleList(_Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim, eps=1e-6)

    def position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        """`[1, 1 + gh * gw, dim]`: the stored embeddings, bicubically resized to a gh x gw grid as DINOv2 does."""
        c = self.config
        if gh == c.grid and gw == c.grid:
            return self.pos_embed
        pos = self.pos_embed.float()
        grid = pos[:, 1:].reshape(1, c.grid, c.grid, c.dim).permute(0, 3, 1, 2)
        scale = ((gh + c.interpolate_offset) / c.grid, (gw + c.interpolate_offset) / c.grid)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        if tuple(grid.shape[-2:]) != (gh, gw):
            raise ValueError(f"position embeddings resized to {tuple(grid.shape[-2:])}, not ({gh}, {gw})")
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, c.dim)
        return torch.cat([pos[:, :1], grid], 1).to(self.pos_embed.dtype)

    def forward(self, x):
        p = self.config.patch
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"DINOv2 takes [N, 3, H, W] with H, W multiples of {p}, got {list(x.shape)}")
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], 1)
        t = t + self.position_embedding(x.shape[2] // p, x.shape[3] // p)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)[:, 0]


def preprocess(x255: torch.Tensor, size: int = 224) -> torch.Tensor:
    """EDM2's DINOv2 input: `[N, 3, H, W]` in [0, 255] -> bicubic (antialiased) resize to `size` -> / 255 ->
    ImageNet mean / std."""
    x = F.interpolate(x255, size=(size, size), mode="bicubic", antialias=True) / 255
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
    return (x - mean) / std


def check_dinov2_state(state, path: str, config: Optional[ViTConfig] = VITL14, flag: str = "--dinov2-weights"
                       ) -> ViTConfig:
    """The state dict's config after checking its key set and shapes against `config` (ViT-L/14 by default;
    `None`: any size, inferred from the shapes). One-line errors that name the official file."""
    fix = f"pass {OFFICIAL_FILE} from {WHERE}"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{flag} {path} is not a state dict of tensors: {fix}")
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    if not all(k in state for k in need):
        missing = next(k for k in need if k not in state)
        raise ValueError(f"{flag} {path} is not a DINOv2 ViT state dict (no '{missing}'): {fix}")
    if config is None:
        config = ViTConfig.from_state(state)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in DINOv2(config).state_dict().items()}
    what = state_mismatch(state, want)
    if what:
        raise ValueError(f"{flag} {path} is not DINOv2 ViT-L/14 ({what}): {fix}")
    return config


def load_dinov2(path: Union[str, Path], *, config: Optional[ViTConfig] = VITL14, device="cpu",
                flag: str = "--dinov2-weights") -> DINOv2:
    """`DINOv2` with the weights of a state-dict file read with `torch.load(weights_only=True)`. `config=None`
    accepts any ViT size (inferred from the file; tests, other DINOv2 sizes); the default demands ViT-L/14."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file. FD_DINOv2 needs {OFFICIAL_FILE} (no official "
                                f"checksum published; checked by key set and shapes) from {WHERE}; autoguidance "
                                "never downloads weights")
    state = read_state_dict(path, flag, f"pass {OFFICIAL_FILE} from {WHERE}")
    config = check_dinov2_state(state, str(path), config, flag)
    with torch.device("meta"):
        net = DINOv2(config)
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval().requires_grad_(False).to(device)
