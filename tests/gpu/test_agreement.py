"""backend="gpu" against backend="cpu": every operation, dtype and option, random and edge-case rows, sizes
at the block boundary (TPB = 128 threads), rows split over several blocks (small chunk_size).

Tolerances (the issue's): float32 compute agrees within 2e-5 relative, plus 2e-5 * (1 + M) absolute for
log-domain results (M: the row's largest finite |x / T| after the softcap, as in tests/tolerances.py);
float64 within 1e-12 likewise; results stored in float16/bfloat16 add one unit of their rounding; argmax and
top-k indices exactly.
"""

import ml_dtypes
import numpy as np
import pytest

import fastlogits as fl
from tests.helpers import awkward_rows

# the simulator computes with NumPy scalars, which warn where the GPU silently gives inf or NaN
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float16), BF16, np.dtype(np.float32), np.dtype(np.float64)]
IDS = [d.name for d in DTYPES]
REL = {"float32": 2e-5, "float64": 1e-12}
ROUND = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 0.0, "float64": 0.0}

# a subset of tests.helpers.awkward_rows: every edge case once, few rows (the simulator is slow)
EDGE = [
    "some_neg_inf",
    "all_neg_inf",
    "pos_inf",
    "nan",
    "nan_among_neg_inf",
    "ties_at_max",
    "dominant",
    "neg_inf_then_low",
    "inf_and_neg_inf",
    "extreme_one",
]


def edge_matrix(dtype, n=37):
    rows = awkward_rows(dtype, n)
    return np.stack([rows[k] for k in EDGE])


def compute(dtype):
    return "float64" if np.dtype(dtype) == np.float64 else "float32"


def row_scale(x, temperature=1.0, softcap=None):
    """1 + the largest finite |x / T| of each row (after the softcap), float64, shape (rows, 1)."""
    y = np.asarray(x, dtype=np.float64)
    if softcap:
        y = softcap * np.tanh(y / softcap)
    y = y / np.reshape(np.asarray(temperature, dtype=np.float64), (-1, 1) if np.ndim(temperature) else ())
    y = np.where(np.isfinite(y), np.abs(y), 0.0)
    return 1.0 + (y.max(axis=-1, keepdims=True) if y.shape[-1] else np.zeros(y.shape[:-1] + (1,)))


def assert_close(got, want, rel, atol, what):
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    g = got.astype(np.float64)
    w = want.astype(np.float64)
    nan_diff = np.argwhere(np.isnan(g) != np.isnan(w))
    assert not len(nan_diff), f"{what}: NaN on one backend only, at {nan_diff.tolist()}"
    inf = np.isinf(w) | np.isinf(g)
    assert np.array_equal(g[inf], w[inf]), f"{what}: infinities differ: {g[inf]} vs {w[inf]}"
    ok = np.isnan(w) | inf | (np.abs(g - w) <= rel * np.abs(w) + atol)
    if not ok.all():
        bad = np.argwhere(~ok)[:5]
        raise AssertionError(f"{what}: differ at {bad.tolist()}: gpu {g[~ok][:5]} cpu {w[~ok][:5]}")


def agree(name, x, k=None, labels=None, **kw):
    """Call fastlogits.<name> on both backends and compare."""
    fn = getattr(fl, name)
    args = (x,) + ((k,) if k is not None else ()) + ((labels,) if labels is not None else ())
    got = fn(*args, backend="gpu", **kw)
    want = fn(*args, backend="cpu", **kw)
    dt = BF16 if kw.get("dtype") == "bfloat16" else np.dtype(x.dtype)
    rel = REL[compute(x.dtype)]
    scale = row_scale(
        x.reshape(-1, x.shape[-1]),
        np.reshape(kw.get("temperature", 1.0), -1)
        if np.ndim(kw.get("temperature", 1.0))
        else kw.get("temperature", 1.0),
        kw.get("softcap"),
    )
    what = f"{name}[{dt.name}, {x.shape}, {kw}]"
    if name in ("top_k", "top_k_logprobs"):
        assert np.array_equal(got[1], want[1]), f"{what}: indices {got[1]} != {want[1]}"
        assert_close(
            got[0],
            want[0],
            rel + ROUND[dt.name] if name == "top_k" else rel,
            rel * scale.reshape(got[0].shape[:-1] + (1,)),
            what,
        )
        return got
    if name == "argmax":
        assert got.dtype == np.int64 and np.array_equal(got, want), f"{what}: {got} != {want}"
        return got
    if name in ("softmax", "log_softmax"):
        out_name = kw.get("dtype") or dt.name
        out_name = np.dtype(out_name).name if out_name != "bfloat16" else "bfloat16"
        s = scale.reshape(x.shape[:-1] + (1,))
        if name == "softmax":
            assert_close(got, want, rel * s + ROUND[out_name], 1e-37 + ROUND[out_name] * 2.0**-14, what)
        else:
            assert_close(got, want, rel + ROUND[out_name], rel * s, what)
        return got
    s = scale.reshape(np.shape(want)) if np.ndim(want) else scale.max()
    if name == "cross_entropy" and kw.get("reduction", "mean") != "none":
        s = scale.max() * (1 + kw.get("z_loss", 0.0) * scale.max())
    if name == "cross_entropy" and kw.get("label_smoothing", 0.0):
        s = s * 2
    assert_close(got, want, rel, rel * s, what)
    return got


OPS = ["logsumexp", "entropy", "softmax", "log_softmax", "argmax", "top_k", "top_k_logprobs"]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_random_rows_every_op(gpu, rng, dtype):
    x = (rng.standard_normal((3, 129)) * 4).astype(dtype)
    for name in OPS:
        agree(name, x, k=3 if name.startswith("top_k") else None)
    labels = np.array([0, 128, -100])
    w = rng.random(129) + 0.5
    agree("cross_entropy", x, labels=labels, weight=w, label_smoothing=0.1, reduction="mean", z_loss=1e-3)
    if dtype == np.dtype(np.float32):
        agree("cross_entropy", x, labels=labels, reduction="none")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_edge_rows(gpu, dtype):
    x = edge_matrix(dtype)
    full = dtype == np.dtype(np.float32)
    for name in ("logsumexp", "argmax") + (("entropy", "softmax") if full else ()):
        agree(name, x)
    agree("top_k", x, k=4)
    if full or dtype == BF16:
        labels = np.arange(len(x)) % x.shape[1]
        labels[1] = -100
        agree("cross_entropy", x, labels=labels, reduction="none", label_smoothing=0.2)
    if full:
        agree("top_k_logprobs", x, k=2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_of_huge_logits(gpu, dtype):
    """(m - x) + log s, not lse - x: at |x| ~ 3e38 the latter rounds ln 2 away (README's example). Exact
    values, not the M-scaled tolerance of agree(); the fused statistics pass too."""
    from fastlogits.gpu import backend as gpu_backend

    x = np.array([[3e38, -3e38, 3e38], [1e30, 0, 1e30], [3e38, 3e38, 3e38], [-3e38, 3e38, 0]], dtype)
    y = np.array([2, 2, 1, 0])
    want = [np.log(2), np.log(2), np.log(3)]
    got = fl.cross_entropy(x, y, reduction="none", backend="gpu")
    np.testing.assert_allclose(got[:3], want, rtol=1e-6)
    # 6e38 overflows a float32 result, not a float64 one
    assert got[3] == fl.cross_entropy(x, y, reduction="none", backend="cpu")[3] == np.dtype(dtype).type(6e38)
    nll = gpu_backend.stats(x, np.dtype(dtype).name, np.ones(4), 0.0, y, -100, 4096, 1)[0]
    np.testing.assert_allclose(nll[:3], want, rtol=1e-6)
    smooth = fl.cross_entropy(x[:3], y[:3], reduction="none", label_smoothing=0.1, backend="gpu")
    np.testing.assert_array_equal(np.isfinite(smooth), [True, True, True])


def test_log_softmax_of_float32_into_float64_does_not_overflow(gpu):
    """As on the CPU: float32 logits [3e38, -3e38] written as float64 log-probabilities give -6e38 (x - m
    in double), not float32's -inf; the same values as the CPU, for a host and a device out."""
    from numba import cuda

    x = np.array([[3e38, -3e38, 1.0], [0.5, -3.3e38, 3.3e38]], np.float32)
    want = fl.log_softmax(x, dtype=np.float64, backend="cpu")
    assert want[0, 1] < -6e38 and want[1, 1] < -6e38
    np.testing.assert_allclose(fl.log_softmax(x, dtype=np.float64, backend="gpu"), want, rtol=1e-15)
    out = cuda.device_array(x.shape, np.float64)
    fl.log_softmax(cuda.to_device(x), out=out)
    np.testing.assert_allclose(out.copy_to_host(), want, rtol=1e-15)
    np.testing.assert_allclose(fl.log_softmax(x, backend="gpu"), fl.log_softmax(x, backend="cpu"), rtol=1e-7)


@pytest.mark.parametrize("V", [1, 127, 128, 129, 1024, 1025])
def test_block_boundaries(gpu, rng, V):
    x = (rng.standard_normal((2, V)) * 3).astype(np.float32)
    x[1, -1] = 20.0  # the max in the last column (the last thread's last element)
    for name in ("logsumexp", "entropy", "log_softmax", "argmax"):
        agree(name, x)
    agree("top_k", x, k=min(V, 3))
    agree("cross_entropy", x, labels=np.array([V - 1, 0]), reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_full_chunks(gpu, rng, dtype):
    """Rows long enough for full chunks (a thread's STATS_UNROLLS columns loaded with no bound checks, the
    NaN test left to the chunk's sum; the selection kernels' UNROLLS chunks are as long or shorter) and a
    tail, no longer (the simulator's time grows with the row): the edge rows, whose NaN, inf and -inf fall
    in the first full chunk and at the row's end; a NaN and a +inf in one thread's chunk, or in its
    consecutive chunks; a NaN in the chunk where the max grows; random rows with temperature and
    softcap."""
    from fastlogits.gpu import kernels as K

    tpb = K.TPB
    step = tpb * K.STATS_UNROLLS["bfloat16" if dtype == BF16 else dtype.name]   # a statistics block's chunk
    n = step + 131                  # a full chunk for every thread, then a tail (the selection kernels: two)
    x = edge_matrix(dtype, n)
    extra = (rng.standard_normal((4, n)) * 3).astype(dtype)
    extra[0, [3, 3 + tpb]] = [np.nan, np.inf]             # thread 3's first chunk: NaN beats +inf
    extra[3, [3, 3 + step]] = [np.nan, np.inf]            # its next chunk: the NaN stays
    extra[1, 5] = 40.0
    extra[1, 5 + 2 * tpb] = np.nan                        # thread 5: the max grows in the NaN's chunk
    extra[2, 7 + tpb] = 40.0                              # a finite row, its max in a full chunk
    x = np.concatenate([x, extra])
    for name in ("logsumexp", "entropy", "argmax"):
        agree(name, x)
    agree("top_k_logprobs", x, k=3)
    labels = np.arange(len(x)) * 97 % n
    agree("cross_entropy", x, labels=labels, reduction="none", label_smoothing=0.1)
    y = (rng.standard_normal((3, n)) * 6).astype(dtype)
    t = np.array([0.5, 1.0, 3.0])
    agree("logsumexp", y, temperature=t, softcap=5.0)


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16, np.dtype(np.float64)], ids=str)
def test_rows_split_over_blocks(gpu, rng, dtype):
    """chunk_size below V/2 with few rows: each row is folded by several blocks and the states merged."""
    x = (rng.standard_normal((2, 300)) * 3).astype(dtype)
    x[0, :100] = -np.inf  # a first segment of all -inf, later values near -1000
    x[0, 100:] -= 1000
    x[1, 250] = 30.0
    agree("top_k_logprobs", x, k=3, chunk_size=64)
    agree("entropy", x, chunk_size=64)
    if dtype == np.dtype(np.float32):
        for name in ("logsumexp", "softmax", "argmax"):
            agree(name, x, chunk_size=64)
        agree(
            "cross_entropy",
            x,
            labels=np.array([150, 250]),
            reduction="none",
            label_smoothing=0.3,
            weight=rng.random(300),
            chunk_size=64,
        )


def test_split_rows_with_edges(gpu):
    x = edge_matrix(np.float32, n=80)[[1, 2, 3, 4, 6]]
    x[0, 70] = 1.0  # all -inf except the last segment
    agree("entropy", x, chunk_size=32)
    agree("top_k", x, k=2, chunk_size=32)


def test_top_k_many_from_one_thread(gpu, rng):
    """k beyond the candidates a thread keeps (8), all from one thread's columns: the rescan path."""
    x = (rng.standard_normal((2, 2100)) * 2).astype(np.float32)
    x[0, ::128] = 10.0 + np.arange(17)[::-1]        # thread 0 of the block holds the 17 best
    x[1, 5::128] = 50.0                              # 17 ties, all in thread 5's columns
    x[1, 2000] = np.nan
    agree("top_k", x, k=12)
    agree("top_k_logprobs", x, k=20, chunk_size=700)


def test_top_k_whole_row(gpu, rng):
    x = edge_matrix(np.float32, n=20)[[0, 1, 3, 5, 6]]
    agree("top_k", x, k=20)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_temperature_and_softcap(gpu, rng, dtype):
    x = (rng.standard_normal((3, 70)) * 6).astype(dtype)
    t = np.array([0.5, 1.0, 3.0])
    for name in ("logsumexp", "softmax", "entropy", "argmax"):
        agree(name, x, temperature=t, softcap=5.0)
    agree("top_k_logprobs", x, k=3, temperature=t)
    agree("cross_entropy", x, labels=np.array([1, 2, 3]), temperature=2.0, softcap=3.0, reduction="none")


def test_softmax_output_dtypes(gpu, rng):
    x = (rng.standard_normal((2, 50)) * 3).astype(np.float32)
    for dt in ("float16", "bfloat16", "float64"):
        agree("softmax", x, dtype=dt)
    agree("log_softmax", x.astype(np.float64), dtype="float32")
    out = np.full((2, 50), np.nan, np.float32)
    got = fl.softmax(x, backend="gpu", out=out)
    assert got is out and np.isfinite(out).all()


def test_layouts_and_leading_axes(gpu, rng):
    base = (rng.standard_normal((2, 3, 40)) * 3).astype(np.float32)
    agree("logsumexp", base)  # 3-D
    agree("logsumexp", base[0, 0])  # 1-D
    agree("argmax", base[:, ::-1, ::-2])  # negative and non-unit strides
    agree("softmax", np.asfortranarray(base[0]))  # Fortran order


def test_empty_shapes(gpu, monkeypatch):
    x = np.zeros((3, 0), np.float32)
    assert np.array_equal(fl.logsumexp(x, backend="gpu"), np.full(3, -np.inf, np.float32))
    assert np.isnan(fl.entropy(x, backend="gpu")).all()
    assert fl.softmax(x, backend="gpu").shape == (3, 0)
    y = np.zeros((0, 5), np.float32)
    assert fl.logsumexp(y, backend="gpu").shape == (0,)
    assert fl.top_k(y, 2, backend="gpu")[1].shape == (0, 2)
    # k = 0 (as torch.topk): empty results, host or device, in the dtypes k > 0 gives; nothing launched
    from fastlogits.gpu import backend as GB
    w = np.ones((3, 5), np.float32)
    for fn in (fl.top_k, fl.top_k_logprobs):
        dw = gpu.cuda.to_device(w)
        for a, b in ((w, w), (x, w), (dw, dw)):                  # (b: the same kind, with V > 0)
            want = fn(b, 1, backend="gpu")
            with monkeypatch.context() as m:
                m.setattr(GB, "_blocks", lambda *args: pytest.fail("k = 0 queued work"))
                got = fn(a, 0, backend="gpu")
            for g, h in zip(got, want):
                assert g.shape == (3, 0) and g.dtype == h.dtype and type(g) is type(h), (fn.__name__, g)
    z = np.zeros((2, 3, 0), np.float32)                      # V = 0 under two leading axes
    assert np.array_equal(fl.logsumexp(z, backend="gpu"), np.full((2, 3), -np.inf, np.float32))
    for call in (lambda b: fl.argmax(z, backend=b), lambda b: fl.sample(z, backend=b)):
        for b in ("cpu", "gpu"):                                 # the same clear error on both
            with pytest.raises(ValueError, match="empty vocabulary"):
                call(b)
    # no rows, on the device, with host labels (nothing to upload: the simulator refused the empty copy)
    d = gpu.cuda.to_device(y)
    for reduction, want in (("none", np.zeros(0)), ("mean", np.nan), ("sum", 0.0)):
        got = fl.cross_entropy(d, np.zeros(0, np.int64), reduction=reduction).copy_to_host()
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(fl.cross_entropy(y, np.zeros(0, np.int64), reduction=reduction), want)


def test_host_row_blocks(gpu, rng, monkeypatch):
    """Host arrays larger than the transfer block are moved in several row blocks."""
    x = (rng.standard_normal((5, 64)) * 3).astype(np.float32)
    monkeypatch.setattr(gpu, "HOST_BLOCK_BYTES", 2 * 64 * 4)  # two rows per block
    for name in ("logsumexp", "softmax", "argmax"):
        agree(name, x)
    agree("top_k_logprobs", x, k=2)
    agree("cross_entropy", x, labels=np.array([0, 1, 2, -100, 63]), reduction="none")


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("block_bytes", [None, 2 * 64 * 4], ids=["one_block", "row_blocks"])
def test_host_rows_laid_out_by_columns(gpu, rng, monkeypatch, dtype, block_bytes):
    """Host logits laid out by columns (transposed, Fortran order) are uploaded through the tiled copy
    of the CPU backend (NumPy's copy of them goes a row at a time), in one block or in row blocks."""
    from fastlogits.cpu import backend as cpu

    if block_bytes:
        monkeypatch.setattr(gpu, "HOST_BLOCK_BYTES", block_bytes)
    tiled = []
    copy = cpu._layout.copy
    monkeypatch.setattr(cpu._layout, "copy", lambda a, b, t: tiled.append(a.shape) or copy(a, b, t))
    x = (rng.standard_normal((5, 64)) * 3).astype(dtype)
    for view in (np.asfortranarray(x), np.ascontiguousarray(x.T).T):
        agree("logsumexp", view)
        agree("cross_entropy", view, labels=np.array([0, 1, 2, -100, 63]), reduction="none")
        tiled.clear()
        got = fl.logsumexp(view, backend="gpu")
        assert tiled, "the upload did not use the tiled copy"
        np.testing.assert_array_equal(got, fl.logsumexp(x, backend="gpu"))


def test_host_row_blocks_stopped_early_wait_for_their_copies(gpu, monkeypatch):
    """A caller that stops taking row blocks (an exception in its loop) still waits for the copies in
    flight from the two pinned staging buffers before they can be refilled or freed: both streams are
    synchronized when the blocks are closed."""
    synced = []
    stream = gpu.cuda.stream

    def recorded_stream():
        s = stream()
        s.synchronize = lambda: synced.append(s)
        return s

    monkeypatch.setattr(gpu.cuda, "stream", recorded_stream)
    monkeypatch.setattr(gpu, "HOST_BLOCK_BYTES", 2 * 64 * 4)    # blocks of two rows: three blocks
    x = np.zeros((5, 64), np.float32)
    blocks = gpu._blocks(x, "float32", np.ones(5))
    first = next(blocks)
    assert first.rows == 2 and not synced
    blocks.close()
    assert len(synced) == 2 and synced[0] is not synced[1]


def test_use_backend(gpu, rng):
    x = rng.standard_normal((2, 10)).astype(np.float32)
    with fl.use_backend("gpu"):
        a = fl.logsumexp(x)
    np.testing.assert_allclose(a, fl.logsumexp(x, backend="cpu"), rtol=2e-5)
    assert "gpu" in fl.available_backends()


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_smoothing_at_large_offsets(gpu, rng, weighted):
    """Label smoothing's distance sums from each thread's, block's and segment's max merge at the row's
    max (the C core's rule): float64 logits near 1e9 keep 1e-13 relative, where W lse - sum w x lost 2e-9.
    Row 0's max arrives in a late segment; row 1 has a segment of only -inf (its term is inf, or NaN where
    such a column has weight 0, as on the CPU and in PyTorch)."""
    from tests import reference as ref

    x = 1e9 + 3.0 * rng.standard_normal((3, 300))
    x[0, :200] -= 40.0
    x[1, :64] = -np.inf
    y = np.array([5, 100, 299])
    w = rng.uniform(0.2, 2.0, 300) if weighted else None
    if weighted:
        w[10] = 0.0
    kw = dict(label_smoothing=0.1, reduction="none", weight=w)
    want = ref.cross_entropy(x, y, **kw)
    assert (np.isnan(want[1]) if weighted else want[1] == np.inf)
    for chunk in (64, None):
        got = fl.cross_entropy(x, y, chunk_size=chunk, backend="gpu", **kw)
        np.testing.assert_allclose(got, want, rtol=1e-13, err_msg=f"chunk_size {chunk}")
        cpu = fl.cross_entropy(x, y, chunk_size=chunk, backend="cpu", **kw)
        np.testing.assert_allclose(got, cpu, rtol=1e-13)


def test_an_infinite_class_weight_with_smoothing(gpu):
    """An infinite class weight on a row's max gives PyTorch's inf with label smoothing, not inf * 0 = NaN
    (the C core's FL__WDIST rule in the kernel's distance sums); weights inf and -inf give NaN. Whole rows
    and rows split over chunks of one column, so the max arrives after the distances were taken. Literal
    torch 2.13 values (F.cross_entropy, float32, label_smoothing=0.1), as in tests/test_cross_entropy.py."""
    inf, nan = np.inf, np.nan
    x = np.array([[2.0, 1.0, 0.5], [0.1, 3.0, -1.0]], np.float32)
    y = np.array([1, 0])
    for w, want in (([inf, 1, 1], [inf, inf]), ([1, inf, 1], [inf, inf]), ([1, 1, -inf], [-inf, -inf]),
                    ([inf, 1, -inf], [nan, nan])):
        for chunk in (1, None):
            got = fl.cross_entropy(x, y, weight=np.array(w, np.float32), label_smoothing=0.1,
                                   reduction="none", chunk_size=chunk, backend="gpu")
            np.testing.assert_equal(got, np.float32(want), err_msg=f"weights {w}, chunk_size {chunk}")
    # rows whose max holds all the mass (log s = 0): a p = 0 class of weight inf adds inf, not inf * 0 = NaN;
    # a NaN weight gives NaN, a p = 1 class adds 0 otherwise (fl__dist_total; see tests/test_cross_entropy.py)
    x = np.array([[0.5, -inf, -inf], [0.5, -200.0, 3.0], [1.0, -inf, -200.0], [1.0, -250.0, -200.0]],
                 np.float32)
    y = np.array([0, 2, 1, 1])
    for w, want in (([1, inf, 1], [inf, inf, inf, inf]), ([inf, 1, 1], [nan, inf, inf, 240.96666]),
                    ([1, -inf, 1], [nan, -inf, -inf, -inf]), ([nan, 1, 1], [nan, nan, nan, nan])):
        for chunk in (1, None):
            got = fl.cross_entropy(x, y, weight=np.array(w, np.float32), label_smoothing=0.1,
                                   reduction="none", chunk_size=chunk, backend="gpu")
            np.testing.assert_equal(got, np.float32(want), err_msg=f"weights {w}, chunk_size {chunk}")


def test_entropy_of_maxima_past_the_double_range_apart(gpu):
    """float64 chunks with maxima 1e308 and -1e308 (their gap overflows): the GPU's merges skip the vanished
    state, as the C core's now does too; both give the entropy of the n equal maxima."""
    n = 300
    z = np.concatenate([np.full(n, -1e308), np.full(n, 1e308)])
    for row in (z, z[::-1]):
        for chunk in (64, None):
            got = fl.entropy(row, backend="gpu", chunk_size=chunk)
            np.testing.assert_allclose(got, np.log(n), rtol=1e-12)
            np.testing.assert_allclose(got, fl.entropy(row, backend="cpu", chunk_size=chunk), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float64)], ids=str)
def test_softcap_saturates_and_ties_as_on_the_cpu(gpu, rng, dtype):
    """The GPU's softcap uses the C core's tanh, (1 - e) / (1 + e): logits from |x / c| = 8.7 (float32) or
    18.75 (float64) on are exactly +-c on both backends, so ties among them break alike, lowest index first
    (argmax, top_k, greedy sampling). CUDA's tanh, correctly rounded up to |x / c| = 9 or 19, left them an
    ulp short of 1 there, and the ties broke otherwise. Near 0, against mpmath: within 4 ulp, for a huge
    cap too."""
    mpmath = pytest.importorskip("mpmath")
    c = 5.0
    lo, hi = (8.7, 9.0) if dtype == np.float32 else (18.75, 19.05)
    z = np.concatenate([rng.uniform(lo, hi, 5), rng.uniform(hi, 40.0, 3), -rng.uniform(lo, 40.0, 3),
                        rng.uniform(-3.0, 3.0, 6), [44.956295 / c]])      # (the audit's value, float32)
    x = (rng.permutation(z) * c).astype(dtype)[None]
    saturated = np.flatnonzero(x[0] / c >= lo)
    for b in ("cpu", "gpu"):
        assert fl.argmax(x, softcap=c, backend=b)[0] == saturated[0], b
        v, i = fl.top_k(x, 4, softcap=c, backend=b)
        np.testing.assert_array_equal(i[0], saturated[:4], err_msg=b)
        np.testing.assert_array_equal(v[0], np.full(4, c, dtype), err_msg=b)
        assert fl.sample(x, temperature=0.0, softcap=c, backend=b)[0] == saturated[0], b
        v, i = fl.top_k(-x, 3, softcap=c, backend=b)          # and -c for the negated ones
        np.testing.assert_array_equal(v[0], np.full(3, c, dtype), err_msg=b)
    # small and middling |x / c|: one-value rows, whose logsumexp is the transformed value
    r = np.concatenate([np.geomspace(1e-30, 20.0, 24), [0.27, 0.29, 0.49, 0.51]]) * rng.choice([-1, 1], 28)
    xs = (r * c).astype(dtype)[:, None]
    got = fl.logsumexp(xs, softcap=c, backend="gpu").astype(np.float64)
    with mpmath.workdps(40):       # of the rounded quotient x / c, as both backends divide first
        want = np.array([float(c * mpmath.tanh(mpmath.mpf(float(v)))) for v in (xs[:, 0] / dtype.type(c))])
    err = np.abs(got - want) / np.spacing(np.abs(want).astype(dtype)).astype(np.float64)
    assert err.max() <= 4.0, (err.max(), xs[np.argmax(err), 0])
    # a cap so large that x / c is subnormal: x itself to a few ulp, as on the CPU (c times x / c lost
    # x's bits on both)
    big = 3e38 if dtype == np.float32 else 1.7e308
    xs = (np.geomspace(1e-30, 1e3, 24) * rng.choice([-1, 1], 24)).astype(dtype)[:, None]
    got = fl.logsumexp(xs, softcap=big, backend="gpu").astype(np.float64)
    with mpmath.workdps(60):
        want = np.array([float(big * mpmath.tanh(mpmath.mpf(float(v)) / big)) for v in xs[:, 0]])
    err = np.abs(got - want) / np.spacing(np.abs(want).astype(dtype)).astype(np.float64)
    assert err.max() <= 4.0, (err.max(), xs[np.argmax(err), 0])
    np.testing.assert_array_equal(got, fl.logsumexp(xs, softcap=big, backend="cpu"))
