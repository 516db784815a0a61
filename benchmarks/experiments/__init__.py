"""Prototypes of library changes suggested by the benchmarks; not part of the suite.

Each one rebuilds a Blackgate hot path outside the package (from its private
helpers, so it follows the package's internals as of its writing and may need
updating) and times it against the path as it is, so that a suggestion comes
with its measured gain. Run one with ``python -m benchmarks.experiments.NAME``.
"""
