"""Every kernel compiles to PTX for sm_90 (Hopper) with numba-cuda's NVVM, without a GPU: code that only the
simulator accepts cannot land. Runs in a subprocess because this directory's tests run under the simulator,
whose numba.cuda cannot compile."""

import os
import subprocess
import sys
import textwrap

import pytest

# numba.cuda without a device: exit 3 without NVVM; device functions compile for sm_90
PROLOGUE = textwrap.dedent("""
    import sys
    from numba import cuda
    import numba.cuda.dispatcher as dispatcher

    try:
        from numba.cuda.cudadrv.nvvm import NVVM
        NVVM()
    except Exception as e:
        print("NVVM-MISSING:", e)
        sys.exit(3)

    class _Hopper:
        compute_capability = (9, 0)

    # Device functions are compiled for the current device's compute capability; there is no device here.
    dispatcher.get_current_device = lambda: _Hopper()
""")

SCRIPT = PROLOGUE + textwrap.dedent("""
    from fastlogits.gpu import kernels, sample_kernels
    sys.path.insert(0, sys.argv[1])
    from test_device_functions import user_kernels

    failed = []
    items = kernels.compile_signatures() + sample_kernels.compile_signatures()
    from numba import types
    f8 = types.Array(types.float64, 1, "C")
    row_lse, merge = user_kernels()
    items.append(("user row_lse", row_lse, (types.Array(types.float64, 2, "A"), f8, f8, f8)))
    items.append(("user merge", merge, (f8,) * 6))
    for name, kern, sig in items:
        try:
            ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
            assert ".target sm_90" in ptx, name
            print("ok", name, len(ptx))
        except Exception as e:
            failed.append(name)
            print("FAILED", name, type(e).__name__, e)
    print("compiled", len(items) - len(failed), "of", len(items))
    sys.exit(1 if failed else 0)
""")


def test_every_kernel_compiles_for_sm90():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    here = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, here], capture_output=True, text=True, env=env, cwd=root, timeout=600
    )
    if p.returncode == 3 and "NVVM-MISSING" in p.stdout:
        pytest.skip(
            f"numba-cuda's NVVM is not installed (pip install 'numba-cuda[cu13]'): {p.stdout.strip()}"
        )
    assert p.returncode == 0, f"PTX compilation failed:\n{p.stdout}\n{p.stderr[-4000:]}"
    assert "compiled" in p.stdout


NO_ROW_STACK = textwrap.dedent("""
    import numpy as np
    if hasattr(np, "row_stack"):
        del np.row_stack                  # as NumPy 2.5 has it
""") + PROLOGUE + textwrap.dedent("""
    from fastlogits.gpu import kernels
    name, kern, sig = next(item for item in kernels.compile_signatures() if item[0].startswith("stats_part"))
    ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
    print("compiled", name, "row_stack is vstack:", np.row_stack is np.vstack)
""")


def test_kernels_compile_under_numpy_without_row_stack():
    """NumPy 2.5 removed np.row_stack, which numba-cuda 0.30 registers an implementation of when it first
    compiles a kernel (numba-cuda issue 907): fastlogits.gpu puts the alias back, so kernels compile."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", NO_ROW_STACK], capture_output=True, text=True, env=env,
                       cwd=root, timeout=600)
    if p.returncode == 3 and "NVVM-MISSING" in p.stdout:
        pytest.skip(f"numba-cuda's NVVM is not installed: {p.stdout.strip()}")
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr[-3000:]}"
    assert "row_stack is vstack: True" in p.stdout
