"""What fine-tuning and pretraining share: one loop, two objectives.

Both recipes (`train/recipes.py`) drive the same `Trainer` (`train/loop.py`); the settings of
the run (steps, batch size, checkpoints, logging), of the optimiser and its schedule, of the
compute (bf16, remat, scan), of the data loader and of the scale-out (mesh, pmap,
jax.distributed) are turned here, once, into a mesh, a loader, a schedule, an optax chain and a
`LoopConfig`. The run assembly of each objective is `train/finetune_run.py` and
`train/pretrain_run.py`; the flags are generated from the recipes by `flax_d2v.commands.flags`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import jax
import numpy as np

from flax_d2v.errors import D2VError
from flax_d2v.fileio import atomic_write_text
from flax_d2v.params import flatten, stack_layers, unflatten
from flax_d2v.paths import AnyPath, as_path, check_writable
from flax_d2v.precision import resolve as resolve_precision
from flax_d2v.train import sharding
from flax_d2v.train.loader import BatchLoader
from flax_d2v.train.loop import LoopConfig, log
from flax_d2v.train.recipes import Settings
from flax_d2v.train.schedules import make_schedule
from flax_d2v.train.state import make_optimizer


# ------------------------------------------------------------------------------ from settings to parts
def init_distributed(cfg: Settings) -> None:
    """`jax.distributed.initialize` from the scale-out settings; call it before anything touches a device."""
    sharding.initialize_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id)


def make_mesh(cfg: Settings) -> tuple[Any, int]:
    """(mesh, data-parallel size); `--batch-size` must split evenly over devices and micro-batches."""
    mesh = sharding.make_mesh(None if cfg.pmap else cfg.mesh)
    dp = jax.device_count() if cfg.pmap else sharding.data_parallel_size(mesh)
    batch_size, accum = int(cfg.batch_size), int(cfg.grad_accum)
    if batch_size % (dp * accum):
        raise D2VError(
            f"--batch-size: {batch_size} must be divisible by the data-parallel size {dp} x --grad-accum {accum}"
        )
    return mesh, dp


MAX_DEFAULT_WORKERS = 8  # the default worker count's cap (`num_workers`)


def num_workers(cfg: Settings) -> int:
    """--num-workers, else one worker process per core beyond the two this process keeps (its
    Python and JAX's dispatch), at most `MAX_DEFAULT_WORKERS`: 0 (load here) on a 2-core machine,
    where a worker process would only take cores from the step."""
    if cfg.num_workers is not None:
        if int(cfg.num_workers) < 0:
            raise D2VError(f"--num-workers: must be >= 0, got {cfg.num_workers}")
        return int(cfg.num_workers)
    return min(MAX_DEFAULT_WORKERS, max(0, len(os.sched_getaffinity(0)) - 2))


def train_loader(
    cfg: Settings, manifest: Any, vocab: dict[str, int] | None, *, eval_batch_size: int | None = None
) -> BatchLoader:
    """This process's `BatchLoader` (its share of each global batch), on grain, workers started.

    Training (default): shuffled, repeating, bucketed by `--num-buckets`/`--bucket-growth`, the
    duration filters on. With `eval_batch_size`: one pass in manifest order, every clip, the last
    batch topped up with filler rows. The one place the runs build their loaders.
    """
    kw: dict[str, Any] = dict(
        process_index=jax.process_index(), process_count=jax.process_count(), num_workers=num_workers(cfg)
    )
    if eval_batch_size is not None:
        return BatchLoader(
            manifest, batch_size=int(eval_batch_size), shuffle=False, repeat=False, drop_remainder=False, **kw
        )
    loader = BatchLoader(
        manifest,
        batch_size=int(cfg.batch_size),
        vocab=vocab,
        seed=int(cfg.seed),
        min_seconds=cfg.min_seconds,
        max_seconds=cfg.max_seconds,
        num_buckets=int(cfg.num_buckets),
        bucket_growth=cfg.bucket_growth,
        **kw,
    )
    log(f"train data: {json.dumps(loader.summary())}")
    return loader.start()  # the workers spawn (seconds each) while the model is built and compiled


def make_schedule_and_optimizer(
    cfg: Settings, params: Any, *, freeze_transformer_steps: int = 0, freeze_base_model: bool = False
) -> tuple[Any, Any]:
    """(lr schedule, optax chain) from the optimisation settings; see `train/state.py` for the groups."""
    phase = tuple(float(x) for x in str(cfg.phase_ratio).split(","))
    schedule = make_schedule(
        cfg.lr_schedule,
        float(cfg.learning_rate),
        int(cfg.steps),
        warmup_steps=cfg.warmup_steps,
        hold_steps=cfg.hold_steps,
        decay_steps=cfg.decay_steps,
        phase_ratio=phase,
        init_lr_scale=float(cfg.init_lr_scale),
        final_lr_scale=float(cfg.final_lr_scale),
    )
    tx = make_optimizer(
        params,
        schedule,
        b1=float(cfg.adam_b1),
        b2=float(cfg.adam_b2),
        eps=float(cfg.adam_eps),
        weight_decay=float(cfg.weight_decay),
        clip_norm=float(cfg.clip_norm),
        freeze_feature_encoder=bool(cfg.freeze_feature_encoder),
        freeze_transformer_steps=int(freeze_transformer_steps),
        freeze_base_model=bool(freeze_base_model),
        weight_decay_exempt=bool(getattr(cfg, "weight_decay_exempt", None)),
    )
    return schedule, tx


def module_options(cfg: Settings | Mapping[str, Any]) -> dict[str, Any]:
    """The model's compute keywords (`Data2VecAudioModel` / `...ForCTC`) from the compute settings."""
    if isinstance(cfg, Mapping):  # {"bf16": ..., "remat": ..., ...}
        cfg = SimpleNamespace(**{"precision": None, **cfg})
    policy = resolve_precision(cfg.precision or ("bf16" if cfg.bf16 else "default"))
    return {
        **policy.module_kwargs(),
        "remat_policy": cfg.remat,
        "scan_layers": bool(cfg.scan_layers),
        "freeze_feature_encoder": bool(cfg.freeze_feature_encoder),
    }


def loop_config(
    cfg: Settings, *, meta: dict[str, Any], eval_every: int = 0, plot_curves: tuple[str, ...] = ("loss",)
) -> LoopConfig:
    """The `LoopConfig` of the run in `cfg.out`; `meta` is stored in every checkpoint."""
    return LoopConfig(
        out_dir=str(cfg.out),
        steps=int(cfg.steps),
        grad_accum=int(cfg.grad_accum),
        log_every=int(cfg.log_every),
        eval_every=int(eval_every),
        save_every=int(cfg.save_every),
        keep=int(cfg.keep),
        async_checkpoint=bool(cfg.async_checkpoint),
        tensorboard=bool(cfg.tensorboard),
        use_pmap=bool(cfg.pmap),
        progress=bool(cfg.progress),
        plot_curves=tuple(plot_curves),
        meta=meta,
    )


# Settings that shape the saved state or the order of the data: a resume with other values is refused
# (`Trainer._check_meta`). Clipping counts only as on/off: its norm can change, its optimizer state cannot.
RESUME_KEYS = (
    "batch_size",
    "seed",
    "min_seconds",
    "max_seconds",
    "num_buckets",
    "bucket_growth",
    "scan_layers",
    "freeze_feature_encoder",
    "clip_norm",
)
ON_OFF_KEYS = ("clip_norm",)


def resume_settings(cfg: Settings, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """{flag: resolved value} of `RESUME_KEYS` + `extra`, stored in every checkpoint's meta."""
    out: dict[str, Any] = {}
    for key in RESUME_KEYS + tuple(extra):
        value = getattr(cfg, key)
        flag = "--" + key.replace("_", "-")
        out[flag] = {"on": bool(value), "value": value} if key in ON_OFF_KEYS else value
    return out


def save_settings(path: str | os.PathLike, cfg: Settings) -> None:
    """The resolved settings of a run (None values left out), written atomically: a `--config` file for a rerun."""
    values = {k: v for k, v in cfg.to_dict().items() if v is not None}
    atomic_write_text(path, json.dumps(values, indent=2, sort_keys=True) + "\n")


def run_dir(cfg: Settings) -> AnyPath:
    """RUN (`--out`): a local directory, or a bucket URL checked for writing at once (every process
    writes its checkpoint shards there), so a missing bucket or credentials fail before any work."""
    check_writable(cfg.out)
    return as_path(cfg.out)


def start_run(cfg: Settings, settings_file: str) -> None:
    """RUN/ and its resolved settings (process 0)."""
    if jax.process_index() == 0:
        as_path(cfg.out).mkdir(parents=True, exist_ok=True)
        save_settings(as_path(cfg.out) / settings_file, cfg)


# ------------------------------------------------------------------------------ params
def graft(fresh: dict, loaded: dict | None) -> tuple[dict, list[str], list[str]]:
    """`fresh` with every entry of `loaded` whose path and shape match; (params, new keys, dropped keys)."""
    f = flatten(fresh)
    if loaded is None:
        return fresh, [], []
    l_flat = flatten(loaded)
    out, new = {}, []
    for k, v in f.items():
        if k in l_flat and tuple(np.shape(l_flat[k])) == tuple(v.shape):
            out[k] = np.asarray(l_flat[k], dtype=np.float32)
        else:
            out[k] = np.asarray(v)
            new.append(k)
    dropped = [k for k in l_flat if k not in f or tuple(np.shape(l_flat[k])) != tuple(f[k].shape)]
    return unflatten(out), new, dropped


def stacked(cfg: Settings, tree: dict | None) -> dict | None:
    """Per-layer params (as checkpoints hold them) in the layout of the model: stacked under --scan-layers."""
    if tree is None or not cfg.scan_layers:
        return tree
    return stack_layers(tree)


def host(tree: Any) -> Any:
    """Global (possibly sharded, multi-host) arrays -> numpy on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # only multi-host runs need it

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)
