"""The one interface between the training loop and what is being trained.

`flax_d2v.train.loop` runs any `Objective`: CTC fine-tuning (`flax_d2v.train.ctc.CTCObjective`)
and data2vec pretraining (`flax_d2v.train.data2vec_objective`) are two objectives on one loop, so
checkpoints, sharding, gradient accumulation, logging and resume are written once.

The contract, and why it looks like this:

- `loss` is a pure, jittable function of `(params, extra, batch, rng, step)`. It returns the
  *sum* of the per-item losses over the examples it was given and the *weight* that sum is to
  be divided by (number of target tokens, masked frames, examples, ...), as fairseq's
  criterions return `(loss, sample_size)`. The loop divides the sum over all micro-batches and
  devices by the sum of the weights. That is what makes one update identical whether the
  batch ran as one `jit` over a mesh, as micro-batches (gradient accumulation) or under
  `pmap` with a `psum` over devices: a per-shard mean of means would not be.
- `metrics` are diagnostics (scalars). The loop averages them over micro-batches and devices
  (arithmetic mean), so return quantities for which that is meaningful (variances, rates).
- Randomness comes only from `rng`, the key of this step (`fold_in(seed_key, step)`, the same
  for every micro-batch and device of the update), and each example's global index
  (`batch["index"]`): derive per-example keys with `example_keys(rng, index)` so masks do not
  depend on how the batch is split. Run the model's stochastic forward through
  `apply_per_example`: each example's dropout bits come from its own key, LayerDrop's decision
  from one key of the step, so a loss is the same on one device, any mesh, under `pmap` and
  with gradient accumulation.
- `extra` is objective state that is not optimised by gradient (data2vec's EMA teacher; `{}`
  for CTC). It lives in `TrainState`, is checkpointed with it and sharded by
  `extra_logical_axes`; `update_extra` runs after every optimizer update, inside the jitted step.
- Batches come from the loop's other interface, a `flax_d2v.train.source.DataSource`. An objective
  whose loss reads per-example targets from the batch (CTC's `batch["labels"]`) says how to make
  them: its `label_encoder` (a `source.LabelEncoder`) is what the loader is given
  (`BatchLoader(labels=objective.label_encoder)`), so the loader knows nothing of CTC.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax

from flax_d2v.types import Batch, PyTree


@runtime_checkable
class Objective(Protocol):
    """What the loop trains. See the module docstring for the contract."""

    name: str  # "ctc" | "data2vec": recorded in checkpoints and metrics.jsonl

    def init_extra(self, params: PyTree) -> PyTree:
        """Initial non-gradient state from the initial params (EMA teacher = copy; `{}` for CTC)."""
        ...

    def loss(
        self, params: PyTree, extra: PyTree, batch: Batch, rng: jax.Array, step: jax.Array
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """`(loss_sum, weight, metrics)` on `batch`; pure and jittable; gradients flow into `params` only."""
        ...

    def update_extra(self, extra: PyTree, new_params: PyTree, step: jax.Array) -> PyTree:
        """`extra` after the update that produced `new_params` (EMA update; identity for CTC).

        `step` is the 0-based index of that update (`state.step` before it), the same value
        `loss` saw; the count of updates done is `step + 1`.
        """
        ...

    def extra_logical_axes(self, params_axes: PyTree) -> PyTree:
        """Logical axis names (a tree of `PartitionSpec` like `params_axes`) for `init_extra`'s tree."""
        ...


class NoExtra:
    """Mixin for objectives without extra state (CTC)."""

    def init_extra(self, params: PyTree) -> PyTree:
        return {}

    def update_extra(self, extra: PyTree, new_params: PyTree, step: jax.Array) -> PyTree:
        return extra

    def extra_logical_axes(self, params_axes: PyTree) -> PyTree:
        return {}


def example_keys(rng: jax.Array, index: jax.Array) -> jax.Array:
    """One key per example, a function of the step key and the example's global index only."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(index.astype(jax.numpy.uint32))


def train_forward(
    module: Any,
    params: PyTree,
    batch: Batch,
    rng: jax.Array,
    mask_time_indices: jax.Array | None,
    mask_feature_indices: jax.Array | None,
) -> Any:
    """The model's training-mode output for a batch (the fine-tuning objectives' forward), with
    dropout drawn per example through `apply_per_example`, so the same bits on any layout."""

    def forward(rngs, values, mask, time, feature):
        return module.apply(
            {"params": params},
            values,
            mask,
            deterministic=False,
            rngs=rngs,
            mask_time_indices=time,
            mask_feature_indices=feature,
        )

    return apply_per_example(
        forward,
        jax.random.fold_in(rng, 0),
        batch["index"],
        batch["input_values"],
        batch["attention_mask"],
        mask_time_indices,
        mask_feature_indices,
    )


def batch_key(rng: jax.Array, batch: Batch) -> jax.Array:
    """One key for randomness drawn over a whole (micro-/per-device) batch.

    `fold_in(rng, index of the batch's first row)`: one key per step under one `jit` over the global
    batch, whatever the mesh; `pmap` devices and micro-batches each get their own. Dropout of the
    1.0 objectives goes through `apply_per_example` instead (layout-independent bits); data2vec
    2.0's pretraining still draws its dropout and mask noise from this key (its `--pmap` losses
    are therefore close to, not equal to, the jit layouts').
    """
    return jax.random.fold_in(rng, batch["index"][0].astype(jax.numpy.uint32))


def apply_per_example(fn: Callable[..., Any], rng: jax.Array, index: jax.Array, *rows: Any) -> Any:
    """`fn(rngs, *rows)` with dropout drawn per example: vmapped over the batch axis of `rows`.

    Every row runs as a batch of one with `rngs={"dropout": fold_in(fold_in(rng, 0), index[i]),
    "layerdrop": fold_in(rng, 1)}`, so its dropout bits are a function of (seed, step, example
    index) only, never of the device or micro-batch it landed on (flax's `nn.Dropout` draws bits
    for the whole array it is given, so one key over a device's share of the batch would differ
    between layouts); LayerDrop skips a layer for the whole update, as fairseq and transformers
    do. `rows` are arrays with a leading batch axis or None; outputs get the batch axis back.
    Under a mesh the activations' batch sharding is kept (the vmapped axis takes the mesh axes of
    `activation_batch`).
    """
    import flax.linen as nn

    keys = example_keys(jax.random.fold_in(rng, 0), index)
    layerdrop = jax.random.fold_in(rng, 1)

    def one(key, *row):
        out = fn({"dropout": key, "layerdrop": layerdrop}, *(None if r is None else r[None] for r in row))
        return jax.tree.map(lambda x: x[0], out)

    rules = tuple(nn.get_logical_axis_rules())
    batch_axes = dict(rules).get("activation_batch")
    if not rules or batch_axes is None:
        return jax.vmap(one)(keys, *rows)
    inner = tuple((name, None if name == "activation_batch" else axes) for name, axes in rules)

    def one_sharded(key, *row):
        with nn.logical_axis_rules(inner):  # the row axis (size 1) is not sharded; the vmapped one is
            return one(key, *row)

    return jax.vmap(one_sharded, spmd_axis_name=batch_axes)(keys, *rows)
