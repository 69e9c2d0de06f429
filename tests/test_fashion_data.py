"""Fashion-MNIST's idx reader and loader, on tiny stand-in idx files written here (CI need not install Debian's
dataset-fashion-mnist); the real files are checked too where the package is installed."""
import gzip
import struct

import numpy as np
import pytest
import torch

from autoguidance.data.fashion import FASHION_ENV, fashion_dir, load_fashion, read_idx


def write_idx(path, array: np.ndarray, compress=True):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "i" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def stand_in(folder, n_train=60000, n_test=10000, compress=True):
    """Four idx files of the official shapes; pixel (0, 0) of image i holds i % 256, label i % 10."""
    ext = ".gz" if compress else ""
    for stem, n in (("train", n_train), ("t10k", n_test)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) % 256
        images[:, 27, 27] = 255
        write_idx(folder / f"{stem}-images-idx3-ubyte{ext}", images, compress)
        write_idx(folder / f"{stem}-labels-idx1-ubyte{ext}", np.arange(n) % 10, compress)


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    stand_in(tmp_path)
    monkeypatch.setenv(FASHION_ENV, str(tmp_path))
    return tmp_path


def test_reads_the_official_split_in_file_order(fake_fashion):
    assert fashion_dir() == fake_fashion
    d = load_fashion("train")
    assert d.images.shape == (60000, 1, 28, 28) and d.images.dtype == torch.float32
    assert d.labels.shape == (60000, 10) and torch.equal(d.labels.argmax(1), d.classes)
    assert float(d.images.min()) == -1.0 and float(d.images.max()) == 1.0
    # pixel / 255 * 2 - 1, in file order
    expected = torch.from_numpy((np.arange(60000) % 256).astype(np.float32) / 255 * 2 - 1)
    assert torch.allclose(d.images[:, 0, 0, 0], expected, atol=1e-6)
    assert d.classes[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    t = load_fashion("test")
    assert len(t) == 10000 and torch.bincount(t.classes).tolist() == [1000] * 10


def test_half_subset_is_stratified(fake_fashion):
    half = load_fashion("train", subset="half")
    assert len(half) == 30000 and torch.bincount(half.classes).tolist() == [3000] * 10


def test_plain_idx_files_are_read_too(tmp_path, monkeypatch):
    stand_in(tmp_path, compress=False)
    monkeypatch.setenv(FASHION_ENV, str(tmp_path))
    assert len(load_fashion("test")) == 10000


def test_missing_files_name_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion("train")


def test_damaged_files_are_refused_with_the_reason(tmp_path, monkeypatch):
    stand_in(tmp_path, n_train=60000, n_test=10)       # the test split has the wrong number of images
    monkeypatch.setenv(FASHION_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=r"expected \(10000, 28, 28\)"):
        load_fashion("test")
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x0d\x03" + b"\x00" * 20)      # float idx, not unsigned bytes
    with pytest.raises(ValueError, match="not an idx file of unsigned bytes"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">i", 100) + b"\x01" * 10)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(short)


@pytest.mark.parametrize("kwargs, message", [
    (dict(split="val"), "split must be 'train' or 'test'"),
    (dict(subset="quarter"), "subset must be 'all' or 'half'"),
])
def test_bad_arguments_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_fashion(**kwargs)


@pytest.mark.skipif(not (fashion_dir() / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_the_real_files_when_installed():
    d = load_fashion("test")
    assert torch.bincount(d.classes).tolist() == [1000] * 10
    assert 0.2 < float((d.images > -1).float().mean()) < 0.8      # clothes, not blank images
