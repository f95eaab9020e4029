"""Learning-rate schedules as optax schedules (pure functions of the update count).

`tri_stage` is fairseq's `tri_stage` scheduler (`fairseq/optim/lr_scheduler/tri_stage_lr_scheduler.py`),
the one every wav2vec 2.0 / data2vec fine-tuning recipe uses: linear warm-up from
`init_lr_scale * peak` to `peak`, a hold at `peak`, then exponential decay to
`final_lr_scale * peak`, after which it stays there. fairseq's recipes give the phases as
`phase_ratio` of `max_update` (base_100h: [0.1, 0.4, 0.5], init 0.01, final 0.05).

`linear` is transformers' `get_linear_schedule_with_warmup`: 0 to peak over the warm-up, then
linearly to 0 at `total_steps`. `constant` is a flat `peak` after an optional linear warm-up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import optax

from flax_d2v.errors import D2VError

SCHEDULES = ("tri_stage", "linear", "constant", "cosine")


def phase_steps(total_steps: int, phase_ratio: Sequence[float]) -> tuple[int, int, int]:
    """(warmup, hold, decay) update counts from fairseq's `phase_ratio` (must sum to <= 1)."""
    if len(phase_ratio) != 3 or any(r < 0 for r in phase_ratio) or sum(phase_ratio) > 1.0 + 1e-6:
        raise D2VError(f"--phase-ratio: expected three non-negative numbers summing to <= 1, got {list(phase_ratio)}")
    warmup, hold, decay = (int(total_steps * r) for r in phase_ratio)
    return warmup, hold, decay


def tri_stage(
    peak_lr: float,
    warmup_steps: int,
    hold_steps: int,
    decay_steps: int,
    init_lr_scale: float = 0.01,
    final_lr_scale: float = 0.05,
) -> optax.Schedule:
    """fairseq's tri-stage schedule; the value at update `count` (0-based) as fairseq's `step_update(count)`."""
    init_lr = init_lr_scale * peak_lr
    final_lr = final_lr_scale * peak_lr
    decay_factor = -math.log(final_lr_scale) / decay_steps if decay_steps > 0 else 0.0

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = init_lr + (peak_lr - init_lr) * count / max(warmup_steps, 1)
        in_decay = count - warmup_steps - hold_steps
        decayed = peak_lr * jnp.exp(-decay_factor * in_decay)
        lr = jnp.where(
            count < warmup_steps,
            warm,
            jnp.where(in_decay < 0, peak_lr, jnp.where(in_decay < decay_steps, decayed, final_lr)),
        )
        return lr

    return schedule


def linear(peak_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """transformers' linear warm-up then linear decay to 0 at `total_steps`."""

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = peak_lr * count / max(warmup_steps, 1)
        decay = peak_lr * jnp.maximum(0.0, (total_steps - count) / max(total_steps - warmup_steps, 1))
        return jnp.where(count < warmup_steps, warm, decay)

    return schedule


def constant(peak_lr: float, warmup_steps: int = 0) -> optax.Schedule:
    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        return jnp.where(count < warmup_steps, peak_lr * count / max(warmup_steps, 1), peak_lr)

    return schedule


def cosine(peak_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """fairseq's `cosine` scheduler (data2vec 2.0's pretraining; min_lr 0, t_mult 1, one period): linear
    from 0 to `peak` over the warm-up, then `0.5 * peak * (1 + cos(pi * t / (total - warmup)))`."""
    period = max(total_steps - warmup_steps, 1)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        t = jnp.clip(count - warmup_steps, 0.0, period)
        cos = 0.5 * peak_lr * (1.0 + jnp.cos(jnp.pi * t / period))
        return jnp.where(count < warmup_steps, peak_lr * count / max(warmup_steps, 1), cos)

    return schedule


def make_schedule(
    name: str,
    peak_lr: float,
    total_steps: int,
    *,
    warmup_steps: int | None = None,
    hold_steps: int | None = None,
    decay_steps: int | None = None,
    phase_ratio: Sequence[float] = (0.1, 0.4, 0.5),
    init_lr_scale: float = 0.01,
    final_lr_scale: float = 0.05,
) -> optax.Schedule:
    """The schedule named by `--lr-schedule`. Explicit step counts win over `phase_ratio`."""
    if name not in SCHEDULES:
        raise D2VError(f"--lr-schedule: unknown schedule {name!r}; choose one of {list(SCHEDULES)}")
    if name == "tri_stage":
        w, h, d = phase_steps(total_steps, phase_ratio)
        w = w if warmup_steps is None else warmup_steps
        h = h if hold_steps is None else hold_steps
        d = d if decay_steps is None else decay_steps
        return tri_stage(peak_lr, w, h, d, init_lr_scale, final_lr_scale)
    w = int(0.1 * total_steps) if warmup_steps is None else warmup_steps
    if name == "linear":
        return linear(peak_lr, w, total_steps)
    if name == "cosine":
        return cosine(peak_lr, w, total_steps)
    return constant(peak_lr, w if warmup_steps is not None else 0)
