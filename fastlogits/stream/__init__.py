"""Streaming: accumulators for rows whose vocabulary arrives in pieces (and, later, sources and the
planner that streams dumps larger than memory)."""
from fastlogits.stream.accumulators import (
    CrossEntropy,
    CrossEntropyState,
    Entropy,
    LogSumExp,
    LogSumExpState,
    TopK,
)
from fastlogits.stream.run import get_memory_budget, set_memory_budget
from fastlogits.stream.sources import SourceError, open

__all__ = ["LogSumExp", "LogSumExpState", "CrossEntropy", "CrossEntropyState", "Entropy", "TopK", "open",
           "SourceError", "set_memory_budget", "get_memory_budget"]
