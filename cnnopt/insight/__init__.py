"""Insight: what a finished study teaches, read back from its MLflow record (the report, the edges of the space)."""
