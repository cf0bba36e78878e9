"""What a Megatron user meets when embedding the runtime in an own loop (issue 37), on one process: a resume in the
README's order (runtime with its run directory first, then the checkpoint) continues one run in the switch log;
the wrappers megatron and torch put around a model add nothing to the layer names; an unconverted model is refused
with the public API's name; a reshard's INFO names the statistics it drops."""

import json
import logging
import subprocess
import sys

import pytest
import torch

from precisionrt import PrecisionRuntime, RuntimeConfig, clip_grad_norm_
from precisionrt.config import ConfigError
from precisionrt.distributed.pipeline import megatron_on_cpu
from precisionrt.models.gpt import ModelConfig, build_gpt
from precisionrt.train import lm_loss

LAYER = "decoder.layers.1.mlp.linear_fc2"
CONFIG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, seq_length=16,
                     vocab_size=64)


def small():
    torch.manual_seed(0)
    return build_gpt(CONFIG)


def train(model, rt, steps):
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for step in steps:
        tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(step))
        lm_loss(model, tokens).backward()
        opt.step()
        opt.zero_grad()
        rt.end_step(step)


def summarize(run_dir) -> dict:
    proc = subprocess.run([sys.executable, "-m", "precisionrt.observe.cli", "summarize", "--json", str(run_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_resume_in_the_readme_order_continues_one_run(parallel, tmp_path):
    """The README's order: ``PrecisionRuntime(model, cfg, run_dir=...)``, then load the checkpoint. Before issue 37
    the runtime wrote run_start when it was built, so the log got a second run (a new run id, no ``resumed_from``,
    a layer table saying fp8 for the layer loaded as bf16) and ``summarize`` reported two runs."""
    model = small()
    rt = PrecisionRuntime(model, RuntimeConfig(mode="dynamic"), run_dir=tmp_path)
    train(model, rt, range(1, 3))
    rt.set_precision(LAYER, "bf16", step=2)
    train(model, rt, range(3, 5))
    checkpoint = {"model": model.state_dict(), "precision_runtime": rt.state_dict()}   # then the job ends

    model = small()
    rt = PrecisionRuntime(model, RuntimeConfig(mode="dynamic"), run_dir=tmp_path)
    model.load_state_dict(checkpoint["model"])
    rt.load_state_dict(checkpoint["precision_runtime"])
    train(model, rt, range(rt.last_step + 1, rt.last_step + 3))
    rt.close(rt.last_step)

    starts = [json.loads(line) for line in (tmp_path / "precision_events.jsonl").read_text().splitlines()]
    starts = [r for r in starts if r["kind"] == "run_start"]
    assert [s["run"] for s in starts] == [starts[0]["run"]] * 2 and [s.get("resumed_from") for s in starts] == [None, 4]
    loaded = {layer["name"]: layer["gemms"] for layer in starts[1]["layers"]}
    assert loaded[LAYER] == {"fprop": "bf16", "dgrad": "bf16", "wgrad": "bf16"}, "the loaded precisions"
    (run,) = summarize(tmp_path)["runs"]
    assert run["steps"] == 6 and run["ended"]
    assert run["layers"][LAYER]["gemms"]["fprop"] == {"fp8_steps": 2, "final_precision": "bf16"}


def test_a_runtime_without_run_dir_can_still_start_its_log_after_loading(parallel, tmp_path):
    """The other order (``start_log`` after the load, as the commands resume) writes the same one run."""
    model = small()
    rt = PrecisionRuntime(model, RuntimeConfig(mode="dynamic"), run_dir=tmp_path)
    train(model, rt, range(1, 3))
    state = rt.state_dict()
    rt = PrecisionRuntime(small(), RuntimeConfig(mode="dynamic"))
    rt.load_state_dict(state)
    rt.start_log(tmp_path)
    rt.close(2)
    (run,) = summarize(tmp_path)["runs"]
    assert run["ended"]


def names_through(wrap) -> list[str]:
    return sorted(PrecisionRuntime(wrap(small()), RuntimeConfig(mode="dynamic")).layers)


def megatron_ddp(model):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    with megatron_on_cpu():   # DDP's gradient buffers are allocated on torch.cuda.current_device()
        return DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)


def float16(model):
    from megatron.core.transformer.module import Float16Module

    model.config.bf16 = True
    return Float16Module(model.config, model)


def torch_fsdp1(model):
    from functools import partial

    from megatron.core.transformer.transformer_layer import TransformerLayer
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    return FullyShardedDataParallel(model, auto_wrap_policy=partial(transformer_auto_wrap_policy,
                                                                    transformer_layer_cls={TransformerLayer}),
                                    use_orig_params=True, device_id=torch.device("cpu"))


WRAPPERS = {
    "megatron DDP": megatron_ddp,
    "torch DDP": torch.nn.parallel.DistributedDataParallel,
    "Float16Module": float16,
    "megatron DDP(Float16Module)": lambda m: megatron_ddp(float16(m)),
    "torch FSDP1": torch_fsdp1,
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_wrappers_add_nothing_to_layer_names(parallel, wrapper):
    """Before issue 37 a runtime built on the wrapper named its layers ``module.decoder.layers...`` (FSDP1:
    ``_fsdp_wrapped_module.decoder.layers.0._fsdp_wrapped_module...``), so patterns and checkpoints made with the
    model's own names did not match."""
    bare = PrecisionRuntime(small(), RuntimeConfig(mode="dynamic"))
    wrapped_model = WRAPPERS[wrapper](small())
    wrapped = PrecisionRuntime(wrapped_model, RuntimeConfig(mode="dynamic"))
    assert list(wrapped.layers) == list(bare.layers) and wrapped.names == bare.names
    assert LAYER in wrapped.layers
    # checkpoints made through the wrapper and without it are interchangeable
    wrapped.set_precision(LAYER, "bf16")
    bare.load_state_dict(wrapped.state_dict())
    assert bare.gemm_precisions()[LAYER] == dict.fromkeys(("fprop", "dgrad", "wgrad"), "bf16")
    wrapped.load_state_dict(PrecisionRuntime(small(), RuntimeConfig(mode="dynamic")).state_dict())
    assert wrapped.precisions()[LAYER] == "fp8"


def test_an_unconverted_model_is_refused_with_the_public_api_name(parallel):
    """Before issue 37 the error named ``precisionrt.layers.spec.precision_layer_spec``, which no page mentions."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from precisionrt.models.gpt import transformer_config

    model = GPTModel(config=transformer_config(CONFIG), transformer_layer_spec=get_gpt_layer_local_spec(),
                     vocab_size=64, max_sequence_length=16)
    with pytest.raises(ValueError, match=r"convert_layer_spec\(get_gpt_layer_local_spec\(\)"):
        PrecisionRuntime(model, RuntimeConfig(mode="dynamic"))


@pytest.mark.parametrize("last_step, dropped", [(8, "step 8 was a check: no statistics are dropped"),
                                                (10, "the statistics of steps 9-10, since step 8's check")])
def test_a_reshard_says_which_statistics_it_drops(parallel, caplog, last_step, dropped):
    """Before issue 37 the INFO said "statistics since step 8's check are dropped" also when step 8 was the check."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from precisionrt.runtime import dist_state
    from precisionrt.runtime.monitors import MonitorConfig

    config = RuntimeConfig(mode="dynamic", monitor=MonitorConfig(check_interval=4))
    model = small()
    rt = PrecisionRuntime(model, config)
    train(model, rt, range(1, last_step + 1))
    saved = rt.sharded_state_dict(prefix="")
    # what dist_checkpointing.load gives back for these entries, saved at TP=2
    loaded = {key: value.data if isinstance(value, ShardedObject) else value for key, value in saved.items()}
    loaded["common"] = {**loaded["common"], "layout": {**loaded["common"]["layout"], "tp": 2}}
    with caplog.at_level(logging.INFO, logger=dist_state.log.name):
        PrecisionRuntime(small(), config).load_sharded_state_dict(loaded)
    assert dropped in caplog.text


def test_should_skip_step_takes_megatrons_float_norms(parallel):
    """Megatron's optimizers return their norm as a Python float; before issue 37 ``should_skip_step`` raised
    ``AttributeError: 'float' object has no attribute 'detach'``."""
    rt = PrecisionRuntime(small(), RuntimeConfig(mode="dynamic"))
    assert rt.should_skip_step(float("nan")) and not rt.should_skip_step(1.5)


def test_a_drill_enters_the_step_that_end_step_counts(parallel):
    """``start_step=3`` scales the layer in the forward of the step ``end_step(3)`` closes, and only then (a spike);
    a NaN drill is a skipped step whose layer's backward GEMMs are promoted at once."""
    model = small()
    rt = PrecisionRuntime(model, RuntimeConfig(mode="dynamic"))
    rt.drill(kind="spike", layer=LAYER, start_step=3, factor=64.0)
    scaled = []
    for step in range(1, 5):
        scaled.append(rt.layers[LAYER].channel_scale is not None)
        rt.end_step(step)
    assert scaled == [False, False, True, False]

    model = small()
    rt = PrecisionRuntime(model, RuntimeConfig(mode="dynamic"))
    rt.drill(kind="nonfinite", layer=LAYER, start_step=2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    skipped, switches = [], []
    for step in range(1, 4):
        lm_loss(model, torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(step))).backward()
        skipped.append(rt.optimizer_step(opt, clip_grad_norm_(model, 1.0), step))
        switches += [(e.step, e.layer, e.gemm, e.reason) for e in rt.end_step(step)]
    assert skipped == [False, True, False]
    assert switches == [(2, LAYER, "dgrad", "nonfinite"), (2, LAYER, "wgrad", "nonfinite")]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_drill_names_what_is_wrong(parallel):
    rt = PrecisionRuntime(small(), RuntimeConfig(mode="dynamic"))
    with pytest.raises(ConfigError, match=r"drill layer 'decoder.layers.9.mlp.linear_fc2' is not a managed layer"):
        rt.drill(kind="nonfinite", layer="decoder.layers.9.mlp.linear_fc2", start_step=1)
    with pytest.raises(ConfigError, match=r"drill channels \[999\] must be input channel indices"):
        rt.drill(kind="outlier", layer=LAYER, start_step=1, factor=8.0, channels=[999])
    with pytest.raises(ValueError, match="steps count from 1"):
        rt.drill(kind="spike", layer=LAYER, start_step=0)
