"""Span masks (SpecAugment time/channel masking) as pure, jittable functions of an rng.

transformers computes these masks with NumPy's global random state on the host; here they are a
function of a `jax.random` key, so a training step stays a pure function of `(state, batch, rng)`
and the same key gives the same mask on any device layout. `per_example_mask_indices` draws each
row from its own key (e.g. `fold_in(step_key, global_example_index)`), which is what makes masks
independent of how a batch is split over devices.

Semantics follow transformers' `_compute_mask_indices`: the number of spans of a row of length L
is ``int(mask_prob * L / mask_length + u)`` with one ``u ~ U[0, 1)`` per call, at least
``min_masks``, at most what fits; span starts are drawn without replacement from
``[0, L - mask_length]``; spans may overlap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _num_spans(
    length: jax.Array, mask_prob: float, mask_length: int, min_masks: int, u: jax.Array, sequence_length: int
) -> jax.Array:
    n = jnp.floor(mask_prob * length / mask_length + u).astype(jnp.int32)
    n = jnp.maximum(n, min_masks)
    n = jnp.minimum(n, sequence_length // mask_length)
    n = jnp.minimum(n, jnp.maximum(length - (mask_length - 1), 0))
    return n


def _max_spans(sequence_length: int, mask_prob: float, mask_length: int, min_masks: int) -> int:
    """Static upper bound on the number of spans (u < 1, so the floor adds at most 1)."""
    n = max(int(mask_prob * sequence_length / mask_length + 1.0), min_masks)
    n = min(n, sequence_length // mask_length, max(sequence_length - (mask_length - 1), 0))
    return n


def _row_mask(
    key: jax.Array,
    length: jax.Array,
    u: jax.Array,
    sequence_length: int,
    mask_prob: float,
    mask_length: int,
    min_masks: int,
    max_spans: int,
) -> jax.Array:
    num = _num_spans(length, mask_prob, mask_length, min_masks, u, sequence_length)
    positions = jnp.arange(sequence_length)
    # Sampling starts without replacement = taking the top-`num` of i.i.d. uniform scores over
    # the valid start positions.
    scores = jax.random.uniform(key, (sequence_length,))
    scores = jnp.where(positions <= length - mask_length, scores, -1.0)
    _, starts = jax.lax.top_k(scores, max_spans)
    used = jnp.arange(max_spans) < num
    covered = (positions[None, :] >= starts[:, None]) & (positions[None, :] < starts[:, None] + mask_length)
    return jnp.any(covered & used[:, None], axis=0)


def compute_mask_indices(
    rng: jax.Array,
    shape: tuple[int, int],
    mask_prob: float,
    mask_length: int,
    min_masks: int = 0,
    lengths: jax.Array | None = None,
) -> jax.Array:
    """Boolean (batch, sequence_length) span mask; `lengths` excludes right padding from masking."""
    batch, sequence_length = shape
    if mask_length < 1:
        raise ValueError("mask_length has to be at least 1")
    if mask_prob <= 0.0 and min_masks <= 0:
        return jnp.zeros(shape, bool)
    if mask_length > sequence_length:
        raise ValueError(f"mask_length {mask_length} is longer than the sequence ({sequence_length} frames)")
    max_spans = _max_spans(sequence_length, mask_prob, mask_length, min_masks)
    if max_spans == 0:
        return jnp.zeros(shape, bool)
    if lengths is None:
        lengths = jnp.full((batch,), sequence_length, jnp.int32)
    u_key, row_key = jax.random.split(rng)
    u = jax.random.uniform(u_key, ())
    keys = jax.random.split(row_key, batch)
    fn = lambda k, n: _row_mask(k, n, u, sequence_length, mask_prob, mask_length, min_masks, max_spans)  # noqa: E731
    return jax.vmap(fn)(keys, lengths.astype(jnp.int32))


def per_example_mask_indices(
    keys: jax.Array,
    sequence_length: int,
    mask_prob: float,
    mask_length: int,
    min_masks: int = 0,
    lengths: jax.Array | None = None,
) -> jax.Array:
    """Like `compute_mask_indices` but row i is a function of `keys[i]` alone (device-independent)."""
    batch = keys.shape[0]
    if lengths is None:
        lengths = jnp.full((batch,), sequence_length, jnp.int32)

    def one(key, length):
        return compute_mask_indices(key, (1, sequence_length), mask_prob, mask_length, min_masks, length[None])[0]

    return jax.vmap(one)(keys, lengths)
