"""Learning-rate schedules: constant, linear and cosine, each with linear warmup.

What `step` means under rotation (the explicit choice): `step` counts optimizer steps taken by the
driver, whatever window they updated. The schedule therefore advances every optimizer step, and
`total_steps` is the number of optimizer steps of the run, exactly as for dense training. The
reference implementation advanced its scheduler about once per K steps while building it for the full
step count, so warmup lasted K times longer and linear decay ended near lr*(1-1/K); counting every step
avoids both. Skipped steps (non-finite gradient norm) do not advance the schedule.

A consequence worth knowing: with K windows visited in turn, window k sees the learning rates at steps
k, k+K, k+2K, ... . The decay formulas are those of Hugging Face's `get_*_schedule_with_warmup`, plus a
floor `min_lr_ratio` for the decaying kinds, so learning-rate intuition carries over from dense training.

Warm-up differs from Hugging Face's on purpose: warm-up step i (0-based) uses the factor (i+1)/warmup_steps,
so the first step trains at lr/warmup_steps and the last warm-up step at the full rate. Hugging Face's
i/warmup_steps gives the first step the learning rate 0: a whole forward/backward (and, under rotation, a
window's whole visit) that changes nothing. The price is one extra step at the peak (the last warm-up
step and the first decay step both have factor 1). Past total_steps the decaying kinds stay at
min_lr_ratio (0 by default); chunkft-run refuses to run steps there (executor/train.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ScheduleKind = Literal["constant", "linear", "cosine"]
SCHEDULE_KINDS: tuple[str, ...] = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class ScheduleSpec:
    """A learning-rate schedule over optimizer steps (see the module docstring for what a step is)."""

    kind: ScheduleKind
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(
                f"schedule kind {self.kind!r} is unknown; use one of {', '.join(SCHEDULE_KINDS)}"
            )
        if self.total_steps < 1:
            raise ValueError(f"schedule total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"schedule warmup_steps must be in [0, total_steps={self.total_steps}], "
                f"got {self.warmup_steps}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def lr_factor(spec: ScheduleSpec, step: int) -> float:
    """Multiplier of the base learning rate for the optimizer step with index `step` (0-based).

    Pure: the same (spec, step) always gives the same float, so resuming needs only the step count and a
    reference run can use it through torch.optim.lr_scheduler.LambdaLR.
    """
    if step < 0:
        raise ValueError(f"schedule step must be >= 0, got {step}")
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    if spec.kind == "constant":
        return 1.0
    decay_steps = spec.total_steps - spec.warmup_steps
    progress = 1.0 if decay_steps == 0 else min(1.0, (step - spec.warmup_steps) / decay_steps)
    if spec.kind == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * shape


def lr_at(spec: ScheduleSpec, base_lr: float, step: int) -> float:
    """The learning rate of optimizer step `step`: base_lr times the schedule's factor."""
    return base_lr * lr_factor(spec, step)
