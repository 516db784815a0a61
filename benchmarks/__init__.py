"""Blackgate measured against raw baselines and peer libraries, in one run (issue 6).

``python -m benchmarks`` runs every case (``--quick`` for a smoke check). The modules:

- ``__main__``: the command line, the run, the files it writes;
- ``cases``: the per-call and concurrent cases; ``footprint``: memory per key;
  ``gateway``: requests per second through ``HTTPProxy``, in separate processes;
- ``peers``: pybreaker, circuitbreaker, aiobreaker and purgatory wired to the same work;
- ``harness``: interleaved rounds and their statistics; ``results``: rows, targets,
  verdicts; ``report``: tables, JSON, chart; ``plan``: full and quick sizes;
- ``hotspots``: where a Blackgate call spends its time; ``experiments``: a prototype
  that was measured and not adopted, with the reason.

The older single-purpose scripts (``overhead``, ``memory``, ``fleet``,
``stream_cost``) still run on their own.
"""
