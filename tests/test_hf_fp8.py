"""The FP8 Hugging Face export (``to_hf(..., quantization="fp8")``, compressed-tensors format) and its import,
checked with the engines' own code where it runs on a CPU: compressed-tensors' parser and decompressor,
transformers' loader (``CompressedTensorsConfig(dequantize=True)``: this CPU has no FP8 GEMM), and vLLM's and
SGLang's ignore-matching rules as written in their sources.

Tolerances (tiny random Qwen3, float32 master weights, the batch of ``hf_models.batch``):
* compressed-tensors' decompression against ours: bit for bit (integer views compared).
* transformers (dequantized weights, float32) against precisionrt running the exported map (FP8 GEMMs with
  dynamic per-tensor E4M3 activations): relative logit error 3.6e-2 reached, <= 5e-2 asserted
  (LOGIT_TOLERANCE; the same size as every layer in FP8 against BF16 in ``test_hf.py``); all in BF16,
  precisionrt's import equals transformers with its linears computed the same bf16 way exactly.
* precisionrt's import of the export under the map against the exported model under it: 1.8e-7 max abs
  (exported with float32 for the non-FP8 tensors; the FP8 codes are the same bytes).
* greedy generation, both in bf16 on the dequantized weights, 8 prompts: 7 identical, 1 near-tie (top-2 margin
  < 0.05) reached; >= 6 identical and the rest near-ties asserted.
"""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from hf_models import VOCAB, batch, bf16_linears, make_checkpoint

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("compressed_tensors")

LOGIT_TOLERANCE = 5e-2
PROMOTED = "decoder.layers.1.mlp.linear_fc1"   # gate/up of layer 1: a fused group kept in BF16


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8") / "qwen3"
    make_checkpoint(path, "qwen3")
    return path


def _model(path, **kwargs):
    from precisionrt.models.hf.load import from_hf

    return from_hf(path, **kwargs).eval()


def _map(model, bf16=(PROMOTED,)):
    from precisionrt.layers.linear import precision_layers

    return {name: "bf16" if name in bf16 else "fp8" for name in precision_layers(model)}


def _export(model, out, precisions, **kwargs):
    from precisionrt.models.hf.save import to_hf

    return Path(to_hf(model, out, quantization="fp8", precisions=precisions, **kwargs))


def _run_map(model, precisions):
    from precisionrt.layers.linear import precision_layers

    for name, layer in precision_layers(model).items():
        layer.precision = precisions[name]


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(Path(path) / "model.safetensors")


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


# ------------------------------------------------------------------------------------ the format

def test_compressed_tensors_decompresses_our_export_to_our_dequantization_bit_for_bit(parallel, source, tmp_path):
    """compressed-tensors' own ``QuantizationConfig`` parses the exported config, and its ``float-quantized``
    decompressor restores every FP8 weight bit for bit as ``dequantize_weight`` does; the FP8 bytes are the ones
    the rollout's GEMM quantizes the whole megatron weight to (current scaling, one scale for q/k/v)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from precisionrt.models.hf.names import name_map
    from precisionrt.models.hf.quant import dequantize_weight
    from precisionrt.numerics.fp8 import E4M3, ScalingConfig, ScalingState, quantize_tensor

    model = _model(source)
    precisions = _map(model)
    out = _export(model, tmp_path / "fp8", precisions)
    config = json.loads((out / "config.json").read_text())
    qc = QuantizationConfig.model_validate(config["quantization_config"])
    scheme = qc.config_groups["group_0"]
    assert (qc.format, qc.quantization_status, scheme.weights.strategy) == ("float-quantized", "compressed", "tensor")
    assert scheme.input_activations.dynamic and config["dtype"] == "bfloat16"
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    disk = _tensors(out)
    params = dict(model.named_parameters())
    checked = 0
    for e in name_map(model.hf_arch, 1):
        layer = e.param.removesuffix(".weight")
        if precisions.get(layer) != "fp8":
            continue
        # the rollout: its GEMM quantizes the megatron weight under current scaling, no statistics
        q, scale, _ = quantize_tensor(params[e.param].detach(), ScalingState(E4M3, ScalingConfig(recipe="current")),
                                      update=False, stats="none")
        for piece, rollout_bytes in zip(e.pieces, e.split(q)):
            module = piece.name.removesuffix(".weight")
            ours, weight_scale = disk[piece.name], disk[module + ".weight_scale"]
            assert ours.dtype == torch.float8_e4m3fn and weight_scale.shape == (1,)
            assert torch.equal(_bits(ours), _bits(rollout_bytes)), piece.name
            assert torch.equal(weight_scale, scale.reciprocal().reshape(1)), piece.name
            theirs = compressor.decompress({"weight": ours, "weight_scale": weight_scale}, scheme)["weight"]
            assert torch.equal(_bits(theirs), _bits(dequantize_weight(ours, weight_scale, theirs.dtype))), piece.name
            checked += 1
    assert checked == 7 * 2 - 2, "q, k, v, o, gate, up, down of two layers, less layer 1's gate and up"
    for name in ("model.layers.1.mlp.gate_proj.weight", "model.embed_tokens.weight", "model.norm.weight",
                 "lm_head.weight"):
        assert disk[name].dtype == torch.bfloat16 and name.replace("weight", "weight_scale") not in disk
    sidecar = json.loads((out / "precision_map.json").read_text())
    assert sidecar["layers"] == precisions and sidecar["hf_modules"]["model.layers.1.mlp.up_proj"] == "bf16"


def test_transformers_loads_the_export_and_its_logits_match_ours_under_the_same_map(parallel, source, tmp_path):
    """transformers (dequantized on load: no FP8 GEMM on this CPU) against precisionrt running the exported map:
    the weights are the same FP8 values; precisionrt's E4M3 activations (and the BF16 rounding of the other
    tensors) are what differ: relative error 3.6e-2 reached, LOGIT_TOLERANCE asserted. The FP8 layers' bytes
    are the model's own: exported with float32 for the rest, the import run under the map gives the logits the
    trained model gives under it (the scales' float32 round trip aside: 1.8e-7 reached)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = _model(source)
    precisions = _map(model)
    out = _export(model, tmp_path / "fp8", precisions)
    theirs_model = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    ids, hf_mask, positions, mask = batch(seed=3)
    _run_map(model, precisions)
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids, attention_mask=hf_mask, position_ids=positions).logits[hf_mask.bool()]
        ours = model(ids, positions, mask)[hf_mask.bool()].float()
    rel = float((ours - theirs).norm() / theirs.norm())
    assert rel <= LOGIT_TOLERANCE, rel
    served = _model(_export(model, tmp_path / "fp32", precisions, dtype="float32"), dtype="float32")
    _run_map(served, precisions)
    with torch.no_grad():
        assert (served(ids, positions, mask) - model(ids, positions, mask))[hf_mask.bool()].abs().max() <= 1e-6


def test_greedy_generation_agrees_with_transformers_on_a_batch_of_prompts(parallel, source, tmp_path):
    """Both sides in bf16 on the export's dequantized weights (as the BF16 export test does): transformers'
    ``generate`` one prompt at a time, precisionrt's engine the whole left-padded batch. Every token agrees
    except where transformers' top-2 logit margin is within bf16's logit error (counted, and few)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from rl.inference.rollout import generate

    out = _export(_model(source), tmp_path / "fp8", _map(_model(source)))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(3, 9, (8,), generator=g)]
    steps, stop = 8, (VOCAB - 1,)
    ours = generate(_model(out, dtype="bfloat16"), prompts, steps, 32, 0.0, 1.0, torch.Generator(), stop_ids=stop)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16,
                                              quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    same, ties = 0, 0
    for prompt, comp in zip(prompts, ours):
        with torch.no_grad():
            res = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=steps, eos_token_id=list(stop), pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)
        theirs = res.sequences[0, len(prompt):].tolist()
        if theirs == comp.tokens:
            same += 1
            continue
        first = next(i for i, (a, b) in enumerate(zip(theirs + [-1], comp.tokens + [-2])) if a != b)
        top2 = res.scores[first][0].float().topk(2).values
        assert top2[0] - top2[1] < 0.05, (prompt, theirs, comp.tokens, top2)   # a real disagreement: fail
        ties += 1
    assert same >= 6 and same + ties == len(prompts), (same, ties)


@pytest.mark.parametrize("case", ["qwen2", "llama-linear-tied"])
def test_other_families_round_trip_in_fp8(parallel, tmp_path, case):
    """Qwen2's q/k/v biases stay BF16 beside FP8 weights; a tied Llama has no head tensor, and ``lm_head`` is
    still in ``ignore`` (transformers' tied head is a Linear)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    make_checkpoint(tmp_path / case, case)
    model = _model(tmp_path / case)
    out = _export(model, tmp_path / "fp8", _map(model))
    back = _model(out, dtype="float32")
    assert back.hf_precisions == _map(model)
    AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    disk = _tensors(out)
    if case == "qwen2":
        assert disk["model.layers.0.self_attn.q_proj.bias"].dtype == torch.bfloat16
    else:
        assert "lm_head.weight" not in disk


# ------------------------------------------------------------------------------------ the engines' rules

def _vllm_is_layer_skipped(layer: str, ignore: list[str], fused: dict[str, list[str]]) -> bool:
    """vLLM 0.33.0's rule, restated (see the test's docstring)."""
    def matches(name):
        return any(re.match(p[3:], name) if p.startswith("re:") else p == name for p in ignore)

    proj = layer.split(".")[-1]
    if matches(layer) or proj not in fused:
        return matches(layer)
    shards = [matches(layer.replace(proj, shard)) for shard in fused[proj]]
    if any(shards) and not all(shards):
        raise ValueError(f"Found different quantization schemes for the shards of {layer}")
    return all(shards)


def _sglang_is_layer_skipped(layer: str, ignore: list[str], fused: dict[str, list[str]]) -> bool:
    """SGLang 0.5.23's rule, restated (see the test's docstring)."""
    def matches(name):
        return any(re.match(p[3:], name) if p.startswith("re:") else (p == name or name.endswith("." + p))
                   for p in ignore)

    proj = layer.split(".")[-1]
    if proj in fused and layer not in ignore:
        shards = [matches(layer.replace(proj, shard)) for shard in fused[proj]]
        if any(shards) and not all(shards):
            raise ValueError(f"Found different quantization schemes for {fused[proj]} in {layer}")
        return all(shards)
    return matches(layer)


ENGINE_FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def test_our_ignore_names_are_what_vllm_and_sglang_skip(parallel, source, tmp_path):
    """The rules, read from the released sources (vllm 0.33.0 and sglang 0.5.23 wheels):

    * vLLM, ``vllm/model_executor/layers/quantization/compressed_tensors/utils.py:53-70`` (``is_layer_skipped``):
      ``find_matching_patterns`` (``vllm/model_executor/layers/quantization/utils/config_utils.py:384-420``)
      matches the fused layer (``model.layers.0.self_attn.qkv_proj``) itself first, else every shard, named by
      replacing the fused projection with the shard's (``q_proj``, ``k_proj``, ``v_proj``) from the model's
      ``packed_modules_mapping`` (``vllm/model_executor/models/qwen3.py:284-287``); a layer is skipped when all
      its shards match, and "Found different quantization schemes for the shards" is raised when only some do.
      A pattern matches by equality, or ``re:`` by ``re.match`` (``config_utils.py:432-452``).
    * SGLang, ``python/sglang/srt/layers/quantization/compressed_tensors/utils.py:24-100``
      (``should_ignore_layer``): a fused layer not itself in ``ignore`` is skipped when all shards match and
      raises when some do; anything else is matched by ``check_equal_or_regex_match`` (``:79-100``): equality,
      a dotted-path suffix, or ``re:``. Its Llama/Qwen classes declare no ``packed_modules_mapping``
      (``python/sglang/srt/models/llama.py:535``), so for them the fused map is empty and only the fused name
      itself (``qkv_proj``, ``gate_up_proj``) can skip the fused layer.
    * vLLM's ``ParallelLMHead`` is no ``Linear`` target (``compressed_tensors.py:186-193``): the head stays BF16
      in vLLM; transformers and SGLang skip it by the ``lm_head`` entry.

    Our ``ignore`` must make every engine skip exactly the layers the map keeps in BF16."""
    from precisionrt.models.hf.quant import FusedGroupSplit, check_fused_groups

    model = _model(source)
    bf16 = ("decoder.layers.0.self_attention.linear_qkv", PROMOTED, "decoder.layers.1.mlp.linear_fc2")
    precisions = _map(model, bf16)
    ignore = json.loads((_export(model, tmp_path / "fp8", precisions) / "config.json").read_text()
                        )["quantization_config"]["ignore"]
    engine_layers = {  # the engines' (fused) linear -> the megatron layer it is made from
        f"model.layers.{i}.{engine}": f"decoder.layers.{i}.{ours}" for i in range(2) for engine, ours in (
            ("self_attn.qkv_proj", "self_attention.linear_qkv"), ("self_attn.o_proj", "self_attention.linear_proj"),
            ("mlp.gate_up_proj", "mlp.linear_fc1"), ("mlp.down_proj", "mlp.linear_fc2"))}
    for layer, ours in engine_layers.items():
        wanted = precisions[ours] == "bf16"
        assert _vllm_is_layer_skipped(layer, ignore, ENGINE_FUSED) == wanted, layer
        assert _sglang_is_layer_skipped(layer, ignore, ENGINE_FUSED) == wanted, layer
        assert _sglang_is_layer_skipped(layer, ignore, {}) == wanted, (layer, "SGLang's Llama/Qwen: no fused map")
    assert _sglang_is_layer_skipped("lm_head", ignore, {})
    # why the fused names are written too: without them SGLang's Llama/Qwen would quantize a BF16 qkv_proj
    unfused = [n for n in ignore if not n.endswith(("qkv_proj", "gate_up_proj"))]
    assert not _sglang_is_layer_skipped("model.layers.0.self_attn.qkv_proj", unfused, {})
    # and why a split group is refused: vLLM raises on it at load
    with pytest.raises(ValueError, match="different quantization schemes"):
        _vllm_is_layer_skipped("model.layers.1.self_attn.qkv_proj", ["model.layers.1.self_attn.q_proj"], ENGINE_FUSED)
    split = {f"model.layers.1.self_attn.{p}_proj": "fp8" for p in "qkv"} | {"model.layers.1.self_attn.q_proj": "bf16"}
    with pytest.raises(FusedGroupSplit, match=r"model\.layers\.1\.self_attn\.qkv_proj \(q_proj: bf16, k_proj: fp8"):
        check_fused_groups(split)


# ------------------------------------------------------------------------------------ the map

def _train_with_outlier(model, run_dir, target, steps=6):
    from precisionrt import MonitorConfig, PrecisionRuntime, RuntimeConfig
    from precisionrt.run.inject import FaultInjector, InjectConfig

    rt = PrecisionRuntime(model, RuntimeConfig(mode="dynamic", control_file="", monitor=MonitorConfig(
        check_interval=2, full_stats_every=1)), run_dir=run_dir)
    inject = FaultInjector(InjectConfig(kind="outlier", layer=target, start_step=3, factor=1e6) if target else
                           InjectConfig(), model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    positions = torch.arange(32).expand(4, 32)
    events = []
    model.train()
    for step in range(1, steps + 1):
        inject.before_step(step - 1)
        tokens = torch.randint(0, VOCAB, (4, 33), generator=g)
        model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean().backward()
        opt.step()
        opt.zero_grad()
        events += rt.end_step(step)
    rt.close(steps)
    return rt, events


def test_an_injected_outlier_puts_exactly_that_layer_in_ignore(parallel, source, tmp_path):
    """An outlier in layer 0's attention input promotes its forward GEMM; the export then lists exactly q/k/v of
    layer 0 (and their fused name) beside the head, and the sidecar records the switches that led there."""
    target = "decoder.layers.0.self_attention.linear_qkv"
    model = _model(source)
    rt, events = _train_with_outlier(model, tmp_path / "run", target)
    assert {(e.layer, e.gemm, e.to) for e in events} >= {(target, "fprop", "bf16")}
    out = _export(model, tmp_path / "fp8", rt.forward_precisions(), step=6, switch_log=tmp_path / "run")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["ignore"] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.qkv_proj", "lm_head"]
    sidecar = json.loads((out / "precision_map.json").read_text())
    assert sidecar["step"] == 6 and sidecar["map_version"] == 1
    assert [(s["layer"], s["gemm"], s["to"]) for s in sidecar["switches"]] == [
        (e.layer, e.gemm, e.to) for e in events]


def test_with_nothing_promoted_ignore_is_only_the_head(parallel, source, tmp_path):
    model = _model(source)
    rt, events = _train_with_outlier(model, tmp_path / "run", None, steps=4)
    assert events == []
    out = _export(model, tmp_path / "fp8", rt.forward_precisions(), step=4, switch_log=tmp_path / "run")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["ignore"] == ["lm_head"]
    sidecar = json.loads((out / "precision_map.json").read_text())
    assert (sidecar["map_version"], sidecar["switches"]) == (0, [])


# ------------------------------------------------------------------------------------ round trip

def test_round_trip_starts_at_the_exported_precision_and_dequantizes_exactly(parallel, source, tmp_path):
    """``from_hf`` on an FP8 export: every weight is compressed-tensors' dequantization of the file, the BF16
    layers are exactly the source's (through bf16), the map comes back as ``hf_precisions`` and, as pins, starts
    the runtime at it; re-exporting the import gives the same files. A pin the configuration states wins."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from precisionrt import PrecisionRuntime, RuntimeConfig
    from precisionrt.models.hf.load import exported_pins
    from precisionrt.models.hf.save import hf_state_dict

    model = _model(source)
    precisions = _map(model)
    out = _export(model, tmp_path / "fp8", precisions)
    back = _model(out, dtype="float32")
    assert back.hf_precisions == precisions and exported_pins(back) == [PROMOTED]
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    disk, loaded = _tensors(out), hf_state_dict(back)
    for name, t in disk.items():
        if name.endswith("weight_scale"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            expected = compressor.decompress({"weight": t, "weight_scale": disk[name + "_scale"]},
                                             qc.config_groups["group_0"])["weight"]
        else:
            expected = t.float()
        assert torch.equal(loaded[name], expected), name
    rt = PrecisionRuntime(back, RuntimeConfig(mode="dynamic", pin_bf16=exported_pins(back)))
    assert rt.forward_precisions() == precisions
    again = _export(back, tmp_path / "again", rt.forward_precisions())
    # exporting the import again: the same FP8 codes and BF16 tensors; a scale may move by one float32 ulp (the
    # dequantized weight's amax is 448 * weight_scale rounded, and 448 / amax need not invert it exactly)
    first, second = _tensors(out), _tensors(again)
    assert first.keys() == second.keys()
    for name, t in first.items():
        if name.endswith("weight_scale"):
            assert abs(float(t) - float(second[name])) <= float(t) * 2.0**-23, name
        else:
            assert torch.equal(_bits(t), _bits(second[name])), name
    assert (again / "config.json").read_text() == (out / "config.json").read_text()
    # all BF16: our import equals transformers (its linears computed the same bf16 way) exactly
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    bf16_linears(hf)
    ids, hf_mask, positions, mask = batch(seed=1)
    _run_map(back, dict.fromkeys(precisions, "bf16"))
    with torch.no_grad():
        assert torch.equal(back(ids, positions, mask)[hf_mask.bool()],
                           hf(input_ids=ids, attention_mask=hf_mask, position_ids=positions).logits[hf_mask.bool()])


@pytest.mark.slow
def test_tensor_parallel_import_and_export_of_fp8_equal_one_rank(parallel, source, tmp_path):
    """At TP=2 each rank dequantizes its slices of the FP8 weights with the whole tensor's scale, and the export
    gathers before it quantizes: the TP=2 round trip writes the files the TP=1 round trip writes."""
    import subprocess
    import sys

    from test_tensor_parallel import free_port

    model = _model(source)
    out = _export(model, tmp_path / "fp8", _map(model))
    one = _model(out, dtype="float32")
    single = _export(one, tmp_path / "tp1", one.hf_precisions)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(Path(__file__).parent / "hf_fp8_tp_worker.py"), str(out),
           str(tmp_path / "tp2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _tensors(single), _tensors(tmp_path / "tp2")
    assert a.keys() == b.keys() and all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)
    assert (single / "config.json").read_text() == (tmp_path / "tp2" / "config.json").read_text()


def test_the_commands_export_fp8_and_resume_from_it_at_its_precision(tmp_path):
    """``train.export_hf_quantization = "fp8"`` in both commands (LM: a pinned BF16 layer is exactly the ignore
    list; RL: the committed tiny-Qwen3 config); a run that ended without its export finishes it from the final
    checkpoint's map; a run from that export starts with its BF16 layers pinned, unless
    ``model.hf_exported_pins = false`` or ``precision.pin_fp8`` names them."""
    from precisionrt.config import ConfigError, load_config
    from precisionrt.distributed.parallel import init_parallel
    from precisionrt.models.gpt import build_gpt
    from precisionrt.run.command import check_common, starting_precision
    from precisionrt.train import LMConfig, train
    from rl.train import RLConfig

    root = Path(__file__).resolve().parents[1]
    sets = ['model.hf_init="qwen3"', "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=256",
            "train.steps=2", "train.eval_every=2", "train.log_every=1", "train.batch_size=2", "model.seq_length=32",
            "data.max_bytes=20000", 'precision.mode="fp8"', f"precision.pin_bf16=['{PROMOTED}']",
            "train.export_hf=true", 'train.export_hf_quantization="fp8"', f'run.dir="{tmp_path / "lm"}"']
    summary = train(load_config(LMConfig, root / "configs" / "lm_tiny_cpu.toml", sets))
    out = Path(summary["hf_export"])
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                                                       "model.layers.1.mlp.gate_up_proj", "lm_head"]
    assert json.loads((out / "precision_map.json").read_text())["step"] == 2
    # a run that ended without its export (here: asked for only on resume) exports from the final checkpoint,
    # with the map that checkpoint's runtime state holds
    late = [s for s in sets if not s.startswith(("train.export_hf", "run.dir"))] + [f'run.dir="{tmp_path / "late"}"']
    train(load_config(LMConfig, root / "configs" / "lm_tiny_cpu.toml", late))
    assert not (tmp_path / "late" / "hf").exists()
    finished = train(load_config(LMConfig, root / "configs" / "lm_tiny_cpu.toml", late + [
        "train.resume=true", "train.export_hf=true", 'train.export_hf_quantization="fp8"',
        "train.resume_override=['train.export_hf*']"]))
    assert json.loads((Path(finished["hf_export"]) / "config.json").read_text())["quantization_config"] == \
        config["quantization_config"]
    with pytest.raises(ConfigError, match="set train.export_hf = true too"):
        check_common(load_config(LMConfig, root / "configs" / "lm_tiny_cpu.toml",
                                 ['train.export_hf_quantization="fp8"']), 1, 0, "", "")
    # the RL command: the committed tiny-Qwen3 config, shortened, exported in FP8 at its last step
    from rl.train import train as rl_train

    rl = rl_train(load_config(RLConfig, root / "configs" / "rl_addition_hf_cpu.toml", [
        "train.steps=2", "train.warm_start_steps=2", "train.eval_every=2", "train.log_every=1",
        "rl.prompts_per_step=2", "rl.group_size=2", "task.heldout_size=4", "train.warm_start_batch=4",
        'train.export_hf_quantization="fp8"', f'run.dir="{tmp_path / "rl"}"']))
    rl_out = Path(rl["hf_export"])
    sidecar = json.loads((rl_out / "precision_map.json").read_text())
    assert json.loads((rl_out / "config.json").read_text())["quantization_config"]["ignore"][-1] == "lm_head"
    assert sidecar["step"] == 4 and sidecar["switches"] is not None, "warm start and RL steps both count"
    assert _model(rl_out).hf_precisions == sidecar["layers"]

    dims = [f"model.{k}={getattr(load_config(LMConfig, None, []).model, k)}" for k in
            ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size")]

    def resumed(*extra):
        cfg = load_config(LMConfig, None, [f'model.hf_path="{out}"', *dims, *extra])
        init_parallel(1)
        return starting_precision(cfg, build_gpt(cfg.model)).pin_bf16, cfg

    assert resumed()[0] == [PROMOTED]
    assert resumed("model.hf_exported_pins=false")[0] == []
    assert resumed(f"precision.pin_fp8=['{PROMOTED}']")[0] == []


# ------------------------------------------------------------------------------------ hostile input

def _rewrite(src, dst, config=None, tensors=None):
    """A copy of the export ``src`` with its quantization_config changed by ``config(qc)`` and its tensors by
    ``tensors(dict)``."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        t = _tensors(dst)
        tensors(t)
        save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _set(path, value):
    def change(qc):
        *parents, last = path.split(".")
        node = qc
        for p in parents:
            node = node[p]
        node[last] = value
    return change


Q0 = "model.layers.0.self_attn.q_proj"
HOSTILE = {
    "another method": (dict(config=_set("quant_method", "awq")), r"quantization_config\.quant_method = 'awq'"),
    "another format": (dict(config=_set("format", "pack-quantized")), r"\.format = 'pack-quantized'"),
    "channel strategy": (dict(config=_set("config_groups.group_0.weights.strategy", "channel")),
                         r"group_0\.weights\.strategy = 'channel'"),
    "block strategy": (dict(config=_set("config_groups.group_0.weights.block_structure", [128, 128])),
                       r"group_0\.weights\.block_structure = \[128, 128\]"),
    "static activations": (dict(config=_set("config_groups.group_0.input_activations.dynamic", False)),
                           r"input_activations\.dynamic = False"),
    "4-bit weights": (dict(config=_set("config_groups.group_0.weights.num_bits", 4)), r"weights\.num_bits = 4"),
    "a regex in ignore": (dict(config=_set("ignore", ["re:.*q_proj", "lm_head"])), r"ignore = 're:\.\*q_proj'"),
    "missing scale": (dict(tensors=lambda t: t.pop(Q0 + ".weight_scale")), rf"{Q0}\.weight_scale is missing"),
    "NaN scale": (dict(tensors=lambda t: t[Q0 + ".weight_scale"].fill_(math.nan)), rf"{Q0}\.weight_scale is nan"),
    "infinite scale": (dict(tensors=lambda t: t[Q0 + ".weight_scale"].fill_(math.inf)), rf"{Q0}\.weight_scale is inf"),
    "channel scale": (dict(tensors=lambda t: t.update({Q0 + ".weight_scale": torch.ones(192, 1)})),
                      rf"{Q0}\.weight_scale is F32 of shape \(192, 1\)"),
    "FP8 weight the config ignores": (dict(config=lambda qc: qc["ignore"].extend(
        ["model.layers.0.mlp.down_proj"])), r"mlp\.down_proj\.weight is stored as F8_E4M3, but its "
                                            r"quantization_config lists model\.layers\.0\.mlp\.down_proj in ignore"),
    "split fused group": (dict(config=lambda qc: qc["ignore"].insert(0, Q0)),
                          r"splits the fused group model\.layers\.0\.self_attn\.qkv_proj \(q_proj: bf16"),
    "a fused name alone": (dict(config=lambda qc: qc["ignore"].insert(0, "model.layers.0.self_attn.qkv_proj")),
                           r"lists model\.layers\.0\.self_attn\.qkv_proj but not all of its shards"),
    "quantized head": (dict(config=lambda qc: qc["ignore"].remove("lm_head")), r"the head \('lm_head'\) listed"),
}


@pytest.fixture(scope="module")
def export(source, tmp_path_factory):
    from precisionrt.distributed.parallel import init_parallel

    init_parallel(1)
    model = _model(source)
    return _export(model, tmp_path_factory.mktemp("hostile") / "fp8", _map(model))


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_fp8_checkpoints_load_nothing_and_name_what_is_wrong(parallel, export, tmp_path, case):
    from precisionrt.models.hf.arch import HFCheckpointError

    changes, message = HOSTILE[case]
    bad = _rewrite(export, tmp_path / "bad", **changes)
    with pytest.raises(HFCheckpointError, match=message):
        _model(bad)


def test_fp8_weights_without_a_quantization_config_are_refused(parallel, export, tmp_path):
    from precisionrt.models.hf.arch import HFCheckpointError

    bad = _rewrite(export, tmp_path / "bad", config=lambda qc: None)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["quantization_config"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFCheckpointError, match=r"q_proj\.weight is stored as F8_E4M3, but config\.json has no "
                                                r"quantization_config"):
        _model(bad)


def test_maps_the_export_cannot_write_are_refused_with_nothing_written(parallel, source, tmp_path):
    from precisionrt.models.hf.save import to_hf

    model = _model(source)
    precisions = _map(model)
    target = tmp_path / "fp8"
    cases = [({**precisions, PROMOTED: "mixed"}, "gives decoder.layers.1.mlp.linear_fc1 'mixed'"),
             ({k: v for k, v in precisions.items() if k != PROMOTED}, r"missing \['decoder\.layers\.1\.mlp\.linear_fc1'\]"),
             ({**precisions, "decoder.layers.9.mlp.linear_fc1": "fp8"}, r"unknown \['decoder\.layers\.9"),
             (None, "needs the precision map")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            to_hf(model, target, quantization="fp8", precisions=bad)
    with pytest.raises(ValueError, match="quantization 'int8'"):
        to_hf(model, target, quantization="int8")
    with torch.no_grad():
        model.decoder.layers[0].mlp.linear_fc2.weight[0, 0] = math.inf
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.mlp\.linear_fc2\.weight holds NaN or infinite"):
        to_hf(model, target, quantization="fp8", precisions=precisions)
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
