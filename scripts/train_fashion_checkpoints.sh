#!/usr/bin/env bash
# Train the Fashion-MNIST (28x28) networks of docs/fashion.md, one process at a time on one core, each resumable:
# a rerun continues every interrupted run from its latest training state in $STATE (same result as never stopping).
# Needs the images: `apt-get install dataset-fashion-mnist` (offline, Debian's package).
#
#   bash scripts/train_fashion_checkpoints.sh              # everything (see the steps below)
#   STEP=s bash scripts/train_fashion_checkpoints.sh       # one step only (s, xs, s-dropout, xs-uncond)
#   W=/tmp/w T=16 bash scripts/train_fashion_checkpoints.sh  # a smoke test into another folder
#
# T = 4096 iterations of 64 images (~4.4 epochs of the 60,000 training images). EMAs: relative std 0.050 and 0.150.
# The feature networks of the metrics are trained by `autoguidance fashion features` (see docs/fashion.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
W=${W:-autoguidance/weights/fashion}
STATE=${STATE:-/tmp/fashion-runs}
T=${T:-4096}
BATCH=${BATCH:-64}
COMMON="--data fashion28 --iters $T --batch $BATCH --seed 0 --ema-stds 0.05,0.15 --no-progress --state-every 256"

source scripts/train_lib.sh   # run STEP ARGS...: train (or resume) one network unless STEP selects another

# Main: S, conditional; its T/16 snapshot is "S at T/16" (reduced training only).
run s         --size S  --snapshots 0.0625,1
# Guide: XS along one run, T/32 .. T (the guide-length study; T/16 is the autoguidance guide, T is "capacity only").
run xs        --size XS --snapshots 0.03125,0.0625,0.125,0.25,0.5,1
# Unconditional XS: CFG's separate unconditional net (at T), as in the MNIST tables.
run xs-uncond --size XS --uncond --snapshots 1
# Main trained with dropout 0.1: in-situ guidance on a net that saw dropout.
run s-dropout --size S  --dropout 0.1 --snapshots 1
