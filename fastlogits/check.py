"""``fastlogits check``: the two backends against each other on the machine at hand.

Every operation and dtype runs on backend="gpu" and backend="cpu" over the same random rows plus the edge
rows of the numerics contract (-inf, all -inf, +inf, NaN, ties, huge values), at sizes around the GPU's
block boundary; the table gives the largest difference and pass/fail against the documented tolerance:
float32 compute within 2e-5 relative (plus 2e-5 x (1 + the row's largest |x/T|) for log-domain results),
float64 within 1e-12, 16-bit outputs one unit of their rounding more (the subnormals' spacing for the
smallest), argmax and top-k indices exactly;
``sample`` draws the same tokens for at least 99.9% of (row, seed) pairs (random rows, per-row seeds and
filter combinations, 4 samples a pair); ``beam_search_step`` (2 beams an item) gives scores within the
log-domain tolerance and the same parents and tokens (``beam_search_step_choices``, exactly).
``cross_entropy_mean_device`` is the "mean" cross-entropy of device logits and device labels (computed
on the device, no host copy) against the CPU's of the same rows.
On a machine without a GPU it runs under numba's CUDA simulator when NUMBA_ENABLE_CUDASIM=1 is set
(small shapes: the simulator runs every thread in Python).
"""
import os
import warnings

import ml_dtypes
import numpy as np

import fastlogits as fl
from fastlogits import _json

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"float16": np.dtype(np.float16), "bfloat16": BF16, "float32": np.dtype(np.float32),
          "float64": np.dtype(np.float64)}
REL = {"float16": 2e-5, "bfloat16": 2e-5, "float32": 2e-5, "float64": 1e-12}
ROUND = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 0.0, "float64": 0.0}
# a 16-bit output's unit among its subnormals, which its relative unit ROUND * |w| does not cover: float16
# softmax probabilities below 2^-14 (most of a 128256-token row's) are spaced 2^-24 apart, and two
# backends' float32 results one ulp apart can round to neighbours
SUBNORMAL_UNIT = {"float16": 2.0**-24, "bfloat16": 2.0**-133}
LOG_DOMAIN = {"logsumexp", "log_softmax", "cross_entropy", "cross_entropy_mean_device", "entropy",
              "top_k_logprobs", "beam_search_step_scores"}
EXACT = ("argmax", "top_k_indices", "beam_search_step_choices")
BEAMS = 2                       # beam_search_step's beam width: the rows are (batch * BEAMS, V)


def _rows(rng, V, dtype, rows):
    x = rng.standard_normal((rows, V)) * 3
    edge = np.zeros((6, V))
    edge[0, ::3] = -np.inf                      # some -inf
    edge[1, :] = -np.inf                        # all -inf
    edge[2, 1] = np.inf                         # +inf
    edge[3, 2] = np.nan                         # NaN
    edge[4, :] = 1.0                            # ties everywhere
    big = 3e4 if dtype == "float16" else 1e30
    edge[5, :] = np.where(np.arange(V) % 2, -big, big)   # huge, tied
    return np.concatenate([x, edge]).astype(DTYPES[dtype])


def _compare(name, got, want, x, dtype, out_dtype=None, temperature=1.0):
    """(max difference, ok) of one result against the CPU's; a NaN or an infinity on one backend only
    (or infinities of opposite signs) is a difference of inf. The log-domain tolerance scales with the
    row's largest |x / T|."""
    g = np.asarray(got.copy_to_host() if hasattr(got, "copy_to_host") else got, np.float64)
    w = np.asarray(want, np.float64)
    if g.shape != w.shape:
        return float("inf"), False
    if name in EXACT:
        return float(np.count_nonzero(g != w)), bool(np.array_equal(g, w))
    both_nan = np.isnan(g) & np.isnan(w)
    same_inf = np.isinf(g) & (g == w)
    fin = np.isfinite(w) & np.isfinite(g)
    xs = np.asarray(x, np.float64) / np.reshape(temperature, np.shape(temperature) + (1,))
    with np.errstate(invalid="ignore"):
        scale = np.nanmax(np.where(np.isfinite(xs), np.abs(xs), 0), axis=-1, initial=0)
    scale = scale.reshape(scale.shape + (1,) * (w.ndim - scale.ndim)) if w.ndim else np.max(scale, initial=0)
    rel = REL[dtype]
    tol = rel * np.abs(w) + (rel * (1 + scale) if name in LOG_DOMAIN else 1e-30)
    if out_dtype in ("float16", "bfloat16"):
        tol = tol + np.maximum(ROUND[out_dtype] * np.abs(w), SUBNORMAL_UNIT[out_dtype])
    with np.errstate(invalid="ignore"):
        diff = np.where(fin, np.abs(g - w), np.where(both_nan | same_inf, 0.0, np.inf))
    ok = bool(np.all(both_nan | same_inf | (fin & (diff <= np.broadcast_to(tol, w.shape)))))
    return float(diff.max()) if diff.size else 0.0, ok


def sample_inputs(rng, rows, V, dtype, filters=True):
    """Random rows for the sampling agreement, and per-row sample() arguments: rows of varied scale, a
    quarter with few distinct values (ties at every filter's boundary), some -inf entries; per-row seeds,
    temperatures (0 = greedy among them) and, when filters, filter combinations."""
    x = rng.standard_normal((rows, V)) * rng.choice([0.3, 2.0, 6.0], (rows, 1))
    tied = rng.random(rows) < 0.25
    x[tied] = np.round(x[tied])
    x[rng.random((rows, V)) < 0.05] = -np.inf
    x[:, 0] = np.where(np.isinf(x[:, 0]), 1.0, x[:, 0])       # at least one finite logit
    kw = dict(seed=rng.integers(0, 2**64, rows, dtype=np.uint64),
              temperature=rng.choice([0.0, 0.5, 1.0, 1.7], rows))
    if filters:
        kw.update(top_k=rng.choice([0, 0, 1, 5, 20], rows),
                  top_p=rng.choice([1.0, 1.0, 0.5, 0.9, 0.99], rows),
                  min_p=rng.choice([0.0, 0.0, 0.05, 0.3], rows))
    return x.astype(DTYPES[dtype]), kw


def sample_agreement(x, kw, num_samples=4):
    """(pairs, same_pairs, draws, same_draws): how many (row, seed) pairs draw the same num_samples tokens
    on both backends, and how many single draws agree."""
    got = fl.sample(x, num_samples=num_samples, backend="gpu", **kw)
    same = np.asarray(got.copy_to_host() if hasattr(got, "copy_to_host") else got) == fl.sample(
        x, num_samples=num_samples, backend="cpu", **kw)
    same = same.reshape(x.shape[0], num_samples)
    return same.shape[0], int(np.all(same, axis=1).sum()), same.size, int(same.sum())


MIN_SAME_TOKEN_RATE = 0.999


def _ce_mean(backend, x, y, w, threads=None):
    """The "mean" cross-entropy (class weights, smoothing, z-loss): on the GPU from device logits and
    device labels (all on the device, a 0-d device result), on the CPU from the host arrays."""
    kw = dict(weight=w, label_smoothing=0.1, z_loss=1e-4, threads=threads)
    if backend == "cpu":
        return fl.cross_entropy(x, y, backend="cpu", **kw)
    from numba import cuda
    dx = cuda.to_device(x.view(np.dtype("V2")) if x.dtype == BF16 else x)    # "<V2": bfloat16 on the device
    return fl.cross_entropy(dx, cuda.to_device(y.astype(np.int32)), **kw)


def run(V_list=None, rows=None, seed=0, sample_shape=None, dtypes=tuple(DTYPES), threads=None):
    """A list of {op, dtype, V, max_diff, ok}. sample_shape: (rows, V) of the sampling check; threads:
    the CPU backend's (default: all cores)."""
    sim = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    V_list = V_list or ([127, 129] if sim else [127, 128, 129, 1025, 32000, 128256])
    rows = rows or (2 if sim else 64)
    rng = np.random.default_rng(seed)
    out, th = [], {"threads": threads}
    for dtype in dtypes:
        for V in V_list:
            x = _rows(rng, V, dtype, rows)
            y = rng.integers(0, V, x.shape[0])
            t = rng.uniform(0.5, 2.0, x.shape[0])
            w = rng.uniform(0.5, 2.0, V)
            xb = x[:x.shape[0] - x.shape[0] % BEAMS]                # rows of whole items, for the beams
            bs = np.log(rng.uniform(0.1, 1.0, xb.shape[0]))      # their scores, one beam finished
            bs[1] = -np.inf
            calls = {
                "logsumexp": lambda b, x=x, t=t: fl.logsumexp(x, temperature=t, backend=b, **th),
                "entropy": lambda b, x=x: fl.entropy(x, backend=b, **th),
                "softmax": lambda b, x=x: fl.softmax(x, softcap=30.0, backend=b, **th),
                "log_softmax": lambda b, x=x: fl.log_softmax(x, backend=b, **th),
                "cross_entropy": lambda b, x=x, y=y: fl.cross_entropy(x, y, reduction="none", backend=b,
                                                                      label_smoothing=0.1, **th),
                # the random rows (the edge rows would make it NaN) as device arrays
                "cross_entropy_mean_device": lambda b, x=x, y=y, w=w: _ce_mean(b, x[:rows], y[:rows], w,
                                                                               threads),
                "argmax": lambda b, x=x: fl.argmax(x, backend=b, **th),
                "top_k_indices": lambda b, x=x: fl.top_k(x, 5, backend=b, **th)[1],
                "top_k_logprobs": lambda b, x=x: fl.top_k_logprobs(x, 5, backend=b, **th)[0],
                "beam_search_step": lambda b, x=xb, bs=bs: fl.beam_search_step(x, bs, BEAMS, backend=b, **th),
            }
            for op, call in calls.items():
                want = call("cpu")
                with warnings.catch_warnings():     # the simulator's NumPy scalars warn where GPUs don't
                    warnings.simplefilter("ignore", RuntimeWarning)
                    got = call("gpu")
                out_dtype = dtype if op in ("softmax", "log_softmax") else None
                xs = x[:rows] if op == "cross_entropy_mean_device" else x     # (its tolerance's scale)
                if op == "beam_search_step":    # the scores (scale: the item's rows); parents and tokens
                    parts = [("beam_search_step_scores", got[0], want[0]),
                             ("beam_search_step_choices", np.stack(got[1:]), np.stack(want[1:]))]
                    xs = xb.reshape(xb.shape[0] // BEAMS, -1)
                else:
                    parts = [(op, got, want)]
                for name, g, w in parts:
                    diff, ok = _compare(name, g, w, xs, dtype, out_dtype, t if op == "logsumexp" else 1.0)
                    out.append({"op": name, "dtype": dtype, "V": V, "max_diff": diff, "ok": ok})
    # sampling: the same tokens (the share of (row, seed) pairs, each drawing 4 samples)
    srows, sV = sample_shape or ((16, 129) if sim else (4096, 32000))
    for dtype in [d for d in ("float32", "bfloat16") if d in dtypes]:
        x, kw = sample_inputs(rng, srows, sV, dtype)
        kw["threads"] = threads
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            pairs, same, draws, same_draws = sample_agreement(x, kw)
        out.append({"op": "sample", "dtype": dtype, "V": sV, "max_diff": float(pairs - same), "pairs": pairs,
                    "same_pairs": same, "draws": draws, "same_draws": same_draws,
                    "ok": same >= MIN_SAME_TOKEN_RATE * pairs})
    return out


def main(args):
    reason = fl._config.gpu_unavailable_reason()
    if reason is not None:
        import importlib.util

        hint = (" (set NUMBA_ENABLE_CUDASIM=1 to run the check under numba-cuda's CUDA simulator)"
                if importlib.util.find_spec("numba_cuda") is not None else "")
        raise RuntimeError(f"no GPU backend to check against the CPU: {reason}{hint}")
    results = run(threads=getattr(args, "threads", None))
    failed = [r for r in results if not r["ok"]]
    if args.json:
        print(_json.dumps({"results": results, "failed": len(failed)}, indent=1))
    else:
        agg = {}
        for r in results:
            a = agg.setdefault((r["op"], r["dtype"]), {"max_diff": 0.0, "ok": True, "sizes": []})
            a["max_diff"] = max(a["max_diff"], r["max_diff"])
            for key in ("pairs", "draws", "same_draws"):
                if key in r:
                    a[key] = r[key]
            a["ok"] &= r["ok"]
            a["sizes"].append(r["V"])
        print("| op | dtype | V | largest difference (GPU vs CPU) | result |")
        print("| --- | --- | --- | --- | --- |")
        for (op, dtype), a in agg.items():
            unit = " mismatches" if op in EXACT else ""
            if op == "sample":
                unit = (f" of {a['pairs']} (row, seed) pairs differ ({a['same_draws']}/{a['draws']} draws "
                        "same)")
            print(f"| {op} | {dtype} | {','.join(map(str, a['sizes']))} | {a['max_diff']:.3g}{unit} | "
                  f"{'pass' if a['ok'] else 'FAIL'} |")
        print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
