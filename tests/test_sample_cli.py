"""`autoguidance sample`: byte-identical across process counts, resumable after a kill, corrupt shards redone."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import autoguidance.checkpoint as ckpt
from autoguidance.runs import dist
from autoguidance.cli import main
from autoguidance.cli.options import spec_from_args
from autoguidance.cli.sample import sample_to_folder
from autoguidance.methods import MethodSpec, build_method
from autoguidance.nets.edm2 import EDM2Precond
from autoguidance.runs.seeds import format_seeds, parse_seeds, shard_blocks
from autoguidance.runs.shards import ShardError, read_shard, verify_shard, write_shard

TOY = ["--net", "toy-denoiser-main", "--method", "autoguidance", "--gnet", "toy-denoiser-guide", "--w", "3",
       "--sigma-max", "5", "--steps", "4", "--seeds", "0-23", "--shard-size", "6", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _shards(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "shards").glob("*.npz"))}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted one-process run: 24 seeds in 4 shards."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert main(["sample", *TOY, "--out", str(out)]) == 0
    return out


# -- units ----------------------------------------------------------------------------------------------------------

def test_seeds_parse_and_format():
    assert parse_seeds("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
    assert format_seeds([0, 1, 2, 3, 7, 10, 11]) == "0-3,7,10-11"
    assert shard_blocks(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    for bad in ("", "5-2", "a", "1,1"):
        with pytest.raises(ValueError, match="seed"):
            parse_seeds(bad)


def test_negative_seeds_are_refused_by_the_one_check_of_every_entry_point():
    """Seeds are torch.Generator seeds (and PNG names): `rng.as_seeds` refuses negative ones, and every entry point
    goes through it (the command line's parse_seeds accepted '-1' and '3,-2', issue 21 leftover)."""
    import autoguidance as ag
    from autoguidance.rng import as_seeds, noise_context

    for text in ("-1", "3,-2", "0-2,-5"):
        with pytest.raises(ValueError, match=r"--seeds must be integers >= 0 .*got -\d"):
            parse_seeds(text)
    with pytest.raises(ValueError, match=r"^seeds must be integers >= 0 .*got -3$"):
        as_seeds([0, -3])
    with pytest.raises(ValueError, match=r"seeds must be integers >= 0"):
        ag.generate(lambda x, s, l=None: x, [1, -1], [2], num_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"seeds must be integers >= 0"):
        noise_context([-1], 0)
    assert as_seeds(range(3)).tolist() == [0, 1, 2] and parse_seeds("0") == [0]


def test_method_spec_round_trips_toml_and_json():
    spec = MethodSpec(net="toy-denoiser-main", method="cfg-interval", w=2.1, interval=(0.28, 2.9), steps=12)
    assert MethodSpec.from_toml(spec.to_toml()) == spec
    assert MethodSpec.from_dict(json.loads(spec.to_json())) == spec
    with pytest.raises(ValueError, match="--interval"):
        MethodSpec(method="cfg-interval")
    with pytest.raises(ValueError, match="unknown method setting"):
        MethodSpec.from_dict({"wieght": 2.0})


def test_config_file_and_flags(tmp_path):
    cfg = tmp_path / "ag.toml"
    cfg.write_text(MethodSpec(net="toy-denoiser-main", method="autoguidance", gnet="toy-denoiser-guide",
                              w=2.0).to_toml())
    from autoguidance.cli.sample import add_parser
    import argparse
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["sample", "--config", str(cfg), "--w", "3.5", "--out", "x"])
    spec = spec_from_args(args)
    assert (spec.method, spec.w, spec.gnet) == ("autoguidance", 3.5, "toy-denoiser-guide")


def test_every_perturbation_by_name_builds():
    from autoguidance.methods import PERTURBATIONS
    for name in PERTURBATIONS:
        where = None if name in ("inputnoise", "noisierlevel") else "raw.trunk.fc*"
        if name in ("identityattention", "seg", "tokenshuffle"):
            continue  # attention and token perturbations: the toy MLP has neither; covered by their own tests
        D = build_method(MethodSpec(net="toy-denoiser-main", method="perturbation", perturbation=name, p=0.1,
                                    where=where, w=2.0))
        assert D(torch.zeros(3, 2), torch.ones(3)).shape == (3, 2)


def test_shard_checksums_and_determinism(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    p1, p2 = write_shard(tmp_path / "a.npz", a, np.arange(3), -np.ones(3)), write_shard(tmp_path / "b.npz", a,
                                                                                      np.arange(3), -np.ones(3))
    assert p1.read_bytes() == p2.read_bytes()
    assert np.array_equal(read_shard(p1)["samples"], a)
    raw = p1.read_bytes()
    p1.write_bytes(raw[: len(raw) // 2])                         # truncated
    with pytest.raises(ShardError, match="truncated or corrupt"):
        read_shard(p1)
    flipped = bytearray(raw)
    flipped[raw.index(a.tobytes()) + 5] ^= 1                     # one flipped bit inside the samples
    p1.write_bytes(bytes(flipped))
    with pytest.raises(ShardError):
        read_shard(p1)
    assert not verify_shard(p1, [0, 1, 2], -np.ones(3, dtype=np.int64), [4])
    assert verify_shard(p2, [0, 1, 2], -np.ones(3, dtype=np.int64), [4])
    assert not verify_shard(p2, [0, 1, 3], -np.ones(3, dtype=np.int64), [4])   # other seeds: redo


@pytest.mark.parametrize("command", ["sample", "metrics", "sweep"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "docs/evaluation.md" in capsys.readouterr().out


# -- the command ----------------------------------------------------------------------------------------------------

def test_run_record(reference_run):
    rec = json.loads((reference_run / "run.json").read_text())
    assert rec["status"] == "complete" and rec["seeds"] == "0-23" and rec["world_size"] == 1
    assert rec["config"]["spec"]["method"] == "autoguidance" and rec["autoguidance_version"]
    assert rec["command"].startswith("autoguidance ") and "--gnet" in rec["command"]
    assert MethodSpec.from_toml((reference_run / "config.toml").read_text()).w == 3.0
    assert len(_shards(reference_run)) == 4


def test_two_processes_give_byte_identical_shards(reference_run, tmp_path):
    out = tmp_path / "two"
    # two gloo ranks with torchrun's environment (benchmarks/bench_sample_scaling.py checks the same under torchrun)
    for r in dist.launch_local(2, ["sample", *TOY, "--out", out], env=ENV, timeout=240):
        assert r.returncode == 0, r.stderr[-3000:]
    assert _shards(out) == _shards(reference_run)
    assert json.loads((out / "run.json").read_text())["world_size"] == 2


def test_killed_run_resumes_to_the_same_output(reference_run, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "autoguidance.cli", "sample", *TOY, "--out", str(out)]
    r = subprocess.run(cmd, env={**ENV, "AUTOGUIDANCE_STOP_AFTER_SHARDS": "1"}, capture_output=True, timeout=240)
    assert r.returncode == 3                                     # exited hard after its first shard
    assert list(_shards(out)) == ["shard-000000.npz"]
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    assert main(["sample", *TOY, "--out", str(out)]) == 0       # resume
    assert _shards(out) == _shards(reference_run)
    assert json.loads((out / "run.json").read_text())["shards_skipped"] == 1


def test_truncated_shard_is_redone(reference_run, tmp_path):
    out = tmp_path / "trunc"
    shutil.copytree(reference_run, out)
    bad = out / "shards" / "shard-000002.npz"
    bad.write_bytes(bad.read_bytes()[:300])
    assert main(["sample", *TOY, "--out", str(out)]) == 0
    rec = json.loads((out / "run.json").read_text())
    assert (rec["shards_done"], rec["shards_skipped"]) == (1, 3)
    assert _shards(out) == _shards(reference_run)


def test_other_config_in_the_same_folder_is_refused(reference_run, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(reference_run, out)
    args = [a if a != "3" else "2" for a in TOY]                 # --w 2 instead of 3
    assert main(["sample", *args, "--out", str(out)]) == 2


def test_edm2_png_and_labels(tmp_path):
    torch.manual_seed(0)
    net = EDM2Precond(img_resolution=8, img_channels=1, label_dim=3, model_channels=8, channel_mult=[1],
                      num_blocks=1, attn_resolutions=[], use_fp16=False, logvar_channels=8, dropout=0.1).eval()
    ckpt.save(net, tmp_path / "tiny")
    out = tmp_path / "img"
    s = sample_to_folder(MethodSpec(net=str(tmp_path / "tiny"), method="insitu", w=2.0, steps=2), list(range(5)),
                         out, classes="1,2", shard_size=3, png=True, progress=False)
    assert s["done"] == 2
    d = read_shard(out / "shards" / "shard-000000.npz")
    assert d["samples"].shape == (3, 1, 8, 8) and list(d["labels"]) == [1, 2, 1]    # classes[seed % 2]
    from PIL import Image
    png = np.asarray(Image.open(out / "png" / "000001.png"))
    want = np.clip(np.floor(d["samples"][1, 0] * 127.5 + 128), 0, 255).astype(np.uint8)
    assert np.array_equal(png, want)
    with pytest.raises(ValueError, match="--png needs image samples"):
        sample_to_folder(MethodSpec(net="toy-denoiser-main"), [0], tmp_path / "toy", png=True, progress=False)


def test_resume_redoes_every_png_that_is_not_its_shards_image(tmp_path):
    """Issue 21, item 17: a resume redid only missing PNGs of a sound shard; a truncated, corrupt or wrong PNG was
    kept. Now every PNG of a kept shard is decoded and compared with the shard's image; what fails is rewritten
    (atomically), the rest is left untouched, and the shards are not recomputed."""
    from PIL import Image

    from autoguidance.runs.shards import to_uint8

    def png_path(out, s):
        return out / "png" / f"{s:06d}.png"

    def read_png(path):                               # what a reader of the folder gets: [H, W, C], or None
        try:
            with Image.open(path) as im:
                a = np.asarray(im)
        except (OSError, SyntaxError, ValueError):
            return None
        return a[..., None] if a.ndim == 2 else a

    torch.manual_seed(0)
    net = EDM2Precond(img_resolution=8, img_channels=1, label_dim=0, model_channels=8, channel_mult=[1],
                      num_blocks=1, attn_resolutions=[], use_fp16=False, logvar_channels=8).eval()
    ckpt.save(net, tmp_path / "tiny")
    out = tmp_path / "img"
    spec = MethodSpec(net=str(tmp_path / "tiny"), steps=2)
    seeds = list(range(6))
    assert sample_to_folder(spec, seeds, out, shard_size=3, png=True, progress=False)["done"] == 2
    want = {s: to_uint8(read_shard(out / "shards" / f"shard-{s // 3:06d}.npz")["samples"])[s % 3] for s in seeds}
    good = {s: png_path(out, s).read_bytes() for s in seeds}
    png_path(out, 0).write_bytes(good[0][:len(good[0]) // 2])                # truncated
    png_path(out, 1).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))           # not a PNG past its signature
    Image.fromarray(255 - want[3][..., 0], mode="L").save(png_path(out, 3))  # a sound PNG of another image
    Image.fromarray(want[4][..., 0], mode="L").convert("RGB").save(png_path(out, 4))   # the image, other channels
    png_path(out, 5).unlink()                                                 # missing (redone before too)
    for s in (0, 1, 3, 4):
        assert read_png(png_path(out, s)) is None or not np.array_equal(read_png(png_path(out, s)), want[s])
    untouched = os.stat(png_path(out, 2))
    summary = sample_to_folder(spec, seeds, out, shard_size=3, png=True, progress=False)
    assert (summary["done"], summary["skipped"]) == (0, 2)                    # the shards are sound: kept
    for s in seeds:
        assert np.array_equal(read_png(png_path(out, s)), want[s]), s
        assert png_path(out, s).read_bytes() == good[s], s                    # the bytes of the first run
    after = os.stat(png_path(out, 2))
    assert (after.st_ino, after.st_mtime_ns) == (untouched.st_ino, untouched.st_mtime_ns)   # not rewritten
    assert not [p.name for p in (out / "png").iterdir() if p.name.startswith(".")]     # no temporary left


def test_more_seeds_extend_a_run_and_other_seeds_are_refused(reference_run, tmp_path):
    out = tmp_path / "more"
    shutil.copytree(reference_run, out)
    more = [a if a != "0-23" else "0-29" for a in TOY]
    assert main(["sample", *more, "--out", str(out)]) == 0
    rec = json.loads((out / "run.json").read_text())
    assert (rec["seeds"], rec["shards_done"], rec["shards_skipped"]) == ("0-29", 1, 4)
    other = [a if a != "0-23" else "100-123" for a in TOY]
    assert main(["sample", *other, "--out", str(out)]) == 2
