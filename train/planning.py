"""Epoch planning: which clips a run keeps, the padded lengths (buckets), and each epoch's batches.

    from flax_d2v.train.planning import bucket_edges, bucket_ladder, plan_epoch, select_examples
    positions, dropped = select_examples(manifest, min_seconds=1, max_seconds=20, require_text=True)
    edges = bucket_edges(kept_lengths, count=4)                   # padded lengths in samples (default)
    ladder = bucket_ladder(shortest, longest, growth=1.25)        # or a geometric ladder
    batches = plan_epoch(bucket_of_each_kept_clip, batch_size, seed, epoch)   # [(bucket, rows), ...]

Shapes: a batch is padded to one of a few lengths (buckets, multiples of 0.1 s), so XLA compiles
one program per bucket. By default there are at most `DEFAULT_NUM_BUCKETS`, placed where they pad
the kept clips least (`bucket_edges`): compiling the base train step takes 15-25 s on an
H100, so a geometric ladder's ~15 rungs over LibriSpeech's 1-35 s cost minutes of compiling for a
few percent less padding. A geometric ladder (`bucket_ladder`) is there when asked for.

Each epoch, examples are shuffled by (seed, epoch); with `drop_remainder` the last N mod B of that
order sit the epoch out (different ones each epoch); the rest are grouped by bucket and cut into
batches (a bucket's leftovers move up into the next bucket, so at most one partial batch, the last,
exists), and the batch order is shuffled. The plan depends only on the manifest and the arguments,
never on the process or on how far a previous run got, which is what makes `BatchLoader.restore`
exact.
"""

from __future__ import annotations

import math

import numpy as np

from flax_d2v.audio import SAMPLE_RATE
from flax_d2v.errors import D2VError
from flax_d2v.train.manifests import Manifest
from flax_d2v.train.vocab import normalize_transcript

DEFAULT_NUM_BUCKETS = 4  # programs a run compiles for its train step (issue 12: at most 4 by default)
MIN_SAMPLES = 400  # receptive field of data2vec-audio's conv encoder: a shorter clip yields no frame.
BUCKET_MULTIPLE = 1600  # 0.1 s at 16 kHz, a multiple of the encoder's total stride (320).


def select_examples(
    manifest: Manifest, min_seconds: float | None = None, max_seconds: float | None = None, require_text: bool = False
) -> tuple[np.ndarray, dict[str, int]]:
    """Manifest positions kept by the duration filters, and how many each filter dropped.

    Clips shorter than `MIN_SAMPLES` are always dropped (as `too_short`): the encoder gives them
    no frame. With `require_text`, clips with an empty transcript are dropped as `no_text`.
    """
    n = manifest.lengths()
    lo = max(MIN_SAMPLES, 0 if min_seconds is None else math.ceil(min_seconds * SAMPLE_RATE))
    too_short = n < lo
    too_long = n > max_seconds * SAMPLE_RATE if max_seconds is not None else np.zeros(len(n), bool)
    no_text = np.zeros(len(n), bool)
    if require_text:
        if manifest.texts is None:
            raise D2VError(f"{manifest.source}: no transcripts; fine-tuning needs them")
        no_text = np.array([not normalize_transcript(t or "") for t in manifest.texts], bool)
    keep = ~(too_short | too_long | no_text)
    dropped = {
        "too_short": int(too_short.sum()),
        "too_long": int((too_long & ~too_short).sum()),
        "no_text": int((no_text & ~too_short & ~too_long).sum()),
    }
    return np.flatnonzero(keep).astype(np.int64), dropped


def bucket_ladder(
    min_samples: int, max_samples: int, growth: float = 1.25, multiple: int = BUCKET_MULTIPLE
) -> np.ndarray:
    """Padded lengths from `min_samples` up to at least `max_samples`, each ~`growth` times the last.

    At most a fraction (growth-1)/growth of a batch is padding; ~log(max/min)/log(growth) shapes.
    """
    if growth <= 1.0:
        raise D2VError(f"bucket_growth: must be > 1, got {growth}")
    up = lambda x: int(math.ceil(x / multiple) * multiple)
    ladder = [up(max(min_samples, 1))]
    while ladder[-1] < max_samples:
        ladder.append(max(up(ladder[-1] * growth), ladder[-1] + multiple))
    return np.asarray(ladder, np.int64)


def bucket_edges(lengths: np.ndarray, count: int = DEFAULT_NUM_BUCKETS, multiple: int = BUCKET_MULTIPLE) -> np.ndarray:
    """At most `count` padded lengths (multiples of `multiple`) that pad the given clips least.

    The last edge covers the longest clip; the others are chosen by dynamic programming over the
    clips' lengths rounded up to `multiple` (a few hundred candidates), minimising the total padding
    when each clip goes to the smallest edge that holds it. Quantile cuts were tried first: their top
    bucket runs from the 75th percentile to the longest clip and padded LibriSpeech-like lengths by
    30%; the optimal cuts sit in the long tail instead.
    """
    if count < 1:
        raise D2VError(f"num_buckets: must be >= 1, got {count}")
    rounded = -(-np.maximum(np.asarray(lengths, np.int64), 1) // multiple) * multiple
    cand, inverse = np.unique(rounded, return_inverse=True)
    n = len(cand)
    clips = np.bincount(inverse, minlength=n).astype(np.float64)
    total = np.bincount(inverse, weights=np.asarray(lengths, np.float64), minlength=n)
    cum_n = np.concatenate([[0.0], np.cumsum(clips)])
    cum_s = np.concatenate([[0.0], np.cumsum(total)])

    def pad(i: np.ndarray | int, j: np.ndarray | int) -> np.ndarray:
        """Padding of candidates i..j (inclusive, either one an array) all padded to cand[j]."""
        return (cum_n[j + 1] - cum_n[i]) * cand[j] - (cum_s[j + 1] - cum_s[i])

    k = min(count, n)
    # best[b, j]: least padding of candidates 0..j with b+1 buckets, the last edge at cand[j]
    best = np.full((k, n), np.inf)
    back = np.zeros((k, n), np.int64)
    best[0] = pad(0, np.arange(n))
    for b in range(1, k):
        for j in range(b, n):
            i = np.arange(b - 1, j)  # the previous edge at cand[i]
            costs = best[b - 1, i] + pad(i + 1, j)
            back[b, j] = i[np.argmin(costs)]
            best[b, j] = costs.min()
    b = int(np.argmin(best[:, n - 1]))
    edges, j = [n - 1], n - 1
    while b > 0:
        j = int(back[b, j])
        edges.append(j)
        b -= 1
    return cand[sorted(edges)].astype(np.int64)


def plan_epoch(
    buckets: np.ndarray, batch_size: int, seed: int, epoch: int, shuffle: bool = True, drop_remainder: bool = True
) -> list[tuple[int, np.ndarray]]:
    """The epoch's batches as (bucket, rows) where rows indexes `buckets` (the kept examples).

    `buckets[j]` is kept example j's bucket. With `drop_remainder`, len % batch_size examples
    (random ones when shuffling) sit the epoch out; otherwise the last batch is topped up with
    filler rows (-1). A pure function of its arguments, so every process and every restart
    computes the same plan.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(buckets)) if shuffle else np.arange(len(buckets))
    if drop_remainder and len(order) % batch_size:
        # Drop the remainder up front, at random when shuffling: dropping the last bucket's leftovers
        # instead would leave out the same longest clips every epoch.
        order = order[: len(order) - len(order) % batch_size]
    order = order[np.argsort(buckets[order], kind="stable")]
    batches: list[tuple[int, np.ndarray]] = []
    carry = np.zeros(0, np.int64)
    for b in np.unique(buckets):
        items = np.concatenate([carry, order[buckets[order] == b]])
        full = len(items) // batch_size * batch_size
        batches += [(int(b), items[s : s + batch_size]) for s in range(0, full, batch_size)]
        carry = items[full:]
    if carry.size and not drop_remainder:
        rows = np.full(batch_size, -1, np.int64)
        rows[: carry.size] = carry
        batches.append((int(buckets[carry].max()), rows))
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches
