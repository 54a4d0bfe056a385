"""Streaming at its edges: accumulators fed wrongly (overlapping or missing columns, foreign states, short
weights), standard input and iterables with rows wider than the budget, corrupt safetensors headers,
big-endian and version-3 .npy files, outputs that cannot be written, and the command line's one-line
errors and strict JSON. Results are compared with the in-memory functions on the same data."""
import contextlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

import fastlogits as fl
from fastlogits.ops._prep import BF16
from fastlogits.stream import CrossEntropy, LogSumExp
from fastlogits.stream.accumulators import Entropy, TopK
from fastlogits.stream.sources import ArraySource, IterSource, SourceError, StdinSource
from tests import reference as ref
from tests import tolerances as tols


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "fastlogits.cli", *map(str, args)], input=stdin,
                          capture_output=True)


def _one_line(res, rc=None):
    assert res.returncode != 0 if rc is None else res.returncode == rc, res.stderr
    assert res.stderr.count(b"\n") == 1 and b"Traceback" not in res.stderr, res.stderr
    return res.stderr.decode()


# ---- accumulators ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: LogSumExp(4), lambda: Entropy(4), lambda: TopK(4, 3),
                                  lambda: CrossEntropy(np.array([1, 5, -100, 0]))],
                         ids=["LogSumExp", "Entropy", "TopK", "CrossEntropy"])
def test_a_column_folded_in_twice_raises(rng, make):
    x = rng.standard_normal((4, 30)).astype(np.float32)
    acc = make().update(x[:, :10], 0).update(x[:, 20:], 20)
    with pytest.raises(ValueError, match="columns 5:10 were already folded in"):
        acc.update(x[:, 5:15], 5)
    with pytest.raises(ValueError, match="already folded in"):
        acc.update(x[:, 25:26], 25)
    acc.update(x[:, 10:20], 10)                       # the gap itself is fine
    with pytest.raises(ValueError, match="already folded in"):
        acc.merge(make().update(x[:, 29:], 29))


def test_merged_accumulators_equal_one_shot_and_reject_overlap(rng):
    x = rng.standard_normal((3, 40)) * 4
    y = np.array([3, 39, -100])
    a = CrossEntropy(y, label_smoothing=0.2, reduction="none").update(x[:, 20:], 20)
    b = CrossEntropy(y, label_smoothing=0.2, reduction="none").update(x[:, :20], 0)
    got = a.merge(b).result()
    np.testing.assert_allclose(got, fl.cross_entropy(x, y, label_smoothing=0.2, reduction="none"),
                               rtol=1e-12)
    lse = LogSumExp(3).update(x[:, :20], 0)
    with pytest.raises(ValueError, match="cannot be merged into itself"):
        lse.merge(lse)                                 # the same columns twice
    with pytest.raises(ValueError, match="columns 5:20 were already folded in"):
        lse.merge(LogSumExp(3).update(x[:, 5:30], 5))


def test_cross_entropy_with_a_gap_in_its_columns_raises(rng):
    x = rng.standard_normal((2, 30))
    acc = CrossEntropy(np.array([1, 2]), label_smoothing=0.1).update(x[:, :10], 0).update(x[:, 20:], 20)
    with pytest.raises(ValueError, match="columns 10:20 were never folded in"):
        acc.result()
    acc = CrossEntropy(np.array([25, 28])).update(x[:, 20:], 20)
    with pytest.raises(ValueError, match="columns 0:20 were never folded in"):
        acc.result()


def test_merge_checks_rows_and_options(rng):
    x = rng.standard_normal((5, 50)).astype(np.float32)
    y = np.array([3, 10, 0, -100, 25])
    a = CrossEntropy(y).update(x[:, :20], 0)
    with pytest.raises(ValueError, match="has 1 rows, this one 5"):
        a.merge(CrossEntropy(np.array([30])).update(x[:1, 20:], 20))
    with pytest.raises(ValueError, match="different labels"):
        a.merge(CrossEntropy(np.where(y == 0, 1, y)).update(x[:, 20:], 20))
    with pytest.raises(ValueError, match="different label_smoothing"):
        a.merge(CrossEntropy(y, label_smoothing=0.1).update(x[:, 20:], 20))
    with pytest.raises(ValueError, match="different temperature"):
        a.merge(CrossEntropy(y, temperature=2.0).update(x[:, 20:], 20))
    st = CrossEntropy(y[:3]).update(x[:3, 20:], 20).state      # a bare state of 3 rows
    with pytest.raises(ValueError, match=r"one value per row, shape \(5,\)"):
        a.merge(st)
    with pytest.raises(ValueError, match=r"one value per row, shape \(5,\)"):
        LogSumExp(5).merge((np.zeros(2), np.ones(2)))
    # nothing was changed by the refused merges
    a.merge(CrossEntropy(y).update(x[:, 20:], 20))
    assert a.result() == pytest.approx(float(fl.cross_entropy(x, y)), rel=1e-6)


def test_cross_entropy_weight_must_cover_the_columns(rng):
    x = rng.standard_normal((1, 50)).astype(np.float32)
    for n in (49, 10):
        acc = CrossEntropy(np.array([1]), weight=np.ones(n), label_smoothing=0.1)
        with pytest.raises(ValueError, match=f"weight has {n} values"):
            acc.update(x, 0)
    acc = CrossEntropy(np.array([1]), weight=np.ones(60)).update(x, 0)
    with pytest.raises(ValueError, match="weight has 60 values .* but 50 columns"):
        acc.result()
    w = rng.random(50)
    got = CrossEntropy(np.array([1]), weight=w, label_smoothing=0.1).update(x[:, 30:], 30).update(
        x[:, :30], 0).result()
    assert got == pytest.approx(float(fl.cross_entropy(x, np.array([1]), weight=w, label_smoothing=0.1)),
                                rel=1e-6)


def test_accumulator_options_checked_at_construction():
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        LogSumExp(4, temperature=-1)
    with pytest.raises(ValueError, match="temperature must be a scalar or one value per row"):
        Entropy(3, temperature=np.ones(2))
    with pytest.raises(ValueError, match="softcap"):
        TopK(3, 2, softcap=0.0)


# ---- standard input and iterables with rows wider than the budget ---------------------------------------

def test_stdin_reads_by_the_plan_in_bounded_memory(rng):
    """A row of 2^19 float32 (2 MiB) under a 256 KiB budget: standard input is read in column chunks,
    not 256 rows at a time (which would allocate 512 MiB here)."""
    x = rng.standard_normal((3, 1 << 19)).astype(np.float32)
    data = x.tobytes()
    src = StdinSource("float32", x.shape[1], stream=io.BytesIO(data))
    src.memory = "256KiB"
    tracemalloc.start()
    try:
        got = fl.logsumexp(src)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(got, fl.logsumexp(x), rtol=1e-6)
    # (4 MiB: NumPy itself allocates about 1 MiB once after some thousands of array-interface calls)
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB under a 256 KiB budget"


@pytest.mark.parametrize("kind", ["stdin", "iterable"])
@pytest.mark.parametrize("log", [False, True])
def test_maps_of_rows_wider_than_the_budget_from_read_once_sources(tmp_path, rng, kind, log):
    x = (rng.standard_normal((3, 40001)) * 4).astype(np.float32)
    x[1, ::7] = -np.inf
    src = (StdinSource("float32", x.shape[1], stream=io.BytesIO(x.tobytes())) if kind == "stdin"
           else iter([x[:2], x[2:]]))
    fn = fl.log_softmax if log else fl.softmax
    out = tmp_path / "o.npy"
    old = fl.get_memory_budget()
    fl.set_memory_budget("64KiB")
    try:
        assert fn(src, out=out) == str(out)
    finally:
        fl.set_memory_budget(old)
    # the row's logsumexp is folded over column chunks, and the map computed from it a chunk at a time:
    # within the accuracy contract of the float64 reference, as the one-shot result (which takes each
    # softmax term from the running max, then rescales it) is
    want = (ref.log_softmax if log else ref.softmax)(x)
    tol = (tols.log_tol if log else tols.prob_tol)(x.dtype, want, ref.row_scale(x)[:, None], x.dtype)
    for got, what in [(np.load(out), "streamed"), (fn(x), "in memory")]:
        tols.assert_close(got, want, tol, x.dtype, f"{fn.__name__} {what}")


def test_a_spooled_row_has_no_name_to_leave_behind(tmp_path, rng, monkeypatch):
    """A row of standard input wider than the budget is spooled for the map's second pass to an
    anonymous file: nothing is ever named in the temporary folder, so an interrupt during the cleanup
    (a second Ctrl-C) cannot leave a row-sized file there."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    x = rng.standard_normal((3, 40001)).astype(np.float32)
    seen = []

    class Stream(io.BytesIO):           # standard input that looks into the folder as it is read
        def readinto(self, b):
            seen.append(sorted(os.listdir(folder)))
            return super().readinto(b)

    out, src = np.empty_like(x), StdinSource("float32", x.shape[1], stream=Stream(x.tobytes()))
    src.memory = "64KiB"
    fl.softmax(src, out=out)
    np.testing.assert_allclose(out, fl.softmax(x), rtol=1e-5, atol=1e-12)
    assert len(seen) > 3 and not any(seen) and not os.listdir(folder)


def test_stdin_truncated_mid_row_and_bad_vocab(rng):
    x = rng.standard_normal((2, 50000)).astype(np.float32)
    src = StdinSource("float32", 50000, stream=io.BytesIO(x.tobytes()[:-12]))
    src.memory = "64KiB"
    with pytest.raises(SourceError, match="not a whole number of rows .* 199988 bytes left over"):
        fl.logsumexp(src)
    for vocab, error in ((0, ValueError), (-3, ValueError), (7.5, TypeError), (True, TypeError),
                         (np.True_, TypeError), ("9", TypeError)):
        with pytest.raises(error, match="vocab must be a positive integer"):
            StdinSource("float32", vocab, stream=io.BytesIO(b""))


# ---- files -------------------------------------------------------------------------------------------

def _safetensors(path, header, data):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F32", "shape": [5, 7], "data_offsets": [-4, 136]}, "expected data_offsets"),
    ({"dtype": "F32", "shape": [5, -7], "data_offsets": [140, 0]}, "shape of non-negative integers"),
    ({"dtype": "F32", "shape": 7, "data_offsets": [0, 28]}, "shape of non-negative integers"),
    ({"dtype": "F32", "shape": [5, "7"], "data_offsets": [0, 140]}, "shape of non-negative integers"),
    ({"dtype": "F32", "shape": [5, 7], "data_offsets": ["0", "140"]}, "expected data_offsets"),
    ({"dtype": "F32", "shape": [4, 7], "data_offsets": [28, 140]}, "starts at byte 28 of the data, expected"),
    ({"dtype": "F32", "shape": [4, 7], "data_offsets": [0, 112]}, "28 bytes after the last tensor"),
    ({"dtype": "F32", "shape": [5, 7]}, "expected dtype, shape and data_offsets"),
    ({"dtype": ["F32"], "shape": [5, 7], "data_offsets": [0, 140]}, "expected a dtype name such as"),
])
def test_corrupt_safetensors_headers(tmp_path, entry, message):
    path = _safetensors(tmp_path / "t.safetensors", {"a": entry}, np.arange(35, dtype=np.float32).tobytes())
    with pytest.raises(SourceError, match=message):
        fl.open(path)


def test_a_safetensors_tensor_listed_twice_is_refused_naming_it(tmp_path):
    """A header with the same tensor name twice (JSON readers keep the last entry) is refused as such, not
    by a symptom of the entry dropped."""
    data = np.arange(35, dtype=np.float32).tobytes()
    a = '"dtype": "F32", "shape": [5, 7], "data_offsets": [0, 140]'
    b = '"dtype": "F16", "shape": [5, 7], "data_offsets": [0, 70]'
    path = tmp_path / "t.safetensors"
    h = f'{{"a": {{{a}}}, "a": {{{b}}}}}'.encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    with pytest.raises(SourceError, match="'a' is listed more than once"):
        fl.open(path)
    h = f'{{"a": {{"dtype": "F16", {a}}}}}'.encode()                     # a field twice in an entry
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    with pytest.raises(SourceError, match="entry for 'a': 'dtype' is given more than once"):
        fl.open(path)
    # a key twice in the free-form metadata is no tensor's: read as the safetensors package reads it
    h = f'{{"a": {{{a}}}, "__metadata__": {{"k": "1", "k": "2"}}}}'.encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    np.testing.assert_array_equal(fl.argmax(fl.open(path)), np.full(5, 6))


def test_safetensors_overlap_and_other_tensors(tmp_path):
    data = np.arange(35, dtype=np.float32).tobytes()
    a = {"dtype": "F32", "shape": [5, 7], "data_offsets": [0, 140]}
    path = _safetensors(tmp_path / "o.safetensors", {"a": a, "b": {"dtype": "F32", "shape": [7],
                                                                   "data_offsets": [0, 28]}}, data)
    with pytest.raises(SourceError, match="must be back to back"):
        fl.open(path, tensor="a")
    # an integer tensor beside the logits is fine; only its bytes are counted
    header = {"a": {"dtype": "F32", "shape": [4, 7], "data_offsets": [0, 112]},
              "ids": {"dtype": "I32", "shape": [7], "data_offsets": [112, 140]}}
    path = _safetensors(tmp_path / "i.safetensors", header, data)
    got = fl.logsumexp(fl.open(path, tensor="a"))
    np.testing.assert_array_equal(got, fl.logsumexp(np.arange(28, dtype=np.float32).reshape(4, 7)))
    path = _safetensors(tmp_path / "t.safetensors", {"a": a}, data[:100])
    with pytest.raises(SourceError, match="truncated safetensors file: its tensors need 140 bytes .* 100"):
        fl.open(path)


def test_self_describing_files_check_what_they_are_told(tmp_path, rng):
    """dtype, vocab and tensor given for a .npy or .safetensors file must agree with it (they were ignored:
    --vocab 5 on a file of 9 columns read 9; found by a new-user audit), and dtype='bfloat16' re-declares
    raw 2-byte data only: float16 values are not bfloat16 bits (they were read as such, silently)."""
    x = rng.standard_normal((4, 9)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(SourceError, match="vocab=5 was given, but the file's rows hold 9 values"):
        fl.open(tmp_path / "x.npy", vocab=5)
    assert fl.open(tmp_path / "x.npy", vocab=9, dtype="float32").V == 9
    with pytest.raises(SourceError, match="tensor= .* names a tensor of a .safetensors file"):
        fl.open(tmp_path / "x.npy", tensor="x")
    path = _safetensors(tmp_path / "t.safetensors", {"a": {"dtype": "F32", "shape": [4, 9],
                                                             "data_offsets": [0, 144]}}, x.tobytes())
    with pytest.raises(SourceError, match="dtype='float16' was asked for, but the tensor holds float32"):
        fl.open(path, dtype="float16")
    with pytest.raises(SourceError, match="vocab=7 was given"):
        fl.open(path, vocab=7)
    np.testing.assert_array_equal(fl.logsumexp(fl.open(path, dtype="float32", vocab=9)), fl.logsumexp(x))
    # a U16 (or I16) tensor: refused with a clear error (it was a bare KeyError), or re-declared as bfloat16
    b16 = x.astype(BF16)
    path = _safetensors(tmp_path / "u.safetensors", {"a": {"dtype": "U16", "shape": [4, 9],
                                                             "data_offsets": [0, 72]}}, b16.tobytes())
    with pytest.raises(SourceError, match="tensor 'a' holds U16 values; expected F16, BF16, F32 or F64 "
                       r"logits \(if they are bfloat16 bits, open it with dtype='bfloat16'\)"):
        fl.open(path)
    np.testing.assert_array_equal(fl.logsumexp(fl.open(path, dtype="bfloat16")), fl.logsumexp(b16))
    path = _safetensors(tmp_path / "i8.safetensors", {"a": {"dtype": "I8", "shape": [4, 9],
                                                              "data_offsets": [0, 36]}}, bytes(36))
    with pytest.raises(SourceError, match="holds I8 values; expected F16, BF16, F32 or F64 logits$") as e:
        fl.open(path, dtype="bfloat16")
    assert isinstance(e.value, TypeError)      # as integer logits in memory
    with pytest.raises(SourceError, match="tensor= .* standard input holds raw rows"):
        fl.open("-", dtype="float32", vocab=9, tensor="a")
    # float16 is refused as bfloat16 in every kind of source; raw 2-byte data is re-declared
    h = x.astype(np.float16)
    np.save(tmp_path / "h.npy", h)
    with pytest.raises(SourceError, match="re-declares raw 2-byte data .* the values are float16"):
        fl.open(tmp_path / "h.npy", dtype="bfloat16")
    with pytest.raises(SourceError, match="the values are float16"):
        fl.logsumexp(ArraySource(np.load(tmp_path / "h.npy", mmap_mode="r"), "bfloat16"))
    with pytest.raises(SourceError, match="row block 0: .* the values are float16"):
        fl.logsumexp(IterSource(iter([h]), "bfloat16"))
    b = x.astype(BF16)
    np.save(tmp_path / "u.npy", b.view(np.uint16))
    got = fl.logsumexp(fl.open(tmp_path / "u.npy", dtype="bfloat16"))
    np.testing.assert_array_equal(got, fl.logsumexp(b))
    # the command line names its own flags and prints plain numbers
    assert "vocab=5 was given" in _one_line(_cli("info", tmp_path / "x.npy", "--vocab", "5"), 1)
    assert "the values are float16" in _one_line(_cli("info", tmp_path / "h.npy", "--dtype", "bfloat16"), 1)
    np.save(tmp_path / "v.npy", b.view("V2"))
    assert "--dtype bfloat16 on the command line" in _one_line(_cli("info", tmp_path / "v.npy"), 1)
    err = _one_line(_cli("softmax", tmp_path / "x.npy", tmp_path / "o.npy", "--temperature", "0"), 2)
    assert "argument --temperature: expected a finite number > 0, got 0 " in err and "np." not in err
    # a scalar argument names no row; one given per row names the bad row
    cases = ((dict(top_p=1.5), r"got 1\.5"), (dict(min_p=[0.5, 2.0, 0, 0]), r"got 2\.0 \(row 1\)"))
    for kw, shown in cases:
        with pytest.raises(ValueError, match=f"{shown}$"):
            fl.sample(x, seed=0, **kw)


def test_big_endian_and_version_3_npy(tmp_path, rng):
    x = (rng.standard_normal((6, 77)) * 3).astype(np.float32)
    for dt in (">f4", ">f2", ">f8"):
        np.save(tmp_path / "be.npy", x.astype(dt))
        want = x.astype(dt).astype(np.dtype(dt).newbyteorder("="))
        np.testing.assert_array_equal(fl.logsumexp(fl.open(tmp_path / "be.npy", memory="64KiB")),
                                      fl.logsumexp(want))
        np.testing.assert_array_equal(fl.top_k(fl.open(tmp_path / "be.npy"), 3)[0], fl.top_k(want, 3)[0])
    with open(tmp_path / "v3.npy", "wb") as f:
        np.lib.format.write_array(f, x, version=(3, 0))
    np.testing.assert_array_equal(fl.entropy(fl.open(tmp_path / "v3.npy")), fl.entropy(x))


def test_a_big_endian_npy_opened_with_its_own_dtype(tmp_path, rng):
    """dtype= naming a big-endian file's own dtype ('>f4' for np.save of big-endian float32) is that file's
    dtype, read as its values; another byte-swapped dtype is refused saying what the file holds."""
    x = (rng.standard_normal((3, 40)) * 3).astype(np.float32)
    np.save(tmp_path / "be.npy", x.astype(">f4"))
    src = fl.open(tmp_path / "be.npy", dtype=">f4")
    assert src.dtype == "float32"
    np.testing.assert_array_equal(fl.logsumexp(src), fl.logsumexp(x))
    with pytest.raises(TypeError, match="byte order, got >f8"):
        fl.open(tmp_path / "be.npy", dtype=">f8")
    np.save(tmp_path / "le.npy", x)
    with pytest.raises(TypeError, match="byte order, got >f4"):     # a native file: its dtype is '<f4'
        fl.open(tmp_path / "le.npy", dtype=">f4")


def test_big_endian_array_likes_and_blocks(rng):
    """Big-endian arrays behind the array-like interface, and big-endian row blocks (alone or after
    native ones), are their values, as in memory and in .npy files."""
    x = (rng.standard_normal((6, 77)) * 3).astype(np.float32)

    class Dataset:                    # what h5py offers: shape, dtype, slicing
        def __init__(self, a):
            self.a, self.shape, self.dtype = a, a.shape, a.dtype

        def __getitem__(self, key):
            return self.a[key]

    for dt in (">f4", ">f2", ">f8"):
        want = x.astype(dt).astype(np.dtype(dt).newbyteorder("="))
        be = x.astype(dt)
        for src in (Dataset(be), iter([be]), iter([want[:2], be[2:]])):
            np.testing.assert_array_equal(fl.logsumexp(src), fl.logsumexp(want))
        out = np.empty(x.shape, want.dtype)
        fl.softmax(Dataset(be), out=out)
        np.testing.assert_array_equal(out, fl.softmax(want))


def test_an_out_over_the_sources_logits_is_refused(rng):
    """A streamed map checks each block it reads against out: an out array sharing memory with a row block
    of an iterable or an array-like's slices (the same array, a shifted or reversed view) raises before
    any row is written, as in memory (an array in memory given out= is mapped in memory, where the same
    check runs); one over a later block raises when that block is read, saying rows of earlier blocks may
    already be in it. So does an out with a zero stride or a read-only one."""
    x = rng.standard_normal((8, 50)).astype(np.float32)
    buf = np.zeros((9, 50), np.float32)
    buf[:8] = x

    class Dataset:                   # an array-like whose slices are views of an array in memory
        def __init__(self, a):
            self.a, self.shape, self.dtype = a, a.shape, a.dtype

        def __getitem__(self, key):
            return self.a[key]

    cases = [(lambda: iter([x]), x, "row block 0", x), (lambda: iter([buf[:8]]), buf[1:], "row block 0", buf),
             (lambda: iter([x]), x[::-1], "row block 0", x),
             (lambda: Dataset(x), x, "rows 0:8 of the source", x), (lambda: Dataset(buf[:8]), buf[1:],
                                                                    "rows 0:8 of the source", buf)]
    for make, out, what, logits in cases:
        keep = logits.copy()
        for f in (fl.softmax, fl.log_softmax):
            with pytest.raises(ValueError, match=f"out overlaps {what}; the caller's logits are never"):
                f(make(), out=out)
            np.testing.assert_array_equal(logits, keep)
    later = x.copy()        # its rows 4: are the second block's logits
    with pytest.raises(ValueError, match="out overlaps row block 1: out must not share memory with the "
                                         "logits .the rows written for earlier blocks may already"):
        fl.softmax(iter([x[:4].copy(), later[4:]]), out=later)
    zero = np.lib.stride_tricks.as_strided(np.zeros(50, np.float32), (8, 50), (0, 4))
    with pytest.raises(ValueError, match="out overlaps itself"):
        fl.softmax(iter([x]), out=zero)
    ro = np.zeros_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        fl.softmax(iter([x]), out=ro)


def test_an_out_mapping_the_same_file_bytes_as_the_logits_is_refused(rng, tmp_path):
    """Two maps of one .npy (np.load(mmap_mode) twice) lie at different addresses, so np.shares_memory
    says they do not overlap; writing one writes the other. An out mapping the file bytes of the logits is
    refused as an out over the logits is, in memory, from an array source and from an iterable of blocks,
    and the file is left as it was (it was overwritten, rows reversed gave wrong probabilities: found by
    a streaming audit). Maps of other bytes of the file, or of another file, are fine."""
    x = rng.standard_normal((64, 700)).astype(np.float32)
    path = tmp_path / "logits.npy"
    np.save(path, x)
    calls = [lambda src: src, lambda src: fl.open(src, memory="64KiB"),
             lambda src: iter([src[i:i + 16] for i in range(0, 64, 16)])]
    for call in calls:
        for f in (fl.softmax, fl.log_softmax):
            for src in (np.load(path, mmap_mode="r")[::-1], np.load(path, mmap_mode="r")):
                out = np.load(path, mmap_mode="r+")
                with pytest.raises(ValueError, match="out overlaps"):
                    f(call(src), out=out)
                del out
                np.testing.assert_array_equal(np.load(path), x)
    # to another file; and the first half's rows to a map of the second half's bytes of the same file
    other = tmp_path / "out.npy"
    np.save(other, np.zeros_like(x))
    out = np.load(other, mmap_mode="r+")
    fl.log_softmax(np.load(path, mmap_mode="r"), out=out)
    np.testing.assert_array_equal(np.asarray(out), fl.log_softmax(x))
    half = np.load(path, mmap_mode="r")[:32]
    out = np.load(path, mmap_mode="r+")[32:]
    for call in calls:
        np.testing.assert_array_equal(np.asarray(fl.softmax(call(half), out=out)), fl.softmax(x[:32]))
    # an iterable whose later block maps bytes of out (file rows 24:32 are block 3 and out's first rows):
    # refused when that block comes (a mutation audit: np.shares_memory there let it write the logits)
    np.save(path, x)
    out = np.load(path, mmap_mode="r+")[24:56]
    blocks = iter([np.load(path, mmap_mode="r")[i:i + 8] for i in range(0, 32, 8)])
    with pytest.raises(ValueError, match="out overlaps row block 3"):
        fl.softmax(blocks, out=out)


def test_a_guarded_call_leaves_the_source_as_it_was(rng):
    """The overlap check of a map's out is the call's: after a refused softmax(out=the logits) the same
    source serves later calls (it refused every one), keeps no reference to any out, and a call in
    another thread is checked against its own out alone."""
    import gc
    import threading
    import weakref

    x = rng.standard_normal((8, 1000)).astype(np.float32)
    src = fl.open(x, memory="64KiB")
    with pytest.raises(ValueError, match="out overlaps rows 0:5 of the source"):
        fl.softmax(src, out=x)
    np.testing.assert_array_equal(fl.logsumexp(src), fl.logsumexp(x))
    out = np.empty_like(x)
    np.testing.assert_array_equal(fl.softmax(src, out=out), fl.softmax(x))
    gone = weakref.ref(out)
    del out
    gc.collect()
    assert gone() is None
    # one thread's refused out is not another's
    errors, results = [], []
    barrier = threading.Barrier(2)

    def refused():
        barrier.wait()
        for _ in range(20):
            try:
                fl.log_softmax(src, out=x)
                errors.append("an out over the logits was not refused")
            except ValueError as e:
                if "out overlaps" not in str(e):
                    errors.append(e)

    def fine():
        barrier.wait()
        try:
            for _ in range(20):
                results.append(fl.log_softmax(src, out=np.empty_like(x)))
        except Exception as e:     # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=refused), threading.Thread(target=fine)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 20
    for r in results:
        np.testing.assert_array_equal(r, fl.log_softmax(x))


def test_a_refused_call_leaves_an_iterable_source_readable(rng):
    """As for an array: a softmax of an iterable of blocks refused for an out over its first block has
    read nothing, and the next call reads the source, unchecked against that out (the source kept it and
    refused the next call's blocks, with no out at all: found by a concurrency audit), and the source keeps
    no reference to it. A later block over out is refused as it is read."""
    import gc
    import weakref

    x = rng.standard_normal((40, 300)).astype(np.float32)
    src = fl.open((x[i:i + 10] for i in range(0, 40, 10)), memory="64KiB")
    with pytest.raises(ValueError, match="out overlaps row block 0"):
        fl.softmax(src, out=x)
    np.testing.assert_array_equal(fl.logsumexp(src), fl.logsumexp(x))
    y = x.copy()
    src = fl.open((y[i:i + 10] for i in range(0, 40, 10)), memory="64KiB")
    out = np.empty_like(y)
    fl.softmax(src, out=out)
    np.testing.assert_array_equal(out, fl.softmax(x))
    gone = weakref.ref(out)
    del out
    gc.collect()
    assert gone() is None
    out = np.zeros_like(x)
    src = fl.open((out[i:i + 10] if i == 20 else x[i:i + 10] for i in range(0, 40, 10)), memory="64KiB")
    with pytest.raises(ValueError, match="out overlaps row block 2"):
        fl.softmax(src, out=out)


def test_one_dimensional_source(tmp_path, rng):
    x = rng.standard_normal(11).astype(np.float32)
    np.save(tmp_path / "one.npy", x)
    fl.softmax(fl.open(tmp_path / "one.npy"), out=tmp_path / "p.npy")
    p = np.load(tmp_path / "p.npy")
    assert p.shape == (11,)
    np.testing.assert_array_equal(p, fl.softmax(x))
    for reduction in ("none", "mean", "sum"):
        got = fl.cross_entropy(fl.open(tmp_path / "one.npy"), np.array(3), reduction=reduction)
        want = fl.cross_entropy(x, np.array(3), reduction=reduction)
        assert type(got) is type(want) and got == want


def test_maps_of_arrays_and_memmaps_to_a_path(tmp_path, rng):
    x = (rng.standard_normal((5, 301)) * 3).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert fl.log_softmax(mm, out=tmp_path / "a.npy") == str(tmp_path / "a.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), fl.log_softmax(x))
    fl.softmax(x[:, ::-1], out=tmp_path / "b.npy", dtype="bfloat16", temperature=0.5)
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy").view(BF16),
                                  fl.softmax(x[:, ::-1], dtype="bfloat16", temperature=0.5))


def test_outputs_that_cannot_be_written_leave_nothing(tmp_path, rng):
    np.save(tmp_path / "x.npy", rng.standard_normal((4, 9)).astype(np.float32))
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "folder.npy").mkdir()
    with pytest.raises(IsADirectoryError, match="folder.npy: is a folder"):
        fl.softmax(fl.open(tmp_path / "x.npy"), out=tmp_path / "folder.npy")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        fl.softmax(fl.open(tmp_path / "x.npy"), out=tmp_path / "nowhere" / "p.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.jsonl", "folder.npy", "x.npy"]
    res = _cli("topk", tmp_path / "x.npy", tmp_path / "folder.jsonl")
    assert "is a folder" in _one_line(res, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.jsonl", "folder.npy", "x.npy"]


def test_source_arguments_checked_when_opened(tmp_path, rng):
    np.save(tmp_path / "x.npy", rng.standard_normal((4, 9)).astype(np.float32))
    with pytest.raises(ValueError, match="memory must be a byte count"):
        fl.open(tmp_path / "x.npy", memory="12XB")
    with pytest.raises(ValueError, match="finite"):
        fl.set_memory_budget(float("inf"))
    (tmp_path / "r.bin").write_bytes(b"\0" * 60)
    with pytest.raises(TypeError, match="vocab must be a positive integer"):    # as threads=1.5
        fl.open(tmp_path / "r.bin", dtype="float32", vocab=7.5)
    with pytest.raises(ValueError, match="vocab must be a positive integer"):
        fl.open(tmp_path / "r.bin", dtype="float32", vocab=0)
    src = fl.open(tmp_path / "x.npy")
    src.close()
    with pytest.raises(ValueError, match="this source was closed"):
        fl.logsumexp(src)


def test_a_list_of_blocks_is_one_array(rng):
    """A list or tuple is an array to NumPy, so fastlogits reads it as one (README); a ragged one, most
    likely blocks meant to be streamed, says to pass an iterator (NumPy's bare message did not)."""
    x = rng.standard_normal((10, 9)).astype(np.float32)
    np.testing.assert_array_equal(fl.logsumexp([x[:5], x[5:]]), fl.logsumexp(np.stack([x[:5], x[5:]])))
    with pytest.raises(ValueError, match=r"logits: a list or tuple is read as one array.*iter\(blocks\)"):
        fl.logsumexp([x[:3], x[3:]])
    np.testing.assert_array_equal(fl.logsumexp(iter([x[:3], x[3:]])), fl.logsumexp(x))
    with pytest.raises(ValueError, match=r"chunk: a list or tuple is read as one array, and this one is "
                       r"ragged") as e:      # an accumulator's chunk cannot be an iterator: no advice
        LogSumExp(2).update([x[0, :3], x[0, :2]], 0)
    assert "iter(" not in str(e.value)


def test_blocks_that_disagree_with_the_first(rng):
    x = rng.standard_normal((2, 9)).astype(np.float32)
    with pytest.raises(SourceError, match="row block 1: expected float32"):
        fl.logsumexp(iter([x, x.astype(np.float64)]))

    class Wrong:                     # an array-like whose rows come back too short
        shape, dtype = (2, 9), np.dtype(np.float32)

        def __getitem__(self, key):
            return x[key][:, :5]
    with pytest.raises(SourceError, match=r"came back with shape \(2, 5\), expected \(2, 9\)"):
        fl.logsumexp(Wrong())


def test_streamed_results_keep_the_in_memory_dtypes(tmp_path, rng):
    x = rng.standard_normal((5, 9)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = np.empty(x.shape)                            # an out array sets the result's dtype, as in memory
    fl.softmax(fl.open(tmp_path / "x.npy"), out=out)
    np.testing.assert_array_equal(out, fl.softmax(x, out=np.empty(x.shape)))
    for dt in (np.float32, np.float64):
        np.save(tmp_path / "z.npy", np.zeros((0, 9), dt))
        for fn in (fl.top_k, fl.top_k_logprobs):
            got, want = fn(fl.open(tmp_path / "z.npy"), 2), fn(np.zeros((0, 9), dt), 2)
            assert got[0].dtype == want[0].dtype and got[0].shape == want[0].shape
        got = fl.sample(fl.open(tmp_path / "z.npy"), seed=1, return_logprobs=True)
        want = fl.sample(np.zeros((0, 9), dt), seed=1, return_logprobs=True)
        assert got[1].dtype == want[1].dtype


# ---- the command line ---------------------------------------------------------------------------------

def test_cli_strict_json_and_empty_inputs(tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((0, 7), np.float32))
    res = _cli("stats", tmp_path / "z.npy", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["rows"] == 0
    np.save(tmp_path / "inf.npy", np.full((2, 3), -np.inf, np.float32))
    np.save(tmp_path / "y.npy", np.array([-100, -100]))
    res = _cli("stats", tmp_path / "inf.npy", "--labels", tmp_path / "y.npy", "--json")
    s = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert s["mean_nll"] is None and s["counted_rows"] == 0
    res = _cli("topk", tmp_path / "inf.npy", tmp_path / "t.jsonl", "-k", "2")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
            for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert rows == [{"ids": [0, 1], "logprobs": [None, None]}] * 2
    # a mean NLL past 709 nats: perplexity inf (null in JSON), and no NumPy overflow warning on stderr
    x = np.zeros((2, 3), np.float32)
    x[:, 0] = -1000.0
    np.save(tmp_path / "far.npy", x)
    np.save(tmp_path / "y0.npy", np.array([0, 0]))
    res = _cli("stats", tmp_path / "far.npy", "--labels", tmp_path / "y0.npy")
    assert res.returncode == 0 and res.stderr == b"" and b"perplexity inf" in res.stdout, res.stderr
    res = _cli("stats", tmp_path / "far.npy", "--labels", tmp_path / "y0.npy", "--json")
    assert res.stderr == b"" and json.loads(res.stdout)["perplexity"] is None


def test_cli_errors_on_one_line(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    (tmp_path / "bad.txt").write_text("1\nabc\n")
    (tmp_path / "empty.txt").write_text("")
    cases = [
        (("stats", tmp_path / "x.npy", "--labels", tmp_path / "bad.txt"), "bad.txt: cannot read labels"),
        (("stats", tmp_path / "x.npy", "--labels", tmp_path / "empty.txt"), "0 labels for 2 rows"),
        (("stats", tmp_path / "x.npy", "--threads", "abc"), "--threads: expected an integer from 1 to 4096"),
        (("stats", tmp_path / "x.npy", "--threads", "0"), "--threads: expected an integer from 1 to 4096"),
        (("softmax", tmp_path / "x.npy", tmp_path / "p.npy", "--threads", "4097"),
         "--threads: expected an integer from 1 to 4096, got 4097"),
        (("stats", "-", "--dtype", "float32", "--vocab", "0"), "--vocab: expected a positive integer"),
        (("bench", "--repeat", "0"), "--repeat: expected a positive integer"),
        (("demo", "--rows", "0"), "--rows: expected a positive integer"),
        (("stats", tmp_path / "x.npy", "--backend", "tpu"), "invalid choice: 'tpu'"),
        (("info", tmp_path / "r.bin"), "no such file"),
    ]
    for args, message in cases:
        assert message in _one_line(_cli(*args, stdin=b"")), args
    (tmp_path / "r.bin").write_bytes(b"\0" * 12)
    assert "--dtype and --vocab" in _one_line(_cli("info", tmp_path / "r.bin"), 1)


def test_cli_passes_backend_and_memory_on_and_leaves_the_process_alone(tmp_path, rng):
    """Each command hands --backend and --memory to its own calls: main() changes no process-wide setting
    (it called set_backend and set_memory_budget, which outlived it in a caller's process), and a command
    whose help says it does not use --backend (info) runs with --backend gpu where there is no GPU."""
    from fastlogits.cli import main

    x = (rng.standard_normal((5, 300)) * 3).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    before = (fl.get_backend(), fl.get_memory_budget())
    assert main(["softmax", str(tmp_path / "x.npy"), str(tmp_path / "p.npy"), "--backend", "cpu",
                 "--memory", "64KiB"]) == 0
    assert main(["topk", str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), "-k", "3", "--backend", "cpu",
                 "--memory", "64KiB"]) == 0
    assert (fl.get_backend(), fl.get_memory_budget()) == before
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), ref.softmax(x), rtol=2e-6, atol=1e-12)
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy")["ids"], np.argsort(-x, axis=1)[:, :3])
    if fl._config.gpu_unavailable_reason() is not None:
        assert main(["info", str(tmp_path / "x.npy"), "--backend", "gpu"]) == 0
        res = _cli("topk", tmp_path / "x.npy", tmp_path / "g.npy", "-k", "3", "--backend", "gpu")
        assert res.returncode == 1 and b"gpu" in res.stderr.lower(), res.stderr
        assert not (tmp_path / "g.npy").exists()


def test_cli_demo_with_a_tiny_vocabulary():
    res = _cli("demo", "--rows", "10", "--vocab", "3", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["vocab"] == 3


def test_cli_demo_budget_and_sample_progress(tmp_path, rng):
    """demo's help gives its own default budget (64MiB, not the 256MiB of the other commands) and a small
    budget prints as such (64KiB printed as "0 MiB"); sample's progress callback counts every row, of row
    blocks and of rows wider than the budget (the bar never moved); sample and topk refuse an output name
    before they read the input. Found by a new-user audit."""
    from fastlogits.ops.sampling import sample_source

    help_text = _cli("demo", "--help").stdout.decode()
    assert "default: 64MiB" in " ".join(help_text.split())
    res = _cli("demo", "--rows", "20", "--vocab", "50", "--memory", "64KiB")
    assert res.returncode == 0 and b"with a 64 KiB budget" in res.stdout, res.stdout
    from fastlogits.cli import _binary_size

    # no exponent at 1000-1023 of a unit (it printed 1e+03 MiB)
    assert [_binary_size(n) for n in (512, 1000 << 20, 1023 << 10, 2048 << 30, 3 << 19)] == \
        ["512 B", "1000 MiB", "1023 KiB", "2048 GiB", "1.50 MiB"]
    x = rng.standard_normal((6, 40000)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    for memory in ("16MiB", "64KiB"):           # one block of rows; rows wider than the budget
        seen = []
        tok = sample_source(fl.open(tmp_path / "x.npy", memory=memory), 1.0, None, 0.9, None, 5, 1, False,
                            dict(softcap=None, backend=None, threads=None, chunk_size=None),
                            progress=lambda rows, nbytes, seen=seen: seen.append((rows, nbytes)))
        assert sum(r for r, _ in seen) == 6 and sum(b for _, b in seen) == x.nbytes, (memory, seen)
        np.testing.assert_array_equal(tok, fl.sample(x, top_p=0.9, seed=5))
    for cmd in ("sample", "topk"):       # a usage error, found before the input is read (exit 2)
        err = _one_line(_cli(cmd, tmp_path / "missing.npy", tmp_path / "out.txt"), rc=2)
        assert "argument output: expected a name ending in .npy, .csv or .jsonl" in err, err
        err = _one_line(_cli(cmd, tmp_path / "missing.npy", ""), rc=2)
        assert "argument output: expected a name ending in .npy, .csv or .jsonl" in err, err


# ---- from a review of the above -------------------------------------------------------------------

def test_accumulators_take_float64_temperatures_and_check_float32_chunks(rng):
    x = rng.standard_normal((2, 40))
    acc = LogSumExp(2, temperature=1e-300).update(x[:, :20], 0).update(x[:, 20:], 20)
    np.testing.assert_array_equal(acc.result(), fl.logsumexp(x, temperature=1e-300))
    acc = LogSumExp(2, temperature=1e-300)
    with pytest.raises(ValueError, match="outside float32's range"):
        acc.update(x.astype(np.float32), 0)
    assert acc.columns == 0 and acc.ranges == [] and np.all(acc.m == -np.inf)   # nothing was folded


def test_a_refused_merge_changes_nothing(rng):
    x = rng.standard_normal((2, 10))
    y = np.array([1, 8])
    for make in (lambda: LogSumExp(2), lambda: CrossEntropy(y)):
        a, b = make().update(x[:, :6], 0), make().update(x[:, 4:], 4)
        before = a.state
        with pytest.raises(ValueError, match="columns 4:6 were already folded in"):
            a.merge(b)
        after = a.state
        for u, v in zip(before, after):
            np.testing.assert_array_equal(u, v)
        assert a.ranges == [(0, 6)] and a.columns == 6
        a.update(x[:, 6:], 6)                              # and it goes on as if nothing happened
        if isinstance(a, LogSumExp):
            np.testing.assert_allclose(a.result(), fl.logsumexp(x), rtol=1e-12)
        else:
            assert a.result() == pytest.approx(float(fl.cross_entropy(x, y)), rel=1e-12)


def _open_fds():
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None


def test_a_map_of_standard_input_cut_short_leaves_nothing(tmp_path, rng):
    x = rng.standard_normal((2, 50000)).astype(np.float32)
    before = _open_fds()
    src = StdinSource("float32", 50000, stream=io.BytesIO(x.tobytes()[:-12]))
    src.memory = "64KiB"
    with pytest.raises(SourceError, match="not a whole number of rows"):
        fl.softmax(src, out=tmp_path / "p.npy")
    assert _open_fds() == before
    assert list(tmp_path.iterdir()) == []


def test_streamed_calls_check_the_backend():
    if "gpu" in fl.available_backends():
        pytest.skip("this machine has a GPU")
    for op in (lambda s: fl.logsumexp(s, backend="gpu"), lambda s: fl.cross_entropy(s, [0, 1], backend="gpu"),
               lambda s: fl.softmax(s, out=np.empty((2, 40000)), backend="gpu")):
        with pytest.raises(RuntimeError, match="backend 'gpu' is not available"):
            op(iter([np.zeros((2, 40000))]))


def test_an_out_array_must_match_a_read_once_source(rng):
    x = rng.standard_normal((3, 5)).astype(np.float32)
    with pytest.raises(ValueError, match="out has 2 rows, but the source has more"):
        fl.softmax(iter([x]), out=np.empty((2, 5), np.float32))
    with pytest.raises(ValueError, match="out has 4 rows, but the source had 3"):
        fl.softmax(iter([x]), out=np.empty((4, 5), np.float32))


def test_an_iterable_of_torch_blocks(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((4, 30)).astype(np.float32)
    t = torch.from_numpy(x).to(torch.bfloat16)
    got = fl.logsumexp(iter([t[:3], t[3:]]))
    np.testing.assert_array_equal(got, fl.logsumexp(t.float().numpy().astype(BF16)))


def test_strict_json():
    from fastlogits import _json

    text = _json.dumps({"a": np.float32("nan"), "b": [np.inf, 1.5], "c": np.int64(3),
                        "d": np.array([-np.inf]), "e": np.bool_(True)})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": 3, "d": [None], "e": True}


def test_per_row_output_suffixes_in_any_case(tmp_path, rng):
    np.save(tmp_path / "x.npy", rng.standard_normal((3, 9)).astype(np.float32))
    res = _cli("topk", tmp_path / "x.npy", tmp_path / "t.CSV", "-k", "2")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "t.CSV").read_text().splitlines()[0] == "ids_0,ids_1,logprobs_0,logprobs_1"


def test_a_refused_merge_of_a_malformed_state_changes_nothing(rng):
    x = rng.standard_normal((2, 10))
    a = CrossEntropy(np.array([1, 8])).update(x[:, :6], 0)
    before = a.state
    bad = CrossEntropy(np.array([1, 8])).update(x[:, 6:], 6).state
    for columns in (None, -4, 2.5):
        with pytest.raises(ValueError, match="columns must be a non-negative integer"):
            a.merge(bad._replace(columns=columns))
        for u, v in zip(before, a.state):
            np.testing.assert_array_equal(u, v)


def test_streamed_maps_into_outs_whose_rows_do_not_merge(tmp_path, rng):
    """An out whose leading axes do not merge into rows is written row by row (a reshaped copy would
    never reach it); V = 0 works too."""
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = np.zeros((3, 2, 6), np.float32).transpose(1, 0, 2)
    fl.softmax(fl.open(tmp_path / "x.npy", memory="64KiB"), out=out)
    np.testing.assert_array_equal(out, fl.softmax(x))
    empty = np.empty((2, 0), np.float32)
    assert fl.softmax(iter([np.zeros((2, 0), np.float32)]), out=empty) is empty
    with pytest.raises(ValueError, match="out must have the source's shape"):
        fl.softmax(iter([np.zeros((2, 4), np.float32)]), out=np.empty((2, 5), np.float32))


def test_strict_json_of_bfloat16_scalars():
    from fastlogits import _json

    v = np.array([1.5, np.nan], BF16)
    assert json.loads(_json.dumps({"v": v[0], "w": v[1]})) == {"v": 1.5, "w": None}


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130), ("SIGHUP", 129)])
def test_a_killed_command_leaves_no_file(tmp_path, rng, sig, code):
    """`fastlogits softmax` stopped by SIGTERM (what kill, timeout and job schedulers send), Ctrl-C or
    SIGHUP (a closed terminal, a dropped ssh session: it left the partial file, found by an audit) in
    the middle of a dump read from standard input, whose writer stalls with the pipe open: the work
    unwinds at once (the read blocked on the pipe is left to the reader thread), the temporary output is
    removed, and the exit status is 128 + the signal's number. (SIGTERM used to kill it on the spot,
    leaving the partial file; then, handled, it waited for the stalled read.)"""
    x = rng.standard_normal((64, 1000)).astype(np.float32)
    proc = subprocess.Popen([sys.executable, "-m", "fastlogits", "softmax", "-", str(tmp_path / "p.npy"),
                             "--dtype", "float32", "--vocab", "1000", "--memory", "64KiB"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            # as started from a terminal: a test run in the background of a script (cmd &)
                            # inherits SIGINT ignored, and an ignored signal stays ignored in the child
                            preexec_fn=lambda: [signal.signal(getattr(signal, s), signal.SIG_DFL)
                                                for s in ("SIGINT", "SIGTERM", "SIGHUP")])
    try:
        proc.stdin.write(x.tobytes())             # some rows, and the pipe left open: the writer stalls
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]:
            assert time.monotonic() < deadline and proc.poll() is None, "the command never started writing"
            time.sleep(0.05)
        time.sleep(0.2)                           # into the read that waits for more rows
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{sig} did not stop the command while its input stalled")
    finally:
        proc.kill()
        proc.stdin.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.returncode == code, err
    assert os.listdir(tmp_path) == [], "a partial output was left"
    assert err.strip().endswith(("terminated", "interrupted", "hung up"))


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
def test_an_ignored_sigterm_stays_ignored(tmp_path, rng):
    """A command started with SIGTERM ignored (trap '' TERM, nohup-like wrappers) keeps running."""
    x = rng.standard_normal((64, 1000)).astype(np.float32)
    proc = subprocess.Popen([sys.executable, "-m", "fastlogits", "softmax", "-", str(tmp_path / "p.npy"),
                             "--dtype", "float32", "--vocab", "1000"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
    proc.stdin.write(x[:32].tobytes())
    proc.stdin.flush()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(x[32:].tobytes(), timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), fl.softmax(x), rtol=1e-6, atol=1e-30)


# ---- pipes, odd headers and paths, row numbers of streamed errors (found by an audit agent) ------------

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_pipe_given_by_its_path_is_read_as_standard_input(tmp_path, rng):
    """A FIFO, /dev/stdin or a shell's <(zcat dump.gz) holds raw rows read once, in order, as "-" does
    (it was sized as a 0-byte file: 0 rows and a zero exit; a FIFO hung). A .npy or .safetensors name is
    refused: those are read at offsets."""
    import threading

    x = rng.standard_normal((37, 300)).astype(np.float32)
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    got = []

    def read():
        src = fl.open(fifo, dtype="float32", vocab=300, memory="64KiB")   # opened at the first read
        got.extend([fl.logsumexp(src), src])

    # daemon threads: a regression hangs them (a FIFO opened twice waits for a second writer), not the run
    writer = threading.Thread(target=lambda: fifo.write_bytes(x.tobytes()), daemon=True)
    reader = threading.Thread(target=read, daemon=True)
    writer.start()
    reader.start()
    reader.join(60)
    assert got, "reading the FIFO hung"
    np.testing.assert_array_equal(got[0], fl.logsumexp(x))
    assert got[1].format == "pipe" and got[1].rows == 37
    assert got[1].stream.closed                      # at the end of its pass (it stayed open)
    # a bad end closes it too; and a pipe's source is a context manager, as a file's
    writer = threading.Thread(target=lambda: fifo.write_bytes(x.tobytes() + b"12345"), daemon=True)
    writer.start()
    with fl.open(fifo, dtype="float32", vocab=300) as src:
        with pytest.raises(SourceError, match=r"rows\.fifo: 44405 bytes is not a whole number of rows"):
            fl.entropy(src)
        assert src.stream.closed
    writer.join(60)
    with pytest.raises(SourceError, match=r"rows\.fifo needs dtype= and vocab="):
        fl.open(fifo)
    os.mkfifo(tmp_path / "d.npy")
    with pytest.raises(SourceError, match=r"d\.npy: expected a regular file .* found a pipe or device"):
        fl.open(tmp_path / "d.npy")
    res = subprocess.run([sys.executable, "-m", "fastlogits", "stats", "/dev/stdin", "--dtype", "float32",
                          "--vocab", "300", "--json"], input=x.tobytes(), capture_output=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["rows"] == 37


def test_npy_headers_with_negative_dimensions_are_refused(tmp_path):
    """np.load refuses them; fastlogits read rows = -4 and returned an empty result (found by an audit
    agent)."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (-4, 6), }"
    header += " " * (117 - len(header)) + "\n"
    (tmp_path / "neg.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little")
                                       + header.encode() + bytes(96))
    with pytest.raises(SourceError, match=r"neg\.npy: not a valid \.npy file \(a negative dimension"):
        fl.open(tmp_path / "neg.npy")


def test_odd_paths_headers_and_iterables_give_clear_errors(tmp_path, rng):
    x = rng.standard_normal((4, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.testing.assert_array_equal(fl.logsumexp(fl.open(os.fsencode(tmp_path / "x.npy"))), fl.logsumexp(x))
    for dt in (np.float32, np.float64):              # the message named float16 for every float
        np.save(tmp_path / "f.npy", x.astype(dt))
        with pytest.raises(SourceError, match=f"but the values are {np.dtype(dt).name}$"):
            fl.open(tmp_path / "f.npy", dtype="bfloat16")
    deep = b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    (tmp_path / "deep.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    with pytest.raises(SourceError, match="corrupt safetensors header .* nested too deep"):
        fl.open(tmp_path / "deep.safetensors")
    with pytest.raises(SourceError, match=r"an empty one, \(0, V\), says it"):
        fl.logsumexp(iter([]))
    np.testing.assert_array_equal(fl.logsumexp(iter([np.empty((0, 6), np.float32), x])), fl.logsumexp(x))
    assert fl.logsumexp(iter([np.empty((0, 6), np.float32)])).shape == (0,)


def test_a_one_dimensional_array_like_indexed_by_slices_only(rng):
    """h5py and zarr index with ints and slices only (no None): a 1-D one is one row."""
    x = rng.standard_normal(5000).astype(np.float32)

    class Dataset:
        shape, dtype = x.shape, x.dtype

        def __getitem__(self, key):
            keys = key if isinstance(key, tuple) else (key,)
            if not all(isinstance(k, (int, slice)) for k in keys):
                raise TypeError(f"only ints and slices, got {key!r}")
            return x[key]

    np.testing.assert_allclose(fl.logsumexp(Dataset()), fl.logsumexp(x), rtol=1e-6)
    old = fl.get_memory_budget()
    fl.set_memory_budget("64KiB")                   # a row wider than the budget: column chunks
    try:
        np.testing.assert_allclose(fl.entropy(Dataset()), fl.entropy(x), rtol=1e-5)
    finally:
        fl.set_memory_budget(old)


@pytest.mark.parametrize("budget", ["64KiB", "1MiB"])
def test_streamed_errors_name_the_row_in_the_whole_source(tmp_path, rng, budget):
    """A bad label or per-row temperature is found before the pass and named by its row in the source,
    as in memory (blocks counted rows from their own first: row 2 for row 50; rows wider than the budget
    were each row 0)."""
    x = rng.standard_normal((100, 1000)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    src = lambda: fl.open(tmp_path / "x.npy", memory=budget)      # noqa: E731
    lab = rng.integers(0, 1000, 100)
    for bad in (1000, -5):
        lab[50] = bad
        with pytest.raises(IndexError, match=f"label {bad} at row 50 is out of range"):
            fl.cross_entropy(src(), lab)
    t = np.ones(100)
    t[50] = -1.0
    for call in (lambda: fl.logsumexp(src(), temperature=t), lambda: fl.entropy(src(), temperature=t),
                 lambda: fl.softmax(src(), temperature=t, out=tmp_path / "p.npy")):
        with pytest.raises(ValueError, match=r"got -1\.0 \(row 50\)"):
            call()
    assert sorted(os.listdir(tmp_path)) == ["x.npy"]
    wide = rng.standard_normal((3, 20000)).astype(np.float32)
    np.save(tmp_path / "w.npy", wide)
    with pytest.raises(IndexError, match="label 20000 at row 2 is out of range"):
        fl.cross_entropy(fl.open(tmp_path / "w.npy", memory="64KiB"), [0, 1, 20000])


def test_an_out_mapping_the_file_being_read_is_refused(tmp_path, rng):
    """An out over a map of the dump being read (a memmap, a plain array viewing one, any part of the
    file) is refused before anything is written (a plain array over the map was written into the file
    being read: wrong rows, a rewritten input)."""
    x = rng.standard_normal((10, 100)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    p = tmp_path / "x.npy"
    maps = [np.load(p, mmap_mode="r+"),
            np.asarray(np.memmap(p, np.float32, "r+", offset=128, shape=(10, 100))),
            np.asarray(np.memmap(p, np.float16, "r+", offset=128 + 2000, shape=(10, 100)))]
    for mm in maps:
        with pytest.raises(ValueError, match="out overlaps the file being read"):
            fl.softmax(fl.open(p, memory="64KiB"), out=mm, dtype=mm.dtype)
        np.testing.assert_array_equal(np.load(p), x)
    other = np.lib.format.open_memmap(tmp_path / "o.npy", mode="w+", dtype=np.float32, shape=x.shape)
    fl.softmax(fl.open(tmp_path / "x.npy"), out=other)                     # another file's map is fine
    np.testing.assert_array_equal(other, fl.softmax(x))


@pytest.mark.parametrize("cmd", [["topk", "-", "{out}", "-k", "3"], ["sample", "-", "{out}"],
                                 ["stats", "-", "--per-row", "{out}"]])
def test_commands_check_their_output_folder_before_the_pass(tmp_path, cmd):
    """A missing output folder is an error before any input is read (it came after the whole pass, with
    the dump lost when it came through a pipe): standard input is left open and unwritten here."""
    out = str(tmp_path / "nodir" / "t.jsonl")
    args = [a.format(out=out) for a in cmd] + ["--dtype", "float32", "--vocab", "10"]
    proc = subprocess.Popen([sys.executable, "-m", "fastlogits", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=60)         # (communicate() would close standard input: an empty dump)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the command waited for its input before checking where its output goes")
    finally:
        proc.stdin.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.returncode == 1 and b"no such folder" in err, err


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7), (7,)])
def test_streamed_arguments_are_checked_as_in_memory(tmp_path, rng, shape):
    """A source's temperature and labels are checked as the in-memory functions check them: the same
    exception and message (bool or string temperatures were taken or gave NumPy's message, a (1, 3)
    temperature of a (2, 3, V) source was refused, labels=3 was a TypeError). An iterable's rows are
    counted as it is read: its per-row values must be 1-D, and the same exception type is raised."""
    x = rng.standard_normal(shape).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    temps = [np.array([True] * 5), np.array(["a"] * 5), np.ones((1, 3)), -1.0, np.array([1, 1, -1, 1, 1.0]),
             "x", None, np.ones((5, 1)), np.ones(4), np.full(5, 1e-40), np.nan, np.array([[1, 1, -2.0]]),
             np.array([0.5]), np.array([-0.5]), np.array(["a"])]
    labels = [3, np.array([0, 1, 2, 7, 1]), np.array([0, 1, 2, -5, 1]), np.full(5, 0.5), np.ones(5, bool),
              np.zeros((1, 5), int), np.zeros(4, int), np.zeros((2, 3), int),
              np.array([[0, 1, 9], [1, 1, 1]])]

    def outcome(f, *args, **kw):
        try:
            f(*args, **kw)
        except (TypeError, ValueError, IndexError) as e:
            return type(e), str(e)
        return None, None

    sources = [lambda: fl.open(tmp_path / "x.npy", memory="64KiB")]
    if len(shape) == 2:
        sources.append(lambda: iter([x]))
    for k, source in enumerate(sources):
        for t in temps:
            want = outcome(fl.logsumexp, x, temperature=t)
            got = outcome(fl.logsumexp, source(), temperature=t)
            assert got[0] is want[0] and (k or got == want), (t, want, got)
        for y in labels:
            want, got = outcome(fl.cross_entropy, x, y), outcome(fl.cross_entropy, source(), y)
            assert got[0] is want[0] and (k or got == want), (y, want, got)


@pytest.mark.parametrize("t", [np.array([0.5]), np.array([3], np.int64), [2.0]])
def test_a_one_value_temperature_broadcasts_over_an_iterables_rows(rng, t):
    """A one-element temperature broadcasts over the rows, as in memory, for an iterable too (whose rows
    are counted as they are read: it said "temperature has 1 values, but the source has more rows")."""
    x = rng.standard_normal((7, 11)) * 5
    x[2, 3] = -np.inf
    blocks = [x[:3], x[3:4], x[4:]]
    scale = float(np.reshape(t, ()))
    want = ref.logsumexp(x, temperature=scale)
    np.testing.assert_allclose(fl.logsumexp(iter(blocks), temperature=t), want, rtol=1e-13)
    np.testing.assert_allclose(fl.entropy(iter(blocks), temperature=t), ref.entropy(x, temperature=scale),
                               rtol=1e-12, atol=1e-14)     # absolute near 0: sums of -p log p
    y = rng.integers(0, 11, 7)
    np.testing.assert_allclose(fl.cross_entropy(iter(blocks), y, temperature=t, reduction="none"),
                               ref.cross_entropy(x, y, temperature=scale, reduction="none"), rtol=1e-12)


@pytest.mark.parametrize("kw", [{"temperature": np.array([0.7])}, {"top_k": np.array([3])},
                                {"top_p": [0.5]}, {"min_p": np.array([0.1])}], ids=str)
def test_a_one_value_sampling_argument_broadcasts_over_an_iterables_rows(rng, kw):
    """sample()'s per-row arguments with one value draw the same tokens from an iterable as in memory
    (they were refused: "... has 1 values, but the source has more rows")."""
    x = (rng.standard_normal((9, 40)) * 3).astype(np.float32)
    want = fl.sample(x, seed=5, num_samples=2, **kw)
    assert want.shape == (9, 2)
    np.testing.assert_array_equal(fl.sample(iter([x[:4], x[4:5], x[5:]]), seed=5, num_samples=2, **kw), want)


def test_output_names_that_cannot_be_written(tmp_path):
    """An empty output name, or one under a file, is refused before any work (an empty name put the
    temporary output in the parent folder and failed after the pass)."""
    from fastlogits.stream.run import check_output_path

    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="the output's name is empty"):
        check_output_path("")
    with pytest.raises(NotADirectoryError, match="afile is a file, not a folder"):
        check_output_path(str(tmp_path / "afile" / "out.npy"))
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    res = _cli("softmax", tmp_path / "x.npy", "")         # a usage error (exit 2)
    assert "argument output: expected the name of a file (or - for standard output), got an empty name" \
        in _one_line(res, rc=2)


def test_memory_budgets_of_any_real_number_type():
    from fractions import Fraction

    from fastlogits.stream.run import parse_memory

    assert parse_memory(Fraction(2**20)) == parse_memory(np.float32(2**20)) == parse_memory(np.uint64(2**20))
    # a string in exponent notation is the number it reads as, with or without a unit
    assert parse_memory("1e9") == parse_memory(1e9) == 10**9 and parse_memory(" 2.5E+2 MiB") == 250 * 2**20
    for bad in ("1e", "e9", "1e9.5", "1e-", "1 e9"):
        with pytest.raises(ValueError, match="byte count such as"):
            parse_memory(bad)
    for bad, match in ((10**400, "finite"), (float("nan"), "finite"), (-1, "at least 64 KiB"),
                       ("64kb", r"at least 64 KiB \(65536 bytes\), got '64kb' \(64000 bytes\)")):
        with pytest.raises(ValueError, match=match):
            parse_memory(bad)


def test_an_output_that_is_the_file_being_read_is_refused(tmp_path, rng):
    """softmax to the input's own path (or a hard or symbolic link to it, or the file behind a memmap
    given as logits) replaced the dump with its softmax, silently; so did the command line, and topk,
    sample and stats --per-row would have written their results over it (found by an audit agent)."""
    x = rng.standard_normal((4, 10)).astype(np.float32)
    p = tmp_path / "e.npy"
    np.save(p, x)
    os.link(p, tmp_path / "hard.npy")
    os.symlink(p, tmp_path / "soft.npy")
    for out in (p, tmp_path / "hard.npy", tmp_path / "soft.npy"):
        with pytest.raises(ValueError, match="is the file being read"):
            fl.softmax(fl.open(p), out=out)
    with pytest.raises(ValueError, match="is the file being read"):
        fl.log_softmax(np.load(p, mmap_mode="r"), out=p)
    x.tofile(tmp_path / "e.bin")
    with pytest.raises(ValueError, match="is the file being read"):
        fl.softmax(fl.open(tmp_path / "e.bin", dtype="float32", vocab=10), out=tmp_path / "e.bin")
    np.save(tmp_path / "e2.npy", x)
    for args in (["softmax", p, p], ["topk", tmp_path / "e2.npy", tmp_path / "e2.npy"],
                 ["sample", p, tmp_path / "hard.npy"],
                 ["stats", tmp_path / "e2.npy", "--per-row", tmp_path / "e2.npy"]):
        assert "is the file being read" in _one_line(_cli(*args))
    np.testing.assert_array_equal(np.load(p), x)
    np.testing.assert_array_equal(np.load(tmp_path / "e2.npy"), x)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "e.bin", np.float32).reshape(4, 10), x)


def test_open_declares_2_byte_logits_in_memory_as_bfloat16(rng):
    """API.md's "2-byte data declared dtype='bfloat16'" for logits already in memory or made by code:
    fastlogits.open takes an array-like or an iterable of row blocks as well as a path (found missing by
    an audit agent: only files could be declared)."""
    x = (rng.standard_normal((6, 300)) * 4).astype(BF16)
    bits = x.view(np.uint16)
    want_lse, want_ce = fl.logsumexp(x), fl.cross_entropy(x, np.arange(6), reduction="none")
    for src in (lambda: fl.open(bits, dtype="bfloat16", memory="64KiB"),
                lambda: fl.open(bits.view(np.int16), dtype="bfloat16"),
                lambda: fl.open(bits.view("V2"), dtype="bfloat16"),
                lambda: fl.open(iter([bits[:2], bits[2:]]), dtype="bfloat16", vocab=300),
                lambda: fl.open(bits.astype(">u2"), dtype="bfloat16")):
        assert src().dtype == "bfloat16"
        np.testing.assert_array_equal(fl.logsumexp(src()), want_lse)
        np.testing.assert_array_equal(fl.cross_entropy(src(), np.arange(6), reduction="none"), want_ce)
        np.testing.assert_array_equal(fl.sample(src(), seed=3, top_k=20), fl.sample(x, seed=3, top_k=20))
    out = np.empty((6, 300), np.float32)
    fl.softmax(fl.open(bits, dtype="bfloat16"), out=out)
    np.testing.assert_array_equal(out, fl.softmax(x, dtype=np.float32))
    np.testing.assert_array_equal(fl.entropy(fl.open([[0.0, 1.0], [2.0, 2.0]])),
                                  fl.entropy(np.array([[0.0, 1.0], [2.0, 2.0]])))
    with pytest.raises(SourceError, match="dtype='float16' was given, but the logits are float32"):
        fl.open(np.zeros((2, 3), np.float32), dtype="float16")
    with pytest.raises(SourceError, match="vocab=4 was given, but the rows hold 3 values"):
        fl.open(iter([np.zeros((2, 3), np.float32)]), vocab=4)
    with pytest.raises(SourceError, match="tensor= .* names a tensor of a .safetensors file"):
        fl.open(np.zeros((2, 3), np.float32), tensor="logits")
    with pytest.raises(SourceError, match="re-declares raw 2-byte data .* the values are float32"):
        fl.open(np.zeros((2, 3), np.float32), dtype="bfloat16")
    with pytest.raises(TypeError, match="takes a path, an array-like or an iterable of row blocks"):
        fl.open(5)


def test_cross_entropy_accumulator_checks_options_as_cross_entropy():
    """The accumulator refuses what fastlogits.cross_entropy refuses, with the same errors."""
    x, y = np.zeros((2, 3)), np.array([0, 1])
    for kw, err, match in [(dict(z_loss=-1.0), ValueError, "z_loss must be a finite float >= 0"),
                           (dict(z_loss=np.nan), ValueError, "z_loss must be a finite float >= 0"),
                           (dict(ignore_index=1.5), TypeError, "ignore_index must be an integer"),
                           (dict(label_smoothing="a"), TypeError, "label_smoothing must be a float"),
                           (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
                           (dict(reduction="avg"), ValueError, "reduction must be 'none', 'mean' or 'sum'"),
                           (dict(weight="abc"), TypeError, "weight must be an array of floats")]:
        with pytest.raises(err, match=match):
            fl.cross_entropy(x, y, **kw)
        with pytest.raises(err, match=match):
            CrossEntropy(y, **kw)


def test_accumulator_sizes_are_checked_as_the_functions_check_them():
    """A float where an integer belongs is a TypeError (as fastlogits.top_k's k), a negative one a
    ValueError."""
    for make, err in [(lambda: LogSumExp(2.0), TypeError), (lambda: Entropy(-1), ValueError),
                      (lambda: TopK(2, 1.5), TypeError), (lambda: TopK(2, -1), ValueError),
                      (lambda: TopK(2, True), TypeError)]:
        with pytest.raises(err, match="must be a"):
            make()
    with pytest.raises(TypeError, match="k must be a non-negative integer"):
        fl.top_k(np.zeros((2, 3)), 1.5)


def test_every_source_gives_its_rows_in_blocks(tmp_path, rng):
    """blocks(max_rows), the sources' documented way to be read in order, for each kind of source."""
    x = rng.standard_normal((11, 7)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    x.tofile(tmp_path / "x.raw")
    sources = [fl.open(tmp_path / "x.npy"), fl.open(tmp_path / "x.raw", dtype="float32", vocab=7),
               fl.open(x), fl.open(iter([x[:4], x[4:]]))]
    for src in sources:
        got = [np.array(b) for b in src.blocks(3)]
        assert all(1 <= b.shape[0] <= 3 for b in got), [b.shape for b in got]
        np.testing.assert_array_equal(np.concatenate(got), x, err_msg=type(src).__name__)


def test_cli_output_dash_is_standard_output(tmp_path, rng):
    """An output named - goes to standard output (raw rows for softmax, JSON lines for per-row results),
    the summary to standard error; it used to make a file named '-'."""
    x = (rng.standard_normal((7, 20000)) * 3).astype(np.float32)
    y = rng.integers(0, 20000, 7)
    np.save(tmp_path / "x.npy", x)
    x.tofile(tmp_path / "x.raw")
    np.save(tmp_path / "y.npy", y)
    for memory in ("256MiB", "64KiB"):       # rows in blocks, and rows wider than the budget
        res = _cli("softmax", tmp_path / "x.npy", "-", "--log", "--memory", memory)
        assert res.returncode == 0 and b"wrote the log-softmax of 7 rows to standard output" in res.stderr
        got = np.frombuffer(res.stdout, np.float32).reshape(x.shape)
        np.testing.assert_allclose(got, ref.log_softmax(x), rtol=0, atol=1e-5)
        res = _cli("topk", tmp_path / "x.npy", "-", "-k", "3", "--memory", memory)
        assert res.returncode == 0, res.stderr
        lines = [json.loads(line) for line in res.stdout.decode().splitlines()]
        lp, idx = ref.top_k_logprobs(x, 3)
        assert [d["ids"] for d in lines] == idx.tolist()
        np.testing.assert_allclose([d["logprobs"] for d in lines], lp, rtol=0, atol=1e-5)
    res = _cli("stats", tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--per-row", "-")
    assert res.returncode == 0 and b"mean NLL" in res.stderr
    rows = [json.loads(line) for line in res.stdout.decode().splitlines()]
    np.testing.assert_allclose([d["nll"] for d in rows], ref.cross_entropy(x, y, reduction="none"), rtol=1e-5)
    res = _cli("sample", tmp_path / "x.npy", "-", "--seed", "5")
    assert [json.loads(line)["token"] for line in res.stdout.decode().splitlines()] == \
        fl.sample(x, seed=5).tolist()
    assert not (tmp_path / "-").exists() and not os.path.exists("-")
    # --json would share standard output with the results: refused before any work
    err = _one_line(_cli("topk", tmp_path / "x.npy", "-", "--json"), rc=2)
    assert "--json prints the summary on standard output" in err
    # named by its command, as every other option's error (it said "fastlogits: error", "fastlogits --help")
    assert err.startswith("fastlogits topk: error: ") and err.endswith("(see fastlogits topk --help)\n"), err
    # standard output appended to the file being read
    with open(tmp_path / "x.raw", "ab") as out:
        res = subprocess.run([sys.executable, "-m", "fastlogits.cli", "softmax", str(tmp_path / "x.raw"), "-",
                              "--dtype", "float32", "--vocab", "20000"], stdout=out, stderr=subprocess.PIPE)
    assert res.returncode == 1 and b"standard output: is the file being read" in res.stderr
    assert os.path.getsize(tmp_path / "x.raw") == x.nbytes


def test_a_failure_while_the_output_is_opened_leaves_no_partial_file(tmp_path, rng, monkeypatch):
    """A full disk (or Ctrl-C) while the .npy header is written: the temporary file is removed too (the
    output's __exit__ never runs for a failure in its __enter__)."""
    import errno

    from fastlogits.stream import run

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run, "_write_npy_header", full)
    x = rng.standard_normal((3, 50)).astype(np.float32)
    with pytest.raises(OSError, match="No space left"):
        fl.softmax(fl.open(x), out=str(tmp_path / "p.npy"))
    assert os.listdir(tmp_path) == []


def test_a_corrupt_npy_header_length_is_refused_before_it_is_read(tmp_path):
    """A version 2 .npy header claiming 4 GiB is refused at once (NumPy would read all of it before its
    own size check), and a header of normal size in any version still opens."""
    import tracemalloc

    bad = tmp_path / "bad.npy"
    with open(bad, "wb") as f:
        f.write(b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**32 - 1) + b"{}")
        f.truncate(64 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(SourceError, match="its header claims 4294967295 bytes, expected at most"):
            fl.open(bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for version in ((1, 0), (2, 0), (3, 0)):
        with open(tmp_path / "v.npy", "wb") as f:
            np.lib.format.write_array(f, x, version=version)
        np.testing.assert_array_equal(fl.argmax(fl.open(tmp_path / "v.npy")), [3, 3, 3])


def test_stats_labels_for_dumps_of_any_rank(tmp_path, rng):
    """`stats --labels` of a 1-D or 3-D dump takes one label per row, flat or in the rows' shape, and
    gives the mean NLL of the rows (it refused both before: the labels were flattened)."""
    from scipy.special import logsumexp

    x = rng.standard_normal((2, 3, 13)).astype(np.float32)
    y = rng.integers(0, 13, size=(2, 3))
    np.save(tmp_path / "d3.npy", x)
    np.save(tmp_path / "d1.npy", x[0, 0])
    np.save(tmp_path / "l23.npy", y)
    np.save(tmp_path / "l6.npy", y.reshape(-1))
    (tmp_path / "l1.txt").write_text(f"{y[0, 0]}\n")
    x64 = x.astype(np.float64).reshape(6, 13)
    nll = logsumexp(x64, axis=1) - x64[np.arange(6), y.reshape(-1)]
    for dump, labels, want in (("d3.npy", "l23.npy", nll.mean()), ("d3.npy", "l6.npy", nll.mean()),
                               ("d1.npy", "l1.txt", nll[0])):
        res = _cli("stats", tmp_path / dump, "--labels", tmp_path / labels, "--json",
                   "--per-row", tmp_path / "rows.csv")
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        assert got["counted_rows"] == (1 if dump == "d1.npy" else 6)
        np.testing.assert_allclose(got["mean_nll"], want, rtol=1e-6)
        lines = (tmp_path / "rows.csv").read_text().splitlines()
        assert [int(line.split(",")[2]) for line in lines[1:]] == y.reshape(-1)[:len(lines) - 1].tolist()


def test_outputs_through_links_and_pipes(tmp_path, rng):
    """A symbolic link as the output: its target is replaced (keeping its permissions), the link stays. A
    FIFO: written in place, the rows reach its reader (a rename used to put a file in its place). A
    read-only file is refused before the pass, where the user cannot write it."""
    import stat
    import threading

    x = rng.standard_normal((5, 40)).astype(np.float32)
    want = np.exp(x - np.log(np.exp(x.astype(np.float64)).sum(1, keepdims=True)))
    target, link = tmp_path / "target.bin", tmp_path / "link.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    link.symlink_to(target)
    fl.softmax(fl.open(x), out=str(link))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    np.testing.assert_allclose(np.fromfile(target, np.float32).reshape(5, 40), want, rtol=1e-5)

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    fl.softmax(fl.open(x), out=str(fifo))
    reader.join(30)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    np.testing.assert_allclose(np.frombuffer(got[0], np.float32).reshape(5, 40), want, rtol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["fifo", "link.bin", "target.bin"]


def test_a_read_only_output_is_refused(tmp_path, rng, monkeypatch):
    """An existing file this user cannot write is refused before the pass (a rename would replace it);
    os.access decides, so that root, who may write anything, is simulated by faking it."""
    x = rng.standard_normal((5, 40)).astype(np.float32)
    target = tmp_path / "target.bin"
    target.write_bytes(b"old")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and os.path.basename(p) != "target.bin")
    for out in (target, tmp_path / "link.bin"):
        if out.name == "link.bin":
            out.symlink_to(target)
        with pytest.raises(PermissionError, match=f"{out.name}: is read-only"):
            fl.softmax(fl.open(x), out=str(out))
        assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["link.bin", "target.bin"]


@pytest.mark.parametrize("op, out_dtype", [("softmax", None), ("log_softmax", "float64")])
def test_maps_of_several_rows_wider_than_the_budget_stay_within_it(tmp_path, rng, op, out_dtype):
    """The two passes of each wide row read through two buffers: the previous pass's last chunk is let go
    before the next pass reads (it was kept, and three rows went 34% over the budget)."""
    V, budget = 2**19, 2**20
    x = rng.standard_normal((3, V)).astype(np.float32)
    x.tofile(tmp_path / "w.bin")
    src = fl.open(tmp_path / "w.bin", dtype="float32", vocab=V, memory=budget)
    # a first call, untraced: the modules it imports are not buffers (run alone, this test failed)
    getattr(fl, op)(src, out=str(tmp_path / "y.bin"), dtype=out_dtype)
    tracemalloc.start()
    try:
        getattr(fl, op)(src, out=str(tmp_path / "y.bin"), dtype=out_dtype)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.05 * budget, f"peak {peak / budget:.3f} x the budget"
    got = np.fromfile(tmp_path / "y.bin", out_dtype or np.float32).reshape(3, V)
    np.testing.assert_allclose(got, getattr(fl, op)(x, dtype=out_dtype), rtol=1e-6, atol=1e-12)


class _SlicesAreNew:
    """An array-like whose every slice is a new array, as an h5py or zarr dataset's are."""

    def __init__(self, x):
        self.x, self.shape, self.dtype = x, x.shape, x.dtype

    def __getitem__(self, key):
        return np.array(self.x[key])


@pytest.mark.parametrize("kind", ["wide rows", "new slices", "3-D array"])
def test_reductions_stay_within_the_budget(tmp_path, rng, kind):
    """Peak memory within the budget (found by a memory audit, at 1.5 times it): rows wider than the
    budget whose width is not a multiple of the chunk (the last, shorter chunk's view was kept in place of
    its buffer, and the next row's first chunk allocated a third), and sources whose reads make new
    arrays (a block two back was still named while the next one was made: plan() counts three)."""
    budget = 1 << 20
    if kind == "wide rows":
        x = rng.standard_normal((3, 3 * (1 << 17) + 12345)).astype(np.float32)
        np.save(tmp_path / "w.npy", x)
        src = fl.open(tmp_path / "w.npy", memory=budget)
    elif kind == "new slices":
        x = rng.standard_normal((400, 4000)).astype(np.float32)
        src = fl.open(_SlicesAreNew(x), memory=budget)
    else:
        x = rng.standard_normal((20, 20, 4000)).astype(np.float32)
        src = fl.open(x, memory=budget)
    for f in (fl.logsumexp, fl.entropy):
        want = f(x)
        f(src)        # a first call, untraced: the modules it imports are not buffers
        tracemalloc.start()
        try:
            got = f(src)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1.05 * budget + got.nbytes, f"{f.__name__}: peak {peak / budget:.3f} x the budget"
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_an_iterable_is_read_in_the_callers_context(rng):
    """Every next() of an iterable source, on the reader thread too, sees the caller's context variables
    (use_backend's among them): the reader runs in a copy of the caller's context."""
    import contextvars
    import threading

    var = contextvars.ContextVar("test_var", default="unset")
    x = rng.standard_normal((40, 7)).astype(np.float32)
    seen = []

    def blocks():
        for i in range(0, 40, 10):
            seen.append((threading.current_thread().name, var.get()))
            yield x[i:i + 10].copy()

    token = var.set("caller's")
    try:
        got = fl.logsumexp(fl.open(blocks(), memory="64KiB"))
    finally:
        var.reset(token)
    np.testing.assert_array_equal(got, fl.logsumexp(x))
    assert [v for _, v in seen] == ["caller's"] * 4, seen
    assert any(name == "fastlogits-reader" for name, _ in seen), seen


def test_labels_changed_by_another_thread_during_a_call_are_never_read_unchecked():
    """The kernels read a private copy of the labels, made when they are checked: another thread writing
    an out-of-range label into the caller's array during calls gives an IndexError or the loss of the
    labels as they were, never an out-of-bounds read (the process died of SIGSEGV within a second)."""
    code = """if True:
        import sys, threading, time
        import numpy as np
        import fastlogits as fl
        sys.setswitchinterval(1e-6)
        x = np.random.default_rng(0).standard_normal((4, 1000), dtype=np.float32)
        labels = np.zeros(4, np.int64)
        def mutate():
            while True:
                labels[0] = 1 << 40
                labels[0] = 0
        threading.Thread(target=mutate, daemon=True).start()
        want = fl.cross_entropy(x, np.zeros(4, np.int64), reduction="none", threads=1)
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            for src in (x, fl.open(x, memory="64KiB")):
                try:
                    got = fl.cross_entropy(src, labels, reduction="none", threads=1)
                except IndexError:
                    continue
                assert np.array_equal(got, want), got
        print("ok")
    """
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == b"ok", (res.returncode, res.stderr[-2000:])


# ---- found by an audit: labels, headers, options and output names -----------------------------------------

def test_cli_uint64_label_past_int64_names_the_row(tmp_path, rng):
    """A uint64 label past 2^63 was cast to int64 before the check, wrapping to -100 (the ignore_index): the
    row was silently left out of the mean."""
    np.save(tmp_path / "x.npy", rng.standard_normal((10, 50)).astype(np.float32))
    np.save(tmp_path / "y.npy", np.array([2**64 - 100] + [1] * 9, np.uint64))
    err = _one_line(_cli("stats", tmp_path / "x.npy", "--labels", tmp_path / "y.npy"))
    assert "row 0" in err and "18446744073709551516" in err, err


def test_cli_per_row_output_may_not_replace_the_labels(tmp_path, rng):
    np.save(tmp_path / "x.npy", rng.standard_normal((10, 50)).astype(np.float32))
    y = rng.integers(0, 50, 10)
    np.save(tmp_path / "y.npy", y)
    err = _one_line(_cli("stats", tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--per-row",
                         tmp_path / "y.npy"))
    assert "labels file" in err, err
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), y)


def test_npy_with_more_data_than_its_header_is_refused(tmp_path, rng):
    """Rows past the header's shape were dropped silently (a truncated file was refused, a long one not)."""
    x = rng.standard_normal((10, 50)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "long.npy").write_bytes(data + x[:1].tobytes())
    with pytest.raises(SourceError, match=r"\(10, 50\).*2000 bytes.*found 200 bytes more"):
        fl.open(tmp_path / "long.npy")
    err = _one_line(_cli("info", tmp_path / "long.npy"))
    assert "200 bytes more" in err, err
    np.testing.assert_allclose(fl.logsumexp(fl.open(tmp_path / "x.npy")), fl.logsumexp(x))


@pytest.mark.parametrize("ignore_index, exc", [(10**24, ValueError), (1.5, TypeError), (None, TypeError),
                                                (-100.0, TypeError)])
def test_streamed_cross_entropy_and_stats_check_ignore_index_first(tmp_path, rng, ignore_index, exc):
    """Streamed, the labels were checked against ignore_index before ignore_index itself: a float gave an
    'out of range' label error, a huge int an unnamed OverflowError, and stats truncated 1.5 to 1 in the
    kernel (a row's NLL 0) while still counting it."""
    from fastlogits.stream import run

    x = rng.standard_normal((10, 50)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    y = np.arange(10)
    y[3] = -100
    for call in (lambda: fl.cross_entropy(fl.open(tmp_path / "x.npy"), y, ignore_index=ignore_index),
                 lambda: run.stats(fl.open(tmp_path / "x.npy"), y, ignore_index=ignore_index),
                 lambda: fl.cross_entropy(x, y, ignore_index=ignore_index)):
        with pytest.raises(exc, match="ignore_index"):
            call()


def test_output_name_ending_in_a_separator_is_a_folder(tmp_path, rng):
    """out='newdir/' for a folder that does not exist wrote a file named newdir."""
    x = rng.standard_normal((4, 30)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(IsADirectoryError, match="ends in a separator"):
        fl.softmax(fl.open(tmp_path / "x.npy"), out=str(tmp_path / "newdir") + os.sep)
    err = _one_line(_cli("softmax", tmp_path / "x.npy", str(tmp_path / "nodir") + os.sep))
    assert "ends in a separator" in err, err
    assert not (tmp_path / "newdir").exists() and not (tmp_path / "nodir").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_named_pipe_output_whose_reader_goes_away_is_an_error(tmp_path, rng):
    """The command line took every BrokenPipeError for a | head on standard output and exited 0, silently,
    when the reader of a named pipe given as the output went away: rows were lost."""
    import threading

    np.save(tmp_path / "x.npy", rng.standard_normal((20000, 200)).astype(np.float32))
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)

    def read_a_little():
        with open(fifo, "rb") as f:
            f.read(10)

    reader = threading.Thread(target=read_a_little)
    reader.start()
    err = _one_line(_cli("softmax", tmp_path / "x.npy", fifo, "--memory", "1MiB"), rc=1)
    reader.join()
    assert "reader went away" in err, err


# ---- found by a second audit: header fuzz, labels files, short writes, empty vocabularies -----------------

def test_corrupt_npy_headers_raise_source_errors(tmp_path, rng):
    """Garbled .npy headers: NumPy's parser lets tokenize's TokenError through for some (378 of 4000 in the
    audit's fuzz), which escaped fl.open and gave the command line a traceback. Every corruption now opens
    (it left a valid header) or raises SourceError naming the file."""
    np.save(tmp_path / "x.npy", rng.standard_normal((4, 10)).astype(np.float32))
    good = (tmp_path / "x.npy").read_bytes()
    for k in range(400):
        b = bytearray(good)
        start = int(rng.integers(10, 70))
        stop = int(rng.integers(start + 1, 128))
        b[start:stop] = bytes(rng.choice(list(b"x'\"({[,: \n"), stop - start))
        path = tmp_path / f"bad{k}.npy"
        path.write_bytes(bytes(b))
        try:
            fl.open(path).close()
        except SourceError as e:
            assert str(path) in str(e), e
    bad = bytearray(good)
    bad[10:60] = b"x" * 50          # the audit's case: EOF in a multi-line statement
    (tmp_path / "tok.npy").write_bytes(bytes(bad))
    with pytest.raises(SourceError, match=r"tok.npy: not a valid .npy file \(EOF in multi-line statement\)"):
        fl.open(tmp_path / "tok.npy")
    assert "not a valid .npy file" in _one_line(_cli("info", tmp_path / "tok.npy"))


@pytest.mark.parametrize("content, message", [
    (None, r"the magic string is not correct; expected b'\\x93NUMPY', got b'PK"),    # an .npz archive
    (b"PK\x03\x04xxxxxxxx", r"the magic string is not correct"),
    (b"\x93NU", r"EOF: reading magic string, expected 8 bytes got 3"),
    ("garbled", r"EOF in multi-line statement")])
def test_cli_labels_files_that_are_not_npy_arrays(tmp_path, rng, content, message):
    """np.load took a zip archive for labels (AttributeError: 'NpzFile' has no dtype, a traceback), let
    BadZipFile through, and called a 3-byte file pickled data."""
    np.save(tmp_path / "x.npy", rng.standard_normal((4, 10)).astype(np.float32))
    labels = tmp_path / "labels.npy"
    if content is None:
        np.savez(tmp_path / "lab.npz", np.arange(4))
        labels.write_bytes((tmp_path / "lab.npz").read_bytes())
    elif content == "garbled":
        np.save(labels, np.arange(4))
        b = bytearray(labels.read_bytes())
        b[10:60] = b"x" * 50
        labels.write_bytes(bytes(b))
    else:
        labels.write_bytes(content)
    err = _one_line(_cli("stats", tmp_path / "x.npy", "--labels", labels), rc=1)
    assert "labels.npy: not a valid .npy file" in err, err          # (the logits' reader and message)
    assert __import__("re").search(message, err), err


def test_a_short_write_is_written_again(tmp_path):
    """A BufferedWriter may take part of a buffer and return the count without raising (standard output to
    a pipe whose reader left: 65536 of 16 MB); every byte is written, and a write that takes none raises."""
    from fastlogits.stream.run import write_all

    class Dribble(io.RawIOBase):
        def __init__(self, most):
            self.data, self.most = bytearray(), most

        def writable(self):
            return True

        def write(self, b):
            n = min(len(b), self.most)
            self.data += bytes(b[:n])
            return n

    data = np.arange(1000, dtype=np.float32)
    sink = Dribble(7)
    write_all(sink, memoryview(data.view(np.uint8)))
    assert bytes(sink.data) == data.tobytes()
    with pytest.raises(OSError, match="a write took none of 4000 bytes"):
        write_all(Dribble(0), memoryview(data.view(np.uint8)))


def test_softmax_to_standard_output_whose_reader_leaves_is_not_a_success(tmp_path, rng):
    """The whole 16 MB dump is one block: its one write took 64 KiB and returned, and the command reported
    'wrote standard output (softmax of 4000 rows)', exit 0, with 99.6% of the rows dropped. Now the rest is
    written again: BrokenPipeError, and the command exits quietly, as for a | head over several blocks."""
    np.save(tmp_path / "big.npy", rng.standard_normal((4000, 1000)).astype(np.float32))
    proc = subprocess.Popen([sys.executable, "-m", "fastlogits", "softmax", str(tmp_path / "big.npy"), "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert b"wrote" not in err and b"Traceback" not in err, err


@pytest.mark.parametrize("shape", [(0, 0), (3, 0)])
def test_streamed_picks_from_an_empty_vocabulary_raise_as_in_memory(tmp_path, shape):
    """A (0, 0) dump gave an empty argmax and sample when streamed (no block ever reached the check), while
    the array raised, as NumPy's argmax and PyTorch's do."""
    np.save(tmp_path / "e.npy", np.zeros(shape, np.float32))
    for name, f in [("argmax", fl.argmax), ("sample", lambda s: fl.sample(s, seed=0))]:
        for src in (np.load(tmp_path / "e.npy"), fl.open(tmp_path / "e.npy"),
                    iter([np.zeros(shape, np.float32)])):
            with pytest.raises(ValueError, match=f"{name}: logits has an empty vocabulary"):
                f(src)


# ---- found by an audit of the command line: per-row outputs into pipes, labels names, reports ------------

def test_per_row_output_into_a_pipe_whose_reader_leaves_is_an_error(tmp_path, rng):
    """topk, sample and stats --per-row into a named pipe whose reader left exited 0, silently, with most
    rows unwritten (BrokenPipeError was taken for a | head on standard output)."""
    np.save(tmp_path / "x.npy", rng.standard_normal((20000, 80)).astype(np.float32))
    for args in (["topk", "{x}", "{fifo}"], ["sample", "{x}", "{fifo}", "--seed", "1"],
                 ["stats", "{x}", "--per-row", "{fifo}"]):
        fifo = tmp_path / f"rows-{args[0]}.jsonl"
        os.mkfifo(fifo)
        proc = subprocess.Popen([sys.executable, "-m", "fastlogits",
                                 *(a.format(x=tmp_path / "x.npy", fifo=fifo) for a in args)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with open(fifo, "rb") as reader:
            assert len(reader.read(100)) == 100
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 1, err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"{fifo}: the pipe's reader went away; the per-row results were not all written" in err


def test_npy_per_row_output_into_a_pipe(tmp_path, rng):
    """np.save asked a named pipe for its position ('obtaining file position failed', after the whole pass,
    with the header alone written); the .npy is now written in order, and reads back whole."""
    x = rng.standard_normal((37, 100)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    fifo = tmp_path / "top.npy"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "fastlogits", "topk", str(tmp_path / "x.npy"), str(fifo),
                             "-k", "3"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with open(fifo, "rb") as reader:
        data = reader.read()
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    got = np.load(io.BytesIO(data))
    lp, ids = fl.top_k_logprobs(x, 3)
    np.testing.assert_array_equal(got["ids"], ids)
    np.testing.assert_array_equal(got["logprobs"], lp)


@pytest.mark.parametrize("name, message, rc", [
    ("", r"argument --labels: expected the name of a labels file, got an empty name", 2),
    ("-", r"argument --labels: expected the name of a labels file, got - \(standard input is not read", 2),
    ("binary", r"binary: cannot read labels .*: 'utf-8' codec can't decode", 1)])
def test_cli_labels_names_that_name_no_labels(tmp_path, rng, name, message, rc):
    """--labels '' (an unset shell variable) was ignored: stats without NLL, exit 0; '' and - are usage
    errors (exit 2), found with the command line. A binary labels file said only 'utf-8'."""
    np.save(tmp_path / "x.npy", rng.standard_normal((4, 10)).astype(np.float32))
    if name == "binary":
        name = str(tmp_path / "binary")
        (tmp_path / "binary").write_bytes(b"\x00\xbf\xff" * 10)
    err = _one_line(_cli("stats", tmp_path / "x.npy", "--labels", name), rc=rc)
    assert __import__("re").search(message, err), err


def test_cli_reports(tmp_path, rng):
    """An audit's list: sample's message counted rows, not tokens; its reported seed (64 random bits) came
    back from jq 1.6 as another number; a full disk's error named no file; info called its input "path"
    where the other commands say "input"; demo's "threads" was a string ("up to 2") for wide rows."""
    np.save(tmp_path / "x.npy", rng.standard_normal((37, 100)).astype(np.float32))
    res = _cli("sample", tmp_path / "x.npy", tmp_path / "s.npy", "--seed", "1", "--num-samples", "3")
    assert "wrote 111 sampled tokens (3 a row, 37 rows)" in res.stdout.decode(), res
    for _ in range(20):
        res = _cli("sample", tmp_path / "x.npy", tmp_path / "s.npy", "--json")
        seed = json.loads(res.stdout)["seed"]
        assert isinstance(seed, int) and 0 <= seed < 2**53 and float(seed) == seed
    again = _cli("sample", tmp_path / "x.npy", tmp_path / "t.npy", "--seed", str(seed))
    assert again.returncode == 0
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), np.load(tmp_path / "t.npy"))
    if os.path.exists("/dev/full"):
        os.symlink("/dev/full", tmp_path / "full.csv")
        err = _one_line(_cli("stats", tmp_path / "x.npy", "--per-row", tmp_path / "full.csv"), rc=1)
        assert f"{tmp_path / 'full.csv'}: cannot write (No space left on device)" in err, err
    info = json.loads(_cli("info", tmp_path / "x.npy", "--json").stdout)
    assert info["input"] == str(tmp_path / "x.npy") and "path" not in info
    demo = json.loads(_cli("demo", "--rows", "4", "--vocab", "100000", "--memory", "64KiB", "--json").stdout)
    assert isinstance(demo["config"]["threads"], int) and demo["file_bytes"] > 4 * 100000 * 2


def test_a_close_interrupted_after_the_descriptor_is_closed_never_closes_it_again(tmp_path, monkeypatch):
    """A Ctrl-C handled right after os.close returns (the interpreter checks for signals there) must not
    leave the source holding the closed number: a later close() (a with block's exit, the collector)
    would close it again, when another file may have it by then."""
    import fastlogits.stream.sources as sources

    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    src = fl.open(tmp_path / "x.npy")
    real, closed = os.close, []

    def close_then_interrupt(fd):
        real(fd)
        closed.append(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(sources.os, "close", close_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        src.close()
    other = os.open(tmp_path / "x.npy", os.O_RDONLY)      # most likely the same number again
    try:
        src.close()
        del src
        assert len(closed) == 1
        os.fstat(other)                                    # still open
    finally:
        real(other)


@pytest.mark.parametrize("order", ["C", "F"])
def test_a_source_closed_during_a_read_is_closed_when_the_read_is_done(tmp_path, rng, monkeypatch, order):
    """close() from another thread while a read is in flight: the read finishes on the open file (it
    read a descriptor that close() had closed: EBADF as a bare "[Errno 9] b'Bad file descriptor'", a
    TypeError, or the data of a file opened meanwhile under the same number; found by a concurrency
    audit), the file is closed once it is done, and later reads say the source was closed."""
    import threading

    import fastlogits.stream.sources as sources
    from fastlogits.cpu import _layout

    x = rng.standard_normal((6, 50)).astype(np.float32)
    np.save(tmp_path / "x.npy", np.asfortranarray(x) if order == "F" else x)
    src = fl.open(tmp_path / "x.npy")
    fd, reads = src._fd, []
    real_preadv, real_columns = os.preadv, _layout.read_columns

    def closed_meanwhile(real):
        def read(*args):
            if not reads:       # the first read: another thread closes the source under it
                t = threading.Thread(target=src.close)
                t.start()
                t.join()
            reads.append(args)
            os.fstat(fd)        # still open
            return real(*args)
        return read

    monkeypatch.setattr(sources.os, "preadv", closed_meanwhile(real_preadv))
    monkeypatch.setattr(_layout, "read_columns", closed_meanwhile(real_columns))
    np.testing.assert_array_equal(src.read(0, 1), x[:1])
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(ValueError, match="x.npy: this source was closed; open the file again"):
        src.read(1, 2)


def test_a_read_error_names_the_file(tmp_path, rng, monkeypatch):
    """An error of the read itself (EIO, say) says which file and what happened, from the Python reads and
    from the column reads of a Fortran-order file in C (whose message was a bytes repr)."""
    import errno

    import fastlogits.stream.sources as sources
    from fastlogits.cpu import _layout

    x = rng.standard_normal((6, 50)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)

    def failing(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(sources.os, "preadv", failing)
    with pytest.raises(OSError, match=r"x\.npy: cannot read \(Input/output error\)") as e:
        fl.logsumexp(fl.open(tmp_path / "x.npy"))
    assert e.value.errno == errno.EIO
    r, w = os.pipe()            # pread on a pipe: ESPIPE, from C
    try:
        with pytest.raises(OSError, match=r"^\[Errno \d+\] Illegal seek$"):
            _layout.read_columns(r, np.empty((2, 3), np.float32, order="F"), 0, 8)
    finally:
        os.close(r)
        os.close(w)


# ---- the command line's outputs and standard streams under hostile conditions (found by a CLI audit) --

def _cli_with(args, **popen):
    """_cli with other Popen arguments (closed descriptors, limits): (returncode, stdout, stderr)."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    res = subprocess.run([sys.executable, "-m", "fastlogits.cli", *map(str, args)], **popen)
    return res.returncode, res.stdout, (res.stderr or b"").decode()


@pytest.mark.skipif(os.name != "posix", reason="POSIX descriptors")
def test_closed_standard_streams(tmp_path, rng):
    """A standard stream closed when the command starts (2>&-, <&-, >&-): with standard error closed the
    work is done and the summary printed (the progress bar's isatty() on None failed it, silently);
    with standard input closed, reading - says so (an AttributeError traceback); with standard output
    closed, where every summary goes, the command refuses at once (the input took descriptor 1 and was
    called "the file being read", or the summary was dropped with exit status 0)."""
    x = rng.standard_normal((5, 40)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    rc, out, err = _cli_with(["stats", tmp_path / "x.npy", "--json"], stderr=None,
                             preexec_fn=lambda: os.close(2))
    assert rc == 0 and json.loads(out)["rows"] == 5
    rc, out, err = _cli_with(["softmax", tmp_path / "x.npy", tmp_path / "p.npy"], stderr=None,
                             preexec_fn=lambda: os.close(2))
    assert rc == 0
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), fl.softmax(x.astype(np.float64)), rtol=1e-6)
    rc, out, err = _cli_with(["stats", "-", "--dtype", "float32", "--vocab", "4"],
                             preexec_fn=lambda: os.close(0))
    assert rc == 1 and err.count("\n") == 1 and "standard input is closed" in err, err
    for args in (["topk", tmp_path / "x.npy", "-"], ["stats", tmp_path / "x.npy", "--json"]):
        rc, out, err = _cli_with(args, preexec_fn=lambda: os.close(1))
        assert rc == 1 and err.count("\n") == 1 and "standard output is closed" in err, err


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="/proc's descriptor links")
def test_softmax_to_a_descriptor_name(tmp_path, rng):
    """/dev/stdout and /dev/fd/N (the shell's >(cmd)) are written at the descriptor, as - is: a pipe
    behind one ("pipe:[687605]", which no path reaches) was refused, and a file redirected there was
    replaced by a rename, taking it from the shell (what the shell wrote before and after was lost)."""
    x = rng.standard_normal((6, 50)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    want = fl.softmax(x).tobytes()
    rc, out, err = _cli_with(["softmax", tmp_path / "x.npy", "/dev/stdout"])
    assert rc == 0 and out == want, err
    with open(tmp_path / "both.bin", "wb") as f:      # { echo HEADER; fastlogits ...; } > both.bin
        f.write(b"HEADER\n")
        f.flush()
        rc, _, err = _cli_with(["softmax", tmp_path / "x.npy", "/dev/stdout"], stdout=f)
        f.write(b"TRAILER\n")
    assert rc == 0, err
    assert (tmp_path / "both.bin").read_bytes() == b"HEADER\n" + want + b"TRAILER\n"
    r, w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "fastlogits.cli", "softmax", str(tmp_path / "x.npy"),
                                 f"/dev/fd/{w}"], pass_fds=(w,), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        os.close(w)
        w = None
        with os.fdopen(r, "rb") as pipe:
            r = None
            got = pipe.read()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        proc.stderr.close()
        assert got == want
    finally:
        for fd in (r, w):
            if fd is not None:
                os.close(fd)


def test_output_names_long_looping_and_unwritable(tmp_path, rng):
    """A name of 250 bytes is written (the temporary name, 30 bytes longer, passed the 255-byte limit);
    a loop of links is refused, as the shell refuses it (it was replaced by a file); a write that fails
    (a file size limit, a full device) names the output (the message had no path) and leaves no file."""
    import resource

    x = rng.standard_normal((6, 50)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    long = tmp_path / ("a" * 246 + ".npy")
    rc, _, err = _cli_with(["softmax", tmp_path / "x.npy", long])
    assert rc == 0, err
    np.testing.assert_array_equal(np.load(long), fl.softmax(x))
    rc, _, err = _cli_with(["topk", tmp_path / "x.npy", long.with_suffix(".csv"), "-k", "2"])
    assert rc == 0 and long.with_suffix(".csv").read_text().count("\n") == 7, err
    os.symlink("loop1.npy", tmp_path / "loop2.npy")
    os.symlink("loop2.npy", tmp_path / "loop1.npy")
    for args in (["softmax", tmp_path / "x.npy"], ["topk", tmp_path / "x.npy", "-k", "2"]):
        rc, _, err = _cli_with([*args, tmp_path / "loop1.npy"])
        assert rc == 1 and err.count("\n") == 1 and "loop1.npy: cannot write there (Too many levels of " \
            "symbolic links)" in err, err
        assert os.path.islink(tmp_path / "loop1.npy")

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # (the write then fails with EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))

    rc, _, err = _cli_with(["softmax", tmp_path / "x.npy", tmp_path / "o.npy"], preexec_fn=small_files)
    assert rc == 1 and err.count("\n") == 1 and "o.npy: cannot write (File too large)" in err, err
    # nothing half written is left (the last rows, written when the file was closed, failed there, and
    # the file was renamed into place all the same)
    assert not (tmp_path / "o.npy").exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]
    if os.path.exists("/dev/full"):
        rc, _, err = _cli_with(["softmax", tmp_path / "x.npy", "/dev/full"])
        assert rc == 1 and "/dev/full: cannot write (No space left on device)" in err, err


def test_write_errors_keep_their_errno(tmp_path, rng, monkeypatch):
    """A failed write is re-raised naming the output, of its type and errno still (a caller testing
    e.errno == ENOSPC lost it when the message was added; found by a review), and the command line
    prints the message alone."""
    import errno

    from fastlogits.stream import run as stream_run

    x = rng.standard_normal((6, 50)).astype(np.float32)

    real = stream_run.write_all
    for fail_at in (1, 2):          # the header's write, then the first rows'
        calls = []

        def full(f, data, calls=calls, fail_at=fail_at):
            calls.append(1)
            if len(calls) == fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(f, data)

        monkeypatch.setattr(stream_run, "write_all", full)
        with pytest.raises(OSError, match=r"o\.npy: cannot write \(No space left on device\)") as e:
            fl.softmax(fl.open(x), out=str(tmp_path / "o.npy"))
        assert e.value.errno == errno.ENOSPC and os.listdir(tmp_path) == [], fail_at
    err = stream_run.named_error(PermissionError(errno.EPERM, "Operation not permitted"), "f: cannot write")
    assert type(err) is PermissionError and err.errno == errno.EPERM and err.strerror == "f: cannot write"


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="/proc's descriptor links")
def test_descriptor_outputs_by_their_flags_and_formats(tmp_path, rng):
    """A name of a descriptor this process holds read-only is refused before the pass (os.access of the
    file behind it said yes, and the pass failed at the first write); a link with a format of its own
    to /dev/stdout (out.npy) writes that format there, with the summary on standard error (it was
    written as raw rows, as - is; found by a review)."""
    x = rng.standard_normal((6, 50)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "w.bin").write_bytes(b"")
    fd = os.open(tmp_path / "w.bin", os.O_RDONLY)
    try:
        rc, _, err = _cli_with(["softmax", tmp_path / "x.npy", f"/dev/fd/{fd}"], pass_fds=(fd,))
    finally:
        os.close(fd)
    assert rc == 1 and "cannot write there (not a descriptor open for writing)" in err, err
    os.symlink("/dev/stdout", tmp_path / "o.npy")
    rc, out, err = _cli_with(["softmax", tmp_path / "x.npy", tmp_path / "o.npy"])
    assert rc == 0 and "wrote the softmax" in err, err
    np.testing.assert_array_equal(np.load(io.BytesIO(out)), fl.softmax(x))


def test_a_hang_up_exits_129_when_standard_error_is_gone(monkeypatch):
    """After a hang-up standard error is a dead terminal: printing "hung up" failed with EIO inside the
    handler, and the exit status was 1 (found by a review)."""
    from fastlogits import cli

    class Dead(io.TextIOBase):
        def write(self, s):
            raise OSError(5, "Input/output error")

    @contextlib.contextmanager
    def hang_up():
        raise cli._Terminated(signal.SIGHUP)
        yield

    monkeypatch.setattr(cli, "_signals_unwind", hang_up)
    monkeypatch.setattr(sys, "stderr", Dead())
    assert cli.main(["info", "x.npy"]) == 128 + signal.SIGHUP


def test_a_wrong_weight_is_refused_before_a_wide_source_is_read(tmp_path):
    """cross_entropy of rows wider than the budget checks weight as in memory, before any read (it read
    the whole dump, then said "weight has 20001 values ... but 20000 columns were folded in", or named
    a chunk's columns; found by an error-parity audit)."""
    x = np.zeros((4, 20000), np.float32)
    np.save(tmp_path / "w.npy", x)
    y = np.zeros(4, np.int64)
    for weight, match in ((np.ones(20001), r"weight must have one value per class, shape \(20000,\), got "
                                           r"shape \(20001,\)"),
                          (np.ones(5), r"shape \(20000,\), got shape \(5,\)"),
                          (np.ones((1, 20000)), r"shape \(20000,\), got shape \(1, 20000\)")):
        src = fl.open(tmp_path / "w.npy", memory="64KiB")
        reads = []
        real = src.read
        src.read = lambda *a, reads=reads, real=real, **k: reads.append(a) or real(*a, **k)
        with pytest.raises(ValueError, match=match):
            fl.cross_entropy(src, y, weight=weight)
        assert reads == []
        with pytest.raises(ValueError, match=match):
            fl.cross_entropy(x, y, weight=weight)


# ---- malformed files (found by a file-format audit) --------------------------------------------------------

def _st_bytes(tensors, header=None):
    """A safetensors file of float32 tensors {name: array} (or the given header dict / bytes)."""
    data, entries, end = b"", {}, 0
    for k, a in tensors.items():
        entries[k] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [end, end + a.nbytes]}
        data += a.astype("<f4").tobytes()
        end += a.nbytes
    h = header if isinstance(header, bytes) else json.dumps(header or entries).encode()
    return struct.pack("<Q", len(h)) + h + data


def test_a_dump_that_describes_itself_is_not_read_as_raw_rows(tmp_path, rng):
    """A .npy or safetensors file on standard input (or a pipe) was read as raw rows, its header as 8 rows
    of logits, exit 0; a safetensors file under another name was read as raw rows too. Standard input
    refuses them; a regular file is opened as what it holds, as a .npy file already was."""
    x = rng.standard_normal((10, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    st = _st_bytes({"logits": x})
    for data, kind in (((tmp_path / "x.npy").read_bytes(), "a .npy file"), (st, "a safetensors file")):
        err = _one_line(_cli("stats", "-", "--dtype", "float32", "--vocab", "4", stdin=data), rc=1)
        assert f"standard input: expected raw rows, found {kind}" in err, err
    (tmp_path / "x.st").write_bytes(st)
    src = fl.open(tmp_path / "x.st", dtype="float32", vocab=4)
    assert src.format == "safetensors" and src.shape == (10, 4)
    np.testing.assert_allclose(fl.logsumexp(src), ref.logsumexp(x), rtol=2e-6)
    # raw rows that merely start with small numbers stay raw rows
    raw = np.zeros((3, 4), np.float32)
    raw.view(np.uint8).reshape(-1)[8:10] = list(b'{"')
    res = _cli("stats", "-", "--dtype", "float32", "--vocab", "4", "--json", stdin=raw.tobytes())
    assert res.returncode == 0 and json.loads(res.stdout)["rows"] == 3, res.stderr


def _npy_bytes(header, data=b""):
    """A version 1.0 .npy file of the given header text (a dict's repr) and data, padded as NumPy pads."""
    text = header + " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode() + data


def test_npy_headers_that_lie(tmp_path):
    """A header-length field cut short said "expected 4096 bytes got 0" (it read back into the magic); a
    bool in the shape opened as (1, 3); a header naming bfloat16 was refused as raw |V2 values."""
    (tmp_path / "cut.npy").write_bytes(b"\x93NUMPY\x01\x00\x10")
    with pytest.raises(SourceError, match=r"cut.npy: not a valid .npy file \(the file ends in its header's "
                                          r"length: expected 2 bytes, found 1\)"):
        fl.open(tmp_path / "cut.npy")
    data = np.arange(6, dtype=np.float32)
    (tmp_path / "bool.npy").write_bytes(_npy_bytes(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (True, 3), }", data[:3].tobytes()))
    with pytest.raises(SourceError, match=r"bool.npy: not a valid .npy file \(shape \(True, 3\): expected "
                                          r"integers\)"):
        fl.open(tmp_path / "bool.npy")
    (tmp_path / "bf16.npy").write_bytes(_npy_bytes(
        "{'descr': 'bfloat16', 'fortran_order': False, 'shape': (2, 3), }", data.astype(BF16).tobytes()))
    src = fl.open(tmp_path / "bf16.npy")
    assert src.dtype == "bfloat16" and src.shape == (2, 3)
    np.testing.assert_allclose(fl.logsumexp(src), ref.logsumexp(np.arange(6.0).reshape(2, 3)), rtol=1e-6)


def test_safetensors_headers_that_lie(tmp_path, rng):
    """An integer of 5000 digits in the header raised a bare ValueError naming no file; a header past the
    format's 100 MiB limit was said to be longer than the file; a tensor name that is a lone surrogate
    broke info's output."""
    x = rng.standard_normal((2, 3)).astype(np.float32)
    (tmp_path / "int.safetensors").write_bytes(_st_bytes({}, b'{"a": ' + b"9" * 5000 + b"}"))
    with pytest.raises(SourceError, match=r"int.safetensors: corrupt safetensors header \(not JSON"):
        fl.open(tmp_path / "int.safetensors")
    with open(tmp_path / "big.safetensors", "wb") as f:      # sparse: 200 MiB on paper, a few KiB on disk
        f.write(struct.pack("<Q", 150 * 2**20))
        f.truncate(200 * 2**20)
    with pytest.raises(SourceError, match=r"says 157286400 bytes, expected at most 104857600"):
        fl.open(tmp_path / "big.safetensors")
    entries = {"\ud800": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    (tmp_path / "sur.safetensors").write_bytes(_st_bytes({}, json.dumps(entries).encode())
                                               + x.tobytes())
    with pytest.raises(SourceError, match=r"a tensor name that is not printable UTF-8 text, '\\ud800'"):
        fl.open(tmp_path / "sur.safetensors")
    assert "not printable" in _one_line(_cli("info", tmp_path / "sur.safetensors"), rc=1)


def test_labels_files_are_checked_as_logits_files_are(tmp_path, rng):
    """The labels' .npy reader took bytes past the data silently, allocated a header's 2**36 values before
    finding 32 bytes, and read /dev/zero as text until memory ran out; a BOM (Notepad's) was refused."""
    np.save(tmp_path / "x.npy", rng.standard_normal((4, 10)).astype(np.float32))
    y = np.array([1, 0, 9, 3])
    np.save(tmp_path / "long.npy", y)
    with open(tmp_path / "long.npy", "ab") as f:
        f.write(b"\0")
    err = _one_line(_cli("stats", tmp_path / "x.npy", "--labels", tmp_path / "long.npy"), rc=1)
    assert "long.npy: its header's shape (4,) of int64 describes 32 bytes of data" in err, err
    assert err.endswith("found 33\n"), err
    (tmp_path / "claim.npy").write_bytes(_npy_bytes(
        "{'descr': '<i8', 'fortran_order': False, 'shape': (68719476736,), }", y.tobytes()))
    err = _one_line(_cli("stats", tmp_path / "x.npy", "--labels", tmp_path / "claim.npy"), rc=1)
    assert "claim.npy: its header's shape (68719476736,) of int64 describes 549755813888 bytes" in err, err
    if os.path.exists("/dev/zero"):
        err = _one_line(_cli("stats", tmp_path / "x.npy", "--labels", "/dev/zero"), rc=1)
        assert "/dev/zero: expected a labels file (or a pipe), found a folder or a device" in err
    os.mkfifo(tmp_path / "fifo.npy")      # (refused by its kind, named: opened, it waited for a writer)
    cmd = [sys.executable, "-m", "fastlogits.cli", "stats", str(tmp_path / "x.npy"), "--labels",
           str(tmp_path / "fifo.npy")]
    err = _one_line(subprocess.run(cmd, capture_output=True, timeout=120), rc=1)
    assert "fifo.npy: expected a regular file (a .npy file's header is read at offsets), found a pipe" in err
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf1\r\n0\r\n9\r\n3\r\n")
    res = _cli("stats", tmp_path / "x.npy", "--labels", tmp_path / "bom.txt", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["counted_rows"] == 4, res.stderr


def test_an_empty_or_spent_iterable_says_what_is_missing(rng):
    """An iterable of no blocks cannot say how wide its rows are; a generator given to a second call is
    spent, which the message now says (it said only "an empty iterable"; a user audit). With vocab=
    the empty source is 0 rows."""
    x = rng.standard_normal((2, 3)).astype(np.float32)
    gen = (b for b in [x])
    np.testing.assert_allclose(fl.logsumexp(gen), ref.logsumexp(x), rtol=2e-6)
    with pytest.raises(SourceError, match=r"^an empty iterable of row blocks \(or an iterator that an "
                                          r"earlier call read to its end\): nothing says how wide"):
        fl.logsumexp(gen)
    with pytest.raises(SourceError, match=r"^an empty iterable of row blocks: nothing says how wide"):
        fl.logsumexp(IterSource([]))
    assert fl.logsumexp(fl.open(iter([]), vocab=3)).shape == (0,)


def test_an_input_out_of_reach_is_not_called_missing(tmp_path):
    """A loop of symbolic links (or a folder that may not be entered) was reported as "no such file"
    (os.path.exists is False on any error): the error says why the file cannot be read, with its errno."""
    import errno

    os.symlink(tmp_path / "a.npy", tmp_path / "b.npy")
    os.symlink(tmp_path / "b.npy", tmp_path / "a.npy")
    with pytest.raises(OSError, match=r"a\.npy: cannot read it \(Too many levels of symbolic links\)") as e:
        fl.open(tmp_path / "a.npy")
    assert e.value.errno == errno.ELOOP
    with pytest.raises(FileNotFoundError, match=r"c\.npy: no such file") as e:
        fl.open(tmp_path / "c.npy")
    assert e.value.errno == errno.ENOENT
    err = _one_line(_cli("info", tmp_path / "a.npy"), rc=1)
    assert err.endswith("a.npy: cannot read it (Too many levels of symbolic links)\n"), err


def test_cli_ignore_index_past_int64_is_a_usage_error(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    np.save(tmp_path / "y.npy", np.zeros(2, np.int64))
    for value in ("9223372036854775808", "-9223372036854775809", "1.5"):
        err = _one_line(_cli("stats", tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--ignore-index",
                             value), rc=2)
        assert "argument --ignore-index: expected an integer from -2**63 to 2**63 - 1" in err, err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_write_errors_without_a_file_name_say_where(tmp_path):
    """A full disk behind standard output: the summary and per-row results to - said only "No space left
    on device" (after topk had written its output file, as if that had failed); they name standard
    output."""
    np.save(tmp_path / "x.npy", np.zeros((3, 6), np.float32))
    with open("/dev/full", "w") as full:
        for args, what in [(("info", tmp_path / "x.npy"), "the summary"),
                           (("topk", tmp_path / "x.npy", tmp_path / "o.npy"), "the summary"),
                           (("topk", tmp_path / "x.npy", "-"), "the per-row results")]:
            res = subprocess.run([sys.executable, "-m", "fastlogits.cli", *map(str, args)], stdout=full,
                                 stderr=subprocess.PIPE)
            err = _one_line(res, rc=1)
            assert err.endswith(f"error: standard output: cannot write {what} (No space left on device)\n"), \
                err
    assert np.load(tmp_path / "o.npy")["ids"].shape == (3, 5)


def test_a_full_temporary_folder_is_named(tmp_path, monkeypatch, capsys):
    """The demo's dump and the spool of a row of standard input go to TMPDIR; a full disk there said only
    "No space left on device"."""
    import errno
    import tempfile

    from fastlogits import cli
    from fastlogits.stream import run

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(np.lib.format, "write_array_header_1_0", full)
    assert cli.main(["demo", "--rows", "4", "--vocab", "10"]) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path}/fastlogits-demo-" in err and "cannot write the demo's dump there (No space " \
        "left on device); TMPDIR names the folder for temporary files" in err, err
    monkeypatch.setattr(run, "write_all", full)
    src = StdinSource("float32", 5, stream=io.BytesIO(np.zeros((2, 5), np.float32).tobytes()))
    with pytest.raises(OSError, match=rf"{tmp_path}: cannot spool row 0 of .* to a temporary file there "
                       r"\(No space left on device\); TMPDIR") as e:
        list(run.single_rows(src, 2))
    assert e.value.errno == errno.ENOSPC


def test_cli_labels_the_library_refuses_are_named(tmp_path):
    """A label out of range, or too few labels for rows from standard input, are found by the library as
    it streams: the message names the labels file (it said "labels: ...")."""
    np.save(tmp_path / "x.npy", np.zeros((4, 10), np.float32))
    np.save(tmp_path / "yneg.npy", np.array([0, 1, 2, -5]))
    err = _one_line(_cli("stats", tmp_path / "x.npy", "--labels", tmp_path / "yneg.npy"), rc=1)
    assert err.endswith(f"error: {tmp_path / 'yneg.npy'}: labels: label -5 at row 3 is out of range for 10 "
                        "classes (valid: 0..9, or ignore_index=-100)\n"), err
    np.save(tmp_path / "yshort.npy", np.zeros(10, np.int64))
    res = _cli("stats", "-", "--dtype", "float32", "--vocab", "100", "--labels", tmp_path / "yshort.npy",
               stdin=np.zeros((64, 100), np.float32).tobytes())
    assert f"error: {tmp_path / 'yshort.npy'}: labels has 10 values, but the source has more rows" \
        in _one_line(res, rc=1)


def test_terabyte_budgets_and_no_progress_monitor_thread():
    """--memory 1TiB was "not a byte count"; tqdm's monitor thread (started even for a disabled bar)
    printed a traceback from its exit hook after a second Ctrl-C."""
    import threading

    from fastlogits import cli
    from fastlogits.stream.run import parse_memory

    assert (parse_memory("1TiB"), parse_memory("2tb"), parse_memory("0.5T")) == (2**40, 2 * 10**12, 2**39)
    from tqdm import tqdm

    before = set(threading.enumerate())
    cli._Bar(10, "x").close()
    assert set(threading.enumerate()) <= before and tqdm.monitor_interval == 0
