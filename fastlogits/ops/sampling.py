"""Sampling and decoding: seeded ``sample`` (temperature, top-k, top-p, min-p) and ``beam_search_step``.

How ``sample`` draws (details in ``fastlogits/include/fastlogits_sample.h``):

- Gumbel-max: token = argmax over the surviving tokens of the exact sums ``x / T + g`` (a float64 and its
  rounding error), ``g = -log(-log(u))`` computed in float64, ``u`` a 52-bit uniform from Philox-4x32-10
  keyed by the seed, with the counter made of the token id, the sample index and the row id. This is an
  exact draw from the filtered, renormalised softmax. The row id is the row's index when ``seed`` is one
  int, and 0 when seeds are given per row, so a row's draw depends only on its own logits, seed and
  parameters (not on the batch it sits in, the thread count or the chunk size). Only tokens that can still
  win get their exact noise: a cheap conservative test on the random word rejects the rest.
- Filters, in Hugging Face's warper order (temperature, top-k, top-p, min-p, then renormalise):
  plain temperature and top-k take one streaming pass (top-k keeps a heap of the k best and every token
  tied with the k-th value, as HF's TopKLogitsWarper does; top-p and min-p then work on those candidates);
  min-p without top-k takes two passes (the max, then the Gumbel-max over the survivors); top-p without
  top-k four (logsumexp, a histogram of the mass over value buckets, collecting the one bucket where the
  nucleus ends and a quickselect on mass there, the Gumbel-max over the nucleus). No row is ever sorted.
- The GPU backend (``fastlogits/gpu/sample_kernels.py``) computes the same integers and the same float64
  noise, and finds the filters' thresholds by a radix select instead: the same tokens, except where two
  keys tie to within the last bit of the device's float64 ``log`` or a cumulative mass lands within
  rounding of ``top_p`` (``fastlogits check`` and tests/gpu/test_sampling.py measure how often).
"""
import secrets

import numpy as np

from fastlogits._config import int_arg
from fastlogits.cpu import _sample
from fastlogits.ops import _backend
from fastlogits.ops._backend import ordered
from fastlogits.ops._doc import shared_params
from fastlogits.ops._prep import (
    NP_DTYPES,
    as_float,
    broadcast_rows,
    compute_dtype,
    is_gpu_array,
    need_vocab,
    number_array,
    prepare,
    row_name,
    scalar_if_0d,
    temperatures,
    unmasked,
)
from fastlogits.stream.sources import as_source

# a draw costs 3 to 4 times a logsumexp per logit (its noise: a counter-based random number and two
# logarithms per logit): under the default thread count a thread's share is at least 1 chunk, not 4
# (see _config.resolve_threads)
SAMPLE_GRAIN_CHUNKS = 1


def _per_row(value, name, lead, rows, dtype, default, ok, need):
    """One value per row from a scalar or an array of the leading shape (None: default), each checked:
    ok(values) is True where a value is allowed, and ``need`` says which are."""
    if value is None:
        value = default
    number = int if dtype == np.int64 else float
    if number is float and type(value) is int:
        value = as_float(value, name, need)                 # (10**400 raises, naming the argument)
    if type(value) is int or (type(value) is float and number is float):           # the common case
        if not ok(value):                     # (an int is checked as given, past int64 too)
            raise ValueError(f"{name} must be {need}, got {number(value)!r}")
        return np.full(rows, min(value, 2**62) if number is int else value, dtype)   # k >= V: no top-k
    if isinstance(value, bool) or (isinstance(value, np.ndarray) and value.dtype == bool):
        raise TypeError(f"{name} must be {'an integer' if number is int else 'a float'} or one per row, "
                        f"got {value!r}")
    value = unmasked(value, name)
    try:
        exact = _exact_ints(value) if number is int else None
        a = number_array(value, name) if exact is None else np.minimum(exact, 2**62)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or one per row, got {value!r}") from None
    if exact is not None:       # ints past int64 (any k >= V means no top-k): checked as given
        bad = ~ok(exact).astype(bool)
        if np.any(bad):
            where = _first_bad(bad, lead) if exact.shape == tuple(lead) else ""
            raise ValueError(f"{name} must be {need}, got {exact[bad][0]!r}{where}")
        a = a.astype(np.int64)
    if a.dtype == object or a.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be a number or an array of numbers, got {value!r}")
    if number is int and a.dtype.kind == "f":      # 2.0 too, as torch.topk and k, num_samples here
        raise TypeError(f"{name} must be an integer or integers (one per row), got {value!r}")
    if number is int and a.dtype.kind == "u":
        a = np.minimum(a, 2**62)
    a = broadcast_rows(a, lead, name)
    # a private copy, checked: the kernels read it with the GIL released (the caller's array could change)
    out = np.array(np.broadcast_to(a, lead).reshape(rows), dtype=dtype, order="C", copy=True)
    bad = ~ok(out)
    if np.any(bad):
        where = _first_bad(bad, lead) if a.ndim else ""         # the row, for an argument given per row
        raise ValueError(f"{name} must be {need}, got {number(out[bad][0])!r}{where}")
    return out


def _exact_ints(value):
    """A (nested) list of Python ints that NumPy would make floats (ints past int64 mixed with smaller
    ones: [2**63, 5] becomes float64) or objects, as an object array of the exact ints; else None."""
    if not isinstance(value, (list, tuple)) or np.asarray(value).dtype.kind not in "fO":
        return None
    o = np.array(value, dtype=object)
    ints = o.dtype == object and o.size and all(type(v) is int or isinstance(v, np.integer) for v in o.flat)
    return o if ints else None


def _first_bad(bad, lead):
    pos = np.argwhere(np.atleast_1d(bad.reshape(lead) if lead else bad))[0]
    return f" ({row_name(pos)})" if lead else ""


def _seeds(seed, lead, rows):
    """(seeds, row_ids) as uint64 (rows,) arrays: one seed keys every row with the row's index as row id;
    per-row seeds use row id 0."""
    if seed is None:
        seed = secrets.randbits(64)
    if isinstance(seed, bool):
        raise TypeError(f"seed must be an int, one int per row, or None, got {seed!r}")
    if isinstance(seed, (int, np.integer)):
        s = int(seed)
        if not 0 <= s < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {s}")
        return np.full(rows, s, np.uint64), np.arange(rows, dtype=np.uint64)
    seed = unmasked(seed, "seed")
    exact = _exact_ints(seed)                        # Python ints, some past int64
    if exact is not None:
        bad = (exact < 0) | (exact >= 2**64)
        if np.any(bad):
            where = _first_bad(bad, lead) if exact.shape == tuple(lead) else ""
            raise ValueError(f"seed must be in [0, 2**64), got {exact[bad][0]}{where}")
        seed = exact.astype(np.uint64)
    a = np.asarray(seed)
    if a.dtype.kind not in "iu" or a.dtype == bool:
        raise TypeError(f"seed must be an int, one int per row (an integer array), or None, got dtype "
                        f"{a.dtype}")
    if a.ndim == 0:                  # a 0-d integer array is one int
        return _seeds(int(a), lead, rows)
    if a.shape != tuple(lead):
        raise ValueError(f"seed must be one int or one per row (shape {tuple(lead)}), got shape {a.shape}")
    if a.dtype.kind == "i" and np.any(a < 0):
        raise ValueError(f"seed must be in [0, 2**64), got a negative seed{_first_bad(a < 0, lead)}")
    return np.require(a.reshape(rows), np.uint64, "CA"), np.zeros(rows, np.uint64)


_STATUS = {     # what a row's status from a sampler means
    _sample.NAN: "holds a NaN",
    _sample.POSINF: "holds a +inf logit (after softcap and temperature, in the compute type: x / T may "
                    "overflow; its softmax is NaN, as in PyTorch)",
    _sample.EMPTY: "has no possible token (every logit is -inf after softcap and temperature, in the compute "
                   "type: x / T may overflow)",
}


@ordered
@shared_params
def sample(logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None, seed=None, num_samples=1,
           return_logprobs=False, softcap=None, backend=None, threads=None, chunk_size=None):
    """Draw tokens from softmax(logits / temperature), filtered by top-k, top-p and min-p.

    The filters apply in Hugging Face's order (the same tokens as its Temperature, TopK, TopP and MinP
    logits warpers): divide by ``temperature`` (after ``softcap``); ``top_k`` keeps the k largest logits and
    every token tied with the k-th (as HF does); ``top_p`` keeps the smallest set of most likely tokens
    whose probability mass (under the top-k-filtered, renormalised distribution) reaches p, at least one
    token (of tokens tied at its edge, the last ones it needs, the higher token ids, as HF's stable sort
    keeps them); ``min_p`` drops tokens whose probability is below ``min_p`` times the largest; the draw
    is from the survivors, renormalised. The draw is exact (Gumbel-max with float64 noise), and no row is
    sorted.

    Parameters
    ----------
    logits : array (..., V), or a source (see ``fastlogits.open``)
        float16, bfloat16, float32 or float64; any strides. A source is streamed by blocks of rows; a row
        larger than the memory budget is drawn in passes over its columns (a radix select finds the
        filters' thresholds, see fastlogits/stream/wide.py). The tokens are the same as for the array in
        memory (for a wide row, except where a top-p mass lands within rounding of top_p).
    temperature : float >= 0 or one per row
        0 is greedy: the argmax, lowest index on ties, whatever the filters (the argmax always survives
        them). Any positive temperature samples, however small (vLLM switches to greedy below 1e-5; we
        do not: with 1e-6 ties at the top are still broken at random). The keys are the exact sums
        x / T + g (a float64 and its rounding error), so ties at the top stay fair at any |x / T| (two
        tied logits of 30 at T = 1e-15: 0.498 of 100000 draws to the first; a key rounded to one float64
        gave it 0.888). Below float64 input, x / T is a float32 (as in PyTorch): draws are exact for its
        rounded values, whose rounding (2^-24 |x / T|) already moves near-ties at |x / T| of about 1e7.
    top_k : int >= 0, None, or one per row
        None or 0 (as in HF and vLLM) or >= V: no top-k.
    top_p : float in (0, 1], None, or one per row
        None or 1: no top-p. A cumulative mass within a few rounding errors (16 eps of the compute dtype)
        of ``top_p`` counts as reaching it.
    min_p : float in [0, 1], None, or one per row
        None or 0: no min-p. Keeps tokens with ``x >= x_max + log(min_p)`` (x the scaled logits).
    seed : int in [0, 2**64), one per row (an integer array of the leading shape), or None
        The same seed gives the same tokens whatever the thread count, the chunk size, and (with per-row
        seeds) the rest of the batch. With one seed, row i uses row id i; with per-row seeds every row uses
        row id 0, so a row with a given seed draws the same token in any batch. None draws a fresh seed.
    num_samples : int >= 1
        Independent draws with replacement, the sample index being part of the generator's counter.
    return_logprobs : bool
        Also return each sampled token's log-probability under the filtered, renormalised distribution
        (0.0 for greedy rows), and its rank: how many of the row's tokens have a strictly larger scaled
        logit (0 = the most likely), as serving APIs report them.
    {shared}

    Returns
    -------
    tokens : int64 array of shape (...), or (..., num_samples) when num_samples > 1
    (tokens, logprobs, ranks) when return_logprobs: logprobs float32 (float64 for float64 logits) and
    ranks int64, each of the tokens' shape.

    Raises
    ------
    ValueError
        For a bad argument (naming it), and for a row that cannot be sampled: a row holding a NaN, a row
        of all -inf (no possible token), or, at a positive temperature, a row holding a +inf logit (its
        softmax is NaN, as in PyTorch; also when logits / temperature overflows the compute dtype); the
        message names the first such row. Greedy rows accept +inf
        (the first +inf wins, as argmax). For GPU logits the call does not wait for the device: such a
        row gets token -1 (rank -1, log-probability NaN) and the error is raised later, by
        ``fastlogits.gpu.synchronize()`` or the thread's next GPU call (as cross_entropy's device labels).

    Examples
    --------
    >>> import numpy as np
    >>> from fastlogits.ops.sampling import sample
    >>> x = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    >>> sample(x, temperature=0).tolist()
    [0, 2]
    >>> t = sample(x, top_k=1, seed=0)
    >>> t.tolist()
    [0, 2]
    """
    ns = _num_samples(num_samples)
    src = as_source(logits)
    if src is not None:
        return sample_source(src, temperature, top_k, top_p, min_p, seed, ns, bool(return_logprobs),
                             dict(softcap=softcap, backend=backend, threads=threads, chunk_size=chunk_size))
    r = prepare(logits, temperature=temperature, softcap=softcap, backend=backend, threads=threads,
                chunk_size=chunk_size, allow_zero_temperature=True, grain_chunks=SAMPLE_GRAIN_CHUNKS)
    need_vocab("sample", r.V)
    k, p, mp = _filters(top_k, top_p, min_p, r.lead, r.rows)
    seeds, row_ids = _seeds(seed, r.lead, r.rows)
    if is_gpu_array(r.x):        # GPU arrays in, GPU arrays out, with no wait for the device
        out = _backend.get(r.backend).sample_device(r.x, r.dtype, r.temperature, r.softcap, k, p, mp, seeds,
                                                    row_ids, ns, bool(return_logprobs), r.chunk, r.lead,
                                                    r.result_dtype)
    else:
        out = _draw(r, k, p, mp, seeds, row_ids, ns, bool(return_logprobs), r.lead)
    shape = r.lead + ((ns,) if ns > 1 else ())

    def fit(a):
        return scalar_if_0d(a.reshape(shape))

    return tuple(fit(a) for a in out) if return_logprobs else fit(out[0])


def _filters(top_k, top_p, min_p, lead, rows):
    k = _per_row(top_k, "top_k", lead, rows, np.int64, 0, lambda k: k >= 0, ">= 0 (0 or None: no top-k)")
    p = _per_row(top_p, "top_p", lead, rows, np.float64, 1.0, lambda p: (p > 0) & (p <= 1),
                 "in (0, 1] (1 or None: no top-p)")
    mp = _per_row(min_p, "min_p", lead, rows, np.float64, 0.0, lambda m: (m >= 0) & (m <= 1),
                  "in [0, 1] (0 or None: no min-p)")
    return k, p, mp


def _draw(r, k, p, mp, seeds, row_ids, ns, logprobs, lead, row0=0):
    """The backend's draws for prepared rows r: (tokens, logprobs, ranks) flat (rows, ns); raises for bad
    rows (row numbers counted from row0 in the leading shape `lead`)."""
    tokens, lp, ranks, status = _backend.get(r.backend).sample(r.x, r.dtype, r.temperature, r.softcap, k, p,
                                                               mp, seeds, row_ids, ns, logprobs, r.chunk,
                                                               r.threads)
    if r.rows and np.any(status):
        i = int(np.flatnonzero(status)[0])
        raise bad_row_error(int(status[i]), row0 + i, lead)
    return tokens, (lp.astype(r.result_dtype) if logprobs else None), ranks


def bad_row_error(status, i, lead, note=None):
    """The ValueError for flat row ``i`` that cannot be sampled (its status; ``note``: how it was found)."""
    where = f" ({row_name(i, lead)})" if lead else ""
    return ValueError(f"sample: cannot sample from a row that {_STATUS[status]}{where}"
                      + (f"; {note}" if note else ""))


def _num_samples(num_samples):
    return int_arg(num_samples, "num_samples", "a positive integer below 2**32", 1, 2**32 - 1)


def sample_source(src, temperature, top_k, top_p, min_p, seed, ns, logprobs, kw, progress=None):
    """sample() of a source, block of rows by block of rows. Per-row arguments are sliced with the blocks;
    one seed keys every row by its index in the whole source. A row larger than the memory budget is
    drawn in passes over its columns (fastlogits/stream/wide.py): the same tokens. progress(rows, nbytes)
    is called after each block or wide row (the command line's bar)."""
    ns = _num_samples(ns)
    need_vocab("sample", src.V)
    from fastlogits.stream import run as stream_run
    from fastlogits.stream import wide

    args = {name: stream_run.RowArg(v, name, src, dtype=None) for name, v in
            (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p))
            if v is not None}
    per_row_seed = seed is not None and not isinstance(seed, (int, np.integer)) and np.ndim(seed) > 0
    if per_row_seed:
        args["seed"] = stream_run.RowArg(seed, "seed", src, dtype=None, per_row=True)   # never broadcast
    elif seed is None:
        seed = secrets.randbits(64)
    parts, rows = [], 0
    lead_all = tuple(src.shape[:-1]) if src.shape[0] is not None else None
    # every argument is checked over the whole source first: an error names its row there, as in memory,
    # and comes before any row is read
    raw = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p, "seed": seed}
    for name, arg in args.items():
        # a scalar as the caller gave it, so that an error shows it so ('1', not array('1'))
        value = raw[name] if arg.scalar else arg.value if lead_all is None else arg.value.reshape(lead_all)
        lead = np.shape(value)
        n = int(np.prod(lead, dtype=np.int64))
        if name == "temperature":
            temperatures(value, lead, n, allow_zero=True, name=src.dtype)
        elif name == "seed":
            _seeds(value, lead, n)
        else:
            _filters(*(value if f == name else None for f in ("top_k", "top_p", "min_p")), lead, n)
    # the sampler's scratch where a row uses top-k or top-p: 4 values of 8 bytes per column
    filtered = (("top_k" in args and np.any((args["top_k"].value > 0) & (args["top_k"].value < src.V)))
                or ("top_p" in args and np.any(args["top_p"].value < 1)))
    plan = stream_run.plan(src, out_itemsize=32 if filtered else 0)

    def params(r0, r1, r):
        """The filters, seeds and row ids of rows r0 .. r1 (prepared as r)."""
        a = {name: arg.block(r0, r1) for name, arg in args.items()}
        k, p, mp = _filters(a.get("top_k"), a.get("top_p"), a.get("min_p"), r.lead, r.rows)
        seeds, row_ids = _seeds(a["seed"] if per_row_seed else seed, r.lead, r.rows)
        if not per_row_seed:
            row_ids += np.uint64(r0)
        return k, p, mp, seeds, row_ids

    if plan.rows:
        for r0, block in stream_run.row_blocks(src, plan.rows):
            r1 = r0 + block.shape[0]
            t = args["temperature"].block(r0, r1) if "temperature" in args else 1.0
            r = prepare(block, temperature=t, allow_zero_temperature=True, grain_chunks=SAMPLE_GRAIN_CHUNKS,
                        **kw)
            lead = lead_all if lead_all is not None else (r1,)
            parts.append(_draw(r, *params(r0, r1, r), ns, logprobs, lead, r0))
            rows = r1
            if progress:
                progress(block.shape[0], block.nbytes)
    else:
        stream_run.check_backend(kw["backend"])       # such rows are drawn on the CPU whatever it is
        cols = stream_run.plan(src, out_itemsize=wide.BYTES_PER_VALUE).cols
        # a read-once source is spooled through two more input buffers: half the chunk fits the budget
        cols = cols if src.random_access else max(1, cols // 2)
        empty = np.zeros((1, 0), NP_DTYPES[src.dtype])
        for i, row in stream_run.single_rows(src, cols):
            t = args["temperature"].block(i, i + 1) if "temperature" in args else 1.0
            r = prepare(empty, temperature=t, allow_zero_temperature=True, **dict(kw, backend="cpu"))
            k, p, mp, seeds, row_ids = params(i, i + 1, r)
            status, tok, lp, rk = wide.sample_row(
                row, temperature=float(r.temperature[0]), softcap=r.softcap, top_k=int(k[0]),
                top_p=float(p[0]), min_p=float(mp[0]), seed=int(seeds[0]), row_id=int(row_ids[0]),
                num_samples=ns, logprobs=logprobs, cols=cols)
            if status:
                raise bad_row_error(status, i, lead_all if lead_all is not None else (i + 1,))
            parts.append((tok[None], None if lp is None else lp[None].astype(r.result_dtype),
                          None if rk is None else rk[None]))
            rows = i + 1
            if progress:
                progress(1, src.V * NP_DTYPES[src.dtype].itemsize)
    for arg in args.values():
        arg.check_rows(rows)
    lead = lead_all if lead_all is not None else (rows,)
    shape = lead + ((ns,) if ns > 1 else ())
    lp_dtype = compute_dtype(src.dtype)
    cat = [np.concatenate([pt[j] for pt in parts]) if parts else
           np.empty((0, ns), (np.int64, lp_dtype, np.int64)[j]) for j in range(3 if logprobs else 1)]

    def fit(a):
        return scalar_if_0d(a.reshape(shape))

    return tuple(fit(a) for a in cat) if logprobs else fit(cat[0])


@ordered
@shared_params
def beam_search_step(logits, beam_scores, beam_width, *, softcap=None, temperature=1.0, backend=None,
                     threads=None, chunk_size=None):
    """One step of beam search: the ``2 * beam_width`` best continuations of each batch item.

    ``logits`` is ``(batch * beam_width, V)`` (beam j of item b in row ``b * beam_width + j``, as Hugging
    Face lays beams out) and ``beam_scores`` ``(batch * beam_width,)``, the beams' cumulative
    log-probabilities. A continuation (beam j, token t) scores ``beam_scores[j] + log_softmax(logits[j])[t]``
    (after ``softcap`` and ``temperature``). Returns ``(scores, parents, tokens)``, each
    ``(batch, 2 * beam_width)``, best first (by the float64 sums, before a float32 result rounds them);
    equal scores go to the lower parent, and within a beam keep the order of the logits (the larger logit,
    then the lower token): two tokens whose log-probabilities round to the same value come in the order of
    their exact likelihood, as the beam's top 2W are chosen by logit (Hugging Face's ``topk`` of float32
    scores would take the lower token). ``parents`` are beam indices within the batch item (0 ..
    beam_width - 1), as HF's ``next_indices``. One streaming pass over each row:
    ``top_k_logprobs(logits, 2 * beam_width)`` (a running top-2W with the logsumexp in the same
    pass), so a source in place of ``logits`` streams in bounded memory, rows wider than the budget
    included, with the same results. The log-probabilities are float32 (float64 for float64 logits), as
    ``top_k_logprobs`` gives them; scores are float64 when the logits or beam_scores are float64, else
    float32. A NaN score (a NaN beam score, or a row whose log-softmax is NaN: a NaN or +inf logit) ranks
    above every number, as in ``top_k`` and ``torch.topk`` (and so in Hugging Face's beam search): a beam
    gone NaN shows in its item's first places, never dropped silently.

    Parameters
    ----------
    logits : array_like of shape (batch * beam_width, V), a GPU array, or a source (fastlogits.open)
    beam_scores : array of shape (batch * beam_width,); with device logits, a host or GPU array (read
        in place: the step runs on the device with no wait for it, and its results are device arrays)
    beam_width : int >= 1
    {temperature}
    {shared}

    Examples
    --------
    >>> import numpy as np
    >>> from fastlogits.ops.sampling import beam_search_step
    >>> x = np.log(np.array([[0.6, 0.4], [0.9, 0.1]]))
    >>> s, p, t = beam_search_step(x, np.log(np.array([0.5, 0.5])), 2)
    >>> p.tolist(), t.tolist()
    ([[1, 0, 0, 1]], [[0, 0, 1, 1]])
    """
    W = int_arg(beam_width, "beam_width", "a positive integer", 1)
    src = as_source(logits)
    if src is not None:
        if len(src.shape) != 2:
            raise ValueError(f"beam_search_step: logits must be 2-D (batch * beam_width, V), got shape "
                             f"{src.shape}")
        rows, V, dtype, device = src.shape[0], src.V, src.dtype, None
    else:
        r = prepare(logits, temperature=temperature, softcap=softcap, backend=backend, threads=threads,
                    chunk_size=chunk_size)
        if len(r.lead) != 1:
            raise ValueError(f"beam_search_step: logits must be 2-D (batch * beam_width, V), got shape "
                             f"{r.lead + (r.V,)}")
        rows, V, dtype, device = r.rows, r.V, r.dtype, r.x if is_gpu_array(r.x) else None
    if rows is not None and rows % W:
        raise ValueError(f"beam_search_step: logits has {rows} rows, not a multiple of beam_width={W}")
    if V < 2:
        raise ValueError(f"beam_search_step: a vocabulary of {V} token{'s' * (V != 1)} gives fewer than "
                         f"2 * beam_width continuations per batch item (beam_width beams x {V}); it needs "
                         "at least 2 tokens")
    if is_gpu_array(beam_scores):                 # read in place with device logits, else copied here
        gpu = _backend.get("gpu")
        view = gpu.device_view if device is not None else gpu.to_host
        bs = view(beam_scores, "beam_scores")
    else:
        bs = number_array(beam_scores, "beam_scores")    # (a tensor read as temperatures are)
    if np.dtype(bs.dtype).kind not in "fiu":
        raise TypeError(f"beam_scores must be a float array, got dtype {bs.dtype}")
    if rows is not None and tuple(bs.shape) != (rows,):
        raise ValueError(f"beam_scores must have shape ({rows},) (one per row of logits), got "
                         f"{tuple(bs.shape)}")
    k = min(2 * W, V)
    out_dtype = (np.dtype(np.float64) if dtype == "float64" or bs.dtype == np.float64
                 else np.dtype(np.float32))
    if device is not None:       # GPU arrays in, GPU arrays out, with no wait for the device
        round32 = r.result_dtype != np.float64            # log-probabilities as top_k_logprobs gives them
        return _backend.get(r.backend).beam_search_step_device(r.x, r.dtype, r.temperature, r.softcap, bs, W,
                                                               k, r.chunk, round32, out_dtype)
    if src is not None:      # streamed as top_k_logprobs (rows wider than the budget included)
        from fastlogits.ops.selection import top_k_logprobs

        lp, idx = top_k_logprobs(src, k, temperature=temperature, softcap=softcap, backend=backend,
                                 threads=threads, chunk_size=chunk_size)
        rows = lp.shape[0]
        if rows % W or bs.shape != (rows,):
            raise ValueError(f"beam_search_step: logits has {rows} rows, expected a multiple of "
                             f"beam_width={W} and one per beam score (beam_scores has shape {bs.shape})")
    else:
        lp, idx = _backend.get(r.backend).top_k(r.x, r.dtype, r.temperature, r.softcap, k, True, r.chunk,
                                                r.threads)
        lp = np.asarray(lp).astype(r.result_dtype)     # as top_k_logprobs gives them, from a source too
    lp, idx = np.asarray(lp, np.float64), np.array(idx)
    batch = rows // W
    # a finished beam (score -inf) ties all its continuations at -inf: the lowest tokens are its best, by
    # the tie rule below (its top-k by log-probability would not be)
    dead = (bs == -np.inf) & ~np.isnan(lp).any(axis=1)
    idx[dead] = np.arange(idx.shape[1])
    scores = (bs.astype(np.float64)[:, None] + lp).reshape(batch, W * k)
    parents = np.broadcast_to(np.repeat(np.arange(W), k)[None, :], (batch, W * k))
    toks = idx.reshape(batch, W * k)
    # a beam's candidates in top_k's order (larger logit, then lower token; a dead beam's by token)
    rank = np.broadcast_to(np.tile(np.arange(k), W)[None, :], (batch, W * k))
    num = ~np.isnan(scores)      # NaN first, then best first (NaN a key of its own, not -inf's)
    order = np.lexsort((rank, parents, np.where(num, -scores, 0.0), num), axis=-1)[:, : 2 * W]
    take = np.take_along_axis
    return (take(scores, order, -1).astype(out_dtype), take(parents, order, -1).astype(np.int64),
            take(toks, order, -1).astype(np.int64))
