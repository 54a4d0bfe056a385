"""Streaming: accumulators for rows whose vocabulary arrives in pieces (and, later, sources and the
planner that streams dumps larger than memory)."""
from fastlogits.stream.accumulators import CrossEntropy, CrossEntropyState, LogSumExp, LogSumExpState

__all__ = ["LogSumExp", "LogSumExpState", "CrossEntropy", "CrossEntropyState"]
