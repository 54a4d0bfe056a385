"""Streaming at scale: peak memory and throughput of ``fastlogits stats`` on a 2 GB float16 dump (and on
the same values saved in Fortran order), and of
``fastlogits.logsumexp`` and ``fastlogits.sample`` (plain, top-p, top-k with top-p) on a single 1 GiB row
read with a 64 MiB budget.

    python benchmarks/stream_check.py [--dir /tmp/fl-stream] [--keep]

Writes the dumps (about 5 GB of disk), reads the first one once to put it in the page cache, then runs
each measurement in a child process and reads its peak RSS from getrusage (what GNU ``time -v`` reports as
"Maximum resident set size"). The in-memory peer is the same three kernels (cross-entropy, entropy,
argmax in one pass) on an in-memory block of the same dump, measured in the same run.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

ROWS, VOCAB = 20000, 50257
BIG_ROW = 2**28


def _child(code):
    """Run python code in a child; return (its stdout less the last line, its own peak RSS in bytes as
    getrusage reports it, what GNU time -v calls "Maximum resident set size")."""
    code += "\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr)
    *out, rss = res.stdout.strip().split("\n")
    return "\n".join(out), int(rss) * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/fastlogits-stream-check")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    dump, fdump, labels, raw = (os.path.join(args.dir, n) for n in ("dump.npy", "dump_F.npy", "labels.npy",
                                                                    "row.f32"))
    # The dumps are written by a child: on Linux a child's peak RSS counts its parent's at fork time, so
    # the parent stays small.
    _child(f"""
import os, numpy as np
rng = np.random.default_rng(0)
if not os.path.exists({dump!r}):
    out = np.lib.format.open_memmap({dump!r}, mode="w+", dtype=np.float16, shape=({ROWS}, {VOCAB}))
    for r0 in range(0, {ROWS}, 1000):
        out[r0:r0 + 1000] = (rng.standard_normal((1000, {VOCAB}), dtype=np.float32) * 3).astype(np.float16)
    out.flush()
    np.save({labels!r}, rng.integers(0, {VOCAB}, {ROWS}))
if not os.path.exists({fdump!r}):
    x = np.load({dump!r}, mmap_mode="r")
    out = np.lib.format.open_memmap({fdump!r}, mode="w+", dtype=np.float16, shape=x.shape, fortran_order=True)
    for c0 in range(0, {VOCAB}, 1024):
        out[:, c0:c0 + 1024] = x[:, c0:c0 + 1024]
    out.flush()
if not os.path.exists({raw!r}):
    with open({raw!r}, "wb") as f:
        for _ in range({BIG_ROW} // 2**24):
            f.write((rng.standard_normal(2**24, dtype=np.float32) * 3).tobytes())
""")
    for path in (dump, fdump):                # into the page cache
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    report = {}
    # the in-memory peer: the same one-pass kernel on an in-memory block of the dump (2000 rows, 200 MB)
    code = f"""
import time, numpy as np
from fastlogits.stream import run
x = np.load({dump!r}, mmap_mode="r")[:2000].copy(); y = np.load({labels!r})[:2000]
times = []
for _ in range(5):
    t = time.perf_counter()
    run.stats(x, y)
    times.append(time.perf_counter() - t)
print(x.nbytes / np.median(times) / 1e9)
"""
    out, _ = _child(code)
    report["in_memory_GB/s"] = float(out)
    out, peak = _child(f"from fastlogits.cli import main; main(['stats', {dump!r}, '--labels', {labels!r}, "
                       "'--json'])")
    s = json.loads(out)
    report["stats"] = {"rows": s["rows"], "seconds": s["seconds"], "GB/s": s["GB/s"],
                       "peak_rss_MB": peak / 1e6, "mean_nll": s["mean_nll"]}
    report["stats_vs_in_memory"] = s["GB/s"] / report["in_memory_GB/s"]
    # the same values in Fortran order: row blocks read a column segment at a time
    out, peak = _child(f"from fastlogits.cli import main; main(['stats', {fdump!r}, '--labels', {labels!r}, "
                       "'--json'])")
    f = json.loads(out)
    report["stats_fortran_order"] = {"seconds": f["seconds"], "GB/s": f["GB/s"], "peak_rss_MB": peak / 1e6,
                                     "same_mean_nll": f["mean_nll"] == s["mean_nll"]}
    # the single 1 GiB row: one streamed logsumexp pass (the peer: the cost of reading the row once), and
    # sample() of it in passes over its columns (fastlogits/stream/wide.py)
    report["single_row_1GiB"] = {}
    for name, call in (("logsumexp", "float(fl.logsumexp(src)[0])"),
                       ("sample", "int(fl.sample(src, seed=0)[0])"),
                       ("sample_top_p_0.9", "int(fl.sample(src, seed=0, top_p=0.9)[0])"),
                       ("sample_T0.8_top_k_50_top_p_0.9",
                        "int(fl.sample(src, seed=0, temperature=0.8, top_k=50, top_p=0.9)[0])"),
                       ("sample_T0.8_top_k_50_top_p_0.9_logprobs",
                        "float(fl.sample(src, seed=0, temperature=0.8, top_k=50, top_p=0.9, "
                        "return_logprobs=True)[1][0])")):
        out, peak2 = _child(f"""
import time, fastlogits as fl
src = fl.open({raw!r}, dtype="float32", vocab={BIG_ROW}, memory="64MiB")
t = time.perf_counter(); r = {call}; print(r); print(time.perf_counter() - t)
""")
        value, seconds = out.split("\n")
        report["single_row_1GiB"][name] = {"result": float(value), "seconds": float(seconds),
                                           "peak_rss_MB": peak2 / 1e6}
    print(json.dumps(report, indent=1))
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
