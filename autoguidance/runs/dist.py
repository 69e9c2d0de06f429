"""Distributed execution on `torch.distributed`, launched with `torchrun`; one process without it.

    torchrun --nproc_per_node=2 -m autoguidance.cli sample ...      # 2 ranks (gloo on CPU, NCCL on CUDA)
    autoguidance sample ...                                          # world size 1, no process group at all

`init()` reads torchrun's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) and
starts a process group: NCCL when CUDA is available, gloo otherwise. Every helper below also works when no group
exists (world size 1), so commands call them unconditionally. Reductions are sums of float64 tensors, so
statistics reduce as exactly as float64 addition allows; NCCL needs CUDA tensors, so tensors travel on `device()`
and come back on their own device.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as tdist

__all__ = ["free_port", "torchrun_command", "launch_local", "init", "shutdown", "rank", "world_size", "local_rank", "is_main", "device",
           "barrier", "all_reduce_sum", "all_gather_rows"]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (for MASTER_PORT of a local launch)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, cli_args, port: Optional[int] = None) -> list[str]:
    """`torchrun --nproc_per_node=N --master_addr 127.0.0.1 --master_port P -m autoguidance.cli ARGS...`, with
    the torchrun of this Python (for tests and benchmarks that launch local multi-process runs)."""
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, f"--nproc_per_node={int(nproc)}", "--master_addr", "127.0.0.1",
            "--master_port", str(port or free_port()), "-m", "autoguidance.cli", *map(str, cli_args)]


def launch_local(nproc: int, cli_args, env: Optional[dict] = None, timeout: float = 600.0) -> list:
    """Run `python -m autoguidance.cli ARGS...` as `nproc` local ranks with the environment torchrun would give them
    (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free MASTER_PORT), without torchrun's launcher process
    (which would import torch once more), and wait for all. Returns `[CompletedProcess]` per rank. Each rank's
    exit code is its own (torchrun would stop the others when one fails). For tests and benchmarks."""
    import subprocess
    import sys

    port = str(free_port())
    base = {**os.environ, **(env or {}), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    cmd = [sys.executable, "-m", "autoguidance.cli", *map(str, cli_args)]
    procs = [subprocess.Popen(cmd, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(nproc)]
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    return done


def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def init(backend: Optional[str] = None, timeout_s: float = 1800.0) -> int:
    """Start the process group if launched by torchrun with `WORLD_SIZE > 1` (once; later calls are no-ops).
    `backend` None picks 'nccl' when CUDA is available, else 'gloo'. Returns the world size."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n <= 1 or _active():
        return world_size()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={n} but {', '.join(missing)} unset: launch with torchrun "
                         "(torchrun --nproc_per_node=N -m autoguidance.cli ...), which sets them")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    tdist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return world_size()


def shutdown() -> None:
    """Destroy the process group (if any), after a final barrier so no rank leaves early."""
    if _active():
        barrier()
        tdist.destroy_process_group()


def rank() -> int:
    return tdist.get_rank() if _active() else 0


def world_size() -> int:
    return tdist.get_world_size() if _active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (the rank that prints, draws the progress bar and writes the shared files)."""
    return rank() == 0


def device(prefer: Optional[str] = None) -> torch.device:
    """This rank's device: `prefer` if given ('cpu', 'cuda'), else `cuda:LOCAL_RANK` when CUDA is available."""
    if prefer == "cpu" or (prefer is None and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {prefer} asked for, but CUDA is not available; use --device cpu")
    return torch.device("cuda", local_rank())


def _comm_device() -> torch.device:
    return torch.device("cuda", local_rank()) if _active() and tdist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if _active():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (any shape; a float64 tensor stays float64). Returns a new tensor on `t`'s device."""
    if not _active():
        return t.clone()
    buf = t.detach().to(_comm_device()).clone()
    tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
    return buf.to(t.device)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `[n_r, ...]` tensor along axis 0, in rank order (ranks may hold different n_r;
    trailing shapes and dtypes must agree). Every rank receives the whole `[sum n_r, ...]`."""
    if not _active():
        return t.clone()
    dev = _comm_device()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    tdist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=dev)
    pad[:t.shape[0]] = t.to(dev)
    bufs = [torch.zeros_like(pad) for _ in sizes]
    tdist.all_gather(bufs, pad)
    return torch.cat([b[:s] for b, s in zip(bufs, sizes)]).to(t.device)

