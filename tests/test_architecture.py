"""The floors of the house, enforced: every import in ``precisionrt`` and ``rl`` runs down a floor (or stays in its
own subpackage), whether at the top of a file or inside a function; no import closes a circle; nothing imports a
re-export shim; ``precisionrt`` never imports ``rl``; the observability floor imports neither torch nor megatron.

The floors (docs/architecture.md draws them; each subpackage's ``__init__`` says the same in words):

    precisionrt:  config, files < observe < numerics < distributed < layers < runtime < models < run < train, speed
    rl:           envs < algo < inference < workers < trainer, warm_start < workload < train   (rl may use any of
                  precisionrt)

A module may import a module of a lower floor, or one of its own unit (its subpackage; a top-level module is a
unit of its own). The checker runs on this tree, and on a small tree of its own with one violation of each kind,
to show that it reports them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).parent.parent

FLOORS = {
    "precisionrt": [("config", "files"), "observe", "numerics", "distributed", "layers", "runtime", "models", "run",
                    ("train", "speed")],
    "rl": ["envs", "algo", "inference", "workers", ("trainer", "warm_start"), "workload", "train"],
}
SHIMS = {"precisionrt.fp8", "precisionrt.megatron", "precisionrt.pipeline", "precisionrt.analysis", "rl.losses"}
"""Old module paths kept as re-exports (DESIGN.md contracts, the README's examples); never imported inside."""
TOP = {"precisionrt", "rl"}   # the packages' own __init__: the public API, above every floor
NO_TORCH = ("precisionrt.config", "precisionrt.files", "precisionrt.observe")


def module_files(root: Path, packages=("precisionrt", "rl")) -> dict[str, Path]:
    out = {}
    for pkg in packages:
        for path in (root / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module ``name`` imports, at any depth of its code, plus the targets of a lazy ``_HOME`` map."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_HOME" for t in node.targets):
            found.update(v.value for v in node.value.values if isinstance(v, ast.Constant))
    resolved = set()
    for mod in found:
        while mod and mod not in modules and "." in mod:   # `import a.b.c` of a package's module
            mod = mod.rsplit(".", 1)[0]
        if mod in modules and mod != name:
            resolved.add(mod)
    return resolved


def third_party_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def place(name: str) -> tuple[str, int, str] | None:
    """(root, floor, unit) of a module; None for a module no floor names."""
    root, *rest = name.split(".")
    if name in TOP:
        return root, len(FLOORS[root]), name
    head = rest[0]
    for floor, entry in enumerate(FLOORS[root]):
        if head in (entry if isinstance(entry, tuple) else (entry,)):
            return root, floor, f"{root}.{head}"
    return None


def violations(root: Path, shims=SHIMS) -> list[str]:
    modules = module_files(root)
    graph = {m: imports_of(m, p, modules) for m, p in modules.items()}
    out = []
    for mod, deps in sorted(graph.items()):
        if mod in shims:
            continue
        here = place(mod)
        if here is None:
            out.append(f"{mod}: on no floor (add it to FLOORS or move it into a subpackage)")
            continue
        for dep in sorted(deps):
            if dep in shims:
                out.append(f"{mod} imports the shim {dep}: import its new home")
                continue
            there = place(dep)
            if there is None:
                continue
            if here[0] == "precisionrt" and there[0] == "rl":
                out.append(f"{mod} imports {dep}: precisionrt never imports rl")
            elif here[0] == there[0] and here[2] != there[2] and there[1] >= here[1]:
                out.append(f"{mod} (floor {here[1]}) imports {dep} (floor {there[1]}): up or across a floor")
    out += [f"circle: {' -> '.join(c)}" for c in circles({m: d - shims for m, d in graph.items()})]
    for mod, path in sorted(modules.items()):
        if mod.startswith(NO_TORCH) and third_party_of(path) & {"torch", "megatron", "numpy"}:
            out.append(f"{mod} imports {sorted(third_party_of(path) & {'torch', 'megatron', 'numpy'})}: "
                       "this floor runs without them")
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a closed path."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_import_runs_down_a_floor_with_no_circle():
    assert violations(ROOT) == []


def test_the_checker_reports_each_kind_of_violation(tmp_path):
    files = {
        "precisionrt/__init__.py": "",
        "precisionrt/config.py": "import torch\n",                                 # torch on the torch-free floor
        "precisionrt/numerics/__init__.py": "",
        "precisionrt/numerics/fp8.py": "def f():\n    from precisionrt.layers import linear\n",   # up, in a function
        "precisionrt/layers/__init__.py": "",
        "precisionrt/layers/linear.py": "from precisionrt.numerics import fp8\nimport precisionrt.fp8\n",
        "precisionrt/fp8.py": "from precisionrt.numerics.fp8 import *\n",
        "precisionrt/gadgets.py": "",                                               # on no floor
        "precisionrt/run/__init__.py": "import rl.envs\n",                         # precisionrt -> rl
        "rl/__init__.py": "",
        "rl/envs/__init__.py": "",
        "rl/algo/__init__.py": "from rl.inference import x\n",
        "rl/inference/__init__.py": "",
        "rl/inference/x.py": "from rl.algo import y\n",
        "rl/algo/y.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    found = "\n".join(violations(tmp_path, shims={"precisionrt.fp8"}))
    assert "precisionrt.numerics.fp8 (floor 2) imports precisionrt.layers.linear (floor 4)" in found
    assert "circle: precisionrt.layers.linear -> precisionrt.numerics.fp8" in found
    assert "precisionrt.layers.linear imports the shim precisionrt.fp8" in found
    assert "precisionrt.gadgets: on no floor" in found
    assert "precisionrt.run imports rl.envs: precisionrt never imports rl" in found
    assert "rl.algo (floor 1) imports rl.inference.x (floor 2)" in found
    assert "precisionrt.config imports ['torch']" in found


def test_the_observability_floor_loads_without_torch_or_megatron():
    code = ("import sys; import precisionrt.observe.cli, precisionrt.observe.analysis, precisionrt.observe.loggers, "
            "precisionrt.analysis; bad = [m for m in ('torch', 'megatron', 'numpy') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shims_re_export_their_new_homes():
    """The old paths that contracts and the README name give the very objects of the new ones."""
    import importlib

    homes = {"precisionrt.fp8": ["precisionrt.numerics.fp8"], "precisionrt.pipeline": ["precisionrt.distributed.pipeline"],
             "precisionrt.analysis": ["precisionrt.observe.analysis"], "rl.losses": ["rl.algo.losses"],
             "precisionrt.megatron": ["precisionrt.models.gpt", "precisionrt.models.transformer",
                                      "precisionrt.distributed.parallel", "precisionrt.layers.spec",
                                      "precisionrt.layers.attention", "precisionrt.layers.names"]}
    for shim, targets in homes.items():
        old = importlib.import_module(shim)
        assert old.__doc__.startswith("Shim"), shim
        for name in old.__all__:
            owners = [t for t in targets if getattr(importlib.import_module(t), name, None) is getattr(old, name)]
            assert owners, f"{shim}.{name} is not its new home's object"
    from precisionrt.fp8 import quantize                     # C1
    from rl.losses import icepop_weights                     # C8
    from precisionrt.megatron import ModelConfig, init_parallel, transformer_config   # the README's
    assert callable(quantize) and callable(icepop_weights) and callable(init_parallel) and callable(transformer_config)
    assert ModelConfig().num_layers > 0
