"""The sampling schedule: on which steps the monitors gather exact statistics, and which layers with an FP8
backward GEMM get a BF16 shadow of it (the gradient-sensitivity signal).

Exact ("full") statistics every ``monitor.full_stats_every`` steps; otherwise cheap ones. A shadow backward
for ``monitor.shadow_layers`` FP8 layers every ``monitor.shadow_every`` steps, round-robin over the layers in
FP8 at that moment, the same on every rank (the cursor is part of the checkpoint, so a resumed run shadows the
layers the uninterrupted one would).
"""

from __future__ import annotations

from precisionrt.runtime.monitors import MonitorConfig


class SamplingSchedule:
    def __init__(self, layers: dict, config: MonitorConfig, monitoring: bool):
        self.layers, self.config, self.monitoring = layers, config, monitoring
        self.cursor = 0

    def plan(self, step: int) -> None:
        """Set each layer's sampling for upcoming step ``step``."""
        m = self.config
        for layer in self.layers.values():
            layer.numerics.shadow = False
            layer.numerics.full_stats = step % m.full_stats_every == 0
        if not self.monitoring or m.shadow_every == 0 or step % m.shadow_every:
            return
        # a shadow compares FP8 backward GEMMs with BF16: layers with an FP8 dgrad or wgrad
        candidates = [n for n, l in self.layers.items() if "fp8" in (l.gemm_precisions["dgrad"], l.gemm_precisions["wgrad"])]
        for i in range(min(m.shadow_layers, len(candidates))):
            self.layers[candidates[(self.cursor + i) % len(candidates)]].numerics.shadow = True
        self.cursor += m.shadow_layers

    def state_dict(self) -> dict:
        return {"shadow_cursor": self.cursor,
                "shadow_next": [n for n, l in self.layers.items() if l.numerics.shadow]}

    def load_state_dict(self, sd: dict, next_step: int | None) -> None:
        """Restore the plan of ``next_step`` as it was made (None: an old checkpoint taken at a check, where
        only the shadow plan was saved)."""
        self.cursor = int(sd["shadow_cursor"])
        for name, layer in self.layers.items():
            layer.numerics.shadow = name in sd["shadow_next"]
            if next_step is not None:
                layer.numerics.full_stats = next_step % self.config.full_stats_every == 0
