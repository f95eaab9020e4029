"""The interface between the training loop and its input pipeline: `DataSource` (and `LabelEncoder`).

`flax_d2v.train.loop.Trainer.fit` trains on any `DataSource`, as it trains any `Objective`
(`objective.py`): the length-bucketed `loader.BatchLoader` (fine-tuning, and pretraining's padded
batches), pretraining's `pretrain.CroppedBatches` around it, or another pipeline dropped in (a
streaming reader, a list of arrays in a test). The loop needs four things of it, and they are
what make a stopped run resume exactly where it stopped:

- iterating it yields batches: dicts of numpy arrays with a leading batch axis, this process's
  rows of the global batch (`HostBatch`); the keys are the objective's business (`input_values`,
  `attention_mask`, `index`, ... as `loader.py` documents them). The loop calls `iter()` once per
  `fit` and `next()` once per update; the source may run ahead (prefetch), but see `state()`.
- `state()`: a small JSON-serialisable dict, saved with every checkpoint, that says which batch
  comes next: the position after the last batch *handed out* by `next()` (not after the last one
  prefetched), plus whatever else the batch order depends on and the source cannot recompute from
  its constructor arguments (the epoch number, the seed of a reshuffle, ...). After
  `restore(state())` on a source built the same way (any process, any restart), iterating it
  yields exactly the batches the original source would have yielded next. `BatchLoader` gives
  `{"epoch": e, "batch_in_epoch": b, "grain": {...}}`: its plan is a pure function of the manifest
  and arguments, and `grain` is its grain iterator's own state. The checkpoint stores the dict
  through grain's orbax handler (`checkpoint.py`, item `iterator`).
- `restore(state)`: continue at `state` (from `state()`, possibly of an earlier process); batches
  prefetched before are discarded. Bad input raises `D2VError` in one line.
- `close()`: stop background work (worker processes, threads, files); idempotent. The source may be iterated again
  afterwards, from `state()`.

`LabelEncoder` is what an objective that trains on per-example targets hands to the loader
(`BatchLoader(labels=objective.label_encoder)`), so the loader knows nothing of what the targets
mean: CTC gives its vocabulary's transcript encoder (`vocab.TranscriptLabels`); pretraining needs
no labels, and classification looks its one label per clip up by `batch["index"]`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

HostBatch = dict[str, np.ndarray]  # one process's rows of a global batch, as numpy arrays


@runtime_checkable
class DataSource(Protocol):
    """Batches for `Trainer.fit`, with a resumable position. See the module docstring for the contract."""

    def __iter__(self) -> Iterator[HostBatch]:
        """This process's batches, from the current position on (endless for training)."""
        ...

    def state(self) -> dict[str, Any]:
        """JSON-serialisable position after the last batch handed out: enough for an exact `restore`."""
        ...

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue at `state` (from `state()`); anything prefetched is discarded."""
        ...

    def close(self) -> None:
        """Stop background work (idempotent); iterating again starts from `state()`."""
        ...


@runtime_checkable
class LabelEncoder(Protocol):
    """An example's transcript -> its integer targets, called once per kept example by the loader.

    The loader pads the ids of a batch into `labels` (-100 after the end), with `label_lengths`
    and `num_unknown` beside them (see `loader.py`); it calls the encoder with `""` for an
    example without a transcript.
    """

    def __call__(self, text: str) -> tuple[Sequence[int], int]:
        """(target ids, how many characters had no id of their own and became the unknown id)."""
        ...
