"""Short rows: fewer than 32 values computed in float32 (16 in float64), which the CPU works a tile of 64
rows at a time, a lane a row (fl__lse_tile in fastlogits_impl.h), and the log every path takes of a row's
sum (fl__log in fastlogits.h).

The tile's rows are checked against the float64 reference with their awkward values placed among the
lanes of partial and whole tiles, in every layout, dtype and output, with temperatures and a softcap; and
against the paths that do not go through tiles (top_k_logprobs, sampling's log-probabilities, the
command line's stats), bit for bit, which the tile's sum order is built to match."""

import math
import os
import shutil
import subprocess

import numpy as np
import pytest

import fastlogits as fl
from tests.helpers import DTYPE_IDS, DTYPES, IGNORE, LAYOUTS, check, make_layout

CC = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")

# widths below the tile limit (32 float32 values, 16 float64) and at it
SHORT = {"float64": [1, 2, 7, 8, 9, 15, 16]}
SHORT_32 = [1, 2, 3, 5, 15, 16, 17, 31, 32]
ROWS = [1, 63, 64, 65, 130]


def widths(dtype):
    return SHORT.get(np.dtype(dtype).name, SHORT_32)


def short_awkward(dtype, n, rows, rng):
    """`rows` rows of n values in dtype: random ones, and among them (at random rows, so at random lanes of
    random tiles) the awkward cases, placed modulo n."""
    big = 6.0e4 if np.dtype(dtype) == np.float16 else 3.0e38
    cases = []
    r = np.full(n, -np.inf)
    cases.append(r)                                         # all -inf
    r = rng.standard_normal(n) * 3
    r[rng.integers(n)] = np.inf
    cases.append(r)                                         # a +inf
    r = rng.standard_normal(n) * 3
    r[rng.integers(n)] = np.nan
    cases.append(r)                                         # a NaN
    r = np.full(n, -np.inf)
    r[-1] = np.nan
    cases.append(r)                                         # a NaN among -inf
    r = np.full(n, -np.inf)
    r[0] = np.inf
    cases.append(r)                                         # +inf and -inf
    r = rng.standard_normal(n) * 3
    r[rng.integers(n, size=max(n // 3, 1))] = -np.inf
    cases.append(r)                                         # some -inf
    r = np.full(n, -np.inf)
    r[rng.integers(n)] = 2.5
    cases.append(r)                                         # one finite value
    r = np.round(rng.standard_normal(n))
    r[rng.integers(n, size=max(n // 2, 1))] = 4.0
    cases.append(r)                                         # ties at the max
    cases.append(np.where(np.arange(n) % 2 == 0, big, -big))    # the range's ends
    cases.append(np.full(n, big * 0.999))
    cases.append(np.where(np.arange(n) % 3 == 0, 1e4, -1e4))
    cases.append(-1000.0 + rng.standard_normal(n))          # all low
    cases.append(np.zeros(n))
    x = rng.standard_normal((rows, n)) * 3
    at = rng.choice(rows, size=min(rows, len(cases)), replace=False)
    for row, case in zip(at, rng.permutation(len(cases))):
        x[row] = cases[case]
    return x.astype(dtype)


def labels_for(rng, rows, n):
    y = rng.integers(0, n, rows)
    y[rng.random(rows) < 0.2] = IGNORE
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ["logsumexp", "log_softmax", "cross_entropy", "softmax", "entropy"])
def test_short_rows_against_the_reference(name, dtype, rng):
    for n in widths(dtype):
        for rows in ROWS:
            x = short_awkward(dtype, n, rows, rng)
            threads = int(rng.integers(1, 3))
            kw = {"labels": labels_for(rng, rows, n), "reduction": "none"} if name == "cross_entropy" else {}
            check(name, x, threads=threads, **kw)
            # a temperature a row, and a softcap: the tile's rows are transformed as they are loaded (at
            # least 1: below float64 input x / T is a float32, and 3e38 / 0.5 overflows, as in PyTorch)
            t = rng.uniform(1.0, 2.0, rows)
            check(name, x, temperature=t, threads=threads, **kw)
            check(name, x, softcap=float(rng.uniform(5, 30)), temperature=0.7, **kw)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_short_rows_in_every_layout(layout, dtype, rng):
    for n in (1, 5, widths(dtype)[-2]):
        x = make_layout(short_awkward(dtype, n, 97, rng), layout)
        check("logsumexp", x)
        check("log_softmax", x)
        check("cross_entropy", x, labels=labels_for(rng, 97, n), reduction="mean")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_short_maps_into_every_output(name, dtype, rng):
    """Plain rows written a tile at a time (fl__softmax_rows, fl__log_softmax_rows), and outputs of another
    dtype or layout, or rows with a temperature, a row at a time from the tile's states: the same values,
    bit for bit where both are in the compute type."""
    fn = getattr(fl, name)
    n = widths(dtype)[-2]
    x = short_awkward(dtype, n, 130, rng)
    plain = fn(x)
    for out_dt in (np.float16, np.float32, np.float64):
        check(name, x, dtype=out_dt)
        check(name, x, dtype=out_dt, chunk_size=3)      # (rows past the chunk: a tile holds them whole)
        got = fn(x, out=make_layout(np.empty((130, n), out_dt), "cols"))
        np.testing.assert_array_equal(got, fn(x, dtype=out_dt))
    np.testing.assert_array_equal(fn(x, dtype=dtype), plain)
    np.testing.assert_array_equal(fn(x, out=make_layout(np.empty((130, n), dtype), "rows")), plain)
    # rows a few of which have a temperature other than 1 (the tile is not plain then)
    t = np.ones(130)
    t[rng.integers(130, size=3)] = 2.0
    check(name, x, temperature=t)
    ok = t == 1.0
    np.testing.assert_array_equal(fn(x, temperature=t)[ok], plain[ok])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_short_rows_give_the_bits_of_every_other_path(dtype, rng):
    """A row's sum is the same in a tile as in a row's own fold (fl_lse_chunk_pf's lanes, pairwise, then
    its tail), so operations that reach it either way agree bit for bit: log_softmax, cross-entropy and
    entropy (tiles) with top_k_logprobs, the command line's stats (fl_row_stats) and float64 rows' sampled
    log-probabilities (row folds), each formed in double. The rows whose terms span more than 2^-29 make
    the order of a float32 row's sum count (smaller spans add exactly in double)."""
    from fastlogits.cpu import backend

    name = np.dtype(dtype).name
    for n in widths(dtype):
        x = short_awkward(dtype, n, 150, rng)
        x[100:] = -rng.uniform(0, 80, (50, n))
        wide = fl.log_softmax(x, dtype=np.float64)
        k = min(4, n)
        lp, idx = fl.top_k_logprobs(x, k)
        # (float32 log-probabilities below float64 input: the double ones, rounded; -6e38 to -inf)
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(lp, np.take_along_axis(wide, idx, 1).astype(lp.dtype),
                                          err_msg=f"V = {n}")
        y = idx[:, 0]
        ce = fl.cross_entropy(x, y, reduction="none")
        np.testing.assert_array_equal(np.asarray(ce, np.float64), np.asarray(-lp[:, 0].astype(ce.dtype),
                                                                             np.float64), err_msg=f"V = {n}")
        y = rng.integers(0, n, 150)
        nll, ent = backend.stats(x, name, np.ones(150), 0.0, y, IGNORE, 4096, 1)[:2]
        np.testing.assert_array_equal(nll, -wide[np.arange(150), y], err_msg=f"V = {n}")
        # entropy's states (m, s, t) too, in float64 before the API rounds them to float32
        np.testing.assert_array_equal(backend.entropy(x, name, np.ones(150), 0.0, 4096, 2), ent,
                                      err_msg=f"entropy, V = {n}")
        if dtype != np.float64:         # (sampling's float32 sums are its own, at any V: within 1e-7)
            continue
        # sample refuses rows it cannot draw from (NaN, +inf, all -inf): those are drawn from normal ones
        x64 = x.astype(np.float64)
        drawable = ~(np.isnan(x64) | np.isposinf(x64)).any(1) & ~np.isneginf(x64).all(1)
        xs = np.where(drawable[:, None], x, rng.standard_normal(x.shape).astype(dtype))
        tok, slp = fl.sample(xs, seed=int(rng.integers(2**32)), return_logprobs=True, num_samples=3)[:2]
        want = np.take_along_axis(fl.log_softmax(xs, dtype=np.float64), tok, 1)
        np.testing.assert_array_equal(slp, want, err_msg=f"V = {n}")


def test_short_rows_do_not_depend_on_threads_or_tiles(rng):
    """A row's results are those of the same row alone (another tile, another lane, any thread count)."""
    for dtype in (np.float32, np.float64):
        for n in widths(dtype):
            x = short_awkward(dtype, n, 200, rng)
            y = rng.integers(0, n, 200)
            calls = {"logsumexp": lambda a, b, **kw: fl.logsumexp(a, **kw),
             "entropy": lambda a, b, **kw: fl.entropy(a, **kw),
                     "log_softmax": lambda a, b, **kw: fl.log_softmax(a, **kw),
                     "cross_entropy": lambda a, b, **kw: fl.cross_entropy(a, b, reduction="none", **kw)}
            for name, fn in calls.items():
                whole = fn(x, y, threads=2)
                np.testing.assert_array_equal(fn(x, y, threads=1), whole, err_msg=name)
                for i in rng.choice(200, 5, replace=False):
                    np.testing.assert_array_equal(fn(x[i:i + 1], y[i:i + 1])[0], whole[i],
                                                  err_msg=f"{name}, row {i}")


LOG_PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include "fastlogits.h"
/* reads n doubles from argv[1]; writes fl__log_n's logs of them, then fl__log's */
int main(int argc, char **argv) {
    long n = atol(argv[2]), i;
    double *x = malloc(n * sizeof(double)), *y = malloc(n * sizeof(double));
    FILE *f = fopen(argv[1], "rb");
    if (argc < 3 || !f || fread(x, sizeof(double), n, f) != (size_t)n) return 1;
    fl__log_n(x, y, n);
    fwrite(y, sizeof(double), n, stdout);
    for (i = 0; i < n; i++) y[i] = fl__log(x[i]);
    fwrite(y, sizeof(double), n, stdout);
    return 0;
}
"""


@pytest.mark.skipif(CC is None, reason="no C compiler on PATH")
def test_the_cores_log_is_within_an_ulp_of_libms(tmp_path, rng):
    """fl__log against Python's math.log (the C library's, correctly rounded but for about 1 in 2^40
    inputs): within an ulp of it everywhere, equal at the exact cases and on special values, and the same
    bits in a vector loop as alone. Built as the package builds the header (-O3, GCC's clones)."""
    tiny = np.finfo(np.float64).tiny
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, -1.0, -tiny, 1.0, 2.0, 0.5, 4.0, 1024.0, tiny, tiny / 2,
               5e-324, np.finfo(np.float64).max, np.nextafter(1.0, 2.0), np.nextafter(1.0, 0.0),
               math.sqrt(2) / 2, math.sqrt(2), np.nextafter(math.sqrt(2) / 2, 0), 16.0, 1e300, 3.0]
    bits = rng.integers(0, 0x7FF0000000000000, 40000, dtype=np.int64).view(np.float64)   # every finite >= 0
    sums = 1.0 + rng.random(40000) * rng.choice([1.0, 15.0, 1e3, 1e6], 40000)          # sums of exps
    near1 = 1.0 + rng.standard_normal(20000) * 1e-8
    x = np.concatenate([special, bits, sums, near1, np.ldexp(1.0, np.arange(-1074, 1024))])
    x = x[rng.permutation(len(x))][:len(x) - 3]          # an odd count: the vector loop's tail runs too
    (tmp_path / "x.bin").write_bytes(x.tobytes())
    (tmp_path / "log.c").write_text(LOG_PROGRAM)
    subprocess.run([CC, "-O3", "-std=gnu99", f"-I{fl.get_include()}", str(tmp_path / "log.c"), "-o",
                    str(tmp_path / "log"), "-lm"], check=True, capture_output=True)
    out = subprocess.run([str(tmp_path / "log"), str(tmp_path / "x.bin"), str(len(x))], check=True,
                         capture_output=True).stdout
    y = np.frombuffer(out, np.float64)
    batch, alone = y[:len(x)], y[len(x):]
    np.testing.assert_array_equal(batch.view(np.int64), alone.view(np.int64))   # NaN's bits too
    with np.errstate(all="ignore"):
        want = np.array([math.log(v) if v > 0 and np.isfinite(v) else np.log(v) for v in x])
    nonfinite = ~np.isfinite(want)
    np.testing.assert_array_equal(batch[nonfinite], want[nonfinite])
    f = ~nonfinite
    ulps = np.abs(batch[f] - want[f]) / np.spacing(np.abs(want[f]))
    assert ulps.max() <= 1.0, (x[f][np.argmax(ulps)], ulps.max())
    assert (ulps > 0).mean() < 0.05                 # correctly rounded but for a few percent
    exact = {1.0: 0.0, 2.0: math.log(2.0), 0.5: -math.log(2.0), 1024.0: math.log(1024.0),
             5e-324: math.log(5e-324)}
    for v, w in exact.items():
        assert batch[np.flatnonzero(x == v)[0]] == w, v


@pytest.mark.skipif(not shutil.which("objdump"), reason="needs objdump")
@pytest.mark.parametrize("module, function, vector_ops", [
    ("_reduce", "fl__lse_tile_f32", 20), ("_reduce", "fl__lse_tile_f64", 20), ("_reduce", "fl__log_n", 20),
    ("_reduce", "fl__ent_tile_f32", 20),
    ("_maps", "fl__log_softmax_rows_f32", 3), ("_reduce", "fl__tile_copy_cols_f32", 2)])
def test_tile_kernels_are_vector_loops(module, function, vector_ops):
    """The AVX-512 clones of the tile kernels, as the package was built: a loop of theirs works on 512-bit
    vectors (a lane a row; the log a value a lane) and keeps them in registers."""
    import importlib

    from tests.test_embedding import hot_loops

    path = importlib.import_module(f"fastlogits.cpu.{module}").__file__
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                         check=True).stdout
    if ".arch_x86_64_v4>:" not in asm:
        pytest.skip("no x86-64-v4 clones in this build (not GCC 12+ on x86-64 Linux)")
    loops = hot_loops(asm, f"{function}.arch_x86_64_v4")
    # (the tile's first FL_LANES terms are kept on the stack, to be added pairwise: other loops may spill)
    good = [loop for loop in loops if sum("zmm" in x for x in loop) >= vector_ops
            and not [x for x in loop if "zmm" in x and ("(%rsp" in x or "(%rbp" in x)]]
    assert good, "\n\n".join("\n".join(loop) for loop in loops[:3])


@pytest.mark.parametrize("log", [False, True])
def test_short_rows_that_need_a_transform_or_conversion_are_not_read_as_plain(log, rng):
    """A tile of short rows is mapped straight from the logits only for rows of the compute type with no
    transform: rows with a softcap, and float16 rows read every other value into a float32 out (a column
    stride of 4 bytes, as float32's), are mapped from the tile (a mutation audit: either check dropped
    gave wrong values), as the float64 reference."""
    f = fl.log_softmax if log else fl.softmax

    def want(x, cap=None):
        x = x.astype(np.float64)
        if cap:
            x = cap * np.tanh(x / cap)
        lp = x - x.max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        return lp if log else np.exp(lp)

    x = (rng.standard_normal((100, 10)) * 5).astype(np.float32)
    np.testing.assert_allclose(f(x, softcap=2.0), want(x, 2.0), rtol=1e-5, atol=1e-6)
    xs = rng.standard_normal((100, 20)).astype(np.float16)[:, ::2]
    out = np.empty((100, 10), np.float32)
    f(xs, out=out)
    np.testing.assert_allclose(out, want(xs), rtol=1e-5, atol=1e-6)
