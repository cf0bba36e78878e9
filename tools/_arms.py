"""Shared by the tools that compare runs: run one arm of a training command in its own process."""

import json
import subprocess
import sys
from pathlib import Path


def run_arm(config: str, run_dir: Path, overrides: list[str], module: str = "precisionrt.train") -> dict:
    """Train one arm (a fresh process: a fresh torch.distributed world) and return its summary.json."""
    cmd = [sys.executable, "-m", module, "--config", config, "--set", f'run.dir="{run_dir}"',
           *sum((["--set", s] for s in overrides), [])]
    print(f"== {run_dir.name}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((run_dir / "summary.json").read_text())


def fresh_dir(path: str) -> Path:
    out = Path(path)
    if out.exists():
        raise SystemExit(f"{out} exists: choose another --out")
    return out
