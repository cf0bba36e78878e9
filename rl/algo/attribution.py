"""Per-layer mismatch attribution: how much of the train/inference mismatch one rollout layer accounts for.

On sampled steps (every ``rl.attribution_every`` optimizer steps; 0: off) the trainer holds a small
micro-batch of the step's samples (``rl.attribution_samples``) and takes the next rollout layer that runs FP8,
round-robin as the shadow gradients go. The rollout engine scores the micro-batch twice: as it runs, and with
that layer alone in BF16. With ``k3`` the mismatch KL estimator against the trainer's log-probs of the same
tokens (pi_prox),

    mismatch_share(layer) = (k3(rollout as it runs) - k3(rollout with the layer in BF16)) / k3(rollout as it runs)

is the share of the mismatch that the layer's FP8 accounts for: near 1, the layer is the mismatch; near 0, it
is innocent; below 0, noise. The engine's weights may be newer than those that sampled the tokens, so the
mismatch measured here is the engine's now, staleness included in both terms. The latest share of each
layer is kept and logged (``rollout_corr/mismatch_share/<layer>``; the largest as
``rollout_corr/mismatch_share_max``), and the run summary lists them.

The share is also a policy signal (``[rl.mismatch_policy]``, off by default): a layer whose share reaches
``promote_share`` while the mismatch itself is at least ``min_k3_kl`` is promoted to BF16 on the rollout side
(``scope = "rollout"``: the rollout engine's copy only, to the end of the run) or on both sides (``"both"``:
the trainer's layer too, as a policy promotion with reason ``mismatch`` that returns to FP8 as any promoted
layer does). The switch log records each with a ``rollout_switch`` record (reason ``mismatch``, the share and
the k3 behind it) and, under ``"both"``, a ``switch`` record for the trainer's layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from precisionrt.config import Checked, Fraction, Range
from rl.algo.mismatch import sequence_k3


def _padded(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-sequence log-probs as a zero-padded ``[n, longest]`` tensor and its mask."""
    width = max(len(r) for r in rows)
    values, mask = torch.zeros(len(rows), width, dtype=torch.float64), torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        values[i, :len(r)], mask[i, :len(r)] = torch.tensor(r, dtype=torch.float64), 1
    return values, mask


def k3_kl(logp_train: list[list[float]], logp_infer: list[list[float]]) -> float:
    """The k3 mismatch KL over all tokens of ragged sequences (``rl.algo.mismatch.sequence_k3``)."""
    train, mask = _padded(logp_train)
    infer, _ = _padded(logp_infer)
    return float(sequence_k3(train, infer, mask).sum() / mask.sum().clamp(min=1))


@dataclass
class MismatchPolicyConfig(Checked):
    """The ``[rl.mismatch_policy]`` table: promote the layer that carries the mismatch (needs
    ``rl.attribution_every`` > 0)."""

    promote_share: Fraction = 0.0
    """A rollout FP8 layer whose ``mismatch_share`` reaches this is promoted (0: off; 0.5: it carries half)."""
    min_k3_kl: Annotated[float, Range(ge=0, le=1e6)] = 2e-3
    """... if the mismatch it is a share of (the measured micro-batch's k3) is at least this: a share of a tiny,
    healthy mismatch is noise (healthy main job: ~1e-3; an injected x1e6 outlier: ~6e-3)."""
    scope: Literal["rollout", "both"] = "rollout"
    """``rollout``: the rollout engine's copy only; ``both``: the trainer's layer too (dynamic mode)."""



@dataclass(frozen=True)
class Measurement:
    layer: str
    share: float
    k3_kl: float


class MismatchAttribution:
    def __init__(self, every: int, samples: int):
        self.every, self.samples = every, samples
        self.cursor = 0
        self.shares: dict[str, float] = {}   # layer -> its latest mismatch_share
        self.last: Measurement | None = None

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def culprit(self, policy: MismatchPolicyConfig) -> Measurement | None:
        """The last measurement, if its layer is to be promoted under ``policy``."""
        m = self.last
        if m is None or policy.promote_share <= 0:
            return None
        return m if m.share >= policy.promote_share and m.k3_kl >= policy.min_k3_kl else None

    def measure(self, engine, completions, logp_train: list[list[float]]) -> dict[str, float]:
        """Score ``completions`` (the held micro-batch; ``logp_train``: the trainer's log-probs of their tokens)
        with the engine as it runs and with the next FP8 layer in BF16; returns the step's metrics."""
        self.last = None
        fp8 = [n for n, p in engine.precisions().items() if p == "fp8"]
        held = [(c, lp) for c, lp in zip(completions, logp_train) if c.trained_tokens > 0]
        completions, logp_train = [c for c, _ in held], [lp for _, lp in held]
        if not fp8 or not completions:
            return {}
        layer = fp8[self.cursor % len(fp8)]
        self.cursor += 1
        seqs = [list(c.prompt) + c.tokens for c in completions]
        starts = [len(c.prompt) for c in completions]
        trained = [c.mask or [1] * len(c.tokens) for c in completions]   # episodes: their action tokens only
        keep = lambda rows: [[x for x, m in zip(r, t) if m] for r, t in zip(rows, trained)]  # noqa: E731
        logp_train = keep(logp_train)
        base = keep(engine.score(seqs, starts, []))
        alt = keep(engine.score(seqs, starts, [layer]))
        kl_base, kl_alt = k3_kl(logp_train, base), k3_kl(logp_train, alt)
        share = (kl_base - kl_alt) / kl_base if kl_base > 0 else 0.0
        self.shares[layer] = share
        self.last = Measurement(layer, share, kl_base)
        return {f"rollout_corr/mismatch_share/{layer}": share,
                "rollout_corr/mismatch_share_max": max(self.shares.values()),
                "rollout_corr/attribution_k3_kl": kl_base}


def score(model, sequences: list[list[int]], starts: list[int], temperature: float, logits_of) -> list[list[float]]:
    """Log-probs (full softmax at ``temperature``) of each sequence's tokens from position ``starts[i]`` on."""
    width = max(len(s) for s in sequences)
    tokens = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, :len(s)] = torch.tensor(s)
    tokens = tokens.to(next(model.parameters()).device)   # a measurement, not an ordinary step: may synchronise
    with torch.no_grad():
        logp = torch.log_softmax(logits_of(model, tokens[:, :-1]).float() / temperature, dim=-1)
        picked = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1).tolist()
    return [row[start - 1:len(s) - 1] for row, start, s in zip(picked, starts, sequences)]
