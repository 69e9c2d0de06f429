"""`make-guide` on tiny diffusers mains built in code (a Stable Diffusion U-Net with a DDIM schedule, an SD3
transformer with flow matching; text encoders and tokenizers from a tiny vocabulary, nothing downloaded): every
recipe end to end from prompts, a model folder `from_pretrained` and `ag.load` read, `guided_pipeline(pipe,
"autoguidance", guide=...)`, latents as data, the snapshot check, and a guide for another main refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import autoguidance as ag  # noqa: E402
from autoguidance.adapters import DiffusersDenoiser, guided_pipeline  # noqa: E402
from autoguidance.cli import main as cli  # noqa: E402
from autoguidance.guidemaker.compat import guide_mismatch  # noqa: E402
from conftest import assert_same_state, state_snapshot  # noqa: E402
from autoguidance.adapters import tiny  # noqa: E402
from test_pipelines import model_of, run, sd_pipe, tiny_unet  # noqa: E402

tiny_sd3 = tiny.tiny_sd3


def sd3_pipe(folder):
    return tiny.build("sd3", folder)

FAST = dict(batch=4, samples=4, sample_steps=2, progress=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The two tiny pipelines saved as pipeline folders, and a prompt file."""
    tmp = tmp_path_factory.mktemp("pipes")
    (tmp / "tok").mkdir()
    out = {"tmp": tmp, "prompts": tmp / "prompts.txt"}
    out["prompts"].write_text("a cat\ndog\n\na red car\n")
    for kind, build in (("sd", sd_pipe), ("sd3", sd3_pipe)):
        pipe = build(tmp / "tok")
        pipe.save_pretrained(tmp / kind)
        out[kind] = pipe
    return out


@pytest.mark.parametrize("kind", ["sd", "sd3"])
@pytest.mark.parametrize("recipe, kw", [("distill", {}), ("distill", {"init": "main"}), ("self-synthetic", {}),
                                        ("weight-decay", {})])
def test_each_recipe_on_a_diffusers_main(folders, tmp_path, kind, recipe, kw):
    pipe = folders[kind]
    model = model_of(pipe)
    out = tmp_path / "g"
    rec = ag.make_guide(str(folders["tmp"] / kind), recipe, out, steps=2, prompts=str(folders["prompts"]), **FAST,
                        **kw)
    assert rec["status"] == "complete" and rec["data"]["kind"] == "samples" and rec["trained"]["steps"] == 2
    assert rec["made_for"]["class"] == type(model).__name__
    guide = type(model).from_pretrained(out)                                 # a model folder from_pretrained reads
    assert (out / "diffusion_pytorch_model.safetensors").is_file() and not list(out.glob("*.bin"))
    loaded = ag.load(out)                                                    # ag.load reads it too (safetensors only)
    assert type(loaded) is type(model)
    assert all(torch.equal(a, b) for a, b in zip(guide.state_dict().values(), loaded.state_dict().values()))
    if recipe == "distill":
        assert rec["guide"]["parameters"] < rec["guide"]["main_parameters"]
        assert rec["guide"]["flops_per_call"] < rec["guide"]["main_flops_per_call"]
    else:
        public = lambda c: json.loads(json.dumps({k: v for k, v in dict(c).items() if not k.startswith("_")}))  # noqa
        assert public(guide.config) == public(model.config)                 # a full-size copy
        assert rec["guide"]["parameters"] == rec["guide"]["main_parameters"]
    assert guide_mismatch(model, loaded) is None
    before = state_snapshot(model)
    plain = run(pipe, kind, steps=2, guidance_scale=1.0)
    with guided_pipeline(pipe, "autoguidance", w=2.0, guide=loaded):
        guided = run(pipe, kind, steps=2, guidance_scale=1.0)
    assert np.isfinite(guided).all() and abs(guided - plain).max() > 1e-6     # the guide changes the images
    assert_same_state(before, state_snapshot(model))                         # the pipeline's model as found
    if recipe == "distill" and not kw:
        assert json.loads((out / "inputs.json").read_text())["n"] == 4       # the main's samples, from the prompts


def test_latents_as_data_and_the_snapshot_check(folders, tmp_path):
    lat = np.random.default_rng(0).standard_normal((6, 4, 8, 8)).astype(np.float32)
    (tmp_path / "lat").mkdir()
    np.savez(tmp_path / "lat" / "x.npz", latents=lat)
    rec = ag.make_guide(str(folders["tmp"] / "sd3"), "distill", tmp_path / "g", steps=2, data=str(tmp_path / "lat"),
                        prompts=str(folders["prompts"]), batch=4, progress=False)
    assert rec["data"]["kind"] == "data" and rec["data"]["n"] == 6 and rec["plan"]["samples"] == 0
    with pytest.raises(ValueError, match="needs each latent's caption"):
        ag.make_guide(str(folders["tmp"] / "sd3"), "weight-decay", tmp_path / "h", steps=2,
                      data=str(tmp_path / "lat"), prompts=str(folders["prompts"]), batch=4, progress=False)
    other = tiny_sd3(seed=1)                                                 # another checkpoint, same config
    other.save_pretrained(tmp_path / "snap")
    rec = ag.make_guide(str(folders["tmp"] / "sd3"), "snapshot", tmp_path / "s", snapshot=str(tmp_path / "snap"),
                        progress=False)
    assert rec["snapshot"]["run_checked"] is False and rec["budget"]["spent_flops"] == 0.0
    assert torch.equal(ag.load(tmp_path / "s").state_dict()["proj_out.weight"], other.state_dict()["proj_out.weight"])
    tiny_sd3(layers=2).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="has the main's class and config"):
        ag.make_guide(str(folders["tmp"] / "sd3"), "snapshot", tmp_path / "t", snapshot=str(tmp_path / "other"),
                      progress=False)


def test_a_guide_for_another_main_is_refused(folders):
    main = model_of(folders["sd3"])
    wide = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
        pos_embed_max_size=16)
    assert "joint_attention_dim 32 (main) vs 48 (guide)" in guide_mismatch(main, wide)
    D = DiffusersDenoiser(main, folders["sd3"].scheduler)
    with pytest.raises(ValueError, match="made for another main: joint_attention_dim"):
        ag.autoguidance(D, DiffusersDenoiser(wide, folders["sd3"].scheduler), 2.0)
    assert "the guide is a UNet2DConditionModel" in guide_mismatch(main, tiny_unet())
    assert guide_mismatch(main, tiny_sd3(layers=1)) is None                  # fewer blocks: a fine guide


def test_a_text_main_without_prompts_is_one_line(folders, tmp_path, capsys):
    rc = cli(["make-guide", "--main", str(folders["tmp"] / "sd"), "--recipe", "distill", "--steps", "2",
              "--out", str(tmp_path / "g"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "needs --prompts FILE" in err
