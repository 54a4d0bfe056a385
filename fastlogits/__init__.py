"""fastlogits: fast logsumexp, softmax, cross-entropy, entropy and top-k over neural-network logits.

One idea carries everything: the online logsumexp. A row's state (running max, running sum of exp) is
updated chunk by chunk and merged across chunks, threads and machines. See README.md for the API in
brief, the accuracy contract and measured speed.
"""
__version__ = "0.1.0"

from fastlogits import stream
from fastlogits._config import (
    available_backends,
    get_backend,
    get_include,
    set_backend,
    show_config,
    use_backend,
)
from fastlogits.ops.reductions import cross_entropy, entropy, log_softmax, logsumexp, softmax
from fastlogits.ops.sampling import beam_search_step, sample
from fastlogits.ops.selection import argmax, top_k, top_k_logprobs
from fastlogits.stream.run import get_memory_budget, set_memory_budget
from fastlogits.stream.sources import (
    SourceError,
    open,  # noqa: A004 - the API's name
)

__all__ = [
    "argmax",
    "available_backends",
    "beam_search_step",
    "cross_entropy",
    "entropy",
    "get_backend",
    "get_memory_budget",
    "get_include",
    "log_softmax",
    "open",
    "SourceError",
    "logsumexp",
    "sample",
    "set_backend",
    "set_memory_budget",
    "show_config",
    "softmax",
    "stream",
    "top_k",
    "top_k_logprobs",
    "use_backend",
]
