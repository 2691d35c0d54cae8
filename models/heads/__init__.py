"""Anomaly-scoring heads (DMAD)."""
