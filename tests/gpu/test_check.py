"""`fastlogits check` (fastlogits/check.py) under the simulator, on small shapes: every operation and dtype
is compared and passes; a GPU result that is off is reported as failing, by the table and the exit status."""
import argparse
import functools

import numpy as np
import pytest

import fastlogits as fl
from fastlogits import check

OPS = {"logsumexp", "entropy", "softmax", "log_softmax", "cross_entropy", "cross_entropy_mean_device",
       "argmax", "top_k_indices", "top_k_logprobs", "sample", "beam_search_step_scores",
       "beam_search_step_choices"}

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_check_compares_every_op_and_dtype(gpu, rng):
    res = check.run(V_list=[37], rows=1, sample_shape=(3, 37), seed=int(rng.integers(2**32)))
    assert {r["op"] for r in res} == OPS
    assert {r["dtype"] for r in res} == set(check.DTYPES)
    assert [r for r in res if not r["ok"]] == []
    ce = [r for r in res if r["op"] == "cross_entropy_mean_device"]
    assert len(ce) == 4 and all(np.isfinite(r["max_diff"]) for r in ce)


@pytest.mark.parametrize("op", ["logsumexp", "cross_entropy"])
def test_check_reports_a_wrong_gpu_result(gpu, monkeypatch, capsys, op):
    real = getattr(fl, op)

    def off(*args, backend=None, **kw):       # the GPU's result, 1e-3 relative too large
        r = real(*args, backend=backend, **kw)
        if backend == "cpu":
            return r
        host = r.copy_to_host() if hasattr(r, "copy_to_host") else np.asarray(r)
        return host * (1 + 1e-3)

    monkeypatch.setattr(fl, op, off)
    monkeypatch.setattr(check, "run", functools.partial(check.run, V_list=[37], rows=1, sample_shape=(2, 37),
                                                         dtypes=("float32",)))
    assert check.main(argparse.Namespace(json=False)) == 1
    table = capsys.readouterr().out
    failing = {line.split("|")[1].strip() for line in table.splitlines() if line.endswith("FAIL |")}
    assert failing == ({op, "cross_entropy_mean_device"} if op == "cross_entropy" else {op})
    assert "passed, " in table and " failed" in table


def test_sixteen_bit_outputs_may_differ_by_one_unit_subnormals_included():
    """A 16-bit output may differ by one unit of its rounding: relative above the subnormals, their spacing
    among them (float16 softmax probabilities of a long row are mostly subnormal), never two units."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 64)).astype(np.float16)
    f16_sub = np.array([[1, 37, 900, 1000]], np.float64) * 2.0**-24            # float16 subnormals
    normal = np.array([[0.5, 0.25, 2.0**-3, 1.0]])
    cases = [("float16", f16_sub, np.full(f16_sub.shape, 2.0**-24))]
    cases += [(dtype, normal, normal * check.ROUND[dtype]) for dtype in ("float16", "bfloat16")]
    for dtype, w, unit in cases:
        assert check._compare("softmax", w + unit, w, x[:1], dtype, out_dtype=dtype)[1]
        assert check._compare("softmax", w - unit, w, x[:1], dtype, out_dtype=dtype)[1]
        assert not check._compare("softmax", w + 2.5 * unit, w, x[:1], dtype, out_dtype=dtype)[1]


def test_check_runs_the_cpu_on_the_threads_asked_for(gpu, monkeypatch, capsys):
    """`fastlogits check --threads N`: every CPU call of the check runs on N threads, and still agrees."""
    seen = []
    real_resolve = fl._config.resolve_threads

    def resolve(threads, *args):
        seen.append(threads)
        return real_resolve(threads, *args)

    monkeypatch.setattr(fl._config, "resolve_threads", resolve)
    monkeypatch.setattr(check, "run", functools.partial(check.run, V_list=[37], rows=1, sample_shape=(2, 37),
                                                         dtypes=("float32",)))
    assert check.main(argparse.Namespace(json=True, threads=3)) == 0
    assert seen and set(seen) == {3}
    assert '"failed": 0' in capsys.readouterr().out


def test_a_non_finite_value_on_one_backend_is_an_infinite_difference():
    """A NaN or an infinity on one backend only was reported as a largest difference of 0 (the differences
    were taken where both were finite; found by an audit agent); it is inf, and a failure. (No GPU needed:
    the comparison alone.)"""
    x = np.zeros((3, 4))
    want = np.array([1.0, 2.0, np.inf])
    for got in ([np.nan, 2.0, np.inf], [1.0, np.inf, np.inf], [1.0, 2.0, -np.inf], [1.0, 2.0, 3.0]):
        assert check._compare("logsumexp", np.array(got), want, x, "float32") == (np.inf, False)
    assert check._compare("logsumexp", want.copy(), want, x, "float32") == (0.0, True)
    both_nan = np.array([np.nan, 2.0, np.inf])
    assert check._compare("logsumexp", both_nan, both_nan.copy(), x, "float32") == (0.0, True)


def test_the_log_domain_tolerance_scales_with_x_over_t():
    """The documented tolerance is 2e-5 x (1 + the row's largest |x / T|): with T = 0.5 the scale
    doubles (it used |x|)."""
    x = np.full((1, 4), 100.0)
    want = np.array([0.0])
    err = 2e-5 * (1 + 150)                     # inside 2e-5 (1 + 200), outside 2e-5 (1 + 100)
    assert check._compare("logsumexp", want + err, want, x, "float32", temperature=np.array([0.5]))[1]
    assert not check._compare("logsumexp", want + err, want, x, "float32")[1]
