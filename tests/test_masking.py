"""flax_d2v.masking: the two span-counting rules against the code they follow.

- transformers' rule: `_compute_mask_indices` itself (transformers is an optional extra; the
  statistical test skips without it) and its `compute_num_masked_span`, transcribed below;
- fairseq's rule: `compute_mask_indices` as data2vec calls it (static spans, no_overlap False,
  idc_select_ver 1, num_mask_ver 2), `fairseq_mask_counts` in test_pretrain (NumPy, from fairseq's code).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pretrain import fairseq_mask_counts

from flax_d2v.masking import (
    FAIRSEQ,
    TRANSFORMERS,
    compute_mask_indices,
    max_spans,
    row_span_mask,
    span_count,
)

# Means of masked-frame counts over independent draws, ours against the reference's: 5 standard
# errors of the difference (a false alarm about once in 3.5 million runs per comparison).
SIGMAS = 5.0
# `u` values with a non-zero fourth decimal: mask_prob * L / mask_length below is a multiple of 0.001,
# so the rounded sums are never within 1e-4 of an integer (float32 against float64 cannot disagree).
US = (0.0137, 0.3771, 0.9113)


def transformers_num_spans(input_length, sequence_length, mask_prob, mask_length, min_masks, epsilon):
    """transformers' `compute_num_masked_span` (inside `_compute_mask_indices`), verbatim."""
    num_masked_span = int(mask_prob * input_length / mask_length + epsilon)
    num_masked_span = max(num_masked_span, min_masks)
    if num_masked_span * mask_length > sequence_length:
        num_masked_span = sequence_length // mask_length
    if input_length - (mask_length - 1) < num_masked_span:
        num_masked_span = max(input_length - (mask_length - 1), 0)
    return num_masked_span


def fairseq_num_spans(sz, mask_prob, mask_length, min_masks, u):
    """fairseq's `compute_mask_indices` (static lengths): (num_mask, size of the start range)."""
    num_mask = max(min_masks, int(mask_prob * sz / float(mask_length) + u))
    min_len = mask_length
    if sz - min_len <= num_mask:
        min_len = sz - num_mask - 1
    return num_mask, sz - min_len


@pytest.mark.parametrize("mask_prob", [0.05, 0.33, 0.65])
@pytest.mark.parametrize("min_masks", [0, 1, 2])
def test_span_count_follows_both_rules(mask_prob, min_masks):
    """Exact: the number of spans and of allowed starts of every row length, for each rule."""
    sequence_length, mask_length = 60, 10
    lengths = jnp.arange(sequence_length + 1)
    for u in US:
        num, starts = span_count(
            TRANSFORMERS, lengths, jnp.float32(u), sequence_length, mask_prob, mask_length, min_masks
        )
        for n in range(sequence_length + 1):
            assert int(num[n]) == transformers_num_spans(n, sequence_length, mask_prob, mask_length, min_masks, u)
            # transformers draws starts from np.arange(input_length - (mask_length - 1))
            assert int(starts[n]) == n - (mask_length - 1)
        num, starts = span_count(FAIRSEQ, lengths, jnp.float32(u), sequence_length, mask_prob, mask_length, min_masks)
        for n in range(1, sequence_length + 1):
            assert (int(num[n]), int(starts[n])) == fairseq_num_spans(n, mask_prob, mask_length, min_masks, u)
    with pytest.raises(ValueError, match="span-counting rule"):
        span_count("torch", lengths, jnp.float32(0.5), sequence_length, mask_prob, mask_length, min_masks)


def _row_counts(rule, key, lengths, sequence_length, mask_prob, mask_length, min_masks, trials):
    """(trials, rows) masks of `row_span_mask` under `rule`, one `u` per row."""
    bound = max_spans(rule, sequence_length, mask_prob, mask_length, min_masks)

    def row(k, n):
        ku, ks = jax.random.split(k)
        u = jax.random.uniform(ku, ())
        return row_span_mask(rule, ks, n, u, sequence_length, mask_prob, mask_length, min_masks, bound)

    keys = jax.random.split(key, trials * len(lengths)).reshape(trials, len(lengths), -1)
    lengths = jnp.asarray(lengths, jnp.int32)
    return np.asarray(jax.jit(jax.vmap(jax.vmap(row, (0, 0)), (0, None)))(keys, lengths))


def test_transformers_rule_matches_transformers_compute_mask_indices():
    """`compute_mask_indices` against transformers' own `_compute_mask_indices`: the distribution of
    masked real frames per row length (means within SIGMAS standard errors), padding never masked,
    and a span may end on a row's last frame (starts up to L - mask_length)."""
    pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.models.data2vec.modeling_data2vec_audio")
    import torch

    sequence_length, mask_prob, mask_length, min_masks, trials = 120, 0.3, 10, 2, 1500
    lengths = np.array([120, 95, 40, 14])
    attention_mask = torch.from_numpy((np.arange(sequence_length)[None, :] < lengths[:, None]).astype(np.int64))
    np.random.seed(0)
    ref = np.stack(
        [
            hf._compute_mask_indices((len(lengths), sequence_length), mask_prob, mask_length, attention_mask, min_masks)
            for _ in range(trials)
        ]
    )
    keys = jax.random.split(jax.random.PRNGKey(0), trials)
    fn = jax.jit(
        lambda k: compute_mask_indices(
            k, (len(lengths), sequence_length), mask_prob, mask_length, min_masks, jnp.asarray(lengths)
        )
    )
    ours = np.stack([np.asarray(fn(k)) for k in keys])
    real = np.arange(sequence_length)[None, None, :] < lengths[None, :, None]
    assert not (ours & ~real).any()
    for r, n in enumerate(lengths):
        a, b = ours[:, r, :n].sum(-1), ref[:, r, :n].sum(-1)
        tol = SIGMAS * np.sqrt(a.var() / trials + b.var() / trials) + 1e-9
        assert abs(a.mean() - b.mean()) <= tol, (n, a.mean(), b.mean())
        assert ours[:, r, n - 1].any() and ref[:, r, n - 1].any()  # the last real frame can be covered


def test_fairseq_rule_matches_fairseq_counts_on_short_rows():
    """`row_span_mask(FAIRSEQ)` against fairseq's counts where its short-row branch (`min_len =
    sz - num_mask - 1`) decides the start range (rows of 11 to 25 frames, spans of 10), and where
    it does not (120): means within SIGMAS standard errors; the last frame is masked only by the
    short-row branch (its starts then reach `num_mask`)."""
    sequence_length, mask_prob, mask_length, min_masks, trials = 120, 0.65, 10, 2, 2000
    lengths = [11, 14, 19, 25, 120]
    ours = _row_counts(
        FAIRSEQ, jax.random.PRNGKey(1), lengths, sequence_length, mask_prob, mask_length, min_masks, trials
    )
    rng = np.random.default_rng(1)
    for r, n in enumerate(lengths):
        assert not ours[:, r, n:].any()
        a = ours[:, r].sum(-1)
        b = np.array([fairseq_mask_counts(rng, n, mask_prob, mask_length, min_masks) for _ in range(trials)])
        tol = SIGMAS * np.sqrt(a.var() / trials + b.var() / trials) + 1e-9
        assert abs(a.mean() - b.mean()) <= tol, (n, a.mean(), b.mean())
    assert not ours[:, -1, 119].any()  # a long row: starts in [0, L - mask_length), the last frame never covered
    assert ours[:, 0, 10].any()  # 11 frames, 2 spans: starts in [0, 3), so spans reach the last frame


def test_rules_differ_where_fairseq_and_transformers_do():
    """Same keys, same u: fairseq's rule never covers a long row's last frame and has no upper bound
    on the count; transformers' can cover it and caps the count at what fits."""
    sequence_length, mask_length = 30, 10
    n = jnp.int32(30)
    # min_masks 5 asks for more spans than fit (30 // 10 = 3): transformers caps, fairseq keeps 5
    assert int(span_count(TRANSFORMERS, n, jnp.float32(0.5), sequence_length, 0.1, mask_length, 5)[0]) == 3
    assert int(span_count(FAIRSEQ, n, jnp.float32(0.5), sequence_length, 0.1, mask_length, 5)[0]) == 5
    t = _row_counts(TRANSFORMERS, jax.random.PRNGKey(2), [30], sequence_length, 0.3, mask_length, 1, 400)
    f = _row_counts(FAIRSEQ, jax.random.PRNGKey(2), [30], sequence_length, 0.3, mask_length, 1, 400)
    assert t[:, 0, 29].any() and not f[:, 0, 29].any()
