"""Reproduces the HF import figures quoted in docs/huggingface.md ("What is supported, and what is refused") and
tests/test_hf.py: float32 logit max abs diff against
transformers at TP=2 (two gloo ranks under torchrun), bf16 checkpoints' relative error, and FP8 against BF16, for
each tiny model of tests/hf_models.py. Prints one line per figure and writes JSON to --out.

    .venv/bin/python tools/hf_parity.py --out hf_parity.json
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
from hf_models import CASES, batch, make_checkpoint  # noqa: E402
from test_tensor_parallel import free_port  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="hf_parity.json")
args = parser.parse_args()
figures = {}
d = Path(tempfile.mkdtemp())
refs = {c: make_checkpoint(d / c, c) for c in CASES}
subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(TESTS / "hf_tp_worker.py"), str(d), *[str(d / c) for c in CASES]], check=True, capture_output=True, cwd=TESTS)
res = torch.load(d / "tp.pt", weights_only=True)
ids, m, pos, _ = batch()
for c in CASES:
    with torch.no_grad():
        t = refs[c](input_ids=ids, attention_mask=m, position_ids=pos).logits
    figures[f"{c}/tp2_max_abs"] = (res[c]["logits"][m.bool()] - t[m.bool()]).abs().max().item()
# bf16
from precisionrt.distributed.parallel import init_parallel
from precisionrt.models.hf.load import from_hf, hf_layer_spec
from precisionrt.models.hf.arch import HFArch
from precisionrt.layers.linear import precision_layers
init_parallel(1)
for c in CASES:
    r = make_checkpoint(d / (c + "bf"), c, dtype=torch.bfloat16)
    mod = from_hf(d / (c + "bf"), hf_layer_spec(HFArch.from_dir(d / (c+"bf")), precision=False)).eval()
    with torch.no_grad():
        t = r(input_ids=ids, attention_mask=m, position_ids=pos).logits[m.bool()].float()
        o = mod(ids, pos, _)[m.bool()].float()
    figures[f"{c}/bf16_rel"] = ((o - t).norm() / t.norm()).item()
    figures[f"{c}/bf16_max_abs"] = (o - t).abs().max().item()
    mod = from_hf(d / c).eval()
    with torch.no_grad():
        b = mod(ids, pos, _)[m.bool()]
        for l in precision_layers(mod).values(): l.precision = "fp8"
        f = mod(ids, pos, _)[m.bool()]
    figures[f"{c}/fp8_vs_bf16_rel"] = ((f - b).norm() / b.norm()).item()
for key, value in figures.items():
    print(f"{key:40s} {value:.3g}")
Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
