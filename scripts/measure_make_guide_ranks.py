"""Measure how far 2 torchrun ranks of `make-guide` are from 1 rank (docs/guides.md, "Resumable, locked,
distributed"): a tiny digits main (XXS, 8 iterations of `autoguidance train`'s loop), recipe distill data-free,
batch 16, at 4 and 32 steps, once with 1 process and once with 2 local ranks (gloo); prints the largest weight
difference of the guides, absolute and relative to each tensor's largest weight.
Run: OMP_NUM_THREADS=1 .venv/bin/python scripts/measure_make_guide_ranks.py"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from autoguidance.runs import dist
from autoguidance.train.edm import EDM2TrainConfig, digits_net_config, train_edm2

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
tmp = Path(tempfile.mkdtemp(prefix="make-guide-ranks-"))
train_edm2(EDM2TrainConfig(net=digits_net_config("XXS", 10), iters=8, batch=8, seed=0, t_ref=2, t_rampup=2),
           out=tmp / "m", progress=False)
for steps in (4, 32):
    args = ["make-guide", "--main", str(tmp / "m-T-ema050"), "--recipe", "distill", "--steps", str(steps), "--batch",
            "16", "--samples", "32", "--sample-steps", "2", "--no-progress"]
    subprocess.run([sys.executable, "-m", "autoguidance.cli", *args, "--out", str(tmp / f"one-{steps}")], env=ENV,
                   check=True, capture_output=True)
    for r in dist.launch_local(2, [*args, "--out", str(tmp / f"two-{steps}")], env=ENV):
        assert r.returncode == 0, r.stderr
    a = load_file(str(tmp / f"one-{steps}" / "model.safetensors"))
    b = load_file(str(tmp / f"two-{steps}" / "model.safetensors"))
    diff = {k: float((a[k] - b[k]).abs().max()) for k in a}
    rel = max(diff[k] / max(float(a[k].abs().max()), 1e-12) for k in a)
    print(f"{steps} steps: max |w_1rank - w_2ranks| = {max(diff.values()):.3g}, relative to the tensor's largest "
          f"weight {rel:.3g}; bit-identical: {all(v == 0 for v in diff.values())}")
