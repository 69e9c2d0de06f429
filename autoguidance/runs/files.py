"""Atomic file output: a reader never sees a half-written file, and an interrupted write loses nothing.

A file is written in a private hidden folder beside it (`.tmp-XXXXXXXX/NAME`, so the name keeps its real suffix
for writers that need it) and renamed into place. A data glob (`*.npz`, `*.png`) of the target folder never
matches it, readers skip hidden entries, and `clean_temp` removes what a killed process left behind."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["file_sha256", "atomic_path", "clean_temp", "is_hidden", "current_umask", "write_json", "write_text", "fill_block", "markdown_body", "link_from"]


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks): the one file hash of the package (checkpoints, the
    Inception weights, a pipeline run's images)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

TEMP_PREFIX = ".tmp-"


@contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temporary path beside `path` (inside a hidden `.tmp-*` folder; the name is `path`'s name, or ends
    with `suffix`); on success it replaces `path` in one rename, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=path.parent))
    tmp = tmp_dir / (path.name if not suffix or path.name.endswith(suffix) else path.name + suffix)
    tmp.touch(0o666 & ~current_umask())   # the permissions open() would give
    os.chmod(tmp, 0o666 & ~current_umask())
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


#: the temporary names of older versions (`.NAME.XXXXXXXX.SUFFIX`, from mkstemp) and of this one (`.tmp-*`)
_OLD_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}(\.[A-Za-z0-9]+)?$")


def is_hidden(path) -> bool:
    """True for names starting with '.': temporary files, locks; never data."""
    return Path(path).name.startswith(".")


def clean_temp(folder) -> int:
    """Remove the temporary files and folders that killed writers left in `folder` (not recursive); returns how
    many. Call it only while holding the folder's lock (`runs.lock`), before anything writes."""
    folder = Path(folder)
    n = 0
    if not folder.is_dir():
        return 0
    for p in folder.iterdir():
        if p.name.startswith(TEMP_PREFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            n += 1
        elif _OLD_TEMP.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


def current_umask() -> int:
    """The process's file-creation mask (read without changing it for longer than two calls)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def fill_block(doc, name: str, text: str) -> None:
    """Replace what stands between `<!-- NAME: start -->` and `<!-- NAME: end -->` in the Markdown file `doc` (the
    generated parts of a hand-written page: docs/guides.md's `sizes` and `study`, docs/fashion.md's `table`, ...)."""
    doc = Path(doc)
    block = re.compile(rf"(<!-- {re.escape(name)}: start -->\n).*?(<!-- {re.escape(name)}: end -->)", re.S)
    src = doc.read_text()
    if not block.search(src):
        raise ValueError(f"{doc} has no block <!-- {name}: start --> ... <!-- {name}: end --> to fill")
    write_text(doc, block.sub(lambda m: m.group(1) + text + m.group(2), src))


def markdown_body(md: str) -> str:
    """A generated Markdown page without its first line (its `# title`), for a block of a page with its own heading."""
    return md.split("\n", 1)[1].lstrip("\n") if "\n" in md else ""


def link_from(doc, target) -> str:
    """The relative link from the page `doc` to the file `target`, with forward slashes."""
    return Path(os.path.relpath(Path(target), Path(doc).parent)).as_posix()
