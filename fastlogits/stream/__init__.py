"""Streaming: sources and the planner that streams dumps larger than memory, and accumulators for rows
whose vocabulary arrives in pieces."""
from fastlogits.stream.accumulators import (
    CrossEntropy,
    CrossEntropyState,
    Entropy,
    EntropyState,
    LogSumExp,
    LogSumExpState,
    TopK,
    TopKState,
)
from fastlogits.stream.run import get_memory_budget, set_memory_budget
from fastlogits.stream.sources import SourceError, open

__all__ = ["LogSumExp", "LogSumExpState", "CrossEntropy", "CrossEntropyState", "Entropy", "EntropyState",
           "TopK", "TopKState", "open", "SourceError", "set_memory_budget", "get_memory_budget"]
