"""The train state (one pytree) and the optimizer that updates it.

`TrainState` holds everything a step reads and writes: the update count, the trained params, the
optimizer state, the objective's `extra` state (data2vec's EMA teacher) and the base rng. It is
what a checkpoint holds and what `jax.jit` donates, so nothing that matters lives outside it.

The optimizer is fairseq's fine-tuning optimizer as optax: gradient clipping by global norm
(fairseq `clip_norm`), AdamW (`adam_betas (0.9, 0.98)`, eps 1e-8, decoupled weight decay), a
learning-rate schedule, and per-parameter groups:

- `frozen`: the conv feature encoder when `--freeze-feature-encoder` (fairseq `feature_grad_mult
  0.0`): `optax.set_to_zero`, so neither Adam nor weight decay touches it and it keeps no
  optimizer moments.
- `delayed`: the transformer when `--freeze-transformer-steps K` (fairseq
  `freeze_finetune_updates`): only the head (`lm_head`) learns for the first K updates; the
  transformer's Adam state stays untouched until then, as fairseq does not compute its
  gradients at all (its Adam moments and bias correction start at update K+1). Its learning
  rate is still the one global schedule at the global update count (fairseq has one lr
  scheduler): from update K+1 on it gets what the head gets, no new warm-up. The head is
  everything beside the nested encoder (`flax_d2v.heads.BASE_PREFIX`, `data2vec_audio`) in any
  registered head's tree: `lm_head`, `classifier`, `tdnn_N`, ...
  With `freeze_base_model` (transformers' `freeze_base_model()`) the whole encoder is `frozen`.
- `trainable`: everything else.

With `weight_decay_exempt` (fairseq's composite optimizer, data2vec 2.0's large recipe) the parameters
fairseq's `data2vec2.py` marks `weight_decay_scale 0` (1-D ones: biases, LayerNorm scales; `*.bias`;
`alibi_scale`; see `decays`) form groups of their own, `trainable_no_decay` / `delayed_no_decay`: the same
AdamW and schedule, weight decay 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from flax_d2v.heads import BASE_PREFIX

PyTree = Any

# Path prefixes (joined with "/") of the feature encoder and of the head, in both the CTC
# module's tree (`data2vec_audio/...`) and the bare model's tree.
FEATURE_ENCODER_KEYS = ("feature_extractor",)


def is_head_path(path: tuple[str, ...], has_head: bool) -> bool:
    """Whether a parameter belongs to the head, not the encoder (a bare encoder's tree has no head)."""
    return has_head and bool(path) and path[0] != BASE_PREFIX


@flax.struct.dataclass
class TrainState:
    """Everything one training step reads and writes (a pytree; checkpointed as a whole)."""

    step: jax.Array  # int32 scalar: number of optimizer updates done
    params: PyTree
    opt_state: PyTree
    extra: PyTree  # objective state outside the gradient (EMA teacher), {} for CTC
    rng: jax.Array  # base key; step keys are fold_in(rng, step)


def decays(path: tuple[str, ...], value: Any) -> bool:
    """Whether weight decay applies under `weight_decay_exempt`: fairseq's `len(p.shape) == 1 or
    name.endswith(".bias") or "alibi_scale" in name` exempt."""
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return not (jnp.ndim(value) == 1 or name.endswith("bias") or "alibi_scale" in name)


def param_labels(
    params: PyTree, freeze_feature_encoder: bool, freeze_transformer_steps: int, freeze_base_model: bool = False
) -> PyTree:
    """The optimizer group of every parameter: 'frozen', 'delayed' or 'trainable'."""
    flat = traverse_util.flatten_dict(params)
    has_head = BASE_PREFIX in params

    def label(path: tuple[str, ...]) -> str:
        head = is_head_path(path, has_head)
        if freeze_base_model and not head:
            return "frozen"
        # (the x-vector head's own `feature_extractor` Linear is not the conv feature encoder)
        if freeze_feature_encoder and any(k in path for k in FEATURE_ENCODER_KEYS) and not head:
            return "frozen"
        if freeze_transformer_steps > 0 and not head:
            return "delayed"
        return "trainable"

    return traverse_util.unflatten_dict({k: label(k) for k in flat})


class DelayedState(flax.struct.PyTreeNode):
    count: jax.Array
    inner: PyTree


def delayed(inner: optax.GradientTransformation, start: int) -> optax.GradientTransformation:
    """`inner`, but zero updates (and `inner`'s state left as it was) for the first `start` updates.

    `inner` counts only its own active updates, so a schedule inside it must be shifted by `start`
    to follow the global update count (see `make_optimizer`).
    """

    def init(params):
        return DelayedState(count=jnp.zeros((), jnp.int32), inner=inner.init(params))

    def update(updates, state, params=None):
        new_updates, new_inner = inner.update(updates, state.inner, params)
        active = state.count >= start
        new_updates = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
        new_inner = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_inner, state.inner)
        return new_updates, DelayedState(count=state.count + 1, inner=new_inner)

    return optax.GradientTransformation(init, update)


def make_optimizer(
    params: PyTree,
    schedule: optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip_norm: float = 0.0,
    freeze_feature_encoder: bool = True,
    freeze_transformer_steps: int = 0,
    freeze_base_model: bool = False,
    weight_decay_exempt: bool = False,
) -> optax.GradientTransformation:
    """Clip, then AdamW with `schedule`, per parameter group (see the module docstring).

    The schedule sees the number of updates of the whole optimizer, so the head and a delayed
    transformer share one clock (fairseq's single lr scheduler).
    """
    adamw = lambda sched, wd=weight_decay: optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    start = int(freeze_transformer_steps)
    # the delayed group's inner count is 0 at global update `start`: shift its schedule onto the global clock
    shifted = lambda count: schedule(count + start)
    transforms: dict[str, optax.GradientTransformation] = {
        "trainable": adamw(schedule),
        "frozen": optax.set_to_zero(),
        "delayed": delayed(adamw(shifted), start),
    }
    labels = param_labels(params, freeze_feature_encoder, freeze_transformer_steps, freeze_base_model)
    if weight_decay_exempt:
        transforms["trainable_no_decay"] = adamw(schedule, 0.0)
        transforms["delayed_no_decay"] = delayed(adamw(shifted, 0.0), start)
        labels = jax.tree_util.tree_map_with_path(
            lambda path, label, v: label + "_no_decay" if label != "frozen" and not decays(path, v) else label,
            labels,
            params,
        )
    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm and clip_norm > 0 else []
    return optax.chain(*chain, optax.multi_transform(transforms, labels))


def create_state(params: PyTree, tx: optax.GradientTransformation, extra: PyTree, rng: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), extra=extra, rng=rng)


def count_params(params: PyTree, predicate: Callable[[tuple[str, ...]], bool] | None = None) -> int:
    flat = traverse_util.flatten_dict(params)
    return int(sum(v.size for k, v in flat.items() if predicate is None or predicate(k)))
