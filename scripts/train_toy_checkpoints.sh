#!/usr/bin/env bash
# Retrain every shipped toy checkpoint with the project's own command, then rewrite the manifest.
# Takes about 30 minutes on a 2-core CPU. Usage: bash scripts/train_toy_checkpoints.sh [OUT_DIR]
set -euo pipefail
W=${1:-autoguidance/weights/toy}
run() { local name=$1; shift; autoguidance toy train --out "$W/$name" "$@"; }
run logp-guide          --family logp     --classes A  --width 32 --iters 512
run logp-uncond         --family logp     --classes AB --width 32 --iters 512
run denoiser-guide      --family denoiser --classes A  --width 32 --iters 512
run denoiser-uncond     --family denoiser --classes AB --width 32 --iters 512
run logp-main           --family logp     --classes A  --width 64 --iters 4096
run denoiser-main       --family denoiser --classes A  --width 64 --iters 4096
run logp-main-dropout   --family logp     --classes A  --width 64 --iters 4096 --dropout 0.1
run denoiser-main-dropout --family denoiser --classes A --width 64 --iters 4096 --dropout 0.1
python -m autoguidance.experiments.manifest "$W"
