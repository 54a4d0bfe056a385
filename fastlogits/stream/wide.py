"""Sampling a row wider than the memory budget, in passes over its columns.

``sample`` of a source draws the rows that fit the budget with the in-memory sampler, a block of rows at
a time. A row that does not fit is drawn here, from a one-row random-access source (a row of a file or
an array, or a row of standard input spooled to a temporary file), in passes over its column chunks;
memory is set by the chunk, not by the row:

1. the max and argmax of the values (after softcap and temperature), which also finds a row that cannot
   be sampled (a NaN, a +inf, no possible token); a greedy row ends here;
2. top-k: the k-th largest value by a radix select on the values' order-preserving bit patterns
   (``DIGIT`` bits a pass: 3 passes for float32 values, 6 for float64; 8 bits for small chunks)
   counting each bucket's tokens; every token tied with it survives, as Hugging Face keeps them;
3. top-p: the nucleus' boundary value by the same radix select on probability mass instead of counts,
   over the top-k survivors renormalised (a mass within 16 eps of top_p reaches it, as in memory); where
   the nucleus needs only some of the tokens tied at that value (the last ones, as Hugging Face's stable
   sort keeps them: their number is their mass over one's), one more pass finds the first kept (the cut);
4. min-p: ``x_max + log(min_p)``, rounded up (``_sample.with_min_p``, the C core's);
5. the Gumbel-max over the survivors (the values at or above the largest of those thresholds), with the
   in-memory sampler's noise and conservative test (``fl__gumbel_chunk``), all samples in one pass;
6. with log-probabilities, one more pass for the sampled tokens' ranks and the survivors' mass.

A few k (their copies fit in a chunk's scratch: top_k at most cols / 16) take one pass instead: it keeps
the k largest values and their tokens, with the max, and the survivors are among them, so top-p, min-p,
the draw (the same float64 keys, from ``_sample.noise``) and the log-probabilities run in memory. Only
where tokens tied with the k-th value were left out of the k does one more pass count them (for top-p's
mass), and the draw then runs in passes if they survive every filter. Top-k with top-p reads a row once,
with or without log-probabilities, where it read float32 values six or seven times.

In both samplers the survivors are the tokens above one threshold and those equal to it from a cut on,
and a token's key is the same float64 number, so the tokens are those the row in memory gives, except
where top-p's cumulative mass lands within rounding of top_p (the two add the mass in different orders,
as the GPU sampler does too); log-probabilities agree to rounding.
"""
import math

import numpy as np

from fastlogits.cpu import _reduce, _sample
from fastlogits.cpu.backend import CODES, aligned, compute_dtype
from fastlogits.stream.run import column_chunks

DIGIT = 11               # bits of the value's key per radix pass (8 for chunks under 2^16 columns)
BYTES_PER_VALUE = 16     # per column of a chunk: its values in the compute type (at most 8 bytes), and 8
                         # for the selections' scratch (histograms, the k largest)

OK, NAN, POSINF, EMPTY = _sample.OK, _sample.NAN, _sample.POSINF, _sample.EMPTY   # the C sampler's


def _logprobs(xt, m, mass):
    """The drawn tokens' log-probabilities from their values xt, the row's max m and the mass they were
    drawn from: (x - m) - log s, as log-softmax and the C sampler form them (exact at any m), with the
    core's log."""
    log_s = np.empty(mass.shape[0])
    _reduce.logs(mass, log_s)
    return (xt - m) - log_s


def _value(key, vdt):
    """The value of a key (the radix passes' keys: unsigned, in the order of the values), a float."""
    bits = 8 * vdt.itemsize
    top, mask = 1 << (bits - 1), (1 << bits) - 1
    b = key ^ top if key & top else ~key & mask
    return float(np.array(b, np.uint32 if bits == 32 else np.uint64).view(vdt)[()])


def _select(passes, vdt, want, mass=None, digit=DIGIT):
    """(x*, above, own, goal): the largest value x* such that the tokens with values >= x* reach `want`: a
    count of tokens, or, with mass = (theta, m), the fraction `want` of the mass exp(x - m) of the tokens
    with x >= theta; the weight (count or mass) of the values above x*, and that of x*'s own tokens; and
    the goal in those units. A
    radix select from the top: each pass histograms one digit of the keys of the tokens whose higher
    digits are those chosen so far (``_sample.radix_counts``, ``radix_mass``), and chooses the bucket
    where the cumulative count (or mass) from the top reaches the goal."""
    bits = 8 * vdt.itemsize
    prefix, above, goal, shift = 0, 0, None if mass else want, bits
    while shift:
        width = min(digit, shift)
        shift -= width
        hist = np.zeros(1 << width, np.float64 if mass else np.int64)
        for _, v in passes():
            if mass:
                _sample.radix_mass(v, shift, width, prefix, mass[0], mass[1], hist)
            else:
                _sample.radix_counts(v, shift, width, prefix, hist)
        if goal is None:
            goal = want * hist.sum()      # the first pass holds every token
        down = hist[::-1]
        cum = above + np.cumsum(down)
        hits = np.flatnonzero(cum >= goal)
        # rounding may leave a deeper pass's total below the goal: its lowest bucket with mass then
        j = int(hits[0]) if hits.size else int(np.flatnonzero(down > 0)[-1])
        above = cum[j - 1] if j else above
        prefix = (prefix << width) | ((1 << width) - 1 - j)
    return _value(prefix, vdt), float(above), float(down[j]), float(goal)   # (last pass: a value a bucket)


def _drop(T, q, above, goal):
    """Of T tokens tied at the nucleus' boundary, each of mass q, under the mass `above` (< goal) of the
    tokens above them: how many top-p drops, the first ones (fl__topp_drop's closed form)."""
    need = math.ceil((goal - above) / q) if q > 0 else math.inf
    return T - (min(T, max(1, need)) if need < math.inf else T)


def _nth_equal(passes, v, j):
    """The token of the (j + 1)-th value equal to v, counting from token 0, in one pass (stopping there)."""
    for c0, x in passes():
        hit = np.flatnonzero(x == v)
        if hit.size > j:
            return c0 + int(hit[j])
        j -= hit.size
    raise AssertionError("fewer tied tokens than counted")      # not reached


def _k_largest(passes, k):
    """The k largest values of a row (k below its length) and their tokens, by value descending then
    token, in one pass: the k + 1 largest of each chunk (the C top-k, NaN first) merged with those of
    the chunks before. Returns (values, tokens, cut), cut the largest value left out (so a value equal to
    the k-th may have been left out only if cut equals it), or None for a row holding a NaN."""
    from fastlogits.ops.selection import _top_k

    vals, toks, cut = np.empty(0), np.empty(0, np.int64), -math.inf
    for c0, v in passes():
        _, top, idx = _top_k(v[None], min(k + 1, v.shape[0]), False, 1.0, None, "cpu", 1, None)
        top = np.asarray(top[0], np.float64)
        if np.isnan(top[0]):
            return None
        vals, toks = np.concatenate([vals, top]), np.concatenate([toks, idx[0] + c0])
        order = np.lexsort((toks, -vals))
        vals, toks = vals[order], toks[order]
        if vals.size > k:
            cut = max(cut, float(vals[k]))
            vals, toks = vals[:k], toks[:k]
    return vals, toks, cut


def _nucleus(vals, extra, m, p):
    """(tau, drop): the nucleus' boundary value among survivors held in memory, values `vals`
    (descending) and `extra` more tokens equal to the last: the largest value whose tokens at or above it
    reach the fraction p of their mass exp(x - m), as ``_select`` finds it by passes; and how many of the
    tokens tied at it the nucleus drops (``_drop``)."""
    w = np.exp(vals - m)
    cum = np.cumsum(w)
    cum[-1] += extra * w[-1]
    ends = np.append(vals[:-1] != vals[1:], True)        # the last token of each value
    hits = np.flatnonzero(ends & (cum >= p * cum[-1]))
    # rounding may leave the total below the goal: the lowest value with mass then
    tau = float(vals[hits[0]] if hits.size else vals[np.flatnonzero(w > 0)[-1]])
    tied = vals == tau
    first = int(np.argmax(tied))
    T = int(np.count_nonzero(tied)) + (extra if tau == vals[-1] else 0)
    return tau, _drop(T, float(w[first]), float(cum[first - 1]) if first else 0.0, p * cum[-1])


def sample_row(row, *, temperature, softcap, top_k, top_p, min_p, seed, row_id, num_samples, logprobs,
               cols):
    """Draws num_samples tokens from one row (a random-access source of one row) in chunks of `cols`
    columns, with checked arguments: temperature a float (0: greedy), softcap a float (0: none), top_k an
    int (0: none), top_p in (0, 1], min_p in [0, 1], the generator's seed and row id. Returns (status,
    tokens, logprobs, ranks): arrays of num_samples (logprobs and ranks None unless asked for), or the
    status alone (NAN, POSINF, EMPTY) when the row cannot be sampled."""
    vdt = compute_dtype(row.dtype)
    greedy = temperature == 0.0
    t = np.array([1.0 if greedy else temperature])        # greedy: the argmax of the capped logits
    code, buf, ns = CODES[row.dtype], np.empty(max(1, cols), vdt), num_samples

    def passes():
        for _, c0, chunk in column_chunks(row, cols):
            v = buf[:chunk.shape[1]]
            _sample.values(aligned(chunk), code, t, softcap, v)
            yield c0, v

    p = _sample.topp_goal(top_p, float(np.finfo(vdt).eps))     # a mass within 16 eps of top_p reaches it
    if not greedy and 0 < top_k < row.V and top_k <= cols // 16:
        # a few k: their copies (80 bytes each at most) fit in the scratch of a chunk, and the k largest,
        # found with the max in one pass, hold the survivors, so the filters and the draw run in memory
        found = _k_largest(passes, top_k)
        if found is None:
            return NAN, None, None, None
        return _sample_survivors(passes, *found, min_p, p, seed, row_id, ns, logprobs, vdt)
    m, top = -math.inf, -1
    for c0, v in passes():
        cm = v.max()
        if np.isnan(cm):
            return NAN, None, None, None
        if cm > m:
            m, top = float(cm), c0 + int(np.argmax(v))
    if m == -math.inf:
        return EMPTY, None, None, None
    if greedy:
        tokens = np.full(ns, top, np.int64)
        if not logprobs:
            return OK, tokens, None, None
        return OK, tokens, np.zeros(ns), np.zeros(ns, np.int64)
    if m == math.inf:
        return POSINF, None, None, None
    theta, cut = -math.inf, 0
    digit = DIGIT if cols >= 1 << 16 else 8     # histograms of 2^11 values of 8 bytes, or of 2^8
    if 0 < top_k < row.V:                        # a radix select counting tokens (3 passes for float32
        theta = _select(passes, vdt, top_k, None, digit)[0]       # values, 6 for float64)
    if top_p < 1.0:
        tau, above, own, goal = _select(passes, vdt, p, (theta, m), digit)
        q = math.exp(tau - m)                      # each tied token's mass (as radix_mass adds them)
        drop = _drop(int(own / q + 0.5), q, above, goal) if q > 0 else 0
        theta, cut = tau, _nth_equal(passes, tau, drop) if drop else 0      # (tau >= theta, top-k's)
    theta, cut = _sample.with_min_p(theta, cut, m, min_p)
    return _draw(passes, theta, m, seed, row_id, ns, logprobs, cut)


def _parts(passes, theta, cut):
    """(c0, v, threshold) of the row's chunks, a chunk cut in two at token `cut`: the survivors are the
    values above theta before it (threshold: the next value up), at or above it from it on."""
    for c0, v in passes():
        j = min(max(cut - c0, 0), v.shape[0])
        if j:
            with np.errstate(over="ignore"):     # above the largest finite value: inf, which nothing reaches
                above = float(np.nextafter(v.dtype.type(theta), v.dtype.type(np.inf)))
            yield c0, v[:j], above
        if j < v.shape[0]:
            yield c0 + j, v[j:], theta


def _draw(passes, theta, m, seed, row_id, ns, logprobs, cut=0):
    """The Gumbel-max over the survivors (the tokens above theta, and those equal to it from token cut
    on) in one pass, and their log-probabilities in one more; returns sample_row's tuple."""
    best, tokens, xt = _sample.no_keys(ns), np.full(ns, -1, np.int64), np.zeros(ns)
    for c0, v, th in _parts(passes, theta, cut):
        _sample.gumbel_values(v, c0, th, seed, row_id, best, tokens)
        here = (tokens >= c0) & (tokens < c0 + v.shape[0])     # the values of the tokens found here
        xt[here] = v[tokens[here] - c0]
    if np.any(tokens < 0):
        return EMPTY, None, None, None
    if not logprobs:
        return OK, tokens, None, None
    ranks, mass = np.zeros(ns, np.int64), np.zeros(ns)
    for _, v, th in _parts(passes, theta, cut):
        _sample.rank_mass_values(v, xt, th, m, ranks, mass)
    return OK, tokens, _logprobs(xt, m, mass), ranks


def _sample_survivors(passes, vals, toks, cut, min_p, p, seed, row_id, ns, logprobs, vdt):
    """sample_row from the k largest values of a row (``_k_largest``): top-p and min-p on them, and the
    Gumbel-max over the survivors with the noise of their tokens (``_sample.noise``: the same keys as the
    passes'). Where tokens tied with the k-th value were left out (cut equals it), one pass
    counts them for top-p's mass, and if they survive every filter the draw runs in passes (one more
    finds top-p's cut where the nucleus drops some of them)."""
    m, kth = float(vals[0]), float(vals[-1])
    if m == -math.inf:
        return EMPTY, None, None, None
    if m == math.inf:
        return POSINF, None, None, None
    extra = 0
    if cut == kth > -math.inf:
        extra = sum(int(np.count_nonzero(v == kth)) for _, v in passes()) - int(np.count_nonzero(vals == kth))
    theta, drop = kth, 0
    if p < 1.0:
        theta, drop = _nucleus(vals, extra, m, p)
    theta, drop = _sample.with_min_p(theta, drop, m, min_p)
    if extra and theta <= kth:                    # survivors out of memory: the draw in passes
        first = _nth_equal(passes, theta, drop) if drop else 0
        return _draw(passes, theta, m, seed, row_id, ns, logprobs, first)
    first = int(np.sort(toks[vals == theta])[drop]) if drop else 0        # the ties are all in memory
    keep = (vals > theta) | ((vals == theta) & (toks >= first))
    sv, st = vals[keep], toks[keep]
    order = np.argsort(st)                        # by token: the lowest wins a tie of keys, as in passes
    sv, st = sv[order], st[order]
    tokens, xt = np.empty(ns, np.int64), np.empty(ns)
    for s in range(ns):
        j = _sample.key_argmax(np.ascontiguousarray(sv, np.float64), _sample.noise(seed, row_id, s, st)[2])
        tokens[s], xt[s] = st[j], sv[j]
    if not logprobs:
        return OK, tokens, None, None
    ranks, mass = np.zeros(ns, np.int64), np.zeros(ns)
    _sample.rank_mass_values(sv.astype(vdt), xt, theta, m, ranks, mass)
    return OK, tokens, _logprobs(xt, m, mass), ranks
