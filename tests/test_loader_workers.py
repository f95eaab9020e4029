"""The loader's worker processes (grain's `mp_prefetch`) and its default buckets.

Workers make whole batches in other processes: the batches and their order must not depend on
how many there are, and a resume (grain's `set_state` at the same count, the plan position at
another) must continue with the same batches. A worker that dies names the clip it was loading,
without a hang; a main process that dies leaves no worker behind. The default buckets keep a run
to at most four train-step programs (issue 12).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from flax_d2v.audio import load_audio
from flax_d2v.errors import D2VError
from flax_d2v.train.loader import BatchLoader
from flax_d2v.train.loop import Trainer
from flax_d2v.train.manifests import Manifest, read_manifest
from flax_d2v.train.planning import BUCKET_MULTIPLE, DEFAULT_NUM_BUCKETS, bucket_edges
from flax_d2v.train.vocab import build_vocab

# A dead worker is noticed by grain within its 1 s queue timeout; spawning one takes a few seconds
# on a loaded 2-core machine. Anything near this bound is a hang.
NO_HANG_S = 120


@pytest.fixture(scope="module")
def manifest(speech_dir):
    return read_manifest(speech_dir / "transcripts.tsv", require_text=True)


def make(manifest, **kw):
    return BatchLoader(manifest, batch_size=3, vocab=build_vocab(manifest.texts), seed=5, **kw)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def position(state):
    return {k: state[k] for k in ("epoch", "batch_in_epoch")}


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def check_worker_count(manifest, num_workers, from_another_count=True):
    """Batches, order and position equal to the loader in this process, across epoch boundaries;
    a resume continues with the same batches through grain's `set_state` (same worker count, on
    live workers) and through the plan position (another worker count)."""
    n, cut = 12, 4  # 17 clips in batches of 3: past two epoch boundaries
    with make(manifest, num_workers=0, prefetch=0) as ref_loader:
        reference = take(ref_loader, n)
        ref_state = ref_loader.state()
        reference += take(ref_loader, 2)
    with make(manifest, num_workers=num_workers, prefetch=2) as loader:
        first = take(loader, cut)
        mid = loader.state()
        assert mid["grain"]["num_workers"] == num_workers
        rest = take(loader, n - cut)
        assert_same(first + rest, reference[:n])
        assert position(loader.state()) == position(ref_state)
        loader.restore(mid)  # grain's set_state: the workers drop what they made ahead
        assert_same(take(loader, n - cut), reference[cut:n])
    with make(manifest, num_workers=0, prefetch=0) as other:
        other.restore(mid)  # another worker count: grain starts at the position
        assert_same(take(other, n - cut), reference[cut:n])
        back = other.state()
    if not from_another_count:  # (another spawn of the workers)
        return
    with make(manifest, num_workers=num_workers, prefetch=1) as loader:
        loader.restore(back)
        assert_same(take(loader, 2), reference[n:])


def test_two_workers_give_the_batches_of_none(manifest):
    check_worker_count(manifest, 2, from_another_count=False)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [1, 2, 4])
def test_any_worker_count_gives_the_same_batches(manifest, num_workers):
    check_worker_count(manifest, num_workers)


class KillOn:
    """A manifest reader whose clip `bad` kills its process outright, as a decoder crash or an
    OOM kill does (picklable: it runs in the worker processes)."""

    def __init__(self, paths: list[str], bad: int) -> None:
        self.paths, self.bad = paths, bad

    def __call__(self, i: int) -> np.ndarray:
        if i == self.bad:
            os.kill(os.getpid(), signal.SIGKILL)
        return load_audio(self.paths[i], warn=lambda _: None)


def test_a_worker_that_dies_names_its_clip_without_a_hang(manifest):
    probe = make(manifest)
    bad = int(probe.plan(0)[1][1][1])  # the second clip of the second batch
    killer = KillOn(manifest.paths, bad)
    m = Manifest(manifest.source, manifest.paths, manifest.texts, manifest.lengths(), reader=killer)
    loader = make(m, num_workers=2, prefetch=1)
    t0 = time.time()
    first = next(loader)  # batch 0 (worker 0) is fine
    with pytest.raises(D2VError) as err:
        next(loader)  # batch 1: worker 1 dies on `bad`
    assert time.time() - t0 < NO_HANG_S
    message = str(err.value)
    assert message.startswith(f"{manifest.paths[bad]}: ") and "died (exit code -9)" in message
    assert "\n" not in message
    assert first["index"].tolist() == probe.plan(0)[0][1].tolist()
    loader.close()


_ORPHAN_SCRIPT = """
import sys
from flax_d2v.train.loader import BatchLoader
from flax_d2v.train.manifests import read_manifest

if __name__ == "__main__":
    loader = BatchLoader(read_manifest(sys.argv[1]), batch_size=2, num_workers=1).start()
    next(loader)
    print("ready", flush=True)
    while True:
        next(loader)
"""


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out |= {int(x) for x in f.read().split()}
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow  # (the default suite's budget; the real command's SIGTERM: tests/test_grain_runs.py)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_main_process_killed_by_sigterm_leaves_no_worker(tmp_path, speech_dir):
    """SIGTERM before any handler is installed (the default action: the process ends at once),
    with the workers busy: they notice their parent is gone and exit."""
    script = tmp_path / "main.py"
    script.write_text(_ORPHAN_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(speech_dir / "transcripts.tsv")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = {c for c in _children(proc.pid) if "python" in open(f"/proc/{c}/cmdline").read()}
        assert workers, "no worker process"  # the worker (and multiprocessing's resource tracker)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
        deadline = time.time() + 30
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)]
    finally:
        if proc.poll() is None:
            proc.kill()


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
