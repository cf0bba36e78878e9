"""The study tools end to end on a few tiny arms: real runs in their own processes, real files."""

import json
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
TINY = ["train.warm_start_steps=3", "train.warm_start_batch=8", "train.log_every=1", "train.eval_every=2",
        "rl.group_size=4", "rl.prompts_per_step=2", "task.heldout_size=8", "model.hidden_size=32",
        "model.ffn_hidden_size=64", "model.num_attention_heads=2"]


def study(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "tools/correction_study.py", "--steps", "4", "--seeds", "0", "--corrections", "icepop",
           "--staleness", "0", "--rollout", "follow", "--naive-staleness", "4", "--out", str(out),
           *sum((["--set", s] for s in TINY), []), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_correction_study_writes_its_table_and_resumes(tmp_path):
    out = tmp_path / "study"
    r = study(out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads((out / "correction_study.json").read_text())
    assert set(data["arms"]) == {"icepop_st0_follow_s0", "naive_st4_fp8_s0"}
    for name, arm in data["arms"].items():
        summary = json.loads((out / name / "summary.json").read_text())
        assert arm["reward_final"] == summary["reward_final"] and summary["steps"] == 4
        assert 0 <= arm["masked_fraction"] <= 1 and arm["k3_kl"] >= 0
    naive = json.loads((out / "naive_st4_fp8_s0" / "config.json").read_text())
    assert naive["rl"]["loss"]["objective"] == "naive" and naive["rl"]["max_staleness"] == 4
    md = (out / "correction_study.md").read_text().splitlines()
    assert len(md) == 4 and md[2].startswith("| icepop | 0 | follow |") and md[3].startswith("| naive PPO | 4 | fp8 |")
    png = (out / "correction_study.png").read_bytes()   # one 4-inch panel per rollout precision run (120 dpi)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">I", png[16:20])[0] == 2 * 4 * 120

    # an interrupted study: one arm's directory is cut short, the other finished; --resume reruns only the first
    (out / "naive_st4_fp8_s0" / "summary.json").unlink()
    kept = (out / "icepop_st0_follow_s0" / "metrics.jsonl").stat().st_mtime_ns
    r = study(out, "--resume")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (out / "icepop_st0_follow_s0" / "metrics.jsonl").stat().st_mtime_ns == kept
    assert (out / "naive_st4_fp8_s0" / "summary.json").exists()
    assert "== naive_st4_fp8_s0" in r.stdout and "== icepop_st0_follow_s0" not in r.stdout


def test_correction_study_refuses_an_existing_directory(tmp_path):
    (tmp_path / "study").mkdir()
    r = study(tmp_path / "study")
    assert r.returncode != 0 and "exists" in (r.stdout + r.stderr)


def test_warm_start_curve_ends_where_the_rl_command_starts(tmp_path, parallel):
    """The curve's reward at step N is the held-out reward ``rl.train`` reports after a warm start of N steps:
    measuring on a copy leaves the run untouched, and the curve trains what the command trains."""
    sys.path.insert(0, str(ROOT / "tools"))
    from warm_start_curve import curve

    from precisionrt.config import load_config
    from rl.train import RLConfig, train

    sets = [*TINY, "train.warm_start_steps=8", "train.warm_start_lr=1e-2", "task.heldout_size=32", "train.steps=1",
            f'run.dir="{tmp_path / "run"}"']
    cfg = load_config(RLConfig, ROOT / "configs/rl_addition_cpu.toml", sets)
    points = curve(cfg, steps=8, every=4)
    assert [p["step"] for p in points] == [4, 8]
    assert points[0]["reward"] != points[1]["reward"], "the curve moves: it measures the model being trained"
    summary = train(load_config(RLConfig, ROOT / "configs/rl_addition_cpu.toml", sets))
    assert summary["reward_initial"] == points[1]["reward"]
