"""A Megatron user's own loop (tests/mcore_client_worker.py, shaped like megatron-core's
run_simple_mcore_train_loop.py) at TP=2 and at PP=2 on gloo: megatron's schedule, dist_checkpointing of the
model and the runtime together, an exact resume in the same layout and a resharded one on a single rank."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_tensor_parallel import free_port

HERE = Path(__file__).parent
FIRST, SECOND = "decoder.layers.1.mlp.linear_fc1", "decoder.layers.0.mlp.linear_fc1"


def client(out: Path, nproc: int, tp: int, pp: int, phase: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(HERE / "mcore_client_worker.py"), str(out), str(tp), str(pp), phase]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"{phase}_tp{tp}_pp{pp}_rank{r}.pt", weights_only=True) for r in range(nproc)]


def switches_of(record: dict) -> list[tuple]:
    return [(s["step"], s["layer"], s["gemm"], s["to"]) for s in record["switches"]]


def promoted(step: int, layer: str) -> list[tuple]:
    """A spike into a layer's input: the two GEMMs that read the input (fprop, wgrad) move to BF16."""
    return [(step, layer, "fprop", "bf16"), (step, layer, "wgrad", "bf16")]


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_dist_checkpoint_resumes_exactly_and_reshards_to_one_rank(tmp_path, tp, pp):
    first = client(tmp_path, 2, tp, pp, "first")
    last = -1   # the rank of the last stage, whose losses are the loss
    assert switches_of(first[last]) == promoted(3, FIRST) + promoted(6, SECOND)

    # the same layout: losses bit for bit, and the spike the saved check window held promotes at step 6
    resumed = client(tmp_path, 2, tp, pp, "resume")
    for a, b in zip(first, resumed):
        assert b["losses"] == a["losses"][4:]
        assert switches_of(b) == promoted(6, SECOND), "the open check window came back with the checkpoint"
        assert b["precisions"] == a["precisions"]

    # one rank: every layer's precision and scaling state by global name; the check window restarts
    (single,) = client(tmp_path, 1, 1, 1, "resume")
    assert single["loaded_precisions"] == resumed[0]["loaded_precisions"]
    assert single["loaded_gemms"][FIRST] == {"fprop": "bf16", "dgrad": "fp8", "wgrad": "bf16"}
    assert single["loaded_precisions"][FIRST] == "mixed" and single["loaded_precisions"][SECOND] == "fp8"
    assert set(single["loaded_scaling"]) == set(single["loaded_precisions"])
    for name, state in single["loaded_scaling"].items():
        holder = next(r for r in resumed if name in r["loaded_scaling"])   # TP rank 0's under TP: the same
        for role, s in state.items():
            assert torch.equal(s["amax_history"], holder["loaded_scaling"][name][role]["amax_history"]), name
    assert switches_of(single) == [], "a resharded load drops the statistics since the last check"
    # steps 5-6 run at the same precisions as the uninterrupted run: two stages compute as one, bit for bit;
    # TP shards quantize with their own scales. Steps 7-8 keep layer 0's fc1 in FP8 (no switch at 6): close.
    tol = 0 if tp == 1 else 2e-3
    for a, b in zip(single["losses"][:2], first[last]["losses"][4:6]):
        assert abs(a - b) <= tol * abs(b)
    for a, b in zip(single["losses"][2:], first[last]["losses"][6:]):
        assert abs(a - b) <= 2e-3 * abs(b)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_megatron_ddp_and_optimizer_train_the_managed_layers(tmp_path, tp, pp):
    """megatron's DistributedDataParallel moves the gradients into its buffers and its optimizer steps from
    them: every managed weight moves, both ranks see one gradient norm, and the runtime still promotes the
    spiked layers at their checks."""
    ranks = client(tmp_path, 2, tp, pp, "ddp")
    for r in ranks:
        assert r["managed_weights_moved"] == r["managed"] and r["managed"]
        assert switches_of(r) == promoted(3, FIRST) + promoted(6, SECOND)
    assert ranks[0]["grad_norms"] == ranks[1]["grad_norms"] and all(n > 0 for n in ranks[0]["grad_norms"])
