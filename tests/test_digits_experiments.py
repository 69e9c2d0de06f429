"""The digits experiments in quick mode, on tiny stand-in checkpoints (same names as the shipped set)."""
import json
from dataclasses import replace

import pytest
import torch

from autoguidance.checkpoint import save
from autoguidance.experiments.image_tables import DIGITS_WEIGHTS, Lab, Settings, quantize_weights, run_experiment
from autoguidance.nets import DigitsClassifier
from autoguidance.nets.edm2 import EDM2Precond
from autoguidance.train.edm import digits_net_config

NAMES = {"s-T": (10, 0.0), "s-T16": (10, 0.0), "xs-T": (10, 0.0), "xs-T16": (10, 0.0), "xs-uncond-T": (0, 0.0),
         "xs-uncond-T16": (0, 0.0), "s-dropout-T": (10, 0.1), "s-uncond-T": (0, 0.0), "xs-half-T16": (10, 0.0),
         "xs-T32": (10, 0.0), "xs-T8": (10, 0.0), "xs-T4": (10, 0.0), "xs-T2": (10, 0.0)}
TINY = Settings(n=8, num_steps=2, eval_sets=(1, 2), ws=(2.0,), emas=("050",), batch=8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits-weights")
    torch.manual_seed(0)
    for i, (name, (label_dim, dropout)) in enumerate(NAMES.items()):
        for ema in ("050", "150"):
            net = EDM2Precond(**digits_net_config("XXS", label_dim, dropout))
            with torch.no_grad():
                net.unet.out_gain.fill_(0.5 + 0.1 * i)  # a fresh net outputs F = 0: make the nets differ
            save(net, root / f"{name}-ema{ema}", meta={"command": "test"})
    save(DigitsClassifier(), root / "features", meta={"command": "test", "test_accuracy": 0.1})
    return root


def test_table_quick_writes_everything_and_reproduces(weights, tmp_path):
    methods = ["auto"]
    a = run_experiment("table", tmp_path / "a", TINY, weights, methods, progress=False)
    for f in ("digits_table.md", "digits_table.json", "digits_table_sweep.png", "digits_table_samples.png"):
        assert (tmp_path / "a" / f).stat().st_size > 0, f
    keys = [r["key"] for r in a["rows"]]
    assert keys == ["none", "auto"]
    row = next(r for r in a["rows"] if r["key"] == "auto")
    assert set(row["mean"]) >= {"fd", "precision", "recall", "density", "coverage", "accuracy"}
    assert len(row["runs"]) == 2 and row["best"]["guide"].startswith("xs-T16-ema")
    b = run_experiment("table", tmp_path / "b", TINY, weights, methods, progress=False)
    assert json.dumps(a["rows"]) == json.dumps(b["rows"])  # same seeds, same numbers
    assert (tmp_path / "a" / "digits_table.md").read_text() == (tmp_path / "b" / "digits_table.md").read_text()


def test_every_row_builds(weights, tmp_path):
    lab = Lab(replace(TINY, eval_sets=(1,), n=4, num_steps=1), weights, progress=False)
    rows = run_experiment("table", tmp_path, lab.s, lab=lab)["rows"]
    assert len(rows) == 16 and all(r["mean"]["fd"] >= 0 for r in rows)
    keys = [r["key"] for r in rows]
    assert keys[-4:] == ["none-dropout", "insitu-dropout", "uncond-none", "uncond-auto"]
    assert next(r for r in rows if r["key"] == "uncond-auto")["mean"]["accuracy"] is None


def test_degradations_and_failures_quick(weights, tmp_path):
    lab = Lab(replace(TINY, eval_sets=(1,), n=4, num_steps=1), weights, progress=False)
    deg = run_experiment("degradations", tmp_path, lab.s, lab=lab)
    assert [r["group"] for r in deg["rows"]] == ["conditional", "matched", "matched", "mismatched", "mismatched"]
    assert all("good_alone" in r for r in deg["rows"][1:])
    fail = run_experiment("failures", tmp_path, lab.s, lab=lab)
    assert [r["key"] for r in fail["rows"]] == ["auto", "auto-half-data", "auto-quantized", "auto-interval"]
    for stem in ("digits_degradations", "digits_failures"):
        assert (tmp_path / f"{stem}.md").exists() and (tmp_path / f"{stem}.json").exists()


def test_guide_length_study_quick(weights, tmp_path):
    lab = Lab(replace(TINY, eval_sets=(1,), n=4, num_steps=1), weights, progress=False)
    rec = run_experiment("guides", tmp_path, lab.s, lab=lab)
    assert [r["key"] for r in rec["rows"]] == ["none"] + [f"guide:{t}" for t in ("T32", "T16", "T8", "T4", "T2", "T")]
    for r in rec["rows"][1:]:
        snap = r["key"].split(":")[1]
        assert r["best"]["guide"].startswith(f"xs-{snap}-ema")
        assert r["guide_alone"]["params"] == {"main": r["best"]["guide"]} and r["guide_alone"]["mean"]["fd"] >= 0
    md = (tmp_path / "digits_guides.md").read_text()
    assert "guide alone: FD" in md and md.count("autoguidance, XS guide at") == 6
    assert (tmp_path / "digits_guides_sweep.png").stat().st_size > 0


def test_floor_measures_real_images_like_samples(weights, tmp_path):
    """The floor experiment sends real training images through the same metrics, N per held-out seed set (a
    different draw per set, reproducible), all of them once, and repeats the models at a larger N."""
    lab = Lab(replace(TINY, eval_sets=(1, 2), n=4, num_steps=1), weights, progress=False)
    rec = run_experiment("floor", tmp_path, lab.s, lab=lab)
    rows = {r["key"]: r for r in rec["rows"]}
    assert list(rows)[:3] == ["real", "real-all", "none"] and len(rows) == 8
    real = rows["real"]
    assert real["params"] == {"n": 4} and len(real["runs"]) == 2 and real["runs"][0] != real["runs"][1]
    assert rows["real-all"]["params"] == {"n": 1297} and len(rows["real-all"]["runs"]) == 1
    big = [r for r in rec["rows"] if r["group"] == "models, large N"]
    assert len(big) == 3 and all(r["params"]["n"] == 8 and len(r["runs"]) == 2 for r in big)
    again = run_experiment("floor", tmp_path / "again", lab.s, weights=weights, progress=False)
    assert json.dumps(again["rows"]) == json.dumps(rec["rows"])


def test_paired_delta_and_render(tmp_path, weights):
    from autoguidance.cli.image_tables import render
    from autoguidance.experiments.image_tables_report import paired_delta

    a = {"runs": [{"fd": 10.0}, {"fd": 14.0}, {"fd": 12.0}]}
    b = {"runs": [{"fd": 11.0}, {"fd": 15.5}, {"fd": 12.5}]}
    mean, std = paired_delta(a, b)
    assert mean == pytest.approx(-1.0) and std == pytest.approx(0.5)
    assert paired_delta(a, {"runs": []}) is None
    run_experiment("table", tmp_path, replace(TINY, eval_sets=(1,), n=4, num_steps=1), weights, ["auto"], progress=False)
    before = (tmp_path / "digits_table.md").read_text()
    (tmp_path / "digits_table.md").write_text("stale")
    assert render(tmp_path) == ["digits_table"]
    assert (tmp_path / "digits_table.md").read_text() == before and "dFD" in before


def test_quantize_weights_leaves_original():
    torch.manual_seed(0)
    net = EDM2Precond(**digits_net_config("XXS")).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    q = quantize_weights(net, bits=3)
    w = q.unet.out_conv.weight
    assert len(torch.unique(w[0] / w[0].abs().max())) <= 7
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_missing_checkpoint_says_how_to_fix(tmp_path, weights):
    lab = Lab(TINY, weights, progress=False)
    with pytest.raises(FileNotFoundError, match="train_digits_checkpoints.sh"):
        lab.net("nope-T-ema050")


@pytest.mark.skipif(not (DIGITS_WEIGHTS / "s-T-ema050" / "config.json").exists(),
                    reason="shipped digits checkpoints not present (scripts/train_digits_checkpoints.sh)")
def test_quick_mode_on_shipped_checkpoints(tmp_path):
    s = replace(TINY, n=10, num_steps=2, eval_sets=(1,))
    rec = run_experiment("table", tmp_path, s, methods=["auto"], progress=False)
    assert [r["key"] for r in rec["rows"]] == ["none", "auto"]
    assert rec["training_costs"]["xs-T16"]["percent_of_main_flops"] < 5
