"""The loader's worker count and its default buckets.

Workers assemble several batches at once: the batches and their order must not depend on it. The
default buckets keep a run to at most four train-step programs (issue 12).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from flax_d2v.errors import D2VError
from flax_d2v.train.loader import BatchLoader
from flax_d2v.train.loop import Trainer
from flax_d2v.train.manifests import Manifest, read_manifest
from flax_d2v.train.planning import BUCKET_MULTIPLE, DEFAULT_NUM_BUCKETS, bucket_edges
from flax_d2v.train.vocab import build_vocab


@pytest.fixture(scope="module")
def manifest(speech_dir):
    return read_manifest(speech_dir / "transcripts.tsv", require_text=True)


def batches(manifest, n, state=None, **kw):
    loader = BatchLoader(manifest, batch_size=3, vocab=build_vocab(manifest.texts), seed=5, **kw)
    if state is not None:
        loader.restore(state)
    out = []
    with loader:
        for _ in range(n):
            out.append(next(loader))
        return out, loader.state()


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("num_workers,prefetch", [(3, 0), (4, 2), (8, 1)])
def test_workers_do_not_change_batches_or_order(manifest, num_workers, prefetch):
    n = 12  # 17 clips in batches of 3: past the epoch boundary (5 batches per epoch)
    reference, ref_state = batches(manifest, n, num_workers=1, prefetch=0)
    got, state = batches(manifest, n, num_workers=num_workers, prefetch=prefetch)
    assert_same(got, reference)
    assert state == ref_state
    # a resume from the middle continues with the same batches
    first, mid = batches(manifest, 4, num_workers=num_workers, prefetch=prefetch)
    rest, _ = batches(manifest, n - 4, state=mid, num_workers=num_workers, prefetch=prefetch)
    assert_same(first + rest, reference)


# ------------------------------------------------------------------------------------------ buckets
def librispeech_like(n=2000, seed=0):
    """Lengths like LibriSpeech's training clips: 1-35 s, most of them 10-16 s."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.normal(12.5, 3.5, n), 1.0, 35.0)
    seconds[:20] = np.linspace(1.0, 35.0, 20)
    samples = (seconds * 16000).astype(np.int64)
    return Manifest("synthetic", [f"{i}.wav" for i in range(n)], None, samples)


def padding_fraction(loader):
    lengths = loader.manifest.num_samples[loader.positions]
    padded = loader.bucket_samples[loader._bucket_of]
    return 1 - lengths.sum() / padded.sum()


def test_default_compiles_at_most_four_programs():
    m = librispeech_like()
    default = BatchLoader(m, batch_size=8, prefetch=0)
    ladder = BatchLoader(m, batch_size=8, prefetch=0, bucket_growth=1.25)
    assert len(default.bucket_samples) <= DEFAULT_NUM_BUCKETS == 4
    assert len(ladder.bucket_samples) >= 15  # what the geometric ladder compiled before
    assert default.bucket_samples[-1] >= m.num_samples.max()
    assert all(b % BUCKET_MULTIPLE == 0 for b in default.bucket_samples)
    # the price: a few points of padding over the 15-rung ladder, well under a fifth of the batch
    assert padding_fraction(default) < 0.2
    assert padding_fraction(default) - padding_fraction(ladder) < 0.12
    # every batch of an epoch has one of those shapes
    shapes = {int(default.bucket_samples[b]) for b, _ in default.plan(0)}
    assert shapes <= set(default.bucket_samples.tolist())


def test_bucket_edges_edges():
    lengths = np.array([16000] * 50 + [32000] * 50)
    assert bucket_edges(lengths, 4).tolist() == [16000, 32000]  # duplicates merge
    assert bucket_edges(lengths, 1).tolist() == [32000]
    with pytest.raises(D2VError, match="num_buckets"):
        bucket_edges(lengths, 0)


def test_bucket_edges_pad_least():
    """Against brute force over every choice of edges among the rounded lengths."""
    import itertools

    rng = np.random.default_rng(3)
    lengths = rng.integers(400, 12 * BUCKET_MULTIPLE, 300)

    def padding(edges):
        edges = np.asarray(edges)
        return int((edges[np.searchsorted(edges, lengths)] - lengths).sum())

    cand = np.unique(-(-lengths // BUCKET_MULTIPLE) * BUCKET_MULTIPLE)
    for count in (1, 2, 3, 4):
        got = bucket_edges(lengths, count)
        assert len(got) <= count and got[-1] == cand[-1]
        best = min(padding([*c, cand[-1]]) for c in itertools.combinations(cand[:-1], count - 1))
        assert padding(got) == best


def test_resume_of_a_run_from_before_num_buckets_keeps_its_ladder():
    """A checkpoint without `--bucket-growth` in its settings batched on the 1.25 ladder: resuming it
    with the new default (4 buckets) would change the data order, so it is refused in one line."""
    old = {"settings": {"--batch-size": 8, "--seed": 0}}

    def check(growth):
        settings = {"--batch-size": 8, "--seed": 0, "--num-buckets": 4, "--bucket-growth": growth}
        fake = SimpleNamespace(cfg=SimpleNamespace(meta={"settings": settings}, out_dir="RUN"))
        Trainer._check_meta(fake, old)

    with pytest.raises(D2VError, match="--bucket-growth 1.25"):
        check(None)
    check(1.25)
