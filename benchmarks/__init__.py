"""Dagsmith's benchmark suite: ``python -m benchmarks --help`` (or ``dagsmith bench``)."""
