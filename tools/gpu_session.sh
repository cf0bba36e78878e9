#!/usr/bin/env bash
# Everything a lent GPU session runs, in one call, writing its report under $OUT (the device tool brings back
# at most 8 files). Rehearse it here with: tools/gpu_session.sh --device cpu --quick
#
# The GPU machine has torch, triton, transformers, tokenizers, safetensors, psutil and pytest, but not
# megatron-core or torchao: fetch their wheels here once (cp312, into the git-ignored .whl/):
#   tools/gpu_session.sh --fetch-wheels
# and name .whl in the device call's carry. The call's command is then just:  bash tools/gpu_session.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  grep -qs '^/.whl/$' .git/info/exclude || { mkdir -p .git/info; echo /.whl/ >> .git/info/exclude; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl megatron-core==0.16.1 torchao==0.16.0
  ls -l .whl
  exit 0
fi

OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
if [[ -x .venv/bin/python ]]; then   # a rehearsal here, in the project's own environment
  PY=.venv/bin/python
else                                 # the GPU machine: its python3, plus the carried wheels
  PY=python3
  if ! $PY -c "import megatron.core" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
  fi
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
# issue 24: the RL loop on the GPU (under 8 minutes)
"$PY" tools/gpu_check.py --out "$OUT" --scratch /tmp/gpu_check_runs "$@" 2>&1 | tee "$OUT/gpu_check.log"
