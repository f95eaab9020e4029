"""Training checkpoints: orbax `CheckpointManager` under `RUN/checkpoints/<step>/`.

Each checkpoint holds three items:
- `state`: the whole `TrainState` (params, optimizer state, objective extra such as the EMA
  teacher, step, rng), written by every process for the shards it owns (orbax/tensorstore), so
  it works for FSDP-sharded and multi-host states alike;
- `data`: the data iterator position (JSON), so a resumed run sees the batches it would have seen;
- `meta`: JSON facts about the run (objective, config, vocab size), checked on resume.

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

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from flax_d2v.paths import is_url

PyTree = Any


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
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

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
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)
        )
        return self.manager.save(step, args=args, metrics=metrics, force=force)

    def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict, dict]:
        """(state, data_state, meta) of checkpoint `step`, laid out as `abstract_state`'s shardings.

        `abstract_state` is a tree of `jax.ShapeDtypeStruct` with `sharding` set (see
        `loop.abstract_state`); any mesh works, not only the one that saved.
        """
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
        )
        out = self.manager.restore(step, args=args)
        return out["state"], dict(out["data"] or {}), dict(out["meta"] or {})

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


def abstract_like(tree: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
