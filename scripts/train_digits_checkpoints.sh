#!/usr/bin/env bash
# Train every shipped digits checkpoint (autoguidance/weights/digits), one process at a time on one core,
# then rewrite autoguidance/weights/manifest.json. Training states (for --resume) go to $STATE (not shipped).
#
#   bash scripts/train_digits_checkpoints.sh            # everything, ~40 min on one 2020s CPU core
#   STEP=s bash scripts/train_digits_checkpoints.sh     # one step only (features, s, xs, xs-uncond, s-dropout, xs-half, s-uncond, manifest)
#   W=/tmp/w T=16 EPOCHS=1 bash scripts/train_digits_checkpoints.sh   # a smoke test into another folder
#
# T = 2048 iterations of 64 images (~100 epochs of the 1297-image train split). EMAs: relative std 0.050 and
# 0.150 (the papers tune the main's and the guide's EMA separately). Snapshots at T/16 give the guides.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-python}
W=${W:-autoguidance/weights/digits}
STATE=${STATE:-/tmp/digits-runs}
T=${T:-2048}
BATCH=${BATCH:-64}
EPOCHS=${EPOCHS:-40}
COMMON="--iters $T --batch $BATCH --seed 0 --ema-stds 0.05,0.15 --no-progress"
run() { if [[ -z "${STEP:-}" || "${STEP}" == "$1" ]]; then shift; echo "+ $*"; "$@"; fi; }

# The feature network of the metrics (classifier on the train split).
run features $PY -m autoguidance.cli digits features --out $W/features --epochs $EPOCHS
# Main: EDM2-S-like, conditional, full training T; its T/16 snapshot is "S at T/16" (reduced training only).
run s        $PY -m autoguidance.cli train --out $W/s --size S $COMMON --snapshots 0.0625,1 --state-dir $STATE/s
# Guide: XS at T/16 (the autoguidance guide); its end of training is "XS at T" (reduced capacity only). The other
# snapshots (T/32 ... T/2) are the guides of the guide-length study (`autoguidance digits guides`).
run xs       $PY -m autoguidance.cli train --out $W/xs --size XS $COMMON --snapshots 0.03125,0.0625,0.125,0.25,0.5,1 --state-dir $STATE/xs
# Unconditional XS: at T the CFG guide (as EDM2's separate unconditional net), at T/16 the guide of the uncond main.
run xs-uncond $PY -m autoguidance.cli train --out $W/xs-uncond --size XS --uncond $COMMON --snapshots 0.0625,1 --state-dir $STATE/xs-uncond
# Main trained with dropout 0.1 (as EDM2-M..XXL): in-situ guidance on a net that saw dropout.
run s-dropout $PY -m autoguidance.cli train --out $W/s-dropout --size S --dropout 0.1 $COMMON --snapshots 1 --state-dir $STATE/s-dropout
# "What did not work": an XS guide trained on half of the training data, to T/16.
run xs-half  $PY -m autoguidance.cli train --out $W/xs-half --size XS --data-subset half $COMMON --snapshots 0.0625 --stop-after $((T / 16)) --state-dir $STATE/xs-half
# Unconditional main (S at T): no guidance vs autoguided by xs-uncond at T/16.
run s-uncond $PY -m autoguidance.cli train --out $W/s-uncond --size S --uncond $COMMON --snapshots 1 --state-dir $STATE/s-uncond

if [[ "$W" == autoguidance/weights/digits ]]; then
  run manifest $PY -m autoguidance.cli digits manifest --folder $W
fi
