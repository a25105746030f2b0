"""Benchmarks: `python -m bench` (or `make bench`) runs them all, one JSON object per line on stdout.

Each benchmark is a module of this package listed in `bench.__main__.BENCHES`; see there for the
contract. Shared helpers (broker, simulator process, CPU accounting) are in `bench.common`.
"""
