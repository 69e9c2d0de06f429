"""Reference statistics from mu / sigma files (pytorch-fid .npz, EDM2 .pkl) give the FD of the features."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from autoguidance.metrics.frechet import frechet_distance
from autoguidance.metrics.refstats import load_reference, main, read_reference
from autoguidance.metrics.running import RunningStats


@pytest.fixture
def feats():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) + 3.0     # large mean: the one-pass sums' worst
    gen = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16)) + 2.5
    return ref, gen


def _fd(a: RunningStats, b: RunningStats) -> float:
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())


def test_pytorch_fid_npz_gives_the_fd_of_the_features(tmp_path, feats):
    ref, gen = feats
    own = RunningStats(16).update(ref)
    gen_st = RunningStats(16).update(gen)
    path = tmp_path / "fid_stats.npz"                                  # pytorch-fid --save-stats: mu, sigma only
    np.savez(path, mu=ref.mean(0), sigma=np.cov(ref, rowvar=False))
    st, feats_loaded, meta = load_reference(path)                   # what `metrics --ref-stats` calls
    assert feats_loaded is None and meta["n"].startswith("unknown")
    assert abs(_fd(st, gen_st) - _fd(own, gen_st)) <= 1e-10 * _fd(own, gen_st)
    np.testing.assert_allclose(st.cov(), np.cov(ref, rowvar=False), rtol=1e-11, atol=1e-11)


def test_edm2_pickle_picks_the_space_and_converts(tmp_path, capsys):
    rng = np.random.default_rng(1)
    fid, dino = rng.normal(size=(40, 2048)) + 1, rng.normal(size=(40, 1024))    # the real feature widths
    d = {"num_images": 40, "fid": {"mu": fid.mean(0), "sigma": np.cov(fid, rowvar=False)},
         "fd_dinov2": {"mu": dino.mean(0), "sigma": np.cov(dino, rowvar=False)}}
    path = tmp_path / "img512.pkl"
    path.write_bytes(pickle.dumps(d))                                   # as NVlabs/edm2 save_stats writes it
    st, meta = read_reference(path, space="inception")
    assert st.n == 40 and meta["space"] == "inception" and meta["n"] == "40"
    own = RunningStats(2048).update(fid)                                 # the same as statistics of the features
    np.testing.assert_allclose(st.mean(), own.mean(), rtol=1e-12)
    np.testing.assert_allclose(st.cov(), own.cov(), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="--space inception") as e:    # two spaces, none chosen
        load_reference(path)
    assert "\n" not in str(e.value)
    out = tmp_path / "img512-dinov2.npz"
    assert main([str(path), "--space", "dinov2", "--out", str(out)]) == 0
    st2, _, meta2 = load_reference(out)                             # the library's format, read back
    assert meta2["space"] == "dinov2" and st2.n == 40
    np.testing.assert_allclose(st2.mean(), d["fd_dinov2"]["mu"], rtol=1e-12)
    with np.load(out) as z:                                             # documented keys others can read
        assert {"n", "s1", "s2", "mu", "sigma"} <= set(z.files)


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_malicious_reference_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "ref.pkl"
    path.write_bytes(pickle.dumps({"fid": {"mu": _Marker(str(marker)), "sigma": np.eye(2)}}))
    with pytest.raises(ValueError, match="refused unread") as e:
        load_reference(path)
    assert "\n" not in str(e.value) and not marker.exists()


def test_bad_reference_files_give_one_line_errors(tmp_path):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="no 'mu' and 'sigma'") as e:
        load_reference(wrong)
    assert "\n" not in str(e.value)
    dims = tmp_path / "dims.npz"
    np.savez(dims, mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="2048-d") as e:
        read_reference(dims, space="inception")
    assert "\n" not in str(e.value)


def test_split_statistics_merge_to_the_whole(feats):
    ref, _ = feats
    whole = RunningStats(16).update(ref)
    parts = RunningStats(16).update(ref[:123]).merge(RunningStats(16).update(ref[123:]))   # as two ranks would
    assert parts.n == whole.n
    np.testing.assert_allclose(parts.cov(), whole.cov(), rtol=1e-12, atol=1e-12)
