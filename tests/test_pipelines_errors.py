"""Bad input to the pipeline adapters gets one clear line (issue 21, item 11), in tests/test_bad_inputs.py's style:
a table of API calls, each with the words its error must contain (what was wrong, and the fix). Tiny pipelines
from `autoguidance.adapters.tiny`; nothing is downloaded."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from autoguidance.adapters import guided_pipeline, tiny  # noqa: E402


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    return {k: tiny.build(k, tmp) for k in ("sd", "sd3", "cogvideox")}


def _run_inside(pipe, kind, method="none", call=None, **options):
    with torch.no_grad(), guided_pipeline(pipe, method, **options):
        pipe(**tiny.inputs(kind, num_inference_steps=1, **(call or {})))


def _set_seeds(pipe):
    gp = guided_pipeline(pipe, "insitu", w=2.0)
    gp.seeds = [0, -2]


def _guider(**kw):
    from autoguidance.adapters.guider import AutoguidanceGuider

    return AutoguidanceGuider(**kw)


def _insitu_unet(**kw):
    from autoguidance.adapters import InSituGuidedUNet

    return InSituGuidedUNet(tiny.tiny_unet(), tiny.ddim(), **kw)


def _skiplayers_without_layers():
    from autoguidance.adapters.pipeline import make_pipeline_perturbation

    return make_pipeline_perturbation("skiplayers", 1.0)


def _skip_layers():
    from autoguidance.perturb import SkipLayers

    return SkipLayers(layers=[0])


#: (id, call(pipes), words the one-line error must contain)
CASES = [
    ("guide-other-channels", lambda P: guided_pipeline(P["sd"], "autoguidance", w=2.0,
                                                       guide=tiny.tiny_unet(in_channels=9)), "in_channels 9"),
    ("guide-other-text-width", lambda P: guided_pipeline(P["sd"], "autoguidance", w=2.0,
                                                         guide=tiny.tiny_unet(cross=24)), "cross_attention_dim 24"),
    ("guide-other-class", lambda P: guided_pipeline(P["sd"], "autoguidance", w=2.0, guide=tiny.tiny_dit()),
     "DiTTransformer2DModel, the pipeline's unet a UNet2DConditionModel"),
    ("guide-not-a-model", lambda P: guided_pipeline(P["sd"], "autoguidance", w=2.0, guide="a/folder"), "guide="),
    ("interval-a-number", lambda P: guided_pipeline(P["sd"], "insitu", w=2.0, interval=5.0),
     "interval must be (sigma_lo, sigma_hi)"),
    ("cfg-interval-a-string", lambda P: guided_pipeline(P["sd"], "none", cfg_interval="0.3,5"),
     "cfg_interval must be (sigma_lo, sigma_hi)"),
    ("component-text-encoder", lambda P: guided_pipeline(P["sd"], "none", component="text_encoder"),
     "component 'text_encoder'"),
    ("component-missing", lambda P: guided_pipeline(P["sd"], "none", component="prior"), "component="),
    ("cfg-layout-unknown", lambda P: guided_pipeline(P["sd"], "none", cfg_layout="batched"),
     "cfg_layout must be one of"),
    ("seeds-negative", lambda P: guided_pipeline(P["sd"], "insitu", w=2.0, seeds=[0, -1]),
     "seeds must be integers >= 0"),
    ("seeds-negative-set", lambda P: _set_seeds(P["sd"]), "seeds must be integers >= 0"),
    ("guider-w-string", lambda P: _guider(w="2"), "w must be a finite number"),
    ("guider-scale-string", lambda P: _guider(guidance_scale="5"), "guidance_scale must be a finite number"),
    ("guider-sigma-negative", lambda P: _guider(sigma_lo=-1.0), "sigma_lo"),
    ("guider-seeds-negative", lambda P: _guider(seeds=[-3]), "seeds must be integers >= 0"),
    ("insitu-unet-seeds-negative", lambda P: _insitu_unet(seeds=[-1]), "seeds must be integers >= 0"),
    ("skiplayers-without-layers", lambda P: _skiplayers_without_layers(), "layers="),
    ("skiplayers-on-a-unet", lambda P: _run_inside(P["sd"], "sd", "perturbation", w=2.0,
                                                   perturbation=_skip_layers()), "pass blocks="),
    ("sd3-own-skip-layer-guidance", lambda P: _run_inside(P["sd3"], "sd3", call={"skip_guidance_layers": [0]}),
     "SkipLayers"),
    ("cogvideox-dynamic-cfg", lambda P: _run_inside(P["cogvideox"], "cogvideox",
                                                    call={"use_dynamic_cfg": True, "guidance_scale": 4.0}),
     "use_dynamic_cfg=False"),
]


@pytest.mark.parametrize("name,call,words", CASES, ids=[c[0] for c in CASES])
def test_bad_pipeline_input_raises_one_clear_line(pipes, name, call, words):
    with pytest.raises((ValueError, TypeError)) as info:
        call(pipes)
    msg = str(info.value)
    assert "\n" not in msg and words in msg, (name, msg)
    for p in pipes.values():                       # nothing left installed by a refused block
        m = tiny.model_of(p)
        assert "forward" not in m.__dict__ and not m._forward_pre_hooks
