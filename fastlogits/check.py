"""``fastlogits check``: the two backends against each other on the machine at hand.

Every operation and dtype runs on backend="gpu" and backend="cpu" over the same random rows plus the edge
rows of the numerics contract (-inf, all -inf, +inf, NaN, ties, huge values), at sizes around the GPU's
block boundary, with the options a backend could ignore: per-row temperatures and a softcap (every op that
takes them), and cross-entropy's class weights, ignore_index, label smoothing and z-loss. The GPU gets
the logits as host arrays and, for every other (dtype, size), as device arrays (its device path, whose
results stay on the device; by README's rules for bfloat16 device logits, their maps give their bits and
their top-k values float32); each result says which ("input"). Every output of
every op is compared: its shape and dtype exactly, and its values; the table gives the largest difference
and pass/fail against the documented tolerance:
float32 compute within 2e-5 relative (plus 2e-5 x (1 + the row's largest |x/T|, x after the softcap) for
log-domain results), float64 within 1e-12, 16-bit outputs one unit of their rounding more (the subnormals'
spacing for the smallest), argmax, top-k indices, sampled ranks and the stats pass's argmax exactly. (So a
value 1e-3 relative off fails, except in a 16-bit output, whose rounding unit is larger.)
``stats_*`` are the GPU's fused one-pass statistics (``fastlogits stats``, ``demo``): per-row NLL with
labels, entropy and argmax. ``sample`` draws the same tokens for at least 99.9% of (row, seed) pairs
(random rows and filter combinations, 4 samples a pair; per-row seeds from host logits, then one seed for
all rows, whose random numbers are keyed by each row's index, from device logits), and where the tokens agree,
``sample_logprobs`` (log-domain tolerance) and ``sample_ranks`` (exactly) agree too;
``beam_search_step`` (2 beams an item) gives scores within the log-domain tolerance and the same parents
and tokens (``beam_search_step_choices``, exactly).
``cross_entropy_mean_device`` is the "mean" cross-entropy of device logits and device labels (computed
on the device, no host copy) against the CPU's of the same rows.
On a machine without a GPU it runs under numba's CUDA simulator when NUMBA_ENABLE_CUDASIM=1 is set
(small shapes: the simulator runs every thread in Python).
"""
import os
import warnings

import numpy as np

import fastlogits as fl
from fastlogits import _json
from fastlogits.ops._prep import NP_DTYPES, bf16, is_bf16

DTYPES = ("float16", "bfloat16", "float32", "float64")
REL = {"float16": 2e-5, "bfloat16": 2e-5, "float32": 2e-5, "float64": 1e-12}
ROUND = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 0.0, "float64": 0.0}
# a 16-bit output's unit among its subnormals, which its relative unit ROUND * |w| does not cover: float16
# softmax probabilities below 2^-14 (most of a 128256-token row's) are spaced 2^-24 apart, and two
# backends' float32 results one ulp apart can round to neighbours
SUBNORMAL_UNIT = {"float16": 2.0**-24, "bfloat16": 2.0**-133}
LOG_DOMAIN = {"logsumexp", "log_softmax", "cross_entropy", "cross_entropy_mean_device", "entropy",
              "top_k_logprobs", "beam_search_step_scores", "stats_nll", "stats_entropy", "sample_logprobs"}
EXACT = ("argmax", "top_k_indices", "top_k_logprobs_indices", "beam_search_step_choices", "stats_argmax",
         "sample_ranks")
# the operations (``fastlogits check --ops``), each reported as one or more results
OPS = {"logsumexp": ("logsumexp",), "entropy": ("entropy",), "softmax": ("softmax",),
       "log_softmax": ("log_softmax",), "cross_entropy": ("cross_entropy",),
       "cross_entropy_mean_device": ("cross_entropy_mean_device",), "argmax": ("argmax",),
       "top_k": ("top_k_values", "top_k_indices"),
       "top_k_logprobs": ("top_k_logprobs", "top_k_logprobs_indices"),
       "beam_search_step": ("beam_search_step_scores", "beam_search_step_choices"),
       "stats": ("stats_nll", "stats_entropy", "stats_argmax"),
       "sample": ("sample", "sample_logprobs", "sample_ranks")}
SOFTCAP = 30.0                  # the softcap of the calls that take one (it changes the rows' large values)
IGNORE_INDEX = -1               # cross-entropy's and the stats pass's ignore_index (not the default -100)
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
    return np.concatenate([x, edge]).astype(NP_DTYPES[dtype])


def _host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def _scaled(x, softcap=None, temperature=1.0):
    """The logits as the op sees them, in float64: softcapped, then divided by the temperature (one or one
    per row; 0, greedy, as 1): the scale of the log-domain tolerance."""
    xs = np.asarray(x, np.float64)
    if softcap is not None:
        xs = softcap * np.tanh(xs / softcap)
    t = np.asarray(temperature, np.float64)
    return xs / np.reshape(np.where(t > 0, t, 1.0), t.shape + (1,))


def _compare(name, got, want, x, dtype, out_dtype=None, temperature=1.0, softcap=None):
    """(max difference, ok) of one result against the CPU's: the same shape and dtype (else inf), and
    values within the tolerance; a NaN or an infinity on one backend only (or infinities of opposite
    signs) is a difference of inf. The log-domain tolerance scales with the row's largest |x / T| (x after
    the softcap)."""
    g, w = _host(got), np.asarray(want)
    if g.shape != w.shape or g.dtype != w.dtype:
        return float("inf"), False
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    if name in EXACT:
        return float(np.count_nonzero(g != w)), bool(np.array_equal(g, w))
    both_nan = np.isnan(g) & np.isnan(w)
    same_inf = np.isinf(g) & (g == w)
    fin = np.isfinite(w) & np.isfinite(g)
    xs = _scaled(x, softcap, temperature)
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
    return x.astype(NP_DTYPES[dtype]), kw


def sample_agreement(x, kw, num_samples=4):
    """(pairs, same_pairs, draws, same_draws): how many (row, seed) pairs draw the same num_samples tokens
    on both backends, and how many single draws agree."""
    got = fl.sample(x, num_samples=num_samples, backend="gpu", **kw)
    same = np.asarray(got.copy_to_host() if hasattr(got, "copy_to_host") else got) == fl.sample(
        x, num_samples=num_samples, backend="cpu", **kw)
    same = same.reshape(x.shape[0], num_samples)
    return same.shape[0], int(np.all(same, axis=1).sum()), same.size, int(same.sum())


MIN_SAME_TOKEN_RATE = 0.999


CE_OPTIONS = dict(label_smoothing=0.1, z_loss=1e-4, ignore_index=IGNORE_INDEX, softcap=SOFTCAP)


def _ce_mean(backend, x, y, w, t, threads=None):
    """The "mean" cross-entropy (class weights, smoothing, z-loss, ignore_index, softcap, per-row
    temperatures): on the GPU from device logits and device labels (all on the device, a 0-d device
    result), on the CPU from the host arrays."""
    kw = dict(weight=w, temperature=t, threads=threads, **CE_OPTIONS)
    if backend == "cpu":
        return fl.cross_entropy(x, y, backend="cpu", **kw)
    return fl.cross_entropy(_to_device(x), _to_device(y.astype(np.int32)), **kw)


def _stats(backend, x, y, t, threads=None):
    """The fused one-pass statistics of ``fastlogits stats`` (on the GPU: fastlogits.gpu.backend.stats):
    per-row NLL, entropy and argmax."""
    from fastlogits.stream import run as stream_run

    st = stream_run.stats(x, y, ignore_index=IGNORE_INDEX, temperature=t, softcap=SOFTCAP, backend=backend,
                          threads=threads)
    return st["nll"], st["entropy"], st["argmax"]


def _gpu(call):
    with warnings.catch_warnings():     # the simulator's NumPy scalars warn where GPUs don't
        warnings.simplefilter("ignore", RuntimeWarning)
        return call("gpu")


def _check_ops(ops):
    ops = tuple(OPS) if ops is None else tuple(ops)
    bad = [op for op in ops if op not in OPS]
    if bad:
        raise ValueError(f"ops: unknown operation {bad[0]!r} (one of {', '.join(OPS)})")
    return ops


def run(V_list=None, rows=None, seed=0, sample_shape=None, dtypes=tuple(DTYPES), threads=None, ops=None):
    """A list of {op, dtype, V, max_diff, ok}, op being a result's name (see OPS). sample_shape: (rows, V)
    of the sampling check; threads: the CPU backend's (default: all cores); ops: the operations to check
    (keys of OPS; default: all)."""
    ops = _check_ops(ops)
    sim = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    V_list = V_list or ([127, 129] if sim else [127, 128, 129, 1025, 32000, 128256])
    rows = rows or (2 if sim else 64)
    rng = np.random.default_rng(seed)
    out, th = [], {"threads": threads}
    sc = {"softcap": SOFTCAP}
    tb = 0.7                                                      # the beams' temperature
    for i, dtype in enumerate(dtypes):
        for j, V in enumerate(V_list):
            x = _rows(rng, V, dtype, rows)
            y = rng.integers(0, V, x.shape[0])
            y[1:rows:2] = IGNORE_INDEX                  # some rows ignored: random ones (row 0 is counted),
            y[rows + 1::3] = IGNORE_INDEX               # and the all -inf and the tied edge rows
            t = rng.uniform(0.5, 2.0, x.shape[0])
            w = rng.uniform(0.5, 2.0, V)
            xb = x[:x.shape[0] - x.shape[0] % BEAMS]                # rows of whole items, for the beams
            bs = np.log(rng.uniform(0.1, 1.0, xb.shape[0]))      # their scores, one beam finished
            bs[1] = -np.inf
            # the GPU gets the logits as host arrays or, for every other (dtype, V), as device arrays (its
            # device path: results left on the device, bfloat16 maps as their bits); each call's put(x)
            # gives it its input
            on_device = (i + j) % 2 == 1
            calls = {
                "logsumexp": lambda b, put, x=x, t=t: fl.logsumexp(put(x), temperature=t, backend=b, **sc,
                                                                   **th),
                "entropy": lambda b, put, x=x, t=t: fl.entropy(put(x), temperature=t, backend=b, **sc, **th),
                "softmax": lambda b, put, x=x, t=t: fl.softmax(put(x), temperature=t, backend=b, **sc, **th),
                "log_softmax": lambda b, put, x=x, t=t: fl.log_softmax(put(x), temperature=t, backend=b, **sc,
                                                                       **th),
                "cross_entropy": lambda b, put, x=x, y=y, t=t, w=w: fl.cross_entropy(
                    put(x), y, reduction="none", weight=w, temperature=t, backend=b, **CE_OPTIONS, **th),
                # the random rows (the edge rows would make it NaN), always as device arrays
                "cross_entropy_mean_device": lambda b, put, x=x, y=y, w=w, t=t: _ce_mean(
                    b, x[:rows], y[:rows], w, t[:rows], threads),
                "argmax": lambda b, put, x=x: fl.argmax(put(x), backend=b, **th),
                "top_k": lambda b, put, x=x, t=t: fl.top_k(put(x), 5, temperature=t, backend=b, **sc, **th),
                "top_k_logprobs": lambda b, put, x=x, t=t: fl.top_k_logprobs(put(x), 5, temperature=t,
                                                                             backend=b, **sc, **th),
                "beam_search_step": lambda b, put, x=xb, bs=bs: fl.beam_search_step(
                    put(x), bs, BEAMS, temperature=tb, backend=b, **sc, **th),
                "stats": lambda b, put, x=x, y=y, t=t: _stats(b, x, y, t, threads),
            }
            for op in ops:
                if op not in calls:
                    continue
                call = calls[op]
                # (the stats pass reads host rows, as from a dump; the mean cross-entropy device rows)
                device = op == "cross_entropy_mean_device" or (on_device and op != "stats")
                where = "device" if device else "host"
                put = _to_device if where == "device" else _same
                want = call("cpu", _same)
                try:
                    got = _gpu(lambda b, call=call, put=put: call(b, put))
                except Exception as e:          # an error on the GPU only: every result of the op fails
                    out += [{"op": name, "dtype": dtype, "V": V, "max_diff": float("inf"), "ok": False,
                             "input": where, "error": f"{type(e).__name__}: {e}"} for name in OPS[op]]
                    continue
                xs, temp, cap = x, t, SOFTCAP           # (the tolerance's scale)
                if op == "cross_entropy_mean_device":
                    xs, temp = x[:rows], t[:rows]
                elif op == "argmax":
                    temp, cap = 1.0, None
                elif op == "beam_search_step":          # the scale: the item's rows
                    xs, temp = xb.reshape(xb.shape[0] // BEAMS, -1), tb
                if op == "beam_search_step":            # the scores; parents and tokens exactly
                    got, want = (got[0], np.stack([_host(a) for a in got[1:]])), (want[0], np.stack(want[1:]))
                got = got if isinstance(got, tuple) else (got,)
                want = want if isinstance(want, tuple) else (want,)
                out_dtype = dtype if op in ("softmax", "log_softmax", "top_k") else None
                for name, g, wnt in zip(OPS[op], got, want):
                    if where == "device" and dtype == "bfloat16":
                        g, wnt = _device_bfloat16(name, _host(g), wnt)
                    od = None if name in EXACT else out_dtype
                    diff, ok = _compare(name, g, wnt, xs, dtype, od, temp, cap)
                    out.append({"op": name, "dtype": dtype, "V": V, "max_diff": diff, "ok": ok,
                                "input": where})
    # sampling: the same tokens (the share of (row, seed) pairs, each drawing 4 samples), and where they
    # are the same, the same log-probabilities and ranks; twice: per-row seeds (each row's random numbers
    # keyed by row 0) from host logits, and one seed for all rows (keyed by each row's index) from device
    # logits
    srows, sV = sample_shape or ((16, 129) if sim else (4096, 32000))
    for dtype in [d for d in DTYPES if d in dtypes and "sample" in ops]:
        x, kw = sample_inputs(rng, srows, sV, dtype)
        kw["threads"] = threads
        kw.update(num_samples=4, return_logprobs=True)
        for seed, put in ((kw["seed"], _same), (int(rng.integers(2**63)), _to_device)):
            kw["seed"] = seed
            out += _sample_results(x, kw, put, dtype, sV)
    return out


def _same(a):
    return a


def _to_device(a):
    """A host array on the device (bfloat16 as "<V2", as PyTorch and ml_dtypes hand it out)."""
    from numba import cuda

    return cuda.to_device(a.view(np.dtype("V2")) if is_bf16(a.dtype) else a)


def _device_bfloat16(name, got, want):
    """(got, want) of an op on bfloat16 device logits, by README's rules for them (numba has no bfloat16):
    a map gives its bits, uint16; top-k values come back as float32 (exact)."""
    if got.dtype == np.uint16 and name in ("softmax", "log_softmax"):
        return got.view(bf16()), want
    if got.dtype == np.float32 and name == "top_k_values":
        return got, np.asarray(want).astype(np.float32)
    return got, want


def _sample_results(x, kw, put, dtype, V):
    """The results of the sampling comparison of x (given to the GPU as put(x))."""
    want = fl.sample(x, backend="cpu", **kw)
    where = "device" if put is _to_device else "host"
    try:
        got = _gpu(lambda b: fl.sample(put(x), backend=b, **kw))
    except Exception as e:
        return [{"op": name, "dtype": dtype, "V": V, "max_diff": float("inf"), "ok": False, "input": where,
                 "error": f"{type(e).__name__}: {e}"} for name in OPS["sample"]]
    tokens = _host(got[0])
    same = tokens == want[0] if tokens.shape == want[0].shape else np.zeros(want[0].shape, bool)
    pairs, same_pairs = same.shape[0], int(np.all(same, axis=1).sum())
    out = [{"op": "sample", "dtype": dtype, "V": V, "max_diff": float(pairs - same_pairs), "pairs": pairs,
            "same_pairs": same_pairs, "draws": same.size, "same_draws": int(same.sum()), "input": where,
            "ok": tokens.dtype == want[0].dtype and same_pairs >= MIN_SAME_TOKEN_RATE * pairs}]
    keep = np.all(same, axis=1)             # the pairs whose tokens agree
    for name, g, wnt in zip(("sample_logprobs", "sample_ranks"), got[1:], want[1:]):
        g = _host(g)
        g = g[keep] if g.shape == wnt.shape else g
        diff, ok = _compare(name, g, wnt[keep], x[keep], dtype, None, kw["temperature"][keep], None)
        out.append({"op": name, "dtype": dtype, "V": V, "max_diff": diff, "ok": ok, "input": where})
    return out


def main(args):
    reason = fl._config.gpu_unavailable_reason()
    if reason is not None:
        import importlib.util

        hint = (" (set NUMBA_ENABLE_CUDASIM=1 to run the check under numba-cuda's CUDA simulator)"
                if importlib.util.find_spec("numba_cuda") is not None else "")
        raise RuntimeError(f"no GPU backend to check against the CPU: {reason}{hint}")
    kw = {"threads": getattr(args, "threads", None)}
    if getattr(args, "ops", None):
        kw["ops"] = args.ops
    if getattr(args, "dtypes", None):
        kw["dtypes"] = tuple(args.dtypes)
    results = run(**kw)
    if not results:       # (a check of nothing must not pass)
        raise ValueError(f"nothing was compared for --ops {kw.get('ops')} and --dtypes {kw.get('dtypes')}")
    failed = [r for r in results if not r["ok"]]
    if args.json:
        print(_json.dumps({"results": results, "failed": len(failed)}, indent=1))
    else:
        agg = {}
        for r in results:
            a = agg.setdefault((r["op"], r["dtype"], r.get("input", "host")),
                               {"max_diff": 0.0, "ok": True, "sizes": []})
            a["max_diff"] = max(a["max_diff"], r["max_diff"])
            for key in ("pairs", "draws", "same_draws"):
                if key in r:
                    a[key] = r[key]
            a["ok"] &= r["ok"]
            if "error" in r:
                a["error"] = r["error"]
            a["sizes"].append(r["V"])
        print("| op | dtype | logits | V | largest difference (GPU vs CPU) | result |")
        print("| --- | --- | --- | --- | --- | --- |")
        for (op, dtype, where), a in agg.items():
            unit = " mismatches" if op in EXACT else ""
            if op == "sample":
                unit = (f" of {a['pairs']} (row, seed) pairs differ ({a['same_draws']}/{a['draws']} draws "
                        "same)")
            if "error" in a:
                unit = f" (the GPU raised {a['error']})".replace("|", "/")
            sizes = ",".join(map(str, a["sizes"]))
            print(f"| {op} | {dtype} | {where} | {sizes} | {a['max_diff']:.3g}{unit} | "
                  f"{'pass' if a['ok'] else 'FAIL'} |")
        print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
