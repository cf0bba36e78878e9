"""What the training commands (``precisionrt.train``, ``rl.train``) share around their loops."""

from __future__ import annotations


class TooManySkippedSteps(RuntimeError):
    """Most optimizer steps were skipped for nonfinite gradients: the run is not training."""


def check_skipped(skipped: int, done: int, max_fraction: float, minimum: int = 5) -> None:
    """Raise ``TooManySkippedSteps`` when ``skipped`` of the ``done`` steps of this run segment exceed
    ``max_fraction`` (and number at least ``minimum``, so that one early NaN does not end a run)."""
    if skipped >= minimum and skipped > max_fraction * done:
        raise TooManySkippedSteps(
            f"{skipped} of {done} optimizer steps were skipped for nonfinite gradients (more than "
            f"train.max_skipped_fraction = {max_fraction}): the run is training on nothing. Lower train.lr, "
            "check the data, or look at the switch log for the layer where NaN/Inf entered")
