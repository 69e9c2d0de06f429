"""Record the sha256 of every shipped checkpoint's model.safetensors in its config.json (checked by
`autoguidance.load`). model.safetensors is not touched. Run: .venv/bin/python scripts/add_checkpoint_checksums.py"""
from autoguidance import checkpoint

for name in sorted(checkpoint.shipped()):
    print(f"{name}: {'checksum added' if checkpoint.add_checksum(name) else 'checksum already recorded'}")
