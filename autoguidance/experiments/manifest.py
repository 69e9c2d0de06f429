"""Rewrite `weights/manifest.json` from the checkpoint folders' own configs (each records its command).

    python -m autoguidance.experiments.manifest autoguidance/weights/toy
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..checkpoint import WEIGHTS_DIR
from ..runs.files import write_json

_DESCRIPTIONS = {
    "logp-main": "log-density MLP, class A, width 64, 4096 iterations (the papers' main model)",
    "logp-guide": "log-density MLP, class A, width 32, 512 iterations (autoguidance guide)",
    "logp-uncond": "log-density MLP, classes AB, width 32, 512 iterations (unconditional guide for CFG)",
    "logp-main-dropout": "log-density MLP, class A, width 64, 4096 iterations, trained with dropout 0.1",
    "denoiser-main": "EDM-preconditioned denoiser MLP, class A, width 64, 4096 iterations",
    "denoiser-guide": "denoiser MLP, class A, width 32, 512 iterations (autoguidance guide)",
    "denoiser-uncond": "denoiser MLP, classes AB, width 32, 512 iterations (unconditional guide for CFG)",
    "denoiser-main-dropout": "denoiser MLP, class A, width 64, 4096 iterations, trained with dropout 0.1",
}


def main(folder: str) -> None:
    folder = Path(folder)
    manifest_path = WEIGHTS_DIR / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"checkpoints": {}}
    prefix = folder.name  # e.g. "toy"
    for cfg_file in sorted(folder.glob("*/config.json")):
        cfg = json.loads(cfg_file.read_text())
        name = f"{prefix}-{cfg_file.parent.name}"
        manifest["checkpoints"][name] = {
            "path": str(cfg_file.parent.resolve().relative_to(WEIGHTS_DIR.resolve())),
            "family": cfg["family"],
            "description": _DESCRIPTIONS.get(cfg_file.parent.name, ""),
            "command": cfg["meta"].get("command", ""),
        }
    write_json(manifest_path, manifest)
    print(f"wrote {manifest_path} ({len(manifest['checkpoints'])} checkpoints)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(WEIGHTS_DIR / "toy"))
