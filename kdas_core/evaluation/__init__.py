"""Scoring: the metric definitions and the evaluation core behind `kdas_core.evaluate` and validation."""
