"""The logsumexp pass's launch settings swept on a real GPU, for the GPU check script (gpu_check.sh).

A lent GPU is rare and short, so one run measures what the next change needs: on device-resident
(8192, 128256) logits, float32 and bfloat16, the back-to-back time of ``fastlogits.logsumexp`` (CUDA
events, medians) for

- segment lengths (``backend.MAX_SEGMENT``: a row's columns per block; no recompilation),
- columns per thread per step (``kernels.UNROLLS``: the kernels rebuilt),

each checked against the default settings' result (relative 1e-6), next to two ceilings measured in the
same run: the device-to-device copy (bytes read + written) and PyTorch's ``sum`` over the same logits
(a read-only reduction). Then where the default call's device time goes, per kernel (PyTorch's profiler,
which sees numba's kernels too). Every figure goes to stdout.

    NUMBA_ENABLE_CUDASIM=0 python benchmarks/gpu_sweep.py       (FL_SWEEP_SHAPE=RxV for another shape)
"""
import os

import numpy as np

import fastlogits as fl
from fastlogits.gpu import backend as B
from fastlogits.gpu import kernels as K
from fastlogits.gpu import timing

SHAPE = tuple(int(n) for n in os.environ.get("FL_SWEEP_SHAPE", "8192x128256").split("x"))
SEGMENTS = (8192, 16384, 32768, 65536, 131072)
UNROLL_CHOICES = {"float32": (4, 8, 16), "bfloat16": (8, 16, 32)}


def rebuild(kind, unroll):
    """The kernels of ``kind`` rebuilt with ``unroll`` columns per thread per step (on first use)."""
    K.UNROLLS[kind] = unroll
    K.for_kind = K.kind_cache(K._build)


def main():
    rows, V = SHAPE
    copy = timing.copy_bandwidth(1 << 30) / 1e9
    print(f"device-to-device copy: {copy:.1f} GB/s (read + write)")
    torch = timing._torch_cuda()
    for kind in ("float32", "bfloat16"):
        d = timing._device_logits(SHAPE, kind)
        dx = d.view(B.BF16) if kind == "bfloat16" else d
        nbytes = rows * V * B._NP[kind].itemsize

        def line(label, seconds, kind=kind, nbytes=nbytes):
            gbps = nbytes / seconds / 1e9 if seconds > 0 else float("nan")    # (the simulator times 0)
            return (f"{kind:9s} {label:34s} {1e3 * seconds:7.3f} ms {gbps:8.1f} GB/s"
                    f" {100 * gbps / copy:6.1f}% of copy")

        ref = fl.logsumexp(dx).copy_to_host()
        if torch is not None:
            tt = timing.torch_view(torch, d, kind)
            print(line("torch sum (read ceiling)", timing.time_stream(lambda tt=tt: tt.sum())))
            print(line("torch logsumexp", timing.time_stream(lambda tt=tt: torch.logsumexp(tt, -1))))

        default_seg, default_unroll = B.MAX_SEGMENT, K.UNROLLS[kind]
        for seg in SEGMENTS:
            B.MAX_SEGMENT = seg
            t = timing.time_stream(lambda dx=dx: fl.logsumexp(dx))
            ok = np.allclose(fl.logsumexp(dx).copy_to_host(), ref, rtol=1e-6, atol=0)
            nseg, seglen = B._segments(rows, V, fl._config.DEFAULT_CHUNK)
            print(line(f"MAX_SEGMENT {seg} ({nseg} x {seglen})", t) + ("" if ok else "  RESULT DIFFERS"))
        B.MAX_SEGMENT = default_seg
        for unroll in UNROLL_CHOICES[kind]:
            try:
                rebuild(kind, unroll)
                t = timing.time_stream(lambda dx=dx: fl.logsumexp(dx))
                ok = np.allclose(fl.logsumexp(dx).copy_to_host(), ref, rtol=1e-6, atol=0)
                print(line(f"UNROLL {unroll}", t) + ("" if ok else "  RESULT DIFFERS"))
            except Exception as e:  # a variant that does not compile is a finding, not a failure
                print(f"{kind:9s} UNROLL {unroll}: {type(e).__name__}: {e}")
        rebuild(kind, default_unroll)

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
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6,
                                                max_name_column_width=60))
            except Exception as e:  # no CUPTI under this runtime
                print(f"{kind}: no per-kernel profile ({type(e).__name__}: {e})")
        del d, dx


if __name__ == "__main__":
    main()
