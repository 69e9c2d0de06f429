"""`autoguidance metrics`: exact float64 statistics that reduce across ranks, saved references, no downloads."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from autoguidance.runs import dist
from autoguidance.cli import main
from autoguidance.metrics.extractors import get_extractor
from autoguidance.metrics.frechet import feature_stats, frechet_distance, frechet_distance_features
from autoguidance.metrics.running import RunningStats
from autoguidance.runs.shards import write_shard

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """A sample folder of 4 shards (2D points near the toy's class A) and the whole set."""
    out = tmp_path_factory.mktemp("m") / "run"
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(120, 2, generator=g) * 0.4 + 0.2).numpy()
    for i in range(4):
        rows = slice(30 * i, 30 * (i + 1))
        write_shard(out / "shards" / f"shard-{i:06d}.npz", x[rows], np.arange(120)[rows], -np.ones(30))
    return out, x


def test_running_stats_merge_equals_whole():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(500, 6, generator=g, dtype=torch.float64) * 3 + 1
    whole = RunningStats(6).update(f)
    parts = RunningStats(6).update(f[:123]).merge(RunningStats(6).update(f[123:400])).merge(
        RunningStats(6).update(f[400:]))
    mu, cov = feature_stats(f)
    for st in (whole, parts):
        assert st.n == 500
        np.testing.assert_allclose(st.mean(), mu, rtol=0, atol=1e-12)
        np.testing.assert_allclose(st.cov(), cov, rtol=0, atol=1e-11)
    ref = torch.randn(300, 6, generator=g, dtype=torch.float64)
    fd = frechet_distance(parts.mean(), parts.cov(), *feature_stats(ref))
    assert abs(fd - frechet_distance_features(ref, f)) < 1e-9


def test_stats_file_round_trip(tmp_path):
    f = torch.randn(40, 3, dtype=torch.float64)
    st = RunningStats(3).update(f)
    st.save(tmp_path / "s.npz", f.numpy(), space="raw")
    back, feats, meta = RunningStats.load(tmp_path / "s.npz")
    assert back.n == 40 and torch.equal(back.s2, st.s2) and meta == {"space": "raw"}
    np.testing.assert_array_equal(feats, f.numpy().astype(np.float32))
    with pytest.raises(FileNotFoundError, match="--ref-stats"):
        RunningStats.load(tmp_path / "missing.npz")


def _metrics(out_dir, *args) -> dict:
    return json.loads((out_dir / "metrics.json").read_text())


def test_two_ranks_on_halves_equal_one_process(samples, tmp_path):
    folder, x = samples
    common = ["metrics", str(folder), "--space", "raw", "--ref", "toy:A", "--ref-n", "400"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    for r in dist.launch_local(2, [*common, "--out", tmp_path / "two"], env=ENV, timeout=240):   # 2 gloo ranks
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert one["n"] == two["n"] == 120
    assert abs(one["fd"] - two["fd"]) < 1e-9
    for k in ("precision", "recall", "density", "coverage"):
        assert one[k] == two[k], k
    # and both equal the direct computation on all samples at once
    from autoguidance.metrics.evaluate import builtin_reference
    ref = builtin_reference("toy:A", 400, 0)
    assert abs(one["fd"] - frechet_distance_features(ref, torch.from_numpy(x))) < 1e-9
    rec = json.loads((tmp_path / "two" / "run.json").read_text())
    assert rec["world_size"] == 2 and rec["command"].startswith("autoguidance metrics")


def test_reference_stats_saved_and_reused(samples, tmp_path):
    folder, _ = samples
    ref_file = tmp_path / "toyA.npz"
    assert main(["metrics", str(folder), "--space", "raw", "--ref", "toy:A", "--ref-n", "300",
                 "--ref-stats", str(ref_file), "--out", str(tmp_path / "a")]) == 0
    assert ref_file.exists()
    assert main(["metrics", str(folder), "--space", "raw", "--ref-stats", str(ref_file),
                 "--out", str(tmp_path / "b")]) == 0
    assert _metrics(tmp_path / "a") == {**_metrics(tmp_path / "b"), "ref": "toy:A"}
    assert main(["metrics", str(folder), "--space", "digits", "--ref-stats", str(ref_file)]) == 2  # wrong space


@pytest.mark.parametrize("space,flag", [("inception", "--inception-weights"), ("dinov2", "--dinov2-weights")])
def test_missing_network_weights_fail_at_once_naming_the_flag(samples, capsys, tmp_path, space, flag):
    folder, _ = samples
    assert main(["metrics", str(folder), "--space", space, "--ref", "digits-test"]) == 2
    err = capsys.readouterr().err
    assert flag in err and "never downloads" in err
    assert main(["metrics", str(folder), "--space", space, flag, str(tmp_path / "nope.pt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_torchscript_feature_network(tmp_path):
    class Mean(torch.nn.Module):               # stands in for a TorchScript Inception: [N, 3, H, W] -> [N, 3]
        def forward(self, x):
            return x.mean((2, 3))

    path = tmp_path / "fake-inception.pt"
    torch.jit.script(Mean()).save(str(path))
    with pytest.raises(ValueError, match="trust-pickle"):        # TorchScript runs code when loaded: opt in
        get_extractor("inception", inception_weights=str(path))
    ex = get_extractor("inception", inception_weights=str(path), trust_pickle=True)
    f = ex(torch.zeros(2, 1, 4, 4))            # grey images in [-1, 1] -> [0, 255] floor, 3 channels
    assert f.dtype == torch.float64 and torch.equal(f, torch.full((2, 3), 128.0, dtype=torch.float64))
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="is not pt_inception-2015-12-05-6726825d.pth: its SHA-256"):
        get_extractor("inception", inception_weights=str(tmp_path / "junk.pt"))


def test_digits_space_on_png_folder_and_labelled_shard(tmp_path):
    from autoguidance.data.digits import load_digits
    from autoguidance.runs.shards import to_uint8, write_png
    test = load_digits("test")
    imgs = test.images[:20]
    for i, im in enumerate(to_uint8(imgs.numpy())):
        write_png(tmp_path / "png" / f"{i:06d}.png", im)
    assert main(["metrics", str(tmp_path), "--space", "digits", "--ref", "digits-test",
                 "--out", str(tmp_path / "eval")]) == 0
    m = _metrics(tmp_path / "eval")
    assert m["n"] == 20 and m["n_ref"] == 500 and m["precision"] > 0.9 and "accuracy" not in m   # PNGs: no labels
    write_shard(tmp_path / "s.npz", imgs.numpy(), np.arange(20), test.classes[:20].numpy())
    assert main(["metrics", str(tmp_path / "s.npz"), "--space", "digits", "--ref", "digits-test",
                 "--out", str(tmp_path / "eval2")]) == 0
    assert _metrics(tmp_path / "eval2")["accuracy"] >= 0.9


def test_corrupt_shard_is_a_clear_error(samples, tmp_path, capsys):
    folder, _ = samples
    bad = tmp_path / "bad.npz"
    bad.write_bytes((folder / "shards" / "shard-000000.npz").read_bytes()[:200])
    assert main(["metrics", str(bad), "--space", "raw", "--ref", "toy:A", "--ref-n", "100"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_a_sample_folder_as_reference(samples, tmp_path):
    folder, _ = samples
    assert main(["metrics", str(folder), "--space", "raw", "--ref", str(folder), "--out", str(tmp_path)]) == 0
    m = _metrics(tmp_path)
    assert abs(m["fd"]) < 1e-9 and m["precision"] == m["recall"] == m["coverage"] == 1.0
