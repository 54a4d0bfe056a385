"""Fortran-order .npy dumps (``np.save`` of a transposed array writes one): streamed in row blocks read a
column segment at a time or whole columns a tile at a time (``_FileSource._read_columns``); where a row is
wider than the budget, the reductions fold all rows over stripes of columns and the maps and sample take a
row's column chunks. The rows are the same values as in C order, so on one thread every result streamed in
row blocks is that of the C-order dump of the same values under the same budget, bit for bit (per-row
results are the in-memory function's), and the stripes' reductions agree to rounding."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastlogits as fl
from fastlogits.cpu import _layout
from fastlogits.ops._prep import BF16
from fastlogits.stream import run, sources
from fastlogits.stream.run import column_stripes as _column_stripes
from fastlogits.stream.run import stats
from fastlogits.stream.sources import SourceError
from tests.helpers import DTYPE_IDS, DTYPES, awkward_matrix


def save_fortran(path, x):
    """x as a Fortran-order .npy file, its header written here: np.save writes C order for a shape whose
    two orders are one (a row, or V = 1)."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(x.dtype),
                                                  "fortran_order": True, "shape": x.shape})
        fh.write(x.tobytes(order="F"))


def _save_both(tmp_path, x):
    """x saved in C order and in Fortran order; the paths, and open()'s dtype for them."""
    c, f = tmp_path / "c.npy", tmp_path / "f.npy"
    np.save(c, x)
    save_fortran(f, x)
    dtype = "bfloat16" if x.dtype == BF16 else None
    assert fl.open(f, dtype=dtype).fortran and not fl.open(c, dtype=dtype).fortran
    return c, f, dtype


def _logits(rng, dtype, rows, V):
    """Random rows, with the awkward rows (NaN, +-inf, ties, huge values) among them when V allows."""
    x = (rng.standard_normal((rows, V)) * 3).astype(dtype)
    if V >= 37:
        names, bad = awkward_matrix(dtype, V)
        at = rng.choice(rows, size=min(rows, len(names)), replace=False)
        x[at] = bad[:len(at)]
    return x


def _streamed(path, dtype, memory, y, k, tmp_path, tag):
    """Every streamed function of the dump at `path` under the budget `memory`, on one thread (on more, a
    row alone in its block is split among them, and its last bits depend on the blocks): a dict."""
    def src():
        return fl.open(path, dtype=dtype, memory=memory)

    one = {"threads": 1}
    out = {name: getattr(fl, name)(src(), **one) for name in ("logsumexp", "entropy", "argmax")}
    for name in ("top_k", "top_k_logprobs"):
        out[name] = getattr(fl, name)(src(), k, **one)
    out["ce_none"] = fl.cross_entropy(src(), y, reduction="none", label_smoothing=0.1, **one)
    out["ce_mean"] = fl.cross_entropy(src(), y, **one)
    try:                      # a row that cannot be sampled (+inf, NaN): the same error, naming the row
        out["sample"] = fl.sample(src(), top_p=0.9, seed=7, **one)
    except ValueError as e:
        out["sample"] = np.array(str(e))
    out.update({f"stats_{key}": v for key, v in stats(src(), y, **one).items()})
    for fn in (fl.softmax, fl.log_softmax):
        dst = tmp_path / f"{tag}_{fn.__name__}.npy"
        fn(src(), out=dst, **one)
        res = np.load(dst)
        out[fn.__name__] = res.view(BF16) if res.dtype.kind == "V" else res     # (bfloat16 is saved as |V2)
    return out


@pytest.mark.parametrize("reads", ["per-column", "coalesced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape, memory", [((301, 517), None), ((301, 517), "64KiB"), ((67, 61), "64KiB"),
                                           ((9, 9001), "64KiB"), ((1, 5), None), ((7, 1), None)],
                         ids=["one-block", "row-blocks", "blocks-odd", "wide-rows", "one-row", "V=1"])
def test_a_fortran_dump_streams_as_its_c_order_twin(tmp_path, rng, monkeypatch, dtype, shape, memory, reads):
    """Blocks of some of the rows are read either way: a read per column segment, or whole columns a tile
    at a time (the rule picks by how many bytes a column's other rows hold; here, forced). Rows wider
    than the budget are folded one at a time in C order, and all at once over stripes of columns in
    Fortran order: chunked differently, the reductions agree to rounding (their picks exactly), and the
    maps and sample, which take a row at a time either way, bit for bit."""
    monkeypatch.setattr(sources, "COALESCE_BYTES", -1 if reads == "per-column" else 1 << 40)
    monkeypatch.setattr(sources, "TILE_BYTES", 3000)           # several tiles a block
    stripes = []
    monkeypatch.setattr(run, "column_stripes", lambda *a: stripes.append(a) or _column_stripes(*a))
    x = _logits(rng, dtype, *shape)
    y = rng.integers(0, shape[1], shape[0])
    y[rng.random(shape[0]) < 0.2] = -100
    c, f, dt = _save_both(tmp_path, x)
    k = min(3, shape[1])
    want = _streamed(c, dt, memory, y, k, tmp_path, "c")
    assert not stripes
    got = _streamed(f, dt, memory, y, k, tmp_path, "f")
    wide = run.plan(fl.open(f, dtype=dt), memory).rows == 0       # (float32 and float64 rows here)
    assert bool(stripes) == wide and wide == (shape == (9, 9001) and x.dtype.itemsize > 2)
    assert want.keys() == got.keys()
    for name in want:
        pairs = ((v if isinstance(v, tuple) else (v,)) for v in (want[name], got[name]))
        for w, g in zip(*pairs, strict=True):
            g, w = np.asarray(g), np.asarray(w)
            if wide and name not in ("sample", "softmax", "log_softmax") and g.dtype.kind == "f":
                assert g.dtype == w.dtype, name
                np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=2e-6, atol=2e-6,
                                           err_msg=name)
            else:
                _assert_same(g, w, name)
    if memory is None or shape[1] < 1000:        # rows in blocks: each is the in-memory function's row
        _assert_same(got["logsumexp"], fl.logsumexp(x, threads=1), "logsumexp")
        _assert_same(got["log_softmax"], fl.log_softmax(x, threads=1), "log_softmax")
        _assert_same(got["ce_none"], fl.cross_entropy(x, y, reduction="none", label_smoothing=0.1, threads=1),
                     "ce")


def _assert_same(got, want, what):
    """Equal values and dtypes, NaN where NaN (stats' row count is an int)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, what
    if got.dtype == BF16:          # (NumPy's comparison takes bfloat16 NaNs for different values)
        got, want = got.astype(np.float32), want.astype(np.float32)
    np.testing.assert_array_equal(got, want, err_msg=what)


def test_fortran_dumps_of_big_endian_and_reused_buffers(tmp_path, rng):
    """A big-endian Fortran dump is swapped as it is read; reads into the buffer of the read before
    (row_blocks alternates two) and into ones of another shape or order give the same rows."""
    x = (rng.standard_normal((50, 40)) * 3).astype(np.float32)
    save_fortran(tmp_path / "be.npy", x.astype(">f4"))
    src = fl.open(tmp_path / "be.npy")
    assert src.fortran
    np.testing.assert_array_equal(fl.logsumexp(fl.open(tmp_path / "be.npy", memory="64KiB")), fl.logsumexp(x))
    buf = None
    for r0, r1, c0, c1 in [(0, 50, 0, 40), (3, 20, 5, 39), (3, 20, 5, 39), (0, 1, 0, 40), (49, 50, 39, 40),
                           (0, 50, 7, 8), (10, 10, 0, 40), (4, 9, 0, 0)]:
        buf = src.read(r0, r1, c0, c1, out=buf)
        np.testing.assert_array_equal(buf, x[r0:r1, c0:c1])
    for out in (np.empty((17, 34), np.float32), np.empty((17, 34), np.float32, order="F"),
                np.empty((17, 34), np.float64, order="F"), np.empty((40, 40), np.float32, order="F"),
                np.empty((40, 40), np.float32, order="F")[::2], np.empty((50, 40), np.float32).T):
        got = src.read(3, 20, 5, 39, out=out)
        np.testing.assert_array_equal(got, x[3:20, 5:39])
        # a buffer large enough, with contiguous columns, is read into (the last block of a pass is
        # read into its first's buffer: no third one beyond the budget)
        assert np.shares_memory(got, out) == (out.dtype == np.float32 and out.strides[0] == 4), out.strides
    # a read-only buffer is never written: the rows come back in a new array
    blob = bytes(17 * 34 * 4)
    ro = np.frombuffer(blob, np.float32).reshape(34, 17).T
    np.testing.assert_array_equal(src.read(3, 20, 5, 39, out=ro), x[3:20, 5:39])
    assert not any(blob)
    src.close()


@pytest.mark.parametrize("coalesce", [-1, 1 << 40], ids=["per-column", "coalesced"])
def test_a_fortran_dump_that_shrinks_while_read(tmp_path, rng, monkeypatch, coalesce):
    monkeypatch.setattr(sources, "COALESCE_BYTES", coalesce)
    x = rng.standard_normal((40, 30)).astype(np.float32)
    path = tmp_path / "f.npy"
    save_fortran(path, x)
    src = fl.open(path)
    os.truncate(path, os.path.getsize(path) - 30 * 4)       # the last column's rows 10..40 are gone
    if coalesce < 0:                                         # (whole columns read: the lost rows too)
        np.testing.assert_array_equal(src.read(0, 10, 0, 30), x[:10])
    for r0, r1 in ((10, 20), (0, 40)):                       # (all rows: one read)
        with pytest.raises(SourceError, match="file shrank while being read"):
            src.read(r0, r1, 0, 30)
    src.close()


def test_read_columns_checks_its_buffer(tmp_path):
    path = tmp_path / "b.bin"
    path.write_bytes(np.arange(64, dtype=np.float32).tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="contiguous columns"):
            _layout.read_columns(fd, np.empty((4, 3), np.float32), 0, 16)
        out = np.empty((2, 3), np.float32, order="F")
        assert _layout.read_columns(fd, out, 4, 20) == 3     # rows 1..3 of (5, ...) columns
        np.testing.assert_array_equal(out, np.arange(64, dtype=np.float32)[:15].reshape(3, 5).T[1:3])
        assert _layout.read_columns(fd, np.empty((2, 3), np.float32, order="F"), 4, 130) == 2   # past the end
        with pytest.raises(OSError):
            _layout.read_columns(-1, np.empty((2, 3), np.float32, order="F"), 0, 8)
    finally:
        os.close(fd)


def test_a_fortran_dump_of_more_than_two_axes_is_refused(tmp_path):
    save_fortran(tmp_path / "f3.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(SourceError, match=r"or a 2-D Fortran-ordered one, found a Fortran-ordered array "
                                          r"of shape \(2, 3, 4\)"):
        fl.open(tmp_path / "f3.npy")
    x = np.arange(5, dtype=np.float32)
    save_fortran(tmp_path / "f1.npy", x)                     # one axis: either order, one row
    src = fl.open(tmp_path / "f1.npy")
    assert not src.fortran and fl.logsumexp(src) == fl.logsumexp(x)


def test_fortran_offsets_past_4_gib(tmp_path):
    """A sparse Fortran dump of (70001, 40003) float16, 2^31 + 652 million elements (5.6 GB, none of them
    on disk): values planted past byte 2^32 are read from their rows and columns."""
    rows, V = 70001, 40003
    path = tmp_path / "big.npy"
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f2", "fortran_order": True, "shape": (rows, V)})
        offset = fh.tell()
        fh.truncate(offset + rows * V * 2)
    planted = {(69998, 40002): 7.0, (5, 39000): -3.5, (70000, 35000): 11.0}
    with open(path, "r+b") as fh:
        for (r, c), v in planted.items():
            assert (c * rows + r) * 2 > 2**32
            fh.seek(offset + (c * rows + r) * 2)
            fh.write(np.float16(v).tobytes())
    src = fl.open(path)
    for (r, c), v in planted.items():
        block = src.read(r - 2, min(rows, r + 1), c - 1, min(V, c + 2))
        assert block[2, 1] == v and np.count_nonzero(block) == 1
        column = src.read(0, rows, c, c + 1)                 # whole columns: one read
        assert column[r, 0] == v and np.count_nonzero(column) == sum(cc == c for _, cc in planted)
    src.close()


def test_the_command_line_reads_a_fortran_dump(tmp_path, rng):
    """`info` says the order; `stats` and `topk` of the Fortran dump are those of its C-order twin."""
    x = (rng.standard_normal((40, 300)) * 3).astype(np.float16)
    y = rng.integers(0, 300, 40)
    c, f, _ = _save_both(tmp_path, x)
    np.save(tmp_path / "y.npy", y)

    def cli(*args):
        res = subprocess.run([sys.executable, "-m", "fastlogits", *map(str, args)], capture_output=True)
        assert res.returncode == 0, res.stderr
        return res.stdout

    assert [json.loads(cli("info", p, "--json"))["order"] for p in (c, f)] == ["C", "F"]
    summaries = [json.loads(cli("stats", p, "--labels", tmp_path / "y.npy", "--memory", "64KiB", "--json"))
                 for p in (c, f)]
    for key in ("rows", "mean_nll", "perplexity", "accuracy", "mean_entropy"):
        assert summaries[0][key] == summaries[1][key], key
    assert summaries[1]["mean_nll"] == pytest.approx(float(np.mean(fl.cross_entropy(x, y, reduction="none"))))
    for p in (c, f):
        cli("topk", p, tmp_path / f"{p.stem}.top.npy", "-k", "4")
    np.testing.assert_array_equal(np.load(tmp_path / "f.top.npy"), np.load(tmp_path / "c.top.npy"))


@pytest.mark.parametrize("memory", ["2MiB", "3MiB"])
def test_a_fortran_dump_streams_within_its_budget(tmp_path, rng, memory):
    """The buffers a pass over a Fortran dump holds (two blocks read ahead, the last one in the first's
    buffer, and the kernels' copy of a block into C order) stay within the budget, as a C-order dump's
    do. Counted by tracemalloc (NumPy's buffers), with a remainder block."""
    import tracemalloc

    from fastlogits.stream.run import parse_memory

    x = rng.standard_normal((611, 4000)).astype(np.float32)
    c, f, _ = _save_both(tmp_path, x)
    del x
    y = rng.integers(0, 4000, 611)
    for path in (c, f):
        for call in (lambda s: stats(s, y), fl.logsumexp, lambda s: fl.top_k(s, 5)):
            call(fl.open(path, memory=memory))        # (the modules a first call imports are not buffers)
            src = fl.open(path, memory=memory)
            tracemalloc.start()
            try:
                call(src)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak <= 1.1 * parse_memory(memory), (path.name, peak / parse_memory(memory))


def test_wide_fortran_rows_fold_in_stripes_within_half_the_budget(tmp_path, rng):
    """Rows wider than the budget, in Fortran order: every row at once over stripes of columns, each of
    at most half the budget over the two buffers (a quarter each), progress counting each row once and
    every byte; the results those of the rows in memory, to rounding."""
    x = rng.standard_normal((37, 9001)).astype(np.float32)
    save_fortran(tmp_path / "f.npy", x)
    src = fl.open(tmp_path / "f.npy", memory="64KiB")
    assert run.plan(src).rows == 0
    seen, counts = [], []

    def counted(source, cols):
        for c0, stripe in _column_stripes(source, cols):
            seen.append(stripe.nbytes)
            yield c0, stripe

    def progress(rows, nbytes):
        counts.append((rows, nbytes))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "column_stripes", counted)
        got = run.reduce("logsumexp", src, {}, progress=progress)
    np.testing.assert_allclose(got, fl.logsumexp(x), rtol=2e-6)
    assert len(seen) > 1 and max(seen) <= 64 * 1024 // 4
    assert sum(r for r, _ in counts) == 37 and sum(b for _, b in counts) == x.nbytes
