"""Everything a run writes and how it is split: atomic files, NPZ shards and PNGs, run records, seeds, and the
torchrun process group. Imports nothing above the core, so every layer may use it."""
