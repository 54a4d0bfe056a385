"""Logits laid out by columns (a transposed or Fortran-order array): the CPU backend copies them into C order
a block of rows at a time (cpu/backend.py ``blocks``, cpu/_layout.pyx), and writes a map's output laid out
by columns through such a block. The results must be those of the same logits in C order, row for row,
whatever the block boundaries."""

import numpy as np
import pytest

import fastlogits as fl
from fastlogits.cpu import _layout
from fastlogits.cpu import backend as cpu
from fastlogits.stream import run
from tests.helpers import BF16, DTYPE_IDS, DTYPES, FUNCTIONS, call, check, random_labels, random_logits


def _views(x):
    """x's values in layouts that read it by columns: transposed, Fortran order, a transposed view with
    negative strides and gaps between rows, and one whose rows lie more than a cache line apart."""
    rows, n = x.shape
    t = np.ascontiguousarray(x.T).T
    f = np.asfortranarray(x)
    buf = np.full((n, 2 * rows), np.nan).astype(x.dtype)
    buf[::-1, ::-2] = x.T
    g = buf[::-1, ::-2].T
    assert np.array_equal(g, x, equal_nan=True) and g.strides[0] < 0 and g.strides[1] < 0
    wide = np.full((n, 40 * rows), np.nan).astype(x.dtype)     # rows more than a cache line apart
    wide[:, ::40] = x.T
    return {"T": t, "F": f, "gaps": g, "sparse": wide[:, ::40].T}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(33, 70), (65, 31), (1, 40), (40, 1), (7, 3), (96, 64), (300, 45)])
def test_copy_is_numpy_copy(dtype, shape, rng):
    """Every element's bits, between any two layouts (both ways), tiles whole and partial on both axes
    (TILE = 32 columns by TILE_IN = 128 rows)."""
    x = random_logits(rng, shape, dtype)
    layouts = dict(_views(x), C=np.ascontiguousarray(x), neg=np.ascontiguousarray(x[::-1, ::-1])[::-1, ::-1])
    bits = np.dtype(f"u{np.dtype(dtype).itemsize}")
    for name_a, a in layouts.items():
        for name_b, b in layouts.items():
            out = np.full_like(b, np.nan)
            _layout.copy(a, out, 2)
            assert np.array_equal(out.view(bits), x.view(bits)), f"{name_a} -> {name_b}"


def test_copy_rejects_what_it_cannot_copy():
    a = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="one shape and element size"):
        _layout.copy(a, np.zeros((4, 3), np.float32), 1)
    with pytest.raises(ValueError, match="one shape and element size"):
        _layout.copy(a, np.zeros((3, 4), np.float64), 1)
    with pytest.raises(ValueError, match="one shape and element size"):
        _layout.copy(np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.float32), 1)
    raw = np.zeros(3 * 4 * 4 + 1, np.uint8)
    with pytest.raises(ValueError, match="aligned"):
        _layout.copy(raw[1:].view(np.float32).reshape(3, 4), a, 1)


def _unaligned(x, gap=0):
    """A copy of the 2-D array x at an odd address (rows `gap` elements apart beyond their width)."""
    rows, n = x.shape
    raw = np.zeros(rows * (n + gap) * x.itemsize + 1, np.uint8)
    u = raw[1:].view(x.dtype).reshape(rows, n + gap)[:, :n]
    u[...] = x
    assert not u.flags.aligned or u.size == 0
    return u


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(33, 70), (1, 40), (40, 1), (7, 3), (0, 5), (5, 0)])
def test_copy_runs_is_numpy_copy(dtype, shape, rng):
    """The memcpy a row of unaligned blocks: every element's bits, from and to arrays at odd addresses,
    with and without gaps between rows, on 1 and 3 threads."""
    x = random_logits(rng, shape, dtype)
    bits = np.dtype(f"u{np.dtype(dtype).itemsize}")
    for a in (_unaligned(x), _unaligned(x, gap=3), np.ascontiguousarray(x)):
        for b in (np.full_like(x, np.nan), _unaligned(np.full_like(x, np.nan), gap=1)):
            for threads in (1, 3):
                b[...] = np.nan
                _layout.copy_runs(a, b, threads)
                assert np.array_equal(b.view(bits), x.view(bits))
    with pytest.raises(ValueError, match="rows of consecutive elements"):
        _layout.copy_runs(np.zeros((3, 4), np.float32)[:, ::2], np.zeros((3, 2), np.float32), 1)
    with pytest.raises(ValueError, match="rows of consecutive elements"):
        _layout.copy_runs(np.zeros((3, 4), np.float32), np.zeros((3, 4), np.float64), 1)


def test_blocks_cover_every_row_once(monkeypatch):
    """Blocks: about BLOCK_BYTES, or a row a thread, in whole cache lines of each column (the rows a line
    holds), the last one taking the rest; arrays not laid out by columns pass through unchanged."""
    x = np.asfortranarray(np.arange(100 * 30, dtype=np.float32).reshape(100, 30))
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 40 * 30 * 4)
    seen = []
    for r, b in cpu.blocks(x, 1):
        assert b.flags.c_contiguous and np.array_equal(b, x[r])
        seen.append((r.start, r.stop))
    assert seen == [(0, 48), (48, 100)]                # 40 rows, rounded up to lines; the rest
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 1)
    assert [r.stop - r.start for r, _ in cpu.blocks(x, 1)] == [16] * 5 + [20]
    assert [r.stop - r.start for r, _ in cpu.blocks(x, 20)] == [32, 32, 36]    # a row a thread
    assert [r.stop - r.start for r, _ in cpu.blocks(x, 200)] == [100]
    c = np.ascontiguousarray(x)
    for a in (c, c[:, ::2], c[::3, ::2], np.broadcast_to(x[0], x.shape), x[:1]):
        assert [(r, b) for r, b in cpu.blocks(a, 1)] == [(slice(None), a)]
        assert not cpu.by_columns(a)
    assert cpu.by_columns(x) and cpu.by_columns(x.T.copy().T)


def _kwargs(name, rng, x):
    kw = {"temperature": rng.uniform(0.5, 2.0, x.shape[0])}
    if name == "cross_entropy":
        kw.update(reduction="none", label_smoothing=0.1)
    return kw


@pytest.mark.parametrize("threads", [1, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_by_columns_is_c_order(name, dtype, threads, rng, monkeypatch):
    """Every function, every dtype, with per-row temperatures and labels: the results over blocks of
    rows (small blocks here, the last one longer, awkward rows among them; with more threads than a
    block's lines hold rows) are those in C order, bit for bit, and the reference's."""
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 2048)
    x = random_logits(rng, (101, 67), dtype)
    x[3, :] = -np.inf
    x[5, 7] = np.nan
    x[40, :] = x[40, 0]                    # ties
    x[77, 60] = np.inf
    labels = random_labels(rng, x.shape[:1], x.shape[1]) if name == "cross_entropy" else None
    kw = _kwargs(name, rng, x)
    k = 5 if name.startswith("top_k") else None
    want = call(name, np.ascontiguousarray(x), k=k, labels=labels, threads=threads, chunk_size=8, **kw)
    for layout, view in _views(x).items():
        assert cpu.by_columns(view)
        got = call(name, view, k=k, labels=labels, threads=threads, chunk_size=8, **kw)
        pairs = zip(got, want) if isinstance(got, tuple) else [(got, want)]
        for g, w in pairs:
            assert np.array_equal(np.asarray(g), np.asarray(w), equal_nan=True), f"{name}, {layout}"
    finite = np.isfinite(x.astype(np.float64)).all(axis=1)
    check(name, _views(x[finite])["F"], labels=None if labels is None else labels[finite], threads=2,
          **kw | {"temperature": kw["temperature"][finite]})


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("out_dtype", [np.float32, np.float64, np.float16, BF16],
                         ids=["f32", "f64", "f16", "bf16"])
@pytest.mark.parametrize("in_dtype", [np.float32, BF16], ids=["f32", "bf16"])
def test_map_into_out_by_columns(in_dtype, out_dtype, log, rng, monkeypatch):
    """out= laid out by columns, of any dtype, from logits in either layout: the C-order result."""
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 1024)
    fn = fl.log_softmax if log else fl.softmax
    x = random_logits(rng, (70, 45), in_dtype)
    t = rng.uniform(0.5, 2.0, 70)
    want = fn(np.ascontiguousarray(x), dtype=out_dtype, temperature=t, threads=1)
    for logits in (np.ascontiguousarray(x), _views(x)["F"]):
        outs = (np.full((45, 70), np.nan, out_dtype).T, np.full((45, 140), np.nan, out_dtype)[::-1, ::2].T)
        for out in outs:
            assert cpu.by_columns(out)
            r = fn(logits, out=out, temperature=t, threads=1)
            assert r is out and np.array_equal(out, want, equal_nan=True)


def test_sample_by_columns(rng, monkeypatch):
    """Seeded draws with per-row parameters: the same tokens as from C order."""
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 4096)
    x = random_logits(rng, (90, 300), np.float32)
    kw = dict(seed=int(rng.integers(2**32)), temperature=rng.uniform(0.3, 1.5, 90),
              top_p=rng.uniform(0.5, 1, 90), top_k=rng.integers(0, 50, 90), num_samples=3,
              return_logprobs=True)
    want = fl.sample(np.ascontiguousarray(x), **kw)
    got = fl.sample(_views(x)["T"], **kw)
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


def test_stream_stats_by_columns(rng, monkeypatch):
    """The streaming layer's fused stats over an in-memory Fortran-order array (its row blocks are
    views laid out by columns)."""
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 8192)
    x = random_logits(rng, (300, 257), np.float32)
    y = rng.integers(0, 257, 300)
    want = run.stats(np.ascontiguousarray(x), y)
    got = run.stats(np.asfortranarray(x), y)
    assert want.keys() == got.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k
