"""The ``fastlogits`` command line: the public API, and fastlogits.stream.run's drivers where a command
shows a progress bar.

Subcommands: demo, info, stats, softmax, topk, sample, check, bench. Each takes --backend, --threads,
--memory and --json, and shows a progress bar on standard error when it is a terminal. Bad input gets one
clear line on standard error and a non-zero exit, never a traceback; Ctrl-C and SIGTERM leave no partial
output (exit status 130, 143). ``python -m fastlogits`` runs it too.
"""
import argparse
import contextlib
import io
import math
import os
import secrets
import signal
import stat
import sys
import tempfile
import threading
import time
import warnings

import numpy as np

import fastlogits as fl
from fastlogits import _json
from fastlogits._config import MAX_THREADS
from fastlogits.ops._prep import dtype_name
from fastlogits.stream.run import STDOUT, check_map_path, descriptor_of, parse_memory
from fastlogits.stream.sources import named_error, read_npy, reason


def _add_common(p, default_memory="256MiB", memory=None, backend="backend (default: cpu)",
                threads="CPU threads (default: all cores, or FASTLOGITS_NUM_THREADS)"):
    """The options every command takes; memory, backend, threads: their help, for a command that uses
    them otherwise (or not)."""
    p.add_argument("--backend", choices=["cpu", "gpu"], default=None, help=backend)
    p.add_argument("--threads", type=_threads, default=None, help=threads)
    p.add_argument("--memory", type=_memory, default=None,
                   help=memory or f"memory budget, e.g. 256MiB (default: {default_memory})")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on standard output")


def _add_input(p):
    p.add_argument("input", help="a logit dump: .npy, .safetensors, raw binary (with --dtype and --vocab), "
                   "or - for raw rows on standard input")
    p.add_argument("--dtype", type=_dtype, default=None,
                   help="element type of raw input, or bfloat16 to re-declare a |V2 .npy file")
    p.add_argument("--vocab", type=_positive, default=None, help="vocabulary size (raw input)")
    p.add_argument("--tensor", default=None, help="which tensor of a .safetensors file")


def _open(args, output=None):
    """The input as a source. With `output` (a file of per-row results), its name and folder are checked
    before the input is opened, and that it is not the input after."""
    from fastlogits.stream.run import check_not_input

    if output is not None:
        _check_per_row_path(output)
    src = fl.open(args.input, dtype=args.dtype, vocab=args.vocab, tensor=args.tensor, memory=args.memory)
    if output is not None:
        check_not_input(src, output)
    return src


class _Bar:
    """tqdm on standard error when it is a terminal (rows, rows/s, GB/s, time left); silent otherwise."""

    def __init__(self, total, desc):
        from tqdm import tqdm
        tqdm.monitor_interval = 0      # no monitor thread (started even when disabled; a second Ctrl-C
        #                                printed a traceback from its exit hook, after "interrupted")
        self.bar = tqdm(total=total, desc=desc, unit="row", file=sys.stderr, dynamic_ncols=True,
                        disable=not sys.stderr.isatty(), leave=False)
        self.t0 = time.perf_counter()
        self.nbytes = 0

    def __call__(self, rows, nbytes):
        self.nbytes += nbytes
        self.bar.update(rows)
        dt = time.perf_counter() - self.t0
        if dt > 0:
            self.bar.set_postfix_str(f"{self.nbytes / dt / 1e9:.2f} GB/s", refresh=False)

    def close(self):
        self.bar.close()
        return time.perf_counter() - self.t0


def _emit(args, summary, lines):
    """The summary on standard output, or on standard error when the results went there (output -)."""
    stream = sys.stderr if not args.json and _results_on_stdout(args) else sys.stdout
    try:
        print(_json.dumps(summary, indent=1) if args.json else "\n".join(lines), file=stream)
        stream.flush()
    except BrokenPipeError:
        raise
    except OSError as e:      # a full disk: its error names no file (and the results were written)
        where = "standard error" if stream is sys.stderr else "standard output"
        raise named_error(e, f"{where}: cannot write the summary ({e.strerror or e})") from None


def _where(path):
    return "standard output" if path == STDOUT else path


def _on_stdout(path):
    """Whether an output named `path` goes to standard output: -, or a name of descriptor 1 (/dev/stdout,
    or a link to it such as out.npy -> /dev/stdout, whose format is the name's)."""
    return path == STDOUT or (path is not None and descriptor_of(path) == (os.getpid(), 1))


def _results_on_stdout(args):
    return _on_stdout(getattr(args, "output", None)) or _on_stdout(getattr(args, "per_row", None))


_PER_ROW = (".npy", ".csv", ".jsonl")


DEMO_MEMORY = "64MiB"      # the demo's budget: small, to show that the dump is streamed


def _binary_size(n):
    """n bytes as the largest binary unit that keeps it at least 1: 64 MiB, 64 KiB, 512 B."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.2f} {unit}"
    return f"{n} B"


def _check_per_row_path(path):
    """Before the input is opened, not after the pass: a place to write it (its name's format was checked
    with the command line, in main)."""
    from fastlogits.stream.run import check_output_path

    if path != STDOUT:
        check_output_path(path)


def _json_lines(f, names, arrays):
    for i in range(arrays[0].shape[0]):
        f.write(_json.dumps({n: a[i] for n, a in zip(names, arrays)}) + "\n")


def _lead(src):
    """The leading shape of src's rows (a (B, T, V) dump: (B, T)), or None where it is not known ahead
    (raw rows from standard input)."""
    lead = tuple(src.shape[:-1])
    return None if None in lead else lead


def write_rows(path, columns, lead=None):
    """Per-row results to .npy (a structured array of the dump's leading shape ``lead``, as the in-memory
    functions return them; flat where lead is None), .csv or .jsonl (a line a row, in C order), written
    under a temporary name and renamed when complete; or, for -, as JSON lines to standard output. (The
    name was checked by _open, before the input was read.)"""
    names = list(columns)
    arrays = [np.asarray(columns[n]) for n in names]
    rows = arrays[0].shape[0]
    if path == STDOUT:
        try:
            _json_lines(sys.stdout, names, arrays)
            sys.stdout.flush()
        except BrokenPipeError:
            raise
        except OSError as e:      # a full disk: its error names no file
            raise named_error(e, f"standard output: cannot write the per-row results ({e.strerror or e})") \
                from None
        return
    try:
        _write_rows_file(path, names, arrays, rows, lead)
    except BrokenPipeError:     # a named pipe's reader left: rows were lost (not the | head of stdout)
        raise OSError(f"{path}: the pipe's reader went away; the per-row results were not all written") \
            from None
    except OSError as e:
        if e.filename or str(path) in str(e):
            raise
        raise named_error(e, f"{path}: cannot write ({e.strerror or e})") from None    # a full disk, say


def _write_rows_file(path, names, arrays, rows, lead):
    from fastlogits.stream.run import atomic_output, write_all

    with atomic_output(path) as tmp:
        if path.lower().endswith(".npy"):
            dt = [(n, a.dtype, a.shape[1:]) for n, a in zip(names, arrays)]
            rec = np.empty(rows, dt)
            for n, a in zip(names, arrays):
                rec[n] = a
            # through memory, then written out in order: np.save asks a named pipe for its position
            buf = io.BytesIO()
            np.save(buf, rec if lead is None else rec.reshape(lead))
            with open(tmp, "wb") as f:
                write_all(f, buf.getbuffer())
        elif path.lower().endswith(".csv"):
            with open(tmp, "w") as f:
                head = []
                for n, a in zip(names, arrays):
                    head += [n] if a.ndim == 1 else [f"{n}_{j}" for j in range(a.shape[1])]
                f.write(",".join(head) + "\n")
                for i in range(rows):
                    cells = (",".join(map(repr, np.atleast_1d(a[i]).tolist())) for a in arrays)
                    f.write(",".join(cells) + "\n")
        else:
            with open(tmp, "w") as f:
                _json_lines(f, names, arrays)


def _load_labels(path, src):
    """The labels file at `path` for the rows of `src`: one label per row, flat (one per line, in the
    rows' order) or in the dump's leading shape (a 2-D file for a 3-D dump), given that shape."""
    rows = src.rows       # (the name was checked as the command line was parsed: _labels_name)
    # a file or a pipe; /dev/zero was read as one endless line, until memory ran out
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = stat.S_IFREG           # (the reader says it is missing)
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise ValueError(f"{path}: expected a labels file (or a pipe), found a folder or a device")
    if path.lower().endswith(".npy"):
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path}: expected a regular file (a .npy file's header is read at offsets), "
                             "found a pipe; text labels, one per line, may come through a pipe")
        # checked as a logits file is (np.load takes a zip archive (.npz) for one and reads a file too
        # short for the magic as pickled data; NumPy's reader allocates the header's shape unchecked)
        y = read_npy(path)
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")      # an empty file: an empty array, not a warning
                y = np.loadtxt(path, dtype=np.int64, ndmin=1, encoding="utf-8-sig")     # (a BOM: Notepad's)
        except FileNotFoundError:
            raise
        except Exception as e:      # what a corrupt file makes NumPy raise: ValueError, UnicodeDecodeError,
            raise ValueError(f"{path}: cannot read labels (.npy of integers, or text with one per line): "
                             f"{reason(e)}") from None
    if y.dtype.kind not in "iu":
        raise ValueError(f"{path}: labels must be integers, found {y.dtype}")
    lead = tuple(src.shape[:-1])
    axes = [d for d in y.shape if d != 1]
    if rows is not None and len(axes) > 1 and axes != [d for d in lead if d != 1]:
        # a flat file ((N,), or (N, 1)) is read in the rows' order; a shaped one must have their shape (axes
        # of length 1 aside): transposed labels, (T, B) for a (B, T, V) dump, gave a wrong NLL silently
        raise ValueError(f"{path}: labels of shape {y.shape} for logits whose rows have shape {lead}: "
                         "expected that shape, or one label per row in a flat file")
    y = y.reshape(-1)
    if rows is not None and y.shape[0] != rows:
        raise ValueError(f"{path}: {y.shape[0]} labels for {rows} rows of logits")
    if rows is not None:
        y = y.reshape(lead)      # the rows of a 1-D or 3-D dump (a 2-D one: as it is)
    return y        # as stored: the library checks the range (a uint64 label past 2^63 would wrap in int64)


def _rows(n):
    return f"{n} row" if n == 1 else f"{n} rows"


def cmd_info(args):
    src = _open(args)
    summary = {"input": args.input, "format": src.format, "dtype": src.dtype, "shape": list(src.shape),
               "rows": src.rows, "vocab": src.V, "bytes": src.nbytes,
               "order": "F" if getattr(src, "fortran", False) else "C"}
    if getattr(src, "tensor", None):
        summary["tensor"] = src.tensor
    def text(v):     # standard input's rows and size are not known before it is read
        if isinstance(v, list):       # a shape, as Python writes a tuple: (50,) for one axis
            dims = ", ".join("?" if d is None else str(d) for d in v)
            return f"({dims},)" if len(v) == 1 else f"({dims})"
        return "not known before it is read" if v is None else v

    _emit(args, summary, [f"{k:8s} {text(v)}" for k, v in summary.items()])
    return 0


def cmd_stats(args):
    from fastlogits.stream import run

    src = _open(args, args.per_row)
    if args.labels is not None and args.per_row not in (None, STDOUT) and os.path.exists(args.per_row) \
            and os.path.exists(args.labels) and os.path.samefile(args.labels, args.per_row):
        raise ValueError(f"{args.per_row}: is the labels file; the per-row results would replace the "
                         "labels: write them to another file")
    labels = _load_labels(args.labels, src) if args.labels is not None else None
    bar = _Bar(src.rows, "stats")
    try:
        st = run.stats(src, labels, ignore_index=args.ignore_index, temperature=args.temperature,
                       backend=args.backend, threads=args.threads, memory=args.memory, progress=bar)
    except (IndexError, ValueError) as e:     # the library's checks of the labels: name their file
        if labels is None or not str(e).startswith("labels"):
            raise
        raise type(e)(f"{args.labels}: {e}") from None
    finally:
        secs = bar.close()
    # every mean is over the counted rows when there are labels (padding, ignore_index, is left out: its
    # entropy, of logits that may be anything, made the mean NaN or moved it), else over every row
    counted = st["counted"] if labels is not None else np.ones(st["rows"], bool)
    n = int(np.count_nonzero(counted))
    summary = {"input": args.input, "rows": st["rows"], "vocab": src.V, "dtype": src.dtype, "seconds": secs,
               "GB/s": (bar.nbytes / secs / 1e9) if secs else None,
               "mean_entropy": float(np.mean(st["entropy"][counted])) if n else float("nan")}
    lines = [f"{args.input}: {_rows(st['rows'])} x {src.V} ({src.dtype}) in {secs:.2f} s "
             f"({summary['GB/s'] or 0:.2f} GB/s)"]
    if labels is not None:
        mean_nll = float(np.mean(st["nll"][counted])) if n else float("nan")
        with np.errstate(over="ignore"):             # a mean NLL past 709 nats: perplexity inf, no warning
            perplexity = float(np.exp(mean_nll))
        summary.update({"counted_rows": n, "mean_nll": mean_nll, "perplexity": perplexity,
                        "accuracy": float(np.mean(st["correct"][counted])) if n else float("nan")})
        lines.append(f"  mean NLL      {mean_nll:.4f} nats over {_rows(n)}   "
                     f"perplexity {summary['perplexity']:.3f}")
        lines.append(f"  accuracy      {summary['accuracy']:.4f}")
    if st["rows"]:       # (NaN over 0 rows, as the mean NLL: every row ignored)
        lines.append(f"  mean entropy  {summary['mean_entropy']:.4f} nats over {_rows(n)}")
    if args.per_row:
        cols = {"argmax": st["argmax"], "entropy": st["entropy"]}
        if labels is not None:
            cols.update({"label": labels.reshape(-1).astype(np.int64), "nll": st["nll"],
                         "correct": st["correct"]})
        write_rows(args.per_row, cols, _lead(src))
        lines.append(f"  per-row results written to {_where(args.per_row)}")
    _emit(args, summary, lines)
    return 0


def cmd_softmax(args):
    src = _open(args)
    from fastlogits.stream import run

    bar = _Bar(src.rows, "log_softmax" if args.log else "softmax")
    try:
        run.softmax(src, args.log, args.output, {"temperature": args.temperature, "dtype": args.out_dtype,
                                                  "backend": args.backend, "threads": args.threads},
                    memory=args.memory, progress=bar)
    finally:
        secs = bar.close()
    summary = {"input": args.input, "output": args.output, "rows": src.rows, "vocab": src.V,
               "seconds": secs, "GB/s": bar.nbytes / secs / 1e9 if secs else None}
    _emit(args, summary, [f"wrote the {'log-' if args.log else ''}softmax of {_rows(src.rows)} to "
                          f"{_where(args.output)} in {secs:.2f} s"])
    return 0


def cmd_topk(args):
    from fastlogits.stream import run

    src = _open(args, args.output)
    bar = _Bar(src.rows, "topk")
    try:
        kw = {"k": args.k, "temperature": args.temperature, "backend": args.backend, "threads": args.threads}
        lp, idx = run.reduce("top_k_logprobs", src, kw, memory=args.memory, progress=bar)
    finally:
        secs = bar.close()
    lp, idx = np.asarray(lp).reshape(-1, args.k), np.asarray(idx).reshape(-1, args.k)
    write_rows(args.output, {"ids": idx, "logprobs": lp}, _lead(src))
    summary = {"input": args.input, "output": args.output, "rows": int(idx.shape[0]), "k": args.k,
               "seconds": secs}
    _emit(args, summary, [f"wrote the top {args.k} tokens of {_rows(idx.shape[0])} to {_where(args.output)} "
                          f"in {secs:.2f} s"])
    return 0


def cmd_demo(args):
    """Writes a synthetic bfloat16 dump with labels, streams it in bounded memory, prints the summary."""
    from fastlogits.ops._prep import bf16, resolve_backend
    from fastlogits.stream import run

    rng = np.random.default_rng(args.seed)
    rows, vocab = args.rows, args.vocab
    memory = DEMO_MEMORY if args.memory is None else args.memory     # ('' is checked, not the default)
    # Written block by block, within the budget too (about 24 bytes a value in flight: the float32 logits,
    # their noise and sums, the bfloat16 copy): the demo never holds the dump in memory. Written, not
    # mapped: a full disk is an error, where a write through a map is a SIGBUS.
    block = max(1, min(256, run.parse_memory(memory) // (24 * vocab)))
    prior = (-1.1 * np.log(np.arange(1, vocab + 1))).astype(np.float32)   # Zipf-like token frequencies
    with tempfile.TemporaryDirectory(prefix="fastlogits-demo-") as tmp:
        path, lab_path = os.path.join(tmp, "logits.npy"), os.path.join(tmp, "labels.npy")
        t0 = time.perf_counter()
        labels = np.empty(rows, np.int64)
        try:
            with open(path, "wb") as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "|V2", "fortran_order": False,
                                                         "shape": (rows, vocab)})
                for r0 in range(0, rows, block):
                    r1 = min(rows, r0 + block)
                    x = prior + rng.standard_normal((r1 - r0, vocab), dtype=np.float32) * 2.0
                    f.write(x.astype(bf16()).tobytes())
                    # labels drawn from the model's own distribution at temperature 1.3 (slightly
                    # miscalibrated), by Gumbel-max with float32 noise -log(-log(u))
                    with np.errstate(divide="ignore"):
                        x /= 1.3
                        x -= np.log(-np.log(rng.random(x.shape, dtype=np.float32)))
                    labels[r0:r1] = np.argmax(x, axis=-1)
            np.save(lab_path, labels)
        except OSError as e:       # a full disk, say: the error named no file
            raise named_error(e, f"{tmp}: cannot write the demo's dump there ({e.strerror or e}); TMPDIR "
                              "names the folder for temporary files") from None
        made = time.perf_counter() - t0
        src = fl.open(path, dtype="bfloat16", memory=memory)
        bar = _Bar(rows, "demo")
        try:
            st = run.stats(src, labels, backend=args.backend, threads=args.threads, progress=bar)
        finally:
            secs = bar.close()
        k = min(5, vocab)
        lp, top = fl.top_k_logprobs(src.read(0, 1), k, backend=args.backend, threads=args.threads)
        size = os.path.getsize(path)
    mean_nll = float(np.mean(st["nll"]))
    summary = {"rows": rows, "vocab": vocab, "dtype": "bfloat16", "file_bytes": size,
               "memory_budget": run.parse_memory(memory), "mean_nll": mean_nll,
               "perplexity": float(np.exp(mean_nll)), "accuracy": float(np.mean(st["correct"])),
               "mean_entropy": float(np.mean(st["entropy"])), "seconds": secs, "GB/s": size / secs / 1e9,
               "config": fl.show_config(as_dict=True)}
    threads, at_most = _demo_threads(args, src)
    summary["config"]["threads"] = threads        # what this run used, not the default
    where = ("[backend=gpu]" if resolve_backend(args.backend, None) == "gpu" else
             f"[simd={summary['config']['simd']}, threads={'up to ' if at_most else ''}{threads}]")
    lines = [
        f"fastlogits demo: wrote {_rows(rows)} x {vocab} vocabulary of bfloat16 logits with labels "
        f"({size / 1e6:.0f} MB, {made:.1f} s), then streamed it with a "
        f"{_binary_size(summary['memory_budget'])} budget:",
        f"  mean NLL      {mean_nll:.4f} nats   perplexity {summary['perplexity']:.1f}",
        f"  accuracy      {summary['accuracy']:.4f}",
        f"  mean entropy  {summary['mean_entropy']:.4f} nats",
        f"  row 0's top-{k} tokens {top[0].tolist()} with probabilities "
        f"{[round(float(p), 4) for p in np.exp(lp[0])]}",
        f"  one pass (cross-entropy, entropy, argmax) in {secs:.3f} s: {summary['GB/s']:.2f} GB/s {where}",
    ]
    _emit(args, summary, lines)
    return 0


def _demo_threads(args, src):
    """(threads, at_most): the CPU threads demo's pass ran on, resolved as the library resolves them:
    --threads, else the default capped by the work of a row block (fastlogits.ops._prep.prepare), the
    first block being the largest; for rows wider than the budget (folded by the accumulators, chunk by
    chunk), at most the default (at_most True)."""
    from fastlogits import _config
    from fastlogits.stream import run

    if args.threads is not None:
        return _config.resolve_threads(args.threads), False
    p = run.plan(src)
    if not p.rows:
        return _config.default_threads(), True
    V = src.V
    return _config.resolve_threads(None, min(p.rows, src.rows) * V,
                                   _config.GRAIN_CHUNKS * _config.resolve_chunk(None)), False


def cmd_sample(args):
    from fastlogits.ops.sampling import sample_source

    src = _open(args, args.output)
    # a seed drawn here, not by sample(): the summary reports it, so the run can be repeated; 53 bits, so
    # that JSON readers (jq, JavaScript) read the reported number back exactly (RFC 8259, section 6)
    seed = secrets.randbits(53) if args.seed is None else args.seed
    bar = _Bar(src.rows, "sample")
    try:
        res = sample_source(src, args.temperature, args.top_k, args.top_p, args.min_p, seed,
                            args.num_samples, args.logprobs,
                            dict(softcap=None, backend=args.backend, threads=args.threads, chunk_size=None),
                            progress=bar)
    finally:
        secs = bar.close()
    tokens, lp, ranks = res if args.logprobs else (res, None, None)
    tokens = np.asarray(tokens).reshape(-1, args.num_samples)
    rows = tokens.shape[0]
    cols = {"token": tokens if args.num_samples > 1 else tokens[:, 0]}
    if args.logprobs:
        cols["logprob"] = np.asarray(lp).reshape(cols["token"].shape)
        cols["rank"] = np.asarray(ranks).reshape(cols["token"].shape)
    write_rows(args.output, cols, _lead(src))
    summary = {"input": args.input, "output": args.output, "rows": rows, "seconds": secs, "seed": seed}
    drawn = f"{rows} sampled token{'s' * (rows != 1)}" if args.num_samples == 1 else \
        f"{rows * args.num_samples} sampled tokens ({args.num_samples} a row, {_rows(rows)})"
    _emit(args, summary, [f"wrote {drawn} to {_where(args.output)} in {secs:.2f} s (seed {seed})"])
    return 0


def cmd_check(args):
    from fastlogits import check
    return check.main(args)


def cmd_bench(args):
    from fastlogits import bench
    return bench.main(args)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_from(least, what, most=None):
    """An argparse type: an integer from `least` to `most`, else an error saying `what` was expected."""
    def parse(text):
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if n < least or (most is not None and n > most):
            raise argparse.ArgumentTypeError(f"expected {what}, got {n}")
        return n
    return parse


_non_negative = _int_from(0, "a non-negative integer")
_positive = _int_from(1, "a positive integer")
_threads = _int_from(1, f"an integer from 1 to {MAX_THREADS}", MAX_THREADS)
_seed = _int_from(0, "an integer from 0 to 2**64 - 1", 2**64 - 1)
_int64 = _int_from(-2**63, "an integer from -2**63 to 2**63 - 1", 2**63 - 1)


def _labels_name(text):
    """An argparse type: the name of a labels file ('' from an unset shell variable would drop the labels
    silently; standard input is not read for labels)."""
    if text in ("", STDOUT):
        raise argparse.ArgumentTypeError("expected the name of a labels file, " + (
            "got an empty name" if not text else "got - (standard input is not read for labels)"))
    return text


def _float_in(what, ok):
    """An argparse type: a float for which ok(value) holds, else an error saying `what` was expected."""
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return v
    return parse


# option values are checked as the command line is parsed: a wrong one is a usage error (exit 2, naming
# the option), as a wrong --threads is, not a failure of the command on its data (exit 1)
_temperature = _float_in("a finite number > 0", lambda t: 0 < t < math.inf)
_sample_temperature = _float_in("a finite number >= 0 (0: greedy)", lambda t: 0 <= t < math.inf)
_top_p = _float_in("a number in (0, 1]", lambda p: 0 < p <= 1)
_min_p = _float_in("a number in [0, 1]", lambda p: 0 <= p <= 1)


def _checked_by(check):
    """An argparse type: the text as given (the commands pass it on), once check(text) has accepted it;
    its TypeError or ValueError is the usage error."""
    def parse(text):
        try:
            check(text)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    return parse


_memory = _checked_by(lambda text: parse_memory(text, "the budget"))          # a memory budget
_dtype = _checked_by(lambda text: dtype_name(text, "the element type"))       # as fastlogits.open's dtype=


def build_parser():
    from fastlogits.bench import DTYPES, OPS
    from fastlogits.check import OPS as CHECK_OPS

    p = _Parser(prog="fastlogits", description="Fast operations on neural-network logits.")
    p.add_argument("--version", action="version", version=f"fastlogits {fl.__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="write a synthetic dump with labels and stream it: NLL, perplexity, ...")
    _add_common(d, default_memory=DEMO_MEMORY)
    d.add_argument("--rows", type=_positive, default=2048, help="rows of the dump (default: %(default)s)")
    d.add_argument("--vocab", type=_positive, default=32000, help="its vocabulary (default: %(default)s)")
    d.add_argument("--seed", type=_non_negative, default=0,
                   help="seed of the synthetic logits (default: %(default)s)")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="format, dtype, shape and size of a logit dump")
    _add_input(i)
    _add_common(i, backend="not used by info (it reads the header only)",
                threads="not used by info (it reads the header only)",
                memory="not used by info (it reads the header only; still checked)")
    i.set_defaults(func=cmd_info)

    s = sub.add_parser("stats", help="per-row and mean NLL, perplexity, accuracy, entropy")
    _add_input(s)
    _add_common(s)
    s.add_argument("--labels", type=_labels_name, default=None,
                   help="labels: .npy of integers, or text with one per line")
    s.add_argument("--ignore-index", type=_int64, default=-100,
                   help="the label of rows left out of NLL, accuracy and mean entropy (default: %(default)s)")
    s.add_argument("--temperature", type=_temperature, default=1.0, help="divide the logits by T > 0 first")
    s.add_argument("--per-row", default=None, metavar="OUT",
                   help="per-row results to OUT (.npy, .csv, .jsonl; -: JSON lines on standard output)")
    s.set_defaults(func=cmd_stats)

    m = sub.add_parser("softmax", help="softmax (or --log: log-softmax) of a dump, written to a file")
    _add_input(m)
    m.add_argument("output", help="output: .npy, - for raw rows on standard output, or raw rows for any "
                   "other name but a text one (.csv, .tsv, .txt, .json, .jsonl)")
    _add_common(m)
    m.add_argument("--log", action="store_true", help="write log-softmax instead")
    m.add_argument("--temperature", type=_temperature, default=1.0, help="divide the logits by T > 0 first")
    m.add_argument("--out-dtype", default=None, choices=["float16", "bfloat16", "float32", "float64"],
                   help="element type of the output (default: the input's)")
    m.set_defaults(func=cmd_softmax)

    k = sub.add_parser("topk", help="the k most likely tokens of each row with their log-probabilities")
    _add_input(k)
    k.add_argument("output", help="output: .npy, .csv or .jsonl, or - for JSON lines on standard output")
    _add_common(k)
    k.add_argument("-k", type=_positive, default=5, help="tokens per row (default: %(default)s)")
    k.add_argument("--temperature", type=_temperature, default=1.0, help="divide the logits by T > 0 first")
    k.set_defaults(func=cmd_topk)

    sm = sub.add_parser("sample", help="tokens drawn per row: temperature, top-k, top-p, min-p, seeded")
    _add_input(sm)
    sm.add_argument("output", help="output: .npy, .csv or .jsonl, or - for JSON lines on standard output")
    _add_common(sm)
    sm.add_argument("--temperature", type=_sample_temperature, default=1.0,
                    help="divide the logits by T first; 0: greedy")
    sm.add_argument("--top-k", type=_non_negative, default=None,
                    help="keep the k most likely tokens (0: all)")
    sm.add_argument("--top-p", type=_top_p, default=None,
                    help="keep the fewest most likely tokens whose mass reaches p, in (0, 1]")
    sm.add_argument("--min-p", type=_min_p, default=None,
                    help="drop tokens less likely than min_p times the most likely one, in [0, 1]")
    sm.add_argument("--seed", type=_seed, default=None,
                    help="the same seed gives the same tokens (default: a random one, reported)")
    sm.add_argument("--num-samples", type=_positive, default=1,
                    help="tokens drawn per row, with replacement (default: %(default)s)")
    sm.add_argument("--logprobs", action="store_true", help="also each token's log-probability and rank")
    sm.set_defaults(func=cmd_sample)

    c = sub.add_parser("check", help="the GPU backend against the CPU: largest differences, pass/fail")
    _add_common(c, memory="not used by check (its arrays are small)",
                backend="not used by check (it runs both backends)")
    c.add_argument("--ops", nargs="+", default=None, choices=list(CHECK_OPS), metavar="OP",
                   help=f"operations to check: {', '.join(CHECK_OPS)} (default: all)")
    c.add_argument("--dtypes", nargs="+", default=None, choices=DTYPES, metavar="DTYPE",
                   help=f"logit dtypes: {', '.join(DTYPES)} (default: all)")
    c.set_defaults(func=cmd_check)

    b = sub.add_parser("bench", help="fastlogits against NumPy/SciPy and PyTorch, with the read ceiling")
    _add_common(b, memory="not used by bench (its arrays are in memory)",
                backend="cpu: the CPU table only; gpu: the GPU figures only (default: the CPU table, and "
                "the GPU figures where a GPU is present)",
                threads="CPU threads to measure (default: 1 and all cores)")
    b.add_argument("--rows", type=_positive, default=512,
                   help="rows of the logits (default: %(default)s; the GPU's logsumexp and cross-entropy "
                   "figures use at least 8192)")
    b.add_argument("--vocab", type=_positive, default=128256, help="their vocabulary (default: %(default)s)")
    b.add_argument("--ops", nargs="+", default=["logsumexp", "cross_entropy", "softmax", "entropy"],
                   choices=OPS, help="operations to time (default: %(default)s)")
    b.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"], choices=DTYPES,
                   help="logit dtypes (default: %(default)s)")
    b.add_argument("--repeat", type=_positive, default=5,
                   help="timed calls per figure, after a warm-up; the median is shown (default: %(default)s)")
    b.add_argument("--no-peers", action="store_true", help="skip NumPy/SciPy and PyTorch")
    b.set_defaults(func=cmd_bench)
    return p


class _Terminated(BaseException):
    """SIGTERM (kill, timeout, job schedulers) or SIGHUP (a closed terminal, a dropped ssh session),
    raised where the main thread runs, so that the work unwinds: an output written under a temporary name
    is removed, as after Ctrl-C."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    raise _Terminated(signum)


_UNWINDING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def _signals_unwind():
    """SIGTERM and SIGHUP raise _Terminated in the main thread while the block runs."""
    # handlers are the main thread's to set; a signal ignored (trap '' TERM, nohup) or handled by the
    # caller stays so
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _terminate) for sig in _UNWINDING
                if signal.getsignal(sig) is signal.SIG_DFL}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _closed_standard_streams():
    """The names of the standard streams that were closed when Python started (sys.stdin, sys.stdout or
    sys.stderr is None then), with /dev/null opened on their descriptors where still free: a file this
    command opens must not take descriptor 1 (a check that the output is not the input then compares the
    input with itself), and what is written to a closed standard error (messages, the progress bar) goes
    nowhere. print(file=None) writes standard output."""
    closed = []
    for fd, name, mode in ((0, "stdin", os.O_RDONLY), (1, "stdout", os.O_WRONLY), (2, "stderr", os.O_WRONLY)):
        if getattr(sys, name) is None:
            closed.append(name)
            try:
                os.fstat(fd)      # (taken by a file meanwhile: left as it is)
            except OSError:
                got = os.open(os.devnull, mode)
                if got != fd:
                    os.close(got)
    if "stderr" in closed:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return closed


def main(argv=None):
    closed = _closed_standard_streams()
    parser = build_parser()
    if "stdout" in closed:    # every command's summary goes there (the shell's echo >&- fails too)
        print("fastlogits: error: standard output is closed; redirect it to /dev/null to discard the "
              "summary", file=sys.stderr)
        return 1
    args, extra = parser.parse_known_args(argv)
    # usage errors found past the command's own parser name the command and its --help
    command = _Parser(prog=f"{parser.prog} {args.command}")
    if extra:
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    for name in ("output", "per_row"):     # /dev/stdout, /proc/self/fd/1: standard output, as -
        path = getattr(args, name, None)
        if path not in (None, STDOUT) and not path.lower().endswith(_PER_ROW) and _on_stdout(path):
            setattr(args, name, STDOUT)    # (a name with a format of its own keeps it: o.npy -> /dev/stdout)
    per_row = [("--per-row", args.per_row)] if getattr(args, "per_row", None) is not None else []
    if args.command in ("topk", "sample"):
        per_row.append(("output", args.output))
    for flag, path in per_row:
        if path != STDOUT and not path.lower().endswith(_PER_ROW):
            command.error(f"argument {flag}: expected a name ending in .npy, .csv or .jsonl, or - for JSON "
                          f"lines on standard output, got {path!r}")
    if args.command == "softmax":     # (topk and sample write CSV or JSON lines for a text name)
        if not args.output:
            command.error("argument output: expected the name of a file (or - for standard output), got an "
                          "empty name")
        try:
            check_map_path(args.output)
        except ValueError as e:
            command.error(f"argument output: {e}")
    if getattr(args, "json", False) and _results_on_stdout(args):
        command.error("--json prints the summary on standard output, where - sends the results: give an "
                      "output file, or leave out --json (the summary then goes to standard error)")
    try:
        with _signals_unwind():
            return args.func(args)        # (each command passes --backend, --memory on: no global state)
    except KeyboardInterrupt:
        _say(f"fastlogits {args.command}: interrupted")
        return 130
    except _Terminated as e:
        what = "hung up" if e.signum == getattr(signal, "SIGHUP", None) else "terminated"
        _say(f"fastlogits {args.command}: {what}")
        return 128 + e.signum
    except BrokenPipeError:   # the reader of standard output went away (| head): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, IndexError, RuntimeError, OSError, MemoryError, KeyError,
            ArithmeticError) as e:
        msg = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.errno is not None and e.strerror and not e.filename:
            msg = e.strerror            # (our messages name the file; "[Errno 28]" adds nothing)
        msg = msg.removeprefix("fastlogits: ")
        if isinstance(e, FileNotFoundError) and e.filename:
            msg = f"{e.filename}: no such file"
        _say(f"fastlogits {args.command}: error: {msg}")
        return 1


def _say(line):
    """A line on standard error, if it can still be written: after a hang-up it is a dead terminal (EIO),
    and the exit status must still say what happened."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
