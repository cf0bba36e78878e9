"""The operator control file as hostile input: every bad file is rejected with its problem named, the run
never crashes, blocks or reads without bound, and a good file still works afterwards."""

import json
import os
import threading

import pytest

from precisionrt.observe.events import GEMMS
from precisionrt.runtime.control import MAX_BYTES, ControlFile

NAMES = ["decoder.layers.0.mlp.linear_fc1", "decoder.layers.0.mlp.linear_fc2", "decoder.layers.1.mlp.linear_fc1"]


def reader(tmp_path):
    rejected: list[str] = []
    return ControlFile(tmp_path / "precision_control.json", NAMES, rejected.append), rejected


def read_in_time(cf: ControlFile) -> dict:
    """Read on a thread with a deadline: a read that blocks (a FIFO) fails the test instead of hanging it."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(result=cf.read()), daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "reading the control file blocked"
    return out["result"]


HOSTILE = {
    "list_action": lambda p: p.write_text(json.dumps({NAMES[0]: ["bf16"]})),
    "dict_action": lambda p: p.write_text(json.dumps({NAMES[0]: {"x": 1}})),
    "deep_nesting": lambda p: p.write_text("[" * 100_000 + "]" * 100_000),
    "not_an_object": lambda p: p.write_text("[1, 2, 3]"),
    "torn_write": lambda p: p.write_text('{"decoder.layers.0.mlp.linear_fc1": "bf'),
    "binary": lambda p: p.write_bytes(bytes(range(256)) * 4),
    "directory": lambda p: p.mkdir(),
    "fifo": lambda p: os.mkfifo(p),
    "symlink_loop": lambda p: os.symlink(p, p),
    "dev_zero": lambda p: os.symlink("/dev/zero", p),
    "too_large": lambda p: p.write_text(json.dumps({"x" * (MAX_BYTES + 10): "bf16"})),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_control_file_is_rejected_not_fatal(tmp_path, kind):
    cf, rejected = reader(tmp_path)
    HOSTILE[kind](cf.path)
    assert read_in_time(cf) == {}
    assert len(rejected) == 1 and "precision_control.json" in rejected[0], rejected
    assert read_in_time(cf) == {} and len(rejected) == 1, "an unchanged bad file is not reported again"
    # replaced atomically by a good one: it takes effect
    if cf.path.is_dir() and not cf.path.is_symlink():
        cf.path.rmdir()
    else:
        cf.path.unlink()
    tmp = cf.path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"decoder.layers.0.*": "bf16"}))
    os.replace(tmp, cf.path)
    assert read_in_time(cf) == {(n, g): "bf16" for n in NAMES[:2] for g in GEMMS}


def test_an_entry_may_name_one_gemm_and_a_bad_gemm_is_refused_by_name(tmp_path):
    cf, rejected = reader(tmp_path)
    cf.path.write_text(json.dumps({"decoder.layers.0.*:wgrad": "bf16", NAMES[2] + ":fprop": "auto",
                                   NAMES[2] + ":backward": "bf16"}))
    assert read_in_time(cf) == {(NAMES[0], "wgrad"): "bf16", (NAMES[1], "wgrad"): "bf16", (NAMES[2], "fprop"): "auto"}
    assert len(rejected) == 1 and "'backward' is not a GEMM" in rejected[0], rejected
