#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and no network (torch, numba-cuda and Cython installed):
# installs fastlogits from this source tree (editable, its kernels built in parallel), runs the GPU tests on
# the real device (the PTX check aside: CI runs it; tracebacks in gpu_tests.txt and gpu_tests.xml beside the
# figures; stopped by SIGINT at their limit, so the failures so far are still reported), the GPU benchmarks
# against PyTorch, the launch-settings sweep (gpu_sweep.py) and `fastlogits check`, and writes every figure
# to one file (`fastlogits check`'s tables to check.txt beside it). Its sections' time limits add up to 550 s
# at most (install 60, and 60 more for the in-place build if pip fails; tests 165, and 15 more for the kill
# after SIGINT; benchmarks 60, sweep 60, sampling 40; check 90), each section's seconds logged.
#
#   bash benchmarks/gpu_check.sh [OUT]          (default OUT: gpu_check.txt, or $OUT/gpu_check.txt)
set -uo pipefail
out="${1:-${OUT:-.}/gpu_check.txt}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac     # a relative OUT: the caller's directory, before the cd
cd "$(dirname "$0")/.."
[ -d "$out" ] && out="$out/gpu_check.txt"
export NUMBA_ENABLE_CUDASIM=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"     # this tree's fastlogits, for scripts run by path
py=${PYTHON:-python3}
{
  echo "# fastlogits GPU check, $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  t0=$SECONDS
  section() { echo "## $1 (at ${SECONDS}s, $((SECONDS - t0))s since the last)"; t0=$SECONDS; }
  section "install (pip install -e ., no build isolation: no network)"
  timeout 60 $py -m pip install --no-build-isolation --no-deps -q -e . > /tmp/fl_build.log 2>&1 \
    || { tail -5 /tmp/fl_build.log; timeout 60 $py setup.py build_ext --inplace > /tmp/fl_build.log 2>&1; } \
    || tail -20 /tmp/fl_build.log
  $py -c "import fastlogits, numba, numpy; fastlogits.show_config(); print('numba', numba.__version__, 'numpy', numpy.__version__)"
  $py -m pip show numba-cuda 2>/dev/null | head -2
  section "GPU tests on the device (tracebacks in gpu_tests.txt)"
  xdist=$($py -c "import xdist" 2>/dev/null && echo "-n 8")
  timeout -s INT -k 15 165 $py -m pytest -q -p no:cacheprovider $xdist --ignore=tests/gpu/test_ptx.py -rfE --durations=12 \
    --tb=short --junitxml="$(dirname "$out")/gpu_tests.xml" tests/gpu > "$(dirname "$out")/gpu_tests.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed|^[0-9.]+s (call|setup|teardown)" "$(dirname "$out")/gpu_tests.txt" | tail -55
  section "GPU benchmarks: (8192, 128256), device-resident, public API, CUDA events, medians of 10"
  FL_OUT_DIR="$(dirname "$out")" timeout 60 $py - <<'PY' 2>&1
import json
from fastlogits.gpu import timing
r = timing.benchmark(shape=(8192, 128256), dtypes=("float32", "bfloat16"), repeat=10)
print(json.dumps(r, indent=1))
for how, sfx in (("back to back", ""), ("waited", "_wait")):
    print(f"-- calls {how}")
    for dt in ("float32", "bfloat16"):
        d = r[dt]
        for op in ("logsumexp", "cross_entropy"):
            f, t = op + sfx, "torch_" + op + sfx
            line = f"{op:14s} {dt:9s} fastlogits {d[f + '_GBps']:8.1f} GB/s = {100 * d[f + '_GBps'] / r['copy_GBps']:5.1f}% of copy"
            if t + "_GBps" in d:
                line += f"   torch {d[t + '_GBps']:8.1f} GB/s   x{d[t + '_s'] / d[f + '_s']:.2f}"
            print(line)
print(f"device-to-device copy: {r['copy_GBps']:.1f} GB/s (read + write)")
# the machine code of the logsumexp pass (compiled by the benchmark above), for reading offline
import os
from fastlogits.gpu import kernels as K
for kind in ("float32", "bfloat16"):
    try:
        sass = K.for_kind(kind).stats_part[K.LSE, False].inspect_sass()
        path = os.path.join(os.environ["FL_OUT_DIR"], f"sass_stats_part_lse_{kind}.txt")
        with open(path, "w") as f:
            for sig, text in sass.items():
                f.write(f"// {sig}\n{text}\n")
        text = "\n".join(sass.values())
        ops = []
        for ln in text.splitlines():
            toks = ln.split()
            if len(toks) > 2 and toks[0].startswith("/*") and toks[0].endswith("*/"):
                ops.append(toks[2] if toks[1].startswith("@") else toks[1])
        print(f"SASS, stats_part LSE {kind}: {len(ops)} instructions, "
              + ", ".join(f"{op} {sum(o.startswith(op) for o in ops)}" for op in ("LDG", "MUFU", "FMNMX", "FADD", "FMUL", "FFMA", "FSETP"))
              + f" -> {path}")
    except Exception as e:  # nvdisasm missing, or no kernel compiled
        print(f"SASS, stats_part LSE {kind}: not dumped ({type(e).__name__}: {e})")
PY
  section "launch settings of the logsumexp pass (benchmarks/gpu_sweep.py)"
  PYTHONUNBUFFERED=1 timeout 60 $py benchmarks/gpu_sweep.py 2>&1
  section "GPU sampling: (512, 128256) float32, device-resident, CUDA events, medians of 10"
  timeout 40 $py - <<'PY' 2>&1
import json
from fastlogits.gpu import timing
r = timing.sample_benchmark(shape=(512, 128256), repeat=10)
print(json.dumps(r, indent=1))
for case, peer in (("plain", "torch.multinomial(softmax)"), ("top_k_top_p", "HF pipeline (T=0.8, k=50, p=0.9)")):
    line = f"{case:12s} fastlogits {1e3 * r[case + '_s']:8.2f} ms"
    if "torch_" + case + "_s" in r:
        line += f"   {peer} {1e3 * r['torch_' + case + '_s']:8.2f} ms   x{r['torch_' + case + '_s'] / r[case + '_s']:.2f}"
    print(line)
PY
  section "fastlogits check (GPU against CPU), a dtype at a time (the whole tables in check.txt)"
  # one process a dtype: a process compiles the kernels of its dtype only, and what ran before the time
  # limit is kept (the table is printed at the end of a run)
  chk="$(dirname "$out")/check.txt"
  : > "$chk"
  end=$((SECONDS + 90))
  for dt in float32 bfloat16 float16 float64; do
    left=$((end - SECONDS))
    if [ $left -lt 10 ]; then echo "$dt: not checked (the section's 90 s are spent)"; continue; fi
    echo "### $dt" >> "$chk"
    timeout $left $py -m fastlogits.cli check --dtypes $dt >> "$chk" 2>&1
    [ $? -eq 124 ] && echo "stopped at the section's time limit" >> "$chk"
    echo "$dt: $(tail -1 "$chk")"
  done
  grep -E "FAIL|raised|Error" "$chk" | head -40
  section "end"
} > "$out" 2>&1
echo "figures in $out"
