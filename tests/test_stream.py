"""Streaming: every source format, tiny memory budgets that drive the same paths as huge dumps (many row
blocks; rows split into many column chunks), outputs written chunk by chunk and atomically, bad files, and
the command line. Streamed results are compared with the in-memory functions on the same data."""
import json
import os
import struct
import subprocess
import sys
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

import fastlogits as fl
from fastlogits.stream import run
from tests import reference as ref

BF16 = np.dtype(ml_dtypes.bfloat16)

# budgets: None = default (one block), 64 KiB = many row blocks for V ~ 3000, column chunks for V ~ 50000
BUDGETS = [None, "64KiB"]


def _logits(rng, shape, dtype=np.float32):
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    flat[1 % flat.shape[0], ::5] = -np.inf
    if flat.shape[0] > 3:
        flat[3, 2] = np.nan
        flat[2, 1] = np.inf
    return x.astype(dtype)


def _same(a, b, rtol=0.0, atol=0.0):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, equal_nan=True)


# float16's subnormal spacing (below 6.1e-5): a one-ulp rounding flip there is 0.2-100 % relative
F16_TINY_ULP = 2.0 ** -24


def _check_all(src, x, y, rtol=0.0):
    """Every row function on the source equals the in-memory result."""
    _same(fl.logsumexp(src), fl.logsumexp(x), rtol)
    _same(fl.entropy(src, temperature=0.7), fl.entropy(x, temperature=0.7), rtol)
    np.testing.assert_array_equal(fl.argmax(src), fl.argmax(x))
    for red in ("none", "mean", "sum"):
        _same(fl.cross_entropy(src, y, reduction=red, label_smoothing=0.1, z_loss=1e-3),
              fl.cross_entropy(x, y, reduction=red, label_smoothing=0.1, z_loss=1e-3), rtol or 1e-12)
    v1, i1 = fl.top_k(src, 4)
    v2, i2 = fl.top_k(x, 4)
    np.testing.assert_array_equal(i1, i2)
    _same(v1, v2)
    lp1, j1 = fl.top_k_logprobs(src, 3, softcap=20.0)
    lp2, j2 = fl.top_k_logprobs(x, 3, softcap=20.0)
    np.testing.assert_array_equal(j1, j2)
    _same(lp1, lp2, rtol)


@pytest.mark.parametrize("memory", BUDGETS)
@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64])
def test_npy_rows_and_column_chunks(tmp_path, rng, dtype, memory):
    for shape in [(9, 3001), (3, 50021)]:          # 50021 columns do not fit 64 KiB: column chunks
        x = _logits(rng, shape, dtype)
        y = rng.integers(0, shape[1], shape[0])
        path = tmp_path / "x.npy"
        np.save(path, x)
        src = fl.open(path, dtype="bfloat16" if dtype == BF16 else None, memory=memory)
        assert src.shape == shape and src.rows == shape[0]
        if memory is not None and shape[1] > 10000:
            assert run.plan(src).rows == 0                      # really folded in column chunks
        _check_all(src, x, y, rtol=1e-6 if memory else 0.0)


def test_leading_axes_and_per_row_temperature(tmp_path, rng):
    x = _logits(rng, (2, 3, 4001))
    np.save(tmp_path / "x.npy", x)
    t = rng.uniform(0.5, 2.0, (2, 3))
    for memory in BUDGETS:
        src = fl.open(tmp_path / "x.npy", memory=memory)
        _same(fl.logsumexp(src, temperature=t), fl.logsumexp(x, temperature=t), 1e-6)
        assert fl.argmax(src).shape == (2, 3)
        with pytest.raises(ValueError, match="temperature"):
            fl.logsumexp(src, temperature=np.ones(5))


def test_raw_file(tmp_path, rng):
    x = _logits(rng, (11, 777), np.float16)
    x.tofile(tmp_path / "x.bin")
    src = fl.open(tmp_path / "x.bin", dtype="float16", vocab=777)
    _same(fl.logsumexp(src), fl.logsumexp(x))
    with pytest.raises(fl.SourceError, match=r"not a whole number of rows of 776 float16 values"):
        fl.open(tmp_path / "x.bin", dtype="float16", vocab=776)
    with pytest.raises(fl.SourceError, match="dtype= and vocab="):
        fl.open(tmp_path / "x.bin")


def _write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, (code, arr) in tensors.items():
        b = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_safetensors_bf16_and_tensor_choice(tmp_path, rng):
    x = _logits(rng, (6, 1500), BF16)
    w = _logits(rng, (4, 100), np.float32)
    _write_safetensors(tmp_path / "m.safetensors",
                       {"logits": ("BF16", x.view(np.uint16)), "other": ("F32", w)})
    with pytest.raises(fl.SourceError, match="2 tensors .*say which with tensor="):
        fl.open(tmp_path / "m.safetensors")
    src = fl.open(tmp_path / "m.safetensors", tensor="logits")
    assert src.dtype == "bfloat16" and src.shape == (6, 1500)
    _same(fl.logsumexp(src), fl.logsumexp(x))
    with pytest.raises(fl.SourceError, match="no tensor named 'nope'"):
        fl.open(tmp_path / "m.safetensors", tensor="nope")
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(fl.SourceError, match="corrupt safetensors header"):
        fl.open(tmp_path / "bad.safetensors")


def test_array_likes_and_iterables(tmp_path, rng):
    x = _logits(rng, (10, 2001))
    y = rng.integers(0, 2001, 10)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")

    class Sliceable:                       # an h5py/zarr-like object: shape, dtype, __getitem__
        shape, dtype = x.shape, x.dtype

        def __getitem__(self, key):
            return x[key]

    for obj in (mm, Sliceable()):
        _same(fl.logsumexp(obj), fl.logsumexp(x))
        _same(fl.cross_entropy(obj, y), fl.cross_entropy(x, y))
    blocks = (x[i:i + 3] for i in range(0, 10, 3))
    _same(fl.logsumexp(blocks), fl.logsumexp(x))
    blocks = (x[i:i + 3] for i in range(0, 10, 3))
    _same(fl.cross_entropy(blocks, y, reduction="none"), fl.cross_entropy(x, y, reduction="none"))
    bad = iter([x[:3], x[3:5, :100]])
    with pytest.raises(fl.SourceError, match="expected rows of 2001 values"):
        fl.logsumexp(bad)
    with pytest.raises(ValueError, match="labels has 10 values, but the source has more rows"):
        fl.cross_entropy(iter([x, x[:3]]), y)


@pytest.mark.parametrize("memory", BUDGETS)
def test_softmax_to_files_and_arrays(tmp_path, rng, memory):
    x = _logits(rng, (5, 40007), np.float16)
    np.save(tmp_path / "x.npy", x)
    src = fl.open(tmp_path / "x.npy", memory=memory)
    assert fl.softmax(src, out=str(tmp_path / "p.npy"), temperature=0.9) == str(tmp_path / "p.npy")
    # column chunks fold the logsumexp in another order than one pass: a float16 value may round one ulp
    # the other way, 5.96e-8 in the subnormal range where most of 40007 probabilities lie
    _same(np.load(tmp_path / "p.npy"), fl.softmax(x, temperature=0.9), 1e-3, F16_TINY_ULP)
    fl.log_softmax(src, out=str(tmp_path / "lp.bin"), dtype="float32")
    got = np.fromfile(tmp_path / "lp.bin", np.float32).reshape(x.shape)
    _same(got, fl.log_softmax(x, dtype="float32"), 1e-6)
    out = np.empty(x.shape, np.float16)
    fl.softmax(src, out=out)
    _same(out, fl.softmax(x), 1e-3, F16_TINY_ULP)
    # an iterable (rows unknown in advance): the .npy header is rewritten with the final shape
    fl.softmax(iter([x[:2], x[2:]]), out=str(tmp_path / "it.npy"))
    assert np.load(tmp_path / "it.npy").shape == x.shape
    assert sorted(os.listdir(tmp_path)) == ["it.npy", "lp.bin", "p.npy", "x.npy"]   # no temporary left
    # a text name would have held binary rows (the command line's topk and sample write text there)
    for fn, name in ((fl.softmax, "p.csv"), (fl.log_softmax, "lp.JSONL"), (fl.softmax, "p.txt")):
        with pytest.raises(ValueError, match=rf"^{fn.__name__} writes \.npy or raw rows, not text: got "):
            fn(src, out=tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == ["it.npy", "lp.bin", "p.npy", "x.npy"]


def test_interrupted_write_leaves_no_file(tmp_path, rng):
    x = _logits(rng, (8, 300))

    def blocks():
        yield x[:4]
        raise KeyboardInterrupt          # Ctrl-C in the middle of the dump

    with pytest.raises(KeyboardInterrupt):
        fl.softmax(blocks(), out=str(tmp_path / "p.npy"))
    assert os.listdir(tmp_path) == []


def test_bad_files(tmp_path, rng):
    x = _logits(rng, (4, 100))
    np.save(tmp_path / "x.npy", x)
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[:1000])
    with pytest.raises(fl.SourceError,
                       match=r"truncated npy file: shape \(4, 100\) of float32 needs 1600 bytes"):
        fl.open(tmp_path / "t.npy")
    (tmp_path / "c.npy").write_bytes(b"\x93NUMPY\x01\x00garbage" + data[20:])
    with pytest.raises(fl.SourceError, match="not a valid .npy file"):
        fl.open(tmp_path / "c.npy")
    # values that are not float logits: a SourceError that is a TypeError too, as in memory
    for values, found in ((np.zeros((2, 3), np.int32), "found int32"), (np.ones((2, 3), bool), "found bool"),
                          (np.ones((2, 3), np.complex64), "found complex64"),
                          (np.array([[1.0, None]], dtype=object), "found an object array")):
        np.save(tmp_path / "i.npy", values)
        with pytest.raises(TypeError, match="logits, " + found):
            fl.logsumexp(fl.open(tmp_path / "i.npy"))
        with pytest.raises(fl.SourceError, match=found):
            fl.open(tmp_path / "i.npy")
    with pytest.raises(TypeError):           # the same values in memory
        fl.logsumexp(np.zeros((2, 3), np.int32))
    np.save(tmp_path / "v.npy", x.astype(BF16))
    with pytest.raises(fl.SourceError, match="dtype='bfloat16'") as e:
        fl.open(tmp_path / "v.npy")
    assert isinstance(e.value, TypeError)
    with pytest.raises(FileNotFoundError):
        fl.open(tmp_path / "missing.npy")


def test_peak_memory_is_bounded(tmp_path, rng):
    """A 32 MB dump streamed with a 2 MiB budget allocates a few MiB at most (buffers reused)."""
    x = rng.standard_normal((400, 20000), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    expect = fl.logsumexp(x)
    del x
    src = fl.open(tmp_path / "x.npy", memory="2MiB")
    tracemalloc.start()
    got = fl.logsumexp(src)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    _same(got, expect)
    assert peak < 6 * 2**20, f"peak {peak / 2**20:.1f} MiB for a 2 MiB budget over a 32 MB file"


def test_memory_budget_setting():
    old = fl.get_memory_budget()
    try:
        fl.set_memory_budget("1GiB")
        assert fl.get_memory_budget() == 2**30
        with pytest.raises(ValueError, match="memory"):
            fl.set_memory_budget("lots")
        for n in (np.float32(2**20), np.float64(2**21), np.int32(2**22), 2.0**23):   # any real number type
            fl.set_memory_budget(n)
            assert fl.get_memory_budget() == int(n)
        for bad in (True, np.bool_(True), 1j, None):
            with pytest.raises(TypeError, match="memory must be a byte count"):
                fl.set_memory_budget(bad)
    finally:
        fl.set_memory_budget(old)


# ---- the command line ---------------------------------------------------------------------------------

def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "fastlogits.cli", *map(str, args)], input=stdin,
                          capture_output=True)


def test_cli_stats_info_topk_softmax(tmp_path, rng):
    x = (rng.standard_normal((50, 3000)) * 3).astype(BF16)
    y = rng.integers(0, 3000, 50)
    y[7] = -100
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    res = _cli("stats", tmp_path / "x.npy", "--dtype", "bfloat16", "--labels", tmp_path / "y.npy",
               "--memory", "64KiB", "--json", "--per-row", tmp_path / "rows.jsonl")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    nll = fl.cross_entropy(x, y, reduction="none")
    counted = y != -100
    assert s["rows"] == 50 and s["counted_rows"] == 49
    assert s["mean_nll"] == pytest.approx(float(np.mean(nll[counted])), rel=1e-6)
    assert s["accuracy"] == pytest.approx(float(np.mean((fl.argmax(x) == y)[counted])))
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 50 and rows[3]["argmax"] == int(fl.argmax(x[3]))
    res = _cli("info", tmp_path / "x.npy", "--dtype", "bfloat16", "--json")
    assert json.loads(res.stdout)["shape"] == [50, 3000]
    res = _cli("topk", tmp_path / "x.npy", tmp_path / "top.npy", "-k", "3", "--dtype", "bfloat16")
    assert res.returncode == 0, res.stderr
    top = np.load(tmp_path / "top.npy")
    np.testing.assert_array_equal(top["ids"], fl.top_k_logprobs(x, 3)[1])
    res = _cli("softmax", tmp_path / "x.npy", tmp_path / "p.npy", "--dtype", "bfloat16", "--log")
    assert res.returncode == 0, res.stderr
    _same(np.load(tmp_path / "p.npy").view(BF16), fl.log_softmax(x))


def test_cli_stats_means_leave_padding_out(tmp_path, rng):
    """With labels, stats' mean entropy is over the counted rows, as its mean NLL and accuracy are: the
    padding's entropy (logits that may be anything: here a +inf) made it NaN, or moved it (a user audit).
    Without labels it is over every row; the text says over how many."""
    x = (rng.standard_normal((2, 5, 40)) * 3).astype(np.float32)
    y = rng.integers(0, 40, (2, 5))
    y[0, 3:] = y[1, 4] = -100
    x[0, 4, 7] = np.inf                               # padding with a +inf logit
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    counted = y != -100
    res = _cli("stats", tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--json")
    got = json.loads(res.stdout)
    assert res.returncode == 0 and got["counted_rows"] == 7, res.stderr
    np.testing.assert_allclose(got["mean_entropy"], ref.entropy(x[counted]).mean(), rtol=1e-6)
    np.testing.assert_allclose(got["mean_nll"], ref.cross_entropy(x[counted], y[counted]), rtol=1e-6)
    out = _cli("stats", tmp_path / "x.npy", "--labels", tmp_path / "y.npy").stdout.decode()
    assert "nats over 7 rows" in out.splitlines()[-1], out
    # labels in another shape of as many (transposed: (5, 2)) are refused; flat ones, and a shape with an
    # axis of length 1 more, are read in the rows' order
    np.save(tmp_path / "yT.npy", np.ascontiguousarray(y.T))
    res = _cli("stats", tmp_path / "x.npy", "--labels", tmp_path / "yT.npy")
    assert res.returncode == 1 and res.stderr.count(b"\n") == 1, res.stderr
    assert b"yT.npy: labels of shape (5, 2) for logits whose rows have shape (2, 5)" in res.stderr
    for name, lab in (("flat.txt", None), ("y1.npy", y[:, :, None]), ("col.npy", y.reshape(-1, 1))):
        if lab is None:
            np.savetxt(tmp_path / name, y.reshape(-1), fmt="%d")
        else:
            np.save(tmp_path / name, lab)
        again = json.loads(_cli("stats", tmp_path / "x.npy", "--labels", tmp_path / name, "--json").stdout)
        assert again["mean_nll"] == got["mean_nll"], name
    np.save(tmp_path / "none.npy", np.full_like(y, -100))      # every row ignored: NaN means, said so
    out = _cli("stats", tmp_path / "x.npy", "--labels", tmp_path / "none.npy").stdout.decode()
    assert "mean NLL      nan nats over 0 rows" in out and "mean entropy  nan nats over 0 rows" in out, out
    x[0, 4, 7] = 0.0
    np.save(tmp_path / "x.npy", x)
    got = json.loads(_cli("stats", tmp_path / "x.npy", "--json").stdout)      # no labels: every row
    np.testing.assert_allclose(got["mean_entropy"], ref.entropy(x.reshape(10, 40)).mean(), rtol=1e-6)
    assert "nats over 10 rows" in _cli("stats", tmp_path / "x.npy").stdout.decode()


def test_cli_info_text_of_a_dump_and_of_standard_input(tmp_path, rng):
    """info's text: a dump's shape, rows and size; standard input's rows and size are not known before it
    is read, said so (not Python's None, which --json gives as null)."""
    x = rng.standard_normal((4, 6)).astype(np.float16)
    np.save(tmp_path / "x.npy", x)
    out = _cli("info", tmp_path / "x.npy").stdout.decode()
    assert "shape    (4, 6)" in out and "rows     4" in out and f"bytes    {x.nbytes}" in out
    res = _cli("info", "-", "--dtype", "float16", "--vocab", "6", stdin=x.tobytes())
    out = res.stdout.decode()
    assert res.returncode == 0 and "None" not in out, out
    assert "shape    (?, 6)" in out and "rows     not known before it is read" in out, out
    res = _cli("info", "-", "--dtype", "float16", "--vocab", "6", "--json", stdin=x.tobytes())
    assert json.loads(res.stdout)["rows"] is None
    # one axis as Python writes a tuple, (6,) (it was "(6)"); one row is "1 row" (it was "1 rows")
    np.save(tmp_path / "one.npy", x[0])
    assert "shape    (6,)" in _cli("info", tmp_path / "one.npy").stdout.decode()
    out = _cli("stats", tmp_path / "one.npy").stdout.decode()
    assert out.startswith(f"{tmp_path / 'one.npy'}: 1 row x 6 (float16)"), out


def test_cli_npy_results_keep_the_leading_shape(tmp_path, rng):
    """topk, sample and stats --per-row into .npy: records of the dump's leading shape ((2, 3) for a
    (2, 3, V) dump, () for one row), as the in-memory functions return them; .jsonl and .csv: a line a row,
    in C order. Raw rows from standard input, whose count is not known ahead, are a flat (rows,)."""
    x = (rng.standard_normal((2, 3, 301)) * 3).astype(np.float32)
    y = rng.integers(0, 301, (2, 3))
    y[0, 2] = -100
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    lp, ids = fl.top_k_logprobs(x, 4)
    tokens, slp, ranks = fl.sample(x, top_k=20, seed=3, return_logprobs=True)
    for args in (("topk", tmp_path / "x.npy", tmp_path / "t.npy", "-k", "4"),
                 ("sample", tmp_path / "x.npy", tmp_path / "s.npy", "--top-k", "20", "--seed", "3",
                  "--logprobs"),
                 ("stats", tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--per-row",
                  tmp_path / "r.npy"),
                 ("stats", tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--per-row",
                  tmp_path / "r.csv"),
                 ("topk", tmp_path / "x.npy", tmp_path / "t.jsonl", "-k", "4")):
        res = _cli(*args, "--memory", "64KiB")
        assert res.returncode == 0, res.stderr
    t = np.load(tmp_path / "t.npy")
    assert t.shape == (2, 3)
    np.testing.assert_array_equal(t["ids"], ids)
    np.testing.assert_allclose(t["logprobs"], lp, rtol=1e-6)
    s = np.load(tmp_path / "s.npy")
    assert s.shape == (2, 3)
    np.testing.assert_array_equal(s["token"], tokens)
    np.testing.assert_array_equal(s["rank"], ranks)
    r = np.load(tmp_path / "r.npy")
    assert r.shape == (2, 3)
    np.testing.assert_array_equal(r["argmax"], fl.argmax(x))
    np.testing.assert_array_equal(r["label"], y)
    np.testing.assert_allclose(r["nll"], fl.cross_entropy(x, y, reduction="none"), rtol=1e-6)
    csv = (tmp_path / "r.csv").read_text().splitlines()
    assert len(csv) == 7 and [int(line.split(",")[0]) for line in csv[1:]] == fl.argmax(x).ravel().tolist()
    lines = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [d["ids"] for d in lines] == ids.reshape(6, 4).tolist()
    # one row (a 1-D dump): one record, 0-d
    x1 = x[1, 0].copy()
    x1[5] = np.inf
    np.save(tmp_path / "x1.npy", x1)
    res = _cli("topk", tmp_path / "x1.npy", tmp_path / "t1.npy", "-k", "2")
    assert res.returncode == 0, res.stderr
    t1 = np.load(tmp_path / "t1.npy")
    assert t1.shape == () and t1["ids"].tolist() == fl.top_k(x1, 2)[1].tolist()
    assert t1["ids"][0] == 5
    # standard input: flat
    res = _cli("topk", "-", tmp_path / "t2.npy", "-k", "4", "--dtype", "float32", "--vocab", "301",
               stdin=x.tobytes())
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "t2.npy")["ids"], ids.reshape(6, 4))


def test_cli_stdin_and_errors(tmp_path, rng):
    x = (rng.standard_normal((20, 500)) * 3).astype(np.float32)
    y = rng.integers(0, 500, 20)
    np.save(tmp_path / "y.npy", y)
    res = _cli("stats", "-", "--dtype", "float32", "--vocab", "500", "--labels", tmp_path / "y.npy", "--json",
               stdin=x.tobytes())
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["mean_nll"] == pytest.approx(float(np.mean(fl.cross_entropy(
        x, y, reduction="none"))), rel=1e-6)
    res = _cli("stats", "-", "--dtype", "float32", "--vocab", "500", stdin=x.tobytes()[:-6])
    assert res.returncode == 1 and b"not a whole number of rows" in res.stderr
    for args, msg in [(("stats", tmp_path / "none.npy"), b"no such file"),
                      (("stats", "-"), b"dtype= and vocab="),
                      (("info", tmp_path / "y.npy"), b"expected float16, bfloat16, float32 or float64")]:
        res = _cli(*args, stdin=b"")
        assert res.returncode != 0 and msg in res.stderr, res.stderr
        assert res.stderr.count(b"\n") == 1 and b"Traceback" not in res.stderr
    np.save(tmp_path / "x.npy", x)
    res = _cli("stats", tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--per-row", tmp_path / "r.txt")
    assert res.returncode == 2 and b".npy, .csv or .jsonl" in res.stderr     # a usage error
    np.save(tmp_path / "y5.npy", y[:5])
    res = _cli("stats", tmp_path / "x.npy", "--labels", tmp_path / "y5.npy")
    assert res.returncode == 1 and b"5 labels for 20 rows" in res.stderr


def test_cli_demo_json():
    res = _cli("demo", "--rows", "300", "--vocab", "2000", "--json")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert s["rows"] == 300 and 0 < s["mean_nll"] < 20 and 0 <= s["accuracy"] <= 1


@pytest.mark.parametrize("memory", BUDGETS)
@pytest.mark.parametrize("dtype", [BF16, np.float32, np.float64])
def test_stats_one_pass_matches_the_functions(tmp_path, rng, dtype, memory):
    """The fused evaluation pass (entropy state + argmax + label logit) equals the three functions,
    awkward rows included (NaN, +inf, -inf entries, an all -inf row, ignored labels)."""
    for V in (3001, 50021):
        x = _logits(rng, (6, V), dtype)
        x[5] = -np.inf
        y = rng.integers(0, V, 6)
        y[4] = -100
        np.save(tmp_path / "x.npy", x)
        src = fl.open(tmp_path / "x.npy", dtype="bfloat16" if dtype == BF16 else None, memory=memory)
        st = run.stats(src, y, temperature=0.8)
        nll = fl.cross_entropy(x, y, reduction="none", temperature=0.8)
        _same(st["nll"], nll, 1e-6)
        _same(st["entropy"], fl.entropy(x, temperature=0.8), 1e-6)
        np.testing.assert_array_equal(st["argmax"], fl.argmax(x))
        np.testing.assert_array_equal(st["counted"], y != -100)
        st2 = run.stats(x, None)                       # an in-memory array, no labels
        np.testing.assert_array_equal(st2["argmax"], fl.argmax(x))
        assert "nll" not in st2


def test_cli_sample_streams_and_reproduces(tmp_path, rng):
    x = (rng.standard_normal((40, 3000)) * 3).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    args = ("sample", tmp_path / "x.npy", tmp_path / "s.npy", "--temperature", "0.8", "--top-k", "50",
            "--top-p", "0.9", "--seed", "7", "--logprobs")
    res = _cli(*args, "--memory", "64KiB", "--threads", "1")
    assert res.returncode == 0, res.stderr
    got = np.load(tmp_path / "s.npy")
    tokens, lp, ranks = fl.sample(x, temperature=0.8, top_k=50, top_p=0.9, seed=7, return_logprobs=True)
    # same seed, other budget (rows wider than it: drawn in passes) and threads: the same tokens
    np.testing.assert_array_equal(got["token"], tokens)
    np.testing.assert_allclose(got["logprob"], lp, rtol=2e-6)
    np.testing.assert_array_equal(got["rank"], ranks)
    res = _cli("sample", tmp_path / "x.npy", tmp_path / "s.npy", "--top-p", "1.5")
    assert res.returncode == 2 and b"argument --top-p:" in res.stderr and b"Traceback" not in res.stderr
    # without --seed, the seed drawn is reported, and repeats the run
    res = _cli("sample", tmp_path / "x.npy", tmp_path / "s.npy", "--top-k", "50", "--json")
    assert res.returncode == 0, res.stderr
    seed = json.loads(res.stdout)["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**64
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy")["token"], fl.sample(x, top_k=50, seed=seed))


@pytest.mark.parametrize("memory", ["256MiB", "64KiB"])      # rows in blocks, and wider than the budget
def test_cli_topk_refuses_k_past_the_vocabulary(tmp_path, rng, memory):
    np.save(tmp_path / "x.npy", rng.standard_normal((20, 3000)).astype(np.float32))
    res = _cli("topk", tmp_path / "x.npy", tmp_path / "t.jsonl", "-k", "3001", "--memory", memory)
    assert res.returncode == 1, res.stderr
    assert res.stderr.decode().strip().endswith("k must be between 0 and the vocabulary size 3000, got 3001")
    assert not (tmp_path / "t.jsonl").exists()


def test_wide_rows_keep_smoothing_precision(tmp_path, rng):
    """Rows wider than the budget are folded in column chunks by CrossEntropy accumulators: label
    smoothing's distance sums merge at each new max, so float64 logits near 1e9 keep 1e-13 relative (the
    sum of the logits lost 7e-10 here)."""
    x = 1e9 + 3.0 * rng.standard_normal((3, 50000))
    x[0, :30000] -= 40.0          # row 0's max comes in a late chunk
    y = np.array([3, 40000, 49999])
    np.save(tmp_path / "x.npy", x)
    src = fl.open(tmp_path / "x.npy", memory="64KiB")
    for kw in (dict(), dict(weight=rng.uniform(0.2, 2.0, 50000))):
        want = ref.cross_entropy(x, y, label_smoothing=0.1, reduction="none", **kw)
        got = fl.cross_entropy(src, y, label_smoothing=0.1, reduction="none", **kw)
        np.testing.assert_allclose(got, want, rtol=1e-13)
