"""fastlogits from C, C++, Cython and Numba: the header-only C API, the example program, a downstream
Cython module built against the installed package, and the Numba entry points. Everything is built with
the system compiler against ``fastlogits.get_include()``, and checked against the float64 reference."""

import ctypes
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import fastlogits as fl
from tests import reference as ref
from tests.helpers import cpu_flags

CC = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "c" / "fl_rows.c"

needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler on PATH")


def _awkward_rows(rng, rows, V):
    x = (rng.standard_normal((rows, V)) * 4).astype(np.float32)
    x[1, ::7] = -np.inf  # impossible classes
    x[2, 5] = 3e4  # one dominant logit
    x[3, :] = 1e30  # huge and tied
    return x


C_PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include "fastlogits.h"

/* reads rows x V float32 and rows int64 labels from files; prints per row:
   lse (whole, in 3 pieces merged out of order, f16, bf16, f64), ce (whole, in pieces), argmax (whole,
   in pieces), entropy (f32 in pieces, f16, bf16, f64 in pieces) */
int main(int argc, char **argv) {
    if (argc != 5) return 2;
    long rows = atol(argv[1]), V = atol(argv[2]);
    float *x = malloc(sizeof(float) * rows * V);
    int64_t *y = malloc(sizeof(int64_t) * rows);
    FILE *f = fopen(argv[3], "rb");
    if (!f || fread(x, sizeof(float), rows * V, f) != (size_t)(rows * V)) return 3;
    fclose(f);
    f = fopen(argv[4], "rb");
    if (!f || fread(y, sizeof(int64_t), rows, f) != (size_t)rows) return 3;
    fclose(f);
    for (long i = 0; i < rows; i++) {
        const float *r = x + i * V;
        fl_lse_state a, b, c;
        long c1 = V / 3, c2 = 2 * V / 3;
        fl_lse_init(&a); fl_lse_init(&b); fl_lse_init(&c);
        fl_lse_update_f32(&c, r + c2, V - c2);
        fl_lse_update_f32(&a, r, c1);
        fl_lse_update_f32(&b, r + c1, c2 - c1);
        fl_lse_merge(&c, &a);
        fl_lse_merge(&c, &b);
        fl_lse_state w; fl_lse_init(&w); fl_lse_update_f32(&w, r, V);
        /* 16-bit paths: round the row to bf16 and f16 and fold those */
        uint16_t *h = malloc(2 * V), *bh = malloc(2 * V);
        double *d = malloc(8 * V);
        for (long j = 0; j < V; j++) {
            h[j] = fl_f32_to_f16(r[j]); bh[j] = fl_f32_to_bf16(r[j]); d[j] = r[j];
        }
        fl_lse_state s16, sb16, s64;
        fl_lse_init(&s16); fl_lse_update_f16(&s16, h, V);
        fl_lse_init(&sb16); fl_lse_update_bf16(&sb16, bh, V);
        fl_lse_init(&s64); fl_lse_update_f64(&s64, d, V);
        fl_ce_state ce1, ce2;
        fl_ce_init(&ce1, y[i]); fl_ce_init(&ce2, y[i]);
        fl_ce_update_f32(&ce2, r + c1, V - c1, c1);
        fl_ce_update_f32(&ce1, r, c1, 0);
        fl_ce_merge(&ce1, &ce2);
        fl_argmax_state am1, am2;
        fl_argmax_init(&am1); fl_argmax_init(&am2);
        fl_argmax_update_f32(&am2, r + c1, V - c1, c1);
        fl_argmax_update_f32(&am1, r, c1, 0);
        fl_argmax_merge(&am1, &am2);
        fl_argmax_state bm1, bm2;                                  /* the same, merged the other way */
        fl_argmax_init(&bm1); fl_argmax_init(&bm2);
        fl_argmax_update_f32(&bm2, r + c1, V - c1, c1);
        fl_argmax_update_f32(&bm1, r, c1, 0);
        fl_argmax_merge(&bm2, &bm1);
        fl_ent_state e1, e2, e16, eb16, e64;                       /* entropy: two pieces, merged */
        fl_ent_init(&e1); fl_ent_init(&e2); fl_ent_init(&e16); fl_ent_init(&eb16); fl_ent_init(&e64);
        fl_ent_update_f32(&e2, r + c1, V - c1);
        fl_ent_update_f32(&e1, r, c1);
        fl_ent_merge(&e1, &e2);
        fl_ent_update_f16(&e16, h, V);
        fl_ent_update_bf16(&eb16, bh, V);
        fl_ent_update_f64(&e64, d + c2, V - c2);
        fl_ent_init(&e2); fl_ent_update_f64(&e2, d, c2);
        fl_ent_merge(&e64, &e2);
        printf("%.17g %.17g %.17g %.17g %.17g %.17g %.17g %lld %lld %.17g %.17g %.17g %.17g %lld\n",
               fl_lse_result(&w), fl_lse_result(&c), fl_lse_result(&s16), fl_lse_result(&sb16),
               fl_lse_result(&s64), fl_cross_entropy_f32(r, V, y[i]), fl_ce_result(&ce1),
               (long long)fl_argmax_f32(r, V), (long long)am1.index, fl_ent_result(&e1),
               fl_ent_result(&e16), fl_ent_result(&eb16), fl_ent_result(&e64), (long long)bm2.index);
        free(h); free(bh); free(d);
    }
    printf("%d.%d %s\n", FASTLOGITS_VERSION_MAJOR, FASTLOGITS_VERSION_MINOR, fl_simd_path());
    return 0;
}
"""


def _compile(compiler, source, out, flags):
    cmd = [compiler, *flags, f"-I{fl.get_include()}", str(source), "-o", str(out), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr}"
    return res.stderr


BUILDS = {
    "c99": ["-std=c99"],
    "c11": ["-std=c11"],
    # x87 arithmetic with GNU C's default excess precision (32-bit x86's default): exp's round-to-integer
    # trick was never rounded to float there, and results were off by 0.05 (found by an embedding audit)
    "x87": ["-std=gnu99", "-mfpmath=387", "-DFL_NO_MULTIVERSION"],
    # ThreadSanitizer instruments the load-time resolvers of the dispatch, which then crashed before the
    # TSan runtime started: the header builds a single version under it
    "tsan": ["-std=c11", "-fsanitize=thread"],
    # GCC disables -fassociative-math here (it needs no-trapping-math) and says so; the kernels' own
    # optimize("no-trapping-math") brought it back inside them, unannounced: results off by 0.08
    "assoc": ["-std=c99", "-fassociative-math"],
    "assoc-dispatch-off": ["-std=c99", "-fassociative-math", "-DFL_NO_MULTIVERSION"],
    # GCC 11 (Ubuntu 22.04's, RHEL 9's): clones of one feature each, vectorized at -O2 on request
    "gcc-11": ["-std=c99", "-pedantic"],
}
# the builds with a compiler of their own (skipped where it is not installed)
COMPILERS = {"gcc-11": shutil.which("gcc-11")}


@needs_cc
@pytest.mark.parametrize("build", list(BUILDS))
def test_header_compiles_warning_free_and_computes(tmp_path, rng, build):
    src = tmp_path / "prog.c"
    src.write_text(C_PROGRAM)
    assoc = build.startswith("assoc")
    flags = ["-O2", *BUILDS[build], "-Wall", "-Wextra", *([] if assoc else ["-Werror"])]
    cc = COMPILERS.get(build, CC)
    if cc is None:
        pytest.skip(f"no {build} on PATH")
    if build == "x87" and os.uname().machine not in ("x86_64", "i686"):
        pytest.skip("x87 arithmetic is x86's")
    if build == "tsan":
        probe = subprocess.run([CC, "-fsanitize=thread", "-x", "c", "-", "-o", str(tmp_path / "probe")],
                               input="int main(void) { return 0; }", capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"no ThreadSanitizer runtime here: {probe.stderr.strip()[:200]}")
    warnings = _compile(cc, src, tmp_path / "prog", flags)
    if assoc:       # GCC's own notice only (another compiler may say nothing), not the header's
        warnings = "\n".join(w for w in warnings.splitlines()
                             if not ("-fassociative-math" in w and "disabled" in w))
    assert warnings == ""
    rows, V = 6, 4099
    x = _awkward_rows(rng, rows, V)
    x[5, 10] = x[5, 3000] = np.nan  # NaN in both pieces: the first NaN wins, whichever way they merge
    y = rng.integers(0, V, rows)
    y[1] = 7  # a -inf label: loss inf
    y[0] = V // 3  # the first column of the second piece
    x.tofile(tmp_path / "x.bin")
    y.astype(np.int64).tofile(tmp_path / "y.bin")
    out = subprocess.run(
        [tmp_path / "prog", str(rows), str(V), tmp_path / "x.bin", tmp_path / "y.bin"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    vals = np.array([[float(v) for v in line.split()] for line in out[:rows]])
    assert out[rows].split()[0] == f"{0}.{1}".format(*fl.__version__.split(".")[:2])
    lse, ce = ref.logsumexp(x), ref.cross_entropy(x, y, reduction="none")
    tol = 16 * np.finfo(np.float32).eps * (1 + np.abs(x[np.isfinite(x)]).max())
    np.testing.assert_allclose(vals[:, 0], lse, rtol=0, atol=tol)
    np.testing.assert_allclose(vals[:, 1], lse, rtol=0, atol=tol)
    with np.errstate(over="ignore"):
        x16 = x.astype(np.float16)  # row 3 (1e30) becomes inf: compared rows 0-2 only
    np.testing.assert_allclose(vals[[0, 1, 2], 2], ref.logsumexp(x16)[[0, 1, 2]], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(vals[:, 3], ref.logsumexp(x.astype(fl.ops._prep.BF16)), rtol=1e-6, atol=tol)
    np.testing.assert_allclose(vals[:, 4], lse, rtol=1e-12)
    np.testing.assert_allclose(vals[:, 5], ce, rtol=0, atol=tol)
    np.testing.assert_allclose(vals[:, 6], ce, rtol=0, atol=tol)
    np.testing.assert_array_equal(vals[:, 7], ref.argmax(x))
    np.testing.assert_array_equal(vals[:, 8], ref.argmax(x))
    np.testing.assert_array_equal(vals[:, 13], ref.argmax(x))
    assert vals[5, 13] == 10
    ent = ref.entropy(x)
    np.testing.assert_allclose(vals[:, 9], ent, rtol=0, atol=tol)
    np.testing.assert_allclose(vals[[0, 1, 2], 10], ref.entropy(x16)[[0, 1, 2]], rtol=1e-6, atol=1e-5)
    assert np.isnan(vals[3, 10])                                  # 1e30 is +inf in float16
    np.testing.assert_allclose(vals[:, 11], ref.entropy(x.astype(fl.ops._prep.BF16)), rtol=1e-6, atol=tol)
    np.testing.assert_allclose(vals[:, 12], ent, rtol=1e-12, atol=1e-12)
    assert abs(vals[3, 9] - np.log(V)) < 1e-9 and vals[2, 9] < 1e-6   # tied: log V; one dominant: 0


@needs_cc
@pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"} <= cpu_flags(),
                    reason="needs an x86-64 CPU with AVX-512 to run all three builds")
@pytest.mark.parametrize("flags, path", [([], None), (["-DFL_NO_MULTIVERSION"], "baseline"),
                                         (["-DFL_NO_MULTIVERSION", "-mavx2", "-mfma"], "avx2"),
                                         (["-DFL_NO_MULTIVERSION", "-march=x86-64-v4"], "avx512")])
def test_simd_path_names_the_path_compiled_in(tmp_path, flags, path):
    """fl_simd_path() of a default build is the loader's choice, the Python package's on this machine; a
    single-version build (FL_NO_MULTIVERSION, or Clang) names the target it was compiled for."""
    from fastlogits.cpu import _info

    src = tmp_path / "p.c"
    src.write_text('#include <stdio.h>\n#include "fastlogits.h"\n'
                   'int main(void) { printf("%s\\n", fl_simd_path()); return 0; }\n')
    _compile(CC, src, tmp_path / "p", ["-O2", *flags])
    out = subprocess.run([tmp_path / "p"], capture_output=True, text=True, check=True).stdout.strip()
    assert out == (path or _info.simd_path())


@pytest.mark.skipif(COMPILERS["gcc-11"] is None or not shutil.which("objdump"),
                    reason="needs gcc-11 and objdump")
@pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"} <= cpu_flags(),
                    reason="needs an x86-64 CPU with AVX-512 (where GCC 11's avx512f clone and GCC 12's "
                           "x86-64-v4 clone are both chosen)")
def test_gcc_11_builds_dispatch_to_vectorized_clones(tmp_path):
    """GCC 11 has no ISA levels for target_clones: the header gives it clones for AVX-512F and AVX2, and
    asks it to vectorize them at -O2 (GCC 11 vectorizes nothing at -O2 by itself). Its build runs the
    path the package runs on this machine, and the clones hold 512-bit and 256-bit instructions (an
    audit measured GCC 11 builds, the package's included, at 3.5 GB/s against 12.6: baseline code)."""
    from fastlogits.cpu import _info

    src = tmp_path / "p.c"
    src.write_text('#include <stdio.h>\n#include "fastlogits.h"\n'
                   'int main(void) { float x[3] = {1, 2, 3}; fl_lse_state s; fl_lse_init(&s);\n'
                   '    fl_lse_update_f32(&s, x, 3);\n'
                   '    printf("%s %.9g\\n", fl_simd_path(), fl_lse_result(&s)); return 0; }\n')
    _compile(COMPILERS["gcc-11"], src, tmp_path / "p", ["-O2", "-std=c99", "-Wall", "-Wextra", "-Werror"])
    path, lse = subprocess.run([tmp_path / "p"], capture_output=True, text=True, check=True).stdout.split()
    assert path == _info.simd_path() == "avx512"
    assert float(lse) == pytest.approx(float(ref.logsumexp(np.array([[1.0, 2.0, 3.0]]))[0]), rel=1e-6)
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(tmp_path / "p")], capture_output=True,
                         text=True, check=True).stdout

    def body(name):
        start = asm.index(f"<{name}>:")
        return asm[start:asm.index("\n\n", start)]

    assert body("fl_lse_chunk_pf_f32.avx512f.0").count("zmm") >= 8
    assert body("fl_lse_chunk_pf_f32.avx2.1").count("ymm") >= 8


def hot_loops(asm, function):
    """The loops (backward jumps, bodies of at most 80 instructions) of `function` in objdump output, each
    as its list of instructions, the one with the most 512-bit instructions first."""
    start = asm.index(f"<{function}>:")
    text = asm[start:asm.index("\n\n", start)]
    lines = [ln for ln in text.splitlines()[1:] if re.match(r"\s+[0-9a-f]+:", ln)]
    addrs = [int(ln.split(":")[0], 16) for ln in lines]
    loops = []
    for at, ln in zip(addrs, lines):
        jump = re.search(r"\sj[a-z]+\s+([0-9a-f]+) <", ln)
        if jump and int(jump.group(1), 16) < at:
            body = [x for x, a in zip(lines, addrs) if int(jump.group(1), 16) <= a <= at]
            if len(body) <= 80:
                loops.append(body)
    return sorted(loops, key=lambda b: -sum("zmm" in x for x in b))


@pytest.mark.skipif(not shutil.which("objdump"), reason="needs objdump")
@pytest.mark.parametrize("module, function", [
    ("_reduce", "fl_lse_chunk_pf_f32"), ("_reduce", "fl__sumexp_max_f32"), ("_reduce", "fl_ent_chunk_f32"),
    ("_reduce", "fl_lse_chunk_pf_f64"), ("_reduce", "fl__sumexp_max_f64"), ("_maps", "fl__softmax_terms_f32"),
    ("_maps", "fl__softmax_row_f32"), ("_maps", "fl__log_softmax_row_f32"),
    ("_select", "fl__argmax_lanes_f32"), ("_select", "fl__argmax_lanes_f64"), ("_sample", "fl__max_f32")])
def test_package_reductions_keep_their_lanes_in_registers(module, function):
    """The AVX-512 clones of the C core's lane reductions, as the package was built: their hot loop keeps
    the lanes in registers. GCC kept them on the stack while the scalar tail added into lane 0 (the float
    accumulator stored and reloaded every vector in fl__sumexp_max: long float32 rows ran at 14 GB/s a
    thread, 18.7 without)."""
    import importlib

    path = importlib.import_module(f"fastlogits.cpu.{module}").__file__
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                         check=True).stdout
    if ".arch_x86_64_v4>:" not in asm and ".avx512f.0>:" not in asm:
        pytest.skip("no AVX-512 clones in this build (not GCC 11+ on x86-64 Linux)")
    names = [f"{function}.arch_x86_64_v4", f"{function}.avx512f.0"]     # GCC 12 and later; GCC 11
    name = next((n for n in names if f"<{n}>:" in asm), None)
    assert name is not None, f"no AVX-512 clone of {function} in {path}"
    loop = hot_loops(asm, name)[0]
    assert sum("zmm" in x for x in loop) >= 3, loop
    assert not [x for x in loop if "(%rsp" in x or "(%rbp" in x], "\n".join(loop)


@pytest.mark.skipif(not shutil.which("objdump"), reason="needs objdump")
@pytest.mark.parametrize("module", ["_reduce", "_maps", "_select", "_sample", "_layout"])
def test_vector_clones_call_no_baseline_code(module):
    """The AVX2 and AVX-512 clones of the C core, as the package was built, call (or jump to) no function
    compiled for baseline x86-64 (SSE) but the CPU-dispatched Philox blocks and the C library's. Legacy
    SSE code run after AVX-512 code is slow on Intel CPUs: the TwoSum helper, not inlined into the clones
    and called once per block of 128 values, made float32 softmax of (16, 128256) take 51.5 ms, 1.6 once
    inlined (PyTorch's 5.1, one thread)."""
    import importlib

    path = importlib.import_module(f"fastlogits.cpu.{module}").__file__
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                         check=True).stdout
    clone = re.compile(r"\.(arch_x86_64_v[34]|avx2\.0|avx512f\.0)(\.|$)")     # (.constprop.0, .isra.0 too)
    calls, function = [], None
    for line in asm.splitlines():
        head = re.match(r"[0-9a-f]+ <(.+)>:$", line)
        if head:
            function = head.group(1)
        elif function and clone.search(function):
            # calls, and jumps to another function's start (tail calls; a jump within one is <f+0x..>)
            call = re.search(r"\s(call|j[a-z]+)\s+[0-9a-f]+ <([^>+]+)>", line)
            if call and call.group(2) != function:
                calls.append((function, call.group(2)))
    if not calls and not [f for f in re.findall(r"<(.+)>:\n", asm) if clone.search(f)]:
        pytest.skip("no AVX2/AVX-512 clones in this build (not GCC 11+ on x86-64 Linux)")
    allowed = ("fl__philox_block_avx512", "fl__philox_block_avx2", "fl__philox_block_sse2")   # (by CPU)
    bad = sorted({(f, t) for f, t in calls
                  if not clone.search(t) and "@plt" not in t and t not in allowed})
    assert not bad, bad


MIXED_STATES = r"""
#include <stdio.h>
#include "fastlogits.h"
/* states made by float64 work (max beyond float's range), folded on with float and 16-bit data */
int main(void) {
    double d[2] = {1e300, 1e300}, lo[2] = {-1e300, -1e300};
    float f[2] = {0.0f, 1.0f};
    uint16_t h[2] = {0x3c00, 0x0000}, b[2] = {0x3f80, 0x0000};     /* 1 and 0 as f16 and bf16 */
    fl_lse_state s;
    fl_lse_init(&s); fl_lse_update_f64(&s, d, 2); fl_lse_update_f32(&s, f, 2);
    printf("%.17g\n", fl_lse_result(&s));
    fl_lse_init(&s); fl_lse_update_f64(&s, d, 2); fl_lse_update_f16(&s, h, 2);
    printf("%.17g\n", fl_lse_result(&s));
    fl_lse_init(&s); fl_lse_update_f64(&s, lo, 2); fl_lse_update_bf16(&s, b, 2);
    printf("%.17g\n", fl_lse_result(&s));
    fl_lse_init(&s); fl_lse_update_f64(&s, lo, 2); fl_lse_update_f32(&s, f, 2);
    printf("%.17g\n", fl_lse_result(&s));
    /* a max that float holds only rounded (1e6 + 0.3: float's spacing there is 0.0625) */
    double mid[1] = {1e6 + 0.3};
    float near[2] = {1e6f, 1e6f + 0.0625f};
    fl_lse_init(&s); fl_lse_update_f64(&s, mid, 1); fl_lse_update_f32(&s, near, 2);
    printf("%.17g\n", fl_lse_result(&s));
    /* maxes that float rounds by far more than 64 (1e11: spacing 8192; 1e30): the one-pass rescaling by
       exp(float(m) - m) overflowed, giving NaN or +inf (found by an embedding audit) */
    double a[1] = {99999996952.0}, e30[1] = {1e30};     /* float(a) = a + 1000 */
    float fa[1] = {99999997952.0f}, small[3] = {0.0f, 1.0f, 2.0f}, f30[1] = {(float)1e30};
    fl_lse_init(&s); fl_lse_update_f64(&s, a, 1); fl_lse_update_f32(&s, fa, 1);
    printf("%.17g\n", fl_lse_result(&s));
    fl_lse_init(&s); fl_lse_update_f64(&s, a, 1); fl_lse_update_f32(&s, small, 3);
    printf("%.17g\n", fl_lse_result(&s));
    fl_lse_init(&s); fl_lse_update_f64(&s, a, 1); fl_lse_update_f16(&s, h, 2);
    printf("%.17g\n", fl_lse_result(&s));
    fl_lse_init(&s); fl_lse_update_f64(&s, e30, 1); fl_lse_update_f32(&s, f30, 1);
    printf("%.17g\n", fl_lse_result(&s));
    /* the top 0 of a row with its logsumexp state: no scratch (k values: none), nothing written; the
       heap's root hv[0] was read, and written, all the same */
    float row[5] = {0.5f, 3.0f, -1.0f, 2.0f, 0.0f}, buf[2], outv[1] = {0};
    int64_t outi[1] = {-7};
    fl_row r = {(const char *)row, 5, 4, FL_F32, 1.0, 0.0};
    fl_row_topk_f32(&r, 0, 2, buf, NULL, NULL, outv, outi, &s);
    printf("%.17g %lld\n", fl_lse_result(&s), (long long)outi[0]);
    return 0;
}
"""


CONVERSIONS = r"""
#include <stdio.h>
#include <stdlib.h>
#include "fastlogits.h"
/* argv: n, a file of n float32, a file of n uint16. Writes the halves' floats (fl_load_f16) and the floats'
   halves (fl_store_f16), then the same by bfloat16, each converted at an odd offset too (vector tails). */
int main(int argc, char **argv) {
    if (argc != 4) return 2;
    long n = atol(argv[1]);
    float *f = malloc(4 * n), *fo = malloc(4 * n);
    uint16_t *h = malloc(2 * n), *ho = malloc(2 * n);
    FILE *a = fopen(argv[2], "rb"), *b = fopen(argv[3], "rb");
    if (!a || !b || fread(f, 4, n, a) != (size_t)n || fread(h, 2, n, b) != (size_t)n) return 3;
    fl_load_f16(fo, h, 3); fl_load_f16(fo + 3, h + 3, n - 3);
    fwrite(fo, 4, n, stdout);
    fl_store_f16(ho, f, 5); fl_store_f16(ho + 5, f + 5, n - 5);
    fwrite(ho, 2, n, stdout);
    fl_load_bf16(fo, h, 3); fl_load_bf16(fo + 3, h + 3, n - 3);
    fwrite(fo, 4, n, stdout);
    fl_store_bf16(ho, f, 5); fl_store_bf16(ho + 5, f + 5, n - 5);
    fwrite(ho, 2, n, stdout);
    return 0;
}
"""


@needs_cc
@pytest.mark.parametrize("flags, needs", [
    ([], set()),                                                   # the dispatch: F16C on x86-64-v3
    (["-DFL_NO_MULTIVERSION"], set()),                             # the portable loops (baseline x86-64)
    (["-DFL_NO_MULTIVERSION", "-mavx2", "-mf16c"], {"avx2", "f16c"}),
    (["-DFL_NO_INTRINSICS"], set()),
], ids=["dispatch", "portable-baseline", "f16c", "portable-dispatch"])
def test_array_conversions_of_every_code_path(tmp_path, rng, flags, needs):
    """fl_load_f16/fl_store_f16 (F16C or portable) and the bfloat16 pair, compiled at -O2 (where GCC
    vectorizes less) on every half and bfloat16 value and on floats around every half (ties, overflow,
    subnormals, NaN), bit for bit against NumPy and ml_dtypes: round to nearest even; a half NaN comes in
    quiet with its payload (as F16C gives it), a NaN goes out as the quiet half NaN 0x7e00 with its sign
    (a bfloat16 NaN out: any NaN)."""
    import platform

    import ml_dtypes

    if any(f.startswith("-m") for f in flags) and platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86-64 flags")
    if not needs <= cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(needs - cpu_flags())}")
    src = tmp_path / "c.c"
    src.write_text(CONVERSIONS)
    _compile(CC, src, tmp_path / "c", ["-O2", "-std=c99", "-Wall", "-Wextra", "-Werror", *flags])
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    hf = halves.view(np.float16).astype(np.float32)
    # floats around every half: itself, one float ulp either side, the midpoints to the next half and
    # one ulp either side of those; random bit patterns (NaNs with payloads included); beyond the range
    with np.errstate(invalid="ignore", over="ignore"):
        up = np.nextafter(hf, np.float32(np.inf))
        down = np.nextafter(hf, np.float32(-np.inf))
        mid = ((hf.astype(np.float64) + np.roll(hf, -1).astype(np.float64)) / 2).astype(np.float32)
        bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
        edges = np.float32([65504, 65519.996, 65520, 1e5, np.inf, -np.inf, 2**-25, 2**-24, 3e-8])
        floats = np.concatenate([hf, up, down, mid, np.nextafter(mid, np.float32(np.inf)),
                                 np.nextafter(mid, np.float32(-np.inf)), bits.view(np.float32), edges])
    n = floats.size
    h_in = np.resize(halves, n)
    floats.tofile(tmp_path / "f.bin")
    h_in.tofile(tmp_path / "h.bin")
    out = subprocess.run([tmp_path / "c", str(n), tmp_path / "f.bin", tmp_path / "h.bin"],
                         capture_output=True, check=True).stdout
    o = [n * 4, n * 2, n * 4, n * 2]
    parts = np.split(np.frombuffer(out, np.uint8), np.cumsum(o)[:-1])
    load16, store16 = parts[0].view(np.uint32), parts[1].view(np.uint16)
    loadbf, storebf = parts[2].view(np.uint32), parts[3].view(np.uint16)
    want = h_in.view(np.float16).astype(np.float32).view(np.uint32)        # NaNs made quiet, payload kept
    np.testing.assert_array_equal(load16, np.where(np.isnan(h_in.view(np.float16)), want | 0x400000, want))
    np.testing.assert_array_equal(loadbf, h_in.astype(np.uint32) << 16)
    nan = np.isnan(floats)
    sign = (floats.view(np.uint32) >> 16).astype(np.uint16) & 0x8000
    with np.errstate(invalid="ignore", over="ignore"):
        want16 = floats.astype(np.float16).view(np.uint16)
        wantbf = floats.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(store16[~nan], want16[~nan])
    np.testing.assert_array_equal(store16[nan], 0x7E00 | sign[nan])
    np.testing.assert_array_equal(storebf[~nan], wantbf[~nan])
    assert np.all(np.isnan(storebf[nan].view(ml_dtypes.bfloat16)))


CONSTANT_SIZES = r"""
#include <stdio.h>
#include "fastlogits.h"
/* arrays of a size known at compile time: GCC's loop-bound analysis of the inlined, constant-propagated
   loops warned (-Waggressive-loop-optimizations, on by default) on an F16C tail loop */
int main(void) {
    static float f[4096]; static uint16_t h[4096], b[4096];
    fl_lse_state s;
    for (int i = 0; i < 4096; i++) f[i] = (float)i / 512.0f;
    fl_store_f16(h, f, 4096); fl_store_bf16(b, f, 4096);
    fl_load_f16(f, h, 4096); fl_load_bf16(f, b, 4096);
    fl_lse_init(&s); fl_lse_update_f16(&s, h, 4096); fl_lse_update_bf16(&s, b, 4096);
    printf("%.6f\n", fl_lse_result(&s));
    return 0;
}
"""


@needs_cc
@pytest.mark.parametrize("opt", ["-O2", "-O3"])
def test_header_warning_free_with_constant_sizes(tmp_path, opt):
    src = tmp_path / "k.c"
    src.write_text(CONSTANT_SIZES)
    _compile(CC, src, tmp_path / "k", [opt, "-std=c99", "-Wall", "-Wextra", "-Werror"])
    got = float(subprocess.run([tmp_path / "k"], capture_output=True, text=True, check=True).stdout)
    x = (np.arange(4096) / 512.0).astype(np.float32)
    want = np.logaddexp(ref.logsumexp(x.astype(np.float16)), ref.logsumexp(x.astype(ml_dtypes.bfloat16)))
    assert got == pytest.approx(float(want), rel=1e-6)


@needs_cc
def test_states_beyond_float_range_fold_float_data(tmp_path):
    """A state whose max float cannot hold (made from float64 data, or merged from elsewhere) folds float
    and 16-bit chunks through the merge, not a one-pass shift by an infinite float max (that gave +inf)."""
    src = tmp_path / "mixed.c"
    src.write_text(MIXED_STATES)
    _compile(CC, src, tmp_path / "mixed", ["-O2", "-std=c99", "-Wall", "-Wextra", "-Werror"])
    out = subprocess.run([tmp_path / "mixed"], capture_output=True, text=True, check=True).stdout.split()
    got = [float(v) for v in out]
    assert got[0] == 1e300 + np.log(2) and got[1] == 1e300 + np.log(2)       # (ln 2 is below 1e300's ulp)
    want = np.log(np.exp(1.0) + 1.0)                                          # the -1e300 terms vanish
    assert got[2] == pytest.approx(want, rel=1e-6) and got[3] == pytest.approx(want, rel=1e-6)
    # float data folded into a state whose max float rounds: its sum is rescaled from the rounded max
    # (exact data, so only exp's rounding remains: 1e-9 here, against 0.01 without the rescaling)
    want = 1e6 + float(np.log(np.exp(0.3) + 1.0 + np.exp(0.0625)))
    assert abs(got[4] - want) < 1e-6
    # maxes that float rounds by more than 64: the larger value, the others below its ulp
    assert got[5:9] == [99999997952.0, 99999996952.0, 99999996952.0, float(np.float32(1e30))]
    assert got[9] == pytest.approx(float(ref.logsumexp(np.array([0.5, 3.0, -1.0, 2.0, 0.0]))), rel=1e-6)
    assert got[10] == -7                                                      # top 0: nothing written


@needs_cc
def test_header_warns_under_fast_math(tmp_path):
    src = tmp_path / "fm.c"
    src.write_text('#include "fastlogits.h"\nint main(void) { return 0; }\n')
    # the macros GCC and Clang define under those options (the options themselves stay out of
    # the tree: nothing here should ever be built with them)
    for macro in ("__FAST_MATH__", "__ASSOCIATIVE_MATH__", "__FINITE_MATH_ONLY__"):
        warnings = _compile(CC, src, tmp_path / "fm", ["-O2", f"-D{macro}=1"])
        assert "fastlogits.h needs IEEE arithmetic" in warnings, macro
    # without them, not a word
    assert "fastlogits.h" not in _compile(CC, src, tmp_path / "fm", ["-O2", "-Wall", "-Wextra"])


def _clang():
    return next(filter(None, map(shutil.which, ("clang", "clang-19", "clang-18", "clang-17", "clang-14"))),
                None)


@pytest.mark.parametrize("compiler, flag", [("gcc", "-Wcast-align=strict"), ("clang", "-Wcast-align")])
def test_header_casts_keep_alignment_warnings_quiet(tmp_path, compiler, flag):
    """The header's casts of a row's bytes to its element type go through void *: users who build with
    -Wcast-align (Clang's warns on x86 too) and -Werror were stopped by 16 warnings (found by an
    embedding audit). The alignment itself is the caller's, as fl_row says."""
    cc = shutil.which("gcc") if compiler == "gcc" else _clang()
    if cc is None:
        pytest.skip(f"no {compiler} on PATH")
    src = tmp_path / "ca.c"
    src.write_text('#include "fastlogits.h"\nint main(void) { return 0; }\n')
    assert _compile(cc, src, tmp_path / "ca", ["-O2", "-std=c99", "-Wall", "-Wextra", "-Wpedantic", flag,
                                               "-Werror"]) == ""


@needs_cc
@pytest.mark.parametrize("std", ["c89", "gnu89"])
def test_header_says_it_needs_c99(tmp_path, std):
    """Before C99 one clear error, not C89's 400 (found by an embedding audit)."""
    src = tmp_path / "old.c"
    src.write_text('#include "fastlogits.h"\nint main(void) { return 0; }\n')
    res = subprocess.run([CC, f"-std={std}", f"-I{fl.get_include()}", "-c", str(src), "-o",
                          str(tmp_path / "old.o")], capture_output=True, text=True)
    assert res.returncode != 0
    assert "fastlogits.h needs C99 or later" in res.stderr and res.stderr.count(": error:") == 1, res.stderr


@pytest.mark.skipif(CXX is None, reason="no C++ compiler on PATH")
@pytest.mark.parametrize("std", ["c++11", "c++14", "c++17"])
def test_header_compiles_as_cpp(tmp_path, std):
    """The header in C++, warning-free, the sampler's (Philox's AVX-512F intrinsics: GCC 12.2's own header
    warned in C++, GCC PR 105593) included: a row's logsumexp and cross-entropy, and a token drawn as the
    Python package draws it."""
    src = tmp_path / "prog.cpp"
    src.write_text(
        textwrap.dedent("""
        #include <cstdio>
        #include <vector>
        #include "fastlogits.h"
        int main() {
            std::vector<float> x(1000, 0.0f);
            fl_lse_state st;
            fl_lse_init(&st);
            fl_lse_update_f32(&st, x.data(), x.size());
            std::printf("%.9f %.9f\\n", fl_lse_result(&st), fl_cross_entropy_f32(x.data(), x.size(), 3));
            for (size_t i = 0; i < x.size(); i++) x[i] = (float)((i * 7919) % 1000) / 250.0f;
            std::vector<double> buf(4096);
            fl_sample_scratch sc = {buf.data(), NULL, NULL, NULL, NULL, NULL};
            fl_sample_params p = {7, 0, 0, 1.0, 0.0, 1, 0};
            fl_row r = {(const char *)x.data(), (int64_t)x.size(), 4, FL_F32, 1.0, 0.0};
            int64_t tok = -1;
            int status = fl_row_sample_f32(&r, &p, 4096, &sc, &tok, NULL, NULL);
            std::printf("%d %lld\\n", status, (long long)tok);
            return 0;
        }
    """)
    )
    warnings = _compile(CXX, src, tmp_path / "prog", ["-O2", f"-std={std}", "-pedantic-errors", "-Wall",
                                                      "-Wextra", "-Werror"])
    assert warnings == ""
    out = subprocess.run([tmp_path / "prog"], capture_output=True, text=True, check=True).stdout.split()
    assert abs(float(out[0]) - np.log(1000)) < 1e-6 and abs(float(out[1]) - np.log(1000)) < 1e-6
    x = ((np.arange(1000) * 7919) % 1000).astype(np.float32) / np.float32(250.0)
    assert out[2:] == ["0", str(int(fl.sample(x[None], seed=7)[0]))]


ARGMAX_ROWS = r"""
#include <stdio.h>
#include <stdlib.h>
#include "fastlogits.h"
int main(int argc, char **argv) {   /* rows of n float32 or float64 values in a file: each one's argmax */
    if (argc != 6) return 2;
    int64_t rows = atoll(argv[2]), n = atoll(argv[3]), chunk = atoll(argv[4]);
    int f64 = argv[5][0] == 'd';
    size_t size = f64 ? 8 : 4;
    char *x = malloc((size_t)(rows * n) * size), *buf = malloc((size_t)chunk * 8);
    FILE *f = fopen(argv[1], "rb");
    if (!x || !buf || !f || fread(x, size, (size_t)(rows * n), f) != (size_t)(rows * n)) return 1;
    for (int64_t i = 0; i < rows; i++) {
        fl_row r = {x + i * n * (int64_t)size, n, (int64_t)size, f64 ? FL_F64 : FL_F32, 1.0, 0.0};
        printf("%lld\n", (long long)(f64 ? fl_row_argmax_f64(&r, chunk, (double *)(void *)buf)
                                         : fl_row_argmax_f32(&r, chunk, (float *)(void *)buf)));
    }
    return 0;
}
"""


@needs_cc
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_argmax_spans_of_a_long_chunk(tmp_path, rng, dtype):
    """fl_row_argmax takes a chunk in spans of FL_ARGMAX_SPAN values (the one-pass lanes count vectors in
    an integer of the value's width: a float32 chunk of 2^35 values overflowed it and ran past the lanes,
    a review). Compiled with spans of 40 values: ties, NaN and +inf in any span, as NumPy's argmax."""
    src = tmp_path / "am.c"
    src.write_text(ARGMAX_ROWS)
    _compile(CC, src, tmp_path / "am", ["-O2", "-std=c99", "-Wall", "-Wextra", "-Werror",
                                          "-DFL_ARGMAX_SPAN=40"])
    rows, n = 60, 333
    x = rng.integers(0, 5, (rows, n)).astype(dtype)
    for r in range(0, rows, 6):
        x[r, rng.integers(n)] = [np.nan, np.inf][r % 12 // 6]
    x[1] = -np.inf
    x.tofile(tmp_path / "x.bin")
    for chunk in (n, 100, 7):
        out = subprocess.run([tmp_path / "am", tmp_path / "x.bin", str(rows), str(n), str(chunk),
                              "d" if dtype == np.float64 else "f"], capture_output=True, text=True,
                             check=True).stdout.split()
        np.testing.assert_array_equal(np.array(out, np.int64), np.argmax(x, axis=-1), str(chunk))


@needs_cc
def test_c_example_matches_python_api(tmp_path, rng):
    _compile(CC, EXAMPLE, tmp_path / "fl_rows", ["-O2", "-std=c99", "-Wall", "-Wextra", "-Werror"])
    rows, V = 6, 40000  # V > the example's chunk of 16384: rows are folded in pieces
    x = _awkward_rows(rng, rows, V)
    y = rng.integers(0, V, rows)
    data = b"".join(np.int64(y[i]).tobytes() + x[i].tobytes() for i in range(rows))
    res = subprocess.run([tmp_path / "fl_rows", str(V)], input=data, capture_output=True, check=True)
    got = np.array([[float(v) for v in line.split()] for line in res.stdout.decode().splitlines()])
    np.testing.assert_allclose(got[:, 0], fl.cross_entropy(x, y, reduction="none"), rtol=2e-6)
    np.testing.assert_allclose(got[:, 1], fl.logsumexp(x), rtol=2e-6)
    # a truncated stream is an error that says what was expected
    res = subprocess.run([tmp_path / "fl_rows", str(V)], input=data[:-10], capture_output=True)
    assert res.returncode != 0 and b"truncated" in res.stderr
    res = subprocess.run([tmp_path / "fl_rows", str(V)], input=np.int64(V).tobytes(), capture_output=True)
    assert res.returncode != 0 and b"out of range" in res.stderr


def test_cython_cimport_downstream(tmp_path, rng):
    pytest.importorskip("Cython")
    if CC is None:
        pytest.skip("no C compiler on PATH")
    (tmp_path / "downstream.pyx").write_text(
        textwrap.dedent("""
        # cython: language_level=3
        from fastlogits.clib cimport (fl_lse_state, fl_lse_init, fl_lse_update_f32, fl_lse_result,
                                      fl_cross_entropy_f32, fl_ce_state, fl_ce_init, fl_ce_update_f32,
                                      fl_ce_merge, fl_ce_result, fl_argmax_state, fl_argmax_init,
                                      fl_argmax_update_f32, fl_argmax_merge, fl_argmax_f32, fl_ent_state,
                                      fl_ent_init, fl_ent_update_f32, fl_ent_merge, fl_ent_result)

        def lse_rows(float[:, ::1] x):
            cdef fl_lse_state st
            cdef Py_ssize_t i
            out = []
            for i in range(x.shape[0]):
                with nogil:
                    fl_lse_init(&st)
                    fl_lse_update_f32(&st, &x[i, 0], x.shape[1])
                out.append(fl_lse_result(&st))
            return out

        def ce_row(float[::1] x, long label):
            cdef double r
            with nogil:
                r = fl_cross_entropy_f32(&x[0], x.shape[0], label)
            return r

        def in_halves(float[::1] x, long label):
            # the second half first, then the first, merged: the pieces' states as another thread's
            cdef fl_ce_state a, b
            cdef fl_argmax_state p, q
            cdef fl_ent_state e, f
            cdef Py_ssize_t h = x.shape[0] // 2
            with nogil:
                fl_ce_init(&a, label)
                fl_ce_init(&b, label)
                fl_ce_update_f32(&a, &x[h], x.shape[0] - h, h)
                fl_ce_update_f32(&b, &x[0], h, 0)
                fl_ce_merge(&a, &b)
                fl_argmax_init(&p)
                fl_argmax_init(&q)
                fl_argmax_update_f32(&p, &x[h], x.shape[0] - h, h)
                fl_argmax_update_f32(&q, &x[0], h, 0)
                fl_argmax_merge(&p, &q)
                fl_ent_init(&e)
                fl_ent_init(&f)
                fl_ent_update_f32(&e, &x[h], x.shape[0] - h)
                fl_ent_update_f32(&f, &x[0], h)
                fl_ent_merge(&e, &f)
            return fl_ce_result(&a), p.index, fl_argmax_f32(&x[0], x.shape[0]), fl_ent_result(&e)
    """)
    )
    # Cython finds fastlogits/clib.pxd through sys.path after a regular install; an editable install
    # (CI's) keeps it in the source tree, which include_path names: the folder holding the package.
    pkg_parent = str(Path(fl.__file__).resolve().parent.parent)
    (tmp_path / "setup.py").write_text(
        textwrap.dedent(f"""
        from setuptools import Extension, setup
        from Cython.Build import cythonize
        setup(ext_modules=cythonize([Extension("downstream", ["downstream.pyx"],
                                               include_dirs=[{fl.get_include()!r}])],
                                    include_path=[{pkg_parent!r}],
                                    compiler_directives={{"language_level": 3}}))
    """)
    )
    res = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    x = _awkward_rows(rng, 4, 3001)
    code = (
        "import sys, numpy as np; sys.path.insert(0, '.'); import downstream; "
        "x = np.load('x.npy'); print(repr(downstream.lse_rows(x))); print(downstream.ce_row(x[0], 17)); "
        "print(repr(downstream.in_halves(x[0], 17)))"
    )
    np.save(tmp_path / "x.npy", x)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    np.testing.assert_allclose(eval(out[0]), fl.logsumexp(x), rtol=2e-6)  # noqa: S307 - our own output
    assert float(out[1]) == pytest.approx(float(fl.cross_entropy(x[:1], [17])), rel=2e-6)
    ce, top_halves, top, ent = eval(out[2])  # noqa: S307 - our own output
    assert ent == pytest.approx(float(ref.entropy(x[0])), rel=2e-6)
    assert ce == pytest.approx(float(fl.cross_entropy(x[:1], [17])), rel=2e-6)
    assert top_halves == top == int(fl.argmax(x[0]))


def test_numba_entry_points_can_be_cached(tmp_path):
    """A user's @njit(cache=True) function that calls them is compiled once: the second process loads it
    from numba's cache (a ctypes pointer in the compiled code made numba refuse to cache it)."""
    pytest.importorskip("numba")
    # the fastlogits under test (installed, or this tree when editable), not the tree of this file: CI's
    # wheel leg runs these tests against an installed wheel
    where = os.path.dirname(os.path.dirname(os.path.abspath(fl.__file__)))
    (tmp_path / "user_code.py").write_text(textwrap.dedent("""
        import warnings, sys
        import numba, numpy as np
        from fastlogits.numba import cross_entropy_row, logsumexp_row

        @numba.njit(cache=True)
        def f(x):
            return logsumexp_row(x) + cross_entropy_row(x, 1)

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            print(repr(f(np.arange(5.0))), f.stats.cache_hits and 1 or 0)
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([where, str(tmp_path)]),
               NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    outs = [subprocess.run([sys.executable, str(tmp_path / "user_code.py")], env=env, capture_output=True,
                           text=True, timeout=300) for _ in range(2)]
    for res in outs:
        assert res.returncode == 0, res.stderr
    (v1, hit1), (v2, hit2) = (res.stdout.split() for res in outs)
    x = np.arange(5.0)
    want = ref.logsumexp(x) + ref.cross_entropy(x[None], np.array([1]), reduction="none")[0]
    assert float(v1) == float(v2) == pytest.approx(float(want), rel=1e-14)
    assert (hit1, hit2) == ("0", "1")


def test_a_star_import_brings_the_entry_points_alone():
    """``from fastlogits.numba import *`` replaced a caller's ``types``, ``np`` and ``ctypes`` with its own
    imports (found by a docs audit); it brings the public functions only (fastlogits.gpu.device: see
    tests/gpu/test_device_functions.py)."""
    pytest.importorskip("numba")
    ns = {"types": "mine"}
    exec("from fastlogits.numba import *", ns)
    assert ns["types"] == "mine" and {k for k in ns if not k.startswith("__")} == {
        "types", "logsumexp_row", "cross_entropy_row"}


def test_numba_entry_points(rng):
    numba = pytest.importorskip("numba")
    from fastlogits.numba import cross_entropy_row, logsumexp_row

    @numba.njit
    def per_row(x, y):
        out = np.empty((x.shape[0], 2))
        for i in range(x.shape[0]):
            out[i, 0] = logsumexp_row(x[i])
            out[i, 1] = cross_entropy_row(x[i], y[i])
        return out

    for dtype in (np.float32, np.float64):
        x = _awkward_rows(rng, 5, 777).astype(dtype)
        y = rng.integers(0, 777, 5)
        for view in (x, x[:, ::-3]):
            yy = y % view.shape[1]
            got = per_row(view, yy)
            tol = 1e-12 if dtype == np.float64 else 2e-6
            np.testing.assert_allclose(got[:, 0], ref.logsumexp(view), rtol=tol)
            np.testing.assert_allclose(got[:, 1], ref.cross_entropy(view, yy, reduction="none"), rtol=tol)
            # plain Python calls go to the same C function
            assert logsumexp_row(view[0]) == got[0, 0]
    edge = np.array([-np.inf, -np.inf], np.float32)
    assert logsumexp_row(edge) == -np.inf and np.isnan(cross_entropy_row(edge, 0))
    assert np.isnan(logsumexp_row(np.array([np.nan, 0.0])))
    assert logsumexp_row(np.array([np.inf, 0.0])) == np.inf
    with pytest.raises(TypeError, match="float32 or float64"):
        logsumexp_row(np.zeros(3, np.float16))
    for bad in ([1.0, 2.0], np.array(1.0), np.zeros((2, 2))):      # checked before the array is read
        for fn in (logsumexp_row, lambda a: cross_entropy_row(a, 0)):
            with pytest.raises(TypeError, match="x must be a 1-D float32 or float64"):
                fn(bad)
    with pytest.raises(IndexError, match="out of range"):
        cross_entropy_row(np.zeros(3), 3)
    for bad in (5, 3, -1, np.uint64(2**63 + 1)):       # NaN in compiled code, as the C functions give
        assert np.isnan(numba.njit(lambda a, lab: cross_entropy_row(a, lab))(np.zeros(3), bad))
    # a float label would be truncated (NaN to INT64_MIN, an address far outside the row): refused
    for bad in (2.9999, np.nan, True):
        with pytest.raises(numba.core.errors.TypingError, match="label must be an integer"):
            numba.njit(lambda a, lab: cross_entropy_row(a, lab))(np.zeros(3), bad)
        with pytest.raises(TypeError, match="label must be an integer"):
            cross_entropy_row(np.zeros(3), bad)


def test_numba_cross_entropy_with_a_bad_label_in_a_parallel_loop(rng):
    """A label out of range in a prange loop gives NaN for its row and leaves every other row right: the
    raise of an IndexError there was dropped by Numba, and the rows after it in its thread's share were
    never written (garbage such as 6.4e151; found by an embedding audit). The same in a @cfunc, which
    printed a traceback and returned 0.0."""
    numba = pytest.importorskip("numba")
    from fastlogits.numba import cross_entropy_row

    @numba.njit(parallel=True)
    def losses(x, y):
        out = np.empty(x.shape[0])
        for i in numba.prange(x.shape[0]):
            out[i] = cross_entropy_row(x[i], y[i])
        return out

    x = rng.standard_normal((64, 5)).astype(np.float32)
    y = rng.integers(0, 5, 64)
    bad = rng.choice(64, 6, replace=False)
    y[bad] = rng.choice([-1, 5, 7, -100, 2**40], 6)
    got = losses(x, y)
    good = np.setdiff1d(np.arange(64), bad)
    assert np.isnan(got[bad]).all()
    np.testing.assert_allclose(got[good], ref.cross_entropy(x[good], y[good], reduction="none"), rtol=2e-6)
    sig = numba.float64(numba.types.CPointer(numba.float32), numba.int64, numba.int64)

    @numba.cfunc(sig)
    def c_loss(p, n, label):
        return cross_entropy_row(numba.carray(p, n), label)

    row = np.ascontiguousarray(x[0])
    f = ctypes.CFUNCTYPE(ctypes.c_double, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)(c_loss.address)
    assert np.isnan(f(row.ctypes.data, 5, 5)) and np.isnan(f(row.ctypes.data, 5, -1))
    assert f(row.ctypes.data, 5, 2) == pytest.approx(ref.cross_entropy(x[:1], np.array([2]),
                                                                      reduction="none")[0], rel=2e-6)


CE_COLUMNS = r"""
#include <stdint.h>
#include <stdio.h>
#include "fastlogits.h"
int main(void) {
    float x[4] = {0.5f, 1.0f, 2.0f, -1.0f};
    fl_ce_state a, b, c;
    fl_ce_init(&a, INT64_MAX); fl_ce_update_f32(&a, x, 4, -5);       /* label - start past INT64_MAX */
    fl_ce_init(&b, 0); fl_ce_update_f32(&b, x, 4, -2);               /* columns -2 .. 2 hold label 0 */
    fl_ce_init(&c, INT64_MIN); fl_ce_update_f32(&c, x, 4, INT64_MAX);
    printf("%d %d %.9g %d\n", a.found, b.found, b.target, c.found);
    return 0;
}
"""


@needs_cc
def test_ce_columns_of_any_start_and_label_without_signed_overflow(tmp_path):
    """fl_ce_update's test of whether its chunk holds the label, for any int64 label and start (a
    negative start with a label near INT64_MAX overflowed `label - start`: UBSan, found by a sanitizer
    audit). Built with UBSan where the compiler has it, failing on any report."""
    out = _run_checked(tmp_path, CE_COLUMNS)
    assert out.split() == ["0", "1", "2", "0"]


def _run_checked(tmp_path, source):
    """The standard output of a C program built with UBSan (float-to-int casts out of range included)
    where the compiler has it, failing on any report."""
    src = tmp_path / "prog.c"
    src.write_text(source)
    flags = ["-O2", "-std=c99", "-Wall", "-Wextra", "-Werror"]
    ubsan = ["-fsanitize=undefined,float-cast-overflow", "-fno-sanitize-recover=all"]
    probe = subprocess.run([CC, *ubsan, "-x", "c", "-", "-o", str(tmp_path / "probe")],
                           input="int main(void) { return 0; }", capture_output=True, text=True)
    if probe.returncode == 0:
        flags += ubsan
    _compile(CC, src, tmp_path / "prog", flags)
    out = subprocess.run([tmp_path / "prog"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    return out.stdout


TOPP_BUCKETS = r"""
#include <math.h>
#include <stdio.h>
#include "fastlogits.h"
int main(void) {
    /* (value, max, scale): above the max (by a little, by far), NaN, -inf, the max, inside, below */
    double cases[][3] = {{1e30, 0, 1}, {20, 0, 134.5}, {NAN, 0, 1}, {-INFINITY, 0, 1}, {3, 3, 7},
                         {-2.5, 0, 100}, {-1e6, 0, 1}};
    for (unsigned i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        printf("%d %d\n", (int)fl__topp_bucket_f32((float)cases[i][0], (float)cases[i][1],
                                                   (float)cases[i][2]),
               (int)fl__topp_bucket_f64(cases[i][0], cases[i][1], cases[i][2]));
    return 0;
}
"""


@needs_cc
def test_topp_buckets_stay_in_the_table_for_values_the_max_did_not_see(tmp_path):
    """Top-p's histogram bucket of a value: (m - v) * scale clamped to [0, 1024]. The row is read twice
    (the max, then the buckets), and a value above the max or a NaN, which another thread writing the
    caller's array between the two reads makes, gave INT_MIN or -2690: a write below the table, a crash
    (found by a concurrency audit). Built with UBSan, which also reports a cast of a float out of int
    range."""
    out = _run_checked(tmp_path, TOPP_BUCKETS)
    pairs = [tuple(map(int, line.split())) for line in out.splitlines()]
    assert pairs == [(0, 0), (0, 0), (1024, 1024), (1024, 1024), (0, 0), (250, 250), (1024, 1024)]


ENT_UPDATE = r"""
#include <stdio.h>
#include <stdlib.h>
#include "fastlogits.h"
int main(void) {
    size_t n = (size_t)1 << 20, i;
    double *x = malloc(n * sizeof(double));
    fl_ent_state e;
    if (!x) return 1;
    for (i = 0; i < n; i++) x[i] = -7.0;
    x[0] = 0.0;
    fl_ent_init(&e);
    fl_ent_update_f64(&e, x, n);
    printf("%.17g\n", fl_ent_result(&e));
    free(x);
    return 0;
}
"""


@needs_cc
def test_c_entropy_update_keeps_its_chunks_rounding(tmp_path):
    """fl_ent_update_f64 folds FL_CHUNK values at a time, their sums' rounding errors kept and added
    at the end (fl__ent_done): 2^20 logits of -7 after a 0 give the entropy within 4 ulp of mpmath (35 lost
    with plain merges, the in-memory kernels' figure; a mutation audit dropped the final add unseen)."""
    mpmath = pytest.importorskip("mpmath")
    got = float(_run_checked(tmp_path, ENT_UPDATE))
    V = 1 << 20
    with mpmath.workdps(40):
        e = (V - 1) * mpmath.exp(-7)
        want = mpmath.log(1 + e) + 7 * e / (1 + e)
        err = float(abs(mpmath.mpf(got) - want) / np.spacing(float(want)))
    assert err <= 4, err


def test_numba_entry_points_read_unaligned_rows_through_a_copy(rng, monkeypatch):
    """An unaligned row (np.frombuffer at an odd offset) reaches the C functions as an aligned copy, from
    Python (checked: the C function is given an aligned address) and inside @njit code (numba's array
    types do not record alignment: checked at run time), with the aligned row's results."""
    numba = pytest.importorskip("numba")
    import fastlogits.numba as fnb

    for dtype in (np.float32, np.float64):
        x = rng.standard_normal(1001).astype(dtype)
        raw = np.zeros(x.nbytes + 1, np.uint8)
        u = raw[1:].view(dtype)
        u[:] = x
        assert not u.flags.aligned
        want = (fnb.logsumexp_row(x), fnb.cross_entropy_row(x, 3))
        got = numba.njit(lambda a: (fnb.logsumexp_row(a), fnb.cross_entropy_row(a, 3)))(u)
        assert got == want
        for name in ("_lse", "_ce"):
            real = getattr(fnb, name)

            def aligned_only(ptr, *args, real=real, size=x.itemsize):
                assert ptr % size == 0, "an unaligned address"
                return real(ptr, *args)
            monkeypatch.setattr(fnb, name, aligned_only)
        assert (fnb.logsumexp_row(u), fnb.cross_entropy_row(u, 3)) == want
        monkeypatch.undo()
