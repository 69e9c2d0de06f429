"""The EDM2 U-Net and its preconditioning: Karras, Aittala, Lehtinen, Hellsten, Aila and Laine (2024),
"Analyzing and Improving the Training Dynamics of Diffusion Models" (CVPR 2024), config G, Fig. 21 and App. B.

This is an independent implementation that behaves like the official NVlabs/edm2 `training/networks_edm2.py`
(`MPFourier`, `MPConv`, `Block`, `UNet`, `Precond`) and keeps its state-dict layout, so a state dict taken from
an official network pickle (`pickle.load(f)['ema'].state_dict()`) loads here with `strict=True` and gives the
same outputs (checked against a transcription of the official code by `tests/test_edm2_net.py`).

Module tree (every name below is a state-dict prefix, as in the official code):

    EDM2Precond
      unet: EDM2UNet
        out_gain                         scalar gain of the output conv (init 0)
        emb_fourier  (freqs, phases)     Fourier features of c_noise
        emb_noise, emb_label             MPConv linear layers into the embedding
        enc.{R}x{R}_conv / _down / _blockI    encoder, R = resolution
        dec.{R}x{R}_in0 / _in1 / _up / _blockI decoder
        out_conv
      logvar_fourier, logvar_linear      the uncertainty head u(sigma) (paper Eq. 21)

Differences from the official code that do not touch the state dict or the outputs:
- every `EDM2Block` holds a `torch.nn.Dropout` submodule `dropout` (the official code calls the functional
  dropout), always called in the residual branch, so hooks can target `unet.enc.16x16_block0.dropout` etc.;
- the mixing step of self-attention (softmax of q.k, applied to v) is a parameter-free submodule `attn`
  (`EDM2Attention`) of the blocks that have attention, so hooks can target `unet.enc.16x16_block0.attn` and
  perturbed-attention guidance can replace its attention map by the identity (`identity_attention`);
- `EDM2Block.skip_path(x, emb)` computes the block without its residual branch and attention (its main branch),
  for stochastic depth (`autoguidance.perturb.BlockDrop`);
- `EDM2Precond.forward(x, sigma, labels=None)` follows this library's denoiser contract: `sigma` may be a
  scalar, inputs are validated with errors that name the expected shape, and `D` comes back in `x`'s dtype.

Forced weight normalisation (paper Eq. 66) rewrites stored weights in training mode only; in eval mode a forward
pass leaves the state dict bit-identical.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch

from ..denoiser import as_sigma, check_labels, check_x
from .mp import mp_cat, mp_silu, mp_sum, normalize

__all__ = ["MPFourier", "MPConv", "pixel_norm", "resample", "EDM2Attention", "EDM2Block", "EDM2UNet", "EDM2Precond",
           "PRESETS", "preset_config", "count_parameters"]


# ---------------------------------------------------------------------------------------------------------------
# Layers.

class MPFourier(torch.nn.Module):
    """Magnitude-preserving Fourier features (paper Eq. 75): `[N] -> [N, num_channels]`,
    `sqrt(2) cos(x * freqs + phases)` with fixed random `freqs ~ 2 pi N(0, bandwidth^2)`, `phases ~ 2 pi U(0, 1)`.
    The two vectors are buffers (saved in the state dict, never trained)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        # Drawn in this order (normal, then uniform) so a seeded build matches the official initialisation.
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (t.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(torch.nn.Module):
    """Magnitude-preserving 2D convolution (`kernel=(k, k)`) or linear layer (`kernel=()`), no bias (paper Eq. 47).

    The effective weight is `gain * normalize(weight) / sqrt(fan_in)`, each output channel's weight vector having
    unit norm. In training mode the stored weight is first overwritten by its normalised version (forced weight
    normalisation, paper Eq. 66); in eval mode the stored weight is never written.

    Shapes: linear `[N, in] -> [N, out]`; conv `[N, in, H, W] -> [N, out, H, W]` ("same" padding, odd k).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int] = ()):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel = tuple(kernel)
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *self.kernel))

    @property
    def fan_in(self) -> int:
        return self.in_channels * math.prod(self.kernel)

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        w = self.weight.to(torch.float32)  # an fp32 weight is aliased here, not copied
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalisation (changes `w` too when aliased)
        w = normalize(w) * (gain / math.sqrt(self.fan_in))
        w = w.to(x.dtype)
        if not self.kernel:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=self.kernel[-1] // 2)


def pixel_norm(x: torch.Tensor) -> torch.Tensor:
    """Normalise every pixel's channel vector to unit RMS: `[N, C, H, W] -> [N, C, H, W]` (paper Fig. 21)."""
    return normalize(x, dim=1)


def resample(x: torch.Tensor, mode: str = "keep", fir: Sequence[float] = (1, 1)) -> torch.Tensor:
    """Resample a `[N, C, H, W]` batch by 2 with the separable FIR filter `fir` (normalised to sum 1), per channel.

    `mode`: 'keep' (identity), 'down' (`-> [N, C, H/2, W/2]`, filtered strided conv) or 'up' (`-> [N, C, 2H, 2W]`,
    transposed conv with the filter times 4). With the default box filter [1, 1] this is 2x2 average pooling and
    nearest-neighbour upsampling.
    """
    if mode == "keep":
        return x
    if mode not in ("down", "up"):
        raise ValueError(f"resample mode must be 'keep', 'down' or 'up', got {mode!r}")
    taps = torch.tensor(list(fir), dtype=torch.float32)
    if taps.ndim != 1 or taps.numel() % 2 != 0:
        raise ValueError(f"resample filter must be a flat list of even length, got {list(fir)}")
    pad = (taps.numel() - 1) // 2
    taps = taps / taps.sum()
    kernel = torch.outer(taps, taps).to(device=x.device, dtype=x.dtype)
    channels = x.shape[1]
    if mode == "down":
        return torch.nn.functional.conv2d(x, kernel.expand(channels, 1, *kernel.shape), groups=channels,
                                          stride=2, padding=pad)
    return torch.nn.functional.conv_transpose2d(x, (kernel * 4).expand(channels, 1, *kernel.shape),
                                                groups=channels, stride=2, padding=pad)


# ---------------------------------------------------------------------------------------------------------------
# U-Net.

class EDM2Attention(torch.nn.Module):
    """The mixing step of EDM2's multi-head self-attention, without parameters (the q/k/v and output projections
    are the block's `attn_qkv`, `attn_proj`): `q, k, v [N, heads, C/heads, HW] -> [N, heads, C/heads, HW]`,

        out[:, h, :, i] = sum_j softmax_j(q_i . k_j / sqrt(C/heads)) v_j

    with q, k, v pixel-normalised by the block. A module of its own so that hooks can reach it."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        logits = q.transpose(2, 3) @ (k / math.sqrt(q.shape[2]))  # [N, heads, HW_query, HW_key]
        return v @ logits.softmax(dim=3).transpose(2, 3)  # [N, heads, C/heads, HW_query]

    def identity_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The output with the attention map replaced by the identity (perturbed-attention guidance): `v`."""
        return v


class EDM2Block(torch.nn.Module):
    """Encoder ('enc') or decoder ('dec') block of the EDM2 U-Net, optionally with self-attention (paper Fig. 21).

    `x: [N, in_channels, H, W], emb: [N, emb_channels] -> [N, out_channels, H', W']` (H' = H, H/2 or 2H by
    `resample_mode`). Main branch: resample; in the encoder also a 1x1 skip conv (if channels change) and pixel
    norm. Residual branch: MP-SiLU, 3x3 conv, modulation by `emb_linear(emb) * emb_gain + 1`, MP-SiLU,
    `self.dropout`, 3x3 conv. In the decoder the 1x1 skip conv comes after the residual branch. Branches join with
    `mp_sum(., ., res_balance)`; then optional multi-head self-attention with pixel-normalised q, k, v (mixing
    step: `self.attn`), joined by `mp_sum(., ., attn_balance)`; then clipping to `[-clip_act, clip_act]`.
    """

    def __init__(self,
        in_channels:        int,                    # input channels
        out_channels:       int,                    # output channels
        emb_channels:       int,                    # embedding channels
        flavor:             str = "enc",            # 'enc' or 'dec'
        resample_mode:      str = "keep",           # 'keep', 'up' or 'down'
        resample_filter:    Sequence[float] = (1, 1),  # FIR taps of the resampling filter
        attention:          bool = False,           # add self-attention after the residual join?
        channels_per_head:  int = 64,               # attention heads = out_channels // channels_per_head
        dropout:            float = 0.0,            # dropout rate in the residual branch
        res_balance:        float = 0.3,            # main branch (0) vs residual branch (1)
        attn_balance:       float = 0.3,            # main branch (0) vs self-attention (1)
        clip_act:           Optional[float] = 256,  # clip output activations to +-clip_act; None = no clipping
    ):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"block flavor must be 'enc' or 'dec', got {flavor!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.resample_filter = list(resample_filter)
        # As in the official code, fewer channels than one head means no attention at all.
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        # Parameters, registered in the official order (same names, same seeded initialisation).
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=(3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=())
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=(3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, kernel=(1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=(1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=(1, 1)) if self.num_heads else None
        # The dropout site and the attention mixing step: parameter-free modules, so the state dict is unchanged.
        self.dropout = torch.nn.Dropout(dropout)
        self.attn = EDM2Attention() if self.num_heads else None

    def _main_in(self, x: torch.Tensor) -> torch.Tensor:
        """The main branch before the residual join: resample; in the encoder also the skip conv and pixel norm."""
        x = resample(x, self.resample_mode, self.resample_filter)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = pixel_norm(x)
        return x

    def skip_path(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The block without its residual branch and self-attention (stochastic depth): resample, skip conv
        (encoder: and pixel norm), clipping. `[N, in_channels, H, W] -> [N, out_channels, H', W']`, the shape of
        `forward`'s output, of unit magnitude as the residual join's output is. `emb` is accepted and unused."""
        x = self._main_in(x)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self._main_in(x)

        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1  # [N, out_channels]
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        y = self.dropout(y)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            x = mp_sum(x, self._attention(x), t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over pixels: `[N, C, H, W] -> [N, C, H, W]`."""
        n, c, h, w = x.shape
        # Channel layout of attn_qkv's output: (head, channel-in-head, q/k/v).
        qkv = self.attn_qkv(x).reshape(n, self.num_heads, c // self.num_heads, 3, h * w)
        q, k, v = normalize(qkv, dim=2).unbind(3)  # each [N, heads, C/heads, HW], unit RMS per pixel
        out = self.attn(q, k, v)  # [N, heads, C/heads, HW_query]
        return self.attn_proj(out.reshape(n, c, h, w))


class EDM2UNet(torch.nn.Module):
    """The raw EDM2 U-Net `F(x_in, c_noise, class_labels)` (paper Fig. 21, config G).

    `x_in: [N, img_channels, R, R]`, `noise_labels: [N]` (c_noise = ln(sigma)/4), `class_labels: [N or 1,
    label_dim]` or None when `label_dim == 0` -> `[N, img_channels, R, R]`. A constant-ones channel is appended to
    the input; the embedding is `mp_silu(mp_sum(emb_noise(fourier(c_noise)), emb_label(labels * sqrt(label_dim)),
    label_balance))`, so an all-zero label row contributes nothing (unconditional). Encoder and decoder have
    `len(channel_mult)` levels at resolutions `R >> level`; skips join with `mp_cat(., ., concat_balance)`.
    """

    def __init__(self,
        img_resolution:     int,                            # input resolution R (square images)
        img_channels:       int,                            # input/output channels
        label_dim:          int,                            # class label dimension; 0 = unconditional
        model_channels:     int = 192,                      # base channel count
        channel_mult:       Sequence[int] = (1, 2, 3, 4),   # channels per level, in units of model_channels
        channel_mult_noise: Optional[int] = None,           # noise Fourier ch. / model_channels; None = mult[0]
        channel_mult_emb:   Optional[int] = None,           # embedding ch. / model_channels; None = max(mult)
        num_blocks:         int = 3,                        # residual blocks per level (decoder: num_blocks + 1)
        attn_resolutions:   Sequence[int] = (16, 8),        # resolutions with self-attention
        label_balance:      float = 0.5,                    # noise embedding (0) vs class embedding (1)
        concat_balance:     float = 0.5,                    # skip connection (0) vs main path (1)
        resample_filter:    Sequence[float] = (1, 1),       # FIR taps for down/upsampling
        channels_per_head:  int = 64,                       # channels per attention head
        dropout:            float = 0.0,                    # dropout rate inside every block's residual branch
        res_balance:        float = 0.3,                    # main (0) vs residual branch (1)
        attn_balance:       float = 0.3,                    # main (0) vs self-attention (1)
        clip_act:           Optional[float] = 256,          # activation clipping; None = off
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        block_kwargs = dict(resample_filter=resample_filter, channels_per_head=channels_per_head, dropout=dropout,
                            res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act)
        widths = [model_channels * m for m in channel_mult]
        noise_ch = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        emb_ch = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        attn_res = set(attn_resolutions)

        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(noise_ch)
        self.emb_noise = MPConv(noise_ch, emb_ch, kernel=())
        self.emb_label = MPConv(label_dim, emb_ch, kernel=()) if label_dim != 0 else None

        # Encoder: a 3x3 conv at full resolution, a downsampling block at every other level, then blocks.
        self.enc = torch.nn.ModuleDict()
        ch = img_channels + 1
        for level, width in enumerate(widths):
            r = img_resolution >> level
            if level == 0:
                self.enc[f"{r}x{r}_conv"] = MPConv(ch, width, kernel=(3, 3))
                ch = width
            else:
                self.enc[f"{r}x{r}_down"] = EDM2Block(ch, ch, emb_ch, flavor="enc", resample_mode="down",
                                                      **block_kwargs)
            for i in range(num_blocks):
                self.enc[f"{r}x{r}_block{i}"] = EDM2Block(ch, width, emb_ch, flavor="enc",
                                                          attention=r in attn_res, **block_kwargs)
                ch = width

        # Decoder: two blocks (the first with attention) at the lowest level, an upsampling block elsewhere, then
        # num_blocks + 1 blocks that each consume one encoder skip.
        self.dec = torch.nn.ModuleDict()
        skip_ch = [m.out_channels for m in self.enc.values()]
        for level in reversed(range(len(widths))):
            width, r = widths[level], img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f"{r}x{r}_in0"] = EDM2Block(ch, ch, emb_ch, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{r}x{r}_in1"] = EDM2Block(ch, ch, emb_ch, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{r}x{r}_up"] = EDM2Block(ch, ch, emb_ch, flavor="dec", resample_mode="up", **block_kwargs)
            for i in range(num_blocks + 1):
                self.dec[f"{r}x{r}_block{i}"] = EDM2Block(ch + skip_ch.pop(), width, emb_ch, flavor="dec",
                                                          attention=r in attn_res, **block_kwargs)
                ch = width
        self.out_conv = MPConv(ch, img_channels, kernel=(3, 3))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.img_channels:
            raise ValueError(f"EDM2UNet expects x of shape [N, {self.img_channels}, H, W], got {list(x.shape)}")
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            if class_labels is None:
                raise ValueError(f"EDM2UNet with label_dim={self.label_dim} needs class_labels "
                                 f"[N, {self.label_dim}] (zero rows = unconditional)")
            label_emb = self.emb_label(class_labels * math.sqrt(class_labels.shape[1]))
            emb = mp_sum(emb, label_emb, t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, module in self.enc.items():
            x = module(x) if isinstance(module, MPConv) else module(x, emb)
            skips.append(x)
        for name, module in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = module(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class EDM2Precond(torch.nn.Module):
    """EDM2 denoiser: EDM preconditioning around `EDM2UNet`, plus the learned uncertainty head (paper Sec. 2, Eq. 21).

        D(x; sigma) = c_skip x + c_out F(c_in x, ln(sigma)/4, labels)
        c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),  c_in = 1 / sqrt(sigma^2 + sd^2)
        logvar(sigma) = logvar_linear(logvar_fourier(ln(sigma)/4))          (sd = sigma_data)

    `forward(x [N, C, R, R], sigma scalar or [N], labels None or [N, label_dim]) -> D [N, C, R, R]`;
    with `return_logvar=True` -> `(D, logvar [N, 1, 1, 1])`. `labels=None` on a conditional net means
    unconditional (a zero label row); an unconditional net (`label_dim=0`) ignores `labels`, as the official
    code does (so an unconditional guide can share a conditional net's call). Computation is fp32; with
    `use_fp16=True` the U-Net runs in fp16 on CUDA only (as officially), never on CPU.
    """

    family = "edm2"

    def __init__(self,
        img_resolution:     int,                            # input resolution R (64 for the img512 latents)
        img_channels:       int,                            # input channels (4 for img512 latents, 3 for img64)
        label_dim:          int,                            # class label dimension; 0 = unconditional
        use_fp16:           bool = True,                    # run the U-Net in fp16 on CUDA (ignored on CPU)
        sigma_data:         float = 0.5,                    # expected std of the training data
        logvar_channels:    int = 128,                      # Fourier channels of the uncertainty head
        model_channels:     int = 192,                      # base channel count
        channel_mult:       Sequence[int] = (1, 2, 3, 4),   # channels per level, in units of model_channels
        channel_mult_noise: Optional[int] = None,           # noise Fourier ch. / model_channels; None = mult[0]
        channel_mult_emb:   Optional[int] = None,           # embedding ch. / model_channels; None = max(mult)
        num_blocks:         int = 3,                        # residual blocks per level
        attn_resolutions:   Sequence[int] = (16, 8),        # resolutions with self-attention
        label_balance:      float = 0.5,                    # noise embedding (0) vs class embedding (1)
        concat_balance:     float = 0.5,                    # skip connection (0) vs main path (1)
        resample_filter:    Sequence[float] = (1, 1),       # FIR taps for down/upsampling
        channels_per_head:  int = 64,                       # channels per attention head
        dropout:            float = 0.0,                    # dropout rate inside every block's residual branch
        res_balance:        float = 0.3,                    # main (0) vs residual branch (1)
        attn_balance:       float = 0.3,                    # main (0) vs self-attention (1)
        clip_act:           Optional[float] = 256,          # activation clipping; None = off
    ):
        super().__init__()
        unet_kwargs = dict(
            model_channels=model_channels, channel_mult=list(channel_mult), channel_mult_noise=channel_mult_noise,
            channel_mult_emb=channel_mult_emb, num_blocks=num_blocks, attn_resolutions=list(attn_resolutions),
            label_balance=label_balance, concat_balance=concat_balance, resample_filter=list(resample_filter),
            channels_per_head=channels_per_head, dropout=dropout, res_balance=res_balance,
            attn_balance=attn_balance, clip_act=clip_act)
        self.config = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                           use_fp16=use_fp16, sigma_data=sigma_data, logvar_channels=logvar_channels,
                           **copy.deepcopy(unet_kwargs))
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = EDM2UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                             **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=())

    def _check_input(self, x, labels) -> Optional[torch.Tensor]:
        check_x(x, name="x")
        want = [self.img_channels, self.img_resolution, self.img_resolution]
        if x.ndim != 4 or list(x.shape[1:]) != want:
            raise ValueError(f"x must have shape [N, {', '.join(map(str, want))}] (N, img_channels, img_resolution, "
                             f"img_resolution), got {list(x.shape)}")
        labels = check_labels(labels, x.shape[0])
        if self.label_dim == 0:
            return None  # unconditional net: labels are ignored
        if labels is None:
            return torch.zeros([1, self.label_dim], device=x.device)
        if labels.shape[1] != self.label_dim:
            raise ValueError(f"labels must have shape [{x.shape[0]}, {self.label_dim}] (label_dim={self.label_dim}), "
                             f"got {list(labels.shape)}")
        return labels.to(torch.float32)

    def forward(self, x: torch.Tensor, sigma, labels: Optional[torch.Tensor] = None, *,
                return_logvar: bool = False, force_fp32: bool = False):
        """`[N, C, R, R]`, sigma scalar or `[N]`, labels None or `[N, label_dim]` -> `D [N, C, R, R]` (x's dtype),
        or `(D, logvar [N, 1, 1, 1] fp32)` with `return_logvar=True`."""
        class_labels = self._check_input(x, labels)
        x32 = x.to(torch.float32)
        sigma = as_sigma(sigma, x32)  # [N] fp32, even for low-precision x
        use_half = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        dtype = torch.float16 if use_half else torch.float32

        s = sigma.reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + s**2).sqrt()
        c_noise = sigma.log() / 4

        F = self.unet((c_in * x32).to(dtype), c_noise, class_labels)
        D = (c_skip * x32 + c_out * F.to(torch.float32)).to(x.dtype)
        if return_logvar:
            return D, self.logvar(sigma)
        return D

    def logvar(self, sigma: torch.Tensor) -> torch.Tensor:
        """The learned uncertainty `u(sigma)` of the loss weighting (paper Eq. 21): `[N] -> [N, 1, 1, 1]` fp32."""
        c_noise = sigma.to(torch.float32).log() / 4
        return self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------------------------
# Presets and sizes.

def _preset(img: str, channels: int, dropout: float) -> dict:
    # img512 models denoise Stable Diffusion VAE latents (4 x 64 x 64); img64 models denoise RGB pixels.
    shape = dict(img_resolution=64, img_channels=4) if img == "img512" else dict(img_resolution=64, img_channels=3)
    return dict(**shape, label_dim=1000, model_channels=channels, dropout=dropout)


#: Constructor settings of the official EDM2 ImageNet models (NVlabs/edm2 `train_edm2.py` config presets; all
#: other settings are the constructor defaults). XXS and img64-XS are the small guiding networks the official repo
#: added for autoguidance (Karras et al. 2024b).
PRESETS: dict[str, dict] = {
    "edm2-img512-xxs": _preset("img512", 64, 0.00),
    "edm2-img512-xs":  _preset("img512", 128, 0.00),
    "edm2-img512-s":   _preset("img512", 192, 0.00),
    "edm2-img512-m":   _preset("img512", 256, 0.10),
    "edm2-img512-l":   _preset("img512", 320, 0.10),
    "edm2-img512-xl":  _preset("img512", 384, 0.10),
    "edm2-img512-xxl": _preset("img512", 448, 0.10),
    "edm2-img64-xs":   _preset("img64", 128, 0.00),
    "edm2-img64-s":    _preset("img64", 192, 0.00),
    "edm2-img64-m":    _preset("img64", 256, 0.10),
    "edm2-img64-l":    _preset("img64", 320, 0.10),
    "edm2-img64-xl":   _preset("img64", 384, 0.10),
}


def preset_config(name: str, **overrides) -> dict:
    """The `EDM2Precond` constructor kwargs of preset `name`, updated by `overrides` (e.g. `label_dim=0` for an
    unconditional model, `dropout=0.0`). Raises KeyError listing the presets for an unknown name."""
    if name not in PRESETS:
        raise KeyError(f"unknown EDM2 preset {name!r}; known: {', '.join(PRESETS)}")
    return {**copy.deepcopy(PRESETS[name]), **overrides}


def count_parameters(config) -> int:
    """Number of trainable parameters of `EDM2Precond(**config)` (or of a preset, given its name), counted on the
    meta device: no weight memory is allocated. Buffers (the Fourier frequencies and phases) are not counted.

    This matches the paper's Table 2 counts (e.g. img512 XS 125M ... XXL 1523M): they count everything the
    official `Precond` holds as parameters, including the 129 of the logvar head, which do not change the
    rounding."""
    if isinstance(config, str):
        config = preset_config(config)
    with torch.device("meta"):
        net = EDM2Precond(**config)
    return sum(p.numel() for p in net.parameters())
