#!/usr/bin/env bash
# One prepared run of every GPU check of the fused output-layer loss, sized for a lent
# GPU's short lease: its stages' time limits add up to 540 s (give the device call
# timeout_s=600), and each stage writes its own files, so a stage cut short keeps what
# the others finished.
#
#   bash benchmarks/gpu_session.sh                    # every stage; files go to $OUT
#   bash benchmarks/gpu_session.sh anchor sweep       # only these stages
#   QUICK=1 bash benchmarks/gpu_session.sh            # tiny shapes on CPU: checks the script
#
# Stages: tests (tests/test_fused_linear_gpu.py: compiled kernels against float64, measured
# peak memory against the plan); anchor (the benchmark at N=8192, H=4096, V=128256 for every
# per-row divergence and a TopK teacher, beside the matmul floor, plain PyTorch and
# Liger-Kernel); sweep (chunk sizes and kernel configs at the anchor, js and forward_kl);
# shapes (the issue's other three shapes); precision (bf16 errors against float64 through the
# kernel, benchmarks/bench_fused_linear_precision.py). Results: $OUT/*.csv (the benchmark's CSV with
# command and machine; copy them to benchmarks/results/ to commit them) and logs.
#
# Liger-Kernel cannot be downloaded on a device machine. Fetch its wheel here first and
# carry .whl (the device tool's README):
#   python3 -m pip download --no-deps -d .whl liger-kernel==0.8.5
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/liger-site .whl/liger_kernel-*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/liger-site"
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import liger_kernel; print('liger_kernel', liger_kernel.__version__ if hasattr(liger_kernel, '__version__') else 'installed')" \
    || echo "liger_kernel: not installed (its rows will say so)"
} 2>&1 | tee "$OUT/machine.txt"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s"
  tail -n 4 "$OUT/$name.log"
}

stages=${*:-tests anchor sweep shapes precision}
anchor=8192,4096,128256
others=(--shape 1024,4096,128256 --shape 8192,2048,32000 --shape 32768,4096,128256)
bench=(python3 benchmarks/bench_fused_linear.py --repeats 10 --warmup 2)
if [ "${QUICK:-0}" = 1 ]; then  # the plumbing only, on CPU, in seconds
  anchor=64,32,1000
  others=(--shape 32,16,203)
  bench=(python3 benchmarks/bench_fused_linear.py --device cpu --dtype fp32 --repeats 1 --warmup 0)
fi

for stage_name in $stages; do
  case $stage_name in
    tests)
      # -n 4: the kernel variants compile in four processes (pytest-xdist is on the device image).
      xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4")
      stage tests 110 python3 -m pytest -q -p no:cacheprovider $xdist tests/test_fused_linear_gpu.py ;;
    anchor)
      stage anchor 200 "${bench[@]}" --shape "$anchor" --output "$OUT/fused_linear_cuda.csv" ;;
    sweep)
      stage sweep 70 "${bench[@]}" --shape "$anchor" --names js,forward_kl --topk 0 --no-baselines \
        --chunk-size 512,1024,1536,2048 --kernel-configs 4096x16,4096x8,2048x8,8192x16,8192x32 \
        --output "$OUT/fused_linear_cuda_sweep.csv" ;;
    shapes)
      stage shapes 130 "${bench[@]}" "${others[@]}" --output "$OUT/fused_linear_cuda_shapes.csv" ;;
    precision)
      precision=(--device cuda --shape 2048,1024,32003 --chunk-size 512 --topk 64)
      [ "${QUICK:-0}" = 1 ] && precision=(--device cpu)
      stage precision 30 python3 benchmarks/bench_fused_linear_precision.py "${precision[@]}" \
        --output "$OUT/fused_linear_precision_cuda.csv" ;;
    *) echo "unknown stage $stage_name (tests, anchor, sweep, shapes, precision)"; exit 2 ;;
  esac
done

# Last, so that it is what the device tool's reply shows: ours against the issue's targets.
python3 - "$OUT" <<'PY'
import csv, sys
from pathlib import Path
rows = []
for path in sorted(Path(sys.argv[1]).glob("fused_linear_cuda*.csv")):
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    rows += [dict(row, file=path.name) for row in csv.DictReader(lines)]
print(f"{'impl':10} {'divergence':16} {'N,H,V':18} {'chunk':10} {'ms':>8} {'x_floor':>8} {'GiB':>6} {'plan':>6} target")
for row in rows:
    if row["implementation"] in ("matmul_floor", "ours", "ours_topk", "liger", "torch_full"):
        shape = f"{row['n_tokens']},{row['hidden']},{row['vocab']}"
        print(f"{row['implementation']:10} {row['divergence']:16} {shape:18} {row.get('chunk_size') or '':10} "
              f"{row.get('median_ms', '')[:8]:>8} {row.get('x_floor', '')[:6]:>8} {row.get('peak_gib', '')[:6]:>6} "
              f"{row.get('planned_peak_gib', '')[:6]:>6} {row.get('meets_target', '') or row.get('status', '')}")
PY
