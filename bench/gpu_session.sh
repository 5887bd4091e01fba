#!/usr/bin/env bash
# The one script a GPU device call runs: it installs the carried wheels (bench/gpu_wheels.sh) into
# $FMNIST_GPU_WORK/site and the project itself (no dependencies) on PYTHONPATH, unpacks the
# carried data, then runs the tracked commands under MLflow into a fresh SQLite store
# ($FMNIST_GPU_WORK/store): `fmnist cnn --recipe R --device cuda` for each recipe and seed, and
# `mlflow run . --env-manager local -e main -P device=cuda`, printing each command's wall time.
# Every step runs under `timeout`, capped so the whole stays inside $FMNIST_GPU_BUDGET seconds
# (one device call may last 600); a failed step is logged and the next one runs. Whatever
# happened, it packs the store into $OUT/store.tgz (bench/gpu_store.py pack: no checkpoints,
# weights only of the model versions that carry an alias; 15 MiB parts store.tgz.00, .01, ...
# when larger, since a device call brings back files of 16 MiB at most) and leaves
# $OUT/session.log, $OUT/env.json and $OUT/summary.json (time to accuracy per run: recipe, seed,
# epochs, training seconds, test accuracy, with the GPU's name and torch version).
# `python bench/gpu_store.py unpack` restores the store on another machine.
#
#   FMNIST_GPU_STEPS=env,cnn,summary bench/gpu_session.sh        # in the device call, see README
#
# Settings (environment): FMNIST_GPU_STEPS (env,cnn,main,search,summary; default env,cnn,
# summary), FMNIST_GPU_RECIPES (best), FMNIST_GPU_SEEDS ("42 1 2"), FMNIST_GPU_EPOCHS (auto),
# FMNIST_GPU_QUICK (false: main's quick parameter), FMNIST_GPU_SEARCH_TIMEOUT (200),
# FMNIST_GPU_SESSION_DEVICE (cuda; cpu for a rehearsal), FMNIST_GPU_BUDGET (540 s),
# FMNIST_GPU_WORK (/tmp/fmnist-gpu), FMNIST_GPU_DATA (a data folder instead of the carried
# .gpu/fmnist-data.tgz), FMNIST_GPU_SKIP_INSTALL (1: use the mlflow already importable),
# PYTHON (python3), OUT (the device call's output folder; default .gpu/out).
set -u -o pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/.gpu/out}
STEPS=${FMNIST_GPU_STEPS:-env,cnn,summary}
RECIPES=${FMNIST_GPU_RECIPES:-best}
SEEDS=${FMNIST_GPU_SEEDS:-42 1 2}
EPOCHS=${FMNIST_GPU_EPOCHS:-auto}
QUICK=${FMNIST_GPU_QUICK:-false}
SEARCH_TIMEOUT=${FMNIST_GPU_SEARCH_TIMEOUT:-200}
DEVICE=${FMNIST_GPU_SESSION_DEVICE:-cuda}
BUDGET=${FMNIST_GPU_BUDGET:-540}
WORK=${FMNIST_GPU_WORK:-/tmp/fmnist-gpu}
PYTHON=${PYTHON:-python3}
SITE=$WORK/site
STORE=$WORK/store
PACK_RESERVE=30 # seconds kept for packing the store
FAILED=()

stamp() { printf '[%s %4ds] %s\n' "$(date +%H:%M:%S)" "$SECONDS" "$*"; }

# Run "$@" under a timeout capped by what is left of the budget; log its wall time and status.
timed() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - PACK_RESERVE - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    stamp "SKIP $name: the budget is spent"
    FAILED+=("$name:skipped")
    return 1
  fi
  stamp "START $name (timeout ${limit}s): $*"
  local started=$SECONDS status
  timeout --signal=TERM --kill-after=15 "$limit" "$@"
  status=$?
  stamp "END $name: exit $status after $((SECONDS - started)) s"
  ((status == 0)) || FAILED+=("$name:$status")
  return "$status"
}

install() {
  if [[ ${FMNIST_GPU_SKIP_INSTALL:-0} == 1 ]] && "$PYTHON" -c 'import mlflow, optuna' 2>/dev/null; then
    stamp "install: skipped, mlflow and optuna are importable"
  elif [[ -f $SITE/.done ]]; then
    stamp "install: $SITE is there from an earlier call"
  else
    # one pip call: the wheels overlap (mlflow-skinny holds mlflow-tracing's files) and must
    # land together; --no-deps because the image's packages stay as they are
    timed install 180 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target "$SITE" "$REPO"/.whl/*.whl && touch "$SITE/.done"
  fi
  # The project itself, without dependencies: its source on PYTHONPATH and an `fmnist` launcher
  # on PATH (`mlflow run` starts the entry point's command through `bash -c`).
  mkdir -p "$SITE/bin"
  printf '#!/bin/sh\nexec "%s" -m fmnist "$@"\n' "$(command -v "$PYTHON")" >"$SITE/bin/fmnist"
  chmod +x "$SITE/bin/fmnist"
  export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$SITE/bin:$PATH"
}

unpack_data() {
  if [[ -n ${FMNIST_GPU_DATA:-} ]]; then
    DATA=$FMNIST_GPU_DATA
  else
    DATA=$WORK/data
    [[ -f $DATA/FashionMNIST/raw/train-images-idx3-ubyte ]] ||
      { mkdir -p "$DATA" && tar xzf "$REPO/.gpu/fmnist-data.tgz" -C "$DATA"; }
  fi
  export FMNIST_DATA_DIR=$DATA FMNIST_OFFLINE=1
  stamp "data: $DATA"
}

step_env() {
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi: none"
  "$PYTHON" - "$OUT/env.json" <<'EOF'
import json, platform, sys
import torch
cuda = torch.cuda.is_available()
info = {
    "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "python": platform.python_version(),
    "cpu_count": __import__("os").cpu_count(),
}
for name in ("mlflow", "optuna", "numpy", "sqlalchemy", "pydantic", "typing_extensions"):
    try:
        info[name] = getattr(__import__(name), "__version__", "?")
    except Exception as exc:  # noqa: BLE001 - a broken import is the finding
        info[name] = f"import failed: {exc!r}"
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
EOF
  "$PYTHON" -m pip check 2>&1 | grep -iE "mlflow|optuna|alembic|sqlalchemy|pydantic|fastapi|opentelemetry" ||
    echo "pip check: nothing about the carried packages"
}

step_cnn() {
  local recipe seed status=0
  for recipe in $RECIPES; do
    for seed in $SEEDS; do
      timed "cnn-$recipe-$seed" 240 fmnist cnn --recipe "$recipe" --seed "$seed" \
        --epochs "$EPOCHS" --device "$DEVICE" --quiet || status=1
    done
  done
  return "$status"
}

step_main() {
  timed main 420 mlflow run "$REPO" --env-manager local -e main --experiment-name fashion-mnist \
    -P device="$DEVICE" -P quick="$QUICK" -P data_dir="$DATA"
}

step_search() {
  timed cnn-search $((SEARCH_TIMEOUT + 150)) fmnist cnn-search --search-space cnn_search_gpu \
    --device "$DEVICE" --epochs 15 --timeout "$SEARCH_TIMEOUT" --n-trials 0 --quiet
}

step_summary() {
  timed summary 60 "$PYTHON" "$REPO/bench/gpu_store.py" table --store "$STORE" \
    --env "$OUT/env.json" --json "$OUT/summary.json"
}

pack() {
  [[ -d $STORE ]] || { stamp "pack: no store"; return; }
  "$PYTHON" "$REPO/bench/gpu_store.py" pack --store "$STORE" --out "$OUT" ||
    FAILED+=("pack:$?")
}

session() {
  stamp "steps $STEPS on $DEVICE; recipes $RECIPES; seeds $SEEDS; epochs $EPOCHS"
  mkdir -p "$WORK"
  install
  unpack_data
  # A fresh store; the commands run inside it so the artifacts land beside the database.
  rm -rf "$STORE" && mkdir -p "$STORE" && echo "$STORE" >"$STORE/ROOT"
  export MLFLOW_TRACKING_URI="sqlite:///$STORE/mlflow.db" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
  export GIT_PYTHON_REFRESH=quiet MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
  cd "$STORE" || return
  local step
  for step in ${STEPS//,/ }; do
    if declare -F "step_$step" >/dev/null; then
      "step_$step" || stamp "step $step failed"
    else
      stamp "unknown step $step (known: env cnn main search summary)"
      FAILED+=("$step:unknown")
    fi
  done
  pack
  stamp "done; failed: ${FAILED[*]:-none}"
  ((${#FAILED[@]} == 0))
}

mkdir -p "$OUT"
session 2>&1 | tee "$OUT/session.log"
