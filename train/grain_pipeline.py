"""The input pipeline on grain: the epoch plan's batches as a `grain.MapDataset`, in worker processes.

    ds = PlanBatches(assembly, start=0, length=None)      # element i: global batch start+i of the plan
    it = open_iterator(ds, num_workers=4, prefetch=2, crumbs=Crumbs())
    batch = next(it); it.get_state(); it.set_state(state) # grain's own iterator state

`loader.BatchLoader` (the `DataSource` the loop trains on) is built on these. Why grain: the
batch work (decode, resample, normalise, pad) is Python and numpy that contend for one
interpreter; threads stopped at ~5-7.5k audio s/s on a 16-core host. grain's `mp_prefetch` runs
the same `__getitem__` in worker *processes* (`spawn`), hands batches back through shared
memory, slices element i to worker i mod N and interleaves the workers round-robin, so the
batches and their order are the same at any worker count; its iterator state checkpoints with
orbax (`grain.checkpoint.CheckpointHandler`, see `checkpoint.py`).

What a worker process does besides (`_init_worker`):
- it ignores SIGINT and SIGTERM: the main process decides when to stop (the loop saves a
  checkpoint on SIGTERM and then closes the workers; a worker that died of a group-wide SIGTERM
  would end the run before that checkpoint);
- it exits when the main process is gone (a thread polls the parent pid), so a main process
  killed outright (SIGKILL, OOM, a SIGTERM before the loop's handler is installed) leaves no
  orphan behind;
- before each clip it writes the clip's manifest position into its crumb file (`Crumbs`), and -1
  after the batch: when a worker dies inside the decoder (a crash, an OOM kill), the main process
  reads which clip it was on and names it (`Crumbs.clip`).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
from typing import Any, Protocol

import grain
import numpy as np
from absl import flags

from flax_d2v.train.source import HostBatch

ENDLESS = 2**62  # length of a repeating plan's dataset: grain's datasets have a length; no run reaches it
PARENT_POLL_S = 0.5  # how often a worker checks that the main process is still there
_NO_CLIP = -1
_crumb_fd: int | None = None  # this worker process's crumb file (None in the main process)


class Assembly(Protocol):
    """What `PlanBatches` needs: the epoch plan and the batch maker (`loader.BatchAssembly`)."""

    batches_per_epoch: int

    def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]: ...

    def make_batch(self, bucket: int, positions: np.ndarray) -> HostBatch: ...


class PlanBatches(grain.MapDataset):
    """Element i: this process's rows of global batch `start + i` of the plan (epoch after epoch).

    Picklable (it travels to the worker processes): the assembly holds the manifest and the
    per-example labels; each process computes the epoch plans it needs itself (pure functions).
    """

    def __init__(self, assembly: Assembly, start: int = 0, length: int | None = None) -> None:
        super().__init__()
        self._assembly, self._start = assembly, int(start)
        self._length = ENDLESS if length is None else int(length)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, b = divmod(self._start + int(index), self._assembly.batches_per_epoch)
        bucket, positions = self._assembly.plan(epoch)[b]
        return self._assembly.make_batch(bucket, positions)

    def __str__(self) -> str:
        return f"PlanBatches(start={self._start})"


def open_iterator(ds: PlanBatches, num_workers: int, prefetch: int, crumbs: Crumbs | None) -> Any:
    """grain's iterator over `ds`: in `num_workers` processes, or in this one (0; `prefetch` threads)."""
    _absl_flags_parsed()
    if num_workers <= 0:
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)))
    # In a worker, one batch at a time: a worker is a core; the workers are the parallelism.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    init = functools.partial(_init_worker, crumbs.directory if crumbs else None, os.getpid())
    options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=max(1, prefetch))
    return iter(it_ds.mp_prefetch(options, worker_init_fn=init))


def _absl_flags_parsed() -> None:
    """grain reads absl flags; a program that never parsed them (ours) gets their defaults."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ---------------------------------------------------------------------------------- worker processes
def _init_worker(crumbs_dir: str | None, parent_pid: int, index: int, count: int) -> None:
    """Runs first in each worker process (grain's `worker_init_fn`); see the module docstring."""
    global _crumb_fd
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if crumbs_dir is not None:
        _crumb_fd = os.open(os.path.join(crumbs_dir, f"worker-{index}"), os.O_WRONLY | os.O_CREAT, 0o600)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="d2v-parent-watch", daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(0)  # the main process is gone: nobody will read what this worker makes


def mark(position: int) -> None:
    """Record the clip this worker is on (-1: none); a no-op in the main process."""
    if _crumb_fd is not None:
        os.pwrite(_crumb_fd, struct.pack("<q", int(position)), 0)


def done() -> None:
    mark(_NO_CLIP)


class Crumbs:
    """A temporary directory of one small file per worker: the manifest position it is loading."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="d2v-loader-")

    def reset(self, num_workers: int) -> None:
        for w in range(num_workers):
            with open(os.path.join(self.directory, f"worker-{w}"), "wb") as f:
                f.write(struct.pack("<q", _NO_CLIP))

    def clip(self, worker: int) -> int | None:
        """The manifest position worker `worker` was loading, or None."""
        try:
            with open(os.path.join(self.directory, f"worker-{worker}"), "rb") as f:
                data = f.read(8)
        except OSError:
            return None
        position = struct.unpack("<q", data)[0] if len(data) == 8 else _NO_CLIP
        return None if position == _NO_CLIP else position

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def close_quietly(it: Any) -> None:
    """Close a grain iterator (stops and joins its worker processes); errors on the way out are moot."""
    try:
        it.close()
    except Exception as e:  # noqa: BLE001 - a worker already dead makes grain's cleanup raise
        print(f"note: data loader cleanup: {first_line(e)}", file=sys.stderr, flush=True)
