"""Experiments: one module per study; each writes a figure (PNG), a table (Markdown) and numbers (JSON)."""
