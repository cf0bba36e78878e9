"""W&B offline: a real short run, read back from its files and its .wandb record log."""

import json
import struct
import time
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
        if pos + 7 + length > len(data):   # a record still being written
            return
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


def history_keys(run_file: Path, timeout: float = 60.0) -> set:
    """The history keys of a finished run's .wandb file. wandb-core may still be writing the file when
    ``run.finish()`` has returned (seen about once in eight runs on a loaded machine: a file without its
    history records), so the file is read until its closing ``exit`` record is there."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout
    while True:
        records = []
        for raw in wandb_records(run_file):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(raw)
            records.append(rec)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, f"{run_file} has no exit record after {timeout:.0f} s"
        time.sleep(0.2)
    return {item.key or "/".join(item.nested_key) for r in records if r.WhichOneof("record_type") == "history"
            for item in r.history.item}


def offline_run(run: Path, *extra: str) -> Path:
    """Train the tiny spike run with W&B offline in ``run``; its offline W&B directory."""
    train(load_config(LMConfig, ROOT / "configs/lm_tiny_cpu.toml",
                      [*TINY, *SPIKE, "wandb.enabled=true", *extra, f'run.dir="{run}"']))
    (offline,) = (run / "wandb").glob("offline-run-*")
    return offline


@pytest.fixture
def clean_wandb_env(monkeypatch):
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)


def test_offline_run_has_switch_table_and_layer_panels(tmp_path, parallel, clean_wandb_env):
    pytest.importorskip("wandb")
    offline = offline_run(tmp_path / "run", "train.steps=14", "wandb.timeline_every=2")
    tables = sorted((offline / "files/media/table/precision").glob("switches_*.table.json"))
    rows = [row for t in tables for row in json.loads(t.read_text())["data"]]
    # the spike is in the layer's input: the two GEMMs that read it (fprop, wgrad) move, and come back together
    assert [tuple(r[:6]) for r in rows] == [(6, LAYER, g, "fp8", "bf16", "overflow") for g in ("fprop", "wgrad")] \
        + [(10, LAYER, g, "bf16", "fp8", "probation") for g in ("fprop", "wgrad")]
    assert json.loads(tables[0].read_text())["columns"][:6] == ["step", "layer", "gemm", "from", "to", "reason"]
    assert list((offline / "files/media/images/precision").glob("timeline_*.png"))
    long = next((offline / "files/media/table/precision").glob("layer_steps_*.table.json"))
    long = json.loads(long.read_text())
    assert long["columns"] == ["step", "layer", "precision", "is_fp8", "fprop", "dgrad", "wgrad"]
    mixed = [r for r in long["data"] if r[1] == LAYER and r[2] == "mixed"]
    assert mixed and all(r[3:] == [1 / 3, "bf16", "fp8", "bf16"] for r in mixed), mixed
    keys = history_keys(next(offline.glob("run-*.wandb")))
    assert {"step", "train/loss", "precision/fp8_flop_fraction", f"precision/{LAYER}/headroom",
            f"precision/{LAYER}/is_fp8"} <= keys


def test_wandb_failure_is_reported_once_and_training_goes_on(tmp_path, parallel, clean_wandb_env, monkeypatch,
                                                             caplog):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "no-such-mode")
    summary = train(load_config(LMConfig, ROOT / "configs/lm_tiny_cpu.toml",
                                [*TINY, "train.steps=4", "wandb.enabled=true", f'run.dir="{tmp_path / "r"}"']))
    assert caplog.text.count("W&B logging failed") == 1 and summary["steps"] == 4
    assert (tmp_path / "r" / "metrics.jsonl").read_text().count('"step"') >= 1


def test_layer_panels_pick_the_per_layer_series_and_aggregates_are_always_there(tmp_path, parallel,
                                                                                clean_wandb_env):
    """``wandb.layer_panels`` patterns choose which layers get per-layer series; the worst layer per signal,
    the BF16 layer count and the FP8 FLOP share are logged whatever the choice."""
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    offline = offline_run(run, "train.steps=8", 'wandb.layer_panels=["*.layers.0.*"]')
    keys = history_keys(next(offline.glob("run-*.wandb")))
    layers = {k.split("/")[1] for k in keys if k.count("/") == 2 and k.split("/")[1].startswith("decoder.")}
    assert layers and all(name.startswith("decoder.layers.0.") for name in layers), layers
    assert {"precision/worst/nonfinite", "precision/worst_layer/nonfinite", "precision/worst/headroom",
            "precision/bf16_layers", "precision/fp8_flop_fraction"} <= keys
    # the JSONL file keeps every layer
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(f"precision/{LAYER}/headroom" in r for r in rows)


def test_default_panels_stop_at_64_layers_and_a_pattern_must_match():
    from precisionrt.config import ConfigError
    from precisionrt.observe.loggers import WandbConfig, panel_layers

    names = [f"decoder.layers.{i}.mlp.linear_fc1" for i in range(65)]
    assert panel_layers(WandbConfig(), names[:64]) == set(names[:64])
    assert panel_layers(WandbConfig(), names) == set(), "a 65-layer model gets aggregates only by default"
    assert panel_layers(WandbConfig(layer_panels=["*.layers.6?.*"]), names) == set(names[60:65])
    with pytest.raises(ConfigError, match="'attention' matches no managed layer"):
        panel_layers(WandbConfig(layer_panels=["attention"]), names)


def test_worst_layer_per_signal_takes_the_bad_direction():
    from precisionrt.runtime.monitors import worst

    signals = {"a": {"overflow": 0.1, "headroom": 8.0, "grad_cos": None},
               "b": {"overflow": 0.3, "headroom": 2.0, "grad_cos": 0.9}}
    out = worst(signals, ["a", "b"])
    assert out["precision/worst/overflow"] == 0.3 and out["precision/worst_layer/overflow"] == 1
    assert out["precision/worst/headroom"] == 2.0, "low headroom is the bad value"
    assert out["precision/worst/grad_cos"] == 0.9 and out["precision/worst_layer/grad_cos"] == 1
