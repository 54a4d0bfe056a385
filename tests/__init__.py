"""fastlogits' test suite.

A package, so that ``tests.reference`` (the float64 reference) and ``tests.tolerances`` can be imported by the
benchmarks too: ``from tests.reference import logsumexp``.
"""
