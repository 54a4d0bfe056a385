"""`fastlogits check` (fastlogits/check.py) under the simulator, on small shapes: every operation and dtype
is compared and passes; a GPU result that is off is reported as failing, by the table and the exit status."""
import argparse
import functools
import json

import numpy as np
import pytest

import fastlogits as fl
from fastlogits import check

OPS = {name for names in check.OPS.values() for name in names}

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_check_compares_every_op_and_dtype(gpu, rng):
    res = check.run(V_list=[37], rows=1, sample_shape=(3, 37), seed=int(rng.integers(2**32)))
    assert {r["op"] for r in res} == OPS
    assert {r["dtype"] for r in res} == set(check.DTYPES)
    assert [r for r in res if not r["ok"]] == []
    ce = [r for r in res if r["op"] == "cross_entropy_mean_device"]
    assert len(ce) == 4 and all(np.isfinite(r["max_diff"]) for r in ce)
    # sampling too, in every dtype (it was float32 and bfloat16 alone: `--ops sample --dtypes float16`
    # compared nothing, and passed)
    assert {r["dtype"] for r in res if r["op"] == "sample"} == set(check.DTYPES)


def test_a_check_that_compares_nothing_fails(gpu, monkeypatch):
    monkeypatch.setattr(check, "run", lambda **kw: [])
    with pytest.raises(ValueError, match="nothing was compared"):
        check.main(argparse.Namespace(json=False, ops=["sample"], dtypes=["float16"]))


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


def _small(**kw):
    return functools.partial(check.run, V_list=[37], rows=1, sample_shape=(4, 37), dtypes=("float32",), **kw)


def _failing(monkeypatch, capsys, *ops):
    """`fastlogits check` of these ops (float32, tiny shapes): (exit status, the results' names that FAIL)."""
    monkeypatch.setattr(check, "run", _small(ops=ops))
    rc = check.main(argparse.Namespace(json=False, threads=1))
    table = capsys.readouterr().out
    return rc, {line.split("|")[1].strip() for line in table.splitlines() if line.endswith("FAIL |")}


def _on_gpu(monkeypatch, op, change):
    """fl.<op> whose GPU result goes through change(result, kwargs); the CPU's is left alone."""
    real = getattr(fl, op)

    def patched(*args, backend=None, **kw):
        r = real(*args, backend=backend, **kw)
        return r if backend == "cpu" else change(r, kw)

    monkeypatch.setattr(fl, op, patched)


def _host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def _off(a):
    """A GPU result 1e-3 relative off, in its own dtype."""
    a = _host(a)
    return (a * (1 + 1e-3)).astype(a.dtype)


def _nth(i, change):
    return lambda r, kw: tuple(change(a) if j == i else a for j, a in enumerate(r))


# (op, the GPU result changed, the results expected to fail): values 1e-3 relative off, in every value
# output of every op; a float64 softmax of float32 logits; the log-probabilities and ranks of sample
WRONG = {
    "logsumexp": ("logsumexp", lambda r, kw: _off(r), {"logsumexp"}),
    "entropy": ("entropy", lambda r, kw: _off(r), {"entropy"}),
    "softmax": ("softmax", lambda r, kw: _off(r), {"softmax"}),
    "softmax_float64": ("softmax", lambda r, kw: _host(r).astype(np.float64), {"softmax"}),
    "log_softmax": ("log_softmax", lambda r, kw: _off(r), {"log_softmax"}),
    "cross_entropy": ("cross_entropy", lambda r, kw: _off(r), {"cross_entropy", "cross_entropy_mean_device"}),
    "top_k_values": ("top_k", _nth(0, _off), {"top_k_values"}),
    "top_k_logprobs": ("top_k_logprobs", _nth(0, _off), {"top_k_logprobs"}),
    "beam_scores": ("beam_search_step", _nth(0, _off), {"beam_search_step_scores"}),
    "sample_logprobs": ("sample", lambda r, kw: _nth(1, _off)(r, kw) if kw.get("return_logprobs") else r,
                        {"sample_logprobs"}),
    "sample_ranks": ("sample", lambda r, kw: _nth(2, lambda a: _host(a) + 1)(r, kw)
                     if kw.get("return_logprobs") else r, {"sample_ranks"}),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_check_fails_a_wrong_value_or_dtype_of_any_output(gpu, monkeypatch, capsys, case):
    """Every value output of every op is compared, and its dtype: top_k's values, sample's log-probabilities
    and ranks, and a softmax of the wrong dtype passed before (only indices, tokens and float64 values
    were compared; found by an audit)."""
    op, change, expected = WRONG[case]
    _on_gpu(monkeypatch, op, change)
    rc, failing = _failing(monkeypatch, capsys, *({op} | expected if op == "cross_entropy" else {op}))
    assert rc == 1
    assert failing == expected


@pytest.mark.parametrize("option", ["temperature", "softcap"])
@pytest.mark.parametrize("op", ["softmax", "logsumexp", "top_k_logprobs"])
def test_check_fails_a_gpu_that_ignores_an_option(gpu, monkeypatch, capsys, op, option):
    """No map or reduction was run with a temperature or a softcap (softmax had a softcap only): a GPU
    that ignored them passed."""
    real = getattr(fl, op)

    def ignoring(*args, backend=None, **kw):
        if backend != "cpu":
            kw.pop(option, None)
        return real(*args, backend=backend, **kw)

    monkeypatch.setattr(fl, op, ignoring)
    rc, failing = _failing(monkeypatch, capsys, op)
    assert rc == 1 and failing == {op}


@pytest.mark.parametrize("option", ["weight", "ignore_index", "label_smoothing", "z_loss", "temperature",
                                    "softcap"])
def test_check_fails_a_gpu_cross_entropy_that_ignores_an_option(gpu, monkeypatch, capsys, option):
    real = fl.cross_entropy

    def ignoring(*args, backend=None, **kw):
        if backend != "cpu":
            kw.pop(option, None)
        return real(*args, backend=backend, **kw)

    monkeypatch.setattr(fl, "cross_entropy", ignoring)
    rc, failing = _failing(monkeypatch, capsys, "cross_entropy", "cross_entropy_mean_device")
    assert rc == 1
    assert "cross_entropy" in failing


@pytest.mark.parametrize("part", [0, 1, 2])
def test_check_runs_the_gpu_fused_stats_pass(gpu, monkeypatch, capsys, part):
    """fastlogits.gpu.backend.stats (`fastlogits stats`, `demo --backend gpu`) was never checked: an NLL
    1 nat off passed. Its NLL and entropy 1e-3 relative off, or its argmax off by one, fail."""
    real = gpu.stats

    def wrong(*args, **kw):
        out = list(real(*args, **kw))
        a = _host(out[part])
        out[part] = a + 1 if part == 2 else a * (1 + 1e-3)
        return tuple(out)

    monkeypatch.setattr(gpu, "stats", wrong)
    rc, failing = _failing(monkeypatch, capsys, "stats")
    assert rc == 1 and failing == {("stats_nll", "stats_entropy", "stats_argmax")[part]}


def test_check_of_some_ops_passes_unperturbed(gpu, monkeypatch, capsys):
    """The same small runs, unperturbed, pass (the ops the tests above perturb, one dtype)."""
    monkeypatch.setattr(check, "run", _small(ops=("stats", "sample", "top_k", "softmax")))
    assert check.main(argparse.Namespace(json=True, threads=1)) == 0
    out = capsys.readouterr().out
    assert '"failed": 0' in out
    for name in ("stats_nll", "stats_entropy", "stats_argmax", "sample_logprobs", "sample_ranks",
                 "top_k_values", "top_k_indices", "softmax"):
        assert f'"op": "{name}"' in out


def test_check_gives_the_gpu_device_logits_too(gpu, monkeypatch, capsys):
    """Every op but the stats pass (which reads host rows, as from a dump) is compared with host logits and,
    for every other (dtype, V), with device logits, whose results stay on the device: a GPU that is off
    only for device logits fails the check."""
    from fastlogits.ops._prep import is_gpu_array

    res = check.run(V_list=[37, 38], rows=1, sample_shape=(3, 37), dtypes=("float32", "bfloat16"),
                    ops=[op for op in check.OPS if op != "sample"])
    assert [r for r in res if not r["ok"]] == []
    inputs = {}
    for r in res:
        inputs.setdefault(r["op"], set()).add(r["input"])
    for name, where in inputs.items():
        want = {"stats_nll": {"host"}, "stats_entropy": {"host"}, "stats_argmax": {"host"},
                "cross_entropy_mean_device": {"device"}}.get(name, {"host", "device"})
        assert where == want, name
    real = fl.logsumexp

    def off(x, **kw):                  # 1e-3 relative too large, for device logits only
        r = real(x, **kw)
        return r.copy_to_host() * (1 + 1e-3) if is_gpu_array(x) else r

    monkeypatch.setattr(fl, "logsumexp", off)
    monkeypatch.setattr(check, "run", functools.partial(check.run, V_list=[37, 38], rows=1,
                                                         dtypes=("float32",), ops=("logsumexp",)))
    assert check.main(argparse.Namespace(json=False)) == 1
    table = capsys.readouterr().out
    assert "| logsumexp | float32 | host | 37 | " in table and table.count("FAIL") == 1
    assert "| logsumexp | float32 | device | 38 | " in table


def test_check_draws_with_one_seed_for_all_rows_too(gpu, monkeypatch, capsys):
    """Sampling is compared with per-row seeds (every row's random numbers keyed by row 0) and with one
    seed (keyed by each row's index): a GPU that keys every row by row 0 fails the check (it passed when
    only per-row seeds were compared)."""
    for name in ("sample", "sample_device"):
        real = getattr(gpu, name)

        def row_zero(x, dtype, temperature, softcap, top_k, top_p, min_p, seeds, row_ids, *args, real=real):
            return real(x, dtype, temperature, softcap, top_k, top_p, min_p, seeds, np.zeros_like(row_ids),
                        *args)

        monkeypatch.setattr(gpu, name, row_zero)
    monkeypatch.setattr(check, "run", functools.partial(check.run, V_list=[37], rows=1, sample_shape=(8, 50),
                                                         dtypes=("float32",), ops=("sample",)))
    assert check.main(argparse.Namespace(json=True)) == 1
    out = capsys.readouterr().out
    res = [r for r in json.loads(out)["results"] if r["op"] == "sample"]
    assert [(r["input"], r["ok"]) for r in res] == [("host", True), ("device", False)]
