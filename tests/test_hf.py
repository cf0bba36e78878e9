"""Hugging Face checkpoints in and out (``precisionrt.from_hf`` / ``to_hf``), with transformers as the oracle.

Tolerances (logits, max abs over the valid positions of a right-padded batch whose position ids start at 5, one row with a gap):
* float32, megatron's own linears: <= 1e-4 asked; 0.0 reached at TP=1 on every family, <= 3e-7 at TP=2 (the
  row-parallel all-reduce sums two partial products).
* precisionrt's spec (BF16 GEMMs) against transformers with its linears computed the same bf16 way: exact.
* bfloat16 checkpoints (bf16 parameters end to end): relative error <= 2e-2 asserted, 6e-3 to 9e-3 reached
  (max abs 4e-3 to 8e-3; the norms round in different places).
* every layer in FP8 against the same model in BF16: relative logit error 4.4e-2 to 7.0e-2 over the six
  cases (asserted in (1e-3, 0.1) on Qwen3).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_models import CASES, VOCAB, batch, bf16_linears, hf_config, make_checkpoint
from test_tensor_parallel import free_port

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {case: (root / case, make_checkpoint(root / case, case)) for case in CASES}


def _valid(logits, hf_mask):
    return logits[hf_mask.bool()]


def _ours(path, precision=False, **kwargs):
    from precisionrt.models.hf.load import from_hf, hf_layer_spec
    from precisionrt.models.hf.arch import HFArch

    return from_hf(path, hf_layer_spec(HFArch.from_dir(path), precision=precision), **kwargs).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_float32_logits_match_transformers(parallel, checkpoints, case):
    path, reference = checkpoints[case]
    ids, hf_mask, positions, mask = batch()
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=hf_mask, position_ids=positions).logits
        ours = _ours(path)(ids, positions, mask)
        wrong_positions = _ours(path)(ids, torch.arange(ids.shape[1]).expand_as(ids), mask)
    assert (_valid(ours, hf_mask) - _valid(theirs, hf_mask)).abs().max() <= 1e-4
    # the position ids are used: rotating by the row index instead changes the logits
    assert (_valid(wrong_positions, hf_mask) - _valid(theirs, hf_mask)).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["llama3-rope", "qwen2", "qwen3"])
def test_precision_spec_matches_transformers_with_bf16_linears_exactly(parallel, checkpoints, case):
    from precisionrt.models.hf.load import from_hf

    path, reference = checkpoints[case]
    ids, hf_mask, positions, mask = batch(seed=1)
    model = from_hf(path).eval()   # precisionrt's spec: every linear a PrecisionLinear, starting in BF16
    reference = make_checkpoint(path.parent / f"{case}-copy", case)   # same seed, same weights
    bf16_linears(reference)
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=hf_mask, position_ids=positions).logits
        ours = model(ids, positions, mask)
    assert torch.equal(_valid(ours, hf_mask), _valid(theirs, hf_mask))


def test_fp8_logit_error_against_bf16_is_bounded(parallel, checkpoints):
    from precisionrt.models.hf.load import from_hf
    from precisionrt.layers.linear import precision_layers

    path, _ = checkpoints["qwen3"]
    model = from_hf(path).eval()
    ids, hf_mask, positions, mask = batch(seed=2)
    with torch.no_grad():
        bf16 = _valid(model(ids, positions, mask), hf_mask)
        layers = precision_layers(model).values()
        assert all(layer.fp8_capable for layer in layers)
        for layer in layers:
            layer.precision = "fp8"
        fp8 = _valid(model(ids, positions, mask), hf_mask)
    rel = float((fp8 - bf16).norm() / bf16.norm())
    assert 1e-3 < rel < 0.1, rel   # FP8 changes the logits, by a few percent


def test_bfloat16_checkpoint_loads_in_bfloat16(parallel, tmp_path):
    from precisionrt.models.hf.load import from_hf

    reference = make_checkpoint(tmp_path / "bf16", "qwen3", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    model = _ours(tmp_path / "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids, hf_mask, positions, mask = batch()
    with torch.no_grad():
        theirs = _valid(reference(input_ids=ids, attention_mask=hf_mask, position_ids=positions).logits, hf_mask)
        ours = _valid(model(ids, positions, mask), hf_mask)
    assert ours.dtype == torch.bfloat16
    assert float((ours.float() - theirs.float()).norm() / theirs.float().norm()) <= 2e-2
    assert from_hf(tmp_path / "bf16", dtype="float32").embedding.word_embeddings.weight.dtype == torch.float32


def test_real_layer_shapes_of_qwen3_0_6b(parallel, tmp_path):
    """One layer at Qwen3-0.6B's shapes (hidden 1024, 16 heads over 8 groups of 128, ffn 3072; the
    vocabulary cut to 1024 to stay small)."""
    reference = make_checkpoint(tmp_path / "q", "qwen3", hidden_size=1024, num_attention_heads=16,
                                num_key_value_heads=8, head_dim=128, intermediate_size=3072, num_hidden_layers=1,
                                tie_word_embeddings=True)
    ids, hf_mask, positions, mask = batch()
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=hf_mask, position_ids=positions).logits
        ours = _ours(tmp_path / "q")(ids, positions, mask)
    assert (_valid(ours, hf_mask) - _valid(theirs, hf_mask)).abs().max() <= 1e-4


def _tensors(path):
    from safetensors.torch import load_file

    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("case", ["llama3-rope", "qwen2-tied", "qwen3"])
def test_round_trip_is_bit_exact_and_transformers_loads_the_export(parallel, checkpoints, tmp_path, case):
    from transformers import AutoModelForCausalLM

    from precisionrt.models.hf.save import to_hf

    path, reference = checkpoints[case]
    (path / "tokenizer_config.json").write_text("{}")   # a tokenizer file travels with the export
    out = to_hf(_ours(path), tmp_path / "export")
    before, after = _tensors(path), _tensors(out)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert (Path(out) / "tokenizer_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directory left"
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids, hf_mask, positions, _ = batch()
    with torch.no_grad():
        a = reference(input_ids=ids, attention_mask=hf_mask, position_ids=positions).logits
        b = reloaded(input_ids=ids, attention_mask=hf_mask, position_ids=positions).logits
    assert torch.equal(a, b)


def test_export_in_another_dtype_casts_every_tensor_and_says_so(parallel, checkpoints, tmp_path):
    """``to_hf(dtype="bfloat16")`` of an fp32 model: every tensor is the fp32 one rounded to bf16 (as torch
    rounds), config.json names the dtype, transformers loads it; an unknown dtype is refused before writing."""
    import json

    from transformers import AutoModelForCausalLM

    from precisionrt.models.hf.save import to_hf

    path, _ = checkpoints["qwen3"]
    out = to_hf(_ours(path), tmp_path / "bf16", dtype="bfloat16")
    before, after = _tensors(path), _tensors(out)
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], before[k].to(torch.bfloat16))
               for k in before)
    assert json.loads((Path(out) / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="to_hf: dtype 'float16': supported are"):
        to_hf(_ours(path), tmp_path / "fp16", dtype="float16")
    assert not (tmp_path / "fp16").exists()


def test_sharded_checkpoints_of_several_families_in_one_process(parallel, tmp_path):
    """Sharded input (an index and several files); sharded output; families loaded one after another (a name
    map shared between them would leak a tied head into an untied model)."""
    from precisionrt.models.hf.save import to_hf

    for case in ["qwen2-tied", "llama3-rope", "qwen3-tied", "qwen3"]:
        reference = make_checkpoint(tmp_path / case, case, max_shard_size="100KB")
        assert (tmp_path / case / "model.safetensors.index.json").exists()
        ids, hf_mask, positions, mask = batch()
        model = _ours(tmp_path / case)
        with torch.no_grad():
            theirs = reference(input_ids=ids, attention_mask=hf_mask, position_ids=positions).logits
            assert (_valid(model(ids, positions, mask), hf_mask) - _valid(theirs, hf_mask)).abs().max() <= 1e-4
        out = Path(to_hf(model, tmp_path / f"{case}-out", max_shard_bytes=100_000))
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert ("lm_head.weight" in index["weight_map"]) == (not hf_config(case).tie_word_embeddings)
        before, after = _tensors(tmp_path / case), _tensors(out)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_tensor_parallel_import_reads_only_its_slices_and_exports_whole(tmp_path):
    cases = ["llama3-rope", "qwen2-tied", "qwen3"]
    references = {case: make_checkpoint(tmp_path / case, case) for case in cases}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(HERE / "hf_tp_worker.py"), str(tmp_path),
           *[str(tmp_path / c) for c in cases]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(tmp_path / "tp.pt", weights_only=True)
    ids, hf_mask, positions, _ = batch()
    for case in cases:
        with torch.no_grad():
            theirs = references[case](input_ids=ids, attention_mask=hf_mask, position_ids=positions).logits
        ours = results[case]["logits"]
        assert ours.shape[-1] == VOCAB
        assert (_valid(ours, hf_mask) - _valid(theirs, hf_mask)).abs().max() <= 1e-4
        total = sum(t.numel() for t in _tensors(tmp_path / case).values())
        norms = sum(t.numel() for k, t in _tensors(tmp_path / case).items() if "norm" in k)
        assert results[case]["elements_read"] == [(total - norms) // 2 + norms] * 2, "each rank reads its half"
        before, after = _tensors(tmp_path / case), _tensors(tmp_path / f"{case}-export")
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------------------- refusals

def _config(**changes):
    cfg = hf_config("qwen3").to_dict()
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("changes, tp, names", [
    (dict(model_type="mistral"), 1, "model_type = 'mistral'"),
    (dict(model_type="qwen3_moe"), 1, "model_type = 'qwen3_moe'"),
    (dict(num_experts=8), 1, "num_experts = 8"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}), 1, "rope_type = 'yarn'"),
    (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}), 1, "rope_type = 'dynamic'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}), 1,
     "partial_rotary_factor = 0.5"),
    (dict(use_sliding_window=True, sliding_window=64), 1, "use_sliding_window = True"),
    (dict(layer_types=["sliding_attention", "full_attention"]), 1, "layer_types"),
    (dict(attention_bias=True), 1, "attention_bias = True"),
    (dict(hidden_act="gelu"), 1, "hidden_act = 'gelu'"),
    (dict(), 4, "num_key_value_heads = 2: not divisible by the tensor-parallel size 4"),
    (dict(num_attention_heads=6, num_key_value_heads=6), 4, "num_attention_heads = 6"),
    (dict(dtype="float16"), 1, "dtype = 'float16'"),
])
def test_unrepresentable_configs_are_refused_naming_the_field(changes, tp, names):
    from precisionrt.models.hf.arch import HFArch, HFCheckpointError

    with pytest.raises(HFCheckpointError, match=names.replace("(", r"\(").replace("[", r"\[")):
        HFArch.from_config(_config(**changes), tp)


def test_old_style_rope_scaling_is_read_not_dropped():
    """Released Llama 3 checkpoints keep ``rope_theta`` + ``rope_scaling`` at the top level."""
    from precisionrt.models.hf.arch import HFArch

    cfg = _config(rope_parameters=None, rope_theta=5e5, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    rope = HFArch.from_config(cfg).rope
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 5e5 and rope["factor"] == 8.0


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_checkpoints_load_nothing_and_say_what_is_wrong(parallel, checkpoints, tmp_path):
    from precisionrt.models.hf.load import from_hf
    from precisionrt.models.hf.arch import HFCheckpointError

    src, _ = checkpoints["qwen3"]
    cases = {}
    # a shard listed in the index is missing
    sharded = tmp_path / "sharded"
    make_checkpoint(sharded, "qwen3", max_shard_size="100KB")
    shard = sorted(sharded.glob("*.safetensors"))[-1]
    shard.unlink()
    cases["missing shard"] = (sharded, f"{shard.name}: shard listed in model.safetensors.index.json is missing")
    # a truncated safetensors file
    truncated = _copy(src, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (truncated, "model.safetensors: ")
    # a tensor whose shape disagrees with the config
    wrong = _copy(src, tmp_path / "wrong-shape")
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (wrong / "config.json").write_text(json.dumps(cfg))
    cases["shape"] = (wrong, r"mlp.gate_proj.weight has shape \(128, 64\), the config implies \(96, 64\)")
    # an unknown architecture; no weights; no config
    unknown = _copy(src, tmp_path / "unknown")
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (unknown / "config.json").write_text(json.dumps(cfg))
    cases["architecture"] = (unknown, "model_type = 'gpt2'")
    empty = _copy(src, tmp_path / "no-weights")
    (empty / "model.safetensors").unlink()
    cases["no weights"] = (empty, "neither model.safetensors nor model.safetensors.index.json")
    cases["no config"] = (tmp_path, "no config.json")
    # a tensor missing from the file
    from safetensors.torch import load_file, save_file

    missing = _copy(src, tmp_path / "missing-tensor")
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, missing / "model.safetensors")
    cases["missing tensor"] = (missing, "model.layers.1.self_attn.k_norm.weight")
    for what, (path, message) in cases.items():
        with pytest.raises(HFCheckpointError, match=message):
            from_hf(path)


def test_export_is_atomic_a_crash_leaves_the_old_directory_whole(parallel, checkpoints, tmp_path, monkeypatch):
    import safetensors.torch

    from precisionrt.models.hf.save import to_hf

    path, _ = checkpoints["qwen2"]
    model = _ours(path)
    out = tmp_path / "export"
    to_hf(model, out, max_shard_bytes=50_000)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real = safetensors.torch.save_file

    def crash_on_third_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", crash_on_third_shard)
    with torch.no_grad():
        model.decoder.final_layernorm.weight.add_(1.0)
    with pytest.raises(OSError, match="injected"):
        to_hf(model, out, max_shard_bytes=50_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the old export is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"], "no partial directory is left"
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    to_hf(model, out, max_shard_bytes=50_000)
    assert _tensors(out)["model.norm.weight"].equal(model.decoder.final_layernorm.weight.detach())
    from precisionrt.models.hf.save import ExportRefused

    with pytest.raises(ExportRefused, match="tokenizer_dir"):
        to_hf(model, tmp_path / "elsewhere", tokenizer_dir=tmp_path / "nowhere")
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("case", ["qwen3", "qwen2-tied"])
def test_any_spec_through_convert_layer_spec(parallel, checkpoints, case):
    """megatron's own local spec, converted, loads the same weights; a spec the map does not cover is refused."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from precisionrt import convert_layer_spec, from_hf
    from precisionrt.models.hf.arch import HFArch, HFCheckpointError
    from precisionrt.layers.linear import precision_layers
    from precisionrt.layers.spec import precision_layer_spec

    path, _ = checkpoints[case]
    qk = HFArch.from_dir(path).qk_layernorm
    spec = convert_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk), cpu_attention=True)
    ids, hf_mask, positions, mask = batch()
    theirs, ours = from_hf(path, spec).eval(), from_hf(path).eval()
    assert len(precision_layers(theirs)) == 8
    with torch.no_grad():
        assert torch.equal(theirs(ids, positions, mask), ours(ids, positions, mask))
    wrong = precision_layer_spec(qk_layernorm=not qk)   # q/k norms where the family has none, or none
    with pytest.raises(HFCheckpointError, match="name map does not cover.*layernorm"):
        from_hf(path, wrong)
