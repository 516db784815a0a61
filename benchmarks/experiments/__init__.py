"""Library changes that the benchmarks suggested, prototyped and measured; not part of the suite.

Each one rebuilds a Blackgate hot path outside the package and times it
against the path as it is, so that a suggestion comes with its measured gain
(and, where it was not adopted, with the reason). Run one with
``python -m benchmarks.experiments.NAME``.
"""
