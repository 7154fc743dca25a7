"""Benchmarks and the quality study; run from the repository root as `python -m benchmarks.<name>`."""
