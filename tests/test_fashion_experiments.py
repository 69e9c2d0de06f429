"""The image tables on Fashion-MNIST (28x28) in quick mode, on tiny stand-in checkpoints and a tiny stand-in image set:
three feature spaces (classifier, self-supervised encoder, pixels), matched-N precision/recall, the verdict and
head-to-head columns, the precision-recall figure. The shipped checkpoints run in CI where the images are installed."""
import json
from dataclasses import replace

import pytest
import torch

from helpers import save_tiny_image_set_weights

from autoguidance.checkpoint import save
from autoguidance.cli import main
from autoguidance.data.digits import Digits
from autoguidance.data.fashion import fashion_dir
from autoguidance.experiments.image_sets import FASHION28
from autoguidance.experiments.image_tables import Lab, Settings, run_experiment
from autoguidance.nets import ContrastiveEncoder

NAMES = {"s-T": (10, 0.0), "xs-T16": (10, 0.0), "xs-uncond-T": (0, 0.0)}
TINY = Settings(n=6, num_steps=2, eval_sets=(1, 2), ws=(1.5, 2.0), emas=("050",), batch=6)


def _split(n, seed):
    g = torch.Generator().manual_seed(seed)
    classes = torch.arange(n) % 10
    images = torch.rand(n, 1, 28, 28, generator=g) * 2 - 1
    return Digits(f"tiny-{seed}", images, torch.nn.functional.one_hot(classes, 10).float(), classes, None)


def _tiny_load(split, subset="all"):
    return _split(40, 1) if split == "train" else _split(20, 2)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = save_tiny_image_set_weights(tmp_path_factory.mktemp("fashion-weights"), "fashion28", NAMES, emas=("050",),
                                       features_resolution=28)
    save(ContrastiveEncoder(channels=8), root / "encoder", meta={"command": "test"})
    return root


TINY_SET = replace(FASHION28, load=_tiny_load)


def test_fashion_table_is_judged_in_three_spaces(weights, tmp_path):
    lab = Lab(TINY, weights, progress=False, data=TINY_SET)
    assert [p for p, *_ in lab.spaces] == ["ssl", "pix"]
    assert lab.prdc_idx is not None and len(lab.prdc_idx) == 6          # precision/recall against 6 test images
    rec = run_experiment("table", tmp_path, TINY, weights, ["auto", "cfg"], progress=False, lab=lab)
    assert [r["key"] for r in rec["rows"]] == ["none", "cfg", "auto"]
    run = rec["rows"][2]["runs"][0]
    for k in ("fd", "precision", "recall", "ssl_fd", "ssl_precision", "ssl_recall", "pix_fd", "pix_recall"):
        assert run[k] is not None and run[k] >= 0, k
    md = (tmp_path / "fashion_table.md").read_text()
    assert "FD_cls" in md and "dFD ssl" in md and "recall pixels" in md and "verdict (cls, ssl)" in md
    assert "Head to head at matched seeds" in md and "autoguidance (XS, T/16) - CFG (uncond. XS at T)" in md
    for f in ("fashion_table.json", "fashion_table_sweep.png", "fashion_table_samples.png", "fashion_table_pr.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    # `autoguidance fashion render --doc PAGE` fills the page's generated blocks from the records, nothing else
    page = tmp_path / "page.md"
    page.write_text("# mine\n<!-- verdicts: start -->\nold\n<!-- verdicts: end -->\ntext\n"
                    "<!-- table: start -->\nold\n<!-- table: end -->\n<!-- other: start -->\nkept\n<!-- other: end -->\n")
    assert main(["fashion", "render", "--out", str(tmp_path), "--doc", str(page)]) == 0
    filled = page.read_text()
    assert filled.startswith("# mine\n") and "text\n" in filled and "kept" in filled and "old" not in filled
    assert "- **autoguidance (XS, T/16)** against **CFG (uncond. XS at T)**: " in filled
    assert "FD_cls " in filled and "FD_ssl " in filled and "FD_pixels " in filled
    assert "| method | best params | FD_cls |" in filled and "](fashion_table.md)" in filled


def test_the_verdict_needs_both_feature_spaces():
    from autoguidance.experiments.image_tables_report import verdict

    def res(fd, ssl):
        return {"runs": [{"fd": a, "ssl_fd": b} for a, b in zip(fd, ssl)]}
    ref = res([10, 10, 10], [1, 1, 1])
    assert verdict(res([8, 8.5, 7.5], [0.5, 0.6, 0.4]), ref) == "better (both)"
    assert verdict(res([8, 8.5, 7.5], [1.5, 1.1, 1.2]), ref) == "cls better, ssl worse"
    assert verdict(res([8, 12, 10], [1.0, 1.0, 1.0]), ref) == "tie (both)"


def test_fashion_settings_and_rows_of_the_full_mode():
    from autoguidance.cli import build_parser

    args = build_parser().parse_args(["fashion", "table", "--out", "x"])
    from autoguidance.cli.image_tables import _settings
    s = _settings(args)
    assert (s.n, s.batch, s.guide_emas, s.emas, s.ws) == (500, 100, ("150",), ("050", "150"), (1.1, 1.25, 1.5, 2.0))
    assert "uncond" not in FASHION28.table_rows
    a = build_parser().parse_args(["fashion", "all"])
    assert a.only == "table,guides,floor"


def test_missing_encoder_names_its_command(weights, tmp_path):
    import shutil

    other = tmp_path / "w"
    shutil.copytree(weights, other)
    shutil.rmtree(other / "encoder")
    with pytest.raises(FileNotFoundError, match="autoguidance fashion encoder"):
        Lab(TINY, other, progress=False, data=TINY_SET)


_SHIPPED = FASHION28.weights / "s-T-ema050" / "config.json"


@pytest.mark.skipif(not (fashion_dir() / "train-images-idx3-ubyte.gz").exists() or not _SHIPPED.exists(),
                    reason="needs Debian's dataset-fashion-mnist (installed by .ci/run where apt is available)")
def test_fashion_all_quick_runs_on_the_shipped_checkpoints(tmp_path):
    """`autoguidance fashion all --quick` (docs/fashion.md's regeneration command in CI mode)."""
    out = tmp_path / "q"
    assert main(["fashion", "all", "--quick", "--n", "10", "--steps", "1", "--out", str(out), "--quiet",
                 "--no-store"]) == 0
    for name in ("table", "guides", "floor"):
        assert (out / f"fashion_{name}.md").read_text().startswith("# "), name
    rows = {r["key"] for r in json.loads((out / "fashion_table.json").read_text())["rows"]}
    assert {"cfg", "cfg-interval", "auto", "auto-S-T16", "auto-XS-T", "insitu", "tpg", "cfg+auto"} <= rows
    assert "uncond-auto" not in rows and "insitu-dropout" not in rows     # the dropout-trained S is not shipped


def test_rule_rows_and_the_made_guide_row(weights, tmp_path):
    import shutil

    from autoguidance.experiments.image_tables import _b_auto, _b_ruled

    s = replace(TINY, eval_sets=(1,), ws=(2.0,), guide_emas=("150",))
    data = replace(TINY_SET, table_rules=(("auto", "rescale", {"phi": 0.7}, "autoguidance (XS, T/16)"),))
    w = tmp_path / "w"
    shutil.copytree(weights, w)
    shutil.copytree(weights / "xs-T16-ema050", w / "xs-T16-ema150")      # the rule row's guide at that EMA
    # a made guide's folder: its EMA 0.05 in the folder, 0.15 in a subfolder (here both the XS guide's weights)
    shutil.copytree(weights / "xs-T16-ema050", w / "made-guide")
    shutil.copytree(weights / "xs-T16-ema050", w / "made-guide" / "ema150")
    (w / "made-guide" / "guide.json").write_text(json.dumps({
        "format": "autoguidance-guide", "recipe": "distill", "budget": {"spent_fraction_of_main": 0.03},
        "emas": {"0.05": ".", "0.15": "ema150"}, "ema": 0.05}))
    lab = Lab(s, w, progress=False, data=data)
    rec = run_experiment("table", tmp_path / "o", s, methods=["rules", "made-guide"], lab=lab)
    rows = {r["key"]: r for r in rec["rows"]}
    assert set(rows) == {"none", "auto+rescale", "made-guide"}
    assert rows["auto+rescale"]["best"]["rule"] == "rescale" and "rescale" in rows["auto+rescale"]["label"]
    assert rows["made-guide"]["label"].startswith("autoguidance by a made guide (distill, 3.0%")
    assert rows["made-guide"]["best"]["guide"] == "made-guide/ema150"      # the settings' guide EMA, not the folder's
    # the made guide here is the XS guide itself: the same evaluation as the autoguidance row would give
    same = lab.evaluate("x", _b_auto, {"main": "s-T-ema050", "guide": "xs-T16-ema050", "w": 2.0}, 1)
    assert same["fd"] == pytest.approx(rows["made-guide"]["runs"][0]["fd"], rel=1e-5)
    assert _b_ruled.__qualname__ == "_b_ruled"            # stored evaluations are keyed by the builder's name


def test_tuning_goes_on_along_w_while_the_best_is_at_the_grids_edge():
    """`Settings.ws_extend`: a method whose best w is the largest of the grid is tried at the next w values (at its
    other best parameters) until its best lies inside; a best inside the grid tries none."""
    def lab_with(fd_of_w, ws_extend):
        lab = Lab.__new__(Lab)
        lab.s = replace(TINY, ws_extend=ws_extend)
        seen = []

        def evaluate(key, build, params, seed_set, conditional=True):
            seen.append((params["w"], params["guide"], seed_set))
            return {"fd": fd_of_w(params["w"]) + (0.5 if params["guide"] == "b" else 0.0)}
        lab.evaluate = evaluate
        lab.heldout = lambda key, build, params, conditional=True: {"params": params}
        return lab, seen

    grid = [{"w": w, "guide": g} for g in ("a", "b") for w in (1.5, 2.0)]
    lab, seen = lab_with(lambda w: abs(w - 4.0), (3.0, 4.0, 6.0))      # the true best w is 4
    res = lab.tune("cfg", None, grid)
    assert res["best"] == {"w": 4.0, "guide": "a"}
    assert [p for p, *_ in seen] == [1.5, 2.0, 1.5, 2.0, 3.0, 4.0, 6.0]           # 6 shows that 4 is inside
    assert [r["params"]["w"] for r in res["sweep"]][-3:] == [3.0, 4.0, 6.0]
    lab, seen = lab_with(lambda w: abs(w - 1.5), (3.0, 4.0, 6.0))      # best inside the grid: nothing more
    assert lab.tune("cfg", None, grid)["best"]["w"] == 1.5 and len(seen) == 4
    lab, seen = lab_with(lambda w: -w, ())                             # no extension asked: the grid only
    assert lab.tune("cfg", None, grid)["best"]["w"] == 2.0 and len(seen) == 4
