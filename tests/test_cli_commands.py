"""`fastlogits bench`, `check` and `demo` on the command line: bench checks the results it times, every
command parses --memory and names a bad option, thread counts are checked before any work, and demo
reports the threads it ran on. (CPU only, tiny sizes.)"""
import json
import os

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


def test_bench_json_says_what_produced_its_figures(capsys):
    """--json gave fastlogits' configuration alone: not the peers' versions, the processor, the number of
    repeats or the statistic (a bench audit)."""
    import importlib.metadata
    import platform

    assert main(BENCH + ["--ops", "logsumexp", "--dtypes", "float32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    env = out["environment"]
    assert env["numpy"] == importlib.metadata.version("numpy") and env["python"] == platform.python_version()
    assert env["cpus"] == os.cpu_count() and 1 <= env["usable_cpus"] <= env["cpus"] and env["cpu"]
    assert (out["repeat"], out["statistic"]) == (1, "median")


def test_bench_leaves_torchs_thread_count_as_it_was():
    """run() set PyTorch's thread count for its measurements and left it there (a bench audit)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        bench.run(rows=4, vocab=100, ops=("logsumexp",), dtypes=("float32",), threads=[1], repeat=1)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_bench_reference_is_the_float64_reference(rng):
    x = (rng.standard_normal((3, 50)) * 3).astype(np.float32)
    y = rng.integers(0, 50, 3)
    np.testing.assert_allclose(bench.reference("logsumexp", x, y), ref.logsumexp(x), rtol=1e-7)
    np.testing.assert_allclose(bench.reference("cross_entropy", x, y),
                               np.mean(ref.logsumexp(x) - x[np.arange(3), y]), rtol=1e-7)
    np.testing.assert_allclose(bench.reference("softmax", x, y), ref.softmax(x), rtol=1e-6)
    v, i = bench.reference("top_k", x, y, k=4)
    np.testing.assert_array_equal(i, np.argsort(-x, axis=1, kind="stable")[:, :4])


def _one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", [["bench", "--rows", "2", "--vocab", "8", "--repeat", "1", "--no-peers",
                                      "--backend", "cpu", "--ops", "logsumexp", "--dtypes", "float32"],
                                     ["check"], ["demo", "--rows", "4", "--vocab", "50"]])
@pytest.mark.parametrize("memory", ["garbage", "", "12"])
def test_every_command_checks_memory(capsys, command, memory):
    """bench and check ignored --memory (garbage ran, exit 0) and demo took '' for its default; all parse
    it as info does: one line naming --memory, and a usage error's exit status, 2 (it was 1, a failure on
    the data's; found by an API audit)."""
    with pytest.raises(SystemExit) as e:
        main(command + ["--memory", memory])
    assert e.value.code == 2
    err = _one_line_error(capsys)
    assert f"fastlogits {command[0]}: error: argument --memory: the budget must be" in err


@pytest.mark.parametrize("args, says", [
    (["topk", "{x}", "{o}.jsonl", "-k", "0"], "argument -k: expected a positive integer, got 0"),
    (["stats", "{x}", "--dtype", "foo"], "argument --dtype: the element type must be float16, bfloat16, "
                                          "float32 or float64, got 'foo'"),
    (["stats", "{x}", "--temperature", "0"], "argument --temperature: expected a finite number > 0, got 0"),
    (["softmax", "{x}", "{o}.npy", "--temperature", "inf"], "argument --temperature: expected a finite "
                                                             "number > 0, got inf"),
    (["topk", "{x}", "{o}.npy", "--temperature", "nan"], "argument --temperature: expected a finite number"),
    (["sample", "{x}", "{o}.npy", "--temperature", "-1"], "argument --temperature: expected a finite number "
                                                           ">= 0 (0: greedy), got -1"),
    (["sample", "{x}", "{o}.npy", "--top-p", "1.5"], "argument --top-p: expected a number in (0, 1], "
                                                      "got 1.5"),
    (["sample", "{x}", "{o}.npy", "--top-p", "0"], "argument --top-p: expected a number in (0, 1], got 0"),
    (["sample", "{x}", "{o}.npy", "--min-p", "2"], "argument --min-p: expected a number in [0, 1], got 2"),
    (["sample", "{x}", "{o}.npy", "--top-k", "-1"], "argument --top-k: expected a non-negative integer"),
    (["sample", "{x}", "{o}.npy", "--seed", "-1"], "argument --seed: expected an integer from 0 to "
                                                    "2**64 - 1"),
    (["sample", "{x}", "{o}.npy", "--seed", str(2**64)], "argument --seed: expected an integer from 0 to"),
    (["stats", "{x}", "--per-row", "{o}.txt"], "argument --per-row: expected a name ending in .npy, .csv or "
                                                ".jsonl"),
    (["stats", "{x}", "extra"], "unrecognized arguments: extra"),
    # topk and sample write CSV for such a name; softmax wrote raw binary rows under it
    (["softmax", "{x}", "{o}.csv"], "argument output: softmax writes .npy or raw rows, not text"),
    (["softmax", "{x}", "{o}.JSONL", "--log"], "argument output: softmax writes .npy or raw rows, not text"),
])
def test_bad_option_values_are_usage_errors(tmp_path, capsys, args, says):
    """A wrong option value is a usage error, found as the command line is parsed, before the input is
    read: exit status 2, one line naming the command and the option as typed (those the library checked
    exited 1, as a failure on the data does, naming its Python argument: top_p for --top-p; an extra
    argument named 'fastlogits', not the command; found by an API audit). Nothing is written."""
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((3, 5), np.float32))
    args = [a.format(x=x, o=tmp_path / "out") for a in args]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"fastlogits {args[0]}: error: {says}"), err
    assert err.rstrip().endswith(f"(see fastlogits {args[0]} --help)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]
    # the edges of each range are accepted
    ok = {"--top-p": "1", "--min-p": "0", "--top-k": "0", "--seed": str(2**64 - 1), "--temperature": "0"}
    if args[0] == "sample" and args[3] in ok:
        assert main(args[:3] + [args[3], ok[args[3]]]) == 0


def test_demo_seed_must_be_non_negative_and_says_so(capsys):
    """`demo --seed -1` said "expected non-negative integer" (NumPy's words), not naming --seed."""
    with pytest.raises(SystemExit) as e:
        main(["demo", "--rows", "4", "--vocab", "50", "--seed", "-1"])
    assert e.value.code == 2
    assert "argument --seed: expected a non-negative integer, got -1" in _one_line_error(capsys)


def test_bench_checks_thread_counts_before_any_work(monkeypatch, capsys):
    """`bench --threads 4097` read the array with 4097 OpenMP threads before the check fired; the command
    line now refuses it as it parses, naming the option (it gave the library's message, "... or None")."""
    from fastlogits.cpu import _info

    def no_work(*a, **k):
        raise AssertionError("the read ceiling ran before the thread count was checked")

    monkeypatch.setattr(_info, "read_sum", no_work)
    with pytest.raises(SystemExit) as e:
        main(["bench", "--rows", "2", "--vocab", "8", "--repeat", "1", "--threads", "4097", "--no-peers",
              "--backend", "cpu"])
    assert e.value.code == 2
    assert "argument --threads: expected an integer from 1 to 4096, got 4097" in _one_line_error(capsys)


def test_the_bench_table_measures_against_the_fastest_read_at_that_thread_count():
    """"% of read ceiling" is against the faster of the reads measured at the row's thread count (the C sum
    or torch.sum), not the slower one, nor another thread count's."""
    res = [
        {"kind": "ceiling", "threads": 1, "library": "fastlogits C sum", "GB/s": 10.0},
        {"kind": "ceiling", "threads": 1, "library": "torch.sum", "GB/s": 20.0},
        {"kind": "ceiling", "threads": 2, "library": "torch.sum", "GB/s": 40.0},
        {"kind": "op", "op": "logsumexp", "dtype": "float32", "threads": 1, "library": "fastlogits",
         "GB/s": 10.0, "rows/s": 1.0, "seconds": 1.0, "ok": True},
    ]
    row = next(line for line in bench.table(res).splitlines() if line.startswith("| logsumexp"))
    assert row.endswith("| 50% |"), row


@pytest.mark.parametrize("threads", [1, 2])
def test_the_read_ceiling_sums_every_value(rng, threads):
    """bench's read ceiling (_info.read_sum: float lanes, four vectors a step, a tail) sums every value of
    every row: a row length that is no multiple of the step, a row shorter than it, one row or several."""
    from fastlogits.cpu import _info

    for shape in [(3, 64 * 5 + 7), (1, 63), (5, 4096), (2, 1)]:
        x = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        want = x.astype(np.float64).sum()
        assert abs(_info.read_sum(x, threads) - want) <= 1e-6 * want, shape


def test_demo_reports_the_threads_its_pass_ran_on(monkeypatch, capsys):
    """`demo --rows 4 --vocab 50` reported the default thread count (2 here), but the pass ran on 1 (the
    default is capped by the work); the count reported is the one the kernels got. `--rows 8 --vocab 1000`
    reported 2: the demo capped the chunk of its thread grain at V, the library does not."""
    from fastlogits import _config

    seen = []
    real = _config.resolve_threads

    def spy(threads, *args):
        seen.append(real(threads, *args))
        return seen[-1]

    monkeypatch.setattr(_config, "default_threads", lambda: 3)
    for argv in (["--rows", "4", "--vocab", "50"], ["--rows", "8", "--vocab", "1000"],
                 ["--rows", "300", "--vocab", "5000"]):
        monkeypatch.setattr(_config, "resolve_threads", real)
        assert main(["demo", *argv, "--json"]) == 0
        reported = json.loads(capsys.readouterr().out)["config"]["threads"]
        seen.clear()
        monkeypatch.setattr(_config, "resolve_threads", spy)
        assert main(["demo", *argv]) == 0
        ran = seen[0]               # the first row block's (the largest)
        assert reported == ran and f"threads={ran}]" in capsys.readouterr().out
    assert ran == 3


def test_the_gpu_table_says_when_it_used_more_rows_than_asked():
    """`bench --backend gpu` silently timed max(--rows, 8192) rows."""
    d = {"logsumexp_GBps": 1.0, "logsumexp_s": 1.0}
    gpu = {"device": "X", "shape": [8192, 40], "copy_GBps": 2.0, "rows_asked": 8, "float32": d}
    assert "8192 rows, not the 8 of --rows" in bench.gpu_table(gpu)
    assert "of --rows" not in bench.gpu_table(dict(gpu, rows_asked=8192))


def test_torch_entropy_peer_is_the_plain_formula(monkeypatch, rng):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.distributions, "Categorical", None)     # not the validating, multi-pass one
    x = (rng.standard_normal((3, 50)) * 3).astype(np.float32)
    got = bench._torch_call(torch, "entropy", torch.from_numpy(x), None)().numpy()
    np.testing.assert_allclose(got, bench.reference("entropy", x, None), rtol=1e-5)


def test_demo_that_cannot_write_its_dump_fails_in_one_line_and_leaves_nothing(tmp_path):
    """The demo's dump was written through a memory map: a full disk was a SIGBUS (exit 135, no message,
    the partial dump left in TMPDIR; an audit's 8 MiB tmpfs). It is written with write() now (below:
    never through a map), and a file that cannot grow (here: a file size limit, with SIGXFSZ ignored, so
    write() fails with EFBIG as a full disk fails it with ENOSPC) is one error line, exit 1, and the
    temporary folder is removed."""
    import os
    import subprocess
    import sys

    code = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
            "from fastlogits.cli import main; raise SystemExit(main(['demo', '--rows', '256']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "fastlogits demo: error:" in res.stderr
    assert "File too large" in res.stderr
    assert os.listdir(tmp_path) == []


def test_demo_writes_its_dump_within_its_budget(monkeypatch):
    """The demo drew 256 rows at a time in float64 (730 MiB for a 128256 vocabulary and a 64 MiB budget):
    its blocks are now sized from the budget, and written without a memory map. Counted by tracemalloc:
    the largest NumPy buffers of the write, then of the streamed pass."""
    import tracemalloc

    def no_map(*args, **kw):
        raise AssertionError("a write through a memory map is a SIGBUS on a full disk")

    monkeypatch.setattr(np.lib.format, "open_memmap", no_map)
    monkeypatch.setattr(np, "memmap", no_map)
    main(["demo", "--rows", "4", "--vocab", "50"])           # (the modules a first call imports)
    tracemalloc.start()
    try:
        assert main(["demo", "--rows", "96", "--vocab", "32000", "--memory", "4MiB"]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * 4 * 2**20, peak / 2**20


@pytest.mark.parametrize("op", ["logsumexp", "softmax"])
def test_bench_checks_the_last_rows_too(monkeypatch, capsys, op):
    """Only the first 4 rows were checked: a result wrong in the rows of the last thread (here rows
    32..63 of 64) passed (found by an audit). The last rows are checked too."""
    real = getattr(fl, op)

    def wrong_at_the_end(*args, **kw):
        r = np.array(real(*args, **kw))
        r[32:] = r[32:] * r.dtype.type(1 + 1e-3)
        return r

    monkeypatch.setattr(fl, op, wrong_at_the_end)
    argv = [a if a != "8" else "64" for a in BENCH]           # 64 rows
    assert main(argv + ["--ops", op, "--dtypes", "float32"]) == 1
    assert "WRONG RESULT" in capsys.readouterr().out
