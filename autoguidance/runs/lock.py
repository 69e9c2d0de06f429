"""One run per output folder: `OUT/.lock`, held (fcntl.flock, non-blocking) while a run writes to the folder.

    with lock_folder(out, command="autoguidance sample ..."):   # raises FolderLocked naming the holder
        ...

The lock file records the holder's pid and command; the kernel releases the lock when the holder exits, also
when it is killed, so a stale file never blocks a later run. Under torchrun only rank 0 takes the lock (`dist`
spreads the refusal to every rank, see `lock_run`)."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

__all__ = ["FolderLocked", "lock_folder", "lock_run", "LOCK_NAME"]

LOCK_NAME = ".lock"


class FolderLocked(ValueError):
    """Another run holds the output folder."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip().splitlines()
    except OSError:
        return "another process"
    pid = text[0] if text else "?"
    cmd = text[1] if len(text) > 1 else "?"
    return f"pid {pid} ({cmd})"


@contextmanager
def lock_folder(out, command: Optional[str] = None) -> Iterator[Path]:
    """Hold `out/.lock` for the block; raise `FolderLocked` at once if another process holds it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder: give a folder path")
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderLocked(f"{out} is in use by another run, {_holder(path)}: wait for it to finish, or use "
                               "another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{command or '?'}\n".encode())
        try:
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def lock_run(out, command: Optional[str] = None) -> Iterator[None]:
    """`lock_folder` for a possibly distributed run: rank 0 takes the lock, every rank learns whether it got it
    (so all ranks of a refused run stop with the same error instead of waiting for each other)."""
    import torch

    from . import dist

    if dist.world_size() == 1:
        with lock_folder(out, command):
            yield
        return
    error: Optional[BaseException] = None
    with _maybe_lock(out, command, dist.is_main()) as err:
        error = err
        failed = dist.all_reduce_sum(torch.tensor([1.0 if err is not None else 0.0], dtype=torch.float64))
        if float(failed[0]) > 0:
            if error is not None:
                raise error
            raise FolderLocked(f"{out} is in use by another run (rank 0 could not lock it): use another --out")
        yield


@contextmanager
def _maybe_lock(out, command, take: bool):
    if not take:
        yield None
        return
    try:
        cm = lock_folder(out, command)
        cm.__enter__()
    except (FolderLocked, OSError) as e:
        yield e
        return
    try:
        yield None
    finally:
        cm.__exit__(None, None, None)
