"""Span masks (SpecAugment, data2vec's time masks, data2vec 2.0's block masks) as pure, jittable
functions of an rng.

transformers and fairseq compute these masks with NumPy's global random state on the host; here they
are a function of a `jax.random` key, so a training step stays a pure function of `(state, batch, rng)`
and the same key gives the same mask on any device layout. `per_example_mask_indices` and
`data2vec_mask_indices` draw each row from its own key (e.g. `fold_in(step_key, global_example_index)`),
which is what makes masks independent of how a batch is split over devices.

Both span-counting rules in use share one row routine (`row_span_mask`); they differ only in how many
spans a row of length L gets and where a span may start (`span_count`):

- `TRANSFORMERS` (transformers' `_compute_mask_indices`, fine-tuning's SpecAugment): ``int(mask_prob *
  L / mask_length + u)`` spans with one ``u ~ U[0, 1)`` per call, at least ``min_masks``, at most what
  fits (``sequence_length // mask_length`` and ``L - mask_length + 1``); starts in ``[0, L - mask_length]``.
- `FAIRSEQ` (fairseq's `compute_mask_indices` as data2vec pretraining calls it: static spans, no
  overlap prevention, `idc_select_ver=1`, `num_mask_ver=2`): the same count with one ``u`` per row
  and no upper bound; starts in ``[0, L - mask_length)`` (the last frame is never a start's cover), or
  in ``[0, num]`` when the row is too short; spans clipped to the row.

Either way span starts are drawn without replacement and spans may overlap.

`spec_augment` applies the SpecAugment masks as both encoders (1.0 and 2.0) do, drawing the missing ones.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

TRANSFORMERS = "transformers"
FAIRSEQ = "fairseq"
RULES = (TRANSFORMERS, FAIRSEQ)


def span_count(
    rule: str,
    length: jax.Array,
    u: jax.Array,
    sequence_length: int,
    mask_prob: float,
    mask_length: int,
    min_masks: int,
) -> tuple[jax.Array, jax.Array]:
    """(number of spans, number of allowed start positions) of a row of `length` frames under `rule`.

    The starts allowed are ``[0, num_starts)``; `u` is the U[0, 1) draw that rounds the expected count.
    """
    num = jnp.floor(mask_prob * length / mask_length + u).astype(jnp.int32)
    num = jnp.maximum(num, min_masks)
    if rule == TRANSFORMERS:
        num = jnp.minimum(num, sequence_length // mask_length)
        num = jnp.minimum(num, jnp.maximum(length - (mask_length - 1), 0))
        return num, length - mask_length + 1
    if rule == FAIRSEQ:
        min_len = jnp.where(length - mask_length <= num, length - num - 1, mask_length)
        return num, length - min_len
    raise ValueError(f"unknown span-counting rule {rule!r}; choose one of {RULES}")


def max_spans(rule: str, sequence_length: int, mask_prob: float, mask_length: int, min_masks: int) -> int:
    """Static upper bound on a row's number of spans under `rule` (u < 1, so the floor adds at most 1)."""
    n = max(int(mask_prob * sequence_length / mask_length + 1.0), min_masks)
    if rule == TRANSFORMERS:
        return min(n, sequence_length // mask_length, max(sequence_length - (mask_length - 1), 0))
    return max(1, min(n, sequence_length))


def cover(starts: jax.Array, used: jax.Array, mask_length: int, sequence_length: int) -> jax.Array:
    """(sequence_length,) bool: the frames covered by the `used` spans of `mask_length` frames at
    `starts` (any integers), clipped to [0, sequence_length)."""
    positions = jnp.arange(sequence_length)
    covered = (positions[None, :] >= starts[:, None]) & (positions[None, :] < starts[:, None] + mask_length)
    return jnp.any(covered & used[:, None], axis=0)


def row_span_mask(
    rule: str,
    key: jax.Array,
    length: jax.Array,
    u: jax.Array,
    sequence_length: int,
    mask_prob: float,
    mask_length: int,
    min_masks: int,
    num_spans_bound: int,
) -> jax.Array:
    """One row's (sequence_length,) span mask under `rule` (see the module docstring); frames at or
    past `length` (right padding) are never masked. `key` draws the starts, `u` rounds the count;
    `num_spans_bound` is `max_spans(...)`, the static number of starts drawn."""
    num, num_starts = span_count(rule, length, u, sequence_length, mask_prob, mask_length, min_masks)
    positions = jnp.arange(sequence_length)
    # Sampling starts without replacement = taking the top-`num` of i.i.d. uniform scores over the
    # allowed start positions.
    scores = jnp.where(positions < num_starts, jax.random.uniform(key, (sequence_length,)), -1.0)
    _, starts = jax.lax.top_k(scores, num_spans_bound)
    used = jnp.arange(num_spans_bound) < num
    return cover(starts, used, mask_length, sequence_length) & (positions < length)


def compute_mask_indices(
    rng: jax.Array,
    shape: tuple[int, int],
    mask_prob: float,
    mask_length: int,
    min_masks: int = 0,
    lengths: jax.Array | None = None,
) -> jax.Array:
    """transformers' `_compute_mask_indices`: boolean (batch, sequence_length) span mask, one `u` for
    the batch; `lengths` excludes right padding from masking."""
    batch, sequence_length = shape
    if mask_length < 1:
        raise ValueError("mask_length has to be at least 1")
    if mask_prob <= 0.0 and min_masks <= 0:
        return jnp.zeros(shape, bool)
    if mask_length > sequence_length:
        raise ValueError(f"mask_length {mask_length} is longer than the sequence ({sequence_length} frames)")
    bound = max_spans(TRANSFORMERS, sequence_length, mask_prob, mask_length, min_masks)
    if bound == 0:
        return jnp.zeros(shape, bool)
    if lengths is None:
        lengths = jnp.full((batch,), sequence_length, jnp.int32)
    u_key, row_key = jax.random.split(rng)
    u = jax.random.uniform(u_key, ())
    keys = jax.random.split(row_key, batch)

    def row(k: jax.Array, n: jax.Array) -> jax.Array:
        return row_span_mask(TRANSFORMERS, k, n, u, sequence_length, mask_prob, mask_length, min_masks, bound)

    return jax.vmap(row)(keys, lengths.astype(jnp.int32))


def spec_augment(
    module: nn.Module,
    hidden_states: jax.Array,
    frame_mask: jax.Array | None,
    mask_time_indices: jax.Array | None,
    mask_feature_indices: jax.Array | None,
    deterministic: bool,
    fill_time: Callable[[jax.Array, jax.Array], jax.Array],
) -> tuple[jax.Array, jax.Array | None]:
    """SpecAugment as both encoders' `mask_hidden_states` apply it (`module`, the encoder, gives the
    config and the keys): (masked states, the time mask used).

    Masks passed in are applied; when training (`deterministic=False`) the missing ones are drawn with
    transformers' counting rule when their probability is > 0, the time mask over the real frames of
    `frame_mask`. What a time-masked frame becomes is the encoder's (`fill_time(states, mask)`: 1.0's
    learned `masked_spec_embed`, 2.0's noise); masked channels are 0. The keys are the module's
    `make_rng("dropout")`, drawn in this order: time mask, whatever `fill_time` draws, channel mask.
    """
    c = module.config
    h = hidden_states
    b, t, d = h.shape
    if mask_time_indices is None and not deterministic and c.mask_time_prob > 0:
        lengths = None if frame_mask is None else frame_mask.sum(-1)
        mask_time_indices = compute_mask_indices(
            module.make_rng("dropout"), (b, t), c.mask_time_prob, c.mask_time_length, c.mask_time_min_masks, lengths
        )
    if mask_time_indices is not None:
        h = fill_time(h, mask_time_indices)
    if mask_feature_indices is None and not deterministic and c.mask_feature_prob > 0:
        mask_feature_indices = compute_mask_indices(
            module.make_rng("dropout"), (b, d), c.mask_feature_prob, c.mask_feature_length, c.mask_feature_min_masks
        )
    if mask_feature_indices is not None:
        h = jnp.where(mask_feature_indices[:, None, :], 0.0, h)
    return h, mask_time_indices


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

    def one(key: jax.Array, length: jax.Array) -> jax.Array:
        return compute_mask_indices(key, (1, sequence_length), mask_prob, mask_length, min_masks, length[None])[0]

    return jax.vmap(one)(keys, lengths)


def data2vec_mask_indices(
    keys: jax.Array,
    lengths: jax.Array,
    sequence_length: int,
    mask_prob: float,
    mask_length: int,
    min_masks: int = 1,
    require_same_masks: bool = True,
    axis_name: str | None = None,
) -> jax.Array:
    """fairseq's `compute_mask_indices` as data2vec pretraining calls it: (B, T) bool span masks, row i
    a function of `keys[i]` and `lengths[i]` (and, with `require_same_masks`, of the smallest count in
    the batch, which every row is trimmed to by dropping masked frames uniformly at random, as fairseq
    does). Rows of length 0 (all padding) get no mask and do not count for the minimum. Jittable;
    `axis_name` takes the minimum over a `pmap` axis too.
    """
    bound = max_spans(FAIRSEQ, sequence_length, mask_prob, mask_length, min_masks)
    lengths = lengths.astype(jnp.int32)
    pairs = jax.vmap(jax.random.split)(keys)  # (B, 2, ...): one key for the spans, one for the trimming
    span_keys, trim_keys = pairs[:, 0], pairs[:, 1]

    def row(key: jax.Array, n: jax.Array) -> jax.Array:
        u_key, start_key = jax.random.split(key)  # fairseq draws the rounding `u` per row
        u = jax.random.uniform(u_key, ())
        return row_span_mask(FAIRSEQ, start_key, n, u, sequence_length, mask_prob, mask_length, min_masks, bound)

    masks = jax.vmap(row)(span_keys, lengths) & (lengths[:, None] > 0)
    if not require_same_masks:
        return masks
    counts = masks.sum(-1)
    big = jnp.iinfo(jnp.int32).max
    target = jnp.min(jnp.where(lengths > 0, counts, big))
    if axis_name is not None:
        target = jax.lax.pmin(target, axis_name)

    def trim(key: jax.Array, mask: jax.Array) -> jax.Array:
        scores = jnp.where(mask, jax.random.uniform(key, mask.shape), -1.0)
        rank = jnp.argsort(jnp.argsort(-scores))  # 0 for the highest score
        return mask & (rank < target)

    return jax.vmap(trim)(trim_keys, masks)


def block_mask_1d(
    key: jax.Array,
    num_frames: int,
    mask_prob: float,
    mask_length: int,
    mask_prob_adjust: float = 0.0,
    inverse_mask: bool = False,
    mask_dropout: float = 0.0,
) -> jax.Array:
    """One row of fairseq's `compute_block_mask_1d` (data2vec 2.0's pretraining masks; non_overlapping
    and expand_adjcent off, require_same_masks on): (T,) bool, True = masked.

    Spans of `mask_length` frames around centres drawn uniformly *with* replacement (the span rules
    above draw starts without), clipped to the row, then exactly ``int(T * p)`` masked frames: masked
    frames dropped, or unmasked ones added, uniformly at random. `inverse_mask` flips it (p = 1 - mask_prob).
    """
    p = 1.0 - mask_prob if inverse_mask else mask_prob
    n_centres = int(num_frames * ((p + mask_prob_adjust) / mask_length) * (1 + mask_dropout))
    target = int(num_frames * p)
    k_centres, k_adjust = jax.random.split(key)
    mask = jnp.zeros((num_frames,), bool)
    if n_centres > 0:
        centres = jax.random.randint(k_centres, (n_centres,), 0, num_frames)
        # fairseq clamps each covered index into [0, T - 1]; a span always overlaps the row, so that is `cover`'s clip
        mask = cover(centres - mask_length // 2, jnp.ones((n_centres,), bool), mask_length, num_frames)
    # exactly `target` masked: the masked frames first (random order among them), then random unmasked ones
    u = jax.random.uniform(k_adjust, (num_frames,))
    _, chosen = jax.lax.top_k(jnp.where(mask, 1.0 + u, u), target) if target > 0 else (None, jnp.zeros((0,), int))
    final = jnp.zeros((num_frames,), bool).at[chosen].set(True)
    return ~final if inverse_mask else final
