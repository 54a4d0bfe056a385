"""The GPU kernels (numba.cuda): one block of TPB threads per (row, column segment).

# Design: the C core's recurrence, cut for a GPU.
#
# - A row is split into ``nseg`` segments of ``seglen`` columns (the backend decides: segments of at most
#   MAX_SEGMENT columns, more while there are too few rows to fill the device); block (row, segment) folds its
#   segment. Thread ``tid`` reads its chunk of UNROLL columns ``base + u * TPB`` (32 bytes: 8 columns of
#   4 bytes, 16 of 2; twice that in the statistics pass, STATS_UNROLLS; coalesced across the block, all
#   the chunk's loads in flight before any is used), and
#   folds it into its private state as the C core folds a chunk: the chunk's max, then the sum of
#   exp(x - max) in the compute type, added to a float64 sum, with the C core's merge rule and edge
#   semantics (NaN sticky, +inf gives (inf, 1), all -inf changes nothing).
# - The pass is kept short in instructions. At an H200's 4.8 TB/s a bfloat16 value may cost at most about
#   14 instructions a thread (132 SMs x 4 schedulers x 32 lanes x 1.98 GHz over 2.4e12 values/s), where
#   expf alone is about ten and numba's indexing about eight more (counted in the PTX; not measured on a
#   GPU). So: a full chunk is loaded with no bound checks from one address (columns indexed unsigned,
#   so numba adds no negative-index wraparound); a term of a sum is exp2(d log2 e) (``exp_le0``: a
#   multiply and one MUFU.EX2); a NaN shows in the chunk's sum rather than by a test per value; and
#   stats_part is built per (mode, best), so each variant carries only its own registers.
# - The block then merges its TPB states in shared memory (``block_merge``: two levels, three barriers;
#   no warp shuffles, so the CUDA simulator runs the code the GPU runs) and thread 0 writes the segment's
#   state. A one-thread-per-row kernel merges the segments in order (``lse_merge``/``ent_merge`` of
#   ``fastlogits.gpu.device``) and finalizes. Maps (softmax, log-softmax) are a second pass reading the
#   finished state.
# - Every kernel that reads logits is built once per input kind by ``_build``: float16 (read as float16),
#   bfloat16 (read as uint16 bits and converted exactly), float32, float64. Logits are transformed as the
#   C core does, in the compute type (float32, float64 for float64 input): ``softcap * tanh(x / softcap)``
#   by the C core's formula (``softcap_f32``/``softcap_f64``: within an ulp of it, where NVVM fuses an FMA;
#   saturated logits are exactly +-softcap on both backends, so they tie alike), then divided by the row's
#   temperature.
# - Selection (argmax = top-1, top-k) ranks by the C core's strict total order (NaN first, then larger
#   value, then lower index), so ties and NaN come out exactly as on the CPU: each thread keeps its
#   min(k, KLOCAL) best candidates in one pass, then k block-wide rounds take the best remaining head; a
#   thread that runs out of kept candidates rescans for the next ones (rare).
# - Indices are int64 throughout (``range`` over int64 bounds; numba's array indexing is 64-bit), so
#   rows * V past 2^31 elements is fine.
# - Two ``cuda.shared.array`` calls on one source line alias each other in the simulator: one per line.
"""
import math

import numpy as np
from numba import config, cuda, float64, int64

from fastlogits.gpu.device import INT64_MAX, better, ent_merge, ent_result, lse_merge, lse_result

TPB = 128          # threads per block; a multiple of WARP
WARP = 32
# columns per thread per step: its chunk, loaded together (loads in flight), by input itemsize: 32 bytes a
# thread for 2- and 4-byte kinds, so a 16-bit row keeps as many bytes in flight as a float32 row
UNROLLS = {"float16": 16, "bfloat16": 16, "float32": 8, "float64": 8}
# and in the statistics pass (stats_part), twice that: on an H200 (benchmarks/gpu_sweep.py, (8192, 128256),
# one block a row, medians of 10 calls in one run) logsumexp read bfloat16 at 2952 GB/s with 32 columns a
# step against 2487 with 16, and float32 at 4322 GB/s with 16 against 3839 with 8
STATS_UNROLLS = {"float16": 32, "bfloat16": 32, "float32": 16, "float64": 8}
KLOCAL = 8         # top-k candidates each thread keeps
LOG2E_F32 = np.float32(1.4426950408889634)
# a float32 term of a sum is 2^y by the GPU's ex2.approx.ftz.f32, one MUFU.EX2: results below 2^-126 are 0
# (they are below a sum's rounding, which holds a term of 1). CUDA's exp2f (False) adds a compare and two
# multiplies a term to return subnormal results. Read when the kernels are built.
EXP2_FTZ = True
FLT_MIN = np.float32(2.0**-126)

# modes of the statistics kernels, and the (mode, best) variants of stats_part that are built
LSE, ENTROPY, SUM, WSUM = 0, 1, 2, 3
# reductions of ce_reduce
CE_NONE, CE_MEAN, CE_SUM = 0, 1, 2
STATS_VARIANTS = ((LSE, False), (ENTROPY, False), (ENTROPY, True), (SUM, False), (WSUM, False))


if config.ENABLE_CUDASIM:
    @cuda.jit(device=True)
    def ex2_ftz(y):
        """2^y in float32, results below 2^-126 flushed to 0, as the GPU's ex2.approx.ftz.f32 (the
        simulator's exp2 is correctly rounded where the hardware's is within 2 ulp)."""
        r = np.float32(math.exp2(np.float32(y)))
        if r < FLT_MIN:
            r = np.float32(0)
        return r
else:
    from llvmlite import ir
    from numba.cuda import types as _types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def ex2_ftz(typingctx, y):
        """2^y in float32 by one ex2.approx.ftz.f32 (MUFU.EX2): within 2 ulp; results below 2^-126 are 0,
        a subnormal y counts as 0 (2^y = 1), 2^-inf = 0, NaN stays NaN."""
        sig = _types.float32(_types.float32)

        def codegen(context, builder, signature, args):
            f32 = ir.FloatType()
            asm = ir.InlineAsm(ir.FunctionType(f32, [f32]), "ex2.approx.ftz.f32 $0, $1;", "=f,f")
            return builder.call(asm, args)

        return sig, codegen


# ---- loads: one element of row r, column j, in the compute type -------------------------------------------

@cuda.jit(device=True)
def _load_f16(x, r, j):
    return np.float32(x[r, j])


@cuda.jit(device=True)
def _load_f32(x, r, j):
    return np.float32(x[r, j])


@cuda.jit(device=True)
def _load_f64(x, r, j):
    return np.float64(x[r, j])


# ---- the softcap, by the C core's formula -----------------------------------------------------------------

F32_ONE = np.float32(1)
F32_MINUS_TWO = np.float32(-2)
F32_TANH_SMALL = np.float32(0.28)
# tanh's Taylor coefficients as fl__softcapf writes them: float32 quotients (-1.0f / 3.0f, ...)
F32_T3, F32_T5, F32_T7, F32_T9 = (np.float32(a) / np.float32(b) for a, b in ((-1, 3), (2, 15), (-17, 315),
                                                                           (62, 2835)))


@cuda.jit(device=True)
def softcap_f32(x, c):
    """c tanh(x / c) in float32 as the C core's fl__softcapf (fastlogits.h): with z = x / c, c (1 - e) /
    (1 + e), e = exp(-2|z|), and x (1 + p(z^2)), p tanh's Taylor series to z^9, below |z| = 0.28, where
    1 - e cancels (x times the series: z may be subnormal for a large cap). Past |z| = 9 it is exactly
    +-c (CUDA's tanhf can be an ulp short), so logits saturated by a softcap tie exactly as on the CPU.
    NaN stays NaN, -0 keeps its sign. The same formula, not always the same bits: NVVM fuses 1 + a2 (...)
    into one FMA (one rounding; the simulator and GCC's baseline clone round twice), an ulp at most."""
    z = x / c
    a = abs(z)
    e = np.float32(math.exp(F32_MINUS_TWO * a))       # (float32 already on the GPU; the simulator's is not)
    t = (F32_ONE - e) / (F32_ONE + e)
    a2 = a * a
    p = a2 * (F32_T3 + a2 * (F32_T5 + a2 * (F32_T7 + a2 * F32_T9)))
    if a < F32_TANH_SMALL:
        return x * (F32_ONE + p)
    return c * (-t if z < 0 else t)


@cuda.jit(device=True)
def softcap_f64(x, c):
    """c tanh(x / c) in float64 as the C core's fl__softcap: c (1 - e) / (1 + e), e = exp(-2|z|), exactly
    +-c past |z| = 19, and below |z| = 0.5 x (1 + z^2 g(z^2)) with fl__softcap's degree-10 Chebyshev g."""
    z = x / c
    a = abs(z)
    e = math.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    u = a * a
    g = -0.0000229533046533373290281
    g = g * u + 0.0000881958030574506437743
    g = g * u - 0.000236353642941362434543
    g = g * u + 0.000589466741910190505897
    g = g * u - 0.00145576081386558738619
    g = g * u + 0.00359212179694987048952
    g = g * u - 0.00886323519865913438443
    g = g * u + 0.0218694885258675977473
    g = g * u - 0.0539682539680897542681
    g = g * u + 0.133333333333332309162
    g = g * u - 0.333333333333333332276
    if a < 0.5:
        return x * (1.0 + u * g)
    return c * (-t if z < 0 else t)


# ---- float32 bit casts (the simulator has no libdevice: a NumPy view gives the same bits) ----------------

if config.ENABLE_CUDASIM:
    @cuda.jit(device=True)
    def f32_bits(y):
        """The bits of float32(y), as uint32."""
        return np.array(y, np.float32).view(np.uint32)[()]

    @cuda.jit(device=True)
    def f32_from_bits(b):
        """The float32 whose bits are the low 32 of b."""
        return np.array(b, np.uint32).view(np.float32)[()]
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def f32_bits(y):
        """The bits of float32(y), as uint32."""
        return np.uint32(libdevice.float_as_int(np.float32(y)))

    @cuda.jit(device=True)
    def f32_from_bits(b):
        """The float32 whose bits are the low 32 of b."""
        return libdevice.int_as_float(np.int32(np.uint32(b)))


@cuda.jit(device=True)
def _load_bf16(x, r, j):
    # bfloat16 is the high half of a float32: one shift and a reinterpretation (shl.b32 in PTX)
    return f32_from_bits(np.uint32(x[r, j]) << np.uint32(16))


_LOADS = {"float16": (_load_f16, np.float32), "bfloat16": (_load_bf16, np.float32),
          "float32": (_load_f32, np.float32), "float64": (_load_f64, np.float64)}


# ---- stores: an element of a map's result ----------------------------------------------------------------

@cuda.jit(device=True)
def store_value(out, r, j, y):
    out[r, j] = y


@cuda.jit(device=True)
def f32_odd(y):
    """float32(y) rounded to odd, as the C core's fl__f64_to_f32_odd: rounding it again to bfloat16 rounds
    a float64 y once (through a float32 rounded to nearest, a y just past a tie would land on it). A
    float32 y comes back as it is."""
    f = np.float32(y)
    if np.float64(f) != y and y == y:
        b = f32_bits(f)
        if abs(np.float64(f)) > abs(y):
            b = b - np.uint32(1)                    # rounded away from 0: the truncation is one below
        f = f32_from_bits(b | np.uint32(1))
    return f


@cuda.jit(device=True)
def store_bf16(out, r, j, y):
    """out[r, j] = y (float32 or float64) rounded once to bfloat16 (to nearest, ties to even, as ml_dtypes
    rounds a float32 and the CPU any value), as its bits; a NaN stays a NaN of its sign."""
    y = f32_odd(y)
    b = f32_bits(y)
    hi = b >> np.uint32(16)
    if y != y:
        out[r, j] = np.uint16(hi | np.uint32(0x40))
    else:
        out[r, j] = np.uint16((b + np.uint32(0x7FFF) + (hi & np.uint32(1))) >> np.uint32(16))


# ---- label smoothing's distance sums -----------------------------------------------------------------

@cuda.jit(device=True)
def dist_shift(d, w, frm, to):
    """The C core's fl__dist_shift: a distance sum d = sum w (m - x) (weight sum w) moved from max frm
    to a larger max to."""
    if w != 0.0 and to != frm:
        return d + w * (to - frm)
    return d


@cuda.jit(device=True)
def wdist(w, d):
    """The C core's FL__WDIST: one weighted distance w (m - x), 0 at the max whatever the weight (an
    infinite weight there then gives PyTorch's inf through the shift to lse, not NaN)."""
    return 0.0 if d == 0.0 else w * d


@cuda.jit(device=True)
def dist_total(d, W, log_s):
    """The C core's fl__dist_total: the smoothing sum d + W log s, W log s taken as 0 where log s is but
    for a NaN W."""
    return d if log_s == 0.0 and W == W else d + W * log_s


@cuda.jit(device=True)
def dist_merge(d, w, m, d2, w2, m2, M):
    """The C core's fl__dist_merge: the distance sums (d, w) and (d2, w2) of two column ranges with maxes
    m and m2, merged at their merged max M; returns (d, w)."""
    return dist_shift(d, w, m, M) + dist_shift(d2, w2, m2, M), w + w2


@cuda.jit(device=True)
def state_merge(m, s, t, w, m2, s2, t2, w2, mode):
    """(m, s, t, w) merged with another range's state: entropy states for mode ENTROPY; else logsumexp
    states, with (t, w) label smoothing's distance sum and weight sum for SUM/WSUM."""
    if mode == ENTROPY:
        m, s, t = ent_merge(m, s, t, m2, s2, t2)
    else:
        M, s = lse_merge(m, s, m2, s2)
        if mode != LSE:
            t, w = dist_merge(t, w, m, t2, w2, m2, M)
        m = M
    return m, s, t, w


# ---- block reductions over shared memory ----------------------------------------------------------------
# Two levels, three barriers: the first WARP threads each merge every WARP-th state, then thread 0 merges
# those WARP states in order. (A tree would need log2(TPB) barriers; warp shuffles would be faster but the
# simulator has none, and the merge is a negligible part of a block's time next to its loads.)

@cuda.jit(device=True)
def block_merge(sh_m, sh_s, sh_t, sh_w, mode, tid):
    """Merge the TPB states (sh_m, sh_s, sh_t, sh_w) into entry 0 with state_merge (pass sh_s as sh_t
    and sh_w where the mode has no t or w). Ends with entry 0 valid for thread 0 only."""
    cuda.syncthreads()
    if tid < WARP:
        m = sh_m[tid]
        s = sh_s[tid]
        t = sh_t[tid]
        w = sh_w[tid]
        for o in range(tid + WARP, TPB, WARP):
            m, s, t, w = state_merge(m, s, t, w, sh_m[o], sh_s[o], sh_t[o], sh_w[o], mode)
        sh_m[tid] = m
        sh_s[tid] = s
        if mode != LSE:
            sh_t[tid] = t
        if mode == SUM or mode == WSUM:
            sh_w[tid] = w
    cuda.syncthreads()
    if tid == 0:
        m = sh_m[0]
        s = sh_s[0]
        t = sh_t[0]
        w = sh_w[0]
        for o in range(1, WARP):
            m, s, t, w = state_merge(m, s, t, w, sh_m[o], sh_s[o], sh_t[o], sh_w[o], mode)
        sh_m[0] = m
        sh_s[0] = s
        if mode != LSE:
            sh_t[0] = t
        if mode == SUM or mode == WSUM:
            sh_w[0] = w


@cuda.jit(device=True)
def block_best(sh_v, sh_i, win_v, win_i, tid):
    """The best (value, index) of the TPB candidates in (sh_v, sh_i), in the top-k order, into
    (win_v[0], win_i[0]) (visible to all threads after the caller's next barrier)."""
    cuda.syncthreads()
    if tid < WARP:
        bv = sh_v[tid]
        bi = sh_i[tid]
        for o in range(tid + WARP, TPB, WARP):
            if better(sh_v[o], sh_i[o], bv, bi):
                bv = sh_v[o]
                bi = sh_i[o]
        sh_v[tid] = bv
        sh_i[tid] = bi
    cuda.syncthreads()
    if tid == 0:
        bv = sh_v[0]
        bi = sh_i[0]
        for o in range(1, WARP):
            if better(sh_v[o], sh_i[o], bv, bi):
                bv = sh_v[o]
                bi = sh_i[o]
        win_v[0] = bv
        win_i[0] = bi


# ---- kernels that do not read logits -------------------------------------------------------------------

@cuda.jit
def stats_finish(pm, ps, pt, mode, out):
    """Merge the segment states of each row (in order) into column 0, and finalize into out (lse, or
    entropy for mode ENTROPY)."""
    r = cuda.grid(1)
    if r >= pm.shape[0]:
        return
    m = pm[r, 0]
    s = ps[r, 0]
    t = pt[r, 0]
    for g in range(1, pm.shape[1]):
        if mode == ENTROPY:
            m, s, t = ent_merge(m, s, t, pm[r, g], ps[r, g], pt[r, g])
        else:
            m, s = lse_merge(m, s, pm[r, g], ps[r, g])
    pm[r, 0] = m
    ps[r, 0] = s
    pt[r, 0] = t
    if mode == ENTROPY:
        out[r] = ent_result(m, s, t)
    else:
        out[r] = lse_result(m, s)


@cuda.jit
def topk_finish(pv, pi, pm, ps, logprobs, vals, idx, lp):
    """Merge the per-segment candidate lists (each best first, padded with (-inf, INT64_MAX)) of each row
    into its k best; when logprobs, merge the segments' logsumexp states and set lp = (value - m) - log s,
    as log_softmax computes it (NaN where the row's softmax is NaN)."""
    r = cuda.grid(1)
    if r >= pv.shape[0]:
        return
    nseg = pv.shape[1]
    k = vals.shape[1]
    if nseg == 1:
        for q in range(k):
            vals[r, q] = pv[r, 0, q]
            idx[r, q] = pi[r, 0, q]
    else:
        pvv = 0.0
        pii = INT64_MAX
        for q in range(k):
            bv = -math.inf
            bi = INT64_MAX
            for g in range(nseg):
                for c in range(k):
                    v = pv[r, g, c]
                    i = pi[r, g, c]
                    if i == INT64_MAX:
                        break
                    if q == 0 or better(pvv, pii, v, i):
                        # the segment's list is sorted: its first eligible candidate is its best
                        if better(v, i, bv, bi):
                            bv = v
                            bi = i
                        break
            vals[r, q] = bv
            idx[r, q] = bi
            pvv = bv
            pii = bi
    if logprobs:
        m = pm[r, 0]
        s = ps[r, 0]
        for g in range(1, nseg):
            m, s = lse_merge(m, s, pm[r, g], ps[r, g])
        finite = m > -math.inf and m < math.inf
        log_s = math.log(s) if finite else 0.0
        for q in range(k):
            lp[r, q] = (np.float64(vals[r, q]) - m) - log_s if finite else math.nan


@cuda.jit(device=True)
def add_to(s, c, v):
    """(s, c) + v: s + v with Neumaier's compensation c (the sum is s + c), as the CPU's _reduce.add_to."""
    t = s + v
    if abs(s) >= abs(v):
        c += (s - t) + v
    else:
        c += (v - t) + s
    return t, c


@cuda.jit(device=True)
def block_sum(sh, shc, tid):
    """The sum of the TPB compensated sums sh[i] + shc[i] (one per thread), in a fixed order (two levels,
    as block_merge) and compensated the same way (add_to), into sh[0] (sh[0] alone where it is inf or
    NaN: its compensation is then NaN); valid for thread 0 after the call."""
    cuda.syncthreads()
    if tid < WARP:
        v = sh[tid]
        c = shc[tid]
        for o in range(tid + WARP, TPB, WARP):
            v, c = add_to(v, c, sh[o])
            c += shc[o]
        sh[tid] = v
        shc[tid] = c
    cuda.syncthreads()
    if tid == 0:
        v = sh[0]
        c = shc[0]
        for o in range(1, WARP):
            v, c = add_to(v, c, sh[o])
            c += shc[o]
        if -math.inf < v < math.inf:
            v += c
        sh[0] = v


@cuda.jit(device=True)
def ieee_div(a, b):
    """a / b with IEEE's results for b == 0 (the simulator's Python floats would raise there): ±inf, or
    NaN for 0 / 0, as PyTorch divides."""
    if b != 0.0 or b != b:
        return a / b
    if a == 0.0 or a != a:
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


@cuda.jit(device=True)
def nll_of(m, s, xt):
    """-log softmax at a logit xt of the row whose logsumexp state is (m, s), as the C core forms it:
    (m - xt) + log s, exact for huge logits (lse - xt would round m + log s to m first: ln 2 became 0 for
    [3e38, -3e38, 3e38]); NaN when the row's max is not finite (all -inf, a +inf, a NaN)."""
    if m == -math.inf or m == math.inf or m != m:
        return math.nan
    return (m - xt) + math.log(s)


@cuda.jit(device=True)
def first_row(sh_b):
    """The least of the block's rows sh_b[0:TPB] (one per thread; INT64_MAX: none), read by one thread
    after a barrier."""
    bad = sh_b[0]
    for o in range(1, TPB):
        bad = min(bad, sh_b[o])
    return bad


@cuda.jit(device=True)
def report(err, call, row, value):
    """Report bad input found on the device in ``err`` (host-visible memory, read by the backend later,
    with no wait): err = (call, row, value, later), the first three written only while err[0] < 0
    (nothing reported yet), the call number last (the backend waits for the device before it reads
    err[1:]); a report after the first counts itself in err[3], so that the error raised for the first
    says how many later calls' results are invalid too. One thread of a one-block kernel reports, and a
    host thread's reporting kernels run in turn on its default stream: plain stores, no atomics (which
    mapped host memory may not support)."""
    if err[0] < 0:
        err[1] = row
        err[2] = value
        err[0] = call
    else:
        err[3] += 1


@cuda.jit
def ce_reduce(labels, ignore_index, V, w, has_w, eps, z, nll, smooth, lse, reduction, call, loss, total, err):
    """One block: the cross-entropy from the per-row parts, as ``fastlogits.ops.reductions.ce_terms`` and
    ``ce_total`` compute it on the host. Per row (0 for ignored rows): the NLL part l = w[y] nll, times
    (1 - eps) when eps > 0, the smoothing part ls = (eps / V) smooth, and zt = z lse^2; loss[r] = l + ls
    + zt. total[0] = the reduction (CE_MEAN: sum l / sum w[y] + sum ls / sum w[y] (IEEE's division, each
    part, as ce_total and PyTorch), plus sum zt / counted rows when there is z-loss; CE_SUM: sum l + sum
    ls + sum zt; CE_NONE: not written), the sums compensated as on the CPU (add_to,
    block_sum). A label out of range makes its row's loss and the total NaN, and the first
    such row is reported in ``err`` (see report)."""
    tid = cuda.threadIdx.x
    sl = 0.0
    ss = 0.0
    sw = 0.0
    sz = 0.0
    cl = 0.0
    cs = 0.0
    cw = 0.0
    cz = 0.0
    cnt = 0.0
    bad = INT64_MAX
    for r in range(tid, labels.shape[0], TPB):
        lab = int64(labels[r])
        if lab == ignore_index:
            # 0, but (eps / V) * 0 = inf * 0 = NaN for V = 0 with label smoothing, as on the host (PyTorch)
            lsm = math.nan if eps > 0 and V == 0 else 0.0
            loss[r] = lsm
            ss, cs = add_to(ss, cs, lsm)
            continue
        if lab < 0 or lab >= V:
            bad = min(bad, r)
            loss[r] = math.nan
            continue
        wy = float64(w[lab]) if has_w else 1.0
        lr = wy * nll[r]
        lsm = 0.0
        if eps > 0:
            lr = (1.0 - eps) * lr
            lsm = (eps / V) * smooth[r]
        zt = (z * lse[r]) * lse[r] if z > 0 else 0.0     # as ce_terms on the host
        loss[r] = (lr + lsm) + zt
        sl, cl = add_to(sl, cl, lr)
        ss, cs = add_to(ss, cs, lsm)
        sw, cw = add_to(sw, cw, wy)
        sz, cz = add_to(sz, cz, zt)
        cnt += 1.0
    sh_l = cuda.shared.array(TPB, float64)
    sh_s = cuda.shared.array(TPB, float64)
    sh_w = cuda.shared.array(TPB, float64)
    sh_z = cuda.shared.array(TPB, float64)
    sh_lc = cuda.shared.array(TPB, float64)
    sh_sc = cuda.shared.array(TPB, float64)
    sh_wc = cuda.shared.array(TPB, float64)
    sh_zc = cuda.shared.array(TPB, float64)
    sh_c = cuda.shared.array(TPB, float64)
    sh_cc = cuda.shared.array(TPB, float64)
    sh_b = cuda.shared.array(TPB, int64)
    sh_l[tid] = sl
    sh_s[tid] = ss
    sh_w[tid] = sw
    sh_z[tid] = sz
    sh_lc[tid] = cl
    sh_sc[tid] = cs
    sh_wc[tid] = cw
    sh_zc[tid] = cz
    sh_c[tid] = cnt
    sh_cc[tid] = 0.0               # (counts add exactly)
    sh_b[tid] = bad
    block_sum(sh_l, sh_lc, tid)
    block_sum(sh_s, sh_sc, tid)
    block_sum(sh_w, sh_wc, tid)
    block_sum(sh_z, sh_zc, tid)
    block_sum(sh_c, sh_cc, tid)
    cuda.syncthreads()
    if tid == 0:
        bad = first_row(sh_b)
        if bad != INT64_MAX:
            report(err, call, bad, int64(labels[bad]))
        if reduction == CE_SUM:
            res = (sh_l[0] + sh_s[0]) + sh_z[0]
        else:
            res = ieee_div(sh_l[0], sh_w[0])
            if eps > 0:
                res += ieee_div(sh_s[0], sh_w[0])
            if sh_z[0] != 0.0:
                res += sh_z[0] / sh_c[0]     # (z-loss terms come from counted rows: sh_c > 0)
        if bad != INT64_MAX:
            res = math.nan
        if reduction != CE_NONE:
            total[0] = res


# ---- kernels that read logits, one set per input kind --------------------------------------------------

class Kernels:
    """The kernels for one input kind (see _build)."""


def _build(kind):
    load, CT = _LOADS[kind]
    UNROLL = UNROLLS[kind]      # (a constant of the kernels below: numba freezes closure variables)

    if CT is np.float32 and EXP2_FTZ:
        @cuda.jit(device=True)
        def exp_le0(d):
            """exp(d) for d <= 0 (or NaN) as a term of a sum: 2^(d log2 e) by ex2_ftz (a multiply and one
            MUFU.EX2, against about ten instructions for expf: see the notes above on the instructions a
            value may cost). Relative error at most 2 ulp + 1.3 |d| 2^-24 (the scaled argument's rounding)
            where the result is at least 2^-126, 0 below: about 2 ulp for the terms that carry a sum's
            weight, about 2e-7 relative on the sum. exp(-inf) = 0, exp(0) = 1 and NaN stays NaN."""
            return ex2_ftz(d * LOG2E_F32)
    elif CT is np.float32:
        @cuda.jit(device=True)
        def exp_le0(d):
            """exp_le0 by CUDA's exp2f, which returns subnormal results too (EXP2_FTZ = False)."""
            return CT(math.exp2(d * LOG2E_F32))
    else:
        @cuda.jit(device=True)
        def exp_le0(d):
            return math.exp(d)

    softcap_of = softcap_f32 if CT is np.float32 else softcap_f64

    @cuda.jit(device=True)
    def value(x, r, j, sc, T):
        v = load(x, r, j)
        if sc > 0:
            v = softcap_of(v, sc)
        if T != 1:
            v = v / T
        return v

    @cuda.jit(device=True)
    def block_segment(x, temp, softcap, seglen):
        """What a block of the (row, segment) grid works on: (row r, segment g, thread tid, the softcap and
        the row's temperature in the compute type, the segment's columns [start, stop))."""
        r = cuda.blockIdx.x
        g = cuda.blockIdx.y
        start = g * seglen
        return r, g, cuda.threadIdx.x, CT(softcap), CT(temp[r]), start, min(start + seglen, x.shape[1])

    def chunk_ops(UNROLL):
        """The chunk helpers for chunks of UNROLL columns a thread (a constant of the code: numba freezes
        closure variables): (load_chunk, has_nan, fold_chunk)."""

        @cuda.jit(device=True)
        def load_chunk(x, r, base, stop, sc, T, lv):
            """lv[u] = the value of column base + u * TPB (-inf past stop), u < UNROLL: the thread's chunk,
            loaded before it is used so that UNROLL loads are in flight. Returns the chunk's max, NaN left
            out (-inf for a chunk of NaN and -inf): has_nan(lv) says whether it had a NaN.

            Columns are indexed as unsigned (base >= 0): numba then adds no negative-index wraparound, and
            the UNROLL loads of a full chunk are one address plus constant offsets, with no bound checks."""
            if base + (UNROLL - 1) * TPB < stop:
                for u in range(UNROLL):
                    lv[u] = value(x, r, np.uint64(base + u * TPB), sc, T)
            else:
                for u in range(UNROLL):
                    j = base + u * TPB
                    v = CT(-math.inf)
                    if j < stop:
                        v = value(x, r, np.uint64(j), sc, T)
                    lv[u] = v
            cmax = CT(-math.inf)
            for u in range(UNROLL):
                if lv[u] > cmax:
                    cmax = lv[u]
            return cmax

        @cuda.jit(device=True)
        def has_nan(lv):
            """Whether the loaded chunk lv has a NaN."""
            bad = False
            for u in range(UNROLL):
                bad = bad | (lv[u] != lv[u])
            return bad

        @cuda.jit(device=True)
        def fold_chunk(lv, cmax, m, s, t, want_t):
            """Fold a loaded chunk (its max cmax from load_chunk) into the thread's state (m, s, t), as the C
            core folds a chunk: its max first, then sum exp(x - max) (in the compute type over UNROLL terms,
            added to s in float64); a new max rescales the state. t = sum exp(x - m) * (x - m) when want_t.
            NaN is sticky, +inf gives (inf, 1, 0), an all -inf chunk changes nothing. The terms are
            exp_le0's. A NaN in a chunk with a finite max shows as a NaN sum (every other term is in [0, 1]),
            so the common case pays no NaN test per value."""
            if m != m:
                return m, s, t
            if cmax == -math.inf or m == math.inf or cmax == math.inf:
                if has_nan(lv):
                    return CT(math.nan), math.nan, math.nan
                if cmax == math.inf and m != math.inf:
                    return CT(math.inf), 1.0, 0.0
                return m, s, t
            if cmax > m:
                d0 = m - cmax             # -inf while the state is empty: f = 0 below
                f = math.exp(d0)
                if f > 0:
                    if want_t:
                        t = (t + s * d0) * f
                    s = s * f
                else:
                    s = 0.0
                    t = 0.0
                m = cmax
            cs = CT(0)
            ct = CT(0)
            for u in range(UNROLL):
                d = lv[u] - m
                e = exp_le0(d)
                cs += e
                if want_t and e > 0:
                    ct += e * d
            if cs != cs:
                return CT(math.nan), math.nan, math.nan
            return m, s + cs, t + ct

        return load_chunk, has_nan, fold_chunk

    load_chunk, has_nan, fold_chunk = chunk_ops(UNROLL)
    # the statistics pass (logsumexp, entropy, cross-entropy) folds longer chunks (STATS_UNROLLS): more
    # loads in flight a thread, and fewer steps' fixed work (the max, the new-max test) a column
    SU = STATS_UNROLLS[kind]
    stats_load, stats_has_nan, stats_fold = chunk_ops(SU)

    def make_stats_part(mode, best):
        """stats_part for one (mode, best) of STATS_VARIANTS. They are compile-time constants (numba
        freezes closure variables): each variant carries only its own work and registers (ptxas for
        sm_90, when it folded 8 float32 columns a step: LSE took 38 registers a thread where one kernel
        for every mode took 56, 12 resident blocks per SM instead of 9)."""

        @cuda.jit
        def stats_part(x, temp, softcap, seglen, w, pm, ps, pt, pw, pv, pi):
            """Segment state of block (row, segment): (m, s) and, by mode, t = the entropy sum (ENTROPY),
            or label smoothing's distance sum t = sum (m - x) (SUM) or sum w (m - x) (WSUM) with its
            weight sum in pw (see dist_merge); when best, also the segment's best (value, index) in the
            top-k order into (pv, pi) ((-inf, INT64_MAX) for none), from the same pass (what
            `fastlogits stats` needs: the entropy state and the argmax)."""
            r, g, tid, sc, T, start, stop = block_segment(x, temp, softcap, seglen)
            lv = cuda.local.array(SU, CT)
            m = CT(-math.inf)
            s = 0.0
            t = 0.0
            dsum = 0.0
            wsum = 0.0
            bv = CT(-math.inf)
            bi = INT64_MAX
            for base in range(start + tid, stop, TPB * SU):
                cmax = stats_load(x, r, base, stop, sc, T, lv)
                m0 = m
                m, s, t = stats_fold(lv, cmax, m, s, t, mode == ENTROPY)
                if best and (cmax >= bv or stats_has_nan(lv)):
                    for u in range(SU):
                        j = base + u * TPB
                        if j < stop and better(lv[u], j, bv, bi):
                            bv = lv[u]
                            bi = j
                if mode == SUM or mode == WSUM:
                    # the chunk's distances from the new max (from 0 where it is not finite), in double
                    # as the C core's fl_row_ce
                    ref = float64(m) if m > -math.inf and m < math.inf else 0.0
                    d = 0.0
                    cw = 0.0
                    for u in range(SU):
                        j = base + u * TPB
                        if j < stop:
                            wj = float64(w[j]) if mode == WSUM else 1.0
                            d += wdist(wj, ref - float64(lv[u]))
                            cw += wj
                    dsum, wsum = dist_merge(dsum, wsum, float64(m0), d, cw, float64(m), float64(m))
            sh_m = cuda.shared.array(TPB, float64)
            sh_s = cuda.shared.array(TPB, float64)
            sh_t = cuda.shared.array(TPB, float64)
            if mode == SUM or mode == WSUM:
                sh_w = cuda.shared.array(TPB, float64)
                sh_w[tid] = wsum
            else:
                sh_w = sh_s         # (not used)
            sh_m[tid] = m
            sh_s[tid] = s
            sh_t[tid] = t if mode == ENTROPY else dsum
            block_merge(sh_m, sh_s, sh_t, sh_w, mode, tid)
            if tid == 0:
                pm[r, g] = sh_m[0]
                ps[r, g] = sh_s[0]
                pt[r, g] = sh_t[0]
                if mode == SUM or mode == WSUM:
                    pw[r, g] = sh_w[0]
            if best:
                sh_v = cuda.shared.array(TPB, float64)
                sh_i = cuda.shared.array(TPB, int64)
                win_v = cuda.shared.array(1, float64)
                win_i = cuda.shared.array(1, int64)
                sh_v[tid] = bv
                sh_i[tid] = bi
                block_best(sh_v, sh_i, win_v, win_i, tid)
                if tid == 0:
                    pv[r, g] = win_v[0]
                    pi[r, g] = win_i[0]

        return stats_part

    @cuda.jit
    def stats_fused_finish(x, temp, softcap, labels, has_labels, ignore_index, pm, ps, pt, pv, pi, nll, ent,
                           top):
        """Per row: merge the segments (in order) into the entropy, the argmax (0 for an empty row) and the
        unweighted cross-entropy of the label (as ce_finish; 0 for ignored rows and without labels)."""
        r = cuda.grid(1)
        if r >= pm.shape[0]:
            return
        m = pm[r, 0]
        s = ps[r, 0]
        t = pt[r, 0]
        bv = pv[r, 0]
        bi = pi[r, 0]
        for g in range(1, pm.shape[1]):
            m, s, t = ent_merge(m, s, t, pm[r, g], ps[r, g], pt[r, g])
            if better(pv[r, g], pi[r, g], bv, bi):
                bv = pv[r, g]
                bi = pi[r, g]
        ent[r] = ent_result(m, s, t)
        top[r] = 0 if bi == INT64_MAX else bi
        nll[r] = 0.0
        if has_labels and labels[r] != ignore_index:
            nll[r] = nll_of(m, s, value(x, r, labels[r], CT(softcap), CT(temp[r])))

    def make_softmax_map(store):
        @cuda.jit
        def softmax_map(x, temp, softcap, seglen, pm, ps, log, wide, out):
            """out[r, j] = softmax (or log-softmax) from the row's finished state (pm[r, 0], ps[r, 0]),
            written by store; rows whose max is not finite (all -inf, +inf, NaN) are NaN, like PyTorch.
            wide: the log-softmax in float64 (float32 logits into a float64 out: x - m can pass float32's
            range where the result fits, as the C core's fl__log_softmax_wide)."""
            r, g, tid, sc, T, start, stop = block_segment(x, temp, softcap, seglen)
            M = pm[r, 0]
            S = ps[r, 0]
            finite = M > -math.inf and M < math.inf
            m = CT(0)
            ls = CT(0)
            inv = CT(0)
            LS = 0.0
            if finite:
                m = CT(M)
                LS = math.log(S)
                ls = CT(LS)
                inv = CT(1.0 / S)
            lv = cuda.local.array(UNROLL, CT)
            for base in range(start + tid, stop, TPB * UNROLL):
                if finite:
                    load_chunk(x, r, base, stop, sc, T, lv)
                for u in range(UNROLL):
                    j = base + u * TPB
                    if j < stop:
                        y = CT(math.nan)
                        if finite and wide:
                            store(out, r, j, (float64(lv[u]) - M) - LS)
                            continue
                        if finite:
                            if log:
                                y = (lv[u] - m) - ls
                            else:
                                y = CT(math.exp(lv[u] - m)) * inv
                        store(out, r, j, y)

        return softmax_map

    softmax_map = make_softmax_map(store_value)
    softmax_map_bf16 = make_softmax_map(store_bf16)      # out: bfloat16 bits (uint16)

    @cuda.jit(device=True)
    def collect(x, r, first, stop, sc, T, lv, hv, hi, kl, bounded, lastv, lasti, fold, m, s):
        """One pass over the thread's columns (first, first + TPB, ... < stop): its kl best candidates
        into (hv, hi), best first (when bounded, only those ranked below (lastv, lasti)), and whether it
        had more than kl; when fold, the logsumexp state (m, s) is folded in the same pass. Returns
        (n, more, m, s)."""
        n = 0
        more = False
        t = 0.0
        for base in range(first, stop, TPB * UNROLL):
            cmax = load_chunk(x, r, base, stop, sc, T, lv)
            if fold:
                m, s, t = fold_chunk(lv, cmax, m, s, t, False)
            if n == kl and not (cmax >= hv[kl - 1]) and not has_nan(lv):
                more = True               # nothing in this chunk can enter the full list
                continue
            for u in range(UNROLL):
                j = base + u * TPB
                v = lv[u]
                if j >= stop or (bounded and not better(lastv, lasti, v, j)):
                    continue
                if n == kl:
                    more = True
                    if not better(v, j, hv[kl - 1], hi[kl - 1]):
                        continue
                    p = kl - 1            # replaces the worst
                else:
                    p = n
                    n += 1
                while p > 0 and better(v, j, hv[p - 1], hi[p - 1]):
                    hv[p] = hv[p - 1]
                    hi[p] = hi[p - 1]
                    p -= 1
                hv[p] = v
                hi[p] = j
        return n, more, m, s

    @cuda.jit
    def topk_part(x, temp, softcap, seglen, with_lse, pv, pi, pm, ps):
        """The k = pv.shape[2] best (value, index) of block (row, segment), best first, padded with
        (-inf, INT64_MAX); with_lse: the segment's logsumexp state too, from the same pass.

        Each thread keeps its min(k, KLOCAL) best candidates (one pass over its columns); then k rounds
        pick the block's best remaining head and advance its owner. A thread whose list runs out while
        it had more candidates rescans for the next ones below its last taken (rare for random rows)."""
        r, g, tid, sc, T, start, stop = block_segment(x, temp, softcap, seglen)
        k = pv.shape[2]
        kl = min(k, KLOCAL)
        sh_v = cuda.shared.array(TPB, float64)
        sh_i = cuda.shared.array(TPB, int64)
        win_v = cuda.shared.array(1, float64)
        win_i = cuda.shared.array(1, int64)
        lv = cuda.local.array(UNROLL, CT)
        hv = cuda.local.array(KLOCAL, CT)
        hi = cuda.local.array(KLOCAL, int64)
        n, more, m, s = collect(x, r, start + tid, stop, sc, T, lv, hv, hi, kl, False, CT(0), INT64_MAX,
                                with_lse, CT(-math.inf), 0.0)
        ptr = 0
        lastv = CT(0)
        lasti = INT64_MAX
        for q in range(k):
            if ptr == n and more:
                n, more, _, _ = collect(x, r, start + tid, stop, sc, T, lv, hv, hi, kl, True, lastv, lasti,
                                        False, CT(0), 0.0)
                ptr = 0
            if ptr < n:
                sh_v[tid] = hv[ptr]
                sh_i[tid] = hi[ptr]
            else:
                sh_v[tid] = -math.inf
                sh_i[tid] = INT64_MAX
            block_best(sh_v, sh_i, win_v, win_i, tid)
            cuda.syncthreads()          # the winner is in win_v[0], win_i[0]
            if ptr < n and hi[ptr] == win_i[0]:
                lastv = hv[ptr]
                lasti = hi[ptr]
                ptr += 1
            if tid == 0:
                pv[r, g, q] = win_v[0]
                pi[r, g, q] = win_i[0]
        if with_lse:
            sh_m = cuda.shared.array(TPB, float64)
            sh_s = cuda.shared.array(TPB, float64)
            sh_m[tid] = m
            sh_s[tid] = s
            block_merge(sh_m, sh_s, sh_s, sh_s, LSE, tid)
            if tid == 0:
                pm[r, g] = sh_m[0]
                ps[r, g] = sh_s[0]

    @cuda.jit
    def ce_finish(x, temp, softcap, labels, ignore_index, wtotal, smoothing, pm, ps, pt, pw, nll, smooth,
                  lse):
        """Per row: merge the segment states; lse (NaN where a +inf makes log-softmax NaN), nll = lse -
        x[label] (formed as nll_of does), smooth = sum w (lse - x) = sum w (m - x) + wtotal log s from the
        segments' distance sums (pt, pw) (when smoothing; NaN where log-softmax is); ignored rows get 0,
        rows whose label is out of range NaN (x is not read there)."""
        r = cuda.grid(1)
        if r >= pm.shape[0]:
            return
        lab = labels[r]
        if lab == ignore_index:
            nll[r] = 0.0
            smooth[r] = 0.0
            lse[r] = 0.0
            return
        m = pm[r, 0]
        s = ps[r, 0]
        t = 0.0
        wt = 0.0
        if smoothing:
            t = pt[r, 0]
            wt = pw[r, 0]
        for g in range(1, pm.shape[1]):
            m, s, t, wt = state_merge(m, s, t, wt, pm[r, g], ps[r, g], pt[r, g] if smoothing else 0.0,
                                      pw[r, g] if smoothing else 0.0, SUM if smoothing else LSE)
        val = lse_result(m, s)
        if val == math.inf:
            val = math.nan
        lse[r] = val
        if lab < 0 or lab >= x.shape[1]:     # device labels are checked afterwards (ce_reduce): no read
            nll[r] = math.nan
            smooth[r] = math.nan
            return
        nll[r] = nll_of(m, s, value(x, r, lab, CT(softcap), CT(temp[r])))
        smooth[r] = 0.0
        if smoothing:
            smooth[r] = math.nan
            if m > -math.inf and m < math.inf:
                smooth[r] = dist_total(t, wtotal, math.log(s))

    k = Kernels()
    k.kind = kind
    k.compute = np.dtype(CT)
    k.unroll = UNROLL
    k.value = value
    k.exp_le0 = exp_le0
    k.load_chunk = load_chunk
    k.fold_chunk = fold_chunk
    k.stats_part = {v: make_stats_part(*v) for v in STATS_VARIANTS}
    k.stats_fused_finish = stats_fused_finish
    k.softmax_map = softmax_map
    k.softmax_map_bf16 = softmax_map_bf16
    k.topk_part = topk_part
    k.ce_finish = ce_finish
    return k


def kind_cache(build):
    """for_kind(kind) -> build(kind), each input kind ("float16", "bfloat16", "float32", "float64") built
    on first use only (compiling kernels is slow)."""
    cache = {}

    def for_kind(kind):
        k = cache.get(kind)
        if k is None:
            k = cache[kind] = build(kind)
        return k

    return for_kind


for_kind = kind_cache(_build)


KINDS = tuple(_LOADS)


def compile_signatures():
    """Every kernel with the argument types the backend launches it with: (name, kernel, signature),
    for ahead-of-time checks (``numba.cuda.compile_ptx``). Logits arrays are typed with any strides ("A"),
    as device inputs may have; the backend's own arrays are C-contiguous."""
    from numba import boolean, types
    from numba.np.numpy_support import from_dtype

    f8 = types.float64
    i8 = types.int64
    row_f8 = types.Array(f8, 1, "C")
    st2 = types.Array(f8, 2, "C")
    out = []
    for kind in KINDS:
        k = for_kind(kind)
        ct = from_dtype(k.compute)
        xt = types.Array(types.uint16 if kind == "bfloat16" else from_dtype(np.dtype(kind)), 2, "A")
        for mode, best in STATS_VARIANTS:
            name = f"stats_part[{kind}, mode {mode}{', best' if best else ''}]"
            out.append((name, k.stats_part[mode, best],
                        (xt, row_f8, f8, i8, types.Array(ct, 1, "C"), st2, st2, st2, st2, st2,
                         types.Array(i8, 2, "C"))))
        out.append((f"stats_fused_finish[{kind}]", k.stats_fused_finish,
                    (xt, row_f8, f8, types.Array(i8, 1, "C"), boolean, i8, st2, st2, st2, st2,
                     types.Array(i8, 2, "C"), row_f8, row_f8, types.Array(i8, 1, "C"))))
        for o in ("float16", "float32", "float64"):
            ot = types.Array(from_dtype(np.dtype(o)), 2, "C")
            out.append((f"softmax_map[{kind}->{o}]", k.softmax_map,
                        (xt, row_f8, f8, i8, st2, st2, boolean, boolean, ot)))
        out.append((f"softmax_map_bf16[{kind}]", k.softmax_map_bf16,
                    (xt, row_f8, f8, i8, st2, st2, boolean, boolean, types.Array(types.uint16, 2, "C"))))
        out.append((f"topk_part[{kind}]", k.topk_part,
                    (xt, row_f8, f8, i8, boolean, types.Array(f8, 3, "C"), types.Array(i8, 3, "C"), st2,
                     st2)))
        for lt in (types.int64, types.int32):     # labels: the host's int64, or a device array's int32
            out.append((f"ce_finish[{kind}, {lt}]", k.ce_finish,
                        (xt, row_f8, f8, types.Array(lt, 1, "C"), i8, f8, boolean, st2, st2, st2, st2,
                         row_f8, row_f8, row_f8)))
    for rt in (types.float32, types.float64):        # out: float64, or a device result's dtype
        out.append((f"stats_finish[{rt}]", stats_finish, (st2, st2, st2, i8, types.Array(rt, 1, "C"))))
    for lt in (types.int64, types.int32):
        for rt in (types.float32, types.float64):     # loss and total: the result dtype
            out.append((f"ce_reduce[{lt}, {rt}]", ce_reduce,
                        (types.Array(lt, 1, "C"), i8, i8, row_f8, boolean, f8, f8, row_f8, row_f8, row_f8, i8,
                         i8, types.Array(rt, 1, "C"), types.Array(rt, 1, "C"), types.Array(i8, 1, "C"))))
    for ct in (types.float32, types.float64):
        out.append((f"topk_finish[{ct}]", topk_finish,
                    (types.Array(f8, 3, "C"), types.Array(i8, 3, "C"), st2, st2, boolean,
                     types.Array(ct, 2, "C"), types.Array(i8, 2, "C"), st2)))
    return out
