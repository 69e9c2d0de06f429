"""Every tiny pipeline kind of `autoguidance.adapters.tiny` (SD 1.x/2.x, img2img, inpainting, SDXL x4, ControlNet,
SD3, Flux, Flux-dev, DiT, PixArt-alpha/Sigma, Sana, Wan 2.1/2.2, LTX, CogVideoX) under `guided_pipeline`: no guide
gives the pipeline's own images, the library's CFG gives the pipeline's own CFG (batched or one call per branch),
and CFG + in-situ runs every pass of a step in ONE model call of 3N rows. Issue 21, items 1, 4, 5, 6, 7."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from autoguidance.adapters import guided_pipeline, tiny  # noqa: E402
from autoguidance.perturb import SkipLayers  # noqa: E402

#: image tolerance: float32 pipelines, the library combines in float64 and batches the passes differently
ATOL = 2e-5








SKIP_LAYER_KINDS = ("flux", "flux-dev", "sd3", "dit", "pixart-alpha", "pixart-sigma", "sana", "wan21", "wan22", "ltx")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    return {k: tiny.build(k, tmp) for k in tiny.KINDS}


@pytest.mark.parametrize("kind", list(tiny.KINDS))
def test_no_guide_and_library_cfg_equal_the_pipelines_own(pipes, kind):
    pipe = pipes[kind]
    with torch.no_grad():
        plain = tiny.images(pipe(**tiny.inputs(kind, **tiny.no_cfg_options(kind))))
        own_cfg = tiny.images(pipe(**tiny.inputs(kind, **tiny.cfg_options(kind))))
        with guided_pipeline(pipe, "none") as gp:
            none = tiny.images(pipe(**tiny.inputs(kind, **tiny.no_cfg_options(kind))))
            assert gp.calls == []                           # no CFG, no guide: the model runs as it is
            lib_cfg = tiny.images(pipe(**tiny.inputs(kind, **tiny.cfg_options(kind))))
    assert abs(own_cfg - plain).max() > 1e-3                # CFG changes the images
    assert abs(none - plain).max() == 0
    assert abs(lib_cfg - own_cfg).max() < ATOL
    # the library did the CFG: one call of 2N rows per step (per-branch pipelines too), on every expert
    assert gp.calls and {r for _, r in gp.calls} == {4}
    if kind == "wan22":
        assert {n for n, _ in gp.calls} == {"main", "main/transformer_2"}


@pytest.mark.parametrize("kind", list(tiny.KINDS))
def test_cfg_plus_a_guide_is_one_call_of_3n_rows_per_step(pipes, kind):
    pipe = pipes[kind]
    if kind in SKIP_LAYER_KINDS:          # a deterministic guide on the transformers' blocks
        method = dict(method="perturbation", perturbation=SkipLayers(layers=[0]))
    else:                                 # dropout on the self-attention outputs (the tiny nets have no nn.Dropout)
        method = dict(method="insitu", p=0.3, where="*attn1.to_out.0")
    with torch.no_grad():
        own_cfg = tiny.images(pipe(**tiny.inputs(kind, **tiny.cfg_options(kind))))
        with guided_pipeline(pipe, w=2.0, **{"seeds": [0, 1], **method}) as gp:
            guided = tiny.images(pipe(**tiny.inputs(kind, **tiny.cfg_options(kind))))
    assert gp.calls and {r for _, r in gp.calls} == {6}         # cond, uncond and degraded rows: ONE call per step
    assert abs(guided - own_cfg).max() > 1e-4
