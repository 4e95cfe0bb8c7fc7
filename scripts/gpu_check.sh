#!/usr/bin/env bash
# One command for a lent GPU machine: every config a few steps on CUDA in bf16-mixed, the token-dropout
# step-time benchmark (part a) and the early-exit inference timing, into one JSON (scripts/gpu_check.py).
#   bash scripts/gpu_check.sh [--out FILE] [--steps N] [--configs a,b]     # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run                                    # anywhere: the CPU, smallest sizes
# Installs nothing it does not find: no network. A Python package that is missing is installed only from
# a wheel carried in .whl/ (see the device README); else the check stops and names what to carry.
# stacktrain itself is installed from this checkout (no dependencies, no build isolation) when the
# interpreter cannot import it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
SITE="${GPU_CHECK_SITE:-/tmp/stacktrain-gpu-check-site}"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# import name -> the distribution to carry as a wheel
declare -A NEEDED=(
  [lightning]=lightning [timm]=timm [torchmetrics]=torchmetrics [torchvision]=torchvision [sklearn]=scikit-learn
  [open_clip]=open_clip_torch [webdataset]=webdataset [wandb]=wandb [jsonargparse]=jsonargparse
  [torch_pruning]=torch-pruning [torchdata]=torchdata [matplotlib]=matplotlib [rich]=rich [yaml]=pyyaml
)
# one interpreter tries every import and prints the names that fail
read -r -a missing <<< "$("$PYTHON" - "${!NEEDED[@]}" <<'PY'
import importlib, sys
print(" ".join(name for name in sys.argv[1:] if importlib.util.find_spec(name) is None))
PY
)"
if [ "${#missing[@]}" -gt 0 ]; then
  shopt -s nullglob
  wheels=(.whl/*.whl)
  if [ "${#wheels[@]}" -eq 0 ]; then
    echo "gpu_check: missing ${missing[*]} and no wheels in .whl/: carry $(for m in "${missing[@]}"; do printf '%s ' "${NEEDED[$m]}"; done)(and their missing dependencies)" >&2
    exit 2
  fi
  echo "gpu_check: installing the ${#wheels[@]} carried wheels for: ${missing[*]}"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
  for module in "${missing[@]}"; do
    "$PYTHON" -c "import $module" || { echo "gpu_check: $module still does not import" >&2; exit 2; }
  done
fi
if ! "$PYTHON" -c "import stacktrain.callbacks" 2>/dev/null; then
  echo "gpu_check: installing stacktrain from this checkout into $SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" .
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
