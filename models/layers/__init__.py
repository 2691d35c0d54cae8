"""Reusable layers: fast dropout masks and chunked CPU attention, used by the transformers."""
