"""The logsumexp pass's launch settings swept on a real GPU, for the GPU check script (gpu_check.sh).

A lent GPU is rare and short, so one run measures what the next change needs: on device-resident
(8192, 128256) logits, float32 and bfloat16, the back-to-back time of ``fastlogits.logsumexp`` (CUDA
events, medians) for

- segment lengths (``backend.MAX_SEGMENT``: a row's columns per block),
- columns per thread per step of the statistics pass (``kernels.STATS_UNROLLS``: the kernels rebuilt),
- the exp2 of a sum's terms (``kernels.EXP2_FTZ``: rebuilt),

with ``cross_entropy`` (device labels) too, each logsumexp checked against the defaults' result (relative
2e-6), next to two ceilings measured in the same run: the device-to-device copy (bytes read + written) and
PyTorch's ``sum`` over the same logits (a read-only reduction). Then where the default call's device time
goes, per kernel (PyTorch's profiler, which sees numba's kernels too). Every figure goes to stdout.

    NUMBA_ENABLE_CUDASIM=0 python benchmarks/gpu_sweep.py       (FL_SWEEP_SHAPE=RxV for another shape)
"""
import os

import numpy as np
from numba import cuda

import fastlogits as fl
from fastlogits.gpu import backend as B
from fastlogits.gpu import kernels as K
from fastlogits.gpu import timing

SHAPE = tuple(int(n) for n in os.environ.get("FL_SWEEP_SHAPE", "8192x128256").split("x"))
# (MAX_SEGMENT, UNROLL, EXP2_FTZ): the defaults first, then one setting changed at a time, then the settings
# before the last sweep (segments of 32768 columns, CUDA's exp2f)
VARIANTS = {
    "float32": ((131072, 16, True), (131072, 16, False), (65536, 16, True), (131072, 32, True),
                (32768, 8, False)),
    "bfloat16": ((131072, 32, True), (131072, 32, False), (65536, 32, True), (131072, 64, True),
                 (32768, 16, False)),
}


def use(kind, seg, unroll, ftz):
    """Segments of at most ``seg`` columns, and the kernels of ``kind`` rebuilt (on first use) with ``unroll``
    columns per thread per step in the statistics pass and the exp2 of EXP2_FTZ = ``ftz``."""
    B.MAX_SEGMENT = seg
    K.STATS_UNROLLS[kind] = unroll
    K.EXP2_FTZ = ftz
    K.for_kind = K.kind_cache(K._build)


def main():
    rows, V = SHAPE
    copy = timing.copy_bandwidth(1 << 30) / 1e9
    print(f"device-to-device copy: {copy:.1f} GB/s (read + write)")
    torch = timing._torch_cuda()
    labels = cuda.to_device(np.random.default_rng(1).integers(0, V, rows))
    for kind in ("float32", "bfloat16"):
        d = timing._device_logits(SHAPE, kind)
        dx = d.view(B.BF16) if kind == "bfloat16" else d
        nbytes = rows * V * B._NP[kind].itemsize

        def line(label, seconds, kind=kind, nbytes=nbytes):
            gbps = nbytes / seconds / 1e9 if seconds > 0 else float("nan")    # (the simulator times 0)
            return (f"{kind:9s} {label:30s} {1e3 * seconds:7.3f} ms {gbps:8.1f} GB/s"
                    f" {100 * gbps / copy:6.1f}% of copy")

        if torch is not None:
            tt = timing.torch_view(torch, d, kind)
            print(line("torch sum (read ceiling)", timing.time_stream(lambda tt=tt: tt.sum())))
            print(line("torch logsumexp", timing.time_stream(lambda tt=tt: torch.logsumexp(tt, -1))))
        timing.time_stream(lambda dx=dx: fl.logsumexp(dx), repeat=30)   # clocks up: the first variant
        ref = None                                                        # is not timed cold
        shipped = B.MAX_SEGMENT, K.STATS_UNROLLS[kind], K.EXP2_FTZ
        for seg, unroll, ftz in VARIANTS[kind]:
            label = f"seg {seg} unroll {unroll} {'ftz' if ftz else 'exp2f'}"
            try:
                use(kind, seg, unroll, ftz)
                got = fl.logsumexp(dx).copy_to_host()
                ref = got if ref is None else ref
                ok = np.allclose(got, ref, rtol=2e-6, atol=0)
                t = timing.time_stream(lambda dx=dx: fl.logsumexp(dx))
                tce = timing.time_stream(lambda dx=dx: fl.cross_entropy(dx, labels))
                print(line(label + " lse", t) + ("" if ok else "  RESULT DIFFERS"))
                print(line(label + " ce", tce))
            except Exception as e:  # a variant that fails is a finding, not the end of the sweep
                print(f"{kind:9s} {label}: {type(e).__name__}: {e}")
        use(kind, *shipped)

        if torch is not None:
            try:
                from torch.profiler import ProfilerActivity, profile

                fl.logsumexp(dx)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        fl.logsumexp(dx)
                    torch.cuda.synchronize()
                print(f"{kind}: device time per kernel over 5 default calls")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=4,
                                                max_name_column_width=60))
            except Exception as e:  # no CUPTI under this runtime
                print(f"{kind}: no per-kernel profile ({type(e).__name__}: {e})")
        del d, dx


if __name__ == "__main__":
    main()
