"""The one interface between the training loop and what is being trained.

`flax_d2v.train.loop` runs any `Objective`: CTC fine-tuning (`flax_d2v.train.ctc.CTCObjective`)
and data2vec pretraining (`flax_d2v.train.pretrain`) are two objectives on one loop, so
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
  depend on how the batch is split; for randomness drawn over the whole batch (flax dropout,
  LayerDrop) use `batch_key(rng, batch)`.
- `extra` is objective state that is not optimised by gradient (data2vec's EMA teacher; `{}`
  for CTC). It lives in `TrainState`, is checkpointed with it and sharded by
  `extra_logical_axes`; `update_extra` runs after every optimizer update, inside the jitted step.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

PyTree = Any
Batch = dict[str, jax.Array]


@runtime_checkable
class Objective(Protocol):
    """What the loop trains. See the module docstring for the contract."""

    name: str  # "ctc" | "data2vec": recorded in checkpoints and metrics.jsonl

    def init_extra(self, params: PyTree) -> PyTree:
        """Initial non-gradient state from the initial params (EMA teacher = copy; `{}` for CTC)."""
        ...

    def loss(self, params: PyTree, extra: PyTree, batch: Batch, rng: jax.Array,
             step: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
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


def batch_key(rng: jax.Array, batch: Batch) -> jax.Array:
    """A key for randomness drawn over a whole (micro-/per-device) batch, such as flax dropout and LayerDrop.

    `fold_in(rng, index of the batch's first row)`: under one `jit` over the global batch it is one
    key for the step, whatever the mesh; micro-batches (gradient accumulation) and `pmap` devices
    each get their own key, so their dropout patterns are not copies of one another, while the
    per-example keys (`example_keys`, for masks) stay the same in every layout.
    """
    return jax.random.fold_in(rng, batch["index"][0].astype(jax.numpy.uint32))
