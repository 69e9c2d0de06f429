"""A diffusers model in a pipeline folder as a make-guide main (`Main` of `mains.py`).

    DiffusersMain("path/to/pipeline", subfolder="transformer")      # the pipeline's scheduler decides VP or flow

**Losses** (the main's own, in its output space): a VP scheduler (DDPM, DDIM, Euler, ...) draws integer timesteps
`t ~ U{0, ..., T-1}` (DDPM's training distribution), `x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n`, target `n` (epsilon),
`sqrt(a_t) n - sqrt(1 - a_t) x0` (v) or `x0` (sample), as the scheduler's `prediction_type` says; a flow-matching
scheduler draws `t` from the logit-normal distribution `sigmoid(N(m, s^2))` (`m, s = 0, 1`: Esser et al. 2024's
choice for SD3, `--t-dist logit-normal:M,S` or `uniform`), `x_t = (1 - t) x0 + t n`, target the velocity `n - x0`.
The loss is the mean squared error over the output. Distillation keeps the inputs and replaces the target by the
main's own output at them (prediction matching). A learned-variance model (DiT) is trained on its mean channels.

**Conditioning**: class-conditional models (DiT, U-Nets with `num_class_embeds`) draw classes uniformly; text models
(SD, SDXL, SD3, PixArt, Flux, Wan) need prompts: the pipeline's own encoders turn them into the model's keyword
arguments, captured at the pipeline's first model call (`guidance_scale=1`, nothing else is run), so every pipeline
conditions its model as it does when sampling.

**Optimiser default**: AdamW at a constant learning rate 1e-4, betas (0.9, 0.999), as DiT's training and diffusers'
fine-tuning scripts; `--lr` overrides.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..denoiser import cat_rows, take_rows
from .budget import count_flops
from .compat import TASK_KEYS
from .mains import Main

__all__ = ["DiffusersMain", "TEXT_MODELS", "example_inputs", "capture_conditioning", "parse_t_dist"]

#: diffusers model classes conditioned on text (their pipelines' encoders make the conditioning from prompts)
TEXT_MODELS = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel", "PixArtTransformer2DModel",
               "WanTransformer3DModel")
_NOT_CONDITIONING = ("sample", "hidden_states", "timestep", "return_dict", "joint_attention_kwargs",
                     "cross_attention_kwargs", "attention_kwargs", "timestep_cond")


def parse_t_dist(text: Optional[str], flow: bool) -> tuple:
    """`('uniform',)` or `('logit-normal', m, s)` from `--t-dist` (default: uniform for VP, logit-normal 0,1 for
    flow)."""
    if text is None:
        return ("logit-normal", 0.0, 1.0) if flow else ("uniform",)
    if text == "uniform":
        return ("uniform",)
    name, _, args = text.partition(":")
    if name == "logit-normal" and flow:
        try:
            m, s = (float(v) for v in (args or "0,1").split(","))
        except ValueError:
            raise ValueError(f"--t-dist logit-normal:M,S takes two numbers, got {text!r}") from None
        if not s > 0:
            raise ValueError(f"--t-dist logit-normal:M,S needs S > 0, got {s}")
        return ("logit-normal", m, s)
    raise ValueError(f"--t-dist must be 'uniform'{' or logit-normal:M,S' if flow else ''} for this "
                     f"{'flow' if flow else 'VP'} main, got {text!r}")


class DiffusersMain(Main):
    kind = "diffusers"

    def __init__(self, folder, subfolder: Optional[str] = None, device="cpu", t_dist: Optional[str] = None):
        from ..adapters.diffusers import DiffusersDenoiser
        from ..checkpoint import digest, load

        folder = Path(folder)
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"{folder} is a diffusers model folder without its pipeline: give the pipeline folder "
                             "(with model_index.json and scheduler/) and --subfolder unet|transformer")
        if subfolder is None:
            subfolder = next((s for s in ("unet", "transformer") if (folder / s / "config.json").is_file()), None)
            if subfolder is None:
                raise ValueError(f"{folder} has neither unet/ nor transformer/: pass --subfolder NAME")
        model_dir = folder / subfolder
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"{folder} has no model folder {subfolder}/ (config.json): check --subfolder")
        self.folder, self.subfolder, self.device = folder, subfolder, torch.device(device)
        self.ref = str(folder)
        self.pipe = None
        self.net = load(model_dir, device=device)
        self.cls = type(self.net).__name__
        self.scheduler = _load_scheduler(folder)
        self.D = DiffusersDenoiser(self.net, self.scheduler)
        self.flow = self.D.is_flow
        self.prediction_type = self.D.prediction_type
        self.t_dist = parse_t_dist(t_dist, self.flow)
        self.digest = digest(model_dir)
        self.record = {}
        self.example: Optional[tuple] = None   # (x [1, ...], cond rows of one sample, const): set by set_example

    # -- identity and sizes ----------------------------------------------------------------------------------------
    def signature(self) -> dict:
        keys = TASK_KEYS.get(self.cls, ("in_channels", "out_channels"))
        return {"class": self.cls, **{k: _jsonable(self.net.config.get(k)) for k in keys}}

    def family(self) -> str:
        return self.cls

    def config(self) -> dict:
        return {k: _jsonable(v) for k, v in dict(self.net.config).items() if not k.startswith("_")}

    def set_example(self, x: torch.Tensor, cond, const) -> None:
        """One sample's inputs (`x [1, ...]`, conditioning rows of one sample, constants): the FLOP counts use them."""
        self.example = (x[:1].detach().to("cpu"), take_rows(cond, torch.tensor([0])) if cond is not None else None,
                        const)

    def flops(self, config: Optional[dict] = None) -> int:
        if self.example is None:
            raise RuntimeError("DiffusersMain.flops needs the inputs' shapes: call set_example first")
        x, cond, const = self.example
        kwargs = self._kwargs(cond, const, 1)
        cls = type(self.net)
        with torch.device("meta"):
            model = cls.from_config(config or self.config())
            meta = {k: _to_meta(v) for k, v in kwargs.items()}
            return count_flops(lambda: model(_to_meta(x), timestep=torch.zeros(1), return_dict=False, **meta))

    # -- conditioning ------------------------------------------------------------------------------------------------
    def conditioning_kind(self) -> str:
        """'text', 'class' or 'none'."""
        if self.cls == "DiTTransformer2DModel" or getattr(self.net.config, "num_class_embeds", None):
            return "class"
        if self.cls in TEXT_MODELS:
            return "text"
        return "none"

    def num_classes(self) -> int:
        if self.cls == "DiTTransformer2DModel":
            return int(self.net.config.num_embeds_ada_norm)
        return int(self.net.config.num_class_embeds)

    def draw_cond(self, n: int, gen: torch.Generator):
        if self.conditioning_kind() != "class":
            return None
        return {"class_labels": torch.randint(self.num_classes(), (n,), generator=gen)}

    def prompt_conditioning(self, prompts: list[str]) -> tuple:
        """`(rows, const)` of the model's keyword arguments for `prompts` (see `capture_conditioning`)."""
        if self.pipe is None:
            self.pipe = _load_pipeline(self.folder)
        model = getattr(self.pipe, self.subfolder)
        return capture_conditioning(self.pipe, model, prompts)

    def _kwargs(self, cond, const, n: int) -> dict:
        merged = dict(const or {})
        if cond is not None:
            merged.update(cond)
        return self.D.conditioning_kwargs(merged, n) if merged else dict(self.D.unet_kwargs)

    # -- training ---------------------------------------------------------------------------------------------------
    def build(self, config: dict, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = type(self.net).from_config(config)
        return model.to(self.device).train().requires_grad_(True)

    def optimizer_defaults(self, fresh: bool) -> dict:
        return {"lr": 1e-4, "schedule": None, "betas": (0.9, 0.999), "eps": 1e-8}

    def draw_levels(self, n: int, gen: torch.Generator) -> torch.Tensor:
        if not self.flow:
            T = len(self.scheduler.alphas_cumprod)
            return torch.randint(T, (n,), generator=gen).to(torch.float32)
        if self.t_dist[0] == "uniform":
            return torch.rand(n, generator=gen).clamp_min(1e-5)
        _, m, s = self.t_dist
        return torch.sigmoid(torch.randn(n, generator=gen) * s + m)

    def _inputs(self, x0, level, noise):
        """`(x_t, model timestep, target of the own loss)`."""
        col = (-1,) + (1,) * (x0.ndim - 1)
        if self.flow:
            t = level.reshape(col)
            x_t = (1 - t) * x0 + t * noise
            target = {"flow": noise - x0, "epsilon": noise, "sample": x0}[self.prediction_type]
            return x_t, self.D.schedule.timestep(level), target
        a = torch.as_tensor(self.scheduler.alphas_cumprod, dtype=torch.float32)[level.long()].reshape(col).to(x0)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0,
                  "sample": x0}[self.prediction_type]
        return x_t, level, target

    def _predict(self, model, x_t, timestep, kwargs):
        out = model(x_t.to(model.dtype), timestep=timestep, return_dict=False, **kwargs)[0]
        if out.shape[1] == 2 * x_t.shape[1] and out.shape[2:] == x_t.shape[2:]:
            out = out[:, :x_t.shape[1]]      # learned variance (DiT): the mean channels
        return out.to(torch.float32)

    def own_loss(self, model, x0, cond, level, noise, const=None) -> torch.Tensor:
        x_t, ts, target = self._inputs(x0, level, noise)
        out = self._predict(model, x_t, ts, self._kwargs(cond, const, len(x0)))
        return (out - target).square().flatten(1).mean(1)

    def distill_loss(self, model, x0, cond, level, noise, const=None) -> torch.Tensor:
        x_t, ts, _ = self._inputs(x0, level, noise)
        kwargs = self._kwargs(cond, const, len(x0))
        with torch.no_grad():
            target = self._predict(self.net, x_t, ts, kwargs)
        return (self._predict(model, x_t, ts, kwargs) - target).square().flatten(1).mean(1)

    # -- data-free inputs ---------------------------------------------------------------------------------------------
    def sample_shape(self) -> list[int]:
        c = self.net.config
        if self.cls in ("FluxTransformer2DModel", "WanTransformer3DModel") or c.get("sample_size") is None:
            raise ValueError(f"data-free inputs of a {self.cls} main are not supported (its latents are packed or "
                             "video-shaped): give --data DIR of latents [N, ...] as its pipeline makes them")
        s = c.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return [int(c.in_channels), int(h), int(w)]

    def sampler_name(self) -> str:
        return "flow-euler" if self.flow else "heun"

    def sample(self, seeds: torch.Tensor, cond, const=None, *, steps: int, device) -> torch.Tensor:
        from ..adapters.diffusers import flow_times
        from ..rng import StackedGenerators
        from ..sampling import generate, sample_flow_euler

        if const:
            raise ValueError(f"data-free inputs of a {self.cls} main are not supported (its conditioning holds "
                             f"non-batch inputs {sorted(const)}): give --data DIR of latents")
        with torch.no_grad():
            if self.flow:
                x = StackedGenerators(seeds, device).randn(self.sample_shape())
                return sample_flow_euler(self.D, x, flow_times(self.scheduler, steps, device=device), labels=cond,
                                         seeds=seeds, progress=False)
            return generate(self.D, seeds, self.sample_shape(), labels=cond, num_steps=steps, batch=64,
                            sigma_min=self.D.sigma_min, sigma_max=self.D.sigma_max, device=device, progress=False)

    # -- writing a guide ---------------------------------------------------------------------------------------------
    def save_guide(self, model: torch.nn.Module, folder: Path, meta: dict) -> None:
        """`save_pretrained` (safetensors) into a hidden folder beside, then each file moved into `folder`, the
        config last; the guide's record is `guide.json` (written by make-guide)."""
        from ..runs.files import TEMP_PREFIX

        folder = Path(folder)
        tmp = folder / f"{TEMP_PREFIX}guide"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
        for f in files:
            os.replace(f, folder / f.name)
        shutil.rmtree(tmp, ignore_errors=True)


# -- helpers --------------------------------------------------------------------------------------------------------

def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def _to_meta(v):
    if isinstance(v, torch.Tensor):
        return torch.zeros(v.shape, dtype=v.dtype, device="meta")
    if isinstance(v, dict):
        return {k: _to_meta(x) for k, x in v.items()}
    return v


def _load_scheduler(folder: Path):
    import diffusers

    cfg_file = folder / "scheduler" / "scheduler_config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{folder} has no scheduler/scheduler_config.json: the guide's noise levels come from the "
                         "main's scheduler")
    cfg = json.loads(cfg_file.read_text())
    cls = getattr(diffusers, cfg.get("_class_name", ""), None)
    if cls is None:
        raise ValueError(f"{cfg_file} names scheduler {cfg.get('_class_name')!r}, which this diffusers lacks")
    return cls.from_config(cfg)


def _load_pipeline(folder: Path):
    """The pipeline of `folder` (local files only), its components absent from model_index.json passed as None
    (a pipeline saved without an optional encoder, e.g. SD3 without T5)."""
    import inspect

    import diffusers

    index = json.loads((folder / "model_index.json").read_text())
    cls = getattr(diffusers, index.get("_class_name", ""), None)
    if cls is None:
        raise ValueError(f"{folder}/model_index.json names pipeline {index.get('_class_name')!r}, which this "
                         "diffusers lacks")
    params = inspect.signature(cls.__init__).parameters
    absent = {k: None for k in params if k != "self" and params[k].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
              and (k not in index or index[k] in ([None, None], None))}
    pipe = cls.from_pretrained(str(folder), local_files_only=True, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Captured(Exception):
    def __init__(self, kwargs):
        self.kwargs = kwargs


def _split(obj: dict, n: int) -> tuple[dict, dict]:
    """`(rows, const)`: tensors with `n` rows on axis 0 (nested mappings too) and the rest (not-None values)."""
    rows, const = {}, {}
    for k, v in obj.items():
        if isinstance(v, dict):
            r, c = _split(v, n)
            if r:
                rows[k] = r
            if c:
                const[k] = c
        elif isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n:
            rows[k] = v.detach()
        elif v is not None:
            const[k] = v.detach() if isinstance(v, torch.Tensor) else v
    return rows, const


def capture_conditioning(pipe, model: torch.nn.Module, prompts: list[str], batch: int = 8) -> tuple[dict, dict]:
    """The keyword arguments `pipe` gives `model` for `prompts` at its first model call (guidance_scale 1, one
    step: the call is stopped there, nothing is denoised): `(rows, const)`, rows batch-first over the prompts
    (`encoder_hidden_states`, `pooled_projections`, SDXL's `added_cond_kwargs`, ...), const the inputs that are not
    per prompt (Flux's `img_ids` / `txt_ids`)."""
    parts, const = [], {}
    for a in range(0, len(prompts), batch):
        chunk = prompts[a:a + batch]

        def hook(module, args, kwargs):
            raise _Captured(kwargs)

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            pipe(prompt=chunk, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
        except _Captured as c:
            kwargs = {k: v for k, v in c.kwargs.items() if k not in _NOT_CONDITIONING}
        else:
            raise ValueError(f"{type(pipe).__name__} never called its {type(model).__name__}: cannot capture the "
                             "conditioning of the prompts")
        finally:
            handle.remove()
        rows, c = _split(kwargs, len(chunk))
        parts.append(rows)
        const = c
    return cat_rows(parts), const


def example_inputs(cls: str, config: dict, *, latent: tuple, text_len: int = 77, batch: int = 1) -> tuple:
    """`(x, kwargs)` zeros of a model call of diffusers class `cls` at latent size `latent` ((H, W), or (F, H, W)
    for Wan) and `text_len` text tokens: for FLOP counts on the meta device (sizes of published models)."""
    c = config
    if cls == "UNet2DConditionModel":
        x = torch.zeros(batch, c["in_channels"], *latent)
        kw = {"encoder_hidden_states": torch.zeros(batch, text_len, c["cross_attention_dim"])}
        if c.get("addition_embed_type") == "text_time":
            n_time = 6
            text = c["projection_class_embeddings_input_dim"] - n_time * c["addition_time_embed_dim"]
            kw["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, text), "time_ids": torch.zeros(batch, n_time)}
        return x, kw
    if cls == "SD3Transformer2DModel":
        return torch.zeros(batch, c["in_channels"], *latent), {
            "encoder_hidden_states": torch.zeros(batch, text_len, c["joint_attention_dim"]),
            "pooled_projections": torch.zeros(batch, c["pooled_projection_dim"])}
    if cls == "FluxTransformer2DModel":
        seq = (latent[0] // 2) * (latent[1] // 2)                     # 2x2 packed latent patches
        kw = {"encoder_hidden_states": torch.zeros(batch, text_len, c["joint_attention_dim"]),
              "pooled_projections": torch.zeros(batch, c["pooled_projection_dim"]),
              "img_ids": torch.zeros(seq, 3), "txt_ids": torch.zeros(text_len, 3)}
        if c.get("guidance_embeds"):
            kw["guidance"] = torch.zeros(batch)
        return torch.zeros(batch, seq, c["in_channels"]), kw
    if cls == "DiTTransformer2DModel":
        return torch.zeros(batch, c["in_channels"], *latent), {"class_labels": torch.zeros(batch, dtype=torch.long)}
    if cls == "PixArtTransformer2DModel":
        kw = {"encoder_hidden_states": torch.zeros(batch, text_len, c["caption_channels"])}
        if c.get("use_additional_conditions"):
            kw["added_cond_kwargs"] = {"resolution": torch.zeros(batch, 2), "aspect_ratio": torch.zeros(batch, 1)}
        else:
            kw["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return torch.zeros(batch, c["in_channels"], *latent), kw
    if cls == "WanTransformer3DModel":
        return torch.zeros(batch, c["in_channels"], *latent), {
            "encoder_hidden_states": torch.zeros(batch, text_len, c["text_dim"])}
    raise ValueError(f"no example inputs for {cls}")
