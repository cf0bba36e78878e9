#!/usr/bin/env bash
# What a lent GPU session runs, in one call, writing its report under $OUT (the device tool brings back at most 8
# files). A session has 15 minutes of device time, start-up included; each part fits in about 10:
#   bash tools/gpu_session.sh rl      issue 24: tools/gpu_check.py (tests/test_cuda.py, host syncs, the main job on
#                                     CUDA, a 0.5B Qwen-architecture RL step), under 8 minutes
#   bash tools/gpu_session.sh fp8     issue 25: tests/test_cuda.py, then tools/bench_gpu.py (Llama-3-8B shapes:
#                                     layers, whole steps eager / compiled / CUDA graphs, torch and torchao arms,
#                                     the targets), about 9 minutes
#   bash tools/gpu_session.sh speed   issue 38: tools/bench_speed_plan.py (speed tables and whole steps of plan "speed"
#                                     against BF16, static FP8 and torchao with its auto filter, at h2048, Qwen2.5-0.5B
#                                     and Llama-3-8B shapes; the targets), about 8 minutes
#   bash tools/gpu_session.sh demo    issue 25: the 154M rescue demo (dynamic, healthy FP8, BF16 and unrescued FP8;
#                                     2 seeds): 8 processes side by side on the one GPU (a session of its own)
# Rehearse any part here first:  tools/gpu_session.sh rl --device cpu --quick
#
# The GPU machine has torch, triton, transformers, tokenizers, safetensors, psutil and pytest, but not
# megatron-core or torchao: fetch their wheels here once (cp312, into the git-ignored .whl/):
#   tools/gpu_session.sh --fetch-wheels
# and name .whl in the device call's carry.
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
part=${1:-rl}
shift || true
case "$part" in
  rl)   "$PY" tools/gpu_check.py --out "$OUT" --scratch /tmp/gpu_check_runs "$@" 2>&1 | tee "$OUT/gpu_check.log" ;;
  fp8)  "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
        "$PY" tools/bench_gpu.py --out "$OUT/bench_gpu.json" --run-dir /tmp/bench_gpu_runs "$@" 2>&1 \
          | tee "$OUT/bench_gpu.log" ;;
  speed) "$PY" tools/bench_speed_plan.py --out "$OUT/bench_speed_plan.json" --run-dir /tmp/bench_speed_plan_runs "$@" \
          2>&1 | tee "$OUT/bench_speed_plan.log" ;;
  demo) for seed in 0 1; do   # every (seed, arm) its own process: 8 runs of a 154M model share the GPU
          for arm in dynamic fp8_healthy bf16 fp8; do
            "$PY" tools/outlier_demo.py --config configs/lm_150m_gpu.toml --seeds "$seed" --arms "$arm" \
              --layer decoder.layers.6.mlp.linear_fc2 --start 700 --ramp 50 --out "/tmp/outlier_demo/s$seed-$arm" \
              "$@" > "/tmp/outlier_demo_s$seed-$arm.log" 2>&1 &
          done
        done
        wait
        "$PY" - "$OUT/outlier_demo.json" <<'PYEOF'
import json, pathlib, sys
runs = {p.parent.name: json.loads(p.read_text()) for p in pathlib.Path("/tmp/outlier_demo").glob("*/outlier_demo.json")}
pathlib.Path(sys.argv[1]).write_text(json.dumps(runs, indent=1))
print(f"{len(runs)} demo runs -> {sys.argv[1]}")
PYEOF
        ;;
  *)    echo "usage: tools/gpu_session.sh [rl|fp8|speed|demo] [--device cpu --quick] | --fetch-wheels" >&2; exit 2 ;;
esac
