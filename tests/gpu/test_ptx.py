"""Every kernel compiles to PTX for sm_90 (Hopper) with numba-cuda's NVVM, without a GPU: code that only the
simulator accepts cannot land. Runs in a subprocess because this directory's tests run under the simulator,
whose numba.cuda cannot compile."""

import os
import re
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
    import re
    from concurrent.futures import ThreadPoolExecutor

    from fastlogits.gpu import kernels, sample_kernels
    sys.path.insert(0, sys.argv[1])
    from test_device_functions import user_kernels

    failed = []
    hot = {}            # name -> PTX of the kernels whose resources are checked
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
            if name.startswith(("stats_part", "topk_part", "sample prepare", "sample draw")):
                hot[name] = ptx
        except Exception as e:
            failed.append(name)
            print("FAILED", name, type(e).__name__, e)
    print("compiled", len(items) - len(failed), "of", len(items))

    try:
        from cuda.bindings import nvjitlink
    except ImportError as e:
        print("NVJITLINK-MISSING:", e)
        sys.exit(1 if failed else 0)

    def resources(ptx):
        # nvJitLink assembles the PTX for sm_90 as ptxas would and reports what each kernel uses
        h = nvjitlink.create(2, ["-arch=sm_90", "-verbose"])
        try:
            data = ptx.encode()
            nvjitlink.add_data(h, nvjitlink.InputType.PTX, data, len(data), "kernel")
            nvjitlink.complete(h)
            buf = bytearray(nvjitlink.get_info_log_size(h))
            nvjitlink.get_info_log(h, buf)
        finally:
            nvjitlink.destroy(h)
        log = buf.decode(errors="replace")
        m = re.search(r"used (\\d+) registers.*?(\\d+) bytes smem.*?(\\d+) bytes lmem", log)
        spills = re.search(r"(\\d+) bytes spill stores", log)
        return int(m[1]), int(m[2]), int(m[3]), int(spills[1]) if spills else 0

    with ThreadPoolExecutor(2) as ex:
        found = list(ex.map(resources, hot.values()))
    for name, (regs, smem, lmem, spills) in zip(hot, found):
        print(f"uses {name}: {regs} registers, {smem} bytes shared, {lmem} bytes local, {spills} spilled")
    sys.exit(1 if failed else 0)
""")


def _run(script, *args):
    """script run in a Python without the simulator, from the project's root; skips without NVVM."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                       cwd=root, timeout=900)
    if p.returncode == 3 and "NVVM-MISSING" in p.stdout:
        pytest.skip(
            f"numba-cuda's NVVM is not installed (pip install 'numba-cuda[cu13]'): {p.stdout.strip()}"
        )
    return p


@pytest.fixture(scope="module")
def sm90():
    """Every kernel compiled to PTX for sm_90, once, and the hot ones assembled (SCRIPT's output)."""
    return _run(SCRIPT, os.path.dirname(os.path.abspath(__file__)))


def test_every_kernel_compiles_for_sm90(sm90):
    p = sm90
    assert p.returncode == 0, f"PTX compilation failed:\n{p.stdout}\n{p.stderr[-4000:]}"
    assert "compiled" in p.stdout


def test_hot_kernels_fit_the_device(sm90):
    """The hot kernels, assembled for sm_90 (nvJitLink, from the numba-cuda[cu13] extra; no GPU): every
    one launches with TPB threads (registers x TPB within the 65536 a block may use, static shared memory
    within 48 KiB) and spills nothing; the statistics pass keeps its chunk in registers (no local memory:
    a longer STATS_UNROLLS chunk that did not fit would be slower, not faster). The simulator knows none
    of these limits."""
    from fastlogits.gpu import kernels as K

    p = sm90
    if "NVJITLINK-MISSING" in p.stdout:
        pytest.skip(f"no nvJitLink here: {p.stdout.strip().splitlines()[-1]}")
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr[-3000:]}"
    rows = [line[len("uses "):].rsplit(": ", 1) for line in p.stdout.splitlines() if line.startswith("uses ")]
    assert len(rows) >= 32, p.stdout
    for name, use in rows:
        regs, smem, lmem, spills = (int(w) for w in re.findall(r"\d+", use))
        assert regs * K.TPB <= 65536 and smem <= 48 * 1024, (name, use)
        assert spills == 0, (name, use)
        if name.startswith("stats_part"):
            assert lmem == 0, (name, use)


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
    p = _run(NO_ROW_STACK)
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr[-3000:]}"
    assert "row_stack is vstack: True" in p.stdout
