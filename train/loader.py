"""The training input pipeline: length-bucketed, process-sharded, prefetched batches (a `DataSource`).

    from flax_d2v.train.loader import BatchLoader
    from flax_d2v.train.manifests import read_manifest
    m = read_manifest("train.tsv", require_text=True)
    loader = BatchLoader(m, batch_size=8, labels=objective.label_encoder, seed=0, max_seconds=20,
                         process_index=jax.process_index(), process_count=jax.process_count())
    print(loader.summary())                                      # examples kept/dropped, buckets, unknown chars
    for batch in loader:                                         # endless (repeat=True); one epoch with repeat=False
        ...; ckpt["data"] = loader.state()                       # {"epoch": e, "batch_in_epoch": b}
    loader.restore(ckpt["data"])                                 # continues with the next unseen batch

Which clips are kept, the buckets and each epoch's order come from `planning.py`; the clips from
a `manifests.Manifest`. `BatchLoader` satisfies `source.DataSource`, the protocol the loop is
typed against.

Batches (numpy, on each process only its rows `[p*B/P, (p+1)*B/P)` of the global batch B):
- `input_values` (b, S) float32: each clip normalised over its own samples like HF's
  `Wav2Vec2FeatureExtractor` (eps 1e-7), 0.0 in the padding; `attention_mask` (b, S) int32.
- `index` (b,) int64 manifest positions, -1 for filler rows (only in the last batch of a
  `drop_remainder=False` pass: all-zero mask, no labels; leave them out of metrics);
  `seconds` (b,) float32 real durations.
- with a label encoder (`labels=`, from the objective: `source.LabelEncoder`): `labels` (b, L)
  int32 padded with -100 (HF), `label_lengths` (b,) int32, `num_unknown` (b,) int32 characters
  the encoder had no id for. The loader does not know what the ids mean.

Shapes: S is one of `loader.bucket_samples` and L is fixed per bucket, so XLA compiles one
program per bucket. By default the buckets are at most `num_buckets` (4) lengths that pad the
kept clips least (`planning.bucket_edges`); `bucket_growth=` asks for a geometric ladder instead.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from flax_d2v.audio import HF_NORM_EPS, SAMPLE_RATE, pad_batch
from flax_d2v.errors import D2VError
from flax_d2v.train.manifests import Manifest
from flax_d2v.train.planning import DEFAULT_NUM_BUCKETS, bucket_edges, bucket_ladder, plan_epoch, select_examples
from flax_d2v.train.source import HostBatch, LabelEncoder
from flax_d2v.train.vocab import TranscriptLabels

LABEL_PAD = -100  # HF's ignore index for padded label positions.
LABEL_MULTIPLE = 8  # label pad lengths rounded up to this, so small transcript changes don't add shapes.


class BatchLoader:
    """Length-bucketed, shuffled, process-sharded, prefetched batches with a resumable position.

    Iterating yields this process's rows of each global batch (see the module docstring for the
    keys). `state()` is the position after the last batch handed out; `restore(state)` resumes
    there. `repeat=False` stops after one epoch (evaluation: `shuffle=False, drop_remainder=False`).

    `labels` is the objective's `LabelEncoder` (CTC: `objective.label_encoder`); `vocab=` is
    shorthand for `labels=TranscriptLabels(vocab)`, CTC's encoder. `require_text` (drop clips
    without a transcript) defaults to whether there is an encoder.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        batch_size: int,
        vocab: Mapping[str, int] | None = None,
        labels: LabelEncoder | None = None,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
        drop_remainder: bool = True,
        min_seconds: float | None = None,
        max_seconds: float | None = None,
        require_text: bool | None = None,
        bucket_samples: Sequence[int] | None = None,
        num_buckets: int = DEFAULT_NUM_BUCKETS,
        bucket_growth: float | None = None,
        normalize: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = 2,
        num_workers: int = 4,
    ):
        if batch_size < 1 or batch_size % process_count:
            raise D2VError(f"batch_size: {batch_size} must be a positive multiple of the process count {process_count}")
        if not 0 <= process_index < process_count:
            raise D2VError(f"process_index: {process_index} is not in [0, {process_count})")
        self.manifest, self.batch_size, self.seed = manifest, batch_size, seed
        self.shuffle, self.repeat, self.drop_remainder, self.normalize = shuffle, repeat, drop_remainder, normalize
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = batch_size // process_count
        self.prefetch, self.num_workers = prefetch, max(1, num_workers)
        if vocab is not None and labels is not None:
            raise D2VError("BatchLoader: give labels= (the objective's label encoder) or vocab=, not both")
        self.label_encoder = TranscriptLabels(vocab) if vocab is not None else labels
        require_text = self.label_encoder is not None if require_text is None else require_text
        self.positions, self.dropped = select_examples(manifest, min_seconds, max_seconds, require_text)
        if self.positions.size == 0:
            raise D2VError(f"{manifest.source}: no clips left after the filters (dropped: {self.dropped})")
        lengths = manifest.num_samples[self.positions]
        if bucket_samples is None and bucket_growth is not None:
            self.bucket_samples = bucket_ladder(int(lengths.min()), int(lengths.max()), bucket_growth)
        elif bucket_samples is None:
            self.bucket_samples = bucket_edges(lengths, num_buckets)
        else:
            self.bucket_samples = np.asarray(sorted(int(b) for b in bucket_samples), np.int64)
            if lengths.max() > self.bucket_samples[-1]:
                raise D2VError(
                    f"bucket_samples: the longest kept clip has {lengths.max()} samples, more than the "
                    f"largest bucket {self.bucket_samples[-1]} (lower max_seconds or add a bucket)"
                )
        self._bucket_of = np.searchsorted(self.bucket_samples, lengths, side="left").astype(np.int64)
        self._labels: list[np.ndarray] = []  # kept example j's target ids
        self._unknown = np.zeros(len(self.positions), np.int32)
        self.label_widths = np.zeros(len(self.bucket_samples), np.int64)
        if self.label_encoder is not None:
            texts = manifest.texts or [None] * len(manifest)
            for j, p in enumerate(self.positions):
                ids, self._unknown[j] = self.label_encoder(texts[p] or "")
                self._labels.append(np.asarray(ids, np.int32))
            longest = np.zeros(len(self.bucket_samples), np.int64)
            np.maximum.at(longest, self._bucket_of, [len(x) for x in self._labels])
            # Leftovers only move up the ladder, so bucket k can hold labels as long as any bucket <= k.
            cum = np.maximum.accumulate(longest)
            self.label_widths = np.maximum(LABEL_MULTIPLE, -(-cum // LABEL_MULTIPLE) * LABEL_MULTIPLE)
        self.batches_per_epoch = len(plan_epoch(self._bucket_of, batch_size, seed, 0, shuffle, drop_remainder))
        if self.batches_per_epoch == 0:
            raise D2VError(
                f"batch_size: {batch_size} is larger than the {len(self.positions)} clips kept "
                f"from {manifest.source} (and drop_remainder is on)"
            )
        self._epoch, self._batch = 0, 0
        self._plan_cache: tuple[int, list[tuple[int, np.ndarray]]] | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._gen: Iterator[tuple[int, int, HostBatch]] | None = None
        self._stop = threading.Event()

    # -- position
    def state(self) -> dict[str, int]:
        """The position after the last batch handed out, to be saved with a checkpoint."""
        return {"epoch": self._epoch, "batch_in_epoch": self._batch}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continue at `state` (from `state()`); prefetched batches are discarded."""
        try:
            epoch, b = int(state["epoch"]), int(state["batch_in_epoch"])
        except (KeyError, TypeError, ValueError):
            raise D2VError(f"data state: expected {{'epoch': int, 'batch_in_epoch': int}}, got {state!r}") from None
        if epoch < 0 or not 0 <= b <= self.batches_per_epoch:
            raise D2VError(
                f"data state: {state!r} is outside this data (an epoch has {self.batches_per_epoch} batches)"
            )
        self.close()
        self._epoch, self._batch = epoch, b
        if self._batch == self.batches_per_epoch and self.repeat:
            self._epoch, self._batch = epoch + 1, 0

    def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """Epoch `epoch`'s global batches as (bucket, manifest positions; -1 for filler rows)."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            rows = plan_epoch(self._bucket_of, self.batch_size, self.seed, epoch, self.shuffle, self.drop_remainder)
            self._plan_cache = (epoch, [(k, np.where(r >= 0, self.positions[np.maximum(r, 0)], -1)) for k, r in rows])
        return self._plan_cache[1]

    # -- assembly
    def local_rows(self, positions: np.ndarray) -> np.ndarray:
        """This process's slice of a global batch."""
        s = self.process_index * self.local_batch_size
        return positions[s : s + self.local_batch_size]

    def make_batch(self, bucket: int, positions: np.ndarray) -> HostBatch:
        """Load and pad this process's rows of the global batch `positions` (bucket `bucket`); one
        loader worker runs a whole call (`_produce`)."""
        rows = self.local_rows(positions)
        real = [int(p) for p in rows if p >= 0]
        waves = [self.manifest.load(p) for p in real]
        width = int(self.bucket_samples[bucket])
        for p, w in zip(real, waves, strict=True):
            if len(w) > width:
                raise D2VError(
                    f"{self.manifest.paths[p]}: decoded to {len(w)} samples, more than the "
                    f"{self.manifest.num_samples[p]} its manifest entry declares"
                )
        b = len(rows)
        if waves:
            values, mask = pad_batch(waves, do_normalize=self.normalize, pad_to=width, batch_to=b, eps=HF_NORM_EPS)
        else:
            values, mask = np.zeros((b, width), np.float32), np.zeros((b, width), np.int32)
        seconds = np.zeros(b, np.float32)
        seconds[: len(waves)] = [len(w) / SAMPLE_RATE for w in waves]
        # Filler rows (-1) only ever trail a batch, so row r of the arrays is rows[r].
        batch = {
            "input_values": values,
            "attention_mask": mask,
            "index": np.asarray(rows, np.int64),
            "seconds": seconds,
        }
        if self.label_encoder is not None:
            labels = np.full((b, int(self.label_widths[bucket])), LABEL_PAD, np.int32)
            lengths, unknown = np.zeros(b, np.int32), np.zeros(b, np.int32)
            slot = np.searchsorted(self.positions, real)  # positions are sorted: manifest position -> kept row
            for r, j in enumerate(slot):
                labels[r, : len(self._labels[j])] = self._labels[j]
                lengths[r], unknown[r] = len(self._labels[j]), self._unknown[j]
            batch.update(labels=labels, label_lengths=lengths, num_unknown=unknown)
        return batch

    # -- iteration
    def _jobs(self, epoch: int, start: int) -> Iterator[tuple[int, int, int, np.ndarray]]:
        """(epoch, batch number, bucket, positions) in plan order from (epoch, start) on."""
        while True:
            for b, (bucket, positions) in enumerate(self.plan(epoch)[start:], start=start):
                yield epoch, b, bucket, positions
            if not self.repeat:
                return
            epoch, start = epoch + 1, 0

    def _produce(self, epoch: int, start: int, stop: threading.Event) -> Iterator[tuple[int, int, HostBatch]]:
        """Batches in plan order, assembled `num_workers` at a time.

        Why whole batches per worker: decoding inside one batch in parallel left the padding and
        normalisation on this one thread, and the loader stopped scaling at ~5,000 audio s/s
        whatever the worker count (an H100 at 45% MFU eats ~9,000). A worker now decodes, pads and
        normalises a whole batch (libsndfile and numpy release the GIL), `num_workers` batches are
        in flight, and they are handed out in order, so the position (`state()`) is unchanged.
        """
        window: collections.deque = collections.deque()
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
            try:
                for e, b, bucket, positions in self._jobs(epoch, start):
                    if stop.is_set():
                        return
                    window.append((e, b, pool.submit(self.make_batch, bucket, positions)))
                    if len(window) > self.num_workers:
                        e0, b0, done = window.popleft()
                        yield e0, b0, done.result()
                while window and not stop.is_set():
                    e0, b0, done = window.popleft()
                    yield e0, b0, done.result()
            finally:
                for _, _, pending in window:
                    pending.cancel()

    @staticmethod
    def _put(q: queue.Queue, item: Any, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _worker(self, epoch: int, start: int, q: queue.Queue, stop: threading.Event) -> None:
        """Producer thread: decodes ahead into `q`; ends with ("end", None) or ("end", exception)."""
        end: BaseException | None = None
        try:
            for item in self._produce(epoch, start, stop):
                self._put(q, item, stop)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread and re-raised there
            end = e
        self._put(q, ("end", end), stop)

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> HostBatch:
        if not self.repeat and self._batch >= self.batches_per_epoch:
            raise StopIteration
        if self.prefetch <= 0:  # synchronous: a plain generator, no thread
            if self._gen is None:
                self._stop = threading.Event()
                self._gen = self._produce(self._epoch, self._batch, self._stop)
            item = next(self._gen)
        else:
            if self._thread is None:
                self._stop = threading.Event()
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(
                    target=self._worker,
                    name="d2v-data-prefetch",
                    daemon=True,
                    args=(self._epoch, self._batch, self._queue, self._stop),
                )
                self._thread.start()
            item = self._queue.get()
            if item[0] == "end":
                self.close()
                if item[1] is not None:
                    raise item[1]
                raise StopIteration
        epoch, b, batch = item
        self._epoch, self._batch = epoch, b + 1
        if self._batch == self.batches_per_epoch and self.repeat:
            self._epoch, self._batch = epoch + 1, 0
        return batch

    def close(self) -> None:
        """Stop prefetching (idempotent); the next `next()` starts again from `state()`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._gen is not None:
            self._gen.close()
        self._thread, self._queue, self._gen = None, None, None

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def summary(self) -> dict[str, Any]:
        """Numbers for the log: clips kept and dropped, hours, buckets, unknown characters."""
        kept = self.manifest.num_samples[self.positions]
        return {
            "source": self.manifest.source,
            "examples": int(self.positions.size),
            "dropped": dict(self.dropped),
            "hours": round(float(kept.sum()) / SAMPLE_RATE / 3600, 4),
            "batches_per_epoch": self.batches_per_epoch,
            "bucket_seconds": [round(float(b) / SAMPLE_RATE, 2) for b in self.bucket_samples],
            "label_widths": [int(x) for x in self.label_widths] if self.label_encoder is not None else None,
            "unknown_chars": int(self._unknown.sum()),
            "examples_with_unknown": int((self._unknown > 0).sum()),
        }
