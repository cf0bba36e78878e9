"""Skipping the optimizer step whose gradients are not finite, on the host or on the device.

On the host (``check``): one scalar transfer per step, as Megatron's grad-norm check makes; the runtime then
checks at once, so the layer where NaN/Inf entered is promoted before the next forward. On the device
(``on_device``, for CUDA): the flag goes to a fused Adam/AdamW as ``optimizer.found_inf`` (torch's GradScaler
protocol), which skips the update without a host synchronisation; the flags ride along with the next check's
one device->host transfer (``fetch``), and the skipped steps are learnt then.
"""

from __future__ import annotations

import torch


def _nonfinite_flag(grad_norm: torch.Tensor) -> torch.Tensor:
    """1.0 where the gradient norm is NaN/Inf on any rank, else 0.0 (a scalar on grad_norm's device)."""
    bad = (~torch.isfinite(grad_norm.detach().float())).float().reshape(())
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad


class NonfiniteSkips:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.check_next = False   # a step was skipped on the host: the next end_step checks at once
        self._pending: list[tuple[int, torch.Tensor]] = []   # (step, device flag) not yet fetched
        self._learnt: list[int] = []

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def check(self, grad_norm: torch.Tensor) -> bool:
        if not self.enabled:
            return False
        skip = bool(_nonfinite_flag(grad_norm).item())
        self.check_next |= skip
        return skip

    def on_device(self, grad_norm: torch.Tensor, optimizer: torch.optim.Optimizer, step: int) -> None:
        if not self.enabled:
            return
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            raise ValueError("skip_on_device needs an optimizer that honours found_inf, e.g. "
                             "torch.optim.AdamW(..., fused=True); use should_skip_step otherwise")
        bad = _nonfinite_flag(grad_norm)
        optimizer.found_inf = bad
        self._pending.append((step, bad))

    def fetch(self, packed: torch.Tensor | None, check_after_skip: bool = False):
        """One device->host transfer of ``packed`` (a check's buffer, or None) together with the pending
        flags; returns ``packed`` on the host. ``check_after_skip``: a skip learnt here makes the next check
        come at once (as ``check`` does)."""
        steps = [s for s, _ in self._pending]
        flags = [f.reshape(1) for _, f in self._pending]
        self._pending = []
        parts = ([packed.reshape(-1)] if packed is not None else []) + flags
        if not parts:
            return None
        host = torch.cat(parts).cpu().numpy() if len(parts) > 1 else parts[0].cpu().numpy()
        n_flags = len(flags)
        new = [s for s, f in zip(steps, host[len(host) - n_flags:]) if f > 0]
        self._learnt += new
        self.check_next |= check_after_skip and bool(new)
        return host[: len(host) - n_flags].reshape(packed.shape) if packed is not None else None

    def take(self, flush: bool = False) -> list[int]:
        """The device-side skips learnt so far, cleared; ``flush`` fetches the unfetched flags first."""
        if flush and self._pending:
            self.fetch(None)
        out, self._learnt = self._learnt, []
        return out

    def state_dict(self) -> dict:
        return {"force_check": self.check_next,
                "pending_skips": [[s, float(f)] for s, f in self._pending] + [[s, 1.0] for s in self._learnt]}

    def load_state_dict(self, sd: dict) -> None:
        self.check_next = bool(sd["force_check"])
        self._pending = []
        self._learnt = [int(s) for s, flag in sd["pending_skips"] if flag > 0]
