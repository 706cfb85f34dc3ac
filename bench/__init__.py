"""Benchmark suite of optical_kernels (pytest-benchmark); see bench/README section of README.md.

``bench.providers`` holds one function per solver (ours and the peers) with a common signature;
``bench.shapes`` the benchmark shapes of docs/design.md §7 and the problem generator. Tests may
import both (the repository root is on ``sys.path`` through pytest's ``pythonpath`` setting).
"""
