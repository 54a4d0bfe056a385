"""`fastlogits bench`, `check` and `demo` on the command line: bench checks the results it times, every
command parses --memory and names a bad option, thread counts are checked before any work, and demo
reports the threads it ran on. (CPU only, tiny sizes.)"""
import json

import numpy as np
import pytest

import fastlogits as fl
from fastlogits import bench
from fastlogits.cli import main

from . import reference as ref

BENCH = ["bench", "--rows", "8", "--vocab", "40", "--repeat", "1", "--threads", "1", "--no-peers",
         "--backend", "cpu"]


@pytest.mark.parametrize("op", ["logsumexp", "cross_entropy", "softmax", "top_k"])
def test_bench_fails_a_fast_wrong_result(monkeypatch, capsys, op):
    """A fastlogits op that returns garbage fast was reported as thousands of times faster than PyTorch,
    exit 0 (found by an audit): the result is checked against the float64 reference, and a wrong one is an
    error naming the op and dtype, exit 1."""
    real = getattr(fl, op)

    def wrong(*args, **kw):
        r = real(*args, **kw)
        if op == "top_k":
            return r[0] * np.float32(1 + 1e-3), r[1]
        return (np.asarray(r) * (1 + 1e-3)).astype(np.asarray(r).dtype)

    monkeypatch.setattr(fl, op, wrong)
    assert main(BENCH + ["--ops", op, "--dtypes", "float32"]) == 1
    captured = capsys.readouterr()
    assert f"error: fastlogits {op} float32 on the CPU" in captured.err and "wrong result" in captured.err
    assert "WRONG RESULT" in captured.out


def test_bench_passes_right_results_of_every_op_and_dtype(capsys):
    assert main(BENCH + ["--ops", *bench.OPS, "--dtypes", *bench.DTYPES, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ops = [r for r in out["results"] if r["library"] == "fastlogits"]
    assert len(ops) == len(bench.OPS) * len(bench.DTYPES) and all(r["ok"] for r in ops)


def test_bench_reference_is_the_float64_reference(rng):
    x = (rng.standard_normal((3, 50)) * 3).astype(np.float32)
    y = rng.integers(0, 50, 3)
    np.testing.assert_allclose(bench.reference("logsumexp", x, y), ref.logsumexp(x), rtol=1e-7)
    np.testing.assert_allclose(bench.reference("cross_entropy", x, y),
                               np.mean(ref.logsumexp(x) - x[np.arange(3), y]), rtol=1e-7)
    np.testing.assert_allclose(bench.reference("softmax", x, y), ref.softmax(x), rtol=1e-6)
    v, i = bench.reference("top_k", x, y, k=4)
    np.testing.assert_array_equal(i, np.argsort(-x, axis=1, kind="stable")[:, :4])
