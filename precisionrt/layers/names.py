"""Layer names: fnmatch patterns (pins, probes, injections, config keys) resolved against the managed
layers, a pattern that matches nothing being an error that shows what the names look like."""

from __future__ import annotations

import fnmatch

import torch

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)

from precisionrt.config import ConfigError
from precisionrt.layers.linear import precision_layers


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
