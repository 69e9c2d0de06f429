import json

import numpy as np

from autoguidance.cli import main


def test_demo_quick_run_writes_figure_table_numbers_and_samples(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--n", "64", "--seeds", "0,1", "--steps", "6", "--no-progress",
                 "--methods", "truth,logp/none,logp/autoguidance-w3,denoiser/insitu-p0.1-w3,logp/cfg-w4"])
    assert code == 0
    for f in ("toy_demo.png", "toy_demo.md", "toy_demo.json", "toy_demo_samples.npz"):
        assert (out / f).stat().st_size > 0
    rec = json.loads((out / "toy_demo.json").read_text())
    keys = [r["method"] for r in rec["rows"]]
    assert keys == ["truth", "logp/none", "logp/cfg-w4", "logp/autoguidance-w3", "denoiser/insitu-p0.1-w3"]
    npz = np.load(out / "toy_demo_samples.npz")
    assert sorted(npz.files) == sorted(keys) and npz["truth"].shape == (128, 2)
    table = (out / "toy_demo.md").read_text()
    assert all(f"`{k}`" in table for k in keys)
    assert "`logp/autoguidance-w3`" in capsys.readouterr().out
    # same seeds, same numbers
    main(["demo", "--out", str(tmp_path / "again"), "--n", "64", "--seeds", "0,1", "--steps", "6", "--no-progress",
          "--methods", "logp/autoguidance-w3"])
    again = json.loads((tmp_path / "again" / "toy_demo.json").read_text())
    first = next(r for r in rec["rows"] if r["method"] == "logp/autoguidance-w3")
    assert again["rows"][0]["per_seed"] == first["per_seed"]


def test_demo_rejects_bad_input(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--methods", "logp/magic", "--no-progress"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--n", "3", "--no-progress"]) == 2


def test_models_lists_shipped_checkpoints(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "toy-logp-guide" in out and "made by: autoguidance toy train" in out
