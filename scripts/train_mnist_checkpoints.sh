#!/usr/bin/env bash
# Train the MNIST (14x14) networks of the harder-dataset tables, one process at a time on one core, each resumable:
# a rerun continues every interrupted run from its latest training state in $STATE (same result as never stopping).
#
#   bash scripts/train_mnist_checkpoints.sh              # everything (see the steps below)
#   STEP=s bash scripts/train_mnist_checkpoints.sh       # one step only (features, s, xs, s-dropout, s-uncond, xs-uncond, xs-half)
#   W=/tmp/w T=16 bash scripts/train_mnist_checkpoints.sh  # a smoke test into another folder
#
# T = 4096 iterations of 64 images (~65 epochs of the 4000-image train split). EMAs: relative std 0.050 and 0.150.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
W=${W:-autoguidance/weights/mnist}
STATE=${STATE:-/tmp/mnist-runs}
T=${T:-4096}
BATCH=${BATCH:-64}
COMMON="--data mnist14 --iters $T --batch $BATCH --seed 0 --ema-stds 0.05,0.15 --no-progress --state-every 256"

source scripts/train_lib.sh   # run STEP ARGS...: train (or resume) one network unless STEP selects another

# The feature network of the metrics (a classifier on the train split; FD in its features).
if [[ -z "${STEP:-}" || "${STEP}" == features ]]; then
  echo "+ features"
  $PY -m autoguidance.cli mnist features --out "$W/features" --epochs 30
fi
# Main: S, conditional; its T/16 snapshot is "S at T/16" (reduced training only).
run s         --size S  --snapshots 0.0625,1
# Guide: XS along one run, T/32 .. T (the guide-length study; T/16 is the autoguidance guide, T is "capacity only").
run xs        --size XS --snapshots 0.03125,0.0625,0.125,0.25,0.5,1
# Main trained with dropout 0.1: in-situ guidance on a net that saw dropout.
run s-dropout --size S  --dropout 0.1 --snapshots 1
# Unconditional main and guide (the unconditional pair; XS at T is also CFG's separate unconditional net).
run s-uncond  --size S  --uncond --snapshots 1
run xs-uncond --size XS --uncond --snapshots 0.0625,1
# "What did not work": an XS guide trained on half of the training data, to T/16.
run xs-half   --size XS --data-subset half --snapshots 0.0625 --stop-after $((T / 16))
