"""W&B offline: a real short run, read back from its files and its .wandb record log."""

import json
import struct
from pathlib import Path

import pytest

from precisionrt.config import load_config
from precisionrt.train import LMConfig, train
from test_dynamic import SPIKE, TINY

ROOT = Path(__file__).parent.parent
LAYER = "decoder.layers.1.mlp.linear_fc1"


def wandb_records(path: Path):
    """The .wandb file: a 7-byte header, then LevelDB-log records (32 KiB blocks, 7-byte record headers)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                      # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
        else:
            pos += left - 7 - length      # zero padding to the end of the block


def history_keys(run_file: Path) -> set:
    from wandb.proto import wandb_internal_pb2

    keys = set()
    for raw in wandb_records(run_file):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            keys.update(item.key or "/".join(item.nested_key) for item in rec.history.item)
    return keys


@pytest.fixture
def clean_wandb_env(monkeypatch):
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)


def test_offline_run_has_switch_table_and_layer_panels(tmp_path, parallel, clean_wandb_env):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    train(load_config(LMConfig, ROOT / "configs/lm_tiny_cpu.toml",
                      [*TINY, *SPIKE, "train.steps=14", "wandb.enabled=true", "wandb.timeline_every=2",
                       f'run.dir="{run}"']))
    (offline,) = (run / "wandb").glob("offline-run-*")
    tables = sorted((offline / "files/media/table/precision").glob("switches_*.table.json"))
    rows = [row for t in tables for row in json.loads(t.read_text())["data"]]
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [(6, LAYER, "fp8", "bf16", "overflow"),
                                                             (10, LAYER, "bf16", "fp8", "probation")]
    assert json.loads(tables[0].read_text())["columns"][:5] == ["step", "layer", "from", "to", "reason"]
    assert list((offline / "files/media/images/precision").glob("timeline_*.png"))
    long = next((offline / "files/media/table/precision").glob("layer_steps_*.table.json"))
    assert json.loads(long.read_text())["columns"] == ["step", "layer", "precision", "is_fp8"]
    keys = history_keys(next(offline.glob("run-*.wandb")))
    assert {"step", "train/loss", "precision/fp8_flop_fraction", f"precision/{LAYER}/headroom",
            f"precision/{LAYER}/is_fp8"} <= keys


def test_wandb_failure_is_reported_once_and_training_goes_on(tmp_path, parallel, clean_wandb_env, monkeypatch,
                                                             capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "no-such-mode")
    summary = train(load_config(LMConfig, ROOT / "configs/lm_tiny_cpu.toml",
                                [*TINY, "train.steps=4", "wandb.enabled=true", f'run.dir="{tmp_path / "r"}"']))
    err = capsys.readouterr().err
    assert err.count("W&B logging failed") == 1 and summary["steps"] == 4
    assert (tmp_path / "r" / "metrics.jsonl").read_text().count('"step"') >= 1
