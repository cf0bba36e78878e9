"""python -m precisionrt.train end to end on a tiny config: run directory, config errors, exact resume."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from precisionrt.config import ConfigError, load_config
from precisionrt.observe.events import read_log
from precisionrt.train import LMConfig, main, train

ROOT = Path(__file__).parent.parent
TINY = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.seq_length=32",
    "train.batch_size=4", "train.steps=12", "train.log_every=4", "train.eval_every=12", "train.eval_batches=2",
    "train.warmup_steps=2", "data.max_bytes=200000",
]


def tiny(tmp_path, *extra) -> LMConfig:
    return load_config(LMConfig, ROOT / "configs/lm_tiny_cpu.toml",
                       [*TINY, f'run.dir="{tmp_path}"', *extra])


@pytest.mark.parametrize("mode", ["fp8", "bf16"])
def test_run_directory_contents(tmp_path, parallel, mode):
    summary = train(tiny(tmp_path / "run", f'precision.mode="{mode}"'))
    run = tmp_path / "run"
    for f in ("config.json", "metrics.jsonl", "summary.json", "precision_events.jsonl"):
        assert (run / f).is_file(), f
    assert json.loads((run / "config.json").read_text())["precision"]["mode"] == mode
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert all(r["perf/throughput"] > 0 for r in rows) and "eval/loss" in rows[-1]
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("steps", "wall_s", "final_train_loss", "final_eval_loss", "fp8_flop_fraction", "switches"):
        assert key in on_disk, key
    assert on_disk["fp8_flop_fraction"] == (1.0 if mode == "fp8" else 0.0) == summary["fp8_flop_fraction"]
    assert (run / "checkpoints" / "step_000012.pt").is_file()
    log = read_log(run / "precision_events.jsonl")
    assert log.skipped_lines == 0 and [r["kind"] for r in log.records] == ["run_start", "run_end"]
    assert len(log.records[0]["layers"]) == 8 and log.records[0]["layers"][0]["gemm_flops_per_token"] > 0


def test_resume_is_exact(tmp_path, parallel):
    full = train(tiny(tmp_path / "full"))
    train(tiny(tmp_path / "split", "train.stop_at_step=6"))
    resumed = train(tiny(tmp_path / "split", "train.resume=true"))
    assert resumed["resumed_from"] == 6
    assert resumed["final_train_loss"] == full["final_train_loss"]
    assert resumed["final_eval_loss"] == full["final_eval_loss"]


@pytest.mark.parametrize("stop", [5, 7])
def test_resume_is_exact_between_checks(tmp_path, parallel, stop):
    """Stopped in the middle of a check window (checks every 4 steps, exact statistics and shadow gradients
    every 3, a one-step spike at step 6): the resumed run must see the window's statistics and the sampling
    schedule the uninterrupted run saw, and switch the same layers at the same steps."""
    spike = ['precision.scaling.recipe="delayed"', "precision.scaling.amax_history_len=4",
             "precision.monitor.check_interval=4", "precision.monitor.full_stats_every=3",
             "precision.monitor.shadow_every=3", "precision.policy.cooldown_checks=1",
             'inject.kind="spike"', 'inject.layer="decoder.layers.1.mlp.linear_fc1"', "inject.start_step=5",
             "inject.factor=1000"]
    full = train(tiny(tmp_path / "full", *spike))
    assert full["switches"], "the scenario must switch something, or it tests nothing"
    train(tiny(tmp_path / "split", *spike, f"train.stop_at_step={stop}"))
    resumed = train(tiny(tmp_path / "split", *spike, "train.resume=true"))
    assert resumed["resumed_from"] == stop
    assert resumed["final_train_loss"] == full["final_train_loss"]
    assert resumed["final_eval_loss"] == full["final_eval_loss"]
    assert [sw for sw in full["switches"] if sw["step"] > stop], "switches after the stop: the window matters"
    assert resumed["switches"] == full["switches"], "the summary describes the whole run, not the segment"


def test_truncated_checkpoint_falls_back_to_previous(tmp_path, parallel, caplog):
    train(tiny(tmp_path / "r", "train.steps=8", "train.checkpoint_every=4"))
    newest = tmp_path / "r" / "checkpoints" / "step_000008.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    resumed = train(tiny(tmp_path / "r", "train.steps=8", "train.resume=true"))
    assert resumed["resumed_from"] == 4
    assert re.search(r"step_000008\.pt is (truncated or )?damaged", caplog.text)
    assert newest.exists(), "nothing is deleted"


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("train.steps=\"many\"", "train.steps: expected an integer"),
    ("precision.mode=\"fp16\"", "precision.mode: 'fp16' is not one of"),
    ("precision.scaling.margin=-1", "precision.scaling.margin: must be in [0, 64], got -1"),
    ("precision.pin_bf16=[\"decoder.layers.7.*\"]", "'decoder.layers.7.*' matches no managed layer"),
    ("train.lr=inf", "train.lr: must be a finite number"),
    ("precision.policy.overflow=nan", "precision.policy.overflow: must be a finite number"),
    ("train.grad_clip=-1", "train.grad_clip: must be in (0, 1e6]"),
    ("train.grad_clip=0", "train.grad_clip: must be in (0, 1e6]"),
])
def test_bad_config_is_named(tmp_path, parallel, capsys, override, message):
    argv = ["--config", str(ROOT / "configs/lm_tiny_cpu.toml"), *sum((["--set", s] for s in TINY), []),
            "--set", f'run.dir="{tmp_path / "x"}"', "--set", override]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists(), "a rejected config writes nothing"


def test_existing_run_dir_is_not_overwritten(tmp_path, parallel):
    train(tiny(tmp_path / "r", "train.steps=4"))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny(tmp_path / "r", "train.steps=4"))


def test_cli_entry_point_runs(tmp_path):
    args = sum((["--set", s] for s in TINY), [])
    proc = subprocess.run([sys.executable, "-m", "precisionrt.train", "--config", "configs/lm_tiny_cpu.toml",
                           *args, "--set", "train.steps=4", "--set", f'run.dir="{tmp_path / "cli"}"'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step     4/4" in proc.stdout and (tmp_path / "cli" / "summary.json").is_file()


def test_python_corpus_extends_the_stdlib_deterministically():
    from precisionrt.run.data import python_corpus

    stdlib = python_corpus(10**9, "stdlib")
    more = python_corpus(len(stdlib) + 500_000, "python")
    assert more[: len(stdlib)] == stdlib, "the standard library comes first, in the same order"
    assert len(more) == len(stdlib) + 500_000, "installed packages add sources beyond it"
    assert python_corpus(len(stdlib) + 500_000, "python") == more, "same machine, same bytes"


def test_checkpoints_rotate_and_a_failed_write_leaves_nothing_behind(tmp_path):
    import torch

    from precisionrt.run.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint

    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 8], "only the newest two are kept"
    assert load_latest_checkpoint(tmp_path)[1]["step"] == 8

    class Unwritable:   # torch.save fails on it mid-write, as a full disk would
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(RuntimeError, match=r"step_000010\.pt.*No space left"):
        save_checkpoint(tmp_path, 10, {"x": Unwritable()})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_000006.pt", "step_000006.pt.sha256", "step_000008.pt", "step_000008.pt.sha256"]


class Opaque:
    """An arbitrary pickled object, which weights_only loading must refuse."""


def test_a_checkpoint_that_weights_only_refuses_is_an_error_not_a_fallback(tmp_path):
    import torch

    from precisionrt.run.checkpoint import checkpoint_path, load_latest_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, 2, {"step": 2})
    path = checkpoint_path(tmp_path, 4)
    torch.save({"step": 4, "obj": Opaque()}, path)   # a pickled object: weights_only=True refuses it
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())   # verified
    with pytest.raises(RuntimeError, match="step_000004.pt holds objects"):
        load_latest_checkpoint(tmp_path)


def test_resuming_a_finished_run_changes_nothing(tmp_path, parallel):
    first = train(tiny(tmp_path / "r", "train.steps=4"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    again = train(tiny(tmp_path / "r", "train.steps=4", "train.resume=true"))
    after = {p.name: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    assert after == before, "no file rewritten, appended to or added"
    assert again["final_eval_loss"] == first["final_eval_loss"]


def test_resume_without_a_checkpoint_in_a_started_run_is_refused(tmp_path, parallel):
    run = tmp_path / "r"
    train(tiny(run, "train.steps=4"))
    for ckpt in (run / "checkpoints").iterdir():
        ckpt.unlink()
    with pytest.raises(ConfigError, match="holds a run but no checkpoint"):
        train(tiny(run, "train.steps=8", "train.resume=true"))


def test_steps_replayed_after_a_crash_are_logged_once(tmp_path, parallel):
    """A run killed after its step-8 checkpoint but after logging step 12 resumes from 8: metrics.jsonl must
    then hold every step once, the replayed ones with the resumed run's values."""
    run = tmp_path / "r"
    train(tiny(run, "train.checkpoint_every=4", "train.keep_checkpoints=0"))   # steps 4, 8, 12 logged
    (run / "checkpoints" / "step_000012.pt").unlink()                          # as if killed before it
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 13, "train/lo')                                     # and mid-write
    resumed = train(tiny(run, "train.steps=12", "train.resume=true"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert rows[-1]["train/loss"] == resumed["final_train_loss"]


def test_two_launches_into_one_directory_cannot_both_start(tmp_path, monkeypatch):
    """Two launches that both pass the "already holds a run" check (a race): the atomic claim still lets
    only the first one start."""
    from precisionrt.run.rundir import RunConfig, prepare_run_dir

    cfg = RunConfig(dir=str(tmp_path / "r"))
    prepare_run_dir(cfg, resume=False)
    monkeypatch.setattr(Path, "exists", lambda self: False)   # the second launch checked before the first wrote
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_run_dir(cfg, resume=False)


def test_a_language_model_run_that_skips_most_steps_stops(tmp_path, parallel):
    from precisionrt.run.harness import TooManySkippedSteps

    with pytest.raises(TooManySkippedSteps, match="5 of 6 optimizer steps were skipped"):
        train(tiny(tmp_path / "r", 'inject.kind="nonfinite"', 'inject.layer="decoder.layers.1.mlp.linear_fc1"',
                   "inject.start_step=1", "inject.ramp_steps=100"))


def test_a_corrupted_checkpoint_that_still_loads_is_caught_by_its_checksum(tmp_path):
    """Bytes flipped inside a tensor's data leave a zip archive that torch.load reads back as wrong numbers:
    the sha256 written beside each checkpoint catches it, and the previous checkpoint is used."""
    import torch

    from precisionrt.run.checkpoint import checkpoint_path, load_latest_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, 2, {"w": torch.zeros(4096)})
    save_checkpoint(tmp_path, 4, {"w": torch.ones(4096)})
    path = checkpoint_path(tmp_path, 4)
    data = bytearray(path.read_bytes())
    i = data.index(torch.ones(1).numpy().tobytes() * 64)   # inside the tensor's payload
    data[i:i + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["w"].isnan().any(), "torch.load alone reads the damage back"
    step, state = load_latest_checkpoint(tmp_path)
    assert step == 2 and torch.equal(state["w"], torch.zeros(4096))


def test_a_checkpoint_of_another_model_size_is_refused_by_key_and_writes_nothing(tmp_path, parallel):
    run = tmp_path / "r"
    train(tiny(run, "train.steps=4"))
    config = (run / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"holds embedding\.word_embeddings\.weight of shape \(256, 64\), this "
                                          r"model \(256, 96\)"):
        train(tiny(run, "train.steps=8", "train.resume=true", "model.hidden_size=96"))
    assert (run / "config.json").read_text() == config, "the refused resume changed nothing"
