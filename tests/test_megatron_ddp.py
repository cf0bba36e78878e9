"""Megatron's DistributedDataParallel and optimizer around a converted model (tests/mcore_ddp_worker.py), on one
process and at DP=2 (gloo): ``clip_grad_norm_`` reads the gradients where DDP keeps them (``main_grad``; with the
distributed optimizer, each rank's reduced shard) and gives megatron's own norm; a NaN that enters on one rank is
a skipped step on every rank, megatron's update included, and the layer where it entered is promoted.

What it caught (issue 37): with the ``clip_grad_norm_`` of before (``.grad`` only) every norm is 0.0 under DDP
("precisionrt saw no gradient [0.0, 0.0, 0.0, 0.0]", shown by running this file with that clipping.py), so the NaN
step was neither in the norm nor skipped."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_tensor_parallel import free_port

HERE = Path(__file__).parent
NAN_LAYER = "decoder.layers.1.mlp.linear_fc2"


def ddp_run(out: Path, nproc: int, *configs: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(HERE / "mcore_ddp_worker.py"), str(out), *configs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"ddp_world{nproc}_rank{r}.pt", weights_only=True) for r in range(nproc)]


def check(ranks: list[dict]) -> None:
    for record in ranks:
        for config, r in record.items():
            finite = [i for i in range(len(r["ours"])) if i != 2]
            assert all(r["ours"][i] > 0.5 for i in finite), f"{config}: precisionrt saw no gradient {r['ours']}"
            for i in finite:   # the same gradients as megatron's optimizer counts them, then clipped to 0.5
                assert r["ours"][i] == pytest.approx(r["megatron"][i], rel=1e-5), config
                assert r["after_clip"][i] == pytest.approx(0.5, rel=1e-5), config
            assert r["ours"][2] != r["ours"][2], f"{config}: the NaN of step 3 is not in the norm"
            assert r["skipped"] == [False, False, True, False], config
            assert {(s[0], s[1], s[4]) for s in r["switches"]} == {(3, NAN_LAYER, "nonfinite")}, config
            assert r["finite"] and r["replicas_equal"], f"{config}: megatron's optimizer applied the NaN step"
            if "distopt=True" in config:
                assert "pass the DistributedDataParallel wrapper" in r["inner_error"]
            else:
                assert r["inner_error"] is None
        names = {tuple(r["names"]) for r in record.values()}
        assert len(names) == 1 and not next(iter(names))[0].startswith("module."), names
    for config in ranks[0]:
        assert len({tuple(r[config]["ours"][:2]) for r in ranks}) == 1, f"{config}: the ranks clip by one norm"


@pytest.mark.slow
def test_megatron_ddp_one_process(tmp_path):
    check(ddp_run(tmp_path, 1, "plain", "overlap+distopt"))


@pytest.mark.slow
def test_megatron_ddp_two_data_parallel_ranks(tmp_path):
    """The NaN enters on rank 1 only: both ranks skip (the norm is reduced), megatron's optimizer steps on neither."""
    check(ddp_run(tmp_path, 2, "plain", "overlap", "distopt", "overlap+distopt"))
