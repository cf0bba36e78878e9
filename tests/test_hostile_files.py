"""Files from elsewhere cannot hurt a run (issue 36): hostile and broken inputs, generated here from one tiny real
checkpoint, against every surface that reads or writes files, each with the outcome it must have.

* ``to_hf`` owns only what it wrote: a foreign directory, a file, a symlink, a mount point, an edited export are
  refused by name with nothing touched and no debris; a failed rename leaves the previous export whole.
* ``from_hf`` stays inside the checkpoint (shard names, symlinks), refuses special files before opening them,
  checks every config field, every tensor's presence, shape and dtype, that every tensor is used, and finite
  weights.
* tokenizers and chat templates: symlinks out, FIFOs, broken files, EOS ids, templates past their budget.
* checkpoints and resume, the run directory's lock, the log tool (further down).

``tools/hostile_files.py`` runs more cases, each in a subprocess with a timeout, and counts the outcomes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from hf_models import make_checkpoint

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from precisionrt.models.hf.arch import HFCheckpointError  # noqa: E402
from precisionrt.models.hf.save import MARKER, ExportRefused  # noqa: E402


# ----------------------------------------------------------------------------------------- the tiny checkpoint

@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A Qwen3 checkpoint (q/k norms: a wrong model_type shows) with a trained BPE tokenizer and ChatML."""
    from precisionrt.models.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("hostile") / "qwen3"
    make_checkpoint(path, "qwen3", num_hidden_layers=2)
    train_bpe(path, ["what is 12+34? 46"] * 30, vocab_size=300)
    return path


@pytest.fixture(scope="module")
def model(source, parallel):
    from precisionrt.models.hf.load import from_hf

    return from_hf(source)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_config(path: Path, **changes) -> Path:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is _DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))
    return path


_DELETE = object()


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def save_tensors(path: Path, values: dict) -> None:
    from safetensors.torch import save_file

    save_file(values, path / "model.safetensors")


@contextmanager
def within(seconds: float):
    """Fail, instead of hanging the suite, when the block runs longer than ``seconds`` (a FIFO opened blocking)."""
    def expire(*_):
        raise TimeoutError(f"hung for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def debris(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name or ".tmp" in p.name)


# ---------------------------------------------------------------------------------- 1. to_hf owns what it wrote

def test_to_hf_writes_new_and_empty_directories_and_replaces_only_its_own_export(model, tmp_path):
    from precisionrt.models.hf.save import to_hf

    out = tmp_path / "export"
    to_hf(model, out)
    marker = json.loads((out / MARKER).read_text())
    assert marker["written_by"] == "precisionrt.to_hf" and "model.safetensors" in marker["files"]
    assert "tokenizer.json" in marker["files"], "the source's tokenizer travels with the export"
    to_hf(model, out)   # its own export: replaced
    (tmp_path / "empty").mkdir()
    to_hf(model, tmp_path / "empty")
    assert (tmp_path / "empty" / MARKER).exists()
    assert debris(tmp_path) == []


@pytest.mark.parametrize("target", ["foreign directory", "regular file", "symlink", "edited export", "mount point"])
def test_to_hf_refuses_what_is_not_its_own_and_touches_nothing(model, tmp_path, monkeypatch, target):
    from precisionrt.models.hf.save import to_hf

    out = tmp_path / "out"
    if target == "foreign directory":
        (out / "sub").mkdir(parents=True)
        (out / "important.txt").write_text("mine")
        (out / "sub" / "thesis.tex").write_text("years of work")
    elif target == "regular file":
        out.write_text("mine")
    elif target == "symlink":
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "important.txt").write_text("mine")
        out.symlink_to(tmp_path / "elsewhere")
    elif target == "edited export":
        to_hf(model, out)
        (out / "notes.md").write_text("mine")
    else:
        out.mkdir()
        real = os.path.ismount
        monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == os.fspath(out) or real(p))

    def snapshot():
        return {str(p.relative_to(tmp_path)): (p.read_bytes() if p.is_file() and not p.is_symlink() else
                                               os.readlink(p) if p.is_symlink() else "dir")
                for p in sorted(tmp_path.rglob("*"))}

    before = snapshot()
    with pytest.raises(ExportRefused, match=str(out)):
        to_hf(model, out)
    assert snapshot() == before, "nothing touched"
    assert debris(tmp_path) == []


@pytest.mark.parametrize("failing", [1, 2])
def test_a_failed_rename_leaves_the_previous_export_whole_and_no_debris(model, tmp_path, monkeypatch, failing):
    """``failing``: which rename of the swap fails (1: moving the old export aside, 2: moving the new one in)."""
    import precisionrt.files as files
    from precisionrt.models.hf.save import to_hf

    out = tmp_path / "export"
    to_hf(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls, real = {"n": 0}, os.rename

    def rename(a, b):
        calls["n"] += 1
        if calls["n"] == failing:
            raise OSError(28, "No space left on device (injected)")
        return real(a, b)

    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        to_hf(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert debris(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_tokenizer_files_that_leave_their_directory_are_never_copied(model, source, tmp_path):
    from precisionrt.models.hf.save import to_hf

    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    tok = copy(source, tmp_path / "tok")
    (tok / "tokenizer_config.json").unlink()
    (tok / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(ExportRefused, match="tokenizer_config.json.*outside the directory"):
        to_hf(model, tmp_path / "export", tokenizer_dir=tok)
    assert not (tmp_path / "export").exists() and debris(tmp_path) == []


# ------------------------------------------------------------------- 2. readers stay inside what they were given

def _sharded(source: Path, dst: Path, weight_map_edit=None) -> Path:
    """``source`` as two shards with an index (what ``save_pretrained`` writes for a larger model)."""
    from safetensors.torch import save_file

    path = copy(source, dst)
    everything = tensors(path)
    (path / "model.safetensors").unlink()
    names = sorted(everything)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: everything[n] for n in part}, path / file)
    weight_map = {n: f for f, part in halves.items() for n in part}
    if weight_map_edit:
        weight_map = weight_map_edit(weight_map)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def _escape_relative(wm):
    return {n: "../outside/evil.safetensors" if f.endswith("2.safetensors") else f for n, f in wm.items()}


def test_shard_names_that_escape_the_checkpoint_are_refused(source, tmp_path, parallel):
    from precisionrt.models.hf.load import from_hf

    outside = tmp_path / "outside"
    outside.mkdir()
    good = _sharded(source, tmp_path / "good")
    shutil.copy(good / "model-00002-of-00002.safetensors", outside / "evil.safetensors")
    from_hf(good)   # the sharded copy itself loads

    relative = _sharded(source, tmp_path / "relative", _escape_relative)
    absolute = _sharded(source, tmp_path / "absolute", lambda wm: {
        n: str(outside / "evil.safetensors") if f.endswith("2.safetensors") else f for n, f in wm.items()})
    linked = _sharded(source, tmp_path / "linked")
    (linked / "model-00002-of-00002.safetensors").unlink()
    (linked / "model-00002-of-00002.safetensors").symlink_to(outside / "evil.safetensors")
    for path, message in ((relative, "climbs out of the directory"), (absolute, "is an absolute path"),
                          (linked, "outside the directory")):
        with pytest.raises(HFCheckpointError, match=message):
            from_hf(path)
    inside_link = _sharded(source, tmp_path / "inside-link")   # a symlink within the directory is fine
    (inside_link / "model-00002-of-00002.safetensors").rename(inside_link / "real.safetensors")
    (inside_link / "model-00002-of-00002.safetensors").symlink_to("real.safetensors")
    from_hf(inside_link)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "model.safetensors.index.json", "shard"])
@pytest.mark.parametrize("special", ["fifo", "directory"])
def test_special_files_are_refused_before_they_are_opened(source, tmp_path, parallel, name, special):
    from precisionrt.models.hf.load import from_hf

    path = _sharded(source, tmp_path / "ckpt") if name in ("shard", "model.safetensors.index.json") else \
        copy(source, tmp_path / "ckpt")
    target = path / ("model-00001-of-00002.safetensors" if name == "shard" else name)
    target.unlink()
    os.mkfifo(target) if special == "fifo" else target.mkdir()
    with within(20), pytest.raises(HFCheckpointError, match=f"{target.name}.*(FIFO|directory)"):
        from_hf(path)


@pytest.mark.parametrize("weight_map, message", [
    ([1, 2], "weight_map = list: must be a JSON object"),
    ({"model.norm.weight": 3}, "must be a shard file name"),
    ({"model.norm.weight": "pytorch_model.bin"}, "only .safetensors files load"),
])
def test_malformed_shard_indexes_give_one_line(source, tmp_path, parallel, weight_map, message):
    from precisionrt.models.hf.load import from_hf

    path = _sharded(source, tmp_path / "ckpt", lambda wm: weight_map)
    with pytest.raises(HFCheckpointError, match=message):
        from_hf(path)


# --------------------------------------------------------------- 3. a checkpoint checked against its config first

CONFIG_CASES = {
    "num_key_value_heads as a string": (dict(num_key_value_heads="2"), "num_key_value_heads = '2': must be an integer"),
    "hidden_size true": (dict(hidden_size=True), "hidden_size = True: must be an integer"),
    "negative head_dim": (dict(head_dim=-4), "head_dim = -4: out of range"),
    "odd head_dim": (dict(head_dim=15), "head_dim = 15"),
    "huge vocab": (dict(vocab_size=2**40), r"vocab_size = 1099511627776: out of range \[1, 4194304\]"),
    "rms_norm_eps NaN": (dict(rms_norm_eps=float("nan")), "rms_norm_eps = nan: must be finite"),
    "rms_norm_eps negative": (dict(rms_norm_eps=-1.0), "rms_norm_eps = -1.0"),
    "rope_theta negative": (dict(rope_theta=-1.0, rope_parameters=_DELETE), "rope_theta = -1.0"),
    "llama3 rope without factor": (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}),
                                   "factor = None: missing"),
    "rope_scaling a string": (dict(rope_scaling="big"), "rope_scaling = 'big': must be a JSON object"),
    "tie_word_embeddings a string": (dict(tie_word_embeddings="false"),
                                     "tie_word_embeddings = 'false': must be true or false"),
    "dtype an int": (dict(dtype=16), "dtype = 16: must be a string"),
    "model_type llama over Qwen3 weights": (dict(model_type="llama"), "q/k norms are Qwen3's"),
    "fewer layers than the weights": (dict(num_hidden_layers=1), "the weights hold 2 layers, num_hidden_layers says 1"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_fields_are_type_and_range_checked(source, tmp_path, parallel, case):
    from precisionrt.models.hf.load import from_hf

    changes, message = CONFIG_CASES[case]
    path = edit_config(copy(source, tmp_path / "ckpt"), **changes)
    with pytest.raises(HFCheckpointError, match=message):
        from_hf(path)


def test_deeply_nested_config_is_one_line(source, tmp_path, parallel):
    from precisionrt.models.hf.load import from_hf

    path = copy(source, tmp_path / "ckpt")
    (path / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(HFCheckpointError, match="nested too deeply"):
        from_hf(path)


def _forge_dtype(path: Path, name: str, dtype: str) -> None:
    """Rewrite the safetensors header so that ``name`` claims ``dtype`` over the same bytes."""
    file = path / "model.safetensors"
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8: 8 + n])
    header[name]["dtype"] = dtype
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw))
    assert len(raw) == n
    file.write_bytes(data[:8] + raw + data[8 + n:])


def test_tensors_are_checked_for_presence_dtype_use_and_finiteness(source, tmp_path, parallel):
    from precisionrt.models.hf.load import from_hf

    forged = copy(source, tmp_path / "forged")
    _forge_dtype(forged, "model.norm.weight", "I32")
    with pytest.raises(HFCheckpointError, match="model.norm.weight is stored as I32"):
        from_hf(forged)

    extra = copy(source, tmp_path / "extra")
    values = tensors(extra)
    values["model.layers.2.mlp.up_proj.weight"] = values["model.layers.1.mlp.up_proj.weight"].clone()
    values["totally.unrelated"] = torch.zeros(3)
    save_tensors(extra, values)
    with pytest.raises(HFCheckpointError, match=r"2 tensor\(s\) in the checkpoint are not used.*weights hold 3 layers"):
        from_hf(extra)

    nan = copy(source, tmp_path / "nan")
    values = tensors(nan)
    values["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_tensors(nan, values)
    with pytest.raises(HFCheckpointError, match="down_proj.weight holds 1 non-finite value.*allow_nonfinite=True"):
        from_hf(nan)
    assert from_hf(nan, allow_nonfinite=True).decoder.layers[0].mlp.linear_fc2.weight.isnan().any()


def test_memory_is_estimated_before_allocation(source, parallel, monkeypatch):
    import precisionrt.models.hf.load as load

    monkeypatch.setattr(load, "available_memory", lambda device: 1000)
    monkeypatch.setattr(load, "build_from_arch", lambda *a, **k: pytest.fail("allocated before the estimate"))
    with pytest.raises(HFCheckpointError, match=r"weights take .* GiB .* more than the 0.0 GiB available on cpu"):
        load.from_hf(source)


# ------------------------------------------------------------------------------- tokenizers and chat templates

@pytest.mark.parametrize("case, message", [
    ("symlink out", "outside the directory"),
    ("fifo", "a FIFO"),
    ("empty object", "not a tokenizers file"),
    ("missing", "no tokenizer.json"),
    ("eos a dict", r"eos_token_id = \{\}: must be a token id"),
    ("eos out of the vocabulary", r"eos_token_id = \[99999\]: must be a token id .* in \[0, \d+\)"),
])
def test_broken_tokenizers_are_one_line(source, tmp_path, case, message):
    from precisionrt.models.tokenizer import HFTokenizer

    tok = copy(source, tmp_path / "tok")
    target = tok / "tokenizer.json"
    if case == "symlink out":
        shutil.copy(target, tmp_path / "elsewhere.json")
        target.unlink()
        target.symlink_to(tmp_path / "elsewhere.json")
    elif case == "fifo":
        target.unlink()
        os.mkfifo(target)
    elif case == "empty object":
        target.write_text("{}")
    elif case == "missing":
        target.unlink()
    else:
        (tok / "generation_config.json").write_text(json.dumps({"eos_token_id": {} if case == "eos a dict" else [99999]}))
    with within(20), pytest.raises(ValueError, match=message):
        HFTokenizer(tok)


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "ran longer than 2 s|took more than 5,000,000 steps"),   # which budget ends it first depends on the CPU
    ("{{ 'x' * 10**10 }}", "a repetition would hold"),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "its output passed"),
    ("{{ 'x'|center(10**9) }}", "an argument of 1,000,000,000"),
    ("{{ raise_exception('no system prompt allowed') }}", "no system prompt allowed"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
    ("{% for %}", "does not parse"),
])
def test_chat_templates_render_under_a_budget(source, tmp_path, template, message):
    from precisionrt.models.chat_template import TemplateError
    from precisionrt.models.tokenizer import HFTokenizer

    tok = copy(source, tmp_path / "tok")
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    (tok / "chat_template.jinja").unlink(missing_ok=True)
    start = time.monotonic()
    with within(20), pytest.raises(TemplateError, match=message):
        HFTokenizer(tok).render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert time.monotonic() - start < 10


def test_the_bounded_template_renders_as_transformers_does(source):
    """The budgeted environment is transformers' own, plus the budget: the same text for the same messages."""
    from precisionrt.models.tokenizer import HFTokenizer

    tok = HFTokenizer(source)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "12+34?"},
                {"role": "assistant", "content": "46"}]
    for gen in (False, True):
        assert tok.chat_text(messages, gen) == tok.tok.apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=gen)


# ------------------------------------------------------------- 4. resume reads the truth from inside the checkpoint

ROOT = Path(__file__).parent.parent
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.seq_length=16",
        "train.batch_size=2", "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=0",
        "train.log_every=2", "train.eval_every=4", "train.eval_batches=1", "train.warmup_steps=1",
        "data.max_bytes=50000"]


def lm(run: Path, *extra):
    from precisionrt.config import load_config
    from precisionrt.train import LMConfig

    return load_config(LMConfig, ROOT / "configs/lm_tiny_cpu.toml", [*TINY, f'run.dir="{run}"', *extra])


@pytest.fixture
def finished_run(tmp_path, parallel):
    from precisionrt.train import train

    run = tmp_path / "run"
    train(lm(run))
    return run


def test_the_step_comes_from_the_checkpoint_not_its_name(finished_run):
    from precisionrt.config import StartupError
    from precisionrt.train import train

    ckpt = finished_run / "checkpoints"
    for suffix in ("", ".sha256"):   # a copy with its digest: verified, but of step 4
        shutil.copy(ckpt / f"step_000004.pt{suffix}", ckpt / f"step_999999999.pt{suffix}")
    with pytest.raises(StartupError, match="step_999999999.pt holds step 4, not 999999999"):
        train(lm(finished_run, "train.steps=6", "train.resume=true"))


def test_a_checkpoint_without_its_digest_is_not_trusted(finished_run, caplog):
    from precisionrt.train import train

    ckpt = finished_run / "checkpoints"
    data = bytearray((ckpt / "step_000004.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF   # flipped bytes, and no digest to catch them
    (ckpt / "step_000004.pt").write_bytes(bytes(data))
    (ckpt / "step_000004.pt.sha256").unlink()
    summary = train(lm(finished_run, "train.steps=6", "train.resume=true"))
    assert "step_000004.pt has no digest" in caplog.text and summary["resumed_from"] == 2


def test_a_special_file_as_the_newest_checkpoint_is_reported_not_opened(finished_run, caplog):
    from precisionrt.train import train

    ckpt = finished_run / "checkpoints"
    (ckpt / "step_000004.pt").unlink()
    os.mkfifo(ckpt / "step_000004.pt")
    with within(60):
        summary = train(lm(finished_run, "train.steps=6", "train.resume=true"))
    assert "step_000004.pt cannot be verified" in caplog.text and "a FIFO" in caplog.text
    assert summary["resumed_from"] == 2 and (ckpt / "step_000004.pt").is_file(), "rewritten as a regular file"


@pytest.mark.parametrize("damage", ["missing", "garbage", "fifo"])
def test_a_run_with_checkpoints_needs_its_config_json(finished_run, damage):
    from precisionrt.config import StartupError
    from precisionrt.train import train

    config = finished_run / "config.json"
    config.unlink()
    if damage == "garbage":
        config.write_bytes(b"\x00\xffnot json")
    elif damage == "fifo":
        os.mkfifo(config)
    with within(60), pytest.raises(StartupError, match="config.json (is missing|cannot be read)"):
        train(lm(finished_run, "train.steps=6", "train.resume=true"))


def test_every_checkpoint_carries_its_step_and_the_resolved_config(finished_run):
    state = torch.load(finished_run / "checkpoints" / "step_000004.pt", weights_only=True)
    assert state["step"] == 4 and state["config"]["train"]["steps"] == 4


@pytest.mark.parametrize("failing", ["export", "summary"])
def test_a_failed_last_step_is_an_error_and_a_resume_finishes_it(tmp_path, parallel, monkeypatch, failing):
    import precisionrt.run.command as command
    from precisionrt.train import train

    run = tmp_path / "run"
    cfg = ['model.hf_init="qwen3"', "model.num_attention_heads=2", "model.vocab_size=256", "train.export_hf=true"]
    real = command.to_hf if failing == "export" else command.write_json

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(command, "to_hf" if failing == "export" else "write_json", full_disk)
    with pytest.raises(command.FinishError, match=f"reached step 4 .* its {'export to' if failing == 'export' else 'summary.json'}.*injected.*resume it"):
        train(lm(run, *cfg))
    assert not (run / "hf").exists()
    monkeypatch.setattr(command, "to_hf" if failing == "export" else "write_json", real)
    summary = train(lm(run, *cfg, "train.resume=true"))
    assert (run / "hf" / MARKER).is_file() and summary["hf_export"] == str(run / "hf")
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["hf_export"] == str(run / "hf")
    if failing == "summary":
        assert on_disk["rebuilt"] and on_disk["final_eval_loss"] is not None
    else:
        assert "rebuilt" not in on_disk and on_disk["final_eval_loss"] is not None


# ------------------------------------------------------------------------------ 5. one process per run directory

HOLD = ("import sys, time; from precisionrt.run import lock; lock.acquire(sys.argv[1]); print('held', flush=True); "
        "time.sleep(120)")


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_ones_lock_does_not_block(finished_run):
    import subprocess
    import sys

    from precisionrt.config import StartupError
    from precisionrt.train import train

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(finished_run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (finished_run / "metrics.jsonl").read_bytes()
        with pytest.raises(StartupError, match=f"in use by process {holder.pid}"):
            train(lm(finished_run, "train.steps=6", "train.resume=true"))
        assert (finished_run / "metrics.jsonl").read_bytes() == before, "the holder's run is untouched"
    finally:
        holder.kill()
        holder.wait()
    assert (finished_run / "run.lock").read_text().strip() == str(holder.pid), "the killed process's stale lock"
    assert train(lm(finished_run, "train.steps=6", "train.resume=true"))["steps"] == 6


# ------------------------------------------------------------------------------ 6. bounded work on untrusted logs

def _log(path: Path, layers: list[str], switches: list[tuple[int, str]] = (), steps: int = 100) -> Path:
    records = [{"v": 1, "kind": "run_start", "run": "r", "time": 0.0,
                "layers": [{"name": n, "index": i, "gemm_flops_per_token": 1.0} for i, n in enumerate(layers)],
                "config": {}}]
    records += [{"v": 1, "kind": "switch", "run": "r", "time": 0.0, "step": s, "layer": n, "from": "fp8",
                 "to": "bf16", "reason": "overflow", "signals": {}} for s, n in switches]
    records.append({"v": 1, "kind": "run_end", "run": "r", "time": 0.0, "step": steps})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_timeline_of_thousands_of_layers_draws_aggregates_and_says_so(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from precisionrt.observe.cli import main

    names = [f"decoder.layers.{i}.mlp.linear_fc1" for i in range(2000)]   # tools/hostile_files.py draws 5000
    log = _log(tmp_path / "events.jsonl", names, [(10 + i % 80, names[i]) for i in range(0, 2000, 7)])
    start = time.monotonic()
    assert main(["timeline", str(log), "-o", str(tmp_path / "t.png")]) == 0
    assert time.monotonic() - start < 30
    assert "2000 layers: each row aggregates 20 consecutive layers" in capsys.readouterr().err
    width, height = Image.open(tmp_path / "t.png").size
    assert height < 4000 and width < 2000
    assert main(["timeline", str(log), "-o", str(tmp_path / "few.png"), "--layers", "decoder.layers.1?.*"]) == 0
    assert "aggregates" not in capsys.readouterr().err


def test_csv_cells_that_a_spreadsheet_would_run_are_escaped(tmp_path):
    import csv

    from precisionrt.observe.cli import main

    evil = '=HYPERLINK("http://evil.example","click")'
    log = _log(tmp_path / "events.jsonl", [evil, "+1+1", "@SUM(A1)", "-2+3", "ok"],
               [(5, evil), (6, "+1+1"), (7, "@SUM(A1)"), (8, "-2+3"), (9, "ok")])
    assert main(["export", str(log), "-o", str(tmp_path / "out.csv")]) == 0
    layers = [row["layer"] for row in csv.DictReader(open(tmp_path / "out.csv")) if row["kind"] == "switch"]
    # schema 1 switches move whole layers: a row per GEMM, three per switch
    assert list(dict.fromkeys(layers)) == ["'" + evil, "'+1+1", "'@SUM(A1)", "'-2+3", "ok"] and len(layers) == 15
