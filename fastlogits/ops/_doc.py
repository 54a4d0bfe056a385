"""The keyword arguments that the row functions share, documented once: ``@shared_params`` puts their
numpydoc entries where a docstring's Parameters section has the line ``{shared}`` (and ``{logits}``,
``{temperature}``, ``{out}`` for those; ``{options}`` for the accumulators' classes)."""

_ENTRIES = {
    "logits": """\
logits : array_like of shape (..., V), a GPU array, or a source (fastlogits.open)
    float16, bfloat16 (ml_dtypes.bfloat16 or a PyTorch bfloat16 tensor; host bits in uint16 or |V2
    through ``fastlogits.open(bits, dtype="bfloat16")``), float32 or float64, any strides; PyTorch CPU
    tensors are read in place. A source is streamed in bounded memory.""",
    "temperature": """\
temperature : float > 0, or an array of one per row (the leading shape, or one that broadcasts to it)
    The logits are divided by it, after the softcap (below float64 input, in float32, as PyTorch does).""",
    "out": """\
out : array or path, optional (required for a source)
    An array of the logits' shape (NumPy, or a GPU array for GPU logits) that shares no memory with them;
    or, for host logits and sources, a path: a ``.npy`` file (raw rows for any other name but a text
    one, such as ``.csv``: refused) written block by block, under a temporary name until complete, or
    ``"-"``: raw rows to standard output. Returned.
dtype : float16, bfloat16, float32 or float64, optional
    The result's element type (default: out's, else the logits').""",
    "shared": """\
softcap : float > 0, optional
    The logits become ``softcap * tanh(x / softcap)`` first (Gemma 2's soft-capping): -inf becomes
    -softcap, as in PyTorch, so a masked logit is masked no more (see the README's edge cases).
backend : {"cpu", "gpu"}, optional
    None: "gpu" for GPU arrays, else the process default (fastlogits.set_backend, use_backend).
threads : int in [1, 4096], optional
    CPU threads, at most. None: all cores, or FASTLOGITS_NUM_THREADS, but no more than give each thread
    4 chunks of logits (1 for sample), and 1 in a forked child (see the README).
chunk_size : int >= 1, optional
    Vocabulary elements per step (None: 4096); results do not depend on it beyond rounding.""",
    # the accumulators' own (fastlogits.stream): no backend, and per update
    "options": """\
temperature : float > 0, or an array of one per row (shape (rows,), or one that broadcasts to it)
    The logits are divided by it, after the softcap, as by the row functions (fastlogits.logsumexp).
softcap : float > 0, optional
    The logits become ``softcap * tanh(x / softcap)`` first (Gemma 2's soft-capping).
threads : int in [1, 4096], optional
    CPU threads of each update, at most (None: as for the row functions).
chunk_size : int >= 1, optional
    Vocabulary elements per step of an update (None: 4096); results do not depend on it beyond rounding.""",
}


def shared_params(fn):
    doc = fn.__doc__
    if doc is None:         # (python -OO strips docstrings)
        return fn
    for name, text in _ENTRIES.items():
        doc = doc.replace("    {" + name + "}", "\n".join("    " + line for line in text.splitlines()))
    fn.__doc__ = doc
    return fn
