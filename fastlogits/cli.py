"""The ``fastlogits`` command line. It calls the public API only.

Subcommands: ``demo`` (a short end-to-end example: the README's first command) and ``bench``. Bad input
gets one clear line on standard error and a non-zero exit, never a traceback.
"""
import argparse
import json
import sys
import time

import numpy as np

import fastlogits as fl


def _add_common(p):
    p.add_argument("--backend", choices=["cpu", "gpu"], default=None, help="backend (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores, or "
                   "FASTLOGITS_NUM_THREADS)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")


def cmd_demo(args):
    """Synthetic language-model logits with labels: the evaluation numbers people compute from dumps."""
    rng = np.random.default_rng(args.seed)
    rows, vocab = args.rows, args.vocab
    t0 = time.perf_counter()
    # Zipf-like token frequencies plus per-row noise, in bfloat16 as models dump them.
    prior = -1.1 * np.log(np.arange(1, vocab + 1, dtype=np.float32))
    logits = (prior + rng.standard_normal((rows, vocab), dtype=np.float32) * 2.0).astype(
        fl.ops._prep.BF16)
    # Labels drawn from the model's own distribution at temperature 1.3 (so it is a little miscalibrated).
    g = rng.gumbel(size=(rows, vocab)).astype(np.float32)
    labels = np.argmax(logits.astype(np.float32) / 1.3 + g, axis=-1)
    made = time.perf_counter() - t0
    kw = {"backend": args.backend, "threads": args.threads}
    t0 = time.perf_counter()
    nll = fl.cross_entropy(logits, labels, reduction="none", **kw)
    ent = fl.entropy(logits, **kw)
    pred = fl.argmax(logits, **kw)
    top5_lp, top5 = fl.top_k_logprobs(logits, 5, **kw)
    secs = time.perf_counter() - t0
    summary = {
        "rows": rows, "vocab": vocab, "dtype": "bfloat16", "bytes": int(logits.nbytes),
        "mean_nll": float(np.mean(nll)), "perplexity": float(np.exp(np.mean(nll))),
        "accuracy": float(np.mean(pred == labels)),
        "top5_accuracy": float(np.mean(np.any(top5 == labels[:, None], axis=1))),
        "mean_entropy": float(np.mean(ent)), "seconds": secs, "GB/s": 4 * logits.nbytes / secs / 1e9,
        "config": fl.show_config(as_dict=True),
    }
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"fastlogits demo: {rows} rows x {vocab} vocabulary, bfloat16 ({logits.nbytes / 1e6:.0f} MB, "
          f"made in {made:.1f} s)")
    print(f"  mean NLL      {summary['mean_nll']:.4f} nats   perplexity {summary['perplexity']:.1f}")
    print(f"  accuracy      {summary['accuracy']:.4f}         top-5 accuracy {summary['top5_accuracy']:.4f}")
    print(f"  mean entropy  {summary['mean_entropy']:.4f} nats")
    print(f"  first row's top-5 tokens {top5[0].tolist()} with probabilities "
          f"{[round(float(p), 4) for p in np.exp(top5_lp[0])]}")
    print(f"  4 passes (cross-entropy, entropy, argmax, top-5) in {secs:.3f} s: "
          f"{summary['GB/s']:.1f} GB/s of logits read  [simd={summary['config']['simd']}, "
          f"threads={summary['config']['threads']}]")
    return 0


def cmd_bench(args):
    from fastlogits import bench
    return bench.main(args)


def build_parser():
    p = argparse.ArgumentParser(prog="fastlogits", description="Fast operations on neural-network logits.")
    p.add_argument("--version", action="version", version=f"fastlogits {fl.__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="synthetic logits with labels: NLL, perplexity, accuracy, entropy")
    _add_common(d)
    d.add_argument("--rows", type=int, default=2048)
    d.add_argument("--vocab", type=int, default=32000)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="fastlogits against NumPy/SciPy and PyTorch, with the read ceiling")
    _add_common(b)
    b.add_argument("--rows", type=int, default=512)
    b.add_argument("--vocab", type=int, default=128256)
    b.add_argument("--ops", nargs="+", default=["logsumexp", "cross_entropy", "softmax", "entropy"],
                   choices=["logsumexp", "cross_entropy", "softmax", "log_softmax", "entropy", "argmax",
                            "top_k"])
    b.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"],
                   choices=["float16", "bfloat16", "float32", "float64"])
    b.add_argument("--repeat", type=int, default=5)
    b.add_argument("--no-peers", action="store_true", help="skip NumPy/SciPy and PyTorch")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None) is not None and args.threads < 1:
        print("fastlogits: error: --threads must be a positive integer", file=sys.stderr)
        return 2
    if args.command == "bench" and args.threads is not None:
        args.threads = [args.threads]
    try:
        return args.func(args)
    except (ValueError, TypeError, IndexError, RuntimeError, OSError, MemoryError) as e:
        print(f"fastlogits {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastlogits: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
