"""Selection: argmax, top_k, top_k_logprobs."""
import numpy as np

from fastlogits._config import is_int
from fastlogits.ops import _backend
from fastlogits.ops._backend import ordered
from fastlogits.ops._doc import shared_params
from fastlogits.ops._prep import NP_DTYPES, need_vocab, prepare, scalar_if_0d
from fastlogits.stream import run as stream_run
from fastlogits.stream.sources import as_source


def _check_k(k, V):
    if not is_int(k):
        raise TypeError(f"k must be a non-negative integer, got {k!r}")
    k = int(k)
    if not 0 <= k <= V:
        raise ValueError(f"k must be between 0 and the vocabulary size {V}, got {k}")
    return k


@ordered
@shared_params
def argmax(logits, *, temperature=1.0, softcap=None, backend=None, threads=None, chunk_size=None):
    """Index of the largest logit of each row, int64 of shape (...).

    The lowest index wins a tie; a NaN counts as the largest value (the first NaN wins), like NumPy and
    PyTorch; a row of all -inf gives 0. An empty vocabulary raises ValueError. A NumPy scalar for 1-D
    logits.

    Parameters
    ----------
    {logits}
    {temperature}
    {shared}

    Examples
    --------
    >>> import numpy as np, fastlogits
    >>> int(fastlogits.argmax(np.array([1.0, 3.0, 3.0])))
    1
    """
    src = as_source(logits)
    if src is not None:
        need_vocab("argmax", src.V)
        return stream_run.reduce("argmax", src, dict(
            temperature=temperature, softcap=softcap, backend=backend, threads=threads,
            chunk_size=chunk_size))
    r = prepare(logits, temperature=temperature, softcap=softcap, backend=backend, threads=threads,
                chunk_size=chunk_size)
    need_vocab("argmax", r.V)
    B = _backend.get(r.backend)
    top = B.argmax(r.x, r.dtype, r.temperature, r.softcap, r.chunk, r.threads)
    return scalar_if_0d(B.finish(top, np.int64, r.lead))


def _top_k(logits, k, logprobs, temperature, softcap, backend, threads, chunk_size):
    r = prepare(logits, temperature=temperature, softcap=softcap, backend=backend, threads=threads,
                chunk_size=chunk_size)
    k = _check_k(k, r.V)
    B = _backend.get(r.backend)
    vals, idx = B.top_k(r.x, r.dtype, r.temperature, r.softcap, k, logprobs, r.chunk, r.threads)
    return r, vals, B.finish(idx, np.int64, r.lead + (k,))


@ordered
@shared_params
def top_k(logits, k, *, temperature=1.0, softcap=None, backend=None, threads=None, chunk_size=None):
    """The k largest logits of each row and their indices, like ``torch.topk(x, k)``.

    Returns ``(values, indices)``, each of shape (..., k), sorted by value descending with the lower
    index first on ties; NaN counts as the largest value (as in PyTorch). Values are the logits after
    softcap and temperature, in the logits' dtype; indices are int64.

    Parameters
    ----------
    {logits}
    k : int, 0 <= k <= V
        (k = 0 gives empty arrays of shape (..., 0), as ``torch.topk`` does.)
    {temperature}
    {shared}

    Examples
    --------
    >>> import numpy as np, fastlogits
    >>> v, i = fastlogits.top_k(np.array([0.5, 2.0, 2.0, -1.0]), 2)
    >>> v.tolist(), i.tolist()
    ([2.0, 2.0], [1, 2])
    """
    src = as_source(logits)
    if src is not None:
        return stream_run.reduce("top_k", src, dict(
            k=k, temperature=temperature, softcap=softcap, backend=backend,
            threads=threads, chunk_size=chunk_size))
    r, vals, idx = _top_k(logits, k, False, temperature, softcap, backend, threads, chunk_size)
    # values in the logits' dtype (on the device, bfloat16 stays float32: numba has no bfloat16)
    dt = NP_DTYPES[r.dtype] if isinstance(vals, np.ndarray) or r.dtype != "bfloat16" else np.float32
    return _backend.get(r.backend).finish(vals, dt, idx.shape), idx


@ordered
@shared_params
def top_k_logprobs(logits, k, *, temperature=1.0, softcap=None, backend=None, threads=None,
                   chunk_size=None):
    """The k most likely tokens of each row with their log-probabilities under softmax(x / T).

    Returns ``(logprobs, indices)``, each of shape (..., k), most likely first; logprobs are float32
    (float64 for float64 input); one pass over each row.

    Parameters
    ----------
    {logits}
    k : int, 0 <= k <= V
        (k = 0 gives empty arrays of shape (..., 0), as ``torch.topk`` does.)
    {temperature}
    {shared}

    Examples
    --------
    >>> import numpy as np, fastlogits
    >>> lp, i = fastlogits.top_k_logprobs(np.log(np.array([0.2, 0.5, 0.3])), 2)
    >>> np.round(np.exp(lp), 6).tolist(), i.tolist()
    ([0.5, 0.3], [1, 2])
    """
    src = as_source(logits)
    if src is not None:
        return stream_run.reduce("top_k_logprobs", src, dict(
            k=k, temperature=temperature, softcap=softcap, backend=backend,
            threads=threads, chunk_size=chunk_size))
    r, lp, idx = _top_k(logits, k, True, temperature, softcap, backend, threads, chunk_size)
    return _backend.get(r.backend).finish(lp, r.result_dtype, idx.shape), idx
