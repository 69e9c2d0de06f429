#!/usr/bin/env bash
# Set up (once) and run the main job: `autoguidance demo` on the shipped checkpoints. Extra args go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/autoguidance demo "$@"
