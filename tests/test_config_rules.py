"""Configuration refusals end to end, as a user meets them: through the commands' own ``main``, on real files.
A refused configuration writes nothing; a start-up that fails takes back what it wrote; a resume may not change
what the run is; damaged inputs (a non-UTF-8 config, truncated checkpoints, foreign logs) get one clear line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from precisionrt.observe import cli
from precisionrt.config import ConfigError, load_config
from precisionrt.train import LMConfig, main, train

ROOT = Path(__file__).parent.parent
TINY = ["--config", str(ROOT / "configs/lm_tiny_cpu.toml"), "--set", "model.num_layers=2", "--set",
        "model.hidden_size=64", "--set", "model.ffn_hidden_size=128", "--set", "model.seq_length=32", "--set",
        "train.batch_size=4", "--set", "train.steps=4", "--set", "train.log_every=2", "--set", "train.eval_every=4",
        "--set", "train.eval_batches=1", "--set", "train.warmup_steps=1", "--set", "data.max_bytes=100000"]


def lm(run_dir: Path, *sets: str) -> list[str]:
    return [*TINY, "--set", f'run.dir="{run_dir}"', *[a for s in sets for a in ("--set", s)]]


@pytest.mark.parametrize("bad,named", [
    ("model.num_layers=0", "model.num_layers"),                           # the loader
    ("parallel.tensor_model_parallel_size=3", "parallel.tensor_model_parallel_size"),   # pre-flight
    ("train.batch_size=1048576", "train.batch_size"),                     # the memory floor
    ('inject.kind="outlier"', "inject: layer"),                           # a rule of one table
    ('wandb.layer_panels=["nomatch*"]', "wandb.layer_panels"),            # checked against the built model
    ("train.micro_batches=3", "train.micro_batches (3) must divide train.batch_size (4)"),
    ("train.micro_batches=0", "train.micro_batches"),
    ("parallel.pipeline_model_parallel_size=2", "must divide the world size (1 process(es))"),
    ("parallel.pipeline_model_parallel_size=0", "parallel.pipeline_model_parallel_size"),
])
def test_a_refused_configuration_writes_nothing(tmp_path, parallel, capsys, bad, named):
    run_dir = tmp_path / "runs" / "r"
    assert main(lm(run_dir, "wandb.enabled=true", bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: ") and named in err[0], err
    assert not (tmp_path / "runs").exists(), "no run directory, no W&B run, no partial file"


def test_the_memory_floor_is_quoted_against_the_machine(tmp_path, parallel):
    with pytest.raises(ConfigError, match=r"needs at least [\d,.]+ GiB .* this machine has [\d,.]+ GiB"):
        train(load_config(LMConfig, None, [f'run.dir="{tmp_path}/r"', "train.batch_size=1048576"]))


def test_a_run_dir_that_is_a_file_and_a_config_that_is_not_utf8(tmp_path, parallel, capsys):
    (tmp_path / "taken").write_text("a file")
    assert main(lm(tmp_path / "taken")) == 2
    assert "run.dir" in capsys.readouterr().err and (tmp_path / "taken").read_text() == "a file"
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[run]\nname = "caf\xe9"\n')
    assert main(["--config", str(latin1)]) == 2
    assert "is not UTF-8 text (byte 17" in capsys.readouterr().err


def test_a_failed_start_up_takes_back_what_it_wrote(tmp_path, parallel, caplog):
    """A fresh run that dies between claiming its directory and its first step (here: the switch log's
    directory cannot be written) leaves nothing behind, so the corrected rerun into the same run.dir starts;
    files that were there before (an operator control file) stay."""
    import os

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "precision_control.json").write_text("{}")
    (run_dir / "precision_events.jsonl").mkdir()   # the runtime's log cannot be opened: start-up fails
    with caplog.at_level(logging.INFO, logger="precisionrt"), pytest.raises(IsADirectoryError):
        train(config(run_dir))
    assert any(r.getMessage().startswith("start-up failed: removed ") and "config.json" in r.getMessage()
               for r in caplog.records), "the cleanup says what it removed"
    os.rmdir(run_dir / "precision_events.jsonl")
    assert sorted(p.name for p in run_dir.iterdir()) == ["precision_control.json"]
    summary = train(config(run_dir))
    assert summary["steps"] == 4 and (run_dir / "config.json").exists()


def config(run_dir: Path, *extra: str) -> LMConfig:
    """The configuration ``main(lm(run_dir, *extra))`` runs."""
    args = lm(run_dir, *extra)
    return load_config(LMConfig, args[1], [v for flag, v in zip(args[2::2], args[3::2]) if flag == "--set"])


def test_a_resume_may_not_change_what_the_run_is(tmp_path, parallel, capsys):
    run_dir = tmp_path / "r"
    assert main(lm(run_dir, "train.steps=4", "train.checkpoint_every=2", "train.stop_at_step=2")) == 0
    config = (run_dir / "config.json").read_text()
    assert main(lm(run_dir, "train.resume=true", 'precision.mode="bf16"', "train.seed=7")) == 2
    err = capsys.readouterr().err
    assert "precision.mode 'dynamic' -> 'bf16'" in err and "train.seed 0 -> 7" in err, err
    assert (run_dir / "config.json").read_text() == config and not (run_dir / "segments.jsonl").exists()
    assert main(lm(run_dir, "train.resume=true", 'precision.mode="bf16"', "train.seed=7", "train.steps=6",
                   'train.resume_override=["precision.mode", "train.seed"]')) == 0
    assert (run_dir / "config.json").read_text() == config, "config.json stays the run's first configuration"
    [segment] = [json.loads(line) for line in (run_dir / "segments.jsonl").read_text().splitlines()]
    assert segment["resumed_from"] == 2 and segment["config"]["precision"]["mode"] == "bf16"
    assert segment["changed"]["precision.mode"] == ["dynamic", "bf16"] and "train.steps" in segment["changed"]
    resolved = json.loads(config)["resolved_paths"]
    assert resolved["control_file"] == str((run_dir / "precision_control.json").resolve())


def test_no_readable_checkpoint_is_one_line(tmp_path, parallel, capsys):
    run_dir = tmp_path / "r"
    assert main(lm(run_dir, "train.checkpoint_every=2")) == 0
    for ckpt in (run_dir / "checkpoints").glob("*.pt"):
        ckpt.write_bytes(ckpt.read_bytes()[:100])
    capsys.readouterr()
    assert main(lm(run_dir, "train.resume=true", "train.steps=6")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: train.resume: no readable checkpoint among 2 in "), err


def test_layers_that_cannot_run_fp8_are_named_on_stderr(tmp_path, parallel, caplog):
    """ffn 200: fc2 (200 -> 64) is not FP8-capable (fc1, 64 -> 2 x 200, is); the run says which and why."""
    with caplog.at_level(logging.WARNING, logger="precisionrt"):
        train(config(tmp_path / "r", "model.ffn_hidden_size=200", "train.steps=2", "train.eval_every=2"))
    [warning] = [r.getMessage() for r in caplog.records if "cannot run FP8" in r.getMessage()]
    assert warning == ("2 of 8 managed layers cannot run FP8 and stay BF16: decoder.layers.0.mlp.linear_fc2 (fp8 GEMM "
                       "needs dims divisible by 16: in_features=200); decoder.layers.1.mlp.linear_fc2 (fp8 GEMM needs "
                       "dims divisible by 16: in_features=200)")


def _log(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_precisionrt_log_on_nothing_readable_and_on_another_schema(tmp_path, capsys):
    empty = _log(tmp_path / "empty.jsonl", [])
    assert cli.main(["export", str(empty), "-o", str(tmp_path / "out.csv")]) == 1
    assert not (tmp_path / "out.csv").exists() and "nothing readable" in capsys.readouterr().err
    v3 = _log(tmp_path / "v3.jsonl", ['{"v":3,"kind":"run_start","run":"a","time":1,"layers":[]}'] * 3)
    for command in (["summarize", str(v3)], ["export", str(v3), "-o", str(tmp_path / "v3.csv")]):
        assert cli.main(command) == 1
        assert "schema version 3 (3 line(s)): this precisionrt reads versions [1, 2]" in capsys.readouterr().err


def test_precisionrt_log_into_a_closed_pipe_ends_quietly(tmp_path):
    lines = ['{"v":1,"kind":"run_start","run":"a","time":1,"layers":[{"name":"l%d","index":%d,'
             '"gemm_flops_per_token":1}],"config":{}}' % (i, i) for i in range(1)]
    lines += ['{"v":1,"kind":"switch","run":"a","time":1,"step":%d,"layer":"l%d","from":"fp8","to":"bf16",'
              '"reason":"overflow"}' % (i, i) for i in range(20000)]
    log = _log(tmp_path / "big.jsonl", lines)
    p = subprocess.run(f"{sys.executable} -m precisionrt.observe.cli summarize {log} | head -n 1", shell=True,
                       capture_output=True, text=True, timeout=120)
    assert p.stdout.startswith("run a: ") and p.stderr == "", p.stderr
