"""CUDA only (skipped without a GPU): the fused kernels against the eager reference, bit for bit, and the
host-synchronisation budget of a dynamic training step (0 on ordinary steps, 1 on check steps)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

if torch.cuda.is_available():
    from precisionrt.numerics import fp8, kernels
    from precisionrt.numerics.fp8 import E4M3, E5M2, NUM_STATS, STAT_INDEX, ScalingConfig, ScalingState
    from precisionrt.layers.linear import LayerNumerics, PrecisionLinearFunction
    from precisionrt.distributed.syncs import host_syncs

DEV = "cuda"
COUNT_FIELDS = ("saturated", "underflow", "nonfinite", "numel", "nonzero")


def _operands(seed: int):
    """Tensors that exercise every branch: Gaussian, odd shapes, outliers, NaN/Inf, zeros, a tiny amax,
    subnormal-range values."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    out = {
        "gauss": torch.randn(512, 256, generator=g, device=DEV, dtype=torch.bfloat16),
        "odd": torch.randn(37, 48, generator=g, device=DEV, dtype=torch.bfloat16) * 3,
        "wide_range": (torch.randn(128, 64, generator=g, device=DEV) *
                       torch.logspace(-12, 3, 64, device=DEV)).to(torch.bfloat16),
        "tiny_amax": torch.full((16, 32), 1e-36, device=DEV),          # scale clamps to the fp32 max
        "amax_at_clamp_edge": torch.full((16, 32), 1.3165537626040637e-36, device=DEV),
        "zeros": torch.zeros(64, 32, device=DEV, dtype=torch.bfloat16),
        "fp32": torch.randn(96, 80, generator=g, device=DEV) * 1e-3,
    }
    bad = torch.randn(64, 64, generator=g, device=DEV, dtype=torch.bfloat16)
    bad[3, 5], bad[7, 1], bad[9, 9] = float("nan"), float("inf"), -float("inf")
    out["nonfinite"] = bad
    outlier = torch.randn(256, 128, generator=g, device=DEV, dtype=torch.bfloat16)
    outlier[:, 0] *= 1e5
    out["outlier"] = outlier
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("margin", [0, 2])
def test_fused_quantize_is_bit_identical_to_eager(fmt, margin):
    f = fp8.get_format(fmt)
    for name, x in _operands(seed=margin).items():
        cfg = ScalingConfig(recipe="current", margin=margin)
        ref_state, fused_state = ScalingState(f, cfg, DEV), ScalingState(f, cfg, DEV)
        col_weight = torch.rand(x.shape[1], device=DEV) * 4   # a GEMM partner's squared column norms
        q_ref, s_ref, st_ref = fp8.quantize_tensor(x, ref_state, update=True, stats="full", col_weight=col_weight)
        acc = torch.zeros(NUM_STATS, device=DEV)
        m_pad = x.shape[0] + (-x.shape[0] % 16)
        q, q_t, s, s_inv = kernels.quantize(x, f, fused_state, update=True, level="full", acc=acc,
                                            transpose_rows=m_pad, col_weight=col_weight)
        assert torch.equal(_bytes(q), _bytes(q_ref)), f"{name}: fp8 bytes differ"
        assert torch.equal(s.view(torch.int32), s_ref.view(torch.int32)), f"{name}: scale differs"
        assert torch.equal(s_inv.view(torch.int32), s_ref.reciprocal().view(torch.int32)), name
        assert torch.equal(fused_state.scale.view(torch.int32), ref_state.scale.view(torch.int32)), name
        expect_t = torch.zeros(x.shape[1], m_pad, dtype=torch.uint8, device=DEV)
        expect_t[:, : x.shape[0]] = _bytes(q_ref).t()
        assert torch.equal(_bytes(q_t), expect_t), f"{name}: transposed bytes differ"
        for field in STAT_FIELDS_CHECKED:
            i = STAT_INDEX[field]
            if field in COUNT_FIELDS or field in ("amax", "scaled_amax"):
                assert acc[i].item() == st_ref[i].item(), f"{name}: {field} {acc[i].item()} != {st_ref[i].item()}"
            else:
                torch.testing.assert_close(acc[i], st_ref[i], rtol=1e-5, atol=1e-30, msg=f"{name}: {field}")


STAT_FIELDS_CHECKED = fp8.STAT_FIELDS if torch.cuda.is_available() else ()


@pytest.mark.parametrize("algo", ["max", "most_recent"])
def test_fused_delayed_scaling_follows_eager_history(algo):
    cfg = ScalingConfig(recipe="delayed", amax_history_len=4, amax_compute_algo=algo)
    ref, fused = ScalingState(E4M3, cfg, DEV), ScalingState(E4M3, cfg, DEV)
    g = torch.Generator(device=DEV).manual_seed(1)
    for step in range(9):
        x = torch.randn(64, 64, generator=g, device=DEV) * (10.0 ** (step % 4 - 1))
        if step == 2:
            x.zero_()                 # an unusable amax: the history must not take it
        if step == 5:
            x[0, 0] = float("nan")
        q_ref, s_ref, cheap_ref = fp8.quantize_tensor(x, ref, update=True, stats="cheap")
        acc = torch.zeros(NUM_STATS, device=DEV)
        q, _, s, _ = kernels.quantize(x, E4M3, fused, update=True, level="cheap", acc=acc)
        assert torch.equal(_bytes(q), _bytes(q_ref)), step
        assert torch.equal(s, s_ref), step
        assert torch.equal(fused.amax_history, ref.amax_history), step
        assert torch.equal(fused.scale, ref.scale), step
        assert torch.equal(acc, cheap_ref), step


def test_fused_dry_run_and_amax_stats_match_eager():
    for name, x in _operands(seed=3).items():
        acc = torch.zeros(NUM_STATS, device=DEV)
        kernels.quantize(x, E5M2, None, update=False, level="full", acc=acc, write_q=False, margin=1)
        ref = fp8.dry_run_stats(x, E5M2, margin=1)
        torch.testing.assert_close(acc, ref, rtol=1e-5, atol=1e-30, msg=name)
        acc.zero_()
        kernels.amax_stats(x, acc)
        assert torch.equal(acc, fp8.cheap_stats(fp8.abs_max(x), None)), name


@pytest.mark.parametrize("tokens", [64, 37])
@pytest.mark.parametrize("level", ["none", "cheap", "full"])
def test_fused_layer_equals_eager_layer(tokens, level):
    """The whole FP8 linear (forward, dgrad, wgrad) through the fused path gives the eager path's results
    bit for bit, and the same statistics."""
    g = torch.Generator(device=DEV).manual_seed(tokens)
    x0 = torch.randn(tokens, 96, generator=g, device=DEV, dtype=torch.bfloat16)
    w0 = torch.randn(160, 96, generator=g, device=DEV, dtype=torch.bfloat16) * 0.05
    dy = torch.randn(tokens, 160, generator=g, device=DEV, dtype=torch.bfloat16)
    results = []
    for fused in (False, True):
        numerics = LayerNumerics(ScalingConfig(), DEV)
        numerics.fused, numerics.collect, numerics.full_stats = fused, level != "none", level == "full"
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = PrecisionLinearFunction.apply(x, w, None, numerics, "fp8", False, False, None)
        y.backward(dy)
        results.append((y.detach(), x.grad, w.grad, numerics.stats.clone()))
    (y_e, dx_e, dw_e, st_e), (y_f, dx_f, dw_f, st_f) = results
    assert torch.equal(y_f, y_e) and torch.equal(dx_f, dx_e) and torch.equal(dw_f, dw_e)
    torch.testing.assert_close(st_f, st_e, rtol=1e-5, atol=1e-30)


def test_dynamic_step_host_syncs(tmp_path):
    """0 host synchronisations on an ordinary dynamic step, exactly 1 on a check step, for any layer count."""
    from precisionrt.models.gpt import ModelConfig, build_gpt
    from precisionrt.distributed.parallel import init_parallel
    from precisionrt.runtime.precision_runtime import PrecisionRuntime, RuntimeConfig
    from precisionrt.distributed.syncs import to_device
    from precisionrt.train import TrainConfig, lm_loss, make_optimizer

    init_parallel(1, device=DEV)
    counts = {}
    for layers in (2, 4):
        torch.manual_seed(0)
        model = build_gpt(ModelConfig(num_layers=layers, hidden_size=128, num_attention_heads=4,
                                      ffn_hidden_size=256, seq_length=64, params_dtype="bfloat16"), device=DEV)
        rt = PrecisionRuntime(model, RuntimeConfig(mode="dynamic"), run_dir=tmp_path / f"l{layers}")
        opt = make_optimizer(model, TrainConfig(), torch.device(DEV))
        batch = torch.randint(0, 256, (4, 65))

        def step(n: int) -> None:
            loss = lm_loss(model, to_device(batch, torch.device(DEV)))
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            rt.skip_on_device(norm, opt, n)
            opt.step()
            opt.zero_grad(set_to_none=True)
            rt.end_step(n)

        for n in range(1, 11):   # warm up: compilation, allocator, the first check
            step(n)
        host_syncs(lambda: None)   # the first switch into "warn" mode reports itself once
        ordinary = []
        for n in range(11, 20):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")   # any synchronising call raises, with its traceback
            try:
                step(n)
                ordinary.append([])
            except RuntimeError as e:
                ordinary.append([str(e)[:200]])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        check = host_syncs(lambda: step(20))
        counts[layers] = (ordinary, check)
        rt.close(20)
    for layers, (ordinary, check) in counts.items():
        assert ordinary == [[]] * 9, f"{layers} layers: syncs on ordinary steps at {ordinary}"
        assert len(check) == 1, f"{layers} layers: {len(check)} syncs on a check step, at {check}"


def test_rl_decode_and_trainer_steps_synchronise_as_budgeted(tmp_path, monkeypatch):
    """The RL loop on the GPU (issue 24): a decode of 64 steps at ``rollout.sync_every`` 16 synchronises 4 times
    (3 looks, 1 transfer); an ordinary trainer step exactly once (its one transfer); a check step once more.
    Sync mode, each step's rollout made before the trainer's measured region."""
    from pathlib import Path

    from precisionrt.config import load_config
    from precisionrt.models.gpt import ModelConfig, build_gpt
    from precisionrt.distributed.syncs import host_syncs
    from rl.inference.rollout import generate
    from rl.train import RLConfig, train
    from rl.trainer import RLTrainer

    step_syncs, original_step = [], RLTrainer.train_step

    def measured_step(self, step, grad_clip):
        self.worker.rollout_once()   # the batch, outside the measured region
        out = []
        step_syncs.append(host_syncs(lambda: out.append(original_step(self, step, grad_clip))))
        return out[0]

    monkeypatch.setattr(RLTrainer, "train_step", measured_step)
    config = Path(__file__).parent.parent / "configs/rl_tiny_cpu.toml"
    train(load_config(RLConfig, config, [
        'run.device="cuda"', f'run.dir="{tmp_path / "run"}"', 'executor.mode="sync"', "train.steps=12",
        "train.warm_start_steps=4", "train.eval_every=12", "train.log_every=12", "precision.monitor.check_interval=4"]))
    for step, syncs in enumerate(step_syncs[2:], start=4 + 3):   # optimizer steps 7.. (after 4 warm-start steps)
        assert len(syncs) == 1 + (step % 4 == 0), (step, syncs)

    torch.manual_seed(0)
    model = build_gpt(ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                                  seq_length=80), device=DEV)
    gen = torch.Generator(DEV).manual_seed(0)

    def decode():
        generate(model, [b"12+34=", b"7+8="], 64, 80, 1.0, 1.0, gen, kv_cache=True, stop_ids=(-1,), sync_every=16)

    decode()   # warm up
    assert len(host_syncs(decode)) == 4


def test_captured_steps_equal_eager_ones_and_recapture_after_a_switch(tmp_path):
    """Issue 25, item 2: 24 dynamic steps eagerly and through ``CapturedStep`` from one seed: the same losses,
    weights and scales bit for bit; the graph is captured after its warm-ups, a switch captures the new
    precision map, the return replays the old graph, sampled steps run eagerly, a replayed step synchronises
    nothing."""
    from precisionrt.distributed.cuda_graphs import CapturedStep
    from precisionrt.models.gpt import ModelConfig, build_gpt
    from precisionrt.distributed.parallel import init_parallel
    from precisionrt.runtime.precision_runtime import PrecisionRuntime, RuntimeConfig
    from precisionrt.distributed.syncs import host_syncs
    from precisionrt.train import TrainConfig, lm_loss, make_optimizer

    init_parallel(1, device=DEV)
    layer = "decoder.layers.1.mlp.linear_fc1"
    g = torch.Generator(device=DEV).manual_seed(0)
    batches = [torch.randint(0, 256, (4, 65), generator=g, device=DEV) for _ in range(24)]

    def run(captured: bool):
        torch.manual_seed(0)
        model = build_gpt(ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=256,
                                      seq_length=64, params_dtype="bfloat16"), device=DEV)
        rt = PrecisionRuntime(model, RuntimeConfig(mode="dynamic"), run_dir=tmp_path / str(captured))
        opt = make_optimizer(model, TrainConfig(), torch.device(DEV))

        def step_fn(tokens):
            loss = lm_loss(model, tokens)
            loss.backward()
            return loss

        step = CapturedStep(step_fn, rt, model.parameters()) if captured else step_fn
        record, syncs = [], None
        for n, tokens in enumerate(batches, start=1):
            if n == 7:
                rt.set_precision(layer, "bf16")
            if n == 15:
                rt.set_precision(layer, "fp8")
            if captured and n == 13:   # a replayed step
                out = []
                syncs = host_syncs(lambda: out.append(step(tokens)))
                loss = out[0]
            else:
                loss = step(tokens)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            rt.skip_on_device(norm, opt, n)
            opt.step()
            opt.zero_grad(set_to_none=True)
            rt.end_step(n)
            scales = [s.scale.clone() for l in rt.layers.values() for s in l.numerics.scaling.values()]
            record.append((loss.detach().clone(), [p.detach().clone() for p in model.parameters()], scales))
        rt.close(24)
        return record, step, syncs

    eager, _, _ = run(False)
    captured, step, syncs = run(True)
    for n, (e, c) in enumerate(zip(eager, captured), start=1):
        assert torch.equal(e[0], c[0]), n
        assert all(torch.equal(a, b) for a, b in zip(e[1], c[1])), n
        assert all(torch.equal(a, b) for a, b in zip(e[2], c[2])), n
    d = step.decisions
    assert d[:4] == ["eager", "eager", "capture", "replay"] and d[6:9] == ["eager", "eager", "capture"]
    assert d[9] == d[19] == "eager", "sampled steps run eagerly"
    assert d[14] == "replay", "the return to FP8 replays the first graph"
    assert d.count("capture") == 2 and syncs == []
