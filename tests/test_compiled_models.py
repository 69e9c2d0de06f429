"""Compiled networks (issue 21, item 9): a `torch.compile(net)` wrapper and a module compiled in place
(`net.compile()`) are refused in one line before anything is compiled or run: by every perturbation (its hooks
would be ignored by the compiled graph) and by `guided_pipeline` (which takes over the model's forward). Both
wrappers are lazy, so these tests never compile."""
from __future__ import annotations

import time

import pytest
import torch

import autoguidance as ag
from autoguidance.perturb import Dropout, check_not_compiled
from conftest import assert_same_state, state_snapshot
from helpers import tiny_denoiser_mlp

diffusers = pytest.importorskip("diffusers")

from autoguidance.adapters import guided_pipeline, tiny  # noqa: E402
from autoguidance.adapters.diffusers import DiffusersDenoiser  # noqa: E402


def _in_place(module):
    module.compile()
    return module


def test_a_perturbation_refuses_a_compiled_net_naming_the_fix():
    net = tiny_denoiser_mlp(dropout=0.1)
    x = torch.randn(2, 2)
    t0 = time.perf_counter()
    with pytest.raises(TypeError, match=r"torch\.compile'd network.*net\._orig_mod"):
        ag.insitu(torch.compile(net), 2.0)(x, 1.0)
    inner = tiny_denoiser_mlp(dropout=0.1)
    _in_place(inner.raw)                              # a submodule compiled in place
    with pytest.raises(TypeError, match=r"net\.raw, compiled in place.*del net\.raw\._compiled_call_impl"):
        ag.insitu(inner, 2.0)(x, 1.0)
    assert time.perf_counter() - t0 < 5               # refused before any compilation
    assert inner.raw.__dict__.get("_compiled_call_impl") is not None     # left as found


def test_a_diffusers_denoiser_around_a_compiled_unet_is_refused():
    unet = tiny.tiny_unet()
    x, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 5 * 12)
    with pytest.raises(TypeError, match=r"net\.unet, a torch\.compile'd network.*net\.unet\._orig_mod"):
        ag.insitu(DiffusersDenoiser(torch.compile(unet), tiny.ddim()), 2.0)(x, 1.0, cond)
    before = state_snapshot(unet)
    _in_place(unet)
    with pytest.raises(TypeError, match=r"net\.unet, compiled in place by net\.unet\.compile\(\)"):
        ag.perturbation_guidance(DiffusersDenoiser(unet, tiny.ddim()), 2.0, Dropout(0.1))(x, 1.0, cond)
    assert_same_state(before, state_snapshot(unet))


@pytest.mark.parametrize("how", ["wrapper", "in place"])
def test_guided_pipeline_refuses_a_compiled_model_in_one_line(how):
    pipe = tiny.build("sd")
    unet = pipe.unet
    before = state_snapshot(unet)
    pipe.unet = torch.compile(unet) if how == "wrapper" else _in_place(unet)
    fix = r"pipe\.unet\._orig_mod" if how == "wrapper" else r"del pipe\.unet\._compiled_call_impl"
    for options in ({"method": "none"}, {"method": "insitu", "w": 2.0, "seeds": [0, 1]}):
        with pytest.raises(TypeError, match=fix) as e:        # the take-over itself needs the model's own forward
            guided_pipeline(pipe, **options)
        assert "\n" not in str(e.value)
    assert pipe.unet is not unet or "forward" not in unet.__dict__
    assert_same_state(before, state_snapshot(unet))


def test_the_check_reads_modules_only():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    check_not_compiled(net, "x")                      # nothing compiled: passes
    _in_place(net[1])
    with pytest.raises(TypeError, match=r"net\.1, compiled in place"):
        check_not_compiled(net, "x")
    del net[1]._compiled_call_impl                    # the fix the message names
    check_not_compiled(net, "x")
