"""Epoch planning: which clips a run keeps, the padded lengths (buckets), and each epoch's batches.

    from flax_d2v.train.planning import bucket_ladder, plan_epoch, select_examples
    positions, dropped = select_examples(manifest, min_seconds=1, max_seconds=20, require_text=True)
    ladder = bucket_ladder(shortest, longest, growth=1.25)        # padded lengths in samples
    batches = plan_epoch(bucket_of_each_kept_clip, batch_size, seed, epoch)   # [(bucket, rows), ...]

Shapes: a batch is padded to one rung of a geometric ladder (ratio `growth`, in multiples of
0.1 s), so XLA compiles one program per bucket. Each epoch, examples are shuffled by (seed,
epoch); with `drop_remainder` the last N mod B of that order sit the epoch out (different ones
each epoch); the rest are grouped by bucket and cut into batches (a bucket's leftovers move up
into the next bucket, so at most one partial batch, the last, exists), and the batch order is
shuffled. The plan depends only on the manifest and the arguments, never on the process or on
how far a previous run got, which is what makes `BatchLoader.restore` exact.
"""

from __future__ import annotations

import math

import numpy as np

from flax_d2v.audio import SAMPLE_RATE
from flax_d2v.errors import D2VError
from flax_d2v.train.manifests import Manifest
from flax_d2v.train.vocab import normalize_transcript

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
