"""Pipeline parallelism (two or four gloo processes under torchrun): megatron's own schedule, global layer names,
decisions for the whole model on every rank, and exact resume.

The failure these guard against: every stage named its layers ``decoder.layers.0..`` and statistics were reduced
by name over all ranks, so a fault in stage 1's fc1 promoted stage 0's fc1 too (issue 26).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from precisionrt.config import ConfigError, load_config
from precisionrt.observe.events import read_log
from precisionrt.train import LMConfig, train
from test_dynamic import SPIKE, TINY
from test_tensor_parallel import free_port

HERE = Path(__file__).parent
# 4 layers in 2 stages: layers 0-1 on stage 0, 2-3 on stage 1
PP = [*TINY, "model.num_layers=4", "parallel.pipeline_model_parallel_size=2", "train.micro_batches=2", "train.steps=8"]
LAYERS = [f"decoder.layers.{i}.{m}" for i in range(4) for m in
          ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")]


def torchrun(nproc: int, script: str, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(HERE / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]


def run_pp(tmp_path: Path, nproc: int, *overrides: str) -> list[dict]:
    """precisionrt.train under torchrun; what each rank decided."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    torchrun(nproc, "dist_worker.py", str(tmp_path), *PP, f'run.dir="{tmp_path / "run"}"', *overrides)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]


def logged_switches(run: Path) -> list[dict]:
    log = read_log(run / "precision_events.jsonl")
    assert log.skipped_lines == 0
    return [{k: r[k] for k in ("step", "layer", "gemm", "from", "to", "reason")}
            for r in log.records if r["kind"] == "switch"]


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["decoder.layers.2.mlp.linear_fc1", "decoder.layers.1.mlp.linear_fc2"])
def test_a_nonfinite_gradient_in_one_stage_promotes_exactly_that_layer(tmp_path, layer):
    """NaN enters the output gradient of one layer and flows upstream through both stages' gradients; the
    global forward order names the layer where it entered, whichever stage holds it."""
    ranks = run_pp(tmp_path, 2, 'inject.kind="nonfinite"', f'inject.layer="{layer}"', "inject.start_step=2")
    # NaN in the output gradient: the two GEMMs that read it (dgrad, wgrad) move; the forward stays FP8
    expected = [{"step": 3, "layer": layer, "gemm": g, "from": "fp8", "to": "bf16", "reason": "nonfinite"}
                for g in ("dgrad", "wgrad")]
    for r in ranks:
        r.pop("final_train_loss")   # only the last stage computes it; the others receive it
    assert ranks[0] == ranks[1], "the stages disagree"
    assert ranks[0]["skipped_steps"] == [3] and ranks[0]["switches"] == expected
    assert set(ranks[0]["precisions"]) == set(LAYERS), "every rank follows every global layer"
    assert logged_switches(tmp_path / "run") == expected
    start = next(r for r in read_log(tmp_path / "run" / "precision_events.jsonl").records if r["kind"] == "run_start")
    assert [row["name"] for row in start["layers"]] == LAYERS, "the switch log names each global layer once, in order"


@pytest.mark.slow
def test_a_spike_in_stage_1_moves_stage_1_only_also_with_data_parallel_replicas(tmp_path):
    """PP=2 x DP=2 (4 processes): the spike saturates layer 3's fc1 on stage 1; stage 0's layers share its local
    index (``decoder.layers.1``) and must not move."""
    layer = "decoder.layers.3.mlp.linear_fc1"
    ranks = run_pp(tmp_path, 4, *SPIKE, f'inject.layer="{layer}"')
    switches = ranks[0]["switches"]
    assert switches and {s["layer"] for s in switches} == {layer}, switches
    assert all(r["switches"] == switches and r["precisions"] == ranks[0]["precisions"] for r in ranks)
    assert logged_switches(tmp_path / "run") == switches


@pytest.mark.slow
def test_pp2_matches_one_stage_bit_for_bit_and_names_virtual_chunks_globally(tmp_path):
    """The same weights through megatron's 1F1B schedule in two stages and through one: the same losses and
    weights after three static-FP8 AdamW steps, bit for bit. With virtual pipelining each rank holds layers
    {0, 2} or {1, 3} and the runtime names all four in order on both."""
    torchrun(2, "pp_worker.py", str(tmp_path))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"pp_rank{rank}.pt", weights_only=True)
        assert got["pp_losses"] == got["ref_losses"] and len(set(got["ref_losses"])) == 3
        assert got["pp"].keys() == got["ref"].keys() and len(got["pp"]) > 8
        for key in got["pp"]:
            assert torch.equal(got["pp"][key], got["ref"][key]), key
        vpp = torch.load(tmp_path / f"vpp_rank{rank}.pt", weights_only=True)
        assert {n.split(".")[2] for n in vpp["local"]} == {str(rank), str(rank + 2)}
        assert vpp["names"] == LAYERS


@pytest.mark.slow
def test_pp2_resume_is_exact_and_another_layout_is_refused(tmp_path, parallel):
    spike = [*SPIKE, "inject.layer=\"decoder.layers.3.mlp.linear_fc1\"", "train.steps=12"]
    whole = run_pp(tmp_path / "whole", 2, *spike)
    run = tmp_path / "parts" / "run"
    run_pp(tmp_path / "parts", 2, *spike, "train.stop_at_step=6")
    resumed = run_pp(tmp_path / "parts", 2, *spike, "train.resume=true")
    assert whole[0]["switches"], "the spike moved a layer"
    for w, r in zip(whole, resumed):
        assert w == r, "a resumed pipeline run reproduces the uninterrupted one"
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == [
        "step_000006.pp0.pt", "step_000006.pp1.pt", "step_000012.pp0.pt", "step_000012.pp1.pt"]
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size 2.*pipeline_model_parallel_size 1"):
        train(load_config(LMConfig, None, [*TINY, "model.num_layers=4", *spike, f'run.dir="{run}"',
                                           "train.resume=true", "train.steps=14"]))
