"""Seeded sampling on the GPU (numba.cuda): the C core's sampler (fastlogits_sample.h), the same tokens.

# Design
#
# - Random numbers: Philox-4x32-10 with the C core's key and counter layout, in uint64 arithmetic on 32-bit
#   words, so that the simulator (NumPy scalars) and the GPU compute the C core's integers. Counter
#   q = 16 * (t // 64) + t % 16 gives the words of tokens t, t + 16, t + 32, t + 48 (its four outputs):
#   a thread takes a counter and its four tokens. Stream 0 is the high word of a token's uniform, stream 1
#   (computed for candidates only) the low one; the Gumbel noise -log(-log(u)) is computed in float64.
# - The draw: argmax over the surviving tokens of x + g (x the transformed logit in the compute type, the
#   key the exact sum as two float64, as the C core's fl_key), the lowest index on ties. A conservative
#   test on the high word (g < -log(a)) lets only tokens that can beat the thread's best so far compute
#   their exact noise, as in the C core; the chosen token is exactly the argmax, whatever the segments and
#   block size.
# - Survivors are the tokens with x > theta[row], the largest of the filters' thresholds, and those equal
#   to it from token cut[row] on, computed once per row by `prepare`: the row's logsumexp state (max M,
#   sum S); top-k's threshold (the k-th largest value, repeats counted) and top-p's (the value where the
#   probability mass cumulated from the top first reaches p), both by one radix select; min-p's,
#   M + log(min_p) rounded up (minp_bound). The cut is 0 but where the nucleus needs only some of the
#   tokens tied at top-p's threshold: it keeps the last ones, as Hugging Face's stable sort does (one more
#   pass finds the first).
# - Radix select: the values' order-preserving integer keys (32 bits for float32, 64 for float64), 11 bits
#   per pass from the top. Each pass adds the weight (1 for top-k, exp(x - M) for top-p) of every token
#   whose key starts with the prefix chosen so far into 2048 shared-memory bins (float64 atomics), and
#   thread 0 walks the bins from the top to the one where the cumulated weight reaches the goal. Three
#   passes for float32 (six for float64) give the exact value: no sort and no candidate buffer. Top-p
#   without top-k bins only the tokens above t0 = lse + log(1 - p) - log(V) (the nucleus lies above it:
#   those below hold less than 1 - p of the mass together), as the C core's histogram does.
# - Passes over a row (float32): greedy and plain temperature sampling take one (the draw); min-p two (the
#   logsumexp, the draw); top-k four (three radix passes, the draw); top-p five; top-k with top-p eight.
#   return_logprobs adds the logsumexp pass where there is none, and one pass per sample for the ranks. The
#   C core streams top-k in one pass with a heap; here rows sit whole in device memory, and a radix select
#   keeps every thread busy where a shared heap would serialize them.
# - Kernels loop over their work items (rows, or (row, segment, sample)) with a grid stride. The Gumbel
#   kernel takes one barrier per item (its shared memory is double-buffered); a radix pass takes two. The
#   CUDA simulator runs this same code; its cost (about 7 ms a barrier for 128 threads) sizes the tests.
# - Beam search: the top-2W log-probabilities of each beam come from the top-k kernels; `beam_merge` ranks
#   each item's W * 2W continuations by counting (one thread per continuation, no sort, no barrier).
#
# Statuses, the C core's (OK, NAN, POSINF, EMPTY below): a NaN in the row, a +inf at a positive
# temperature, no possible token (all -inf).
"""
import math
from types import SimpleNamespace

import numpy as np
from numba import config, cuda, float32, float64, int64

from fastlogits.cpu import _sample
from fastlogits.gpu import kernels as K
from fastlogits.gpu.device import INT64_MAX

TPB = K.TPB
RADIX = 11                   # bits per radix pass
NBINS = 1 << RADIX

NAN_SEEN, POSINF_SEEN = 1, 2
OK, NAN, POSINF, EMPTY = _sample.OK, _sample.NAN, _sample.POSINF, _sample.EMPTY

MASK32 = np.uint64(0xFFFFFFFF)
SIGN32 = np.uint64(0x80000000)
LOW31 = np.uint64(0x7FFFFFFF)
SIGN64 = np.uint64(0x8000000000000000)
LOW63 = np.uint64(0x7FFFFFFFFFFFFFFF)
M0 = np.uint64(0xD2511F53)
M1 = np.uint64(0xCD9E8D57)
W0 = np.uint64(0x9E3779B9)
W1 = np.uint64(0xBB67AE85)
U1 = np.uint64(1)
U12 = np.uint64(12)
U20 = np.uint64(20)
U32 = np.uint64(32)
TWO_M31 = 4.656612873077393e-10      # 2^-31
TWO_M53 = 1.1102230246251565e-16     # 2^-53


# ---- the generator (Random123's philox4x32_10; the C core's fl_rng_word and fl_gumbel_from_words) ---------

@cuda.jit(device=True)
def philox(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1): 32-bit words held in uint64."""
    for _ in range(10):
        p0 = c0 * M0
        p1 = c2 * M1
        c0 = (p1 >> U32) ^ c1 ^ k0
        c1 = p1 & MASK32
        c2 = (p0 >> U32) ^ c3 ^ k1
        c3 = p0 & MASK32
        k0 = (k0 + W0) & MASK32
        k1 = (k1 + W1) & MASK32
    return c0, c1, c2, c3


@cuda.jit(device=True)
def pick(w, a, b, c, d):
    """Word w (0..3) of a Philox output."""
    if w == 0:
        return a
    if w == 1:
        return b
    if w == 2:
        return c
    return d


@cuda.jit(device=True)
def gumbel(hi, lo):
    """The float64 Gumbel noise of a token from its two words: u = (2 k + 1) / 2^53, k the 52-bit
    (hi, lo >> 12), in (0, 1) exactly; -log(-log(u))."""
    k = (hi << U20) | (lo >> U12)
    u = float64(k + k + U1) * TWO_M53
    return -math.log(-math.log(u))


# ---- order-preserving integer keys of the compute type's values (for the radix select) -----------------

@cuda.jit(device=True)
def _bits32(v):
    return np.uint64(K.f32_bits(v))


if config.ENABLE_CUDASIM:
    # the simulator has no libdevice; NumPy views give the same bits
    @cuda.jit(device=True)
    def _bits64(v):
        return np.array(v, np.float64).view(np.uint64)[()]

    @cuda.jit(device=True)
    def _from_bits64(b):
        return np.array(b, np.uint64).view(np.float64)[()]

    @cuda.jit(device=True)
    def _next_down(v):
        return math.nextafter(v, -math.inf)
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def _bits64(v):
        return np.uint64(libdevice.double_as_longlong(v))

    @cuda.jit(device=True)
    def _from_bits64(b):
        return libdevice.longlong_as_double(np.int64(b))

    @cuda.jit(device=True)
    def _next_down(v):
        return libdevice.nextafter(v, -math.inf)


@cuda.jit(device=True)
def key32(v):
    """float32 v (not NaN, -0.0 made +0.0) -> uint64 key < 2^32, ordered as the values."""
    b = _bits32(v)
    if b & SIGN32:
        return (~b) & MASK32
    return b | SIGN32


@cuda.jit(device=True)
def value32(key):
    if key & SIGN32:
        return K.f32_from_bits(key & LOW31)
    return K.f32_from_bits((~key) & MASK32)


@cuda.jit(device=True)
def key64(v):
    b = _bits64(v)
    if b & SIGN64:
        return ~b
    return b | SIGN64


@cuda.jit(device=True)
def value64(key):
    if key & SIGN64:
        return _from_bits64(key & LOW63)
    return _from_bits64(~key)


# ---- work items and candidates ------------------------------------------------------------------------

@cuda.jit(device=True)
def item_of(it, nseg, ns):
    """Work item it -> (row, segment, sample), samples fastest."""
    return it // (nseg * ns), (it // ns) % nseg, it % ns


@cuda.jit(device=True)
def gumbel_key(x, g):
    """The key of a token: the exact sum x + g as (hi, lo), the rounded sum and its rounding error
    (TwoSum; the C core's fl_key_of). Keys compare by hi, then lo: the order of the exact sums."""
    hi = x + g
    xr = hi - g
    return hi, (x - xr) + (g - (hi - xr))


@cuda.jit(device=True)
def minp_bound(m, min_p):
    """min-p's threshold: the smallest float64 at or above the exact m + log(min_p) (TwoSum's error says
    which way the sum rounded, as a key holds it; the C core's fl__minp_bound)."""
    t, err = gumbel_key(m, math.log(min_p))
    if err > 0.0:
        return -_next_down(-t)
    return t


@cuda.jit(device=True)
def key_floor(hi, lo):
    """A float64 at or below the exact sum hi + lo (the C core's fl_key_floor)."""
    return _next_down(hi) if lo < 0.0 else hi


@cuda.jit(device=True)
def _better(k, kl, i, kb, kbl, ib):
    """Candidate (key (k, kl), index i) beats ((kb, kbl), ib): a larger key, the lower index on ties; i < 0
    is none."""
    return i >= 0 and (ib < 0 or k > kb or (k == kb and (kl > kbl or (kl == kbl and i < ib))))


# ---- kernels that read logits, one set per input kind ---------------------------------------------------

def _build(kind):
    base = K.for_kind(kind)
    value, load_chunk, fold_chunk = base.value, base.load_chunk, base.fold_chunk
    UNROLL = base.unroll          # (constants of the kernels below: local array sizes must be)
    CT = base.compute.type
    f64 = base.compute == np.float64
    NBITS = 64 if f64 else 32
    key_of = key64 if f64 else key32
    value_of = value64 if f64 else value32

    @cuda.jit(device=True)
    def radix_select(x, r, sc, T, mass, goal, lb, M, hist, sel, tid):
        """The value tau of row r where the weight cumulated from the largest value down first reaches
        `goal` (tokens with x < lb and NaN left out; weight 1, or exp(x - M) when mass): the weight of the
        values above tau is below the goal, with tau's own it reaches it. goal < 0 means -goal times the
        total weight. Where rounding keeps the total below the goal, tau is the smallest value. On return
        sel (4,) holds, for every thread, the weight above tau (sel[1]), tau's own (sel[2]) and the goal
        (sel[3], resolved). Every thread of the block calls it; hist (2, NBINS) is zero on entry and on
        return."""
        V = x.shape[1]
        prefix = np.uint64(0)
        shift = NBITS
        above = 0.0
        gl = goal
        npass = 0
        while shift > 0:
            width = min(RADIX, shift)
            shift -= width
            par = npass % 2
            dmask = np.uint64((1 << width) - 1)
            for j in range(tid, V, TPB):
                v = value(x, r, j, sc, T) + CT(0)        # -0.0 -> +0.0: keys order as values compare
                if float64(v) >= lb:
                    key = key_of(v)
                    if npass == 0 or (key >> np.uint64(shift + width)) == prefix:
                        w = float64(CT(math.exp(v - M))) if mass else 1.0
                        cuda.atomic.add(hist, (par, int64((key >> np.uint64(shift)) & dmask)), w)
            cuda.syncthreads()
            if tid == 0:
                nb = 1 << width
                if gl < 0:
                    tot = 0.0
                    for d in range(nb):
                        tot += hist[par, d]
                    gl = -gl * tot
                hit = -1
                last = -1
                above_last = above
                for d in range(nb - 1, -1, -1):
                    hd = hist[par, d]
                    if hd > 0:
                        last = d
                        above_last = above
                    if above + hd >= gl and hd > 0:
                        hit = d
                        break
                    above += hd
                if hit < 0:          # rounding: the goal is never reached; take everything
                    hit = max(last, 0)
                    above = above_last
                sel[0] = float64(hit)
                sel[1] = above
                sel[2] = hist[par, hit]
                sel[3] = gl
            cuda.syncthreads()
            prefix = (prefix << np.uint64(width)) | np.uint64(int64(sel[0]))
            above = sel[1]
            for d in range(tid, NBINS, TPB):              # this buffer is next used two passes on
                hist[par, d] = 0.0
            npass += 1
        cuda.syncthreads()
        return value_of(prefix)

    @cuda.jit(device=True)
    def nth_equal(x, r, sc, T, tv, j, cnt, sel, tid):
        """The token of the (j + 1)-th value of row r equal to tv (j below their number), counting from
        token 0: each thread counts the ties in its run of columns (cnt, TPB), thread 0 finds the run that
        holds the one sought, and its thread finds it there. Every thread of the block calls it."""
        V = x.shape[1]
        run = (V + TPB - 1) // TPB
        lo = tid * run
        hi = min(lo + run, V)
        c = 0
        for i in range(lo, hi):
            if value(x, r, i, sc, T) == tv:
                c += 1
        cnt[tid] = float64(c)
        cuda.syncthreads()
        if tid == 0:
            before = 0.0
            for o in range(TPB):
                if before + cnt[o] > float64(j):
                    sel[0] = float64(o)
                    sel[1] = float64(j) - before
                    break
                before += cnt[o]
        cuda.syncthreads()
        if tid == int64(sel[0]):
            left = int64(sel[1])
            for i in range(lo, hi):
                if value(x, r, i, sc, T) == tv:
                    if left == 0:
                        sel[2] = float64(i)
                        break
                    left -= 1
        cuda.syncthreads()
        found = int64(sel[2])
        cuda.syncthreads()                          # (sel is written next by the caller's next step)
        return found

    @cuda.jit
    def prepare(x, temp, softcap, need, top_k, top_p, min_p, rowmax, theta, cut):
        """Per row, by need[r]: 0, theta = -inf (no filter); 1, top-k only: theta from the radix select
        alone; 2: first the logsumexp state (its max into rowmax), then theta, the largest of the thresholds
        of top_k (0: none; < V), top_p (1: none; already lowered by the tolerance) and min_p (0: none).
        cut[r]: the survivors equal to theta are the tokens from cut[r] on (0: all), where top-p keeps
        only the last of the tokens tied at its boundary (the C core's fl__topp_drop). One block per row
        at a time (grid stride)."""
        tid = cuda.threadIdx.x
        V = x.shape[1]
        sc = CT(softcap)
        lv = cuda.local.array(UNROLL, CT)
        sh_m = cuda.shared.array(TPB, float64)
        sh_s = cuda.shared.array(TPB, float64)
        bc = cuda.shared.array(2, float64)
        sel = cuda.shared.array(4, float64)
        hist = cuda.shared.array((2, NBINS), float64)
        for d in range(tid, NBINS, TPB):
            hist[0, d] = 0.0
            hist[1, d] = 0.0
        cuda.syncthreads()
        for r in range(cuda.blockIdx.x, x.shape[0], cuda.gridDim.x):
            if need[r] == 0:
                if tid == 0:
                    theta[r] = -math.inf
                    cut[r] = 0
                continue
            T = CT(temp[r])
            M = 0.0                    # top-k alone needs no max: its weights are counts
            S = 1.0
            if need[r] == 2:
                m = CT(-math.inf)
                s = 0.0
                t = 0.0
                for base_j in range(tid, V, TPB * UNROLL):
                    cmax = load_chunk(x, r, base_j, V, sc, T, lv)
                    m, s, t = fold_chunk(lv, cmax, m, s, t, False)
                sh_m[tid] = m
                sh_s[tid] = s
                K.block_merge(sh_m, sh_s, sh_s, sh_s, K.LSE, tid)
                if tid == 0:
                    bc[0] = sh_m[0]
                    bc[1] = sh_s[0]
                cuda.syncthreads()
                M = bc[0]
                S = bc[1]
            th = -math.inf
            ct = int64(0)
            if M > -math.inf and M < math.inf:         # else the row's status says why it has no draw
                Mc = CT(M)
                k = top_k[r]
                vk = -math.inf
                if k > 0:
                    vk = float64(radix_select(x, r, sc, T, False, float64(k), -math.inf, Mc, hist, sel, tid))
                th = vk
                p = top_p[r]
                drop = int64(0)
                if p < 1.0:
                    if k > 0:
                        lb = vk                                 # (<= M; M itself where ties hold it)
                        goal = -p                               # p of the top-k survivors' mass
                    else:
                        # M plus the offset (one rounding at |M|: within half an ulp of the bound);
                        # at most M, where |M| is huge
                        lb = min(M + (((math.log(S) + math.log1p(-p)) - math.log(float64(V))) - 1e-3), M)
                        goal = p * S
                    tau = float64(radix_select(x, r, sc, T, True, goal, lb, Mc, hist, sel, tid))
                    th = max(th, tau)
                    # of the tokens tied at tau, top-p keeps the last ones the nucleus needs
                    q = float64(CT(math.exp(CT(tau) - Mc)))     # each one's weight, as radix_select's
                    if q > 0.0:
                        ties = int64(sel[2] / q + 0.5)
                        need_f = (sel[3] - sel[1]) / q
                        kept = ties
                        if need_f < float64(ties):
                            kept = max(int64(1), int64(math.ceil(need_f)))
                        drop = ties - kept
                mp = min_p[r]
                if mp > 0.0:                            # above top-p's threshold: no tie is cut
                    mb = minp_bound(M, mp)
                    if mb > th:
                        th = mb
                        drop = 0
                if drop > 0:
                    ct = nth_equal(x, r, sc, T, CT(th), drop, sh_m, sel, tid)
            if tid == 0:
                theta[r] = th
                cut[r] = ct
                rowmax[r] = M

    @cuda.jit
    def draw(x, temp, softcap, greedy, theta, cut, seeds, row_ids, seglen, want_sum, rowmax, pkey, pidx,
             pflag, psum):
        """Work item (row r, segment g, sample s): the best (key, index) of the segment's surviving tokens
        into pkey[r, g, s] (the key's hi, lo) and pidx[r, g, s] (index -1: none); for s = 0, the NaN/+inf
        flags of the segment into pflag[r, g] and, when want_sum, the sum of exp(x - rowmax) over its
        survivors into psum[r, g].
        Greedy rows rank the values themselves (no noise, no filter). seglen is a multiple of 64."""
        tid = cuda.threadIdx.x
        V = x.shape[1]
        nseg = pkey.shape[1]
        ns = pkey.shape[2]
        sc = CT(softcap)
        sh_k = cuda.shared.array((2, TPB), float64)
        sh_l = cuda.shared.array((2, TPB), float64)
        sh_i = cuda.shared.array((2, TPB), int64)
        sh_f = cuda.shared.array((2, TPB), int64)
        sh_s = cuda.shared.array((2, TPB), float64)
        par = 0
        for it in range(cuda.blockIdx.x, x.shape[0] * nseg * ns, cuda.gridDim.x):
            r, g, s = item_of(it, nseg, ns)
            T = CT(temp[r])
            th = theta[r]
            ct = cut[r]
            gr = greedy[r] != 0
            do_sum = want_sum and s == 0 and not gr
            Mc = CT(rowmax[r]) if do_sum else CT(0)
            seed = seeds[r]
            rid = row_ids[r]
            k0 = seed & MASK32
            k1 = seed >> U32
            c1 = np.uint64(s) & MASK32
            c2 = rid & MASK32
            c3 = ((rid >> U32) << U1) & MASK32
            start = g * seglen
            stop = min(start + seglen, V)
            best = -math.inf
            blo = 0.0                                     # the best key: best + blo exactly
            bi = int64(-1)
            flags = int64(0)
            tot = 0.0
            for q in range(start // 4 + tid, ((stop + 63) // 64) * 16, TPB):
                t0 = (q // 16) * 64 + q % 16
                qc = np.uint64(q) & MASK32
                w0 = w1 = w2 = w3 = np.uint64(0)
                if not gr:
                    w0, w1, w2, w3 = philox(qc, c1, c2, c3, k0, k1)
                for w in range(4):
                    t = t0 + 16 * w
                    if t >= stop:
                        break
                    v = value(x, r, t, sc, T)
                    if v != v:
                        flags |= NAN_SEEN
                        continue
                    if v == math.inf:
                        flags |= POSINF_SEEN
                    xv = float64(v)
                    if gr:
                        if _better(xv, 0.0, t, best, 0.0, bi) and xv > -math.inf:
                            best = xv
                            bi = t
                        continue
                    if xv < th or (xv == th and t < ct) or xv == -math.inf:   # -inf: probability 0
                        continue
                    if do_sum:
                        tot += float64(CT(math.exp(v - Mc)))
                    hi = pick(w, w0, w1, w2, w3)
                    # g < -log(a), a <= 1 - u: only a token with a <= exp(x - best) can win (margin for
                    # the float rounding of the test)
                    d = xv - key_floor(best, blo)
                    if d > 80.0:                          # exp would overflow (NaN stays NaN: no draw)
                        d = 80.0
                    e = CT(math.exp(CT(d))) * CT(1.002)
                    a = CT(np.int32(((~hi) & MASK32) >> U1)) * CT(TWO_M31)
                    if a <= e:
                        l0, l1, l2, l3 = philox(qc, c1, c2, c3 | U1, k0, k1)
                        key, klo = gumbel_key(xv, gumbel(hi, pick(w, l0, l1, l2, l3)))
                        if _better(key, klo, t, best, blo, bi):
                            best = key
                            blo = klo
                            bi = t
            sh_k[par, tid] = best
            sh_l[par, tid] = blo
            sh_i[par, tid] = bi
            sh_f[par, tid] = flags
            sh_s[par, tid] = tot
            cuda.syncthreads()
            if tid == 0:
                kb = -math.inf
                kl = 0.0
                ib = int64(-1)
                f = int64(0)
                sm = 0.0
                for o in range(TPB):
                    if _better(sh_k[par, o], sh_l[par, o], sh_i[par, o], kb, kl, ib):
                        kb = sh_k[par, o]
                        kl = sh_l[par, o]
                        ib = sh_i[par, o]
                    f |= sh_f[par, o]
                    sm += sh_s[par, o]
                pkey[r, g, s, 0] = kb
                pkey[r, g, s, 1] = kl
                pidx[r, g, s] = ib
                if s == 0:
                    pflag[r, g] = f
                    psum[r, g] = sm
            par = 1 - par

    @cuda.jit
    def finish(x, temp, softcap, greedy, theta, rowmax, pkey, pidx, pflag, psum, want_lp, tokens,
               logprobs, status):
        """Per (row, sample): merge the segments (in order) into the token, the row's status (s = 0) and,
        when want_lp, the token's log-probability under the filtered distribution."""
        i = cuda.grid(1)
        rows = pkey.shape[0]
        nseg = pkey.shape[1]
        ns = pkey.shape[2]
        if i >= rows * ns:
            return
        r = i // ns
        s = i % ns
        kb = -math.inf
        kl = 0.0
        ib = int64(-1)
        f = int64(0)
        sm = 0.0
        for g in range(nseg):
            if _better(pkey[r, g, s, 0], pkey[r, g, s, 1], pidx[r, g, s], kb, kl, ib):
                kb = pkey[r, g, s, 0]
                kl = pkey[r, g, s, 1]
                ib = pidx[r, g, s]
            f |= pflag[r, g]
            sm += psum[r, g]
        gr = greedy[r] != 0
        st = OK
        if f & NAN_SEEN:
            st = NAN
        elif (f & POSINF_SEEN) and not gr:
            st = POSINF
        elif ib < 0:
            st = EMPTY
        if s == 0:
            status[r] = st
        tokens[r, s] = ib if st == OK else -1          # (a bad row raises: at once, or reported later)
        if want_lp:
            lp = 0.0 if st == OK else math.nan
            if st == OK and not gr:
                xt = float64(value(x, r, ib, CT(softcap), CT(temp[r])))
                # (x - M) - log(sum) over the survivors (every token when theta is -inf), as log-softmax
                # forms it and the CPU does: x - (M + log(sum)) loses log(sum) once |M| passes about 1e14
                lp = (xt - rowmax[r]) - math.log(sm)
            logprobs[r, s] = lp

    @cuda.jit
    def rank(x, temp, softcap, greedy, tokens, status, seglen, prank):
        """Work item (r, g, s): prank[r, g, s] = the number of tokens of segment g with a larger value
        than token tokens[r, s] (grid stride; 0 for greedy and bad rows)."""
        tid = cuda.threadIdx.x
        V = x.shape[1]
        nseg = prank.shape[1]
        ns = prank.shape[2]
        sc = CT(softcap)
        sh_c = cuda.shared.array((2, TPB), int64)
        par = 0
        for it in range(cuda.blockIdx.x, x.shape[0] * nseg * ns, cuda.gridDim.x):
            r, g, s = item_of(it, nseg, ns)
            if status[r] != OK or greedy[r] != 0:
                if tid == 0:
                    prank[r, g, s] = 0
                continue
            T = CT(temp[r])
            xt = value(x, r, tokens[r, s], sc, T)
            cnt = int64(0)
            for j in range(g * seglen + tid, min(g * seglen + seglen, V), TPB):
                if value(x, r, j, sc, T) > xt:
                    cnt += 1
            sh_c[par, tid] = cnt
            cuda.syncthreads()
            if tid == 0:
                tot = int64(0)
                for o in range(TPB):
                    tot += sh_c[par, o]
                prank[r, g, s] = tot
            par = 1 - par

    return SimpleNamespace(kind=kind, compute=base.compute, radix_select=radix_select, prepare=prepare,
                           draw=draw, finish=finish, rank=rank)


for_kind = K.kind_cache(_build)      # the sampling kernels of one input kind, built on first use


@cuda.jit
def rank_total(prank, status, ranks):
    """ranks[r, s] = the sum over segments of prank[r, :, s] (-1 for a row that cannot be sampled)."""
    i = cuda.grid(1)
    ns = prank.shape[2]
    if i >= prank.shape[0] * ns:
        return
    r = i // ns
    s = i % ns
    tot = int64(0)
    for g in range(prank.shape[1]):
        tot += prank[r, g, s]
    ranks[r, s] = tot if status[r] == OK else -1


@cuda.jit
def report(status, call, err):
    """One block: the first row with a nonzero status, reported in ``err`` as (call, row, status) (see
    kernels.report)."""
    tid = cuda.threadIdx.x
    bad = INT64_MAX
    for r in range(tid, status.shape[0], TPB):
        if status[r] != OK:
            bad = min(bad, r)
    sh_b = cuda.shared.array(TPB, int64)
    sh_b[tid] = bad
    cuda.syncthreads()
    if tid == 0:
        bad = K.first_row(sh_b)
        if bad != INT64_MAX:
            K.report(err, call, bad, int64(status[bad]))


@cuda.jit(device=True)
def _beam_score(lp, bs, row, j, round32):
    """A continuation's score bs[row] + lp[row, j], in float64 (lp rounded to float32 first when round32,
    as the host path's log-probabilities are)."""
    v = lp[row, j]
    if round32:
        v = float64(float32(v))
    return float64(bs[row]) + v


@cuda.jit(device=True)
def _beam_key(lp, bs, row, j, round32):
    """A continuation's sort key (number, minus its score): a NaN score ranks above every number, as in
    top_k (a flag of its own, compared first), as (0, 0)."""
    s = _beam_score(lp, bs, row, j, round32)
    if s != s:
        return 0, 0.0
    return 1, -s


@cuda.jit
def beam_merge(lp, idx, bs, W, round32, scores, parents, tokens):
    """beam_search_step's merge, one thread per continuation (row, j) of lp (rows, k): its place among
    the W * k continuations of its batch item by score (NaN first, then best first), then parent, then j
    (a total order, so places are distinct: the host path's lexsort); places below 2 W are written. A dead
    beam (score -inf, no NaN log-probability) ties all its continuations at -inf, and its best are its
    lowest tokens: token j."""
    c = cuda.grid(1)
    rows = lp.shape[0]
    k = lp.shape[1]
    if c >= rows * k:
        return
    row = c // k
    j = c % k
    base = row - row % W                 # the item's first row
    own = (row - base) * k + j           # the index of (parent, j) in the item's candidates
    num, key = _beam_key(lp, bs, row, j, round32)
    place = 0
    q = 0
    for parent in range(W):
        for i in range(k):
            nq, kq = _beam_key(lp, bs, base + parent, i, round32)
            if nq < num or (nq == num and (kq < key or (kq == key and q < own))):
                place += 1
            q += 1
    if place >= 2 * W:
        return
    tok = idx[row, j]
    if bs[row] == -math.inf:
        dead = True
        for i in range(k):
            if lp[row, i] != lp[row, i]:
                dead = False
        if dead:
            tok = j
    b = row // W
    scores[b, place] = _beam_score(lp, bs, row, j, round32)
    parents[b, place] = row - base
    tokens[b, place] = tok


def compile_signatures():
    """(name, kernel, signature) of every sampling kernel, as the backend launches them (for the PTX
    check)."""
    from numba import boolean, types
    from numba.np.numpy_support import from_dtype

    f8, i8 = types.float64, types.int64
    row = types.Array(f8, 1, "C")
    u8row = types.Array(types.uint8, 1, "C")
    i8row = types.Array(i8, 1, "C")
    u64row = types.Array(types.uint64, 1, "C")
    out = []
    for kind in K.KINDS:
        k = for_kind(kind)
        xt = types.Array(types.uint16 if kind == "bfloat16" else from_dtype(np.dtype(kind)), 2, "A")
        out.append((f"sample prepare[{kind}]", k.prepare,
                    (xt, row, f8, u8row, i8row, row, row, row, row, i8row)))
        out.append((f"sample draw[{kind}]", k.draw,
                    (xt, row, f8, u8row, row, i8row, u64row, u64row, i8, boolean, row,
                     types.Array(f8, 4, "C"), types.Array(i8, 3, "C"), types.Array(i8, 2, "C"),
                     types.Array(f8, 2, "C"))))
        out.append((f"sample finish[{kind}]", k.finish,
                    (xt, row, f8, u8row, row, row, types.Array(f8, 4, "C"), types.Array(i8, 3, "C"),
                     types.Array(i8, 2, "C"), types.Array(f8, 2, "C"), boolean, types.Array(i8, 2, "C"),
                     types.Array(f8, 2, "C"), types.Array(types.int32, 1, "C"))))
        out.append((f"sample rank[{kind}]", k.rank,
                    (xt, row, f8, u8row, types.Array(i8, 2, "C"), types.Array(types.int32, 1, "C"), i8,
                     types.Array(i8, 3, "C"))))
    i4row = types.Array(types.int32, 1, "C")
    out.append(("sample rank_total", rank_total, (types.Array(i8, 3, "C"), i4row, types.Array(i8, 2, "C"))))
    out.append(("sample report", report, (i4row, i8, i8row)))
    i8m = types.Array(i8, 2, "C")
    for bt in (types.float32, f8, i8):                     # beam scores: a device array's dtype, or float64
        for st in (types.float32, f8):                     # scores: the result dtype
            out.append((f"beam_merge[{bt}, {st}]", beam_merge,
                        (types.Array(f8, 2, "C"), i8m, types.Array(bt, 1, "A"), i8, boolean,
                         types.Array(st, 2, "C"), i8m, i8m)))
    return out
