"""A peft LoRA does not change a guide's default sites (issue 21, item 12): its `lora_dropout` is the adapter's
training regulariser, and its `lora_A` / `lora_B` the adapter's weights, not the model's. Default sites leave them out
(20 dropout sites on the tiny U-Net, also with a LoRA; they were 52); `where=torch.nn.Dropout` includes them."""
from __future__ import annotations

import pytest
import torch

import autoguidance as ag
from autoguidance.perturb import Dropout, WeightNoise
from conftest import assert_same_state, state_snapshot

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from autoguidance.adapters import tiny  # noqa: E402
from autoguidance.adapters.diffusers import DiffusersDenoiser  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _with_lora(unet):
    """A tiny LoRA on every attention projection, built in code: rank 2, dropout 0.1, B = 0 (peft's init), so the
    adapted model computes exactly what the base model does."""
    unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, lora_dropout=0.1, target_modules=TARGETS))
    return unet.eval()


def _plain_paths(paths):
    return [p.replace(".base_layer", "") for p in paths]


def test_lora_dropout_is_not_a_default_dropout_site():
    base, lora = tiny.tiny_unet(), _with_lora(tiny.tiny_unet())
    plain = [p for p, _ in Dropout().sites(base)]
    assert len(plain) == 20
    assert [p for p, _ in Dropout().sites(lora)] == plain                # the model's own dropout, as before
    every = [p for p, _ in Dropout(where=torch.nn.Dropout).sites(lora)]   # named: the adapter's dropout too
    assert len(every) == 52 and sum("lora_dropout" in p for p in every) == 32
    assert len(Dropout(where="*lora_dropout.*").sites(lora)) == 32
    weights = [p for p, _ in WeightNoise(0.1).sites(lora)]
    assert not any(".lora_" in p for p in weights)
    assert _plain_paths(weights) == [p for p, _ in WeightNoise(0.1).sites(base)]


def test_in_situ_guidance_is_the_same_with_a_lora_that_changes_nothing():
    base, lora = tiny.tiny_unet(), _with_lora(tiny.tiny_unet())
    before = state_snapshot(lora)
    x, cond = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randn(2, 5 * 12)
    with torch.no_grad():
        outs = [ag.generate(ag.insitu(DiffusersDenoiser(u, tiny.ddim()), 3.0, 0.1), [0, 1], [4, 8, 8],
                            labels=cond, num_steps=3, sigma_min=0.1, sigma_max=10.0, progress=False)
                for u in (base, lora)]
        every = ag.generate(ag.perturbation_guidance(DiffusersDenoiser(lora, tiny.ddim()), 3.0,
                                                     Dropout(0.1, where=torch.nn.Dropout)),
                            [0, 1], [4, 8, 8], labels=cond, num_steps=3, sigma_min=0.1, sigma_max=10.0, progress=False)
    # the same sites and masks, and B = 0 adds exact zeros: the same arithmetic on the base layers
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(every, outs[1])          # the adapter's dropout, named, does act
    assert_same_state(before, state_snapshot(lora))
