"""Behaviour that mutation testing found unchecked: each test here fails for a small change to the code
that the rest of the suite let pass (a `>=` for a `>`, a dropped check), against an independent reference."""
import json
import math
import os
import struct

import ml_dtypes
import numpy as np
import pytest

import fastlogits as fl
from fastlogits.ops.sampling import sample
from fastlogits.stream import CrossEntropy
from tests import reference as ref


def test_bfloat16_outputs_round_ties_to_even():
    """-257 lies halfway between the bfloat16 values -256 and -258: round-to-nearest-even gives -256, as
    ml_dtypes and PyTorch do (rounding half up gave -258)."""
    x = np.array([0.0, -257.0, -1000.0], np.float32)          # its log-softmax, exactly, in float32
    got = fl.log_softmax(x, dtype="bfloat16")
    np.testing.assert_array_equal(got.astype(np.float32), x.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert float(got[1]) == -256.0


@pytest.mark.parametrize("top_k", [None, 10], ids=["whole-row", "top-k"])
def test_top_p_reached_exactly_keeps_no_more(top_k):
    """Two tokens hold exactly 0.8 (0.5 with top-k) of the mass, and top_p is that plus the 16 eps the
    docs allow: they alone are the nucleus (a strict comparison kept the next tokens too)."""
    a = math.log(0.25)
    if top_k is None:
        x, p, n = np.array([0.0, 0.0, a, a]), 0.8, 4
    else:
        x, p, n = np.array([0.0, 0.0] + [a] * 8 + [-30.0, -30.0]), 0.5, 12
    tok, lp, _ = sample(np.tile(x, (2000, 1)), top_k=top_k, top_p=p + 16 * np.finfo(np.float64).eps, seed=1,
                        return_logprobs=True)
    counts = np.bincount(tok, minlength=n)
    assert counts[2:].sum() == 0 and min(counts[:2]) > 900, counts
    np.testing.assert_allclose(lp, math.log(0.5), rtol=1e-15)


def test_softmax_refuses_a_read_only_out():
    out = np.zeros((1, 3))
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        fl.softmax(np.array([[1.0, 2.0, 3.0]]), out=out)
    assert not out.any()


def test_cross_entropy_accumulator_label_at_a_chunk_start():
    """A label that is the first column of a chunk, the chunks folded out of order (the column just past
    a chunk counted as found gave a wrong target)."""
    x = np.random.default_rng(0).normal(size=(3, 8))
    y = np.array([4, 4, 0])
    acc = CrossEntropy(y, reduction="none")
    acc.update(np.ascontiguousarray(x[:, 4:]), 4).update(np.ascontiguousarray(x[:, :4]), 0)
    np.testing.assert_allclose(acc.result(), ref.cross_entropy(x, y, reduction="none"), rtol=1e-13)


def test_cross_entropy_accumulator_refuses_a_negative_label():
    with pytest.raises(IndexError, match="label -5 at row 1 is out of range"):
        CrossEntropy(np.array([0, -5]))


def test_wide_rows_greedy_ties_and_top_p_tolerance(tmp_path):
    """Rows wider than the budget: greedy takes the lowest index of tied maxima in different chunks, and
    a top_p within the documented tolerance of a token's mass keeps that token alone, as in memory."""
    x = np.full((1, 100_000), -1.0, np.float32)
    x[0, 5] = x[0, 90_000] = 3.0
    np.save(tmp_path / "g.npy", x)
    src = fl.open(tmp_path / "g.npy", memory="64KiB")
    assert int(fl.sample(src, temperature=0)[0]) == 5 == int(np.argmax(x))
    x = np.full((1, 100_000), -np.inf, np.float32)
    x[0, 0], x[0, 1] = 0.0, -1.0
    top_p = 1 / (1 + np.exp(np.float64(np.float32(-1.0)))) + 1e-6       # token 0's mass, within 16 eps32
    np.save(tmp_path / "p.npy", x)
    src = fl.open(tmp_path / "p.npy", memory="64KiB")
    assert all(int(fl.sample(src, top_p=top_p, seed=s)[0]) == 0 for s in range(40))


def test_streamed_z_loss_averages_over_counted_rows():
    x = np.random.default_rng(1).normal(size=(4, 6))
    y = np.array([1, -100, 2, -100])
    lse = np.log(np.exp(x).sum(1))
    c = y != -100
    want = (lse - x[np.arange(4), np.maximum(y, 0)])[c].mean() + 0.1 * (lse[c] ** 2).mean()
    assert float(fl.cross_entropy(iter([x[:2], x[2:]]), y, z_loss=0.1)) == pytest.approx(want, rel=1e-13)
    assert float(fl.cross_entropy(x, y, z_loss=0.1)) == pytest.approx(want, rel=1e-13)


def test_a_npy_file_short_by_less_than_its_header_is_refused(tmp_path):
    p = tmp_path / "t.npy"
    np.save(p, np.zeros((4, 8), np.float32))
    os.truncate(p, os.path.getsize(p) - 4)              # one value short
    with pytest.raises(fl.SourceError, match="needs 128 bytes of data after a 128-byte header"):
        fl.open(p)


def test_a_safetensors_tensor_whose_offsets_do_not_fit_its_shape_is_refused(tmp_path):
    a, b = np.arange(8, dtype=np.float32), np.full(4, 100.0, np.float32)
    hdr = json.dumps({"a": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 16]},     # needs 32 bytes
                      "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}).encode()
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(hdr)) + hdr + a[:4].tobytes() + b.tobytes())
    with pytest.raises(fl.SourceError, match="tensor 'a': shape \\[2, 4\\] of float32 needs 32 bytes"):
        fl.open(p, tensor="a")


# ---- from a second hand mutation pass (selection, _prep, sampling, cli) ----------------------------------

@pytest.mark.parametrize("shape", [(0,), (2, 0), (0, 0), (2, 3, 0)])
def test_argmax_of_an_empty_vocabulary_raises(shape):
    """argmax of an empty vocabulary raises the documented ValueError (without the check it gave 0, a
    token that does not exist, for every row)."""
    with pytest.raises(ValueError, match="empty vocabulary"):
        fl.argmax(np.zeros(shape, np.float32))


def test_argmax_of_1d_logits_is_a_numpy_scalar(rng):
    """1-D logits give a NumPy scalar, as np.argmax does (not a 0-d array)."""
    x = rng.normal(size=17)
    got = fl.argmax(x)
    assert isinstance(got, np.int64) and not isinstance(got, np.ndarray)
    assert got == np.argmax(x)


def test_temperature_array_at_float32_tiny_is_accepted():
    """float32's smallest normal number is inside the documented temperature range [tiny, max] for an
    array as for a scalar. x / T = 0 for any T: the logsumexp is log 3."""
    x = np.zeros((2, 3), np.float32)
    got = fl.logsumexp(x, temperature=np.array([np.finfo(np.float32).tiny, 1.0]))
    np.testing.assert_allclose(got, [math.log(3)] * 2, rtol=1e-6)


def test_temperature_error_names_the_first_bad_row():
    """The message names the first bad row and its value, as an index of the leading shape."""
    with pytest.raises(ValueError, match=r"got -1\.0 \(row 1\)"):
        fl.logsumexp(np.zeros((4, 3)), temperature=np.array([1.0, -1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match=r"got -1\.0 \(row \(0, 1\)\)"):
        fl.logsumexp(np.zeros((2, 2, 3)), temperature=np.array([[1.0, -1.0], [0.0, 1.0]]))


def test_label_smoothing_total_weight_is_summed_in_float64():
    """The smoothing term's weight total is summed in float64, where 1e8 + 1 - 1e8 = 1 (float32 gives 0).
    Equal logits: p_c = 1/3, so with eps = 1 the loss is (1/V) sum_c w_c (-log p_c) = log(3) / 3."""
    x = np.zeros((1, 3), np.float32)
    got = fl.cross_entropy(x, np.array([1]), weight=np.array([1e8, 1.0, -1e8]), label_smoothing=1.0,
                           reduction="none")
    np.testing.assert_allclose(got, [math.log(3) / 3], rtol=1e-6)


def test_binary_size_at_exactly_one_unit(capsys):
    """The largest unit that keeps the number at least 1: exactly 1 MiB is "1 MiB", not "1024 KiB", in
    the helper and in demo's summary."""
    from fastlogits.cli import _binary_size, main

    assert [_binary_size(n) for n in (1 << 10, 1 << 20, 1 << 30, (1 << 10) - 1)] == \
        ["1 KiB", "1 MiB", "1 GiB", "1023 B"]
    assert main(["demo", "--rows", "8", "--vocab", "50", "--memory", "1MiB"]) == 0
    assert "with a 1 MiB budget" in capsys.readouterr().out


def test_cli_stats_accuracy_leaves_out_ignored_rows(tmp_path, capsys, rng):
    """stats' accuracy is over counted rows, as its mean NLL: two rows labelled with their argmax
    (NumPy's) and two ignored give 1.0 over 2 rows (counting ignored rows as wrong gave 0.5)."""
    from fastlogits.cli import main

    x = rng.normal(size=(4, 10)).astype(np.float32)
    y = np.array([np.argmax(x[0]), np.argmax(x[1]), -100, -100])
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    assert main(["stats", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counted_rows"] == 2 and summary["accuracy"] == 1.0


def test_cli_stats_per_row_labels_are_int64_and_any_suffix_case_reads_npy(tmp_path, rng):
    """The per-row "label" field is int64 (as argmax), whatever the labels file's dtype; a labels file
    named Y.NPY is read as .npy (it was parsed as text: a UnicodeDecodeError), as output names are."""
    from fastlogits.cli import main

    x = rng.normal(size=(2, 3, 7)).astype(np.float32)
    y = rng.integers(0, 7, (2, 3)).astype(np.int32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    os.rename(tmp_path / "y.npy", tmp_path / "Y.NPY")
    out = tmp_path / "rows.npy"
    assert main(["stats", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "Y.NPY"), "--per-row",
                 str(out)]) == 0
    rec = np.load(out)
    assert rec.shape == (2, 3) and rec["label"].dtype == np.int64 and rec["argmax"].dtype == np.int64
    np.testing.assert_array_equal(rec["label"], y)
    np.testing.assert_array_equal(rec["argmax"], np.argmax(x, axis=-1))


def test_sample_error_names_the_first_bad_row(rng):
    """The message names the first row that cannot be sampled (a NaN in row 1), not a later one (row 3,
    all -inf)."""
    x = rng.normal(size=(4, 6))
    x[1, 2] = np.nan
    x[3, :] = -np.inf
    with pytest.raises(ValueError, match=r"holds a NaN \(row 1\)"):
        sample(x, seed=0)


def test_beam_search_scores_are_float64_for_float64_beam_scores(rng):
    """float32 logits with float64 beam scores give float64 scores (the docs: float64 when either is):
    the float64 sum of the parent's score and the float32 log-softmax, not rounded to float32."""
    from fastlogits.ops.sampling import beam_search_step

    x = rng.normal(size=(4, 9)).astype(np.float32)
    bs = rng.normal(size=4) * 1e-3 + np.array([0.1, 0.2, 0.3, 0.4]) / 3      # not float32 values
    s, p, t = beam_search_step(x, bs, 2)
    assert s.dtype == np.float64
    lp = fl.log_softmax(x).astype(np.float64)
    rows = 2 * np.arange(2)[:, None] + p                                   # the parent's row
    np.testing.assert_allclose(s, bs[rows] + lp[rows, t], rtol=0, atol=1e-6)
    assert np.any(s != s.astype(np.float32).astype(np.float64))


# ---- from a hand mutation pass over the streaming layer and the reductions' checks ---------------------

def test_streamed_per_row_values_longer_than_a_counted_source_are_refused(rng):
    """R5 (run.py RowArg.check_rows: 'and self.value.shape[0] != rows' -> 'and False'): per-row labels or
    temperatures with more values than the rows an iterable source turns out to hold must raise, not be
    silently truncated (the in-memory functions refuse a length mismatch)."""
    x = rng.standard_normal((10, 37)).astype(np.float32)
    y = rng.integers(0, 37, 10)
    with pytest.raises(ValueError, match="labels has 10 values, but the source has 3 rows"):
        fl.cross_entropy(iter([x[:3]]), y)
    with pytest.raises(ValueError, match="temperature has 10 values, but the source has 3 rows"):
        fl.logsumexp(iter([x[:3]]), temperature=rng.uniform(0.5, 2.0, 10))


@pytest.mark.parametrize("op, dtype", [("logsumexp", np.float32), ("entropy", np.float32),
                                       ("argmax", np.int64)])
def test_streamed_reductions_of_zero_rows_have_the_in_memory_dtype(tmp_path, op, dtype):
    """R8 (run.py: 'np.empty(0, _result_dtype(source, op))' -> 'np.empty(0)'): a source of no rows gives
    an empty result in the dtype the in-memory function returns (float32 for float16/float32 logits,
    int64 for argmax), not float64."""
    for src_dtype in (np.float16, np.float32):
        x = np.empty((0, 7), src_dtype)
        np.save(tmp_path / "e.npy", x)
        want = getattr(fl, op)(x)
        assert want.dtype == dtype and want.shape == (0,)
        got = getattr(fl, op)(fl.open(tmp_path / "e.npy"))
        assert got.dtype == dtype and got.shape == (0,)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_streamed_top_k_of_rows_wider_than_the_budget_keeps_the_logits_dtype(tmp_path, rng, dtype):
    """R9 (run.py _finish_row: 'return v.astype(NP_DTYPES[source.dtype]), i' -> 'return v, i'): top_k of
    rows folded in column chunks returns values in the logits' dtype, as in memory, equal to the k
    largest values of each row (float64 NumPy sort)."""
    x = rng.standard_normal((3, 40000)).astype(dtype)
    np.save(tmp_path / "w.npy", x)
    k = 5
    v, i = fl.top_k(fl.open(tmp_path / "w.npy", memory="64KiB"), k=k)
    assert v.dtype == dtype and i.dtype == np.int64 and v.shape == i.shape == (3, k)
    want = -np.sort(-x.astype(np.float64), axis=1)[:, :k]
    np.testing.assert_array_equal(v.astype(np.float64), want)
    np.testing.assert_array_equal(np.take_along_axis(x, i, axis=1), v)


@pytest.mark.parametrize("out_dtype", [np.float64, np.float16])
def test_streamed_map_refuses_an_out_whose_dtype_disagrees_with_dtype(tmp_path, rng, out_dtype):
    """R12 (run.py _Sink: 'if out.dtype != self.dtype:' -> 'if False:'): as in memory (which raises
    'dtype=... disagrees with out.dtype'), a streamed softmax given dtype='float32' and an out array of
    another dtype raises, and leaves out unwritten."""
    x = rng.standard_normal((4, 33)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    out = np.zeros((4, 33), out_dtype)
    want = f"^softmax: dtype=float32 disagrees with out.dtype={np.dtype(out_dtype).name}$"
    with pytest.raises(ValueError, match=want):
        fl.softmax(x, out=out, dtype="float32")
    with pytest.raises(ValueError, match=want):
        fl.softmax(fl.open(tmp_path / "a.npy"), out=out, dtype="float32")
    assert not out.any()


@pytest.mark.parametrize("V", [100, 257, 999])
def test_streamed_softmax_to_npy_of_a_many_axis_source_is_a_valid_npy(tmp_path, rng, V):
    """R15 (run.py _write_npy_header: '+ 10 + 64 + 63' -> '+ 10 + 63'): the header written for a
    shape whose header dict is 118 characters long (20 leading axes of 1 and a 3-digit V: len(d) + 10
    is a multiple of 64) must still be padded and end in a newline, so that np.load reads the file back
    (the mutant leaves no room: the declared header length misses its last byte and the data shifts)."""
    shape = (1,) * 20 + (V,)
    d = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape!r}, }}"
    assert (len(d) + 10) % 64 == 0          # the case the padding rule must cover
    x = rng.standard_normal(shape).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    fl.softmax(fl.open(tmp_path / "x.npy"), out=tmp_path / "p.npy")
    raw = (tmp_path / "p.npy").read_bytes()
    hlen = int.from_bytes(raw[8:10], "little")
    assert (10 + hlen) % 64 == 0 and raw[10 + hlen - 1:10 + hlen] == b"\n"
    got = np.load(tmp_path / "p.npy")
    x64 = x.astype(np.float64)
    want = np.exp(x64 - x64.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("make", [lambda: fl.stream.accumulators.LogSumExp(2),
                                  lambda: fl.stream.accumulators.CrossEntropy(np.array([0, 1])),
                                  lambda: fl.stream.accumulators.TopK(2, 1)])
def test_accumulator_update_refuses_a_negative_start(rng, make):
    """A2 (accumulators.py _check_chunk: ' or int(start) < 0' -> ''): a negative start column is refused
    (a CrossEntropy would otherwise look for labels at columns that do not exist), and nothing is
    folded in."""
    acc = make()
    chunk = rng.standard_normal((2, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="start must be a non-negative integer column index, got -1"):
        acc.update(chunk, start=-1)
    assert acc.columns == 0


@pytest.mark.parametrize("asked", ["float32", "float64", "float16"])
def test_open_npy_refuses_a_dtype_the_file_does_not_hold(tmp_path, rng, asked):
    """Q6 (sources.py open_npy: 'if dtype is not None and dtype_name(dtype) != name:' -> 'if False:'):
    fl.open(path, dtype=...) of a .npy file holding another float dtype raises SourceError naming both,
    instead of quietly reading the file's own dtype."""
    file_dtype = np.float32 if asked == "float16" else np.float16
    x = rng.standard_normal((4, 50)).astype(file_dtype)
    np.save(tmp_path / "h.npy", x)
    with pytest.raises(fl.SourceError, match=f"dtype='{asked}' was asked for, but the file holds "
                                             f"{np.dtype(file_dtype).name}"):
        fl.open(tmp_path / "h.npy", dtype=asked)
    assert fl.open(tmp_path / "h.npy", dtype=np.dtype(file_dtype).name).dtype == np.dtype(file_dtype).name


@pytest.mark.parametrize("extra", [1, 4, 8])
def test_open_npy_refuses_a_few_bytes_past_the_headers_shape(tmp_path, rng, extra):
    """Q7 (sources.py open_npy: 'if extra > 0:' -> 'if extra > 8:'): even one byte past the data the
    header's shape describes (np.save writes none) is refused, with the count."""
    x = rng.standard_normal((4, 50)).astype(np.float32)
    np.save(tmp_path / "t.npy", x)
    with open(tmp_path / "t.npy", "ab") as f:
        f.write(b"\0" * extra)
    with pytest.raises(fl.SourceError, match=rf"its header's shape \(4, 50\) of float32 describes 800 bytes "
                                             rf"of data after a 128-byte header, found {extra} bytes more"):
        fl.open(tmp_path / "t.npy")


def _safetensors(path, entries, data):
    h = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.mark.parametrize("extra", [1, 4, 400])
def test_a_safetensors_entry_spanning_more_bytes_than_its_shape_is_refused(tmp_path, rng, extra):
    """Q13 (sources.py _st_entry: 'if b1 - b0 != need:' -> 'if b1 - b0 < need:'): a tensor whose
    data_offsets span more bytes than its shape and dtype need is a corrupt header, refused (as the
    safetensors library refuses it), not read as the first `need` bytes."""
    x = rng.standard_normal((4, 50)).astype(np.float32)
    data = x.tobytes() + b"\0" * extra
    _safetensors(tmp_path / "s.safetensors",
                 {"x": {"dtype": "F32", "shape": [4, 50], "data_offsets": [0, len(data)]}}, data)
    with pytest.raises(fl.SourceError, match=rf"tensor 'x': shape \[4, 50\] of float32 needs 800 bytes, its "
                                             rf"offsets span {800 + extra}"):
        fl.open(tmp_path / "s.safetensors")


@pytest.mark.parametrize("fn", [fl.softmax, fl.log_softmax])
@pytest.mark.parametrize("out_dtype", [np.float64, np.float16])
def test_in_memory_map_refuses_an_out_whose_dtype_disagrees_with_dtype(rng, fn, out_dtype):
    """D2 (reductions.py _map: 'if dtype is not None and dtype_name(dtype) != out_name:' -> 'if False:'):
    dtype='float32' with a NumPy out of another dtype raises, naming both, and out is left unwritten."""
    x = rng.standard_normal((4, 33)).astype(np.float32)
    out = np.zeros((4, 33), out_dtype)
    name = np.dtype(out_dtype).name
    for dtype in ("float32", np.float32, np.dtype(np.float32)):       # named alike (not a class's repr)
        want = f"^{fn.__name__}: dtype=float32 disagrees with out.dtype={name}$"
        with pytest.raises(ValueError, match=want):
            fn(x, out=out, dtype=dtype)
    assert not out.any()


@pytest.mark.parametrize("V", [5, 1000])
def test_out_of_range_label_message_names_the_last_valid_class(rng, V):
    """D6 (reductions.py label_error: '(valid: 0..{V - 1}' -> '(valid: 0..{V}'): the error for a label V
    (one past the last class) names the valid range 0..V-1, as the classes are 0-based."""
    x = rng.standard_normal((3, V)).astype(np.float32)
    y = np.array([0, V, 1])
    with pytest.raises(IndexError, match=rf"labels: label {V} at row 1 is out of range for {V} classes "
                                         rf"\(valid: 0\.\.{V - 1}, or ignore_index=-100\)"):
        fl.cross_entropy(x, y)


@pytest.mark.parametrize("z", [float("inf"), np.float32("inf")])
def test_z_loss_of_infinity_is_refused(rng, z):
    """D9 (reductions.py check_ce_options: 'z >= 0 and math.isfinite(z)' -> 'z >= 0'): z_loss = inf is
    refused (a finite float >= 0), in memory and by the CrossEntropy accumulator."""
    x = rng.standard_normal((3, 5)).astype(np.float32)
    y = np.array([0, 4, 2])
    with pytest.raises(ValueError, match="z_loss must be a finite float >= 0, got "):
        fl.cross_entropy(x, y, z_loss=z)
    with pytest.raises(ValueError, match="z_loss must be a finite float >= 0, got "):
        fl.stream.accumulators.CrossEntropy(y, z_loss=z)


@pytest.mark.parametrize("ignore_index", [2**63, 2**64, -2**63 - 1])
def test_ignore_index_past_int64_is_refused(rng, ignore_index):
    """D10 (reductions.py check_ignore_index: '-2**63 <= i < 2**63' -> '-2**63 <= i <= 2**63'):
    2**63 (one past int64's largest) is refused with the documented ValueError, as PyTorch's int64
    ignore_index cannot hold it; int64's own bounds are accepted."""
    x = rng.standard_normal((3, 5)).astype(np.float32)
    y = np.array([0, 4, 2])
    with pytest.raises(ValueError, match=f"ignore_index must fit in int64, got {ignore_index}"):
        fl.cross_entropy(x, y, ignore_index=ignore_index)
    x64 = x.astype(np.float64)
    lse = np.log(np.exp(x64).sum(1))
    want = np.mean(lse - x64[np.arange(3), y])
    for ok in (2**63 - 1, -2**63):
        np.testing.assert_allclose(fl.cross_entropy(x, y, ignore_index=ok), want, rtol=1e-5)


@pytest.mark.parametrize("label", [0, 2])
def test_mean_of_zero_weight_targets_over_nan_logits_is_nan(label):
    """D11 (reductions.py _ieee_div: 'if a == 0 or math.isnan(a):' -> 'if a == 0:'): as PyTorch,
    "mean" is sum(w[y] * nll) / sum(w[y]); with every target's weight 0 and a NaN logit in a row the
    numerator is NaN (0 * NaN) and the denominator 0, so the loss is NaN / 0 = NaN, not +-inf."""
    x = np.zeros((2, 4))
    x[0, 1] = np.nan
    w = np.array([1.0, 1.0, 1.0, 1.0])
    w[label] = 0.0
    y = np.array([label, label])
    per_row = fl.cross_entropy(x, y, weight=w, reduction="none")
    assert np.isnan(per_row[0])
    with np.errstate(invalid="ignore", divide="ignore"):      # the float64 reference: NaN / 0
        nll = np.log(np.exp(x).sum(1)) - x[np.arange(2), y]
        want = np.sum(w[y] * nll) / np.sum(w[y])
    assert np.isnan(want)
    assert np.isnan(fl.cross_entropy(x, y, weight=w))
    assert np.isnan(fl.cross_entropy(x.astype(np.float32), y, weight=w))


# Found by a mutation audit of 2026-12-01 (evening): each of these fails for a change the suite let pass.

@pytest.mark.parametrize("make", [lambda r: fl.stream.LogSumExp(r), lambda r: fl.stream.Entropy(r),
                                  lambda r: fl.stream.TopK(r, 2),
                                  lambda r: CrossEntropy(np.zeros(r, np.int64))],
                         ids=["LogSumExp", "Entropy", "TopK", "CrossEntropy"])
def test_accumulator_chunks_of_another_row_count_are_refused(make):
    """accumulators._check_chunk ('or x.shape[0] != self.rows' dropped): a chunk with more rows than the
    accumulator's made the kernels write past its states (a 1-row temperature broadcast to 4 rows; glibc
    then aborted), one with fewer left rows out."""
    for rows, got in ((1, 4), (3, 2)):
        acc = make(rows)
        with pytest.raises(ValueError, match=rf"chunk must have shape \(rows, c\) = \({rows}, c\), got "
                                             rf"\({got}, 5\)"):
            acc.update(np.zeros((got, 5), np.float32), 0)


def test_compensated_sums_when_a_large_term_comes_after_a_small_sum():
    """_reduce.add_to (Neumaier's 'else' branch, a term larger than the running sum, taken as the other):
    losses log 3, 1e16 log 3, -1e16 log 3 (class weights 1, 1e16, -1e16) sum to log 3, and their mean over
    the target weights (which sum to 1) too; a plain or one-branch sum gives 2 and inf."""
    x = np.zeros((3, 3))
    y = np.array([0, 1, 2])
    w = np.array([1.0, 1e16, -1e16])
    assert fl.cross_entropy(x, y, weight=w, reduction="sum") == pytest.approx(math.log(3), rel=1e-15)
    assert fl.cross_entropy(x, y, weight=w) == pytest.approx(math.log(3), rel=1e-15)
    from fastlogits.cpu import _reduce

    assert _reduce.compensated_sum(np.array([1.0, 1e100, 1.0, -1e100])) == 2.0


def test_label_smoothing_total_weight_of_weights_as_the_kernels_read_them():
    """The total class weight that label smoothing divides by is summed from the weights rounded to the
    compute dtype, as the kernels read them (weight_sum of the float64 weights, in memory, or the
    accumulator's unrounded ones): float32(1e8 + 1) is 1e8, so weights (1e8 + 1, 1, -1e8) weigh 1 in all,
    and with label_smoothing=1 the loss of zero logits is log(3) / 3 (2 log(3) / 3 with the unrounded
    total)."""
    x = np.zeros((1, 3), np.float32)
    w = np.array([1e8 + 1, 1, -1e8])
    want = math.log(3) / 3
    got = fl.cross_entropy(x, np.array([1]), weight=w, label_smoothing=1.0, reduction="none")
    np.testing.assert_allclose(got, [want], rtol=1e-6)
    acc = CrossEntropy(np.array([1]), weight=w, label_smoothing=1.0, reduction="none")
    acc.update(x[:, :2], 0)
    acc.update(x[:, 2:], 2)
    np.testing.assert_allclose(acc.result(), [want], rtol=1e-6)


def test_streamed_sample_refuses_per_row_values_longer_than_its_rows(rng):
    """sample_source (its closing check_rows dropped): as R5 for the reductions, per-row temperatures,
    top-k and seeds with more values than an iterable source's rows raise, not silently truncated."""
    x = rng.standard_normal((10, 37)).astype(np.float32)
    for kw, name in ((dict(temperature=np.ones(10)), "temperature"), (dict(top_k=np.full(10, 5)), "top_k"),
                     (dict(seed=np.arange(10, dtype=np.uint64)), "seed")):
        kw.setdefault("seed", 0)
        with pytest.raises(ValueError, match=f"{name} has 10 values, but the source has 3 rows"):
            sample(iter([x[:3]]), **kw)


def test_streamed_top_k_checks_k_against_the_vocabulary(tmp_path, rng):
    """run.reduce (its _check_k dropped): k past the vocabulary raises as in memory, for a file of no rows
    (it gave arrays of shape (0, 8)) and for rows wider than the budget (a bare reshape error)."""
    np.save(tmp_path / "e.npy", np.empty((0, 7), np.float32))
    with pytest.raises(ValueError, match="k must be between 0 and the vocabulary size 7, got 8"):
        fl.top_k(fl.open(tmp_path / "e.npy"), 8)
    np.save(tmp_path / "w.npy", rng.standard_normal((2, 40000)).astype(np.float32))
    for fn in (fl.top_k, fl.top_k_logprobs):
        with pytest.raises(ValueError, match="k must be between 0 and the vocabulary size 40000, got 40001"):
            fn(fl.open(tmp_path / "w.npy", memory="64KiB"), 40001)


def test_stats_refuses_more_labels_than_rows(tmp_path, rng):
    """run.stats (its lab.check_rows dropped): ten labels for one row read from standard input raise,
    naming both counts (the command line said 'boolean index did not match')."""
    import subprocess
    import sys

    from fastlogits.stream import run

    x = rng.standard_normal((1, 37)).astype(np.float32)
    with pytest.raises(ValueError, match="labels has 10 values, but the source has 1 rows"):
        run.stats(iter([x]), np.zeros(10, np.int64))
    (tmp_path / "y.txt").write_text("0\n" * 10)
    res = subprocess.run([sys.executable, "-m", "fastlogits.cli", "stats", "-", "--dtype", "float32",
                          "--vocab", "37", "--labels", str(tmp_path / "y.txt")], input=x.tobytes(),
                         capture_output=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert b"labels has 10 values, but the source has 1 rows" in res.stderr, res.stderr


def test_progress_of_c_ordered_rows_wider_than_the_budget_counts_each_row_once(tmp_path, rng):
    """run.folded_rows ('progress(int(c0 + chunk.shape[1] == source.V), ...)' -> 'progress(1, ...)'): a row
    folded in column chunks is counted once, when its last chunk is in, and every byte is (the Fortran
    case had a test; a C-ordered file's progress bar counted a row a chunk)."""
    from fastlogits.stream import run

    x = rng.standard_normal((3, 40000)).astype(np.float32)
    np.save(tmp_path / "w.npy", x)
    counts = []
    got = run.reduce("logsumexp", fl.open(tmp_path / "w.npy", memory="64KiB"), {},
                     progress=lambda rows, nbytes: counts.append((rows, nbytes)))
    np.testing.assert_allclose(got, fl.logsumexp(x), rtol=2e-6)
    assert len(counts) > 3 and sum(r for r, _ in counts) == 3 and sum(b for _, b in counts) == x.nbytes


def test_num_samples_must_fit_the_counter_word():
    """_num_samples ('< 2**32' dropped): the sample index is a 32-bit word of the random counter, so
    num_samples=2**32 would repeat draws; it is refused, even for no rows."""
    with pytest.raises(ValueError, match=r"num_samples must be a positive integer below 2\*\*32"):
        sample(np.zeros((0, 3)), num_samples=2**32)
    assert sample(np.zeros((0, 3)), num_samples=2**32 - 1, seed=0).shape == (0, 2**32 - 1)
