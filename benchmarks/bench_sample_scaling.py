"""Sampling throughput of `autoguidance sample` for 1 and 2 processes (torchrun, gloo), and the scaling ratio.

Workload: the shipped digits EDM2 U-Net (8x8x1, conditional) guided by autoguidance with its longer-EMA sibling
as guide (two nets, 2 forward calls per denoiser evaluation), EDM Heun with `--steps` steps, `--n` seeds in shards
of `--shard-size` (shards go round-robin to ranks). Configurations, each in fresh processes, each run `--rounds`
times in rotated order so machine noise hits all alike:

    1proc-1thread    autoguidance sample                                   OMP_NUM_THREADS=1
    2proc-1thread    torchrun --nproc_per_node=2 -m autoguidance.cli sample   OMP_NUM_THREADS=1 per process
    1proc-2threads   autoguidance sample                                   OMP_NUM_THREADS=2 (the alternative use
                                                                           of two cores)

Throughput = images / sampling time of the slowest rank (from run.json: model loading and process start-up are
excluded), and, separately, images / wall time of the whole command. Every run also checks that its shards are
byte-identical to the first 1-process run. The machine's load average is recorded before and after.

    python benchmarks/bench_sample_scaling.py [--n 96] [--steps 8] [--rounds 3] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoguidance.runs import dist  # noqa: E402

WEIGHTS = ROOT / "autoguidance" / "weights" / "digits"


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "shards").glob("*.npz"))}


def run_once(config: str, args, out: Path) -> dict:
    cli = ["sample", "--net", WEIGHTS / "s-T16-ema050", "--method", "autoguidance", "--gnet",
           WEIGHTS / "s-T16-ema150", "--w", "2", "--steps", args.steps, "--seeds", f"0-{args.n - 1}",
           "--shard-size", args.shard_size, "--batch", args.shard_size, "--out", out, "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "2" if config == "1proc-2threads" else "1"}
    if config == "2proc-1thread":
        cmd = dist.torchrun_command(2, cli)
    else:
        cmd = [sys.executable, "-m", "autoguidance.cli", *map(str, cli)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{r.stderr[-3000:]}")
    rec = json.loads((out / "run.json").read_text())
    return {"config": config, "images": rec["images_sampled"], "sampling_s": rec["seconds_slowest_rank"],
            "wall_s": round(wall, 3), "img_per_s": rec["images_sampled"] / rec["seconds_slowest_rank"],
            "img_per_s_wall": rec["images_sampled"] / wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=96, help="images per run")
    ap.add_argument("--steps", type=int, default=8, help="Heun steps")
    ap.add_argument("--shard-size", type=int, default=8, help="seeds per shard (and per sampler batch)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per configuration")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "sample_scaling.json"))
    args = ap.parse_args()

    configs = ["1proc-1thread", "2proc-1thread", "1proc-2threads"]
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    runs, reference = [], None
    try:
        for k in range(args.rounds):
            for config in configs[k % 3:] + configs[:k % 3]:
                out = tmp / f"{config}-{k}"
                rec = run_once(config, args, out)
                shards = _shards(out)
                reference = reference if reference is not None else shards
                rec["identical_to_first_run"] = shards == reference
                rec["round"] = k
                runs.append(rec)
                print(f"round {k} {config:15s} {rec['img_per_s']:7.2f} img/s sampling, "
                      f"{rec['img_per_s_wall']:6.2f} img/s wall, identical: {rec['identical_to_first_run']}",
                      flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    summary = {}
    for c in configs:
        rs = [r for r in runs if r["config"] == c]
        summary[c] = {"img_per_s": statistics.median(r["img_per_s"] for r in rs),
                      "img_per_s_wall": statistics.median(r["img_per_s_wall"] for r in rs)}
    ratio = summary["2proc-1thread"]["img_per_s"] / summary["1proc-1thread"]["img_per_s"]
    ratio_wall = summary["2proc-1thread"]["img_per_s_wall"] / summary["1proc-1thread"]["img_per_s_wall"]
    result = {"settings": vars(args), "summary": summary, "scaling_2_over_1": ratio,
              "scaling_2_over_1_wall": ratio_wall,
              "all_identical": all(r["identical_to_first_run"] for r in runs), "runs": runs,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "load_avg_before": load_before, "load_avg_after": load_after},
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    for c in configs:
        print(f"{c:15s} {summary[c]['img_per_s']:7.2f} img/s (sampling)  "
              f"{summary[c]['img_per_s_wall']:6.2f} img/s (wall)")
    print(f"scaling 2 processes / 1 process: {ratio:.2f}x (sampling), {ratio_wall:.2f}x (wall); load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; byte-identical: {result['all_identical']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
