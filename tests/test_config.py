"""available_backends, set_backend / use_backend, show_config: OpenMP must be on in a build that has it."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastlogits as fl

# Environment variables a build may use to opt out of OpenMP on purpose (then the check below does not apply).
OPENMP_OPT_OUTS = ("FASTLOGITS_NO_OPENMP", "FASTLOGITS_DISABLE_OPENMP", "FASTLOGITS_WITHOUT_OPENMP")


def _openmp_opted_out():
    keep = ("", "0", "false", "no", "off")           # as setup.py reads FASTLOGITS_NO_OPENMP
    if any(os.environ.get(v, "").strip().lower() not in keep for v in OPENMP_OPT_OUTS):
        return True
    return os.environ.get("FASTLOGITS_OPENMP", "1").lower() in ("0", "false", "no", "off")


@pytest.fixture
def restore_backend():
    yield
    fl.set_backend("cpu")


def test_available_backends():
    b = fl.available_backends()
    assert "cpu" in b
    assert set(b) <= {"cpu", "gpu"}
    assert list(b) == list(fl.available_backends())


def test_show_config_dict():
    cfg = fl.show_config(as_dict=True)
    assert isinstance(cfg, dict)
    assert {"simd", "openmp", "backends", "threads"} <= set(cfg)
    assert cfg["simd"] in ("avx512", "avx2", "baseline")
    assert isinstance(cfg["openmp"], bool)
    assert "cpu" in cfg["backends"]
    assert list(cfg["backends"]) == list(fl.available_backends())
    assert isinstance(cfg["threads"], int) and cfg["threads"] >= 1
    json.dumps(cfg)  # plain values


def test_show_config_prints(capsys):
    fl.show_config()
    out = capsys.readouterr().out
    assert "openmp" in out.lower() and "simd" in out.lower()


def test_openmp_is_on():
    """A build on Linux with GCC or Clang has OpenMP unless it was opted out of on purpose."""
    if _openmp_opted_out():
        pytest.skip("OpenMP opted out through the environment")
    if not sys.platform.startswith("linux"):
        pytest.skip("the OpenMP check is for Linux builds")
    assert fl.show_config(as_dict=True)["openmp"] is True, "this build lost OpenMP"


def test_a_build_without_openmp_shows_one_thread(monkeypatch, capsys):
    """show_config of a build without OpenMP gave the machine's cores as its threads (a packaging audit):
    every call runs on one thread there."""
    from fastlogits.cpu import _info

    monkeypatch.setattr(_info, "openmp_enabled", lambda: False)
    assert fl.show_config(as_dict=True)["threads"] == 1
    fl.show_config()
    assert "threads          1 (a build without OpenMP)\n" in capsys.readouterr().out


def test_simd_level_is_supported_by_this_cpu():
    simd = fl.show_config(as_dict=True)["simd"]
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if simd == "avx512":
        assert "avx512f" in flags
    elif simd == "avx2":
        assert "avx2" in flags


def test_threads_from_environment():
    code = "import json, fastlogits; print(json.dumps(fastlogits.show_config(as_dict=True)))"
    env = dict(os.environ, FASTLOGITS_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=root
    )
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout.strip().splitlines()[-1])
    assert cfg["threads"] == 1


def test_set_backend_cpu(restore_backend, rng):
    x = rng.standard_normal((3, 20))
    want = np.asarray(fl.logsumexp(x))
    fl.set_backend("cpu")
    np.testing.assert_array_equal(np.asarray(fl.logsumexp(x)), want)


def test_use_backend_context(rng):
    x = rng.standard_normal((3, 20)).astype(np.float32)
    want = np.asarray(fl.softmax(x))
    with fl.use_backend("cpu"):
        np.testing.assert_array_equal(np.asarray(fl.softmax(x)), want)
        with fl.use_backend("cpu"):
            np.testing.assert_array_equal(np.asarray(fl.softmax(x)), want)
    np.testing.assert_array_equal(np.asarray(fl.softmax(x)), want)


def test_gpu_requests_without_gpu(restore_backend, rng, monkeypatch):
    """Asking for the GPU where there is none raises a RuntimeError that says why. The GPU tests run the
    whole session under numba's simulator, so "none" is made here: availability() gives its reason."""
    import fastlogits.gpu

    reason = "numba-cuda finds no usable CUDA device or driver"
    monkeypatch.setattr(fastlogits.gpu, "availability", lambda: reason)
    assert fl.available_backends() == ["cpu"]
    x = rng.standard_normal((3, 20))
    with pytest.raises(RuntimeError, match=reason):
        fl.logsumexp(x, backend="gpu")
    with pytest.raises(RuntimeError, match="backend 'gpu' is not available"):
        with fl.use_backend("gpu"):
            fl.logsumexp(x)
    # the context manager left the process default alone
    fl.logsumexp(x)
    with pytest.raises(RuntimeError):
        fl.set_backend("gpu")
        fl.logsumexp(x)
    fl.set_backend("cpu")
    fl.logsumexp(x)


def test_gpu_backend_matches_cpu(rng):
    """Where a GPU backend exists, it agrees with the CPU within the float32 tolerance."""
    if "gpu" not in fl.available_backends():
        pytest.skip("no GPU backend on this machine")
    from tests.helpers import check

    x = (rng.standard_normal((4, 5000)) * 3).astype(np.float32)
    for name in ("logsumexp", "softmax", "log_softmax", "entropy", "argmax", "top_k", "top_k_logprobs"):
        check(name, x, backend="gpu")
    check("cross_entropy", x, labels=np.array([0, 1, 2, -100]), backend="gpu", reduction="none")


def test_use_backend_is_per_thread_and_checked_at_the_call(restore_backend, monkeypatch):
    """use_backend holds in its own thread (and asyncio task) only; set_backend is the process default."""
    import threading

    import fastlogits.gpu

    monkeypatch.setattr(fastlogits.gpu, "availability", lambda: None)    # as if a GPU were here
    seen = {}
    with fl.use_backend("gpu"):
        t = threading.Thread(target=lambda: seen.setdefault("other", fl._config.get_backend()))
        t.start()
        t.join()
        seen["here"] = fl._config.get_backend()
    assert seen == {"other": "cpu", "here": "gpu"} and fl._config.get_backend() == "cpu"
    with pytest.raises(ValueError, match="backend must be 'cpu' or 'gpu', got 'bogus'"):
        fl.use_backend("bogus")                                            # not only when entered
    with pytest.raises(ValueError, match="backend must be 'cpu' or 'gpu', got None"):
        fl.set_backend(None)


def test_default_threads_give_each_thread_a_few_chunks(monkeypatch, rng):
    """threads=None wakes no more threads than give each GRAIN_CHUNKS chunks of logits (1 chunk for
    sampling, whose noise costs more per logit), as PyTorch's grain size does; an explicit count is kept."""
    from scipy.special import logsumexp as ref_lse

    from fastlogits.cpu import backend as cpu

    monkeypatch.setattr(fl._config, "_default_threads", 8)
    seen = []
    for name in ("lse", "sample"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, real=real: seen.append(a[-1]) or real(*a))
    chunk = fl._config.DEFAULT_CHUNK
    assert fl._config.GRAIN_CHUNKS == 4
    for shape, kw, want in [((64, 8), {}, 1),                                   # 512 logits
                            ((4, 16384), {}, 4),                                # 16 chunks
                            ((3, 4 * chunk - 1), {}, 2),                        # 2.99 shares of 4 chunks
                            ((64, 32000), {}, 8),
                            ((4, 1000), {"chunk_size": 64}, 8),                 # 4000 // 256 = 15
                            ((4, 1000), {"chunk_size": 500}, 2),
                            ((1, 8), {"threads": 3}, 3)]:                       # kept (the kernel: 1)
        x = rng.standard_normal(shape)
        seen.clear()
        np.testing.assert_allclose(fl.logsumexp(x, **kw), ref_lse(x, axis=-1), rtol=1e-13)
        assert seen == [want], (shape, kw, seen)
    for shape, want in [((64, 8), 1), ((16, 2000), 7), ((1, 128256), 8)]:
        x = rng.standard_normal(shape)
        seen.clear()
        t = fl.sample(x, seed=5, temperature=0)
        np.testing.assert_array_equal(t, np.argmax(x, axis=-1))
        assert seen == [want], (shape, seen)


@pytest.mark.parametrize("threads", [0, -1, 4097, 10**20])
def test_thread_counts_out_of_range(threads):
    with pytest.raises(ValueError, match="threads must be an integer from 1 to 4096"):
        fl.logsumexp(np.zeros((2, 3)), threads=threads)


def test_a_bad_thread_variable_is_reported_not_raised_by_show_config():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import fastlogits; print(fastlogits.show_config(as_dict=True)['threads'])"
    for bad in ("abc", "0", "99999999999999999999"):
        env = dict(os.environ, FASTLOGITS_NUM_THREADS=bad, PYTHONPATH=root)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=120, cwd=root)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("invalid: FASTLOGITS_NUM_THREADS must be an integer from 1 to 4096")
        res = subprocess.run([sys.executable, "-m", "fastlogits.cli", "demo", "--rows", "4", "--vocab", "50",
                              "--threads", "1"], env=env, capture_output=True, text=True, timeout=120,
                             cwd=root)
        assert res.returncode == 0, res.stderr
    env = dict(os.environ, PYTHONPATH=root)
    res = subprocess.run([sys.executable, "-m", "fastlogits.cli", "demo", "--rows", "4", "--vocab", "50",
                          "--threads", "99999999999999999999"], env=env, capture_output=True, text=True,
                         timeout=120, cwd=root)
    # refused as the options are parsed (exit 2, as every bad option), naming the option
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "argument --threads: expected an integer from 1 to 4096" in res.stderr


def test_bench_top_k_of_a_small_vocabulary():
    from fastlogits import bench

    res = bench.run(rows=2, vocab=10, ops=["top_k"], dtypes=["float32"], threads=[1], repeat=1, peers=True)
    assert {r["library"].split()[0] for r in res} >= {"fastlogits"}
    x = np.random.default_rng(0).standard_normal((3, 80)).astype(np.float32)
    v, i = bench._numpy_top_k(x, 5)
    fv, fi = fl.top_k(x, 5)
    np.testing.assert_array_equal(i, fi)
    np.testing.assert_array_equal(v, fv)


def test_gpu_without_numba_cuda(restore_backend, monkeypatch, capsys):
    """numba alone (older numba has its own numba.cuda) is not the GPU backend: without the numba-cuda
    package the reason says so, and `fastlogits check` does not suggest the simulator, which needs
    numba-cuda too (its advice ended in an AttributeError; found by a new-user audit)."""
    import importlib.util

    import fastlogits.gpu
    from fastlogits.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba_cuda"
                        else real(name, *a))
    reason = fastlogits.gpu.availability()
    assert "numba-cuda is not installed" in reason and "fastlogits[gpu]" in reason
    assert fl.available_backends() == ["cpu"]
    with pytest.raises(RuntimeError, match="numba-cuda is not installed"):
        fl.logsumexp(np.zeros((2, 3)), backend="gpu")
    assert main(["check"]) != 0
    err = capsys.readouterr().err
    assert "numba-cuda is not installed" in err and "NUMBA_ENABLE_CUDASIM" not in err


def test_bench_without_scipy():
    """SciPy is a test extra, not a dependency: where it is missing, `fastlogits bench` leaves its column
    out, as PyTorch's (it ended in a traceback after the first row; found by a new-user audit)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.modules['scipy'] = None; sys.modules['scipy.special'] = None\n"
            "from fastlogits.cli import main\n"
            "sys.exit(main(['bench', '--rows', '4', '--vocab', '64', '--repeat', '1', '--threads', '1',"
            " '--json']))")
    res = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=root),
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    libs = {r["library"] for r in out["results"]}
    assert "fastlogits" in libs and "numpy/scipy" not in libs
    assert out["config"]["threads"] == 1          # an int, as show_config and demo --json give it


def test_bench_backend_selects_its_tables(restore_backend, capsys):
    """--backend cpu: the CPU table only, its fastlogits column on the CPU whatever the process default;
    --backend gpu without a GPU that can be timed: one line saying why."""
    from fastlogits.cli import main

    assert main(["bench", "--rows", "2", "--vocab", "16", "--repeat", "1", "--threads", "1", "--no-peers",
                 "--ops", "logsumexp", "--dtypes", "float32", "--backend", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu"] is None
    assert [r["library"] for r in out["results"] if r["kind"] == "op"] == ["fastlogits"]
    if fl._config.gpu_unavailable_reason() is not None:
        assert main(["bench", "--backend", "gpu"]) == 1
        assert "not available" in capsys.readouterr().err


def test_use_backend_blocks_ending_out_of_order(restore_backend, monkeypatch):
    """Blocks held open by generators can end in any order; each removes its own entry, and a block
    ended in another context undoes nothing there and raises nothing."""
    import contextvars

    import fastlogits.gpu

    monkeypatch.setattr(fastlogits.gpu, "availability", lambda: None)

    def gen(name):
        with fl.use_backend(name):
            yield fl._config.get_backend()

    a, b = gen("gpu"), gen("cpu")
    assert next(a) == "gpu" and next(b) == "cpu"
    a.close()
    assert fl._config.get_backend() == "cpu"
    b.close()
    assert fl._config.get_backend() == "cpu" and fl._config._using.get() == ()
    c = gen("gpu")
    next(c)
    contextvars.copy_context().run(c.close)        # no "created in a different Context" error
    assert fl._config.get_backend() == "gpu"       # (this context's entry: its block never ended here)
    fl._config._using.set(())


def test_demo_reports_the_threads_it_ran_on():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    res = subprocess.run([sys.executable, "-m", "fastlogits.cli", "demo", "--rows", "4", "--vocab", "50",
                          "--threads", "1", "--json"], env=env, capture_output=True, text=True, timeout=120,
                         cwd=root)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["config"]["threads"] == 1


FORK_AFTER_THREADS = r"""
import os, sys
import numpy as np
import fastlogits as fl

x = np.random.default_rng(int(sys.argv[1])).standard_normal((64, 5000)).astype(np.float32)
want = fl.logsumexp(x, threads=1)              # (64 rows: one range a row, any thread count)
if sys.argv[2] == "torch":                     # PyTorch's threads: the same libgomp
    import torch
    torch.set_num_threads(2)
    torch.ones(500, 500) @ torch.ones(500, 500)
elif sys.argv[2] == "ours":                    # our own parallel region of 2 threads
    fl.logsumexp(x, threads=2)
pid = os.fork()
if pid == 0:                                   # GNU OpenMP's pool is gone in the child
    ok = np.array_equal(fl.logsumexp(x, threads=2), want) and np.array_equal(fl.logsumexp(x), want)
    ok = ok and fl.show_config(as_dict=True)["threads"] == 1
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), fl.show_config(as_dict=True)["threads"])
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
@pytest.mark.parametrize("parent", ["ours", "torch", "none"])
def test_a_forked_child_runs_on_one_thread(rng, parent):
    """GNU OpenMP's thread pool does not survive fork(): a child forked after its parent ran threads
    (ours, or PyTorch's through the same libgomp) hung in its first parallel region (multiprocessing's
    default on Linux). A forked child runs on one thread, whatever it asks for, with the same results;
    the parent keeps its threads."""
    if parent == "torch":
        pytest.importorskip("torch")
    proc = subprocess.Popen([sys.executable, "-c", FORK_AFTER_THREADS, str(rng.integers(2**32)), parent],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        pytest.fail("the forked child hung in its first parallel region")
    assert proc.returncode == 0, err
    status, parent_threads = out.split()
    assert status == "0", "the forked child's results or thread count are wrong"
    assert int(parent_threads) == fl.show_config(as_dict=True)["threads"]


_PROBES = """
import setuptools, sys
import Cython.Build
setuptools.setup = lambda **kw: None          # setup.py's probes alone: no build, nothing cythonized
Cython.Build.cythonize = lambda *args, **kw: []
sys.argv = ["setup.py"]
ns = {}
exec(compile(open("setup.py").read(), "setup.py", "exec"), ns)
from distutils.ccompiler import new_compiler
from distutils.sysconfig import customize_compiler
cc = new_compiler()
customize_compiler(cc)
print(ns["_try_compile"](cc, "int main(void) { return 0; }\\n"))
print(ns["_try_compile"](cc, "#include <omp.h>\\nint main(void) { return omp_get_max_threads(); }\\n",
                         ["-fopenmp"], ["-fopenmp"]))
"""


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(__file__), "..", "setup.py")),
                    reason="setup.py is not beside the tests (an installed copy of them)")
def test_the_build_probes_link_with_the_flags_they_compile_with(tmp_path):
    """setup.py's compiler and OpenMP probes link with CFLAGS and LDFLAGS, as setuptools links the
    extensions: CFLAGS=--coverage (which needs libgcov at link time) failed the probes alone, and the
    build stopped saying no C compiler was found (a sanitizer's flags too, found by a sanitizer audit)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CFLAGS="--coverage", LDFLAGS="")
    r = subprocess.run([sys.executable, "-c", _PROBES], cwd=root, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None", "None"], r.stdout + r.stderr      # (and nothing cythonized)


def test_it_imports_and_runs_without_docstrings():
    """python -OO strips docstrings, and the shared-parameter and accumulator docs filled None in
    (AttributeError at import; found by a diff review)."""
    code = "import numpy as np, fastlogits as fl; print(float(fl.logsumexp(np.zeros(4))))"
    res = subprocess.run([sys.executable, "-OO", "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and float(res.stdout) == pytest.approx(np.log(4.0), rel=1e-6), res.stderr


def test_an_unbuilt_source_tree_says_so_on_import(tmp_path):
    """README's `pip install .` leaves the clone's kernels unbuilt, and Python started in the clone imports
    the clone: that gave "cannot import name '_reduce' from 'fastlogits.cpu'" (a packaging audit)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(fl.__file__)))
    shutil.copytree(os.path.join(root, "fastlogits"), tmp_path / "fastlogits",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", "import fastlogits"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode == 1
    assert f"compiled kernels are not built in {tmp_path / 'fastlogits' / 'cpu'}" in res.stderr, res.stderr
    assert "run Python from another directory" in res.stderr
