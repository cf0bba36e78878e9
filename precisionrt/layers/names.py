"""Layer names: fnmatch patterns (pins, probes, injections, config keys) resolved against the managed
layers, a pattern that matches nothing being an error that shows what the names look like; and GEMM names,
``layer:gemm`` (``fprop``, ``dgrad``, ``wgrad``), for what is decided per GEMM."""

from __future__ import annotations

import fnmatch

import torch

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)

from precisionrt.config import ConfigError
from precisionrt.layers.linear import precision_layers
from precisionrt.observe.events import GEMMS


def match_layers(model: torch.nn.Module, patterns: list[str], what: str = "pattern") -> list[str]:
    """Managed layer names of ``model`` matching any fnmatch pattern; a pattern that matches nothing is an error."""
    return match_names(list(precision_layers(model)), patterns, what)


def match_names(names: list[str], patterns: list[str], what: str = "pattern") -> list[str]:
    """The ``names`` matching any fnmatch pattern; a pattern that matches nothing is an error."""
    matched: list[str] = []
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(
                f"{what} {pat!r} matches no managed layer; layers are e.g. {names[:2]} ... ({len(names)} in all)"
            )
        matched.extend(h for h in hits if h not in matched)
    return matched


def split_gemm(name: str) -> tuple[str, str | None]:
    """``"layer:gemm"`` -> ``("layer", "gemm")``; a plain layer name -> ``(name, None)``. A suffix that is not a
    GEMM (``fprop``, ``dgrad``, ``wgrad``) is a ValueError naming it."""
    layer, sep, gemm = name.rpartition(":")
    if not sep:
        return name, None
    if gemm not in GEMMS:
        raise ValueError(f"{name!r}: {gemm!r} is not a GEMM; a GEMM is one of {list(GEMMS)} (e.g. "
                         f"'{layer}:wgrad')")
    return layer, gemm


def match_gemms(names: list[str], patterns: list[str], what: str = "pattern") -> list[tuple[str, str]]:
    """The ``(layer, gemm)`` pairs that fnmatch patterns name: a pattern over layer names names all three GEMMs
    of each layer it matches; ``pattern:gemm`` (e.g. ``decoder.layers.*.mlp.linear_fc2:wgrad``) one GEMM of
    each. A pattern that matches nothing, or names no GEMM, is an error."""
    out: list[tuple[str, str]] = []
    for pat in patterns:
        layer_pat, gemm = split_gemm(pat)
        for layer in match_names(names, [layer_pat], what):
            out.extend((layer, g) for g in ((gemm,) if gemm else GEMMS) if (layer, g) not in out)
    return out
