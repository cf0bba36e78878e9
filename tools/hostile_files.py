"""Hostile and broken files against every surface that reads or writes them (issue 36), counted.

    python tools/hostile_files.py [--json OUT.json] [--only SUBSTRING] [--timeout S] [-v]

Builds a tiny real Qwen3 checkpoint (with a BPE tokenizer and ChatML) and a finished tiny LM run, then runs each
case in a forked child with a timeout, against the surface a user meets: ``from_hf``, ``to_hf``, the tokenizer
check of the commands, chat-template rendering, ``python -m precisionrt.train`` resuming a run, and
``precisionrt-log``. Each case has the outcome it must have (refused with one line naming the file, or loaded /
written / drawn correctly); each result is one of

* ``clear``: the expected outcome (a refusal: one line of a known error type, naming the file or field);
* ``traceback``: an exception of another type, or a refusal whose message is not one line;
* ``silent``: returned normally where a refusal was due, or did something wrong (deleted, wrote, drew garbage);
* ``refused``: a valid input refused;
* ``hang``: still running after the timeout (killed).

The issue's bar: 0 tracebacks, 0 silent, 0 refused, 0 hangs. Exit status 1 when any case misses it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

REFUSE, OK = "refuse", "ok"


@dataclass
class Case:
    name: str
    cls: str                           # the class of the issue it belongs to
    surface: str                       # from_hf | to_hf | tokenizer | render | lm | log
    expect: str                        # REFUSE or OK
    setup: Callable[[Path, dict], dict]   # (a fresh work dir, the bases) -> the surface's arguments
    names: str = ""                    # a refusal's message must contain this (the file or field)


# ------------------------------------------------------------------------------------------------ the bases

def make_bases(root: Path) -> dict:
    """A tiny Qwen3 checkpoint with tokenizer, and a finished LM run with checkpoints at steps 2 and 4 (made in
    a subprocess, so that the forking parent never ran a torch thread pool)."""
    code = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import torch, transformers
from precisionrt.models.tokenizer import train_bpe
torch.manual_seed(0)
cfg = transformers.Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=128, vocab_size=320, max_position_embeddings=256, head_dim=16)
transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained({str(root / 'ckpt')!r})
train_bpe({str(root / 'ckpt')!r}, ["what is 12+34? 46"] * 30, vocab_size=300)
from precisionrt.train import main
sys.exit(main(["--config", {str(ROOT / 'configs/lm_tiny_cpu.toml')!r}, *{LM_SETS!r},
               "--set", 'run.dir="{root / 'run'}"']))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise SystemExit(f"making the bases failed:\n{proc.stderr[-3000:]}")
    return {"ckpt": root / "ckpt", "run": root / "run"}


LM_SETS = [x for kv in ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
                        "model.seq_length=16", "train.batch_size=2", "train.steps=4", "train.checkpoint_every=2",
                        "train.keep_checkpoints=0", "train.log_every=2", "train.eval_every=4",
                        "train.eval_batches=1", "train.warmup_steps=1", "data.max_bytes=50000"]
           for x in ("--set", kv)]


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# ------------------------------------------------------------------------------------ checkpoint mutations

def config_case(**changes):
    def setup(work, bases):
        path = copy(bases["ckpt"], work / "ckpt")
        cfg = json.loads((path / "config.json").read_text())
        for k, v in changes.items():
            if v is DELETE:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (path / "config.json").write_text(json.dumps(cfg))
        return {"path": path}
    return setup


DELETE = object()


def raw_config(text: bytes):
    def setup(work, bases):
        path = copy(bases["ckpt"], work / "ckpt")
        (path / "config.json").write_bytes(text)
        return {"path": path}
    return setup


def replace_file(target: Path, kind: str, work: Path, content: bytes = b"") -> None:
    """Put a hostile ``kind`` of file where ``target`` was: a FIFO, a directory, nothing, an empty file, random
    bytes, a symlink to /dev/zero, to itself or out of the directory (holding ``content``), or ``content``."""
    if target.exists() or target.is_symlink():
        target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dir":
        target.mkdir()
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "garbage":
        target.write_bytes(os.urandom(4096))
    elif kind == "devzero":
        target.symlink_to("/dev/zero")
    elif kind == "loop":
        target.symlink_to(target.name)
    elif kind == "symlink out":
        (work / "elsewhere").write_bytes(content or b"{}")
        target.symlink_to(work / "elsewhere")
    elif kind == "write":
        target.write_bytes(content)
    elif kind != "missing":
        raise ValueError(f"replace_file: no kind {kind!r}")


def special(name: str, kind: str, sharded: bool = False):
    def setup(work, bases):
        path = shard(work, bases) if sharded else copy(bases["ckpt"], work / "ckpt")
        replace_file(path / name, kind, work)
        return {"path": path}
    return setup


def tensors_case(edit):
    def setup(work, bases):
        from safetensors.torch import load_file, save_file

        path = copy(bases["ckpt"], work / "ckpt")
        values = load_file(path / "model.safetensors")
        edit(values, path)
        save_file(values, path / "model.safetensors")
        return {"path": path}
    return setup


def forge_dtype(dtype: str, name="model.norm.weight"):
    def setup(work, bases):
        path = copy(bases["ckpt"], work / "ckpt")
        file = path / "model.safetensors"
        data = file.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8: 8 + n])
        header[name]["dtype"] = dtype
        raw = json.dumps(header, separators=(",", ":")).encode()
        file.write_bytes(data[:8] + raw + b" " * (n - len(raw)) + data[8 + n:])
        return {"path": path}
    return setup


def truncate(fraction: float):
    def setup(work, bases):
        path = copy(bases["ckpt"], work / "ckpt")
        file = path / "model.safetensors"
        data = file.read_bytes()
        file.write_bytes(data[: int(len(data) * fraction)])
        return {"path": path}
    return setup


def shard(work: Path, bases: dict, edit=None, name="ckpt") -> Path:
    from safetensors.torch import load_file, save_file

    path = copy(bases["ckpt"], work / name)
    values = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(values)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: values[n] for n in part}, path / file)
    weight_map = {n: f for f, part in halves.items() for n in part}
    index = {"metadata": {}, "weight_map": edit(weight_map, path, work) if edit else weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def index_case(edit):
    return lambda work, bases: {"path": shard(work, bases, edit)}


def outside_shard(wm, path, work):
    (work / "outside").mkdir()
    shutil.copy(path / "model-00002-of-00002.safetensors", work / "outside" / "evil.safetensors")
    return {n: "../outside/evil.safetensors" if f.endswith("2.safetensors") else f for n, f in wm.items()}


def absolute_shard(wm, path, work):
    (work / "outside").mkdir()
    shutil.copy(path / "model-00002-of-00002.safetensors", work / "outside" / "evil.safetensors")
    return {n: str(work / "outside" / "evil.safetensors") if f.endswith("2.safetensors") else f for n, f in wm.items()}


def linked_shard(inside: bool):
    def setup(work, bases):
        path = shard(work, bases)
        real = path / "model-00002-of-00002.safetensors"
        where = (path / "real.safetensors") if inside else (work / "outside.safetensors")
        real.rename(where)
        real.symlink_to(where.name if inside else where)
        return {"path": path}
    return setup


def hub_layout(work, bases):
    """A hub cache snapshot: files are symlinks into the repository's blobs/ (valid)."""
    repo = work / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in bases["ckpt"].iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f.name)
    return {"path": snap}


def add_tensor(name, like="model.layers.1.mlp.up_proj.weight"):
    return tensors_case(lambda v, p: v.__setitem__(name, v[like].clone()))


def set_value(name, value):
    def edit(v, p):
        v[name].view(-1)[0] = value
    return tensors_case(edit)


# ---------------------------------------------------------------------------------------------- to_hf targets

def export_target(kind: str):
    def setup(work, bases):
        out = work / "out"
        if kind == "foreign":
            (out / "sub").mkdir(parents=True)
            (out / "important.txt").write_text("mine")
            (out / "sub" / "thesis.tex").write_text("years")
        elif kind == "file":
            out.write_text("mine")
        elif kind == "symlink":
            (work / "elsewhere").mkdir()
            (work / "elsewhere" / "important.txt").write_text("mine")
            out.symlink_to(work / "elsewhere")
        elif kind == "empty":
            out.mkdir()
        elif kind == "fifo":
            os.mkfifo(out)
        elif kind == "own":
            (out).mkdir()
            (out / ".precisionrt-export.json").write_text(json.dumps(
                {"written_by": "precisionrt.to_hf", "version": 1, "files": ["config.json"]}))
            (out / "config.json").write_text("{}")
        elif kind == "edited":
            out.mkdir()
            (out / ".precisionrt-export.json").write_text(json.dumps(
                {"written_by": "precisionrt.to_hf", "version": 1, "files": ["config.json"]}))
            (out / "config.json").write_text("{}")
            (out / "notes.md").write_text("mine")
        elif kind == "forged marker":
            out.mkdir()
            (out / ".precisionrt-export.json").write_text("[1, 2]")
            (out / "important.txt").write_text("mine")
        elif kind == "proc":
            out = Path("/proc/self")
        return {"out": out, "tokenizer": None}
    return setup


def export_tokenizer(kind: str):
    def setup(work, bases):
        tok = copy(bases["ckpt"], work / "tok")
        target = tok / "tokenizer_config.json"
        target.unlink()
        if kind == "symlink out":
            (work / "secret.txt").write_text("password")
            target.symlink_to(work / "secret.txt")
        elif kind == "fifo":
            os.mkfifo(target)
        elif kind == "devzero":
            target.symlink_to("/dev/zero")
        return {"out": work / "out", "tokenizer": tok}
    return setup


# ------------------------------------------------------------------------------------------ tokenizer cases

def tokenizer_file(name: str, kind: str, content: bytes = b""):
    def setup(work, bases):
        tok = copy(bases["ckpt"], work / "tok")
        replace_file(tok / name, kind, work, content)
        return {"path": tok}
    return setup


def template(source: str):
    def setup(work, bases):
        tok = copy(bases["ckpt"], work / "tok")
        cfg = json.loads((tok / "tokenizer_config.json").read_text())
        cfg["chat_template"] = source
        (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
        (tok / "chat_template.jinja").unlink(missing_ok=True)
        return {"path": tok}
    return setup


# ------------------------------------------------------------------------------------------------ run cases

def run_case(edit, steps: int = 6):
    def setup(work, bases):
        run = copy(bases["run"], work / "run")
        edit(run, work)
        return {"run": run, "steps": steps}
    return setup


def _ckpt(run):
    return run / "checkpoints"


def renamed_copy(run, work):
    for s in ("", ".sha256"):
        shutil.copy(_ckpt(run) / f"step_000004.pt{s}", _ckpt(run) / f"step_999999999.pt{s}")


def flipped_no_digest(run, work):
    f = _ckpt(run) / "step_000004.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    (_ckpt(run) / "step_000004.pt.sha256").unlink()


def newest_special(kind):
    def edit(run, work):
        f = _ckpt(run) / "step_000004.pt"
        f.unlink()
        if kind == "fifo":
            os.mkfifo(f)
        else:
            f.mkdir()
    return edit


def digest_special(kind):
    def edit(run, work):
        f = _ckpt(run) / "step_000004.pt.sha256"
        f.unlink()
        os.mkfifo(f) if kind == "fifo" else f.mkdir()
    return edit


def config_json(kind):
    def edit(run, work):
        f = run / "config.json"
        f.unlink()
        if kind == "garbage":
            f.write_bytes(b"\x00\xff garbage")
        elif kind == "fifo":
            os.mkfifo(f)
        elif kind == "list":
            f.write_text("[]")
    return edit


def pickled_checkpoint(run, work):
    import hashlib
    import pickle

    f = _ckpt(run) / "step_000006.pt"
    f.write_bytes(pickle.dumps({"step": 6, "obj": Path("/")}))   # not a zip archive, and an arbitrary object
    (_ckpt(run) / "step_000006.pt.sha256").write_text(hashlib.sha256(f.read_bytes()).hexdigest())


def checkpoints_unreadable(run, work):
    os.chmod(_ckpt(run), 0o000)


def held_by_another(run, work):
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from precisionrt.run import lock; "
            "lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run), str(ROOT)], stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    (work / "holder.pid").write_text(str(holder.pid))


def held_by_a_killed_one(run, work):
    held_by_another(run, work)
    pid = int((work / "holder.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


# ------------------------------------------------------------------------------------------------ log cases

def log_file(layers: int, switches: int = 0, layer_name=lambda i: f"decoder.layers.{i}.mlp.linear_fc1"):
    def setup(work, bases):
        names = [layer_name(i) for i in range(layers)]
        recs = [{"v": 1, "kind": "run_start", "run": "r", "time": 0.0, "config": {},
                 "layers": [{"name": n, "index": i, "gemm_flops_per_token": 1.0} for i, n in enumerate(names)]}]
        recs += [{"v": 1, "kind": "switch", "run": "r", "time": 0.0, "step": 5 + i, "layer": names[i % layers],
                  "from": "fp8", "to": "bf16", "reason": "overflow", "signals": {}} for i in range(switches)]
        recs.append({"v": 1, "kind": "run_end", "run": "r", "time": 0.0, "step": 100})
        log = work / "precision_events.jsonl"
        log.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return {"log": log, "out": work / "out.png"}
    return setup


def log_special(kind):
    def setup(work, bases):
        log = work / "precision_events.jsonl"
        if kind == "fifo":
            os.mkfifo(log)
        elif kind == "loop":
            (work / "d").mkdir()
            (work / "d" / "loop").symlink_to(work / "d")
            log = work / "d"
        elif kind == "garbage":
            log.write_bytes(os.urandom(10000))
        return {"log": log, "out": work / "out.png"}
    return setup


# ------------------------------------------------------------------------------------------------ the cases

def cases() -> list[Case]:
    c: list[Case] = []
    H = "hf checkpoint"

    def hf(name, setup, expect=REFUSE, names="", cls=H):
        c.append(Case(name, cls, "from_hf", expect, setup, names))

    hf("valid checkpoint", lambda w, b: {"path": copy(b["ckpt"], w / "ckpt")}, OK)
    hf("hub snapshot layout", hub_layout, OK)
    for key, values in {"hidden_size": ["64", True, 0, -64, 2**40, 64.0, None], "num_hidden_layers": ["2", False, 0],
                        "num_attention_heads": ["4", 0, 3], "num_key_value_heads": ["2", 3, 0, True],
                        "intermediate_size": [-1, "128"], "vocab_size": [0, 2**40, "320"],
                        "head_dim": [-4, 15, "16", 0], "max_position_embeddings": ["big", -1],
                        "rms_norm_eps": [float("nan"), -1.0, 0.0, "1e-6", float("inf")],
                        "rope_theta": [-1.0, 0.0, float("nan"), "1e6"], "tie_word_embeddings": ["false", 1],
                        "use_sliding_window": ["no", True], "layer_types": ["full", [1, 2], ["sliding_attention"] * 2],
                        "hidden_act": ["gelu", 5], "dtype": ["int8", 16], "model_type": ["gpt2", None, 5, "llama"],
                        "initializer_range": [-1.0, "x"], "attention_bias": [True, "false"],
                        "rope_scaling": ["big", [1], {"rope_type": "yarn", "factor": 2.0}],
                        "rope_parameters": [{"rope_type": "llama3", "rope_theta": 1e4},
                                            {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                                             "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                                             "original_max_position_embeddings": 64},
                                            {"rope_type": "linear", "rope_theta": 1e4, "factor": -2.0},
                                            {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}],
                        "num_experts": [8]}.items():
        for v in values:
            hf(f"config {key} = {v!r}"[:80], config_case(**{key: v, **({"rope_parameters": DELETE}
                                                                    if key in ("rope_theta", "rope_scaling") else {})}),
               names=key if key not in ("rope_scaling", "rope_parameters") else "")
    for name, text in {"config not JSON": b"{not json", "config not UTF-8": b"\xff\xfe\x00",
                       "config a list": b"[1, 2]", "config empty": b"", "config deeply nested": b"[" * 100000,
                       "config NaN literal everywhere": b'{"hidden_size": NaN}'}.items():
        hf(name, raw_config(text), names="config.json")
    for kind in ("fifo", "dir", "missing", "devzero", "loop"):
        hf(f"config.json {kind}", special("config.json", kind), names="config.json")
    for kind in ("fifo", "dir", "missing", "empty", "garbage", "devzero", "loop"):
        hf(f"model.safetensors {kind}", special("model.safetensors", kind), names="model.safetensors")
    for frac in (0.01, 0.5, 0.99):
        hf(f"model.safetensors truncated to {frac:.0%}", truncate(frac), names="model.safetensors")
    for dtype in ("I32", "BOOL", "U8", "I64"):   # I32: the same size, caught by its dtype; the others by their size
        hf(f"header says {dtype} over F32 data", forge_dtype(dtype),
           names="model.norm.weight" if dtype == "I32" else "model.safetensors")
    hf("an extra tensor", add_tensor("unrelated.weight"), names="unrelated.weight")
    hf("an extra layer", add_tensor("model.layers.2.mlp.up_proj.weight"), names="weights hold 3 layers")
    hf("num_hidden_layers smaller than the weights", config_case(num_hidden_layers=1), names="num_hidden_layers")
    hf("model_type llama over Qwen3 weights", config_case(model_type="llama", head_dim=DELETE), names="q/k norms")
    hf("model_type qwen2 over Qwen3 weights", config_case(model_type="qwen2"), names="q_proj.bias")
    hf("a missing tensor", tensors_case(lambda v, p: v.pop("model.layers.0.self_attn.k_norm.weight")),
       names="k_norm")
    hf("a tensor of the wrong shape", tensors_case(
        lambda v, p: v.__setitem__("model.norm.weight", v["model.norm.weight"][:32].clone())), names="model.norm.weight")
    hf("a NaN weight", set_value("model.layers.0.mlp.down_proj.weight", float("nan")), names="non-finite")
    hf("an infinite weight", set_value("model.embed_tokens.weight", float("inf")), names="non-finite")
    hf("tied config with a different lm_head", config_case(tie_word_embeddings=True), names="lm_head.weight")
    hf("shard escapes with ../", index_case(outside_shard), names="climbs out")
    hf("shard is an absolute path", index_case(absolute_shard), names="absolute path")
    hf("shard is a symlink out of the directory", linked_shard(False), names="outside the directory")
    hf("shard is a symlink inside the directory", linked_shard(True), OK)
    hf("weight_map is a list", index_case(lambda wm, p, w: [1, 2]), names="weight_map")
    hf("weight_map holds ints", index_case(lambda wm, p, w: {n: 1 for n in wm}), names="weight_map")
    hf("index names a pickle", index_case(lambda wm, p, w: {n: "pytorch_model.bin" for n in wm}), names=".bin")
    hf("index names a missing shard", index_case(
        lambda wm, p, w: {**wm, "model.norm.weight": "model-00003-of-00003.safetensors"}), names="missing")
    hf("index names a tensor its shard lacks", index_case(
        lambda wm, p, w: {n: ("model-00001-of-00002.safetensors" if n == "model.norm.weight" else f)
                          for n, f in wm.items()}), names="model.norm.weight")
    hf("index omits a tensor a shard holds", index_case(
        lambda wm, p, w: {n: f for n, f in wm.items() if n != "model.norm.weight"}), names="model.norm.weight")
    for kind in ("fifo", "dir", "garbage"):
        hf(f"index {kind}", special("model.safetensors.index.json", kind, sharded=True), names="index")
        hf(f"shard {kind}", special("model-00001-of-00002.safetensors", kind, sharded=True), names="00001")

    X = "to_hf"
    for kind, expect in (("foreign", REFUSE), ("file", REFUSE), ("symlink", REFUSE), ("fifo", REFUSE),
                         ("edited", REFUSE), ("forged marker", REFUSE), ("proc", REFUSE), ("empty", OK),
                         ("own", OK)):
        c.append(Case(f"export into a {kind} target", X, "to_hf", expect, export_target(kind), "out" if kind != "proc" else "proc"))
    for kind in ("symlink out", "fifo", "devzero"):
        c.append(Case(f"export copies a tokenizer file that is a {kind}", X, "to_hf", REFUSE, export_tokenizer(kind),
                      "tokenizer_config.json"))

    T = "tokenizer"
    for name, kind, content in (("tokenizer.json", "fifo", b""), ("tokenizer.json", "dir", b""),
                                ("tokenizer.json", "symlink out", b""), ("tokenizer.json", "write", b"{}"),
                                ("tokenizer.json", "write", b"\xff garbage"), ("tokenizer.json", "missing", b""),
                                ("tokenizer_config.json", "fifo", b""), ("tokenizer_config.json", "write", b"[1]"),
                                ("tokenizer_config.json", "write", b"{bad"), ("generation_config.json", "fifo", b""),
                                ("generation_config.json", "write", b'{"eos_token_id": {}}'),
                                ("generation_config.json", "write", b'{"eos_token_id": []}'),
                                ("generation_config.json", "write", b'{"eos_token_id": "2"}'),
                                ("generation_config.json", "write", b'{"eos_token_id": 99999}'),
                                ("generation_config.json", "write", b'{"eos_token_id": -1}'),
                                ("generation_config.json", "write", b'[1]'),
                                ("special_tokens_map.json", "fifo", b""), ("vocab.json", "fifo", b"")):
        label = content.decode("utf-8", "replace")[:24] if kind == "write" else kind
        c.append(Case(f"{name} {label}", T, "tokenizer", REFUSE, tokenizer_file(name, kind, content), name))
    c.append(Case("valid tokenizer", T, "tokenizer", OK, lambda w, b: {"path": b["ckpt"]}))

    R = "chat template"
    for label, source in {
            "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "loop over a long string twice": "{% for a in messages[0].content * 1000 %}{% for b in messages[0].content"
                                             " * 1000 %}{% endfor %}{% endfor %}",
            "string times 1e10": "{{ 'x' * 10**10 }}", "list times 1e9": "{{ [1] * 10**9 }}",
            "doubling concatenation": "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ "
                                      "ns.s %}{% endfor %}{{ ns.s }}",
            "center 1e9": "{{ 'x'.center(10**9) }}", "center filter 1e9": "{{ 'x'|center(10**9) }}",
            "format width": "{{ '{:>999999999}'.format(1) }}", "percent width": "{{ '%0999999999d' % 1 }}",
            "output of 10 MB": "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
            "raises": "{{ raise_exception('nope') }}", "syntax error": "{% for %}",
            "infinite recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "undefined call": "{{ nothing.here() }}", "include": "{% include 'other' %}",
            "sandbox escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
            "a number, not a template": 5}.items():
        c.append(Case(f"template: {label}", R, "render", REFUSE, template(source), "chat template"))
    c.append(Case("template: ChatML", R, "render", OK, lambda w, b: {"path": b["ckpt"]}))

    Z = "resume"
    for label, edit, expect, names in (
            ("a renamed copy of a checkpoint", renamed_copy, REFUSE, "step_999999999.pt"),
            ("flipped bytes and no digest", flipped_no_digest, OK, ""),
            ("the newest checkpoint a FIFO", newest_special("fifo"), OK, ""),
            ("the newest checkpoint a directory", newest_special("dir"), REFUSE, "step_000004.pt"),
            ("the newest digest a FIFO", digest_special("fifo"), OK, ""),
            ("the newest digest a directory", digest_special("dir"), REFUSE, "step_000004.pt.sha256"),
            ("config.json missing", config_json("missing"), REFUSE, "config.json"),
            ("config.json garbage", config_json("garbage"), REFUSE, "config.json"),
            ("config.json a FIFO", config_json("fifo"), REFUSE, "config.json"),
            ("config.json a list", config_json("list"), REFUSE, "config.json"),
            ("a raw pickle as the newest checkpoint", pickled_checkpoint, REFUSE, "weights_only"),
            ("another process holds the run", held_by_another, REFUSE, "in use by process"),
            ("a killed process's stale lock", held_by_a_killed_one, OK, "")):
        c.append(Case(f"resume: {label}", Z, "lm", expect, run_case(edit), names))

    L = "log tool"
    c.append(Case("timeline of 5000 layers", L, "timeline", OK, log_file(5000, 2000)))
    c.append(Case("timeline of 5000 layers, 20000 switches", L, "timeline", OK, log_file(5000, 20000)))
    c.append(Case("export of formula layer names", L, "export", OK,
                  log_file(3, 3, lambda i: ['=HYPERLINK("http://x","y")', "+1+cmd", "@SUM(A1)"][i])))
    for kind in ("fifo", "loop", "garbage"):
        c.append(Case(f"summarize a log that is a {kind}", L, "summarize", "either", log_special(kind)))
    return c


# ---------------------------------------------------------------------------------------------- the surfaces

def surface(case: Case, args: dict, work: Path):
    """Run the case's surface; returns (outcome, message): returned / refused / damaged."""
    from precisionrt.config import ConfigError, StartupError
    from precisionrt.files import UnsafeFile
    from precisionrt.models.chat_template import TemplateError
    from precisionrt.models.hf.arch import HFCheckpointError
    from precisionrt.models.hf.save import ExportRefused
    from precisionrt.run.checkpoint import CheckpointError

    known = (HFCheckpointError, ExportRefused, TemplateError, UnsafeFile, ConfigError, StartupError, CheckpointError)
    try:
        if case.surface in ("from_hf", "to_hf"):
            from precisionrt.distributed.parallel import init_parallel
            from precisionrt.models.hf.load import from_hf

            init_parallel(1)
        if case.surface == "from_hf":
            from_hf(args["path"])
        elif case.surface == "to_hf":
            from precisionrt.models.hf.save import to_hf

            model = from_hf(BASES["ckpt"])
            before = snapshot(work)
            try:
                to_hf(model, args["out"], tokenizer_dir=args["tokenizer"])
            except known:
                if snapshot(work) != before:
                    return "damaged", "refused, but the work directory changed"
                raise
            if not (Path(args["out"]) / ".precisionrt-export.json").is_file():
                return "damaged", "no marker in the export"
        elif case.surface == "tokenizer":
            from precisionrt.models.gpt import ModelConfig
            from precisionrt.models.tokenizer import check_tokenizer

            check_tokenizer(ModelConfig(tokenizer_path=str(args["path"]), vocab_size=512))
        elif case.surface == "render":
            from precisionrt.models.tokenizer import HFTokenizer

            HFTokenizer(args["path"]).render([{"role": "user", "content": "hi" * 50}], add_generation_prompt=True)
        elif case.surface == "lm":
            from precisionrt.train import main

            rc = main(["--config", str(ROOT / "configs/lm_tiny_cpu.toml"), *LM_SETS, "--set", f'run.dir="{args["run"]}"',
                       "--set", "train.resume=true", "--set", f"train.steps={args['steps']}"])
            err = (work / "stderr").read_text()
            if rc == 2:
                return "refused", [line for line in err.splitlines() if "error" in line][-1]
            if rc != 0:
                return "traceback", err[-2000:]
            if json.loads((args["run"] / "summary.json").read_text())["steps"] != args["steps"]:
                return "damaged", "the run did not reach its steps"
        elif case.surface in ("timeline", "export", "summarize"):
            from precisionrt.observe.cli import main

            if case.surface == "timeline":
                rc = main(["timeline", str(args["log"]), "-o", str(args["out"])])
                if rc == 0 and os.path.getsize(args["out"]) > 20 << 20:
                    return "damaged", "an image over 20 MB"
            elif case.surface == "export":
                rc = main(["export", str(args["log"]), "-o", str(work / "out.csv")])
                text = (work / "out.csv").read_text()
                if any(bad in text for bad in (',"=HYPERLINK', ",+1+cmd", ",@SUM")):
                    return "damaged", "a formula cell left unescaped"
            else:
                rc = main(["summarize", str(args["log"])])
            if rc not in (0, 1, 2):
                return "traceback", f"exit status {rc}"
            if rc:
                return "refused", (work / "stderr").read_text().strip().splitlines()[-1]
    except known as e:
        return "refused", str(e)
    except SystemExit as e:
        return ("returned", "") if not e.code else ("refused", (work / "stderr").read_text().strip()[-300:])
    except BaseException:
        return "traceback", traceback.format_exc()[-3000:]
    return "returned", ""


def snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in files + dirs:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file() and name not in ("stdout", "stderr"):
                out[str(p)] = p.read_bytes()
            else:
                out[str(p)] = "other"
    return out


def classify(case: Case, outcome: str, message: str) -> str:
    if outcome == "traceback":
        return "traceback"
    if outcome == "damaged":
        return "silent"
    if case.expect == "either":
        return "clear" if outcome == "returned" or "\n" not in message.strip() else "traceback"
    if case.expect == OK:
        return "clear" if outcome == "returned" else "refused"
    if outcome == "returned":
        return "silent"
    if "\n" in message.strip() or (case.names and case.names not in message):
        return "traceback"   # a refusal, but not one clear line naming the file or field
    return "clear"


BASES: dict = {}


def run_one(case: Case, root: Path, timeout: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="case-", dir=root))
    try:
        args = case.setup(work, BASES)
    except Exception:
        return {"case": case.name, "class": case.cls, "result": "traceback", "message": "setup failed:\n" +
                traceback.format_exc()[-1500:], "seconds": 0.0}
    result_file = work / "result.json"
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:   # the child: its own output files, the surface, the result
        code = 0
        try:
            os.setsid()
            for fd, name in ((1, "stdout"), (2, "stderr")):
                f = os.open(work / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(f, fd)
            outcome, message = surface(case, args, work)
            result_file.write_text(json.dumps({"outcome": outcome, "message": message}))
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    deadline, status = start + timeout, None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        result = {"result": "hang", "message": f"still running after {timeout:g} s"}
        cleanup(work)
        return {"case": case.name, "class": case.cls, **result, "seconds": round(time.monotonic() - start, 2)}
    if result_file.exists():
        r = json.loads(result_file.read_text())
        result = {"result": classify(case, r["outcome"], r["message"]), "message": r["message"][-1500:]}
    else:
        result = {"result": "traceback", "message": f"the child died (status {status}): "
                  + (work / "stderr").read_text()[-1500:]}
    cleanup(work)
    return {"case": case.name, "class": case.cls, **result, "seconds": round(time.monotonic() - start, 2)}


def cleanup(work: Path) -> None:
    pidfile = work / "holder.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass
    for d in work.rglob("*"):   # a case may have made a directory unreadable
        if d.is_dir() and not d.is_symlink():
            os.chmod(d, 0o755)
    shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write every case's result here")
    p.add_argument("--only", help="run the cases whose name contains this")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as a hang")
    p.add_argument("-v", "--verbose", action="store_true", help="print every case, not only the misses")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="hostile-"))
    try:
        print("making a tiny checkpoint and a finished tiny run ...", flush=True)
        BASES.update(make_bases(root))
        # the heavy imports once, in the parent: each forked case starts in milliseconds
        import precisionrt.models.hf.load  # noqa: F401
        import precisionrt.observe.cli  # noqa: F401
        import precisionrt.train  # noqa: F401
        todo = [c for c in cases() if not args.only or args.only in c.name]
        results = []
        for i, case in enumerate(todo):
            r = run_one(case, root, args.timeout)
            results.append(r)
            if args.verbose or r["result"] != "clear":
                print(f"[{i + 1}/{len(todo)}] {r['result']:<9} {case.cls}: {case.name} ({r['seconds']} s)"
                      + ("" if r["result"] == "clear" else f"\n    {r['message'].strip()[-600:]}"), flush=True)
        counts = {k: sum(r["result"] == k for r in results) for k in ("clear", "traceback", "silent", "refused", "hang")}
        by_class = {}
        for r in results:
            by_class.setdefault(r["class"], {}).setdefault(r["result"], 0)
            by_class[r["class"]][r["result"]] += 1
        for cls, n in by_class.items():
            print(f"  {cls:<14} " + ", ".join(f"{k} {v}" for k, v in sorted(n.items())))
        print(f"{len(results)} cases: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        if args.json:
            Path(args.json).write_text(json.dumps({"counts": counts, "by_class": by_class, "cases": results},
                                                  indent=2) + "\n")
        return 0 if counts["clear"] == len(results) else 1
    finally:
        for d in root.rglob("*"):
            if d.is_dir() and not d.is_symlink():
                os.chmod(d, 0o755)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
