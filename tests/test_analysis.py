"""precisionrt-log on switch logs written by real training runs, and on damaged copies of them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from precisionrt.observe.cli import main as cli
from precisionrt.config import load_config
from precisionrt.train import LMConfig, train
from test_dynamic import SPIKE, TINY

ROOT = Path(__file__).parent.parent
RUN = [*TINY, *SPIKE, "train.steps=20"]   # a spike: one promotion at step 6, its return at step 10


@pytest.fixture(scope="module")
def spike_run(tmp_path_factory, parallel):
    d = tmp_path_factory.mktemp("logs")
    summary = train(load_config(LMConfig, ROOT / "configs/lm_tiny_cpu.toml", [*RUN, f'run.dir="{d / "run"}"']))
    return d / "run", summary


def test_summarize_matches_the_run(spike_run, capsys):
    run, summary = spike_run
    assert cli(["summarize", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["skipped_lines"] == 0 and len(result["runs"]) == 1
    r = result["runs"][0]
    assert r["steps"] == 20 and r["ended"] and r["promotions"] == 1 and r["demotions"] == 1
    layer = r["layers"]["decoder.layers.1.mlp.linear_fc1"]
    assert layer["promotions"] == {"overflow": 1} and layer["demotions"] == {"probation": 1}
    # the input spike moved fprop and wgrad (the GEMMs reading the input) from step 6 to 10; dgrad stayed in FP8
    assert layer["first_promotion_step"] == 6 and layer["gemms"]["dgrad"]["fp8_steps"] == 20
    assert layer["gemms"]["fprop"]["fp8_steps"] == layer["gemms"]["wgrad"]["fp8_steps"] == 20 - (10 - 6)
    # every step runs the same tokens, so the log's FLOP share equals what the runtime counted
    assert r["fp8_flop_fraction"] == pytest.approx(summary["fp8_flop_fraction"], abs=1e-12)
    assert cli(["summarize", str(run)]) == 0
    assert "decoder.layers.1.mlp.linear_fc1" in capsys.readouterr().out


def test_corrupt_and_truncated_lines_are_counted_and_the_rest_analysed(spike_run, tmp_path, capsys):
    run, _ = spike_run
    lines = (run / "precision_events.jsonl").read_bytes().splitlines(keepends=True)
    stats_line = next(i for i, l in enumerate(lines) if b'"kind":"stats"' in l)
    damaged = lines[:stats_line] + [lines[stats_line][:50] + b"\n", b"not json at all\n", b"[1, 2]\n"] + \
        lines[stats_line + 1:] + [b'{"v":1,"kind":"switch","run":"x","step":']
    log = tmp_path / "damaged.jsonl"
    log.write_bytes(b"".join(damaged))
    assert cli(["summarize", str(log), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["skipped_lines"] == 4
    assert result["runs"][0]["promotions"] == 1 and result["runs"][0]["steps"] == 20


def test_compare_finds_the_layer_and_step_that_differ(spike_run, tmp_path, capsys):
    run, _ = spike_run
    log = run / "precision_events.jsonl"
    assert cli(["compare", str(log), str(log)]) == 0
    assert "identical" in capsys.readouterr().out
    other = tmp_path / "other.jsonl"
    other.write_text("".join(l for l in log.read_text().splitlines(keepends=True) if '"probation"' not in l))
    assert cli(["compare", str(log), str(other), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert not result["identical"]
    d = result["layers"]["decoder.layers.1.mlp.linear_fc1"]
    assert d["first_difference_step"] == 10 and d["only_in_a"][0]["reason"] == "probation" and not d["only_in_b"]


def test_export_csv_has_switches_and_stats(spike_run, tmp_path, capsys):
    run, _ = spike_run
    out = tmp_path / "flat.csv"
    assert cli(["export", str(run), "-o", str(out)]) == 0
    rows = out.read_text().splitlines()
    header = rows[0].split(",")
    assert {"kind", "step", "layer", "gemm", "from", "to", "reason", "precision", "fprop_precision"} <= set(header)
    kinds = [r.split(",")[0] for r in rows[1:]]
    assert kinds.count("switch") == 2 * 2 and kinds.count("stats") == 10 * 8   # a row per GEMM switched
    assert cli(["export", str(run), "-o", str(tmp_path / "x.txt")]) == 2


def test_missing_log_is_a_clear_error(tmp_path, capsys):
    assert cli(["summarize", str(tmp_path / "nope")]) == 2
    assert "no switch log at" in capsys.readouterr().err


def test_analysis_imports_neither_torch_nor_megatron():
    code = "import sys, precisionrt.observe.cli, precisionrt.observe.analysis; print('torch' in sys.modules, 'megatron' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


def test_timeline_picture(spike_run, tmp_path):
    pytest.importorskip("matplotlib")
    run, _ = spike_run
    png = tmp_path / "timeline.png"
    assert cli(["timeline", str(run / "precision_events.jsonl"), "-o", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 600 and height > 200


def test_export_parquet(spike_run, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    run, _ = spike_run
    out = tmp_path / "flat.parquet"
    assert cli(["export", str(run), "-o", str(out)]) == 0
    table = pq.read_table(out).to_pylist()
    assert sum(r["kind"] == "switch" for r in table) == 2 * 2 and sum(r["kind"] == "stats" for r in table) == 80


def test_several_rank_files_merge_by_run(spike_run, tmp_path, capsys):
    run, _ = spike_run
    log = (run / "precision_events.jsonl").read_text().splitlines(keepends=True)
    rank0, rank1 = tmp_path / "rank0.jsonl", tmp_path / "rank1.jsonl"
    rank0.write_text("".join(log))
    rank1.write_text("".join(l for l in log if '"kind":"stats"' not in l))   # same run, same switches
    assert cli(["summarize", str(rank0), str(rank1), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    r = result["runs"][0]
    assert len(result["runs"]) == 1 and r["switches"] == 2 * 2, "the same GEMM switches count once"
    assert (r["promotions"], r["demotions"]) == (1, 1)
    assert result["runs"][0]["files"] == sorted([str(rank0), str(rank1)])


def test_follow_rereads_until_the_run_ends(spike_run, tmp_path):
    run, _ = spike_run
    lines = (run / "precision_events.jsonl").read_text().splitlines(keepends=True)
    live = tmp_path / "live.jsonl"
    live.write_text("".join(lines[:-1]))                       # no run_end yet
    proc = subprocess.Popen([sys.executable, "-m", "precisionrt.observe.cli", "summarize", str(live), "--follow",
                             "--interval", "0.2"], stdout=subprocess.PIPE, text=True)
    import time
    time.sleep(1.5)
    assert proc.poll() is None, "still following a run without run_end"
    with open(live, "a") as fh:
        fh.write(lines[-1])
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "(no run_end yet)" in out and out.rstrip().count("run ") >= 2


def _mutants(line: dict) -> list[dict]:
    """Wrongly typed copies of a switch record, each of which a reader must skip (and count), not die on."""
    out = []
    for field, bad in [("step", "12"), ("step", None), ("step", 1e300), ("step", True), ("run", ["x"]),
                       ("layer", 3), ("from", "fp16"), ("signals", 5), ("time", "now")]:
        out.append({**line, field: bad})
    out.append({k: v for k, v in line.items() if k != "layer"})
    return out


def test_wrongly_typed_records_are_skipped_and_counted(spike_run, tmp_path, capsys):
    run, _ = spike_run
    lines = (run / "precision_events.jsonl").read_text().splitlines()
    switch = next(json.loads(l) for l in lines if json.loads(l)["kind"] == "switch")
    stats = next(json.loads(l) for l in lines if json.loads(l)["kind"] == "stats")
    bad = [*_mutants(switch), {**stats, "layers": 7}, {**stats, "layers": {"a": 1}},
           {"v": 1, "kind": "run_start", "run": switch["run"], "time": 1.0, "layers": 3, "config": {}}]
    log = tmp_path / "precision_events.jsonl"
    log.write_text("\n".join([*lines, *(json.dumps(b) for b in bad)]) + "\n")
    assert cli(["summarize", str(log), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["skipped_lines"] == len(bad)
    r = result["runs"][0]
    assert r["steps"] == 20 and r["promotions"] == 1 and r["demotions"] == 1, "the good records still count"
    assert cli(["export", str(log), "-o", str(tmp_path / "flat.csv")]) == 0
    assert cli(["timeline", str(log), "-o", str(tmp_path / "t.png")]) == 0


def test_empty_binary_and_unrelated_logs_are_refused_by_name(spike_run, tmp_path, capsys):
    run, _ = spike_run
    empty, binary = tmp_path / "empty.jsonl", tmp_path / "binary.jsonl"
    empty.write_text("")
    binary.write_bytes(bytes(range(256)) * 8)
    assert cli(["summarize", str(empty)]) == 1
    assert "no readable run" in capsys.readouterr().err
    assert cli(["timeline", str(binary), "-o", str(tmp_path / "t.png")]) == 2
    assert "binary.jsonl: no readable run" in capsys.readouterr().err
    assert cli(["compare", str(empty), str(binary)]) == 2
    capsys.readouterr()
    other = tmp_path / "other.jsonl"   # the same log with its layers renamed: another model
    other.write_text((run / "precision_events.jsonl").read_text().replace("decoder.layers.", "encoder.blocks."))
    assert cli(["compare", str(run / "precision_events.jsonl"), str(other)]) == 2
    assert "cannot compare runs of different models" in capsys.readouterr().err


def test_the_writers_stats_lines_open_with_the_prefix_the_reader_trusts(spike_run):
    """The reader checks stats lines by a prefix instead of parsing them: a writer that reordered its keys
    would make every stats line skipped as unreadable. Both sides take the prefix from events.py."""
    from precisionrt.observe.events import EVENTS_FILE, STATS_PREFIX

    lines = (spike_run[0] / EVENTS_FILE).read_bytes().splitlines()
    stats = [line for line in lines if b'"kind":"stats"' in line]
    assert stats and all(line.startswith(STATS_PREFIX) for line in stats)
