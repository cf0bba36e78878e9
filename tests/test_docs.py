"""The documentation holds: every ```python block of README.md and docs/*.md runs as written, from the page
that holds it (or is marked a fragment), and every relative link and anchor in them resolves. Beside them,
converting megatron's own local GPT spec gives a model whose injected outlier the runtime promotes.

Examples are found by their page and the heading above them (``run_doc_example``); ``EXAMPLES`` lists each one
and the test that runs it, and ``test_every_python_block_is_run_or_marked_a_fragment`` fails for a block that
is in neither. A fragment is a block marked by the line ``<!-- fragment -->`` just above it, or one that is not
Python syntax at all (the signature listing of contract C2 in docs/design.md: ``rt.end_step(step) -> list[...]``).
"""

import ast
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

from test_tensor_parallel import free_port

ROOT = Path(__file__).parent.parent
FRAGMENT = "<!-- fragment -->"
FENCE = re.compile(r"^(```|~~~)")


def doc_pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def parses(code: str) -> bool:
    try:
        ast.parse(code)
    except SyntaxError:
        return False
    return True


def python_blocks(page: Path) -> list[tuple[str, str, bool]]:
    """(the heading above it, its code, marked a fragment) for every ```python block of ``page``."""
    out, heading, fence, lang, code, fragment, previous = [], "", None, "", [], False, ""
    for line in page.read_text().splitlines():
        if fence is not None:
            if line.startswith(fence):
                if lang == "python":
                    text = "\n".join(code) + "\n"
                    out.append((heading, text, fragment or not parses(text)))
                fence = None
            else:
                code.append(line)
            continue
        if FENCE.match(line):
            fence, lang, code = line[:3], line[3:].strip(), []
            fragment = previous.strip() == FRAGMENT
            continue
        if line.startswith("#"):
            heading = line
        if line.strip():
            previous = line
    return out


def run_doc_example(page: str, heading: str, cwd: Path, torchrun: int = 0) -> str:
    """Run the first python block after the line ``heading`` of ``page`` (relative to the repository), in
    ``cwd``, plainly or under torchrun with that many processes; its stdout."""
    blocks = [code for head, code, _ in python_blocks(ROOT / page) if head == heading]
    assert blocks, f"{page}: no python block under {heading!r}"
    (cwd / "example.py").write_text(blocks[0])
    launcher = [] if not torchrun else ["-m", "torch.distributed.run", f"--nproc-per-node={torchrun}",
                                         "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    proc = subprocess.run([sys.executable, *launcher, "example.py"], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


EXAMPLES = {
    ("README.md", "## Embed in your own Megatron loop"): "test_embedding_example_runs_as_written",
    ("docs/embedding.md", "## Compiled"): "test_compiled_example_runs_as_written",
    ("docs/embedding.md", "## Pipeline parallelism"): "test_pipeline_example_runs_as_written",
    ("docs/embedding.md", "## Distributed checkpoints"): "test_dist_checkpoint_example_runs_as_written",
    ("docs/huggingface.md", "## Bring your model"): "test_hugging_face_example_runs_as_written",
    ("docs/huggingface.md", "## Serve it in FP8"): "test_fp8_export_example_runs_as_written",
}
"""(page, heading) of every example the suite runs, and the test that runs it."""


def test_every_python_block_is_run_or_marked_a_fragment():
    tests = globals()
    unrun = []
    for page in doc_pages():
        rel = page.relative_to(ROOT).as_posix()
        for heading, _, fragment in python_blocks(page):
            if fragment:
                continue
            name = EXAMPLES.get((rel, heading))
            if name is None or name not in tests:
                unrun.append(f"{rel}, {heading!r}")
    assert not unrun, f"python blocks no test runs (run one, or mark it {FRAGMENT!r}): {unrun}"
    headings = {}
    for (page, heading) in EXAMPLES:   # each runner finds the first block under its heading: one per heading
        headings[(page, heading)] = sum(h == heading for h, _, _ in python_blocks(ROOT / page))
    assert all(n == 1 for n in headings.values()), headings


def test_embedding_example_runs_as_written(tmp_path):
    assert "of GEMM FLOPs in FP8" in run_doc_example("README.md", "## Embed in your own Megatron loop", tmp_path)
    assert (tmp_path / "runs/embedded/precision_events.jsonl").is_file()


def test_compiled_example_runs_as_written(tmp_path):
    out = run_doc_example("docs/embedding.md", "## Compiled", tmp_path)
    assert "compiled: " in out and "of GEMM FLOPs in FP8" in out
    assert (tmp_path / "runs/compiled/precision_events.jsonl").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("stages", [1, 2])
def test_pipeline_example_runs_as_written(tmp_path, stages):
    """A plain process (one stage) and torchrun with two processes (two stages, 1F1B)."""
    out = run_doc_example("docs/embedding.md", "## Pipeline parallelism", tmp_path, torchrun=stages if stages > 1 else 0)
    assert out.count(f"{stages} stage(s)") == stages and "of GEMM FLOPs in FP8" in out
    assert (tmp_path / "runs/pipeline/precision_events.jsonl").is_file()


def test_dist_checkpoint_example_runs_as_written(tmp_path):
    pytest.importorskip("psutil")   # megatron's saver imports it (the dist-ckpt extra)
    out = run_doc_example("docs/embedding.md", "## Distributed checkpoints", tmp_path)
    assert "restored: every layer's precision and scaling state" in out
    assert (tmp_path / "ckpt").is_dir()


def test_hugging_face_example_runs_as_written(tmp_path):
    pytest.importorskip("transformers")
    assert "of GEMM FLOPs ran in FP8" in run_doc_example("docs/huggingface.md", "## Bring your model", tmp_path)
    trained = tmp_path / "tiny-qwen3-trained"
    assert (trained / "config.json").is_file() and (trained / "model.safetensors").is_file()
    from safetensors.torch import load_file

    before, after = load_file(tmp_path / "tiny-qwen3" / "model.safetensors"), load_file(trained / "model.safetensors")
    assert before.keys() == after.keys()
    assert not torch.equal(before["model.layers.0.mlp.down_proj.weight"], after["model.layers.0.mlp.down_proj.weight"]), \
        "the export holds the trained weights"


def test_fp8_export_example_runs_as_written(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    out = run_doc_example("docs/huggingface.md", "## Serve it in FP8", tmp_path)
    assert "ignore: ['model.layers.1.mlp.gate_proj', 'model.layers.1.mlp.up_proj', " \
           "'model.layers.1.mlp.gate_up_proj', 'lm_head']" in out
    assert "resumed in BF16: ['decoder.layers.1.mlp.linear_fc1']" in out
    import json

    page = (ROOT / "docs" / "huggingface.md").read_text()
    config = json.loads((tmp_path / "tiny-qwen3-fp8" / "config.json").read_text())["quantization_config"]
    excerpt = json.loads("{" + page.split("```json\n", 1)[1].split("```", 1)[0] + "}")["quantization_config"]
    assert excerpt == config, "the page shows the config the example writes"
    sidecar = json.loads((tmp_path / "tiny-qwen3-fp8" / "precision_map.json").read_text())
    assert (sidecar["map_version"], sidecar["step"], len(sidecar["switches"])) == (1, 1, 3)


# ---- links and anchors ----------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: markup dropped, lowercased, punctuation dropped (letters, digits,
    marks, '_', '-' and spaces stay), each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)          # a link's text stays
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = text.strip().lower()
    kept = "".join(c for c in text if c in "_- " or unicodedata.category(c)[0] in "LMN")
    return kept.replace(" ", "-")


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), start=1):
        if fence is not None:
            if line.startswith(fence):
                fence = None
            continue
        if FENCE.match(line):
            fence = line[:3]
            continue
        yield number, line


def anchors_of(page: Path) -> set[str]:
    """Every heading's anchor, GitHub's way: a repeated slug gets -1, -2, ..."""
    seen, out = {}, set()
    for _, line in prose_lines(page.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(pages: list[Path], root: Path) -> list[str]:
    """Relative links of ``pages`` whose file is missing (or outside ``root``), and anchors, in-page or on another
    page, that name no heading there. Links with a scheme (https:, mailto:) are not checked."""
    out = []
    for page in pages:
        for number, line in prose_lines(page.read_text()):
            for target in LINK.findall(INLINE_CODE.sub("", line)):   # `[a](b)` in code is no link
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                    continue
                path, _, anchor = target.partition("#")
                where = f"{page.relative_to(root).as_posix()}:{number}: {target}"
                dest = (page.parent / path).resolve() if path else page
                if root.resolve() not in (dest, *dest.parents) or not dest.exists():
                    out.append(f"{where}: no such file")
                elif anchor and dest.suffix == ".md" and anchor not in anchors_of(dest):
                    out.append(f"{where}: no heading with this anchor")
    return out


def test_every_link_and_anchor_in_the_docs_resolves():
    assert broken_links(doc_pages(), ROOT) == []


def test_the_link_checker_reports_broken_links_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Step 2: the `fp8` path, again!\n\n## Twice\n\n## Twice\n")
    (tmp_path / "README.md").write_text(
        "# Front\n\n## Good one\n\n"
        "[ok](docs/page.md) [ok](docs/page.md#step-2-the-fp8-path-again) [ok](#good-one) [ok](docs/page.md#twice-1)\n"
        "[ok](https://example.com/missing.md) `[not a link](nowhere.md)`\n\n"
        "```\n[in code](nowhere.md)\n```\n\n"
        "[bad](docs/missing.md) [bad](docs/page.md#step-3) [bad](#good) ![bad](docs/missing.png) [bad](../outside.md)\n")
    found = broken_links(doc_pages(tmp_path), tmp_path)
    assert found == ["README.md:12: docs/missing.md: no such file",
                     "README.md:12: docs/page.md#step-3: no heading with this anchor",
                     "README.md:12: #good: no heading with this anchor",
                     "README.md:12: docs/missing.png: no such file",
                     "README.md:12: ../outside.md: no such file"], found
    assert github_slug("Embed in your own Megatron loop") == "embed-in-your-own-megatron-loop"
    assert github_slug("LM, RL & faults: `make main` (2-core CPU)") == "lm-rl--faults-make-main-2-core-cpu"


def test_megatron_local_spec_converted_promotes_an_injected_outlier(parallel, tmp_path):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from precisionrt import MonitorConfig, PrecisionRuntime, RuntimeConfig, convert_layer_spec
    from precisionrt.layers.linear import precision_layers
    from precisionrt.models.gpt import ModelConfig, transformer_config
    from precisionrt.run.inject import FaultInjector, InjectConfig
    from precisionrt.train import lm_loss

    base = get_gpt_layer_local_spec(normalization="RMSNorm")
    only_mlp = convert_layer_spec(base, filter_fn=lambda path: path.startswith("mlp."), cpu_attention=True)
    assert only_mlp.submodules.self_attention.submodules.linear_qkv is ColumnParallelLinear
    assert base.submodules.mlp.submodules.linear_fc1 is ColumnParallelLinear, "the input spec is not modified"

    torch.manual_seed(0)
    config = transformer_config(ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128))
    model = GPTModel(config=config, transformer_layer_spec=convert_layer_spec(base, cpu_attention=True),
                     vocab_size=256, max_sequence_length=32)
    layers = precision_layers(model)
    assert len(layers) == 8, "qkv, proj, fc1, fc2 of both layers"
    target = "decoder.layers.1.mlp.linear_fc2"
    rt = PrecisionRuntime(model, RuntimeConfig(mode="dynamic", monitor=MonitorConfig(
        check_interval=2, full_stats_every=1)), run_dir=tmp_path)
    inject = FaultInjector(InjectConfig(kind="outlier", layer=target, start_step=3, factor=1e6), model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    events = []
    for step in range(1, 9):
        inject.before_step(step - 1)
        lm_loss(model, torch.randint(0, 256, (4, 33), generator=g)).backward()
        opt.step()
        opt.zero_grad()
        events += rt.end_step(step)
    rt.close(8)
    # the outlier is in the input: the GEMMs that read it move, dgrad (the weight and the gradient) stays FP8
    assert [(e.step, e.layer, e.gemm, e.to, e.reason) for e in events] == \
        [(4, target, g, "bf16", "underflow") for g in ("fprop", "wgrad")]


def test_transformer_engine_modules_are_refused_by_path():
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from precisionrt import convert_layer_spec

    class TELayerNormColumnParallelLinear:   # stands for TE's fused norm + linear, absent on this machine
        pass

    spec = ModuleSpec(module=SelfAttention, submodules=SelfAttentionSubmodules(
        linear_qkv=TELayerNormColumnParallelLinear, core_attention=None))
    with pytest.raises(ValueError, match="linear_qkv: TELayerNormColumnParallelLinear is a Transformer Engine"):
        convert_layer_spec(spec)
