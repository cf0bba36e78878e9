"""Megatron-core's own example loop (``examples/run_simple_mcore_train_loop.py`` at core_v0.16.1, kept verbatim in
examples/ beside our copy) with only the changes a user makes, each marked, runs on gloo: at TP=1 with a resume
in the same layout, and at PP=2 resumed on one rank (a reshard). Each resume continues the same run in the switch
log (one run for ``precisionrt-log summarize``, its resumed segment starting from the loaded precisions), a NaN
drilled into the last stage's layer is promoted and its step skipped, and docs/embedding.md shows the diff."""

import difflib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_tensor_parallel import free_port

HERE = Path(__file__).parent
ROOT = HERE.parent
ORIG, OURS = ROOT / "examples/run_simple_mcore_train_loop.orig.py", ROOT / "examples/run_simple_mcore_train_loop.py"
MARKERS = ("# PRECISIONRT", "# CPU", "# WHEEL", "# FIX", "# PP", "# TEST")
DRILLED = "decoder.layers.1.mlp.linear_fc2"


def example_diff() -> str:
    return "".join(difflib.unified_diff(ORIG.read_text().splitlines(True), OURS.read_text().splitlines(True),
                                        f"examples/{ORIG.name}", f"examples/{OURS.name}", n=1))


def run_example(tmp: Path, nproc: int, *args: str) -> str:
    launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
                f"--master-port={free_port()}"]
    proc = subprocess.run([sys.executable, *launcher, str(OURS), "--run-dir", str(tmp / "run"), *args],
                          capture_output=True, text=True, timeout=600, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Successfully loaded the model" in proc.stdout
    return proc.stdout


def losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"'lm loss': tensor\(([^,)]+)", stdout)]


def check_one_run(run_dir: Path) -> None:
    """One run in the log and in ``precisionrt-log summarize``, resumed at step 5 with the loaded precisions."""
    records = [json.loads(line) for line in (run_dir / "precision_events.jsonl").read_text().splitlines()]
    starts = [r for r in records if r["kind"] == "run_start"]
    assert len(starts) == 2 and starts[0]["run"] == starts[1]["run"], "a resume continues the same run"
    assert "resumed_from" not in starts[0] and starts[1]["resumed_from"] == 5
    loaded = {layer["name"]: layer["gemms"] for layer in starts[1]["layers"]}
    assert loaded[DRILLED] == {"fprop": "fp8", "dgrad": "bf16", "wgrad": "bf16"}, "the loaded precisions"
    assert all(g == dict.fromkeys(g, "fp8") for n, g in loaded.items() if n != DRILLED)
    proc = subprocess.run([sys.executable, "-m", "precisionrt.observe.cli", "summarize", "--json", str(run_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (run,) = json.loads(proc.stdout)["runs"]
    assert run["steps"] == 10 and run["ended"] and run["promotions"] == 1
    layer = run["layers"][DRILLED]
    assert layer["promotions"] == {"nonfinite": 1} and layer["first_promotion_step"] == 3
    assert layer["gemms"]["dgrad"] == {"fp8_steps": 3, "final_precision": "bf16"}, "bf16 after step 3, to the end"
    assert layer["gemms"]["fprop"]["fp8_steps"] == 10


def test_example_is_megatrons_with_marked_changes():
    """The original is megatron's blob (git hash-object), and every line we add carries a marker naming why (or is
    an original line indented under a marked ``if``); docs/embedding.md shows this very diff."""
    import hashlib

    data = ORIG.read_bytes()
    assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == "f748d74ecec95aee12a38f1afc8af335faf557c8"
    diff = example_diff()
    removed = {line[1:].strip() for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")}
    for line in diff.splitlines():
        if line.startswith("+") and not line.startswith("+++") and line[1:].strip():
            assert any(m in line for m in MARKERS) or line[1:].strip() in removed, f"unmarked change: {line}"
    assert f"```diff\n{diff}```" in (ROOT / "docs/embedding.md").read_text(), \
        "docs/embedding.md must show the current diff (regenerate it with tests/test_example_loop.py's example_diff)"


@pytest.mark.slow
def test_example_loop_tp1_resumes_as_one_run(tmp_path):
    first = run_example(tmp_path, 1, "--tp=1", "--drill", f"--ckpt={tmp_path / 'ckpt5'}")
    second = run_example(tmp_path, 1, "--tp=1", f"--resume-from={tmp_path / 'ckpt5'}", f"--ckpt={tmp_path / 'ckpt10'}")
    assert len(losses(first)) == len(losses(second)) == 5
    assert all(x == x for x in losses(first) + losses(second)), "the NaN step was skipped, nothing is NaN"
    check_one_run(tmp_path / "run")


@pytest.mark.slow
def test_example_loop_pp2_resumes_resharded_on_one_rank(tmp_path):
    """Two stages; the drilled layer is on the last one, rank 0 (the first stage) writes the log."""
    first = run_example(tmp_path, 2, "--tp=1", "--pp=2", "--drill", f"--ckpt={tmp_path / 'ckpt5'}")
    second = run_example(tmp_path, 1, "--tp=1", "--pp=1", f"--resume-from={tmp_path / 'ckpt5'}",
                         f"--ckpt={tmp_path / 'ckpt10'}")
    assert len(losses(first)) == len(losses(second)) == 5
    assert all(x == x for x in losses(first) + losses(second))
    check_one_run(tmp_path / "run")
