"""Benchmarks: run them from the repo root as ``python -m bench.<name>`` (``make bench``)."""
