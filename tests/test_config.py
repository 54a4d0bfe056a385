"""available_backends, set_backend / use_backend, show_config: OpenMP must be on in a build that has it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastlogits as fl

# Environment variables a build may use to opt out of OpenMP on purpose (then the check below does not apply).
OPENMP_OPT_OUTS = ("FASTLOGITS_NO_OPENMP", "FASTLOGITS_DISABLE_OPENMP", "FASTLOGITS_WITHOUT_OPENMP")


def _openmp_opted_out():
    if any(os.environ.get(v, "") not in ("", "0") for v in OPENMP_OPT_OUTS):
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
