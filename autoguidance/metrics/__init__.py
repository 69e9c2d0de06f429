"""Metrics: exact metrics of the 2D toy (`metrics.toy`)."""
