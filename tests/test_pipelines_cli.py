"""`autoguidance pipe` on a tiny Stable-Diffusion-like pipeline saved by the test (nothing downloaded)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

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


def test_pipe_refuses_a_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "junk").mkdir()
    proc = subprocess.run([sys.executable, "-m", "autoguidance.cli", "pipe", str(tmp_path / "junk"), "--prompt", "x",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a diffusers pipeline" in lines[0] and "save_pretrained" in lines[0]
    assert "Traceback" not in proc.stderr
