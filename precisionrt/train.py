"""Language-model training with the precision runtime.

    python -m precisionrt.train --config configs/lm_tiny_cpu.toml [--set dotted.key=value ...]
    torchrun --nproc-per-node 2 -m precisionrt.train --config ... --set parallel.tensor_model_parallel_size=2
    torchrun --nproc-per-node 2 -m precisionrt.train --config ... --set parallel.pipeline_model_parallel_size=2

Each step runs megatron-core's own schedule (``get_forward_backward_func``: 1F1B across pipeline stages) over
``train.micro_batches`` micro-batches (``precisionrt.distributed.pipeline``).

Writes the run directory of contract C3: config.json, metrics.jsonl, precision_events.jsonl, summary.json,
checkpoints/. ``train.resume = true`` continues from the newest checkpoint in ``run.dir``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated

import torch

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)
from megatron.core import parallel_state

from precisionrt.config import Checked, ConfigError, Every, Range, to_dict
from precisionrt.distributed.clipping import clip_grad_norm_
from precisionrt.distributed.cuda_graphs import CapturedStep
from precisionrt.distributed.parallel import resolve_device
from precisionrt.distributed.pipeline import forward_backward, from_last_stage, per_token_loss_step
from precisionrt.distributed.syncs import to_device
from precisionrt.models.tokenizer import load_tokenizer
from precisionrt.run import command
from precisionrt.run.checkpoint import save_checkpoint, shard_name
from precisionrt.run.progress import Progress
from precisionrt.run.command import CommandConfig, TrainSchedule, check_common, report_skip, report_switches, run_cli, world_size
from precisionrt.run.data import ByteCorpus, DataConfig
from precisionrt.run.harness import check_skipped, open_run
from precisionrt.run.resources import training_memory


@dataclass
class TrainConfig(TrainSchedule):
    batch_size: Annotated[int, Range(ge=1, le=2**20)] = 16
    """Sequences per step and data-parallel rank."""
    micro_batches: Annotated[int, Range(ge=1, le=2**20)] = 1
    """Micro-batches per step (divides batch_size): megatron's schedule pipelines them across the stages of
    ``parallel.pipeline_model_parallel_size``; the gradient is the whole batch's mean either way."""
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1
    warmup_steps: Every = 20
    weight_decay: Annotated[float, Range(ge=0, le=10)] = 0.1
    eval_batches: Annotated[int, Range(ge=1, le=10**6)] = 8
    cuda_graphs: bool = False
    """Replay ordinary steps' forward and backward as CUDA graphs (``precisionrt/distributed/cuda_graphs.py``: one
    per precision map, captured after two eager warm-ups; sampled steps and injected faults run eagerly). One GPU
    only."""


@dataclass
class ParallelConfig(Checked):
    tensor_model_parallel_size: Annotated[int, Range(ge=1, le=1024)] = 1
    """Divides the world size, model.num_attention_heads and model.ffn_hidden_size."""
    pipeline_model_parallel_size: Annotated[int, Range(ge=1, le=1024)] = 1
    """Pipeline stages (tensor x pipeline divides the world size; the stages split model.num_layers evenly).
    Layers keep their global names in the switch log and metrics (``precisionrt.layout``)."""


@dataclass
class LMConfig(CommandConfig):
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``: a multiplier of the base lr."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def token_losses(model, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token losses ``[batch, seq]`` of ``tokens`` (on a pipeline stage before the last: its hidden states)."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1], device=tokens.device).unsqueeze(0).expand_as(inputs)
    return model(inputs, positions, None, labels=labels)


def lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss of a model without pipeline stages."""
    return token_losses(model, tokens).float().mean()


LM_STEP = per_token_loss_step(token_losses)   # megatron's forward_step_func for this loss


def make_optimizer(model, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; fused on CUDA, where it also skips a nonfinite step on the device (``found_inf``)."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda" or None)


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor], seq_length: int) -> float:
    """The mean loss over ``batches``, through megatron's schedule (forward only), on every rank."""
    model.eval()
    losses = [forward_backward(model, LM_STEP, [b], seq_length, forward_only=True) for b in batches]
    model.train()
    mean = None if losses[0] is None else torch.stack(losses).mean()
    return from_last_stage(mean, batches[0].device)


def allreduce_grads(model, group) -> None:
    """Average gradients over the data-parallel group (one flat buffer: one collective per step)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or torch.distributed.get_world_size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, group=group)
    flat /= torch.distributed.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def check_config(cfg: LMConfig) -> None:
    """The rules that join several tables, or need the machine (world size, memory), checked before anything
    is built or written; each error names the keys involved."""
    tp, pp, model = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size, cfg.model
    world = world_size()
    if world % (tp * pp):
        raise ConfigError(f"parallel.tensor_model_parallel_size ({tp}) x parallel.pipeline_model_parallel_size "
                          f"({pp}) must divide the world size ({world} process(es)); data parallel is the rest "
                          "of the world")
    if cfg.train.batch_size % cfg.train.micro_batches:
        raise ConfigError(f"train.micro_batches ({cfg.train.micro_batches}) must divide train.batch_size "
                          f"({cfg.train.batch_size}): micro-batches are of equal size")
    if pp > 1 and model.is_hf:
        raise ConfigError("parallel.pipeline_model_parallel_size: Hugging Face models (model.hf_path, "
                          "model.hf_init) are loaded and exported whole; pipeline stages are for the byte model")
    dims = model.dims()   # an hf_path checkpoint's own
    if dims.num_layers % pp:
        raise ConfigError(f"parallel.pipeline_model_parallel_size ({pp}) must divide model.num_layers "
                          f"({dims.num_layers}): each stage holds an equal share")
    for key in ("num_attention_heads", "ffn_hidden_size"):
        if getattr(dims, key) % tp:
            raise ConfigError(f"parallel.tensor_model_parallel_size ({tp}) must divide model.{key} "
                              f"({getattr(dims, key)}): each rank holds an equal share")
    if model.is_hf:
        try:   # a checkpoint's head and vocabulary counts against TP
            model.hf_arch(tp)
        except ValueError as e:
            raise ConfigError(f"parallel.tensor_model_parallel_size: {e}") from None
    if model.seq_length + 2 > cfg.data.heldout_bytes():
        raise ConfigError(f"model.seq_length ({model.seq_length}) does not fit the held-out data: data.max_bytes x "
                          f"data.heldout_fraction = {cfg.data.heldout_bytes():,} bytes; raise them or shorten the sequence")
    if cfg.train.cuda_graphs and (resolve_device(cfg.run.device).type != "cuda" or world > 1):
        raise ConfigError(f"train.cuda_graphs: needs run.device = \"cuda\" on one GPU (device "
                          f"{resolve_device(cfg.run.device).type}, world size {world}); collectives inside a "
                          f"captured step are not tested yet")
    # the tokenizer: bytes, or model.tokenizer_path / the checkpoint's (the corpus is tokenized with it)
    check_common(cfg, world, training_memory(dims, cfg.train.batch_size, tp), "a training step",
                 "train.batch_size, model.*")


def train(cfg: LMConfig) -> dict:
    check_config(cfg)
    started = command.start(cfg, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    device, model, runtime, injector, is_main = (started.device, started.model, started.runtime, started.injector,
                                                 started.is_main)
    dp_group = parallel_state.get_data_parallel_group()
    dp_rank = parallel_state.get_data_parallel_rank()
    corpus = ByteCorpus(cfg.data, load_tokenizer(cfg.model))
    corpus.check_fits(cfg.model.seq_length)
    if is_main:
        print(f"corpus: {corpus.num_bytes:,} bytes of {cfg.data.source!r} Python sources, {corpus.num_tokens:,} "
              f"tokens ({len(corpus.heldout):,} held out)", flush=True)

    layout = {"tensor_model_parallel_size": cfg.parallel.tensor_model_parallel_size,
              "pipeline_model_parallel_size": cfg.parallel.pipeline_model_parallel_size}
    shard = shard_name(parallel_state.get_tensor_model_parallel_rank(), layout["tensor_model_parallel_size"],
                       parallel_state.get_pipeline_model_parallel_rank(), layout["pipeline_model_parallel_size"])
    end = cfg.train.end
    opened = open_run(cfg, model, runtime.names, end, is_main, shard, layout, group=torch.distributed.group.WORLD)
    if opened.finished is not None:
        return opened.finished
    run_dir, logger = opened.run_dir, opened.logger
    optimizer = make_optimizer(model, cfg.train, device)
    start, earlier = 0, {"switches": [], "skipped_steps": []}   # what a resumed run did before its checkpoint
    with opened.starting():
        if opened.checkpoint is not None:
            start, state = opened.checkpoint
            earlier = state.get("history", earlier)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            runtime.load_state_dict(state["runtime"])
        runtime.start_log(run_dir, to_dict(cfg), started.rank, resumed_from=start if cfg.train.resume else None)
        heldout = [to_device(b, device) for b in
                   corpus.heldout_batches(cfg.train.eval_batches, cfg.train.batch_size, cfg.model.seq_length)]

    def checkpoint(step: int) -> None:
        # every model-parallel rank of data-parallel rank 0 writes its own shard (data-parallel replicas are
        # identical)
        if dp_rank == 0:
            save_checkpoint(run_dir, step, {"step": step, "model": model.state_dict(),
                                            "optimizer": optimizer.state_dict(), "runtime": runtime.state_dict(),
                                            "history": history(), "parallel": layout},
                            keep=cfg.train.keep_checkpoints, shard=shard, config=to_dict(cfg))

    def history() -> dict:
        """The run's switches and skipped steps so far, so that a resumed run's summary covers the whole run."""
        return {"switches": earlier["switches"] + [e.summary() for e in switches],
                "skipped_steps": earlier["skipped_steps"] + skipped}

    tokens_per_step = cfg.train.batch_size * cfg.model.seq_length
    t_start, t_window, eval_loss, loss_val = time.time(), time.time(), math.nan, math.nan
    last_logged = start
    def step_fn(batch: torch.Tensor) -> torch.Tensor:
        return forward_backward(model, LM_STEP, list(batch.chunk(cfg.train.micro_batches)), cfg.model.seq_length)

    run_step = CapturedStep(step_fn, runtime, model.parameters()) if cfg.train.cuda_graphs else step_fn
    switches, skipped = [], []
    progress = Progress("training", start + 1, end, "columns: step, train loss and held-out loss (nats per "
                        "token; held-out: the last evaluation), throughput (tokens per second), fp8 (share of GEMM "
                        "FLOPs)", enabled=is_main)
    for step in range(start, end):
        for group in optimizer.param_groups:
            group["lr"] = cfg.train.lr * lr_at(step, cfg.train)
        done = step + 1  # steps are numbered from 1 in metrics, switch log and checkpoints
        injector.before_step(step)
        batch = to_device(corpus.train_batch(step, cfg.train.batch_size, cfg.model.seq_length, cfg.train.seed,
                                             dp_rank), device)
        loss = run_step(batch)
        allreduce_grads(model, dp_group)
        grad_norm = clip_grad_norm_(model, cfg.train.grad_clip)   # the whole model's norm, on every TP rank
        # fused AdamW on CUDA decides on the device: no host synchronisation on ordinary steps
        if runtime.optimizer_step(optimizer, grad_norm, done):
            skipped.append(done)
            report_skip(done, is_main=is_main)
        events = runtime.end_step(done)
        for s in runtime.take_skipped():   # device-side skips, learnt at this check
            skipped.append(s)
            report_skip(s, is_main=is_main)
        switches += events
        check_skipped(len(skipped), done - start, cfg.train.max_skipped_fraction)
        report_switches(logger, done, events, is_main)

        evaluating = done % cfg.train.eval_every == 0 or done == end
        if done % cfg.train.log_every == 0 or evaluating:
            loss_val = from_last_stage(loss, device)
            elapsed = time.time() - t_window
            n_steps, last_logged = done - last_logged, done
            metrics = {"train/loss": loss_val, "train/lr": optimizer.param_groups[0]["lr"],
                       "train/grad_norm": float(grad_norm), "perf/step_time": elapsed / n_steps,
                       "perf/throughput": tokens_per_step * n_steps / elapsed,
                       **runtime.metrics()}
            if evaluating:
                eval_loss = evaluate(model, heldout, cfg.model.seq_length)
                metrics["eval/loss"] = eval_loss
            logger.log(done, metrics)
            if is_main:
                progress.line(done, f"step {done:>5}/{cfg.train.steps}  loss {loss_val:.4f}  eval {eval_loss:.4f}  "
                              f"{metrics['perf/throughput']:,.0f} tok/s  "
                              f"fp8 {metrics['precision/fp8_flop_fraction']:.0%}")
            t_window = time.time()
        if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0:
            checkpoint(done)

    skipped += runtime.take_skipped(flush=True)
    if start < end and not (cfg.train.checkpoint_every and end % cfg.train.checkpoint_every == 0):
        checkpoint(end)
    wall = time.time() - t_start
    summary = {
        "steps": end, "resumed_from": start, "wall_s": wall,
        "steps_per_s": (end - start) / wall if wall > 0 else math.nan,
        "final_train_loss": loss_val, "final_eval_loss": eval_loss,
        "unigram_baseline_loss": corpus.unigram_loss(), "corpus_bytes": corpus.num_bytes,
        "corpus_tokens": corpus.num_tokens,
        "precision_mode": cfg.precision.mode,
        "fp8_flop_fraction": runtime.fp8_flop_fraction(), "precisions": runtime.precisions(),
        **history(),
        "control_rejected": runtime.control_rejected,
    }
    closing = (f"done: eval loss {eval_loss:.4f} (unigram baseline {summary['unigram_baseline_loss']:.4f}), "
               f"{summary['steps_per_s']:.2f} steps/s")
    return command.finish(cfg, started, logger, run_dir, summary, end, closing)


def main(argv: list[str] | None = None) -> int:
    return run_cli("python -m precisionrt.train", __doc__.split("\n\n")[0], LMConfig, train, argv)


if __name__ == "__main__":
    sys.exit(main())
