"""Index arithmetic past 2^31 elements (Liger-Kernel's lesson: ``row * stride`` must be 64-bit).

Two (65539, 32769) float16 inputs, 2^31 + 196611 elements each, without 4 GiB of real memory:

- a sliding-window view of a small buffer (row stride one element): every row differs, and per-row results are
  checkable exactly with cumulative sums; it exercises flat element counts past 2^31;
- a C-contiguous ``np.zeros`` array: 4 GiB of virtual memory whose untouched pages are the kernel's shared
  zero page; a few rows past element 2^31 (byte 2^32) get planted values, so an offset that wraps reads
  the wrong row; and the same in Fortran order.

Each runs in a child process whose address space is capped (``RLIMIT_AS``): a library that copied or upcast
these inputs would need 4-16 GiB of real memory; capped, it fails with a MemoryError instead of taking the
machine's memory (and the rest of the test run) with it.
"""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AS_LIMIT = 10 * 2**30  # the 4 GiB input, the interpreter, NumPy and the library's own buffers

ROWS, V = 2**16 + 3, 2**15 + 1
assert ROWS * V > 2**31


def sliding_window_rows(seed):
    import fastlogits as fl

    rng = np.random.default_rng(seed)
    base = (rng.uniform(-4, 4, size=ROWS + V - 1)).astype(np.float16)
    x = np.lib.stride_tricks.as_strided(
        base, shape=(ROWS, V), strides=(base.itemsize, base.itemsize), writeable=False
    )
    b = base.astype(np.float64)
    e = np.exp(b)
    c = np.concatenate([[0.0], np.cumsum(e)])
    ct = np.concatenate([[0.0], np.cumsum(e * b)])
    s = c[V:] - c[:-V]
    lse_want = np.log(s)
    got = np.asarray(fl.logsumexp(x), dtype=np.float64)
    assert got.shape == (ROWS,)
    tol = 16 * np.finfo(np.float32).eps * (1 + 4 + np.abs(lse_want))
    bad = np.abs(got - lse_want) > tol
    assert not bad.any(), (
        f"{bad.sum()} rows wrong, first at {np.argmax(bad)}: {got[bad][:3]} vs {lse_want[bad][:3]}"
    )
    h_want = lse_want - (ct[V:] - ct[:-V]) / s
    got = np.asarray(fl.entropy(x), dtype=np.float64)
    bad = np.abs(got - h_want) > 2 * tol
    assert not bad.any(), f"entropy: {bad.sum()} rows wrong, first at {np.argmax(bad)}"
    labels = rng.integers(0, V, size=ROWS)
    got = np.asarray(fl.cross_entropy(x, labels, reduction="none"), dtype=np.float64)
    ce_want = lse_want - b[np.arange(ROWS) + labels]
    bad = np.abs(got - ce_want) > 2 * tol
    assert not bad.any(), f"cross_entropy: {bad.sum()} rows wrong, first at {np.argmax(bad)}"


def rows_past_2_31_elements(order="C"):
    import fastlogits as fl

    x = np.zeros((ROWS, V), dtype=np.float16, order=order)
    first_past = 2**31 // V + 1  # the first row that starts past element 2^31
    planted = {first_past - 1: 7, first_past: 11, first_past + 1: V - 1, ROWS - 1: 12345, 2**16: 0, 3: 5}
    for r, j in planted.items():
        x[r, j] = 8.0
        x[r, (j + 1) % V] = -8.0
    z = math.log(V)
    spike = math.log(V - 2 + math.exp(8.0) + math.exp(-8.0))
    want = np.full(ROWS, z)
    want_arg = np.zeros(ROWS, dtype=np.int64)
    for r, j in planted.items():
        want[r] = spike
        want_arg[r] = j
    got = np.asarray(fl.logsumexp(x), dtype=np.float64)
    bad = np.abs(got - want) > 1e-5 * 20
    assert not bad.any(), f"logsumexp: {bad.sum()} rows wrong, e.g. rows {np.flatnonzero(bad)[:5]}"
    np.testing.assert_array_equal(np.asarray(fl.argmax(x)), want_arg)
    labels = np.zeros(ROWS, dtype=np.int64)
    for r, j in planted.items():
        labels[r] = j
    got = np.asarray(fl.cross_entropy(x, labels, reduction="none"), dtype=np.float64)
    ce_want = want.copy()
    for r in planted:
        ce_want[r] = spike - 8.0
    bad = np.abs(got - ce_want) > 1e-5 * 20
    assert not bad.any(), f"cross_entropy: {bad.sum()} rows wrong, e.g. rows {np.flatnonzero(bad)[:5]}"


def _run_capped(func, *args):
    """Run ``func(*args)`` of this module in a child with a capped address space; fail with its output.
    (A 4 GiB array read three times: the Fortran-order case ran past a 300 s limit on two cores shared
    with other builds.)"""
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({AS_LIMIT}, {AS_LIMIT}))
        from tests import test_big_index as t
        t.{func}(*{args!r})
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("FASTLOGITS_NUM_THREADS", "2")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (
        f"{func}{args} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and the zero page: Linux")
def test_sliding_window_rows(rng):
    _run_capped("sliding_window_rows", int(rng.integers(2**63)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and the zero page: Linux")
@pytest.mark.parametrize("order", ["C", "F"])
def test_rows_past_2_31_elements(order):
    """In Fortran order (copied into C order a block of rows at a time, cpu/_layout.pyx) the planted
    columns lie past element 2^31 too: a column's offset is its index times ROWS."""
    _run_capped("rows_past_2_31_elements", order)


def short_rows_past_2_32_bytes(dtype):
    """Rows of 17 classes (worked a tile of 64 rows at a time) sliced from a zeros array of 4 GiB whose
    rows lie 64 KiB apart: the tiles' offsets pass 2^32 bytes."""
    import fastlogits as fl

    wide = V if np.dtype(dtype).itemsize == 2 else V // 2 + 1
    big = np.zeros((ROWS, wide), dtype=dtype)
    W = 17
    x = big[:, :W]
    first_past = 2**32 // (wide * np.dtype(dtype).itemsize) + 1
    planted = {first_past - 1: 3, first_past: 16, first_past + 1: 0, ROWS - 1: 9, 2: 5, ROWS - 64: 7}
    for r, j in planted.items():
        x[r, j] = 8.0
        x[r, (j + 1) % W] = -8.0
    flat = math.log(W)
    spike = math.log(W - 2 + math.exp(8.0) + math.exp(-8.0))
    want = np.full(ROWS, flat)
    labels = np.zeros(ROWS, dtype=np.int64)
    ce_want = np.full(ROWS, flat)
    for r, j in planted.items():
        want[r] = spike
        labels[r] = j
        ce_want[r] = spike - 8.0
    got = np.asarray(fl.logsumexp(x), dtype=np.float64)
    bad = np.abs(got - want) > 1e-5
    assert not bad.any(), f"logsumexp: {bad.sum()} rows wrong, e.g. rows {np.flatnonzero(bad)[:5]}"
    got = np.asarray(fl.cross_entropy(x, labels, reduction="none"), dtype=np.float64)
    bad = np.abs(got - ce_want) > 1e-5
    assert not bad.any(), f"cross_entropy: {bad.sum()} rows wrong, e.g. rows {np.flatnonzero(bad)[:5]}"
    lp = np.asarray(fl.log_softmax(x), dtype=np.float64)       # (in the input's dtype)
    tol = 4 * float(np.finfo(dtype).eps) * 10
    rows = np.array(list(planted))
    np.testing.assert_allclose(lp[rows, [planted[r] for r in rows]], 8.0 - spike, atol=tol)
    np.testing.assert_allclose(lp[1], -flat, atol=tol)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and the zero page: Linux")
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_short_rows_past_2_32_bytes(dtype):
    """float32 rows are tiled by one copy (fl__tile_copy), float16 ones a row at a time."""
    _run_capped("short_rows_past_2_32_bytes", dtype)
