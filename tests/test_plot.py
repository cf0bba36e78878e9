"""The end of every run: what precision did (each decision, ``injected`` where the config's drill caused it),
the picture (``run.png``, also ``precisionrt-log plot``), and where everything was written; the progress lines'
header and time estimate."""

import re
import time
from pathlib import Path

import pytest

from precisionrt.config import load_config
from precisionrt.observe.cli import main as cli
from precisionrt.observe.plot import DPI, draw_run, series, read_metrics
from precisionrt.run.progress import Progress, clock
from precisionrt.train import LMConfig, train
from test_dynamic import LAYER, SPIKE, TINY

matplotlib = pytest.importorskip("matplotlib")
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, parallel):
    """The spike drill: fprop+wgrad of LAYER promoted at step 6 and back at step 10; the command's stdout."""
    import contextlib
    import io

    d = tmp_path_factory.mktemp("plot") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = train(load_config(LMConfig, ROOT / "configs/lm_tiny_cpu.toml",
                                    [*TINY, *SPIKE, "train.steps=12", f'run.dir="{d}"']))
    return d, summary, out.getvalue()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def markers(ax, shape: str) -> list[float]:
    """The steps of the timeline's switch markers of one shape (``v`` promotion, ``^`` return)."""
    return [float(line.get_xdata()[0]) for line in ax.get_lines() if line.get_marker() == shape]


def test_an_lm_run_ends_with_what_precision_did_and_its_picture(lm_run):
    run, summary, stdout = lm_run
    lines = stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("training: "))
    assert re.fullmatch(r"training: steps 1-12; columns: step, train loss .*time left", lines[header])
    assert header < min(i for i, l in enumerate(lines) if l.startswith("step "))
    assert all(re.search(r"\d+:\d\d elapsed, ~\d+:\d\d left$", l) for l in lines if l.startswith("step  "))
    assert f"step 6: {LAYER}:fprop fp8 -> bf16 (overflow)" in lines
    assert f"  step 6: {LAYER} fprop+wgrad fp8 -> bf16 (overflow)  [injected: the config's [inject] spike drill]" \
        in lines
    assert f"  step 10: {LAYER} fprop+wgrad bf16 -> fp8 (probation)  [injected: the config's [inject] spike drill]" \
        in lines
    share = f"precision: {summary['fp8_flop_fraction']:.1%} of GEMM FLOPs in FP8; 2 precision decisions"
    assert share in lines
    assert f"picture: {run / 'run.png'}" in lines
    assert lines[-1] == (f"written to {run}: summary.json, metrics.jsonl, precision_events.jsonl, config.json, "
                         "checkpoints/, run.png")
    width, height = png_size(run / "run.png")
    assert width == 10 * DPI and height > 5 * DPI

    fig = draw_run(run)
    loss, timeline = fig.axes
    assert loss.get_ylabel() == "loss"
    rows = read_metrics(run)
    (train_line, eval_line) = loss.get_lines()
    assert list(train_line.get_ydata()) == series(rows, "train/loss")[1] and len(train_line.get_ydata()) == 3
    assert list(eval_line.get_ydata()) == series(rows, "eval/loss")[1]
    assert markers(timeline, "v") == [6.0] and markers(timeline, "^") == [10.0]
    labels = [t.get_text() for t in timeline.texts]
    assert labels == ["overflow (fprop+wgrad)", "probation (fprop+wgrad)"]
    assert [t.get_text() for t in timeline.get_yticklabels()] == list(summary["precisions"])
    matplotlib.pyplot.close(fig)


def test_an_rl_run_draws_reward_staleness_masking_and_the_timeline(tmp_path, monkeypatch, parallel, capsys):
    from rl_common import run

    monkeypatch.chdir(ROOT)
    layer = "decoder.layers.1.mlp.linear_fc1"
    s = run(tmp_path, 'executor.mode="sync"', 'inject.kind="nonfinite"', f'inject.layer="{layer}"',
            "inject.start_step=2")   # the 3rd warm-start step: a promotion before RL starts
    out = capsys.readouterr().out
    assert "rollout precision: fp8 (fixed: the rollout does not follow the trainer's switches" in out
    assert re.search(r"^RL: steps 1-6; columns: step, sampled reward .*IcePop masked", out, re.M)
    assert re.search(r"^warm start +5/5  loss \d\.\d{3}  \d:\d\d elapsed, ~0:00 left$", out, re.M)
    assert f"  step 3: {layer} dgrad+wgrad fp8 -> bf16 (nonfinite)  [injected: the config's [inject] nonfinite " \
           "drill]" in out
    run_dir = tmp_path / "run"
    assert (run_dir / "run.png").is_file()
    fig = draw_run(run_dir)
    reward, staleness, timeline, masked = fig.axes   # the twin axis is added last
    rows = read_metrics(run_dir)
    held_out, sampled = reward.get_lines()
    assert held_out.get_label() == "held-out reward (greedy)"
    assert list(held_out.get_ydata()) == series(rows, "eval/reward")[1] == [s["reward_initial"], s["reward_final"]]
    assert list(sampled.get_xdata()) == series(rows, "rl/reward")[0] == [3, 6]
    assert staleness.get_lines()[0].get_label() == "staleness (policy versions)"
    assert masked.get_ylabel() == "masked tokens (%)"
    assert [100 * v for v in series(rows, "rl/masked_fraction")[1]] == list(masked.get_lines()[0].get_ydata())
    # the RL phase: optimizer steps after the 5 warm-start ones, the one warm-start decision counted
    assert timeline.get_xlim() == (5, 11) and markers(timeline, "v") == [3.0]
    assert timeline.get_xlabel() == ("optimizer step: the RL phase, after 5 warm-start steps (1 decision in the "
                                     "warm start: precisionrt-log timeline shows them)")
    matplotlib.pyplot.close(fig)


def test_plot_draws_any_run_and_refuses_a_directory_without_one(lm_run, tmp_path, capsys):
    run, _, _ = lm_run
    out = tmp_path / "again.png"
    assert cli(["plot", str(run), "-o", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert png_size(out) == png_size(run / "run.png")
    assert cli(["plot", str(tmp_path)]) == 2
    assert "holds no run: no precision_events.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "run.png").exists()


def test_progress_estimates_the_time_left_from_the_steps_so_far(capsys):
    assert [clock(s) for s in (0, 59.6, 61, 3600 + 62)] == ["0:00", "1:00", "1:01", "1:01:02"]
    progress = Progress("RL", 11, 30, "columns: step, reward (0-1)")   # a run resumed at step 10
    progress.start = time.monotonic() - 40   # 40 s for the first 5 steps of 20: 8 s a step, 15 steps to go
    progress.line(15, "step 15")
    header, line = capsys.readouterr().out.splitlines()
    assert header == "RL: steps 11-30; columns: step, reward (0-1); then time elapsed and an estimate of the time left"
    assert line == "step 15  0:40 elapsed, ~2:00 left"
    Progress("quiet", 1, 2, "columns", enabled=False).line(1, "x")
    assert capsys.readouterr().out == ""


def test_the_report_lists_twenty_decisions_and_counts_the_rest():
    from precisionrt.run.command import REPORTED_DECISIONS, precision_report
    from precisionrt.run.inject import InjectConfig

    switches = [{"step": s, "layer": "decoder.layers.0.mlp.linear_fc1", "gemm": g, "from": "fp8", "to": "bf16",
                 "reason": "overflow"} for s in range(1, 26) for g in ("fprop", "wgrad")]
    lines = precision_report({"switches": switches, "fp8_flop_fraction": 0.5}, InjectConfig())
    assert lines[0] == "precision: 50.0% of GEMM FLOPs in FP8; 25 precision decisions"
    assert lines[1:REPORTED_DECISIONS + 1] == [
        f"  step {s}: decoder.layers.0.mlp.linear_fc1 fprop+wgrad fp8 -> bf16 (overflow)" for s in range(1, 21)]
    assert lines[REPORTED_DECISIONS + 1:] == ["  ... and 5 more: precisionrt-log summarize RUN_DIR"]


def test_the_report_says_whether_the_rollout_followed_and_what_the_switch_did_to_the_mismatch():
    from precisionrt.run.command import precision_report
    from precisionrt.run.inject import InjectConfig

    summary = {"switches": [], "fp8_flop_fraction": 1.0, "rollout_precision": "follow",
               "rollout_maps_applied": [[0, 0], [1, 60]],
               "mismatch_around_first_switch": {"rl_step": 60, "window": 10, "before": 1.86e-2, "after": 1.08e-2}}
    assert precision_report(summary, InjectConfig())[1:] == [
        "  rollout precision: follow (followed the trainer: map 1 from policy version 60)",
        "  mismatch (k3 KL, trainer vs rollout): 1.86e-02 over the 10 RL steps before RL step 60's switch, "
        "1.08e-02 from it on"]
    fixed = {**summary, "rollout_precision": "fp8", "rollout_maps_applied": [[0, 0]]}
    assert precision_report(fixed, InjectConfig())[1] == \
        "  rollout precision: fp8 (fixed: it did not follow the trainer's switches)"


def test_the_mismatch_around_a_switch_averages_the_windows_on_either_side():
    from rl.train import mismatch_around

    k3 = {s: float(s) for s in range(1, 31)}   # k3 equal to the step: each window's mean is its middle
    assert mismatch_around(k3, 20, window=4) == {"rl_step": 20, "window": 4, "before": 17.5, "after": 21.5}
    assert mismatch_around(k3, 2, window=4)["before"] == 1.0   # only what exists before the start counts
    assert mismatch_around(k3, None) is None
