"""Every function against the float64 reference: dtype x layout x threads x chunk size x size x leading shape,
awkward rows, temperature and softcap. The product is cut so that each axis meets every other at least once
without running the whole product."""

import itertools

import numpy as np
import pytest

from tests.helpers import (
    DTYPE_IDS,
    DTYPES,
    FUNCTIONS,
    LAYOUTS,
    awkward_matrix,
    check,
    make_layout,
    random_labels,
    random_logits,
)

# (threads, chunk_size) pairs that the layout tests cycle through
_TC = list(itertools.product([1, 2], [1, 7, None]))


def _inputs(name, rng, shape, dtype, scale=3.0):
    x = random_logits(rng, shape, dtype, scale)
    labels = random_labels(rng, shape[:-1], shape[-1]) if name == "cross_entropy" else None
    return x, labels


def _ce_kw(name):
    return {"reduction": "none"} if name == "cross_entropy" else {}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_layouts(name, dtype, layout, rng):
    i = FUNCTIONS.index(name) + DTYPES.index(dtype) + LAYOUTS.index(layout)
    threads, chunk = _TC[i % len(_TC)]
    shape = (6, 131) if i % 3 else (2, 3, 64)
    x, labels = _inputs(name, rng, shape, dtype)
    view = make_layout(x, layout)
    check(name, view, labels=labels, threads=threads, chunk_size=chunk, **_ce_kw(name))


@pytest.mark.parametrize("layout", ["cols", "neg", "rows"])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_layouts_one_row(name, layout, rng):
    """A 1-D row that is strided, reversed or offset."""
    x, labels = _inputs(name, rng, (257,), np.float32)
    check(name, make_layout(x, layout), labels=labels, chunk_size=16, **_ce_kw(name))


@pytest.mark.parametrize("chunk_size", [1, 7, None])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_threads_chunks(name, dtype, threads, chunk_size, rng):
    x, labels = _inputs(name, rng, (9, 300), dtype)
    check(name, x, labels=labels, threads=threads, chunk_size=chunk_size, **_ce_kw(name))


SIZES = [1, 2, 3, 127, 128, 129, 1023, 1024, 1025, 4097]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_sizes(name, n, rng):
    i = SIZES.index(n)
    dtype = DTYPES[i % len(DTYPES)]
    chunk = [None, 7, 128, 1][i % 4]
    x, labels = _inputs(name, rng, (3, n), dtype)
    check(name, x, labels=labels, chunk_size=chunk, threads=1 + i % 2, **_ce_kw(name))


VOCABS = [32000, 50257, 128256, 151936]


@pytest.mark.parametrize("n", VOCABS)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_real_vocabularies(name, n, rng):
    i = VOCABS.index(n)
    dtype = [np.float32, np.float64, DTYPES[1], np.float16][i]
    x, labels = _inputs(name, rng, (2, n), dtype, scale=4.0)
    check(name, x, labels=labels, threads=2, **_ce_kw(name))


@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=["1d", "5", "2x3"])
@pytest.mark.parametrize("dtype", [DTYPES[1], np.dtype(np.float64)], ids=["bfloat16", "float64"])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_leading_shapes(name, dtype, lead, rng):
    x, labels = _inputs(name, rng, lead + (50,), dtype)
    got = check(name, x, labels=labels, **_ce_kw(name))
    if name in ("logsumexp", "entropy", "argmax", "cross_entropy"):
        assert np.asarray(got).shape == lead
    elif name in ("softmax", "log_softmax"):
        assert np.asarray(got).shape == lead + (50,)
    else:
        assert np.asarray(got[0]).shape == lead + (5,)


@pytest.mark.parametrize("chunk_size", [None, 7, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_awkward_rows(name, dtype, chunk_size, rng):
    names, x = awkward_matrix(dtype)
    labels = None
    if name == "cross_entropy":
        labels = rng.integers(0, x.shape[-1], size=x.shape[0])
    for threads in (1, 2):
        check(
            name,
            x,
            labels=labels,
            chunk_size=chunk_size,
            threads=threads,
            what=f"{name}[{np.dtype(dtype).name}, chunk {chunk_size}, threads {threads}] rows {names}",
            **_ce_kw(name),
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_awkward_rows_one_by_one(name, dtype):
    """Each awkward row alone as a 1-D input: a row's result must not depend on its neighbours."""
    names, x = awkward_matrix(dtype, 20)
    for row_name, row in zip(names, x, strict=True):
        labels = np.int64(row.argmin()) if name == "cross_entropy" else None
        check(
            name,
            row,
            labels=labels,
            chunk_size=3,
            what=f"{name}[{np.dtype(dtype).name}] row {row_name}",
            **_ce_kw(name),
        )


@pytest.mark.parametrize("value", [-np.inf, np.inf, np.nan, 5.0, -1e4, 0.0], ids=str)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_single_class(name, value):
    x = np.array([[value], [1.0]], dtype=np.float32)
    labels = np.array([0, 0]) if name == "cross_entropy" else None
    check(name, x, labels=labels, **_ce_kw(name))


TRANSFORMS = {
    "T=0.7": dict(temperature=0.7),
    "T=3": dict(temperature=3.0),
    "T_per_row": "per_row",
    "softcap=30": dict(softcap=30.0),
    "softcap=5,T_per_row": "softcap_per_row",
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize(
    "dtype", [np.dtype(np.float32), DTYPES[1], np.dtype(np.float64)], ids=["float32", "bfloat16", "float64"]
)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_temperature_softcap(name, dtype, transform, rng):
    lead = (2, 3) if transform == "softcap_per_row" else (7,)
    x, labels = _inputs(name, rng, lead + (200,), dtype, scale=20.0)
    t = TRANSFORMS[transform]
    if t == "per_row":
        t = dict(temperature=rng.uniform(0.3, 4.0, size=lead))
    elif t == "softcap_per_row":
        t = dict(softcap=5.0, temperature=rng.uniform(0.3, 4.0, size=lead))
    check(name, x, labels=labels, chunk_size=7, **t, **_ce_kw(name))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_per_row_temperature_one_row(name, rng):
    """A 1-D row takes a 0-d temperature array as its one-per-row temperature."""
    x, labels = _inputs(name, rng, (64,), np.float32)
    check(name, x, labels=labels, temperature=np.array(0.5), **_ce_kw(name))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_softcap_of_infinities(name, dtype):
    """The softcap comes first: +inf becomes the finite cap c, -inf becomes -c, NaN stays NaN."""
    x = np.array(
        [[np.inf, 0.0, 1.0, -np.inf], [np.inf, np.inf, -np.inf, -np.inf], [np.nan, 1.0, 2.0, 3.0]],
        dtype=dtype,
    )
    labels = np.array([0, 2, 1]) if name == "cross_entropy" else None
    check(name, x, labels=labels, softcap=2.0, **_ce_kw(name))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_explicit_cpu_backend(name, rng):
    x, labels = _inputs(name, rng, (4, 333), np.float32)
    check(name, x, labels=labels, backend="cpu", **_ce_kw(name))
