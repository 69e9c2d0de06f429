"""The flow schedulers diffusers models ship (issue 21, item 5): Sana's DPM-Solver with flow sigmas and Wan's UniPC
with `prediction_type='flow_prediction'` carry `alphas_cumprod` too, but run a flow time axis; the adapter, the
pipeline context manager and `AutoguidanceGuider.for_scheduler` must read them as flow, so that a sigma interval
selects the steps whose flow sigma t / (1 - t) lies in it. Also zero-terminal-SNR VP schedules (CogVideoX)."""
from __future__ import annotations

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from autoguidance.adapters import guided_pipeline, tiny  # noqa: E402


def flow_schedulers():
    return {
        "dpm-flow": diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                          prediction_type="flow_prediction"),
        "unipc-flow": diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                        prediction_type="flow_prediction"),
    }


@pytest.mark.parametrize("name", ["dpm-flow", "unipc-flow"])
def test_flow_configured_schedulers_are_flow_for_the_adapter_and_the_guider(name):
    from autoguidance.adapters import DiffusersDenoiser
    from autoguidance.adapters.guider import AutoguidanceGuider

    sched = flow_schedulers()[name]
    assert sched.alphas_cumprod is not None                 # what made them look like VP schedules
    D = DiffusersDenoiser(tiny.tiny_sd3(), sched)
    assert D.is_flow and D.prediction_type == "flow"
    guider = AutoguidanceGuider.for_scheduler(sched, w=2.0, perturbation="identityattention", p=1.0)
    assert guider.config.schedule == "flow"
    guider.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(500.0))
    assert float(guider.sigma()) == pytest.approx(1.0)       # t = 0.5: sigma = t / (1 - t)
    # a VP DPM-Solver stays VP
    assert not DiffusersDenoiser(tiny.tiny_unet(), diffusers.DPMSolverMultistepScheduler()).is_flow


@pytest.mark.parametrize("kind", ["sana", "wan21"])
def test_a_sigma_interval_selects_the_flow_steps(kind):
    pipe = tiny.build(kind)
    steps, lo, hi = 4, 0.5, 3.0
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(steps)
    t = sched.timesteps.to(torch.float64) / 1000
    expected = [6 if lo < float(tt / (1 - tt)) <= hi else 4 for tt in t]
    assert 4 in expected and 6 in expected                  # the interval holds some steps, not all
    with torch.no_grad(), guided_pipeline(pipe, "insitu", w=2.0, p=0.3, where="*attn1.to_out.0",
                                          interval=(lo, hi), seeds=[0, 1]) as gp:
        pipe(**tiny.inputs(kind, guidance_scale=4.0, num_inference_steps=steps))
    assert [r for _, r in gp.calls] == expected


def test_zero_terminal_snr_schedule_is_guided():
    """CogVideoX's DDIM with rescale_betas_zero_snr: a_T = 0, sigma_T infinite; the adapter uses 2^-24 there as
    diffusers' own multistep schedulers do, and the library's CFG still equals the pipeline's."""
    import numpy as np

    pipe = tiny.build("cogvideox")
    assert float(pipe.scheduler.alphas_cumprod[-1]) == 0.0
    with torch.no_grad():
        own = np.asarray(pipe(**tiny.inputs("cogvideox", guidance_scale=4.0)).frames)
        with guided_pipeline(pipe, "none"):
            ours = np.asarray(pipe(**tiny.inputs("cogvideox", guidance_scale=4.0)).frames)
    assert np.isfinite(ours).all() and abs(ours - own).max() < 2e-5
