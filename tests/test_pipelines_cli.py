"""`autoguidance pipe` on tiny pipelines saved by the test (SD, SD3 without T5, Flux; nothing downloaded), and the
command's items of issue 21 (skip layers, negative prompts, prompt files, one-line errors, quiet loading)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from autoguidance.adapters import tiny  # noqa: E402
from autoguidance.cli import main  # noqa: E402
from test_pipelines import sd_pipe  # noqa: E402


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdpipe")
    sd_pipe(tmp).save_pretrained(tmp / "pipe")
    return tmp / "pipe"


def test_pipe_writes_pngs_grid_and_record_and_resumes(sd_folder, tmp_path):
    out = tmp_path / "out"
    argv = ["pipe", str(sd_folder), "--prompt", "a cat", "--method", "insitu", "--w", "3", "--seeds", "0-2",
            "--guidance-scale", "3", "--steps", "2", "--batch", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    pngs = sorted(p.name for p in (out / "png").glob("*.png"))
    assert pngs == ["000000.png", "000001.png", "000002.png"] and (out / "grid.png").exists()
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "complete" and rec["images_made"] == 3 and rec["seeds"] == "0-2"
    first = {p: (out / "png" / p).read_bytes() for p in pngs}
    (out / "png" / "000001.png").unlink()                     # a lost image is made again, the others kept
    assert main(argv + []) == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["images_made"] == 1 and rec["images_skipped"] == 2
    assert {p: (out / "png" / p).read_bytes() for p in pngs} == first   # same seed, same image, any batch
    bad = argv[:]
    bad[bad.index("3")] = "2"                                  # another w on the same folder: refused
    assert main(bad) == 2


def test_pipe_resume_remakes_pngs_that_do_not_decode_to_their_image(sd_folder, tmp_path):
    """As `autoguidance sample`'s resume: a kept PNG must decode to the image recorded for its seed. A truncated PNG
    and another seed's image are made again even where images.json's file hash was rewritten to match them (the
    file hash alone kept both before)."""
    import hashlib

    out = tmp_path / "out"
    argv = ["pipe", str(sd_folder), "--prompt", "a cat", "--seeds", "0-2", "--steps", "2", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    png = {s: out / "png" / f"{s:06d}.png" for s in range(3)}
    first = {s: p.read_bytes() for s, p in png.items()}
    assert first[0] != first[1]
    png[0].write_bytes(first[0][: len(first[0]) // 2])                  # truncated
    png[1].write_bytes(first[2])                                        # a sound PNG of another image
    index = json.loads((out / "images.json").read_text())
    for s in (0, 1):
        index[str(s)]["sha256"] = hashlib.sha256(png[s].read_bytes()).hexdigest()
    (out / "images.json").write_text(json.dumps(index))
    assert main(argv) == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["images_made"] == 2 and rec["images_skipped"] == 1
    assert {s: p.read_bytes() for s, p in png.items()} == first


def test_pipe_refuses_a_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "junk").mkdir()
    proc = subprocess.run([sys.executable, "-m", "autoguidance.cli", "pipe", str(tmp_path / "junk"), "--prompt", "x",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a diffusers pipeline" in lines[0] and "save_pretrained" in lines[0]
    assert "Traceback" not in proc.stderr


# -- issue 21, item 10 ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipes")
    for kind in ("sd3", "flux"):
        tiny.build(kind, tmp).save_pretrained(tmp / kind)
    return tmp


def _pngs(out):
    from PIL import Image

    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted((out / "png").glob("*.png"))}


def _one_error_line(capsys, argv, *words):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("autoguidance: error:")]
    assert len(lines) == 1 and "Traceback" not in err and all(w in lines[0] for w in words), err
    return err


def test_pipe_skiplayers_on_an_sd3_folder_saved_without_t5(folders, tmp_path):
    base = ["pipe", str(folders / "sd3"), "--prompt", "a cat", "--seeds", "0-1", "--steps", "2", "--guidance-scale",
            "3", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "none")]) == 0               # SD3 without T5 loads
    assert main(base + ["--method", "perturbation", "--perturbation", "skiplayers", "--layers", "1", "--w", "2",
                        "--out", str(tmp_path / "slg")]) == 0
    a, b = _pngs(tmp_path / "none"), _pngs(tmp_path / "slg")
    assert a.keys() == b.keys() and any(abs(a[k] - b[k]).max() > 0 for k in a)
    rec = json.loads((tmp_path / "slg" / "run.json").read_text())
    assert rec["config"]["perturbation"] == "skiplayers" and rec["config"]["layers"] == [1]


def test_pipe_negative_prompt_prompt_file_and_the_scale_used(sd_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\ndog\n")
    base = ["pipe", str(sd_folder), "--prompts", str(prompts), "--seeds", "0-2", "--steps", "2", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--negative-prompt", "dark", "--out", str(tmp_path / "b")]) == 0
    rec = json.loads((tmp_path / "a" / "run.json").read_text())
    assert rec["config"]["prompts"] == ["a cat", "dog"] and rec["config"]["guidance_scale"] == 7.5  # SD's default
    a, b = _pngs(tmp_path / "a"), _pngs(tmp_path / "b")
    assert any(abs(a[k] - b[k]).max() > 0 for k in a)                         # the negative prompt acts
    pipe = tiny.build("sd", tmp_path)                                          # seed 1 gets prompt 1 % 2
    with torch.no_grad():
        img = pipe(["dog"], num_inference_steps=2, guidance_scale=7.5, output_type="np",
                   generator=[torch.Generator().manual_seed(1)]).images[0]
    assert abs(np.round(img * 255).astype(int) - a["000001.png"]).max() <= 1


def test_pipe_negative_prompt_acts_on_flux(folders, tmp_path, capsys):
    base = ["pipe", str(folders / "flux"), "--prompt", "a cat", "--seeds", "0-1", "--steps", "2", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--negative-prompt", "dark", "--true-cfg-scale", "3", "--out", str(tmp_path / "b")]) == 0
    a, b = _pngs(tmp_path / "a"), _pngs(tmp_path / "b")
    assert any(abs(a[k] - b[k]).max() > 0 for k in a)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["config"]["true_cfg_scale"] == 3.0
    _one_error_line(capsys, base + ["--negative-prompt", "dark", "--out", str(tmp_path / "c")], "--true-cfg-scale")


def test_pipe_bad_steps_and_seeds_are_one_line(sd_folder, tmp_path, capsys):
    base = ["pipe", str(sd_folder), "--prompt", "a cat", "--no-progress", "--out", str(tmp_path / "o")]
    _one_error_line(capsys, base + ["--steps", "0"], "--steps")
    _one_error_line(capsys, base + ["--seeds", "-1"], "--seeds", ">= 0")


def test_pipe_no_progress_silences_loading_and_errors_start_their_own_line(sd_folder, tmp_path, capsys):
    base = ["pipe", str(sd_folder), "--prompt", "a cat", "--seeds", "0", "--steps", "1"]
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "bars")]) == 0
    assert "Loading pipeline components" in capsys.readouterr().err          # the bars this flag must silence
    assert main(base + ["--no-progress", "--out", str(tmp_path / "quiet")]) == 0
    assert capsys.readouterr().err.strip() == ""
    # method cfg without the pipeline's CFG is refused at the first model call, after the bar is drawn: the error
    # starts its own line
    err = _one_error_line(capsys, base + ["--method", "cfg", "--guidance-scale", "1", "--out", str(tmp_path / "h")],
                          "guidance_scale > 1")
    assert "0/1" in err and "\nautoguidance: error:" in err
    # that run made no image, so it does not hold the folder against the corrected rerun
    assert main(base + ["--method", "cfg", "--guidance-scale", "3", "--no-progress", "--out", str(tmp_path / "h")]) == 0
