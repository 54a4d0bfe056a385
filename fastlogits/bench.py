"""``fastlogits bench``: fastlogits against NumPy/SciPy and PyTorch (where installed), measured side by side.

Every figure is a median over ``repeat`` timed calls after a warm-up call, in one process, so ratios between
columns are meaningful on a noisy shared machine even when absolute figures drift. The ceiling is the
machine's read bandwidth over the same array, measured in the same run: the faster of a vectorized,
threaded sum in C and ``torch.sum`` (or ``numpy.sum`` on one thread, without PyTorch).
"""
import os
import sys
import time

import numpy as np

import fastlogits as fl
from fastlogits import _json
from fastlogits.ops._prep import NP_DTYPES

OPS = ("logsumexp", "cross_entropy", "softmax", "log_softmax", "entropy", "argmax", "top_k")
DTYPES = ("float16", "bfloat16", "float32", "float64")


def _median_time(fn, repeat):
    fn()  # warm-up: page faults, thread pool start, lazy imports
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _scipy_special():
    """scipy.special, or None where SciPy is not installed (its column is left out, as PyTorch's is)."""
    try:
        import scipy.special
    except ImportError:
        return None
    return scipy.special


TOP_K = 50      # (fewer for a smaller vocabulary)


def _fastlogits_call(op, x, labels, threads):
    """fastlogits on the CPU (the GPU column is measured apart, on device-resident logits)."""
    kw = {"threads": threads, "backend": "cpu"}
    return {
        "logsumexp": lambda: fl.logsumexp(x, **kw),
        "cross_entropy": lambda: fl.cross_entropy(x, labels, **kw),
        "softmax": lambda: fl.softmax(x, **kw),
        "log_softmax": lambda: fl.log_softmax(x, **kw),
        "entropy": lambda: fl.entropy(x, **kw),
        "argmax": lambda: fl.argmax(x, **kw),
        "top_k": lambda: fl.top_k(x, min(TOP_K, x.shape[-1]), **kw),
    }[op]


VERIFY_ROWS = 4     # rows of each per-row result checked against the float64 reference, at the start and
                    # at the end (where the last thread's rows are), and all for a mean


def verified_rows(n):
    """The rows of an n-row result that are checked: the first and the last VERIFY_ROWS."""
    return np.unique(np.r_[:VERIFY_ROWS, n - VERIFY_ROWS:n].clip(0, n - 1))


def reference(op, x, labels, k=TOP_K):
    """The float64 NumPy reference of a fastlogits op on host logits x (2-D) in the dtype the API
    documents (reductions: float32, or float64 for float64 logits; maps and top-k values: x's dtype;
    indices int64); cross_entropy is the mean over x's rows, read by blocks of rows."""
    red = np.float64 if x.dtype == np.float64 else np.float32

    def lse(a):
        m = np.max(a, axis=-1, keepdims=True)
        return (m + np.log(np.sum(np.exp(a - m), axis=-1, keepdims=True)))[:, 0]

    if op == "cross_entropy":
        total = 0.0
        for r0 in range(0, x.shape[0], 64):
            a = x[r0:r0 + 64].astype(np.float64)
            total += float(np.sum(lse(a) - a[np.arange(a.shape[0]), labels[r0:r0 + 64]]))
        return red(total / x.shape[0])
    a = x.astype(np.float64)
    if op == "logsumexp":
        return lse(a).astype(red)
    if op == "entropy":
        p = np.exp(a - lse(a)[:, None])
        return (lse(a) - np.sum(p * a, axis=-1)).astype(red)
    if op in ("softmax", "log_softmax"):
        lp = a - lse(a)[:, None]
        return (np.exp(lp) if op == "softmax" else lp).astype(x.dtype)
    if op == "argmax":
        return np.argmax(a, axis=-1).astype(np.int64)
    if op == "top_k":
        i = np.argsort(-a, axis=-1, kind="stable")[:, :min(k, x.shape[-1])]     # lower index first on ties
        return np.take_along_axis(x, i, -1), i.astype(np.int64)
    raise ValueError(f"no reference for {op!r}")


def verify(op, got, x, labels):
    """(largest difference, ok) of fastlogits' result ``got`` of ``op`` on host logits x (2-D): its first
    and last VERIFY_ROWS rows (a mean: the whole) against the float64 reference, within the tolerance
    ``fastlogits check`` documents (and the same dtype and shape)."""
    from fastlogits.check import _compare

    dtype = "bfloat16" if x.dtype == NP_DTYPES["bfloat16"] else str(x.dtype)
    out_dtype = dtype if op in ("softmax", "log_softmax", "top_k") else None
    if op == "cross_entropy":
        return _compare(op, got, reference(op, x, labels), x, dtype)
    rows = verified_rows(x.shape[0])
    got = got if isinstance(got, tuple) else (got,)
    want = reference(op, x[rows], labels[rows])
    want = want if isinstance(want, tuple) else (want,)
    diff, ok = 0.0, True
    for name, g, w in zip(("top_k_values", "top_k_indices") if op == "top_k" else (op,), got, want):
        g = g.copy_to_host() if hasattr(g, "copy_to_host") else np.asarray(g)
        d, o = _compare(name, g[rows], w, x[rows], dtype,
                        None if name.endswith("indices") or name == "argmax" else out_dtype)
        diff, ok = max(diff, d), ok and o
    return diff, ok


def _numpy_top_k(xs, k):
    """NumPy's top-k as fastlogits returns it: values and indices, sorted by value."""
    i = np.argpartition(xs, -k, axis=-1)[:, -k:]
    v = np.take_along_axis(xs, i, -1)
    order = np.argsort(-v, axis=-1, kind="stable")
    return np.take_along_axis(v, order, -1), np.take_along_axis(i, order, -1)


def _numpy_call(sp, op, x, labels):
    """NumPy/SciPy's way (float32 arithmetic where they allow it); sp: scipy.special."""
    xs = x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)
    rows = np.arange(x.shape[0])
    return {
        "logsumexp": lambda: sp.logsumexp(xs, axis=-1),
        "cross_entropy": lambda: np.mean(sp.logsumexp(xs, axis=-1) - xs[rows, labels]),
        "softmax": lambda: sp.softmax(xs, axis=-1),
        "log_softmax": lambda: sp.log_softmax(xs, axis=-1),
        "entropy": lambda: sp.entr(sp.softmax(xs, axis=-1)).sum(-1),
        "argmax": lambda: np.argmax(xs, axis=-1),
        "top_k": lambda: _numpy_top_k(xs, min(TOP_K, xs.shape[-1])),
    }[op]


def _torch_call(torch, op, t, tl):
    F = torch.nn.functional
    return {
        "logsumexp": lambda: torch.logsumexp(t, -1),
        "cross_entropy": lambda: F.cross_entropy(t, tl),
        "softmax": lambda: torch.softmax(t, -1),
        "log_softmax": lambda: torch.log_softmax(t, -1),
        # the plain formula, one softmax and one log-softmax (Categorical(logits=t).entropy() validates its
        # arguments and normalises the logits again: several more passes, an unfair peer); the bench's
        # logits are finite, so no 0 * -inf
        "entropy": lambda: -(torch.softmax(t, -1) * torch.log_softmax(t, -1)).sum(-1),
        "argmax": lambda: torch.argmax(t, -1),
        "top_k": lambda: torch.topk(t, min(TOP_K, t.shape[-1]), -1),
    }[op]


def hf_sample_pipeline(torch, t, T=0.8, k=50, p=0.9):
    """What Hugging Face's generate runs to sample with these settings (TemperatureLogitsWarper,
    TopKLogitsWarper, TopPLogitsWarper, softmax, multinomial): the peer of ``sample`` in the benchmarks."""
    s = t / T
    kth = torch.topk(s, k)[0][..., -1, None]
    s = s.masked_fill(s < kth, -float("inf"))
    sorted_logits, sorted_indices = torch.sort(s, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - p)
    remove[..., -1:] = 0
    s = s.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))
    return torch.multinomial(torch.softmax(s, -1), 1)


def _to_torch(torch, x):
    if x.dtype == NP_DTYPES["bfloat16"]:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def run(rows=512, vocab=128256, ops=("logsumexp", "cross_entropy", "softmax", "entropy"),
        dtypes=("float32", "bfloat16", "float16"), threads=None, repeat=5, peers=True, seed=0,
        progress=None):
    """Measure and return a list of result dicts (one per op x dtype x thread count x library)."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal((rows, vocab), dtype=np.float32) * 3).astype(np.float32)
    labels = rng.integers(0, vocab, rows)
    # checked before any work (a team of 4097 threads read the array before the check fired)
    thread_counts = sorted({1, fl._config.default_threads()} if threads is None
                           else {fl._config.resolve_threads(t) for t in threads})
    torch = _torch() if peers else None
    sp = _scipy_special() if peers else None
    results = []

    def add(kind, op, dtype, th, lib, seconds, nbytes):
        results.append({"kind": kind, "op": op, "dtype": dtype, "threads": th, "library": lib,
                        "seconds": seconds, "GB/s": nbytes / seconds / 1e9, "rows/s": rows / seconds})
        if progress:
            progress(results[-1])

    torch_threads = torch.get_num_threads() if torch is not None else None
    try:
        _measure(results, add, base, labels, dtypes, ops, thread_counts, torch, sp, repeat)
    finally:
        if torch is not None:       # (the caller's count, as it was: a notebook's run() changed it)
            torch.set_num_threads(torch_threads)
    return results


def _measure(results, add, base, labels, dtypes, ops, thread_counts, torch, sp, repeat):
    """run()'s measurements, appended to results through add."""
    from fastlogits.cpu import _info

    for th in thread_counts:
        add("ceiling", "read", "float32", th, "fastlogits C sum",
            _median_time(lambda th=th: _info.read_sum(base, th), repeat), base.nbytes)
        if torch is not None:
            torch.set_num_threads(th)
            tb = torch.from_numpy(base)
            add("ceiling", "read", "float32", th, "torch.sum", _median_time(tb.sum, repeat), base.nbytes)
        elif th == 1:
            add("ceiling", "read", "float32", th, "numpy.sum", _median_time(lambda: base.sum(), repeat),
                base.nbytes)
    for dtype in dtypes:
        x = base.astype(NP_DTYPES[dtype])
        for op in ops:
            for th in thread_counts:
                fn = _fastlogits_call(op, x, labels, th)
                add("op", op, dtype, th, "fastlogits", _median_time(fn, repeat), x.nbytes)
                # the result checked: a fast wrong answer is not a result
                results[-1]["max_diff"], results[-1]["ok"] = verify(op, fn(), x, labels)
                if torch is not None:
                    torch.set_num_threads(th)
                    add("op", op, dtype, th, "torch",
                        _median_time(_torch_call(torch, op, _to_torch(torch, x), torch.from_numpy(labels)),
                                     repeat), x.nbytes)
            if sp is not None and dtype in ("float32", "float64"):
                add("op", op, dtype, 1, "numpy/scipy", _median_time(_numpy_call(sp, op, x, labels), repeat),
                    x.nbytes)


def table(results):
    """A Markdown table: per op, dtype and threads, fastlogits against its peers, with ratios."""
    ceil = {(r["threads"], r["library"]): r["GB/s"] for r in results if r["kind"] == "ceiling"}
    lines = ["| op | dtype | threads | fastlogits GB/s | rows/s | torch GB/s | x torch | numpy/scipy GB/s "
             "| x numpy | % of read ceiling |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    ops = [r for r in results if r["kind"] == "op"]
    find = {(r["op"], r["dtype"], r["threads"], r["library"]): r for r in ops}
    for r in ops:
        if r["library"] != "fastlogits":
            continue
        key = (r["op"], r["dtype"], r["threads"])
        t = find.get(key + ("torch",))
        n = find.get((r["op"], r["dtype"], 1, "numpy/scipy"))
        c = max((v for (th, _), v in ceil.items() if th == r["threads"]), default=None)
        lines.append(
            f"| {r['op']} | {r['dtype']} | {r['threads']} | {r['GB/s']:.2f} | {r['rows/s']:.0f} | "
            + (f"{t['GB/s']:.2f} | {t['seconds'] / r['seconds']:.1f} | " if t else "- | - | ")
            + (f"{n['GB/s']:.2f} | {n['seconds'] / r['seconds']:.1f} | " if n else "- | - | ")
            + (f"{100 * r['GB/s'] / c:.0f}%" if c else "-")
            + (" |" if r.get("ok", True) else " WRONG RESULT |"))
    lines.append("")
    lines.append("Read ceiling (same array, same run): " + ", ".join(
        f"{lib} {th} thread{'s' if th > 1 else ''}: {v:.1f} GB/s" for (th, lib), v in sorted(ceil.items())))
    return "\n".join(lines)


def environment():
    """What produced the figures, beyond show_config(): the peers' versions, the processor, the time."""
    import datetime
    import importlib.metadata
    import platform

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"python": platform.python_version(),
            **{name: version(name) for name in ("numpy", "scipy", "torch", "numba", "numba-cuda")},
            "cpu": cpu, "cpus": os.cpu_count(), "usable_cpus": usable, "platform": platform.platform(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(args):
    """Entry point of ``fastlogits bench`` (args from the CLI parser). ``--backend cpu``: the CPU table
    only; ``gpu``: the GPU figures only (an error without a real GPU); neither: the CPU table, and the GPU
    figures where a real GPU is present."""
    def progress(r):
        print(f"  {r['op']:14s} {r['dtype']:9s} threads={r['threads']} {r['library']:18s} "
              f"{r['GB/s']:7.2f} GB/s", file=sys.stderr)

    why = _no_gpu_timing() if args.backend == "gpu" else None
    if why is not None:
        raise RuntimeError(f"bench --backend gpu: GPU timing is not available: {why}")
    results = []
    if args.backend != "gpu":
        results = run(rows=args.rows, vocab=args.vocab, ops=args.ops, dtypes=args.dtypes,
                      threads=None if args.threads is None else [args.threads], repeat=args.repeat,
                      peers=not args.no_peers, progress=None if args.json else progress)
    cfg = fl.show_config(as_dict=True)
    if args.threads:
        cfg["threads"] = args.threads       # what this run used, not the default
    gpu = gpu_figures(args) if args.backend != "cpu" else None
    env = environment()
    if args.json:
        print(_json.dumps({"config": cfg, "environment": env, "shape": [args.rows, args.vocab],
                           "repeat": args.repeat, "statistic": "median", "results": results, "gpu": gpu},
                          indent=1))
    else:
        print(f"fastlogits {cfg['version']}  simd={cfg['simd']}  openmp={cfg['openmp']}  "
              f"shape=({args.rows}, {args.vocab})  median of {args.repeat}")
        peers = ", ".join(f"{k} {env[k]}" for k in ("torch", "numpy", "scipy") if env[k])
        print(f"{env['cpu']} ({env['usable_cpus']} of {env['cpus']} cores usable); {peers}; {env['time']}")
        if results:
            print(table(results))
        if gpu is not None:
            print()
            print(gpu_table(gpu))
    wrong = wrong_results(results, gpu)
    for line in wrong:
        print(f"fastlogits bench: error: {line}", file=sys.stderr)
    return 1 if wrong else 0


def wrong_results(results, gpu):
    """One line per fastlogits figure whose result was wrong (op, dtype, where, largest difference)."""
    lines = [f"fastlogits {r['op']} {r['dtype']} on the CPU ({r['threads']} thread(s)) gave a wrong result: "
             f"largest difference {r['max_diff']:.3g} from the float64 reference, beyond the documented "
             "tolerance; its timing is meaningless"
             for r in results if r["kind"] == "op" and r["library"] == "fastlogits" and not r.get("ok", True)]
    for dt in ("float32", "bfloat16"):
        d = (gpu or {}).get(dt, {})
        for op in ("logsumexp", "cross_entropy"):
            if d.get(op + "_ok") is False:
                lines.append(f"fastlogits {op} {dt} on the GPU gave a wrong result: largest difference "
                             f"{d[op + '_max_diff']:.3g} from the float64 reference, beyond the documented "
                             "tolerance; its timing is meaningless")
    smp = (gpu or {}).get("sampling") or {}
    if smp.get("ok") is False:
        lines.append(f"fastlogits sample float32 on the GPU drew tokens unlike the CPU's with the same seed "
                     f"({smp.get('plain_same_rows', smp['same_rows'])} of {smp['rows_checked']} rows the "
                     f"same plain, {smp.get('top_k_top_p_same_rows', '?')} with top-k and top-p)")
    return lines


def _no_gpu_timing():
    """Why the GPU cannot be timed here (None: it can)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "numba-cuda's CUDA simulator has no timing; the GPU figures need a real GPU"
    return fl._config.gpu_unavailable_reason()


def gpu_figures(args):
    """The GPU column: logsumexp and cross-entropy on device-resident logits, CUDA events, against
    PyTorch on the same GPU and the device-to-device copy ceiling; None without a real GPU (the simulator
    has no timing)."""
    if _no_gpu_timing() is not None:
        return None
    from fastlogits.gpu import timing
    rows = max(args.rows, 8192)     # (fewer rows time the launch, not the bandwidth; the table says so)
    out = timing.benchmark(shape=(rows, args.vocab), dtypes=("float32", "bfloat16"), repeat=args.repeat,
                           torch_too=not args.no_peers)
    out["rows_asked"] = args.rows
    out["software"] = gpu_software()
    out["sampling"] = timing.sample_benchmark(shape=(args.rows, args.vocab), repeat=args.repeat,
                                              torch_too=not args.no_peers)
    return out


def gpu_software():
    """The CUDA driver's and runtime's versions (numba's view), and PyTorch's CUDA, for the GPU figures."""
    from numba import cuda

    out = {}
    for key, get in (("driver", lambda: cuda.cudadrv.driver.driver.get_version()),
                     ("runtime", lambda: cuda.runtime.get_version()),
                     ("torch_cuda", lambda: __import__("torch").version.cuda)):
        try:
            v = get()
            out[key] = ".".join(map(str, v)) if isinstance(v, tuple) else v
        except Exception:        # (not found, or this numba-cuda names it otherwise: left out)
            out[key] = None
    return out


def gpu_table(gpu):
    lines = [f"GPU {gpu['device']}, shape {tuple(gpu['shape'])}, device-to-device copy "
             f"{gpu['copy_GBps']:.0f} GB/s (read + write)",
             "calls back to back (a call waited for alone: in brackets)"
             + (f"; {gpu['shape'][0]} rows, not the {gpu['rows_asked']} of --rows (at least 8192 on the GPU)"
                if gpu.get("rows_asked", gpu["shape"][0]) != gpu["shape"][0] else ""),
             "| op | dtype | fastlogits GB/s | % of copy | torch GB/s | x torch |",
             "| --- | --- | --- | --- | --- | --- |"]
    for dt in ("float32", "bfloat16"):
        d = gpu.get(dt, {})
        for op in ("logsumexp", "cross_entropy"):
            if op + "_GBps" not in d:
                continue
            t = d.get("torch_" + op + "_GBps")
            ratio = d["torch_" + op + "_s"] / d[op + "_s"] if t else None
            pct = f"{100 * d[op + '_GBps'] / gpu['copy_GBps']:.0f}%"
            pct += " WRONG RESULT" if d.get(op + "_ok") is False else ""
            waited = f" ({d[op + '_wait_GBps']:.0f})" if op + "_wait_GBps" in d else ""
            tw = f" ({d['torch_' + op + '_wait_GBps']:.0f})" if "torch_" + op + "_wait_GBps" in d else ""
            lines.append(f"| {op} | {dt} | {d[op + '_GBps']:.0f}{waited} | {pct} | "
                         + (f"{t:.0f}{tw} | {ratio:.2f} |" if t else "- | - |"))
    smp = gpu.get("sampling")
    if smp:
        lines += ["", f"GPU sampling, float32 {tuple(smp['shape'])}, medians",
                  "| call | fastlogits ms | torch ms | x torch |", "| --- | --- | --- | --- |"]
        for case, peer in (("plain", "multinomial(softmax)"), ("top_k_top_p", "HF pipeline")):
            t = smp.get("torch_" + case + "_s")
            lines.append(f"| {case} (torch: {peer}) | {1e3 * smp[case + '_s']:.2f} | "
                         + (f"{1e3 * t:.2f} | {t / smp[case + '_s']:.1f} |" if t else "- | - |"))
    return "\n".join(lines)
