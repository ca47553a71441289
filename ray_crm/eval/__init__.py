"""Bias benchmarks on real text, the paper's metrics, and the `eval` / `audit` stages (issue #6)."""
