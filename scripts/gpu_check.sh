#!/usr/bin/env bash
# GPU check of the GPU backends, for the device machine (one H200 lent for ~15 minutes, of which
# starting it takes 1-2: this check must fit twice, so that it can run, be fixed, and run again).
#
#   bash scripts/gpu_check.sh            # from the repository root; at most 300 s in all
#
# The device machine brings its own python3 with a CUDA torch, triton and nvcc. Everything
# else travels as wheels in .whl/ at the repository root (an ignored folder: the run tool
# carries it when it is named in `carry`; it is at most 64 MiB in all). The wheels it needs
# beside the machine's own packages, all pure Python (install with --no-deps, no index):
#
#   POT            pot-0.9.7.post1-*.whl        (bench peer: ot.batch.solve_batch; POT's wheel
#                                               is platform-specific: cp3XX manylinux x86_64)
#   GeomLoss       geomloss-0.3.1-py3-none-any.whl   (bench peer, tensorized backend)
#   FlashSinkhorn  flash_sinkhorn-0.4.1-py3-none-any.whl (bench peer on the GPU)
#   pytest-benchmark is not needed (bench/test_gpu.py times with CUDA events itself).
#
# Bring them once on this side, for the device's python version (check it with the env stage,
# e.g. 3.12), then carry .whl/:
#
#   mkdir -p .whl && python3 -m pip download --no-deps --dest .whl \
#       --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all: \
#       "pot==0.9.7.post1" "geomloss==0.3.1" "flash-sinkhorn==0.4.1"
#
# Stages (each time-boxed; a failure is recorded and the next stage runs). Limits add up to the
# 300 s budget (GPU_CHECK_BUDGET): env 15, wheels 20, build 80 (only sm_90 and one CPU
# variant are compiled: OPTICAL_KERNELS_CUDA_ARCHS=90, OPTICAL_KERNELS_CPU_VARIANTS=base), tests
# 60, cuda_tests 35, sanitizer 25, aot 15, bench the rest (S2 and S4 only; S3 runs on the CPU):
#   env        GPU, driver, versions
#   wheels     pip install --no-deps .whl/*.whl (POT, GeomLoss, FlashSinkhorn, ... if carried)
#   build      pip install --no-deps --no-build-isolation -e .   (PYTHONPATH=. fallback)
#   tests      pytest tests/gpu/test_triton_gpu.py (real sizes vs the torch reference, gradcheck,
#              no host sync, torch.compile)
#   cuda_tests pytest -m gpu tests/test_cuda.py (the CUDA C++ backend vs the torch reference on
#              CUDA tensors, side streams, CUDA-graph capture; needs the build stage's _cuda)
#   sanitizer  compute-sanitizer memcheck on one small forward+backward (tests/gpu/sanitize_one.py)
#   aot        register / spill report of the compiled kernels (tests/gpu/aot_compile.py)
#   bench      bench/test_gpu.py --only S2,S4: ours vs torch, POT solve_batch, GeomLoss,
#              FlashSinkhorn where installed
# Output: bench/results/<date>-<gpu>-gpu-check.{json,md} (measurements + stage statuses), logs
# in bench/results/<date>-<gpu>-gpu-check-logs/; all copied to $OUT when it is set.
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET (total seconds, default 300),
# GPU_CHECK_SKIP (comma-separated stages to skip), GPU_CHECK_STEM (output path stem),
# GPU_CHECK_SHAPES (bench shapes, default S2,S4).

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-300}
SHAPES=${GPU_CHECK_SHAPES:-S2,S4}
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
# build only what the H200 runs: sm_90 SASS (+ its PTX), one CPU variant (the CPU backend is
# not what this check measures); MAX_JOBS: every core for nvcc / g++
export OPTICAL_KERNELS_CUDA_ARCHS=${OPTICAL_KERNELS_CUDA_ARCHS:-90}
export OPTICAL_KERNELS_CPU_VARIANTS=${OPTICAL_KERNELS_CPU_VARIANTS:-base}
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

stage env 15 env_info
stage wheels 20 install_wheels
stage build 80 "$PY" -m pip install --no-deps --no-build-isolation -e .
stage tests 60 "$PY" -m pytest tests/gpu/test_triton_gpu.py -q -x -m gpu -p no:cacheprovider -rA
stage cuda_tests 35 "$PY" -m pytest tests/test_cuda.py -q -x -m gpu -p no:cacheprovider -rA
stage sanitizer 25 sanitize
stage aot 15 "$PY" tests/gpu/aot_compile.py --json "$LOGS/aot.json"
BENCH_LEFT=$(( $(remaining) - 40 ))
(( BENCH_LEFT > 150 )) && BENCH_LEFT=150
stage bench $(( BENCH_LEFT + 20 )) "$PY" bench/test_gpu.py --out "$STEM" --only "$SHAPES" \
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
