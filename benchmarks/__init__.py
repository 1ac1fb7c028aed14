"""Benchmarks and the maintenance rehearsal: real processes on loopback, measured from outside.

Run them from the repository root as modules, e.g. `python -m benchmarks.rehearsal --quick`;
each prints a table and writes `benchmarks/results/<name>.json`. See BENCHMARKS.md.
"""
