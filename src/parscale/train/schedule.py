"""Learning-rate schedules as pure functions of the step.

The loop sets the rate of every parameter group from `lr_at(step, ...)` before each update,
so the schedule has no state of its own: resuming at step s needs only s.
"""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup from 1/warmup to 1 over the first `warmup_steps` updates (step counts from 0)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


def cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Warmup, then half a cosine from 1 down to `min_ratio` at the last step."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float,
               decay_fraction: float = 0.2) -> float:
    """Warmup-stable-decay: flat at 1 after warmup, then a linear decay to `min_ratio` over
    the last `decay_fraction` of the run (the shape MiniCPM and the ParScale paper's
    second stage use, because the stable phase can be extended without replanning)."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1.0 - min_ratio) * progress


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int,
          schedule: str = "cosine", min_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """The learning rate of update number `step` (0-based)."""
    if schedule == "cosine":
        factor = cosine_factor(step, warmup_steps, total_steps, min_ratio)
    elif schedule == "wsd":
        factor = wsd_factor(step, warmup_steps, total_steps, min_ratio, decay_fraction)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    return base_lr * factor
