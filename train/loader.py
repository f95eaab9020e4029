"""The training input pipeline: length-bucketed, process-sharded batches from grain (a `DataSource`).

    from flax_d2v.train.loader import BatchLoader
    from flax_d2v.train.manifests import read_manifest
    m = read_manifest("train.tsv", require_text=True)
    loader = BatchLoader(m, batch_size=8, labels=objective.label_encoder, seed=0, max_seconds=20,
                         num_workers=4, process_index=jax.process_index(), process_count=jax.process_count())
    print(loader.summary())                                      # examples kept/dropped, buckets, unknown chars
    loader.start()                                               # optional: spawn the workers now
    for batch in loader:                                         # endless (repeat=True); one epoch with repeat=False
        ...; ckpt["data"] = loader.state()                       # {"epoch": e, "batch_in_epoch": b, "grain": {...}}
    loader.restore(ckpt["data"])                                 # continues with the next unseen batch
    loader.close()                                               # stops (and joins) the worker processes

Which clips are kept, the buckets and each epoch's order come from `planning.py`; the clips from
a `manifests.Manifest`. The batches are made by `BatchAssembly` inside a grain dataset over the
plan (`grain_pipeline.PlanBatches`), in `num_workers` worker processes (grain's `mp_prefetch`;
0: in this process, with `prefetch` threads). `BatchLoader` satisfies `source.DataSource`, the
protocol the loop is typed against.

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

Position and resume: `state()` is the plan position after the last batch handed out (`epoch`,
`batch_in_epoch`) and grain's iterator state (`grain`: the dataset's first batch, the worker count
and `iterator.get_state()`); the checkpoint stores it through grain's orbax handler. `restore`
hands a state of the same worker count to grain's `set_state`; any other state (another
`num_workers`, or a checkpoint of the thread loader this replaced, which saved only `epoch` and
`batch_in_epoch`) starts the grain dataset at that position: the plan is a pure function of the
manifest and the arguments, so it is the same batch either way.

Failures: a clip that fails to load raises `D2VError` naming it (from a worker too); a worker
that dies (a crash in the decoder, an OOM kill) ends the iteration with one `D2VError` naming the
clip it was loading (`grain_pipeline.Crumbs`), never a hang or a skipped batch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flax_d2v.audio import HF_NORM_EPS, SAMPLE_RATE, pad_batch
from flax_d2v.errors import D2VError
from flax_d2v.train import grain_pipeline as gp
from flax_d2v.train.manifests import Manifest
from flax_d2v.train.planning import DEFAULT_NUM_BUCKETS, bucket_edges, bucket_ladder, plan_epoch, select_examples
from flax_d2v.train.source import HostBatch, LabelEncoder
from flax_d2v.train.vocab import TranscriptLabels

LABEL_PAD = -100  # HF's ignore index for padded label positions.
LABEL_MULTIPLE = 8  # label pad lengths rounded up to this, so small transcript changes don't add shapes.


class BatchAssembly:
    """Everything that turns a plan entry (bucket, global positions) into this process's batch.

    Picklable, and pickled into every worker process: the manifest (its `reader` opens its
    source lazily in each process), the kept examples, their buckets and target ids. The epoch
    plans are recomputed where they are needed (`plan`), a pure function of these.
    """

    def __init__(
        self,
        manifest: Manifest,
        positions: np.ndarray,
        bucket_of: np.ndarray,
        bucket_samples: np.ndarray,
        labels: list[np.ndarray] | None,
        unknown: np.ndarray,
        label_widths: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        shuffle: bool,
        drop_remainder: bool,
        normalize: bool,
        process_index: int,
        local_batch_size: int,
    ) -> None:
        self.manifest, self.positions, self.bucket_of, self.bucket_samples = (
            manifest,
            positions,
            bucket_of,
            bucket_samples,
        )
        self.labels, self.unknown, self.label_widths = labels, unknown, label_widths
        self.batch_size, self.seed, self.shuffle, self.drop_remainder = batch_size, seed, shuffle, drop_remainder
        self.normalize, self.process_index, self.local_batch_size = normalize, process_index, local_batch_size
        self._plan_cache: tuple[int, list[tuple[int, np.ndarray]]] | None = None
        self.batches_per_epoch = len(self.plan(0))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_plan_cache": None}

    def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """Epoch `epoch`'s global batches as (bucket, manifest positions; -1 for filler rows)."""
        cache = self._plan_cache
        if cache is None or cache[0] != epoch:
            rows = plan_epoch(self.bucket_of, self.batch_size, self.seed, epoch, self.shuffle, self.drop_remainder)
            cache = (epoch, [(k, np.where(r >= 0, self.positions[np.maximum(r, 0)], -1)) for k, r in rows])
            self._plan_cache = cache
        return cache[1]

    def local_rows(self, positions: np.ndarray) -> np.ndarray:
        """This process's slice of a global batch."""
        s = self.process_index * self.local_batch_size
        return positions[s : s + self.local_batch_size]

    def load(self, p: int) -> np.ndarray:
        """Clip `p`, with any failure as one `D2VError` naming it (in a worker process too)."""
        gp.mark(p)
        try:
            wave = self.manifest.load(p)
        except D2VError:
            raise
        except Exception as e:  # noqa: BLE001 - a reader's own error: named with its clip
            raise D2VError(f"{self.manifest.paths[p]}: cannot load ({gp.first_line(e)})") from None
        return wave

    def make_batch(self, bucket: int, positions: np.ndarray) -> HostBatch:
        """Load and pad this process's rows of the global batch `positions` (bucket `bucket`)."""
        rows = self.local_rows(positions)
        real = [int(p) for p in rows if p >= 0]
        waves = [self.load(p) for p in real]
        gp.done()
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
        if self.labels is not None:
            labels = np.full((b, int(self.label_widths[bucket])), LABEL_PAD, np.int32)
            lengths, unknown = np.zeros(b, np.int32), np.zeros(b, np.int32)
            slot = np.searchsorted(self.positions, real)  # positions are sorted: manifest position -> kept row
            for r, j in enumerate(slot):
                labels[r, : len(self.labels[j])] = self.labels[j]
                lengths[r], unknown[r] = len(self.labels[j]), self.unknown[j]
            batch.update(labels=labels, label_lengths=lengths, num_unknown=unknown)
        return batch


class BatchLoader:
    """Length-bucketed, shuffled, process-sharded batches from grain, with a resumable position.

    Iterating yields this process's rows of each global batch (see the module docstring for the
    keys). `state()` is the position after the last batch handed out; `restore(state)` resumes
    there. `repeat=False` stops after one epoch (evaluation: `shuffle=False, drop_remainder=False`).

    `labels` is the objective's `LabelEncoder` (CTC: `objective.label_encoder`); `vocab=` is
    shorthand for `labels=TranscriptLabels(vocab)`, CTC's encoder. `require_text` (drop clips
    without a transcript) defaults to whether there is an encoder.

    `num_workers` worker processes make the batches (0: this process, `prefetch` threads ahead;
    `prefetch=0`: synchronous); each holds up to `prefetch` finished batches (at least one).
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
        num_workers: int = 0,
    ):
        if batch_size < 1 or batch_size % process_count:
            raise D2VError(f"batch_size: {batch_size} must be a positive multiple of the process count {process_count}")
        if not 0 <= process_index < process_count:
            raise D2VError(f"process_index: {process_index} is not in [0, {process_count})")
        if num_workers < 0 or prefetch < 0:
            raise D2VError(f"num_workers, prefetch: must be >= 0, got {num_workers}, {prefetch}")
        self.manifest, self.batch_size, self.seed, self.repeat = manifest, batch_size, seed, repeat
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = batch_size // process_count
        self.prefetch, self.num_workers = prefetch, num_workers
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
        targets: list[np.ndarray] | None = None
        self._unknown = np.zeros(len(self.positions), np.int32)
        self.label_widths = np.zeros(len(self.bucket_samples), np.int64)
        if self.label_encoder is not None:
            targets = []
            texts = manifest.texts or [None] * len(manifest)
            for j, p in enumerate(self.positions):
                ids, self._unknown[j] = self.label_encoder(texts[p] or "")
                targets.append(np.asarray(ids, np.int32))
            longest = np.zeros(len(self.bucket_samples), np.int64)
            np.maximum.at(longest, self._bucket_of, [len(x) for x in targets])
            # Leftovers only move up the ladder, so bucket k can hold labels as long as any bucket <= k.
            cum = np.maximum.accumulate(longest)
            self.label_widths = np.maximum(LABEL_MULTIPLE, -(-cum // LABEL_MULTIPLE) * LABEL_MULTIPLE)
        self.assembly = BatchAssembly(
            manifest,
            self.positions,
            self._bucket_of,
            self.bucket_samples,
            targets,
            self._unknown,
            self.label_widths,
            batch_size=batch_size,
            seed=seed,
            shuffle=shuffle,
            drop_remainder=drop_remainder,
            normalize=normalize,
            process_index=process_index,
            local_batch_size=self.local_batch_size,
        )
        self.batches_per_epoch = self.assembly.batches_per_epoch
        if self.batches_per_epoch == 0:
            raise D2VError(
                f"batch_size: {batch_size} is larger than the {len(self.positions)} clips kept "
                f"from {manifest.source} (and drop_remainder is on)"
            )
        self._position = 0  # global batch number (epochs * batches_per_epoch + batch) of the next batch
        self._start = 0  # the global batch number the grain dataset starts at
        self._it: Any = None  # grain's iterator, opened on first use
        self._pending: dict | None = None  # a grain iterator state to hand over when it opens
        self._crumbs: gp.Crumbs | None = None

    # -- position
    def state(self) -> dict[str, Any]:
        """The position after the last batch handed out, and grain's iterator state, for a checkpoint."""
        epoch, b = divmod(self._position, self.batches_per_epoch)
        if not self.repeat and epoch:
            epoch, b = 0, self.batches_per_epoch
        out: dict[str, Any] = {"epoch": epoch, "batch_in_epoch": b}
        iterator = self._it.get_state() if self._it is not None else self._pending
        if iterator is not None:
            out["grain"] = {"start": self._start, "num_workers": self.num_workers, "iterator": iterator}
        return out

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue at `state` (from `state()`, or the thread loader's `{epoch, batch_in_epoch}`)."""
        try:
            epoch, b = int(state["epoch"]), int(state["batch_in_epoch"])
        except (KeyError, TypeError, ValueError):
            raise D2VError(f"data state: expected {{'epoch': int, 'batch_in_epoch': int}}, got {state!r}") from None
        if epoch < 0 or not 0 <= b <= self.batches_per_epoch:
            raise D2VError(
                f"data state: {state!r} is outside this data (an epoch has {self.batches_per_epoch} batches)"
            )
        position = epoch * self.batches_per_epoch + b
        saved = state.get("grain")
        if isinstance(saved, Mapping) and saved.get("num_workers") == self.num_workers and "iterator" in saved:
            start = int(saved["start"])
            if self._it is not None and start != self._start:
                self._close_iterator()
            self._start, self._pending = start, dict(saved["iterator"])
            if self._it is not None:
                self._it.set_state(self._pending)  # grain discards what the workers made ahead
                self._pending = None
        else:  # another worker count, or a thread-loader checkpoint: grain starts at the position
            self._close_iterator()
            self._start, self._pending = position, None
        self._position = position

    def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """Epoch `epoch`'s global batches as (bucket, manifest positions; -1 for filler rows)."""
        return self.assembly.plan(epoch)

    def local_rows(self, positions: np.ndarray) -> np.ndarray:
        """This process's slice of a global batch."""
        return self.assembly.local_rows(positions)

    def make_batch(self, bucket: int, positions: np.ndarray) -> HostBatch:
        """This process's rows of the global batch `positions`, made here (what a worker runs)."""
        return self.assembly.make_batch(bucket, positions)

    # -- iteration
    def start(self) -> BatchLoader:
        """Open grain's iterator and start its workers now, e.g. while the model compiles (else on first use)."""
        it = self._open()
        if hasattr(it, "start_prefetch"):
            it.start_prefetch()
        return self

    def _open(self) -> Any:
        if self._it is None:
            length = None if self.repeat else self.batches_per_epoch - self._start
            ds = gp.PlanBatches(self.assembly, self._start, length)
            if self.num_workers and self._crumbs is None:
                self._crumbs = gp.Crumbs()
            if self._crumbs is not None:
                self._crumbs.reset(self.num_workers)
            self._it = gp.open_iterator(ds, self.num_workers, self.prefetch, self._crumbs)
            if self._pending is not None:
                self._it.set_state(self._pending)
                self._pending = None
        return self._it

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> HostBatch:
        if not self.repeat and self._position >= self.batches_per_epoch:
            raise StopIteration
        it = self._open()
        try:
            batch = next(it)
        except StopIteration:
            raise
        except D2VError:
            self.close()
            raise
        except Exception as e:  # noqa: BLE001 - grain's report of a dead worker, or a bug: one line naming the clip
            message = self._failure(e)
            self.close()
            raise D2VError(message) from None
        self._position += 1
        return batch

    def _failure(self, e: Exception) -> str:
        """One line for a failure that is not a clip's own `D2VError`: which clip was being loaded."""
        reason = gp.first_line(e)
        code = re.search(r"exit code (-?\d+)", reason)
        if code:
            reason = f"the loader's worker process died (exit code {code.group(1)})"
        clip = None
        if self._crumbs is not None and self.num_workers:
            clip = self._crumbs.clip((self._position - self._start) % self.num_workers)
        if clip is not None:
            return f"{self.manifest.paths[clip]}: {reason} while loading this clip"
        return f"data loader: {reason} (batch {self._position} of the plan)"

    def _close_iterator(self) -> None:
        if self._it is not None:
            gp.close_quietly(self._it)
            self._it = None

    def close(self) -> None:
        """Stop the workers (idempotent); the next `next()` starts again from `state()`."""
        if self._it is not None:
            self._pending = self._it.get_state()
        self._close_iterator()
        if self._crumbs is not None:
            self._crumbs.remove()
            self._crumbs = None

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_crumbs", None) is not None:
            self._crumbs.remove()

    def summary(self) -> dict[str, Any]:
        """Numbers for the log: clips kept and dropped, hours, buckets, unknown characters, workers."""
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
            "num_workers": self.num_workers,
        }
