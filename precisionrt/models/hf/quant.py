"""FP8 Hugging Face checkpoints in the compressed-tensors format, carrying the trainer's precision map.

``to_hf(model, path, quantization="fp8", precisions=rt.forward_precisions())`` writes the weight of every
managed layer whose forward (fprop) GEMM runs FP8 as ``float8_e4m3fn`` with a per-tensor ``weight_scale``; the
promoted layers, embeddings, norms and the output head stay BF16 and are listed in ``ignore``. vLLM, SGLang and
transformers read the format (``quant_method: "compressed-tensors"``, ``format: "float-quantized"``).

The bytes are the rollout's: the rollout engine quantizes each weight with current scaling
(``scale = 448 / amax``, ``q = saturate(w * scale)``, ``precisionrt.numerics.fp8``), and so does the export. The
stored ``weight_scale`` is the GEMM's dequantization multiplier ``1 / scale`` (compressed-tensors decompresses
``q.to(weight_scale.dtype) * weight_scale``), in float32 and of shape ``[1]`` as compressed-tensors writes it.
Megatron keeps q/k/v in one ``linear_qkv`` and gate/up in one ``linear_fc1``, so each fused group gets one scale,
the one the rollout's GEMM uses, and vLLM, which requantizes a fused group's shards to their largest scale,
keeps the codes unchanged.

Why the ``ignore`` list names both the unfused and the fused modules: vLLM 0.33.0 skips a fused layer
(``qkv_proj``) when all its shards (``q_proj``, ``k_proj``, ``v_proj``) are listed, and raises when only some
are (``vllm/model_executor/layers/quantization/compressed_tensors/utils.py:53-70``); SGLang 0.5.23 uses a fused
map its Llama/Qwen classes leave empty, so for them only the fused name itself is skipped
(``python/sglang/srt/layers/quantization/compressed_tensors/utils.py:24-100``). transformers and
compressed-tensors match names exactly, and an extra name matches nothing there.
"""

from __future__ import annotations

import math
import re

import torch

from precisionrt.models.hf.arch import HFArch, HFCheckpointError
from precisionrt.models.hf.names import name_map
from precisionrt.numerics.fp8 import E4M3, abs_max, compute_scale, quantize

QUANTIZATIONS = ("none", "fp8")
QUANT_METHOD = "compressed-tensors"
FLOAT_QUANTIZED = "float-quantized"
SCALE = "weight_scale"
HEAD = "lm_head"
PRECISION_MAP_FILE = "precision_map.json"
COMPRESSED_TENSORS = "compressed-tensors==0.20.1"
"""The tested pin (``constraints.txt``), named in the error when the package is missing."""
FUSED_GROUPS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
"""The modules vLLM and SGLang fuse into one GEMM (their models' ``packed_modules_mapping``): one scheme each."""

_NUMBERS = {"num_bits": 8, "type": "float", "symmetric": True}
WEIGHTS = {**_NUMBERS, "strategy": "tensor", "dynamic": False}
ACTIVATIONS = {**_NUMBERS, "strategy": "tensor", "dynamic": True}
"""Dynamic per-tensor activations, as precisionrt's GEMM quantizes its input (vLLM serves any dynamic FP8
activation per token: ``schemes/compressed_tensors_w8a8_fp8.py:44-49``)."""


class FusedGroupSplit(ValueError):
    """A precision map that gives the modules of one fused group (q/k/v, gate/up) different precisions."""


def quantization_config(ignore: list[str]) -> dict:
    """``config.json``'s ``quantization_config``: one group of per-tensor FP8 weights with dynamic per-tensor FP8
    activations over every ``Linear``, except the modules ``ignore`` names."""
    return {"config_groups": {"group_0": {"targets": ["Linear"], "weights": dict(WEIGHTS),
                                          "input_activations": dict(ACTIVATIONS), "output_activations": None,
                                          "format": FLOAT_QUANTIZED}},
            "format": FLOAT_QUANTIZED, "quant_method": QUANT_METHOD, "quantization_status": "compressed",
            "ignore": list(ignore), "kv_cache_scheme": None, "global_compression_ratio": None}


def quantize_group(weights: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(qs, weight_scale)``: the HF tensors of one megatron weight (q/k/v of ``linear_qkv``, gate/up of
    ``linear_fc1``, or one tensor) in E4M3 under current scaling with one scale from their joint amax, the bytes
    the rollout's GEMM quantizes the whole megatron weight to; and the float32 ``[1]`` multiplier that
    dequantizes them (the GEMM's inverse scale). A non-finite weight is a ValueError: E4M3 would saturate it."""
    amax = torch.stack([abs_max(w) for w in weights]).max()
    if not bool(torch.isfinite(amax)):
        raise ValueError("holds NaN or infinite values, which FP8 cannot carry")
    scale = compute_scale(amax, E4M3, 0, torch.ones((), dtype=torch.float32, device=amax.device))
    return [quantize(w, E4M3, scale) for w in weights], scale.reciprocal().reshape(1)


def dequantize_weight(q: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """compressed-tensors' decompression, ``q.to(weight_scale.dtype) * weight_scale``, in ``dtype``."""
    return (q.to(weight_scale.dtype) * weight_scale.reshape(())).to(dtype)


def module_of(tensor_name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``model.layers.0.self_attn.q_proj``."""
    return tensor_name.rsplit(".", 1)[0]


def linear_modules(arch: HFArch) -> list[str]:
    """Every transformer-layer linear of ``arch`` by HF module name (what compressed-tensors' ``Linear`` target
    covers; the head is the one other ``Linear``)."""
    return [module_of(p.name) for e in name_map(arch, 1) if e.param.endswith(".weight") and
            re.search(r"\.(linear_qkv|linear_proj|linear_fc1|linear_fc2)\.weight$", e.param) for p in e.pieces]


def module_precisions(arch: HFArch, precisions: dict[str, str]) -> dict[str, str]:
    """The managed-layer map ``{layer: "fp8" | "bf16"}`` (megatron names, the forward GEMM's precision) as HF
    modules: a megatron layer gives its precision to every HF module it is made of (``linear_qkv`` to q/k/v).
    Every managed layer must be in the map with one of the two precisions; a "mixed" layer or a name the model
    does not have is a ValueError naming it. The result is checked with ``check_fused_groups``."""
    pieces = {e.param.removesuffix(".weight"): [module_of(p.name) for p in e.pieces] for e in name_map(arch, 1)
              if e.param.endswith(".weight")}   # a bias (Qwen2's q/k/v) follows its weight's layer
    linears = set(linear_modules(arch))
    managed = {layer for layer, modules in pieces.items() if set(modules) <= linears and modules}
    unknown = sorted(set(precisions) - managed)
    missing = sorted(managed - set(precisions))
    if unknown or missing:
        raise ValueError(f"the precision map does not match the model's managed layers: "
                         f"{'unknown ' + str(unknown[:3]) if unknown else ''}"
                         f"{'; ' if unknown and missing else ''}{'missing ' + str(missing[:3]) if missing else ''}")
    out = {}
    for layer, precision in precisions.items():
        if precision not in ("fp8", "bf16"):
            raise ValueError(f"the precision map gives {layer} {precision!r}: a layer is exported 'fp8' or 'bf16' "
                             "by its forward GEMM; pass PrecisionRuntime.forward_precisions()")
        out.update(dict.fromkeys(pieces[layer], precision))
    check_fused_groups(out)
    return out


def check_fused_groups(precisions: dict[str, str], where: str = "the precision map") -> None:
    """Refuse (``FusedGroupSplit``) a map of HF modules that gives the shards of one fused group different
    precisions: vLLM and SGLang run them as one GEMM and raise at load."""
    for prefix in sorted({m.rsplit(".", 2)[0] for m in precisions if m.count(".") >= 3}):
        for fused, shards in FUSED_GROUPS.items():
            got = {s: precisions.get(f"{prefix}.{s}") for s in shards}
            if None in got.values() and set(got.values()) != {None}:
                continue   # a group this layer does not have whole
            if len(set(got.values())) > 1:
                shown = ", ".join(f"{shard.rsplit('.', 1)[-1]}: {p}" for shard, p in got.items())
                raise FusedGroupSplit(f"{where} splits the fused group {prefix}.{fused} ({shown}): vLLM and "
                                      "SGLang run it as one GEMM, so its modules share one precision")


def ignore_list(precisions: dict[str, str]) -> list[str]:
    """The compressed-tensors ``ignore`` list of a map of HF modules: every BF16 module by its own name, the fused
    name of every BF16 fused group (SGLang), and the head."""
    bf16 = [m for m, p in precisions.items() if p == "bf16"]
    fused = []
    for prefix in dict.fromkeys(m.rsplit(".", 2)[0] for m in bf16):
        for name, shards in FUSED_GROUPS.items():
            if all(precisions.get(f"{prefix}.{s}") == "bf16" for s in shards):
                fused.append(f"{prefix}.{name}")
    return bf16 + fused + [HEAD]


def validate_with_compressed_tensors(config: dict):
    """Parse ``config`` with compressed-tensors' own ``QuantizationConfig`` (what transformers and vLLM parse it
    with); returns the parsed object. The package is imported here only: FP8 export needs it, nothing else does."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError as e:
        raise ImportError(f"the FP8 Hugging Face export checks its quantization_config with the compressed-tensors "
                          f"package, which is not installed ({e}): pip install '{COMPRESSED_TENSORS}' "
                          "(or the hf extra: pip install -c constraints.txt -e '.[hf]')") from None
    return QuantizationConfig.model_validate(config)


def read_quantization_config(raw: dict, arch: HFArch, where: str) -> dict[str, str] | None:
    """The HF modules' precisions ``{module: "fp8" | "bf16"}`` a checkpoint's ``quantization_config`` states, or
    None without one. Only what ``to_hf`` writes is read; anything else is an ``HFCheckpointError`` naming the
    field: another method, format or status; other targets, groups, bits, type or strategy (channel, group,
    block); static (calibrated) activations; a regex in ``ignore``; the head quantized; a fused group split."""
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    key = f"{where}: quantization_config"

    def refuse(field: str, value, wanted) -> HFCheckpointError:
        return HFCheckpointError(f"{key}.{field} = {_short(value)}: precisionrt reads only its own FP8 export "
                                 f"(compressed-tensors, per-tensor FP8 weights, dynamic activations): {wanted}")

    if not isinstance(qc, dict):
        raise refuse("", qc, "a JSON object")
    for field, wanted in (("quant_method", QUANT_METHOD), ("format", FLOAT_QUANTIZED),
                          ("quantization_status", "compressed")):
        if qc.get(field) != wanted:
            raise refuse(field, qc.get(field), repr(wanted))
    for field in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if qc.get(field):   # absent, null or empty: none
            raise refuse(field, qc[field], "none")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise refuse("config_groups", groups, "exactly one group")
    (name, group), = groups.items()
    if not isinstance(group, dict):
        raise refuse(f"config_groups.{name}", group, "a JSON object")
    if group.get("targets") != ["Linear"]:
        raise refuse(f"config_groups.{name}.targets", group.get("targets"), '["Linear"]')
    if group.get("format", FLOAT_QUANTIZED) not in (None, FLOAT_QUANTIZED):
        raise refuse(f"config_groups.{name}.format", group.get("format"), repr(FLOAT_QUANTIZED))
    if group.get("output_activations") is not None:
        raise refuse(f"config_groups.{name}.output_activations", group["output_activations"], "null")
    for part, wanted in (("weights", WEIGHTS), ("input_activations", ACTIVATIONS)):
        args = group.get(part)
        if not isinstance(args, dict):
            raise refuse(f"config_groups.{name}.{part}", args, "a JSON object")
        for field, value in wanted.items():
            ok = args.get(field) in (("tensor", "token") if part == "input_activations" and field == "strategy"
                                     else (value,))
            if field == "dynamic" and part == "weights":
                ok = args.get(field, False) is False
            if not ok:
                raise refuse(f"config_groups.{name}.{part}.{field}", args.get(field), repr(value))
        for field in ("group_size", "block_structure", "actorder"):
            if args.get(field) is not None:
                raise refuse(f"config_groups.{name}.{part}.{field}", args[field], "null")
    ignore = qc.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(n, str) for n in ignore):
        raise refuse("ignore", ignore, "a list of module names")
    regex = [n for n in ignore if n.startswith("re:")]
    if regex:
        raise refuse("ignore", regex[0], "module names (to_hf writes no regular expressions)")
    linears = linear_modules(arch)
    known = set(linears) | {HEAD} | {f"{m.rsplit('.', 2)[0]}.{f}" for m in linears for f in FUSED_GROUPS}
    unknown = sorted(set(ignore) - known)
    if unknown:
        raise refuse("ignore", unknown[0], f"a linear module of this {arch.model_type} model")
    if HEAD not in ignore:
        raise refuse("ignore", ignore[:3], f"the head ({HEAD!r}) listed: precisionrt keeps it in BF16")
    ignored = set(ignore)
    precisions = {m: "bf16" if m in ignored else "fp8" for m in linears}
    try:
        check_fused_groups(precisions, f"{key}.ignore")
    except FusedGroupSplit as e:
        raise HFCheckpointError(str(e)) from None
    for m in linears:   # a fused name listed alone: vLLM would skip the group, transformers quantize its shards
        prefix = m.rsplit(".", 2)[0]
        for fused, shards in FUSED_GROUPS.items():
            if f"{prefix}.{fused}" in ignored and not all(f"{prefix}.{s}" in ignored for s in shards):
                raise HFCheckpointError(f"{key}.ignore lists {prefix}.{fused} but not all of its "
                                        "shards: vLLM would serve the group in BF16, transformers in FP8")
    return precisions


def check_scale(scale: torch.Tensor, module: str, file: str) -> None:
    """A ``weight_scale`` is one finite positive number (shape ``[1]`` or a scalar): an HFCheckpointError otherwise."""
    if scale.numel() != 1 or scale.dim() > 1:
        raise HFCheckpointError(f"{file}: {module}.{SCALE} has shape {tuple(scale.shape)}; a per-tensor scale "
                                "is [1] (a channel or block scale is not read)")
    value = float(scale.float().reshape(()))
    if not math.isfinite(value) or value <= 0:
        raise HFCheckpointError(f"{file}: {module}.{SCALE} is {value}; a scale is a finite positive number")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
