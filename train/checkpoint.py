"""Training checkpoints: orbax `CheckpointManager` under `RUN/checkpoints/<step>/`.

Each checkpoint holds three items:
- `state`: the whole `TrainState` (params, optimizer state, objective extra such as the EMA
  teacher, step, rng), written by every process for the shards it owns (orbax/tensorstore), so
  it works for FSDP-sharded and multi-host states alike;
- `iterator`: the data source's `state()` (the loader's position and grain's iterator state),
  written by grain's own orbax handler (`grain.checkpoint.CheckpointHandler`: one
  `process_<i>-of-<n>.json` per process), so a resumed run sees the batches it would have seen;
- `meta`: JSON facts about the run (objective, config, vocab size), checked on resume.

Checkpoints written before the grain pipeline hold the thread loader's position in a JSON item
`data` instead of `iterator`; it is read back as the data state, and the loader accepts it (the
plan is the same, so `{epoch, batch_in_epoch}` is the same batch).

Writes are asynchronous (training continues while the arrays stream to disk) and atomic: orbax
writes into a temporary directory and renames it when every process has finished, so a kill
leaves either the complete previous checkpoints or the new one, never half of it; unfinished
temporaries are ignored and cleaned up on the next start. `RUN` may be a bucket URL (`gs://...`):
orbax writes it through tensorstore, and on an object store, where there is no rename, it commits
a checkpoint by writing its `commit_success` marker last; a step without one is not a checkpoint.

Retention: the last `keep` checkpoints, plus the one with the best (lowest) eval WER when one
was given with `metrics={"wer": ...}`.

Restoring takes the *target* shardings (from the current mesh), so a checkpoint written under
`fsdp=8` restores under `data=8` or on one device: orbax reads each shard's slice of the
stored global arrays.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import grain.checkpoint
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from flax_d2v.paths import as_path, is_url

PyTree = Any
ITEMS = ("state", "iterator", "meta")
LEGACY_DATA_ITEM = "data"  # the thread loader's position, JSON (checkpoints from before the grain pipeline)


class SourceState:
    """A data source's state as grain's checkpoint handler takes it (`get_state`/`set_state`).

    The handler writes `get_state()` when orbax saves, possibly on a background thread after the
    loop has moved on: this holds the state as it was when the checkpoint was asked for.
    """

    def __init__(self, state: Mapping[str, Any] | None = None) -> None:
        self.state = dict(state or {})

    def get_state(self) -> bytes:
        return json.dumps(self.state, sort_keys=True).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:  # the handler calls it after set_state; the source starts itself
        pass


class Checkpointer:
    """A thin layer over `ocp.CheckpointManager` with the three items above."""

    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int = 3,
        keep_best: int = 1,
        async_save: bool = True,
        best_metric: str = "wer",
    ) -> None:
        # a bucket URL goes to orbax as it is (tensorstore writes gs:// itself, with the same atomic commit)
        self.directory = os.fspath(directory) if is_url(directory) else os.path.abspath(os.fspath(directory))
        self.best_metric = best_metric
        policies: list[pp.PreservationPolicy] = [pp.LatestN(n=max(keep, 1))]
        if keep_best > 0:
            policies.append(
                pp.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    reverse=True,
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS + (LEGACY_DATA_ITEM,))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(
        self, step: int, state: PyTree, data_state: dict, meta: dict, metrics: dict | None = None, force: bool = True
    ) -> bool:
        """Start writing checkpoint `step` (async); returns whether a save was started."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            iterator=grain.checkpoint.CheckpointSave(SourceState(data_state)),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, metrics=metrics, force=force)

    def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict, dict]:
        """(state, data_state, meta) of checkpoint `step`, laid out as `abstract_state`'s shardings.

        `abstract_state` is a tree of `jax.ShapeDtypeStruct` with `sharding` set (see
        `loop.abstract_state`); any mesh works, not only the one that saved.
        """
        iterator_dir = as_path(self.directory) / str(step) / "iterator"  # a local path or a bucket URL
        box = SourceState()
        data: dict[str, Any] = {"iterator": grain.checkpoint.CheckpointRestore(box)}
        if not iterator_dir.is_dir():
            data = {LEGACY_DATA_ITEM: ocp.args.JsonRestore()}
        elif not (iterator_dir / _process_file()).is_file():
            data = {}  # written by another process count: every process's position is the same
            box.state = _any_process_state(iterator_dir)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore(), **data)
        out = self.manager.restore(step, args=args)
        data_state = dict(out[LEGACY_DATA_ITEM] or {}) if LEGACY_DATA_ITEM in data else box.state
        return out["state"], data_state, dict(out["meta"] or {})

    def restore_meta(self, step: int) -> dict:
        """Only the `meta` item of checkpoint `step` (cheap; read before the state to check the settings)."""
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"] or {})

    def wait(self) -> None:
        """Block until the last save is on disk (before exiting, or before reading it back)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _process_file() -> str:
    """The file grain's handler writes for this process."""
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _any_process_state(directory: Any) -> dict[str, Any]:
    files = sorted(directory.glob("process_*-of-*.json"), key=str)
    if not files:
        return {}
    return json.loads(files[0].read_text(encoding="utf-8"))


def abstract_like(tree: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
