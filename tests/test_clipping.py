"""Gradient clipping under tensor parallelism, in the README's own loop at TP=2 (two gloo ranks under torchrun):
with ``precisionrt.clip_grad_norm_`` the parameters every TP rank holds stay bit-equal after 20 steps; with
``torch.nn.utils.clip_grad_norm_`` (the per-rank norm) they drift apart, which shows the test can fail."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_tensor_parallel import free_port

HERE = Path(__file__).parent


@pytest.mark.slow
def test_replicated_parameters_stay_bit_equal_across_tp_ranks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(HERE / "tp_clip_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "clip.pt", weights_only=True)
    (ours_drift, ours_norms), (plain_drift, plain_norms) = rank0["ours"], rank0["plain"]
    assert ours_drift == 0.0, "replicated parameters differ across TP ranks"
    assert rank1["ours"][1] == ours_norms, "both ranks clip by the same norm, the whole model's"
    assert plain_drift > 1e-6, "the per-rank clip must make them drift (else this test could not fail)"
    assert rank1["plain"][1][0] != plain_norms[0], "each rank alone sees a different norm"
    assert all(p < o for p, o in zip(plain_norms, ours_norms)), "a shard's norm is below the model's"


def test_one_rank_clips_bit_for_bit_as_torch(parallel, small_model, tokens):
    """On a single rank (no model parallelism) the operations are torch's own."""
    from precisionrt import clip_grad_norm_
    from precisionrt.train import lm_loss

    lm_loss(small_model, tokens).backward()
    grads = [p.grad.clone() for p in small_model.parameters()]
    ours = clip_grad_norm_(small_model, 0.5)
    clipped = [p.grad.clone() for p in small_model.parameters()]
    for p, g in zip(small_model.parameters(), grads):
        p.grad.copy_(g)
    theirs = torch.nn.utils.clip_grad_norm_(small_model.parameters(), 0.5)
    assert torch.equal(ours, theirs) and ours > 0.5
    assert all(torch.equal(a, p.grad) for a, p in zip(clipped, small_model.parameters()))
