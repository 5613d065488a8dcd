#!/usr/bin/env bash
# The GPU benchmark in one command (issue 11), from the repository root:
#
#   bash bench/gpu_bench.sh [--quick] [options of python -m bench.gpu_bench]
#
# Installs the carried wheelhouse ($GPU_WHEELS, default .gpu-wheels, made by
# `make bench-gpu-pack`) into a temporary --target folder and puts it first on PYTHONPATH,
# checks that every requirement is met by what is importable (the machine's own jax,
# numpy, pillow included), then runs `python -m bench.gpu_bench`: results in $OUT
# (default ./gpu-out). Without a wheelhouse it runs on what already imports (this checkout's
# .venv; NO_INSTALL=1 does the same with one). BLOCK_TENSORFLOW=1 makes `import tensorflow`
# fail, as on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
SITE=${GPU_SITE:-${TMPDIR:-/tmp}/imgcls-gpu-site}
export OUT=${OUT:-$PWD/gpu-out}
export KERAS_BACKEND=jax MLFLOW_DISABLE_TELEMETRY=true BENTOML_DO_NOT_TRACK=true DO_NOT_TRACK=true
mkdir -p "$OUT"
LOG="$OUT/gpu_bench.log"
: > "$LOG"
exec 3>&1 4>&2 > >(tee -a "$LOG") 2>&1   # the install steps go into the one log too
started=$(date +%s)

if [ "${NO_INSTALL:-0}" != 1 ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  rm -rf "$SITE" && mkdir -p "$SITE"
  echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
  # --no-deps: --target ignores what is installed, so the machine's jax and numpy would
  # otherwise be asked for; the check below proves every requirement is met instead.
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl \
    || "$PY" -m bench.gpu_pack --unpack "$WHEELS" --into "$SITE"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -m bench.gpu_pack --check-installed "$SITE"
  echo "installed in $(( $(date +%s) - started )) s"
elif ! "$PY" -c "import keras, bentoml" 2>/dev/null; then
  echo "no wheelhouse at $WHEELS and keras/bentoml do not import: run make bench-gpu-pack first" >&2
  exit 2
fi
if [ "${BLOCK_TENSORFLOW:-0}" = 1 ]; then
  mkdir -p "$SITE.no-tf/tensorflow"
  echo 'raise ImportError("tensorflow is blocked (BLOCK_TENSORFLOW=1): the GPU machine has none")' \
    > "$SITE.no-tf/tensorflow/__init__.py"
  export PYTHONPATH="$SITE.no-tf${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import keras, bentoml; print('keras', keras.__version__, 'from', keras.__file__); print('bentoml', bentoml.__version__, 'from', bentoml.__file__)"
# bench.gpu_bench writes its own lines to the log: give it the terminal back.
exec "$PY" -m bench.gpu_bench "$@" 1>&3 2>&4
