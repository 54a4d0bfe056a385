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
