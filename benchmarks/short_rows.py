"""Rows of a few classes (classification heads), float32, one thread: fastlogits against PyTorch in the same
run, each call timed by perf_counter, the two libraries' calls interleaved, medians (README's short-row
table).

    python benchmarks/short_rows.py [--repeat 21] [--threads 1] [--by-columns] [--json]

Needs PyTorch (the peer). Each shape holds about 6.5 M logits (and 65536 x 10, a classifier's outputs over a
dataset); every fastlogits result is checked against PyTorch's before it is timed. --by-columns gives both
libraries the transposed view of a (V, rows) array instead, as ``(W @ H).T`` lays logits out.
"""
import argparse
import json
import time

import numpy as np

import fastlogits as fl
from fastlogits.bench import environment

SHAPES = [(65536, 10), (409600, 16), (131072, 50), (65536, 100)]


def calls(torch, x, y, threads):
    """{name: (fastlogits call, PyTorch call)} on logits x and labels y."""
    F = torch.nn.functional
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    return {
        "logsumexp": (lambda: fl.logsumexp(x, threads=threads), lambda: torch.logsumexp(xt, -1)),
        "softmax": (lambda: fl.softmax(x, threads=threads), lambda: torch.softmax(xt, -1)),
        "log_softmax": (lambda: fl.log_softmax(x, threads=threads), lambda: torch.log_softmax(xt, -1)),
        "cross_entropy": (lambda: fl.cross_entropy(x, y, threads=threads), lambda: F.cross_entropy(xt, yt)),
        "cross_entropy none": (lambda: fl.cross_entropy(x, y, reduction="none", threads=threads),
                               lambda: F.cross_entropy(xt, yt, reduction="none")),
    }


def _seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=21)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--by-columns", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    out = []
    for rows, V in SHAPES:
        if args.by_columns:
            x = (rng.standard_normal((V, rows)) * 3).astype(np.float32).T
        else:
            x = (rng.standard_normal((rows, V)) * 3).astype(np.float32)
        y = rng.integers(0, V, rows)
        for name, (ours, theirs) in calls(torch, x, y, args.threads).items():
            np.testing.assert_allclose(np.asarray(ours(), np.float64), theirs().double().numpy(), rtol=2e-5,
                                       atol=1e-6, err_msg=name)       # (and one untimed call each)
            t = np.array([(_seconds(ours), _seconds(theirs)) for _ in range(args.repeat)])
            med = np.median(t, axis=0)
            out.append({"op": name, "shape": [rows, V], "by_columns": args.by_columns,
                        "threads": args.threads, "fastlogits_ms": 1e3 * med[0], "torch_ms": 1e3 * med[1]})
            if not args.json:
                r = out[-1]
                shape = f"{rows:6d} x {V:3d}" + (" .T" if args.by_columns else "")
                print(f"{name:18s} {shape}  fastlogits {r['fastlogits_ms']:6.2f} ms   "
                      f"PyTorch {r['torch_ms']:6.2f} ms   x{r['torch_ms'] / r['fastlogits_ms']:.2f}")
    if args.json:
        print(json.dumps({"environment": environment(), "repeat": args.repeat, "statistic": "median",
                          "results": out}, indent=1))


if __name__ == "__main__":
    main()
