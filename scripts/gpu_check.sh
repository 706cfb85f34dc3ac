#!/usr/bin/env bash
# GPU check of the Triton backend, for the device machine (H100; torch with CUDA, triton 3.6,
# nvcc, compute-sanitizer; POT and peers may be carried as wheels in .whl/).
#
#   bash scripts/gpu_check.sh            # from the repository root; at most ~8.5 minutes
#
# Stages (each time-boxed; a failure is recorded and the next stage runs):
#   env        GPU, driver, versions
#   wheels     pip install --no-deps .whl/*.whl (POT, GeomLoss, FlashSinkhorn, ... if carried)
#   build      pip install --no-deps --no-build-isolation -e .   (PYTHONPATH=. fallback)
#   tests      pytest tests/gpu/test_triton_gpu.py (real sizes vs the torch reference, gradcheck,
#              no host sync, torch.compile)
#   cuda_tests pytest -m gpu tests/test_cuda.py (the CUDA C++ backend vs the torch reference on
#              CUDA tensors, side streams, CUDA-graph capture; needs the build stage's _cuda)
#   sanitizer  compute-sanitizer memcheck on one small forward+backward (tests/gpu/sanitize_one.py)
#   aot        register / spill report of the compiled kernels (tests/gpu/aot_compile.py)
#   bench      bench/test_gpu.py: S2 (fp32, bf16), S3, S4 vs torch, POT solve_batch, GeomLoss,
#              FlashSinkhorn where installed
# Output: bench/results/<date>-<gpu>-gpu-check.{json,md} (measurements + stage statuses), logs
# in bench/results/<date>-<gpu>-gpu-check-logs/; all copied to $OUT when it is set.
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET (total seconds, default 480),
# GPU_CHECK_SKIP (comma-separated stages to skip), GPU_CHECK_STEM (output path stem).

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-480}
T0=$(date +%s)

GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
case "$GPU_NAME" in
  *H200*) TAG=h200 ;;
  *H100*) TAG=h100 ;;
  "") TAG=nogpu ;;
  *) TAG=$(echo "$GPU_NAME" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-*$//') ;;
esac
STEM=${GPU_CHECK_STEM:-"bench/results/$(date +%Y-%m-%d)-${TAG}-gpu-check"}
SKIP=",${GPU_CHECK_SKIP:-},"
LOGS="${STEM}-logs"
mkdir -p "$LOGS"
STAGES="$LOGS/stages.jsonl"
: > "$STAGES"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export OPTICAL_KERNELS_QUIET=1
export PIP_BREAK_SYSTEM_PACKAGES=1  # the device machine's system python (PEP 668)
unset TRITON_INTERPRET

remaining() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# record NAME RC SECONDS LOGFILE [NOTE]: append one JSON line to the stage file
record() {
  "$PY" - "$@" >> "$STAGES" <<'EOF' 2>/dev/null || echo "{\"stage\": \"$1\", \"rc\": $2}" >> "$STAGES"
import json, sys
name, rc, secs, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
note = sys.argv[5] if len(sys.argv) > 5 else ""
status = {0: "ok", 124: "timeout", 137: "timeout", 125: "skipped"}.get(rc, "failed")
tail = ""
try:
    lines = [l for l in open(log, errors="replace").read().splitlines() if l.strip()]
    tail = " / ".join(lines[-3:])[-400:]
except OSError:
    pass
print(json.dumps({"stage": name, "status": status, "rc": rc, "seconds": secs,
                  "note": note or tail, "log": log}))
EOF
}

# stage NAME LIMIT CMD...: run CMD with timeout min(LIMIT, remaining - 30), log, record
stage() {
  local name=$1 limit=$2; shift 2
  local left; left=$(( $(remaining) - 30 ))
  (( limit > left )) && limit=$left
  local log="$LOGS/$name.log"
  if [[ "$SKIP" == *",$name,"* ]]; then
    echo "skipped: GPU_CHECK_SKIP" > "$log"
    record "$name" 125 0 "$log" "skipped: GPU_CHECK_SKIP"
    echo "[gpu_check] $name: skipped (GPU_CHECK_SKIP)"
    return 0
  fi
  if (( limit < 10 )); then
    echo "skipped: no time left" > "$log"
    record "$name" 125 0 "$log" "skipped: budget spent"
    echo "[gpu_check] $name: skipped (budget)"
    return 0
  fi
  echo "[gpu_check] $name (limit ${limit}s) ..."
  local s; s=$(date +%s)
  # shell functions run in a child bash (exported below); commands run directly
  if declare -F "$1" > /dev/null; then
    timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" > "$log" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  fi
  local rc=$?
  record "$name" "$rc" $(( $(date +%s) - s )) "$log"
  echo "[gpu_check] $name: rc=$rc ($(( $(date +%s) - s ))s)"
  tail -n 5 "$log" | sed 's/^/    /'
  return 0
}

env_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
for m in ("triton", "ot", "geomloss", "flash_sinkhorn", "numpy"):
    try:
        print(m, getattr(__import__(m), "__version__", "?"))
    except Exception as e:
        print(m, "not importable:", type(e).__name__)
EOF
  command -v nvcc && nvcc --version | tail -n 2
  command -v compute-sanitizer || echo "compute-sanitizer: not found"
}

install_wheels() {
  shopt -s nullglob
  local whls=(.whl/*.whl)
  if (( ${#whls[@]} == 0 )); then echo "no wheels in .whl/"; return 0; fi
  "$PY" -m pip install --no-deps --no-index "${whls[@]}"
}

sanitize() {
  if ! command -v compute-sanitizer > /dev/null; then echo "compute-sanitizer not found"; return 125; fi
  compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" tests/gpu/sanitize_one.py
}

export PY
export -f env_info install_wheels sanitize

stage env 30 env_info
stage wheels 60 install_wheels
stage build 150 "$PY" -m pip install --no-deps --no-build-isolation -e .
stage tests 180 "$PY" -m pytest tests/gpu/test_triton_gpu.py -q -m gpu -p no:cacheprovider -rA
stage cuda_tests 90 "$PY" -m pytest tests/test_cuda.py -q -m gpu -p no:cacheprovider -rA
stage sanitizer 100 sanitize
stage aot 60 "$PY" tests/gpu/aot_compile.py --json "$LOGS/aot.json"
BENCH_LEFT=$(( $(remaining) - 45 ))
(( BENCH_LEFT > 400 )) && BENCH_LEFT=400
stage bench $(( BENCH_LEFT + 30 )) "$PY" bench/test_gpu.py --out "$STEM" \
  --budget "$BENCH_LEFT" --stages "$STAGES"

# final JSON + markdown with every stage (also when the bench itself failed)
"$PY" - "$STEM" "$STAGES" <<'EOF' || echo "[gpu_check] could not write the summary"
import json, sys
from pathlib import Path
stem, stages_file = sys.argv[1], sys.argv[2]
stages = [json.loads(l) for l in Path(stages_file).read_text().splitlines() if l.strip()]
path = Path(stem + ".json")
data = {"machine": {}, "rates": {}, "records": []}
if path.exists():
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        pass
data["stages"] = stages
path.write_text(json.dumps(data, indent=1, default=str))
try:
    from bench.test_gpu import markdown, machine_info
    import torch
    info = data.get("machine") or machine_info(torch.device("cuda"))
    data["machine"] = info
    path.write_text(json.dumps(data, indent=1, default=str))
    Path(stem + ".md").write_text(markdown(data["records"], data.get("rates", {}), info, stages))
except Exception as exc:
    lines = ["# GPU check (summary only: %s)" % exc, "", "| stage | status | seconds |",
             "|---|---|---|"] + ["| %s | %s | %s |" % (s.get("stage"), s.get("status"),
                                                     s.get("seconds")) for s in stages]
    Path(stem + ".md").write_text("\n".join(lines) + "\n")
print("wrote", path, "and", stem + ".md")
EOF

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  cp -r "$STEM.json" "$STEM.md" "$LOGS" "$OUT"/ 2>/dev/null
fi
echo "[gpu_check] done in $(( $(date +%s) - T0 ))s: $STEM.{json,md}"
cat "$STAGES"
