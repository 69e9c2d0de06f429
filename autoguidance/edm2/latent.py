"""Decoding EDM2's ImageNet-512 latents to RGB with the Stable Diffusion VAE (stabilityai/sd-vae-ft-mse).

EDM2's img512 models denoise 4 x 64 x 64 "final latents": the VAE's raw latents (the encoder's mean, NOT scaled by
the VAE's `scaling_factor` 0.18215) standardised per channel. The official `training/encoders.py`
(`StabilityVAEEncoder`) sets `scale = final_std / raw_std` and `bias = final_mean - raw_mean * scale`, encodes
with `final = raw * scale + bias` and decodes with `raw = (final - bias) / scale`, that is

    x_raw = (x - final_mean) / final_std * raw_std + raw_mean          (per channel c)
    raw_mean = (5.81, 3.25, 0.12, -2.15), raw_std = (4.17, 4.62, 3.71, 3.28), final_mean = 0, final_std = 0.5

then `image = vae.decode(x_raw).sample`. EDM2 feeds the VAE encoder pixels in [0, 1] (uint8 / 255, not the usual
[-1, 1]), so the decoder's output is read in [0, 1]: `clamp(0, 1) * 255`, truncated to uint8, as officially.

The VAE is diffusers' `AutoencoderKL`, loaded from a local folder you name (a `save_pretrained` /
Hugging Face snapshot folder with `config.json` and the weights) with `local_files_only=True`: nothing is
ever downloaded. Install the extra with `pip install 'autoguidance[diffusers]'`.

    decoder = StabilityVAEDecoder("~/models/sd-vae-ft-mse")
    images = decoder(latents)            # [N, 4, 64, 64] final latents -> [N, 3, 512, 512] uint8
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch

__all__ = ["RAW_MEAN", "RAW_STD", "FINAL_MEAN", "FINAL_STD", "latents_to_raw", "raw_to_latents", "load_vae",
           "decode_latents", "StabilityVAEDecoder", "VAEUnavailable"]

RAW_MEAN = (5.81, 3.25, 0.12, -2.15)   # assumed per-channel mean of the raw SD-VAE latents (EDM2)
RAW_STD = (4.17, 4.62, 3.71, 3.28)     # assumed per-channel std of the raw latents
FINAL_MEAN = 0.0                       # mean of the latents the EDM2 model sees
FINAL_STD = 0.5                        # their std (= sigma_data)


class VAEUnavailable(RuntimeError):
    """diffusers is not installed, or the VAE folder is missing or incomplete."""


def _per_channel(v, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32, device=x.device)
    return t.reshape(1, -1, 1, 1) if t.ndim == 1 else t


def _check_latents(x: torch.Tensor, channels: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != channels:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"latents must have shape [N, {channels}, H, W], got {got}")
    return x.to(torch.float32)


def latents_to_raw(x: torch.Tensor, raw_mean: Sequence[float] = RAW_MEAN, raw_std: Sequence[float] = RAW_STD,
                   final_mean: float = FINAL_MEAN, final_std: float = FINAL_STD) -> torch.Tensor:
    """EDM2 final latents `[N, 4, H, W]` -> raw VAE latents `[N, 4, H, W]` fp32:
    `(x - final_mean) / final_std * raw_std + raw_mean` per channel."""
    x = _check_latents(x, len(raw_mean))
    return (x - final_mean) / final_std * _per_channel(raw_std, x) + _per_channel(raw_mean, x)


def raw_to_latents(x_raw: torch.Tensor, raw_mean: Sequence[float] = RAW_MEAN, raw_std: Sequence[float] = RAW_STD,
                   final_mean: float = FINAL_MEAN, final_std: float = FINAL_STD) -> torch.Tensor:
    """The inverse of `latents_to_raw` (EDM2's `encode_latents` without its sampling of the VAE posterior)."""
    x_raw = _check_latents(x_raw, len(raw_mean))
    return (x_raw - _per_channel(raw_mean, x_raw)) / _per_channel(raw_std, x_raw) * final_std + final_mean


def load_vae(vae_dir: Union[str, Path], device="cpu", dtype: torch.dtype = torch.float32):
    """diffusers' `AutoencoderKL` from the local folder `vae_dir` (never a download), in eval mode, no grads."""
    folder = Path(vae_dir).expanduser()
    if not folder.is_dir():
        raise VAEUnavailable(f"no VAE folder at {folder}: put a local copy of stabilityai/sd-vae-ft-mse there "
                             "(a folder with config.json and diffusion_pytorch_model.safetensors, as written by "
                             "AutoencoderKL.save_pretrained) and pass its path; autoguidance never downloads it")
    if not (folder / "config.json").is_file():
        raise VAEUnavailable(f"{folder} has no config.json: it is not a diffusers AutoencoderKL folder (expected "
                             "config.json and diffusion_pytorch_model.safetensors)")
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise VAEUnavailable("decoding EDM2 latents needs diffusers: pip install 'autoguidance[diffusers]' "
                             f"(import failed: {e})") from e
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, EnvironmentError) as e:
        raise VAEUnavailable(f"cannot load an AutoencoderKL from {folder} ({e}); the folder is incomplete or "
                             "not a VAE") from e
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(latents: torch.Tensor, vae, *, batch_size: int = 8, as_uint8: bool = True,
                   raw_mean: Sequence[float] = RAW_MEAN, raw_std: Sequence[float] = RAW_STD,
                   final_mean: float = FINAL_MEAN, final_std: float = FINAL_STD) -> torch.Tensor:
    """EDM2 final latents `[N, 4, h, w]` -> images `[N, 3, f*h, f*w]` (f = the VAE's upsampling, 8 for SD):
    uint8 in [0, 255] (EDM2's `decode`), or float in [0, 1] with `as_uint8=False`. `vae` is an AutoencoderKL
    module, or a local folder to load it from. Runs in batches of `batch_size` on the VAE's device and dtype."""
    if isinstance(vae, (str, Path)):
        vae = load_vae(vae, device=latents.device)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    x_raw = latents_to_raw(latents, raw_mean, raw_std, final_mean, final_std)
    p = next(iter(vae.parameters()), None)
    device, dtype = (p.device, p.dtype) if p is not None else (x_raw.device, torch.float32)
    outs = []
    for chunk in x_raw.split(int(batch_size)):
        out = vae.decode(chunk.to(device=device, dtype=dtype))
        outs.append((out.sample if hasattr(out, "sample") else out).to(torch.float32).clamp(0, 1))
    images = torch.cat(outs).to(latents.device)
    return (images * 255).to(torch.uint8) if as_uint8 else images


class StabilityVAEDecoder:
    """`decoder(latents [N, 4, h, w]) -> uint8 images [N, 3, 8h, 8w]` with the SD VAE from a local folder
    (`vae` may also be an AutoencoderKL module). The constants default to EDM2's (see the module docstring)."""

    def __init__(self,
        vae:        Union[str, Path, torch.nn.Module],      # local AutoencoderKL folder, or the module
        device                   = "cpu",                   # where the VAE runs
        batch_size: int          = 8,                       # images per VAE call
        raw_mean:   Sequence[float] = RAW_MEAN,             # per-channel mean of the raw latents
        raw_std:    Sequence[float] = RAW_STD,              # per-channel std of the raw latents
        final_mean: float        = FINAL_MEAN,              # mean of the model's latents
        final_std:  float        = FINAL_STD,               # std of the model's latents
    ):
        if len(raw_mean) != len(raw_std):
            raise ValueError(f"raw_mean and raw_std need one entry per latent channel, got {len(raw_mean)} and "
                             f"{len(raw_std)}")
        self.vae = load_vae(vae, device=device) if isinstance(vae, (str, Path)) else vae
        self.batch_size = batch_size
        self.constants = dict(raw_mean=tuple(raw_mean), raw_std=tuple(raw_std), final_mean=final_mean,
                              final_std=final_std)

    def __call__(self, latents: torch.Tensor, as_uint8: bool = True) -> torch.Tensor:
        return decode_latents(latents, self.vae, batch_size=self.batch_size, as_uint8=as_uint8, **self.constants)
