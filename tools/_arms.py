"""Shared by the tools that compare runs: run one arm of a training command in its own process."""

import json
import os
import subprocess
import sys
from pathlib import Path


def run_arm(config: str, run_dir: Path, overrides: list[str], module: str = "precisionrt.train",
            log: Path | None = None, threads: int | None = None) -> dict:
    """Train one arm (a fresh process: a fresh torch.distributed world) and return its summary.json.

    ``log``: the arm's output goes to this file instead of the terminal (arms run side by side), and an arm
    that fails raises ``subprocess.CalledProcessError`` naming it. ``threads``: its torch threads."""
    cmd = [sys.executable, "-m", module, "--config", config, "--set", f'run.dir="{run_dir}"',
           *sum((["--set", s] for s in overrides), [])]
    print(f"== {run_dir.name}: {' '.join(cmd)}", flush=True)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if log is None:
        subprocess.run(cmd, check=True, env=env)
    else:
        with open(log, "w") as fh:
            subprocess.run(cmd, check=True, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return json.loads((run_dir / "summary.json").read_text())


def fresh_dir(path: str) -> Path:
    out = Path(path)
    if out.exists():
        raise SystemExit(f"{out} exists: choose another --out")
    return out
