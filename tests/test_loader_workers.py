"""The loader assembles several batches at once: the batches and their order must not depend on it."""

from __future__ import annotations

import numpy as np
import pytest

from flax_d2v.train.loader import BatchLoader
from flax_d2v.train.manifests import read_manifest
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
