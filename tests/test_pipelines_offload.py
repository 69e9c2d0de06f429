"""`pipe.enable_model_cpu_offload()` inside `guided_pipeline` (issue 21, item 2): accelerate re-installs its hooks
(and the model's forward) after every pipeline call; every call of the block must still be guided, with the images
of the same block without offload, and the model must be left as accelerate would have it. Runs on a CPU
(`device="cpu"` as the offload device)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from autoguidance.adapters import guided_pipeline, tiny  # noqa: E402


def _images(pipe, kind, seed, kw):
    return tiny.images(pipe(**tiny.inputs(kind, seed=seed, **kw)))


@pytest.mark.parametrize("kind", ["sd", "flux", "wan22"])
def test_every_call_under_model_cpu_offload_is_guided(kind):
    pipe = tiny.build(kind)
    kw = {"true_cfg_scale": 3.0, "negative_prompt": ["blurry", "dark"]} if kind == "flux" else {"guidance_scale": 3.0}
    method = dict(method="insitu", w=3.0, p=0.3, where="*attn1.to_out.0") if kind == "sd" else \
        dict(method="insitu", w=3.0, p=0.3, where="*blocks.0.attn1.to_out.0") if kind == "wan22" else \
        dict(method="insitu", w=3.0, p=0.3, where="transformer_blocks.0.attn.to_out.0")
    seeds = (1, 2, 3)
    with torch.no_grad():
        plain = [_images(pipe, kind, s, kw) for s in seeds]
        with guided_pipeline(pipe, **method):
            ref = [_images(pipe, kind, s, kw) for s in seeds]
        pipe.enable_model_cpu_offload(device="cpu")
        models = [m for n, m in pipe.components.items() if n in ("unet", "transformer", "transformer_2")]
        assert all("_hf_hook" in m.__dict__ for m in models)
        with guided_pipeline(pipe, **method) as gp:
            off = [_images(pipe, kind, s, kw) for s in seeds]
    for a, b, c in zip(off, ref, plain):            # each of the three calls guided, as without offload
        assert abs(a - b).max() < 2e-5 and abs(a - c).max() > 1e-4
    assert len(gp.calls) == 3 * 2                   # 3 pipeline calls x 2 steps, one model call each
    for m in models:                                # accelerate's hook holds the model's own forward again
        assert not m._forward_pre_hooks
        assert getattr(m.__dict__["_old_forward"], "__func__", None) is type(m).forward
    with torch.no_grad():                           # after the block: offloaded and unguided again
        after = _images(pipe, kind, 1, kw)
    assert abs(after - plain[0]).max() < 2e-5
