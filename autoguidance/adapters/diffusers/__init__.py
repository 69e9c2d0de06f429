"""diffusers behind the denoiser contract, and guidance inside a diffusers pipeline's own loop.

Needs the optional extra: `pip install autoguidance[diffusers]` (diffusers is imported only when used).

One room per job:

    schedules     VP / flow-matching noise schedules in EDM terms; a model output <-> the x0 prediction
    denoiser      `DiffusersDenoiser`: a U-Net or transformer + its scheduler as `D(x, sigma, labels)`
    model_call    `GuidedModelCall` / `PipelineModelNet`: one call of a pipeline's model as a denoiser evaluation,
                  the method's passes batched, the guided prediction returned in the model's own output type
    insitu_unet   `InSituGuidedUNet`, the compatibility drop-in for `pipe.unet`
    families/     per-family rules for perturbations (attention, U-Net blocks, SD3, Flux, ...): one module per
                  family, each registering its module rules with `autoguidance.perturb`

Every name of `__all__` is importable from here (`from autoguidance.adapters.diffusers import DiffusersDenoiser`).
"""
from __future__ import annotations

from .denoiser import REQUIRED_CONDITIONING, DiffusersDenoiser
from .families import INSTALL_HINT, register_rules
from .insitu_unet import InSituGuidedUNet
from .model_call import GuidedModelCall, PipelineModelNet, PipelineScale, step_salt
from .schedules import (FLOW_PREDICTION_TYPES, PREDICTION_TYPES, FlowSchedule, VPSchedule, flow_output_to_x0,
                        flow_times, flow_x0_to_output, output_to_x0, x0_to_output)

__all__ = ["DiffusersDenoiser", "InSituGuidedUNet", "GuidedModelCall", "PipelineModelNet", "PipelineScale",
           "VPSchedule", "FlowSchedule", "flow_times", "register_rules"]
