"""The files a sampling run writes: NPZ shards of samples (deterministic bytes, verified on read) and PNGs.

    shards/shard-000000.npz   `samples [n, *shape]` float32, `seeds [n]` int64, `labels [n]` int64 (-1: none),
                              `sha256` (of the three members' bytes), `identity` (digest of everything that
                              determined the samples: method, nets, sampler, seeds, classes, shape); one block
                              of consecutive seeds
    png/000123.png            one image per seed (image-shaped samples only; [-1, 1] -> [0, 255])
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from .files import atomic_path

__all__ = ["ShardError", "shard_path", "shard_identity", "read_identity", "write_shard", "read_shard", "verify_shard", "to_uint8", "write_png",
           "export_png", "png_path", "read_png", "pngs_to_redo", "pixels_digest", "png_holds"]

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_MEMBERS = ("samples", "seeds", "labels")


class ShardError(ValueError):
    """A shard file is missing, truncated, corrupt, or holds other seeds than expected."""


def shard_path(out: Path, index: int) -> Path:
    return Path(out) / "shards" / f"shard-{index:06d}.npz"




def shard_identity(run_identity: str, seeds: Sequence[int], labels: np.ndarray, shape: Sequence[int]) -> str:
    """The identity of one shard: sha256 over the run's identity, the shard's seeds, labels and sample shape."""
    text = json.dumps({"run": run_identity, "seeds": [int(s) for s in seeds],
                       "labels": [int(v) for v in np.asarray(labels).reshape(-1)], "shape": [int(v) for v in shape]},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_identity(path) -> str | None:
    """The `identity` member of a shard (None: absent, as in shards of older versions, or unreadable)."""
    try:
        with zipfile.ZipFile(path) as zf:
            if "identity.npy" not in zf.namelist():
                return None
            return str(np.load(io.BytesIO(zf.read("identity.npy")), allow_pickle=False).reshape(-1)[0])
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error, ValueError, IndexError):
        return None


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _zip_member(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    info.create_system = 3
    zf.writestr(info, data)


def write_shard(path, samples: np.ndarray, seeds: np.ndarray, labels: np.ndarray,
                identity: str | None = None) -> Path:
    """Write an NPZ shard atomically and deterministically (same arrays -> same bytes): members `samples`,
    `seeds`, `labels` and `sha256` (hex digest of the three members' .npy bytes, in that order), and `identity`
    when given (`shard_identity`)."""
    blobs = {"samples": _npy_bytes(np.asarray(samples, dtype=np.float32)),
             "seeds": _npy_bytes(np.asarray(seeds, dtype=np.int64)),
             "labels": _npy_bytes(np.asarray(labels, dtype=np.int64))}
    digest = hashlib.sha256(b"".join(blobs[k] for k in _MEMBERS)).hexdigest()
    blobs["sha256"] = _npy_bytes(np.array(digest))
    names = [*_MEMBERS, "sha256"]
    if identity is not None:
        blobs["identity"] = _npy_bytes(np.array(str(identity)))
        names.append("identity")
    path = Path(path)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for name in names:
                _zip_member(zf, f"{name}.npy", blobs[name])
    return path


def read_shard(path) -> dict[str, np.ndarray]:
    """`{'samples', 'seeds', 'labels'}` of a shard, verified: every member's CRC, the sha256 over the members,
    and consistent lengths. Raises `ShardError` saying what is wrong (delete the file or rerun `sample`)."""
    path = Path(path)
    if not path.exists():
        raise ShardError(f"{path}: no such shard")
    try:
        with zipfile.ZipFile(path) as zf:
            raw = {n: zf.read(f"{n}.npy") for n in (*_MEMBERS, "sha256")}   # read() checks each CRC-32
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error) as e:
        raise ShardError(f"{path} is truncated or corrupt ({e}); rerun `autoguidance sample` on its folder to "
                         "redo it") from e
    try:
        arrays = {n: np.load(io.BytesIO(raw[n]), allow_pickle=False) for n in raw}
    except ValueError as e:
        raise ShardError(f"{path} holds an unreadable array ({e}); rerun sample to redo it") from e
    if str(arrays["sha256"].reshape(-1)[0]) != hashlib.sha256(b"".join(raw[n] for n in _MEMBERS)).hexdigest():
        raise ShardError(f"{path}: sha256 mismatch, the shard is corrupt; rerun sample to redo it")
    n = len(arrays["seeds"])
    if len(arrays["samples"]) != n or len(arrays["labels"]) != n:
        raise ShardError(f"{path}: {len(arrays['samples'])} samples, {n} seeds, {len(arrays['labels'])} labels")
    return {k: arrays[k] for k in _MEMBERS}


def verify_shard(path, seeds: Sequence[int], labels: np.ndarray, shape: Sequence[int],
                 identity: str | None = None) -> bool:
    """True if `path` is a sound shard of exactly these seeds, labels and sample shape (and, if `identity` is
    given, made by a run of that identity: a shard without one, or with another, is not reused)."""
    try:
        d = read_shard(path)
    except ShardError:
        return False
    if identity is not None and read_identity(path) != identity:
        return False
    return (np.array_equal(d["seeds"], np.asarray(seeds, dtype=np.int64)) and np.array_equal(d["labels"], labels)
            and list(d["samples"].shape[1:]) == list(shape))


# -- PNG ------------------------------------------------------------------------------------------------------------

def to_uint8(samples: np.ndarray) -> np.ndarray:
    """`[N, C, H, W]` in [-1, 1] -> `[N, H, W, C]` uint8, `floor(x * 127.5 + 128)` clamped to [0, 255] (as EDM2)."""
    x = np.asarray(samples, dtype=np.float32)
    return np.clip(np.floor(x * 127.5 + 128.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def write_png(path, img: np.ndarray) -> None:
    """An 8-bit PNG (grayscale `[H, W, 1]` or RGB `[H, W, 3]` uint8) written atomically with Pillow; the same image
    gives the same bytes (no metadata)."""
    from PIL import Image

    h, w, c = img.shape
    if c not in (1, 3) or img.dtype != np.uint8:
        raise ValueError(f"PNG export takes uint8 images with 1 or 3 channels, got {img.dtype} with {c} channels")
    pil = Image.fromarray(img[..., 0] if c == 1 else img, mode="L" if c == 1 else "RGB")
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG", optimize=False, compress_level=9)


def export_png(out: Path, samples: np.ndarray, seeds: Sequence[int]) -> None:
    """`out/png/SEED.png` for each sample (each written atomically)."""
    for img, s in zip(to_uint8(samples), seeds):
        write_png(png_path(out, s), img)


def png_path(out: Path, seed: int) -> Path:
    return Path(out) / "png" / f"{int(seed):06d}.png"


def read_png(path) -> np.ndarray | None:
    """A PNG written by `write_png` as `[H, W, C]` uint8 (C = 1 for grayscale), or None where it is missing, does
    not decode (truncated, corrupt), or is not 8-bit grayscale / RGB."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "PNG" or im.mode not in ("L", "RGB"):
                return None
            im.load()                                    # decodes every byte: a truncated file raises here
            a = np.asarray(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return a[..., None] if a.ndim == 2 else a


def pixels_digest(img: np.ndarray) -> str:
    """sha256 of an image's pixels (`[H, W, C]` uint8, with its shape): what a PNG of it decodes to, whatever its
    encoding."""
    a = np.ascontiguousarray(img, dtype=np.uint8)
    return hashlib.sha256(json.dumps(list(a.shape)).encode() + a.tobytes()).hexdigest()


def png_holds(path, digest: str) -> bool:
    """Whether the PNG at `path` decodes (`read_png`) to the image of pixel digest `digest` (`pixels_digest`):
    False where it is missing, truncated, corrupt, or another image."""
    got = read_png(path)
    return got is not None and pixels_digest(got) == digest


def pngs_to_redo(out: Path, samples: np.ndarray, seeds: Sequence[int]) -> list[int]:
    """Indices `i` of `seeds` whose PNG is missing, does not decode, or is not exactly the image of `samples[i]`
    (`to_uint8`): what a resumed run must write again."""
    imgs = to_uint8(samples)
    redo = []
    for i, s in enumerate(seeds):
        got = read_png(png_path(out, s))
        if got is None or got.shape != imgs[i].shape or not np.array_equal(got, imgs[i]):
            redo.append(i)
    return redo
