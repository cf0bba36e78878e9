"""Two gloo processes where only rank 1 sees a fault: both ranks make the same switches at the same steps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from precisionrt.observe.events import read_log
from test_tensor_parallel import free_port

HERE = Path(__file__).parent
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.seq_length=32",
        "train.batch_size=4", "train.steps=8", "train.log_every=4", "train.eval_every=8", "train.eval_batches=1",
        "train.warmup_steps=2", "data.max_bytes=100000", 'precision.mode="dynamic"',
        "precision.monitor.check_interval=2", "precision.policy.cooldown_checks=100"]


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2], ids=["dp2", "tp2"])
def test_fault_on_one_rank_switches_both(tmp_path, tp):
    layer = "decoder.layers.1.mlp.linear_fc2"
    overrides = [*TINY, f'run.dir="{tmp_path / "run"}"', f"parallel.tensor_model_parallel_size={tp}",
                 'inject.kind="nonfinite"', f'inject.layer="{layer}"', "inject.start_step=2", "inject.ranks=[1]"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(HERE / "dist_worker.py"), str(tmp_path), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    if tp == 1:  # data parallel: each rank trains on its own batches, so only the losses may differ
        r0.pop("final_train_loss"), r1.pop("final_train_loss")
    assert r0 == r1, "ranks disagree"
    assert r0["skipped_steps"] == [3]
    # NaN in the output gradient: the two GEMMs that read it (dgrad, wgrad) move; the forward stays FP8
    assert r0["switches"] == [{"step": 3, "layer": layer, "gemm": g, "from": "fp8", "to": "bf16", "reason": "nonfinite"}
                              for g in ("dgrad", "wgrad")]
    assert r0["precisions"][layer] == "mixed"
    log = read_log(tmp_path / "run" / "precision_events.jsonl")
    logged = [{k: r[k] for k in ("step", "layer", "gemm", "from", "to", "reason")}
              for r in log.records if r["kind"] == "switch"]
    assert logged == r0["switches"] and log.skipped_lines == 0
