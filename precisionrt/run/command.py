"""The command skeleton both training commands share (``python -m precisionrt.train``, ``python -m rl.train``).

A command is: parse ``--config FILE [--set dotted.key=value ...]`` (contract C5, ``run_cli``); check the
configuration before anything is built (``check_common`` plus the command's own rules); build the model, its
runtime and the fault injector (``start``); open the run directory, resuming from a checkpoint if asked
(``harness.open_run``); the command's own loop, reporting each step's switches (``report_switches``) and
skipped steps (``report_skip``); then ``finish``: the Hugging Face export, the runtime's last log record, the
loggers, ``summary.json`` and the closing line. Each command's ``train()`` keeps only what is its own.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import torch

from precisionrt.config import (Checked, ConfigError, ConfigKeyPattern, Every, LearningRate, Range, Seed,
                                StartupError, Steps, load_config, print_keys)
from precisionrt.distributed.parallel import init_parallel, resolve_device
from precisionrt.models.gpt import ModelConfig, build_gpt
from precisionrt.files import UnsafeFile
from precisionrt.models.chat_template import TemplateError
from precisionrt.models.hf.arch import HFCheckpointError
from precisionrt.models.hf.load import exported_pins
from precisionrt.models.hf.save import ExportRefused, check_export_target, to_hf
from precisionrt.models.tokenizer import check_tokenizer
from precisionrt.observe.loggers import WandbConfig, panel_layers
from precisionrt.observe.plot import plot_run
from precisionrt.run import lock
from precisionrt.run.checkpoint import CheckpointError
from precisionrt.run.inject import FaultInjector, InjectConfig, check_inject_ranks
from precisionrt.run.resources import check_fits
from precisionrt.run.rundir import RunConfig, check_run_dir, resolve_run_dir, write_json
from precisionrt.runtime.precision_runtime import PrecisionRuntime, RuntimeConfig

T = TypeVar("T")

FILE_ERRORS = (HFCheckpointError, ExportRefused, TemplateError, UnsafeFile)
"""What a file from elsewhere can be refused with (a checkpoint, an export target, a chat template, a special
file): ``run_cli`` reports each as its one ``config error:`` line, never a traceback."""


@dataclass
class TrainSchedule(Checked):
    """The ``[train]`` keys both commands understand; each command's table extends it (and may change a
    default)."""

    steps: Steps = 300
    seed: Seed = 0
    lr: LearningRate = 3e-3
    grad_clip: Annotated[float, Range(gt=0, le=1e6)] = 1.0
    """0 would never learn, a negative clip multiplies gradients by < 0 (ascent)."""
    log_every: Steps = 10
    eval_every: Steps = 100
    """Held-out evaluation (its step also logs a row); the last step always evaluates."""
    keep_checkpoints: Every = 3
    """The newest N checkpoints are kept (0: all)"""
    max_skipped_fraction: Annotated[float, Range(gt=0, le=1)] = 0.5
    """Stop when more than this share of the steps (and 5 or more) were skipped for nonfinite gradients: such a run
    trains on nothing."""
    checkpoint_every: Every = 0
    """0: only at the end."""
    resume: bool = False
    """Continue from the newest checkpoint in run.dir, up to `steps`."""
    resume_override: list[ConfigKeyPattern] = field(default_factory=list)
    """Keys a resume may change although they change the run's meaning (``precision.mode``, ``model.*``, ...):
    dotted keys or fnmatch patterns. Without them such a change is refused (``precisionrt.run.resume``)."""
    stop_at_step: Every = 0
    """Stop early (with a checkpoint) after this step, e.g. to fit a job's time limit; a resumed run continues the
    same schedule up to `steps`. 0: run to `steps`."""
    export_hf: bool = False
    """At the end, write the model as a Hugging Face checkpoint directory, ``<run dir>/hf`` (config.json,
    safetensors, the tokenizer's files; gathered across TP ranks): needs ``model.hf_path`` or ``model.hf_init``."""
    export_hf_quantization: Literal["none", "fp8"] = "none"
    """``fp8``: the export is an FP8 checkpoint in the compressed-tensors format (vLLM, SGLang, transformers):
    each layer whose forward GEMM ends the run in FP8 is stored in FP8, the others in BF16 and listed in its
    ``ignore``, with ``precision_map.json`` (the map, its step and the switches that led to it)."""

    @property
    def end(self) -> int:
        """The last step this segment runs: ``stop_at_step`` if set, else ``steps``."""
        return min(self.steps, self.stop_at_step or self.steps)


@dataclass
class CommandConfig:
    """The tables every command's configuration has; a command adds its own and may replace ``train`` with its
    extension of ``TrainSchedule`` (or change a table's default)."""

    run: RunConfig = field(default_factory=RunConfig)
    train: TrainSchedule = field(default_factory=TrainSchedule)
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: RuntimeConfig = field(default_factory=RuntimeConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    inject: InjectConfig = field(default_factory=InjectConfig)


def check_common(cfg, world: int, memory: int, what: str, keys: str) -> None:
    """The checks every command makes before anything is built or written, each naming its keys: the
    tokenizer, the export, the injection's ranks, the memory a step takes (``memory`` bytes for ``what``, set by
    ``keys``) and the run directory."""
    check_tokenizer(cfg.model)   # a directory without a tokenizer, or a vocabulary the model cannot embed
    if cfg.train.export_hf and not cfg.model.is_hf:
        raise ConfigError("train.export_hf: only a Hugging Face architecture can be exported; set model.hf_path "
                          "or model.hf_init")
    if cfg.train.export_hf_quantization != "none" and not cfg.train.export_hf:
        raise ConfigError(f"train.export_hf_quantization = {cfg.train.export_hf_quantization!r} quantizes the "
                          "Hugging Face export: set train.export_hf = true too")
    if cfg.train.export_hf:
        try:   # a run directory's hf/ that is not an export of ours is refused now, not after the run
            check_export_target(resolve_run_dir(cfg.run) / "hf")
        except ExportRefused as e:
            raise ConfigError(f"train.export_hf: {e}") from None
    check_inject_ranks(cfg.inject, world)
    # run.device = "cuda" without a GPU is refused here, by name
    check_fits(memory, what, keys, resolve_device(cfg.run.device).type)
    check_run_dir(resolve_run_dir(cfg.run))


@dataclass
class Started:
    """What ``start`` built: the device, the model (this rank's part), its runtime and the fault injector."""

    device: torch.device
    model: torch.nn.Module
    runtime: PrecisionRuntime
    injector: FaultInjector
    rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start(cfg, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1) -> Started:
    """Bring up the process group and megatron's parallel state, then build the model at ``train.seed`` and
    its runtime. Pins, W&B layer patterns and the injected layer are checked here, before anything is written."""
    device = resolve_device(cfg.run.device)
    init_parallel(tensor_parallel_size, seed=cfg.train.seed, device=device,
                  pipeline_parallel_size=pipeline_parallel_size)
    rank = torch.distributed.get_rank()
    torch.manual_seed(cfg.train.seed)
    try:
        model = build_gpt(cfg.model, tensor_parallel_size=tensor_parallel_size, device=device)
    except HFCheckpointError as e:   # the checkpoint's weights (its config was checked with the configuration)
        raise ConfigError(f"model.hf_path: {e}") from None
    runtime = PrecisionRuntime(model, starting_precision(cfg, model))   # validates pins before anything is written
    panel_layers(cfg.wandb, runtime.names)             # and the W&B layer patterns
    injector = FaultInjector(cfg.inject, model, rank, runtime.names)
    if runtime.speed_plan is not None and rank == 0:
        print(runtime.speed_plan.line(), flush=True)
    return Started(device, model, runtime, injector, rank)


def starting_precision(cfg, model) -> RuntimeConfig:
    """``cfg.precision``, with the BF16 layers of an FP8 export at ``model.hf_path`` pinned BF16
    (``model.hf_exported_pins``): training resumes at the precision the checkpoint was served in instead of
    moving every layer back to FP8 at once (the loss spike of Transformer Engine issue 982). A layer that
    ``precision.pin_fp8`` names keeps the configured pin."""
    exported = exported_pins(model) if cfg.model.hf_exported_pins else []
    configured = cfg.precision.pin_fp8
    added = [n for n in exported if not any(fnmatch.fnmatchcase(n, p.split(":")[0]) for p in configured)]
    if not added:
        return cfg.precision
    return replace(cfg.precision, pin_bf16=[*cfg.precision.pin_bf16, *added])


def report_switches(logger, step: int, events, is_main: bool = True) -> None:
    """A step's switches: into the loggers (switch table, W&B) and one line each on stdout."""
    logger.log_switches(step, [{**e.summary(), "signals": e.signals} for e in events])
    if is_main:
        for e in events:
            print(f"step {step}: {e.layer}:{e.gemm} {e.from_} -> {e.to} ({e.reason})", flush=True)


def report_skip(step: int, what: str = "", is_main: bool = True) -> None:
    if is_main:
        print(f"step {step}: nonfinite gradients, optimizer step skipped{what}", flush=True)


class FinishError(StartupError):
    """The run's steps are done and checkpointed, but its last step (the export, or the summary) failed: an
    error exit, and a resume finishes that step (``harness.finished_summary``)."""


def finish(cfg, started: Started, logger, run_dir: Path, summary: dict, last_step: int, closing: str) -> dict:
    """The end of a run: the speed plan's figures, the runtime's ``run_end`` at ``last_step``, the loggers,
    ``summary.json`` (rank 0), the Hugging Face export (every rank gathers its shards; rank 0 writes; then the
    summary names it) and the ``closing`` line. A failed summary or export is a ``FinishError`` naming it; the
    run's lock is let go."""
    if started.runtime.speed_plan is not None:   # the plan's predicted GEMM time against all-BF16 and all-FP8
        summary["speed_plan"] = started.runtime.speed_plan.summary()
    started.runtime.close(last_step)
    logger.close()
    step = "summary.json"
    try:
        if started.is_main:   # first: an export that fails leaves the summary, and a resume retries the export
            write_json(run_dir / "summary.json", summary)
        if cfg.train.export_hf:
            step = f"export to {run_dir / 'hf'}"
            summary["hf_export"] = export_hf(cfg, started.model, run_dir, last_step,
                                             started.runtime.forward_precisions())
            if started.is_main:
                step = "summary.json"
                write_json(run_dir / "summary.json", summary)
        picture, picture_line = draw_picture(run_dir) if started.is_main else (None, "")   # under the lock
    except (OSError, ValueError, RuntimeError) as e:
        raise FinishError(f"the run reached step {last_step} and its checkpoint is written, but its {step} failed "
                          f"({type(e).__name__}: {e}); resume it (train.resume=true) to finish it") from e
    finally:
        lock.release(run_dir)
    if started.is_main:
        print(closing, flush=True)
        for line in precision_report(summary, cfg.inject):
            print(line, flush=True)
        print(picture_line, flush=True)
        written = ["summary.json", "metrics.jsonl", "precision_events.jsonl", "config.json"]
        written += [name for name in ("checkpoints/", "hf/") if (run_dir / name).is_dir()]
        written += [picture.name] if picture is not None else []
        print(f"written to {run_dir}: {', '.join(written)}", flush=True)
    return summary


REPORTED_DECISIONS = 20
"""The end of a run lists this many precision decisions; the switch log has them all."""


def precision_report(summary: dict, inject: InjectConfig) -> list[str]:
    """What precision did, for the end of a run: the FP8 share of GEMM FLOPs, then each decision (step, layer,
    its GEMMs, reason), marked ``injected`` where it follows the run's own ``[inject]`` drill; in RL, the
    rollout's precision and the trainer/rollout mismatch around the first switch."""
    decisions: dict[tuple, list[str]] = {}
    for sw in summary.get("switches", []):
        decisions.setdefault((sw["step"], sw["layer"], sw["from"], sw["to"], sw["reason"]), []).append(
            sw.get("gemm", "all"))
    lines = [f"precision: {summary['fp8_flop_fraction']:.1%} of GEMM FLOPs in FP8; "
             f"{len(decisions) or 'no'} precision decision{'' if len(decisions) == 1 else 's'}"]
    for (step, layer, from_, to, reason), gemms in list(decisions.items())[:REPORTED_DECISIONS]:
        drill = inject.kind != "none" and layer == inject.layer and step >= inject.start_step
        lines.append(f"  step {step}: {layer} {'+'.join(gemms)} {from_} -> {to} ({reason})"
                     + (f"  [injected: the config's [inject] {inject.kind} drill]" if drill else ""))
    if len(decisions) > REPORTED_DECISIONS:
        lines.append(f"  ... and {len(decisions) - REPORTED_DECISIONS} more: precisionrt-log summarize RUN_DIR")
    if "rollout_precision" in summary:
        follows = summary["rollout_precision"] == "follow"
        taken = [(m, v) for m, v in summary.get("rollout_maps_applied", []) if m > 0]   # (map, policy version)
        lines.append(f"  rollout precision: {summary['rollout_precision']} ("
                     + ("followed the trainer: " + (", ".join(f"map {m} from policy version {v}" for m, v in taken)
                                                    or "no change to follow") + ")"
                        if follows else "fixed: it did not follow the trainer's switches)"))
    around = summary.get("mismatch_around_first_switch")
    if around:   # RL: what the first switch did to the trainer/rollout mismatch
        lines.append(f"  mismatch (k3 KL, trainer vs rollout): {around['before']:.2e} over the {around['window']} "
                     f"RL steps before RL step {around['rl_step']}'s switch, {around['after']:.2e} from it on")
    return lines


def draw_picture(run_dir: Path) -> tuple[Path | None, str]:
    """The run's picture (``precisionrt-log plot``) into ``run_dir/run.png``: its path and the line that says
    where, or None and the line that says why not (matplotlib missing, a drawing error: the run is complete)."""
    try:
        path = plot_run(run_dir)
    except (RuntimeError, OSError, ValueError) as e:
        return None, f"no picture of the run: {e}"
    return path, f"picture: {path}"


def export_hf(cfg, model, run_dir: Path, step: int, precisions: dict[str, str]) -> str | None:
    """``train.export_hf``: the model to ``<run dir>/hf``, quantized as ``train.export_hf_quantization`` says
    with ``precisions`` (each layer's forward precision at ``step``) and the run's switch log."""
    fp8 = cfg.train.export_hf_quantization == "fp8"
    return to_hf(model, run_dir / "hf", tokenizer_dir=cfg.model.tokenizer_path or None,
                 quantization=cfg.train.export_hf_quantization, precisions=precisions if fp8 else None,
                 step=step if fp8 else None, switch_log=run_dir if fp8 else None)


def world_size() -> int:
    """The processes torchrun started (1 without it), known before torch.distributed is up."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_cli(prog: str, description: str, config_cls: type[T], run, argv: list[str] | None = None) -> int:
    """The shape every training command shares (contract C5): ``--config FILE [--set dotted.key=value ...]``.
    A configuration error prints one line naming the problem and exits 2, having written nothing. The library
    reports through ``logging`` (logger ``precisionrt``); a command shows its INFO and above on stderr."""
    class Stderr(logging.StreamHandler):
        """Writes to the ``sys.stderr`` of the moment: a caller (a test, a notebook) may swap it between runs."""

        stream = property(lambda self: sys.stderr, lambda self, value: None)

    for name in ("precisionrt", "rl"):   # the library's loggers only: other libraries' INFO stays quiet
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(isinstance(h, logging.StreamHandler) for h in logger.handlers):
            logger.addHandler(Stderr())

    p = argparse.ArgumentParser(prog=prog, description=f"{description} Every key is listed, with its default and "
                                "valid values, by --keys.")
    p.add_argument("--config", help="TOML run configuration (UTF-8)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="dotted.key=value",
                   help="override one config key (repeatable); the value parses as TOML")
    p.add_argument("--keys", action="store_true", help="list every config key (type, default, valid values) and exit")
    args = p.parse_args(argv)
    if args.keys:
        try:
            print_keys(config_cls)
        except BrokenPipeError:   # `--keys | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    try:
        run(load_config(config_cls, args.config, args.overrides))
    except (ConfigError, *FILE_ERRORS) as e:   # each names its file and field
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (StartupError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
