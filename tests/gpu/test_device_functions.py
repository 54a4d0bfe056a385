"""fastlogits.gpu.device: the state functions users call from their own numba.cuda kernels."""

import math

import numpy as np
import pytest
from numba import cuda  # after conftest.py chose the simulator (or not)

import fastlogits as fl
from fastlogits.gpu.device import lse_merge, lse_result, lse_update

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# A user's kernels: one thread per row folds its row with lse_update in two halves and merges them with
# lse_merge; a second kernel merges given states. (Module-level: the simulator swaps the module's `cuda`.)


@cuda.jit
def row_lse(x, out_m, out_s, out_lse):
    r = cuda.grid(1)
    if r < x.shape[0]:
        half = x.shape[1] // 2
        m1, s1 = -math.inf, 0.0
        for j in range(half):
            m1, s1 = lse_update(m1, s1, x[r, j])
        m2, s2 = -math.inf, 0.0
        for j in range(half, x.shape[1]):
            m2, s2 = lse_update(m2, s2, x[r, j])
        m, s = lse_merge(m2, s2, m1, s1)
        out_m[r] = m
        out_s[r] = s
        out_lse[r] = lse_result(m, s)


@cuda.jit
def merge(m1, s1, m2, s2, out_m, out_s):
    i = cuda.grid(1)
    if i < m1.shape[0]:
        m, s = lse_merge(m1[i], s1[i], m2[i], s2[i])
        out_m[i] = m
        out_s[i] = s


def user_kernels():
    return row_lse, merge


def test_user_kernel_lse(gpu, rng):
    inf, nan = np.inf, np.nan
    x = rng.standard_normal((8, 10)) * 3
    x[1, :] = -inf  # all -inf
    x[2, :5] = -inf  # first half all -inf, second half near -1000
    x[2, 5:] -= 1000
    x[3, 7] = inf
    x[4, 2] = nan
    x[5, 1] = inf
    x[5, 8] = nan
    x[6, :] = 1000.0  # ties
    m = cuda.device_array(8)
    s = cuda.device_array(8)
    out = cuda.device_array(8)
    row_lse[1, 32](cuda.to_device(x), m, s, out)
    got = out.copy_to_host()
    want = fl.logsumexp(x, backend="cpu")
    np.testing.assert_allclose(got, want, rtol=1e-13)
    m = m.copy_to_host()
    s = s.copy_to_host()
    assert m[1] == -inf and s[1] == 0.0
    assert m[3] == inf and s[3] == 1.0
    assert np.isnan(m[4]) and np.isnan(s[4]) and np.isnan(m[5])
    assert m[6] == 1000.0 and s[6] == 10.0


def test_user_kernel_merge_rule(gpu):
    """The C core's merge: NaN wins, -inf states are skipped, +inf gives (inf, 1), else rescale."""
    inf, nan = np.inf, np.nan
    cases = [  # (m1, s1, m2, s2) -> (m, s)
        ((-inf, 0.0, 1.0, 2.0), (1.0, 2.0)),
        ((1.0, 2.0, -inf, 0.0), (1.0, 2.0)),
        ((-inf, 0.0, -inf, 0.0), (-inf, 0.0)),
        ((nan, nan, 1.0, 1.0), (nan, nan)),
        ((1.0, 1.0, nan, nan), (nan, nan)),
        ((inf, 1.0, 3.0, 4.0), (inf, 1.0)),
        ((3.0, 4.0, inf, 1.0), (inf, 1.0)),
        ((0.0, 1.0, math.log(3.0), 1.0), (math.log(3.0), 1.0 + 1.0 / 3.0)),
        ((-1000.0, 1.0, -1001.0, 1.0), (-1000.0, 1.0 + math.exp(-1.0))),
    ]
    a = np.array([c[0] for c in cases], dtype=np.float64).T.copy()
    m = cuda.device_array(len(cases))
    s = cuda.device_array(len(cases))
    merge[1, 32](*(cuda.to_device(np.ascontiguousarray(v)) for v in a), m, s)
    want = np.array([c[1] for c in cases])
    np.testing.assert_allclose(m.copy_to_host(), want[:, 0], rtol=1e-15)
    np.testing.assert_allclose(s.copy_to_host(), want[:, 1], rtol=1e-15)


def test_bf16_conversion_every_bit_pattern(gpu):
    """The kernels' bfloat16 load (a shift into a float32's high half and a bit cast: the simulator's by a
    NumPy view, the GPU's by libdevice) is exact for all 65536 patterns: zeros, subnormals, normals,
    infinities, NaN. One block whose threads stride over the patterns, so the simulator runs it quickly."""
    import ml_dtypes

    from fastlogits.gpu.kernels import _LOADS

    load = _LOADS["bfloat16"][0]

    @cuda.jit
    def apply(x, out):
        for j in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
            out[j] = load(x, 0, j)

    bits = np.arange(65536, dtype=np.uint16)
    out = cuda.device_array(bits.size, np.float32)
    apply[1, 128](cuda.to_device(bits[None, :]), out)
    got = out.copy_to_host()
    want = bits.view(ml_dtypes.bfloat16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))   # -0.0 included


def test_exp_le0_accuracy(gpu):
    """The kernels' term of a sum, exp2(d log2 e) in float32 (on a GPU: ex2.approx), against float64 exp:
    within 2 ulp + 1.3 |d| 2^-24 relative where the result is normal (the bound kernels.py and the README
    state, with a little room), exact at 0, 0 at -inf, NaN for NaN. On the simulator this checks the
    formula; on a GPU (benchmarks/gpu_check.sh runs this directory there) the hardware's ex2."""
    from fastlogits.gpu import kernels as K

    exp_le0 = K.for_kind("float32").exp_le0

    @cuda.jit
    def apply(d, out):
        i = cuda.grid(1)
        if i < d.shape[0]:
            out[i] = exp_le0(d[i])

    rng = np.random.default_rng(7)
    d = np.concatenate([np.linspace(-87.0, 0.0, 3001), -np.logspace(-30, 1.9, 400), -rng.random(600) * 87,
                        [0.0, -0.0, -np.inf, np.nan, -1e-45, -95.0, -104.0, -200.0]]).astype(np.float32)
    out = cuda.device_array(d.shape, np.float32)
    apply[(d.size + 127) // 128, 128](cuda.to_device(d), out)
    got = out.copy_to_host().astype(np.float64)
    want = np.exp(d.astype(np.float64))
    normal = want >= 2.0**-126
    rel = np.abs(got[normal] - want[normal]) / want[normal]
    bound = 2.25 * 2.0**-23 + 1.4 * np.abs(d[normal].astype(np.float64)) * 2.0**-24
    worst = np.argmax(rel / bound)
    assert np.all(rel <= bound), (d[normal][worst], rel[worst], bound[worst])
    assert np.all(got[d == 0] == 1.0) and np.count_nonzero(d == 0) >= 2     # 0.0 and -0.0
    assert got[np.isneginf(d)].tolist() == [0.0]
    assert np.isnan(got[np.isnan(d)]).all()
    tiny = ~normal & ~np.isnan(d)
    assert np.count_nonzero(tiny) >= 4
    if K.EXP2_FTZ:          # ex2.approx.ftz: results below 2^-126 are 0
        assert np.all(got[tiny] == 0)
    else:
        assert np.all((got[tiny] >= 0) & (got[tiny] < 2.0**-125))


def test_a_star_import_brings_the_device_functions_alone():
    """``from fastlogits.gpu.device import *`` brought its ``math`` and ``cuda`` too (and INT64_MAX)."""
    ns = {"math": "mine"}
    exec("from fastlogits.gpu.device import *", ns)
    assert ns["math"] == "mine" and {k for k in ns if not k.startswith("__")} == {
        "math", "lse_update", "lse_merge", "lse_result", "ent_update", "ent_merge", "ent_result", "better"}
