"""What `d2v finetune` and `d2v pretrain` share: one loop, two objectives.

Both commands drive the same `Trainer` (`train/loop.py`), so the flags of the run (steps, batch
size, checkpoints, logging), of the optimiser and its schedule, of the compute (bf16, remat,
scan), of the data loader and of the scale-out (mesh, pmap, jax.distributed) are defined once,
here, together with the code that turns them into a mesh, a loader, a schedule, an optax chain and
a `LoopConfig`. A command adds the flags of its objective and passes its *recipe*: the defaults
that differ between fine-tuning and pretraining (fairseq's `base_960h` vs `base_librispeech`
configs):

    key                     finetune      pretrain
    learning_rate           (required)    5e-4
    phase_ratio             0.1,0.4,0.5   0.03,0.9,0.07
    final_lr_scale          0.05          0.01
    adam_eps                1e-8          1e-6
    weight_decay            0             0.01
    freeze_feature_encoder  on            off
    min_seconds             (none)        2

The differences between the commands that are on purpose, and stay in the commands:

- `--config`: for finetune a JSON *settings file* holding any of its flags (flags given on the
  command line win; `finetune.resolve`), so every shared flag is registered with
  `settings_file=True` (argparse leaves unset flags absent and `resolve` fills the defaults); for
  pretrain it is the *model* to initialise randomly (a preset or a transformers config.json),
  the alternative to `--model`, and the flags carry plain argparse defaults.
- Evaluation (`--eval`, `--eval-every`, `--eval-batch-size`, best checkpoint by WER) and
  `--freeze-transformer-steps` exist only for fine-tuning; pretraining has no labels to score and
  no head to train first.
- Regularisation: finetune keeps the init model's config unless told (its `--dropout` sets every
  dropout and LayerDrop, HF style); pretrain defaults to fairseq's base recipe (its `--dropout` sets hidden,
  attention and activation dropout). Each command defines these flags itself.
- `--export-hf` writes RUN/hf (finetune) or RUN/hf and RUN/flax with the teacher (pretrain).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flax_d2v.errors import D2VError

# Defaults the two commands agree on. A shared key missing here and from a command's recipe is a
# required flag (steps, batch_size; learning_rate for finetune).
COMMON_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "save_every": 1000,
    "keep": 3,
    "log_every": 10,
    "tensorboard": False,
    "progress": True,
    "async_checkpoint": True,
    "lr_schedule": "tri_stage",
    "warmup_steps": None,
    "hold_steps": None,
    "decay_steps": None,
    "init_lr_scale": 0.01,
    "adam_b1": 0.9,
    "adam_b2": 0.98,
    "clip_norm": 0.0,
    "grad_accum": 1,
    "precision": None,
    "bf16": False,
    "remat": "none",
    "scan_layers": False,
    "min_seconds": None,
    "max_seconds": None,
    "num_workers": 4,
    "mesh": None,
    "pmap": False,
    "coordinator": None,
    "num_processes": None,
    "process_id": None,
}

GROUP_TITLES = {
    "run": "run",
    "optimisation": "optimisation (fairseq names in brackets)",
    "compute": "compute",
    "data": "data",
    "scale-out": "scale-out",
}
_BOOL = argparse.BooleanOptionalAction
# (group, flag, add_argument keywords, help). The default of the command is appended to the help, so a
# recipe value is written in one place (RECIPE of the command) and shown where it applies.
FLAGS: tuple[tuple[str, str, dict[str, Any], str | None], ...] = (
    ("run", "--steps", {"type": int}, "number of optimizer updates (fairseq max_update)"),
    ("run", "--batch-size", {"type": int}, "clips per update (global, all devices and hosts)"),
    ("run", "--seed", {"type": int}, "seed of init, data order, dropout and masks"),
    ("run", "--save-every", {"type": int}, "checkpoint every K updates"),
    ("run", "--keep", {"type": int}, "most recent checkpoints kept (a run with --eval also keeps its best by WER)"),
    ("run", "--log-every", {"type": int}, "metrics.jsonl row every K updates"),
    ("run", "--tensorboard", {"action": _BOOL}, "also write TensorBoard"),
    ("run", "--progress", {"action": _BOOL}, "progress bar"),
    ("run", "--async-checkpoint", {"action": _BOOL}, "write checkpoints in the background"),
    ("optimisation", "--learning-rate", {"type": float}, "peak learning rate (lr)"),
    (
        "optimisation",
        "--lr-schedule",
        {"choices": ("tri_stage", "linear", "constant", "cosine")},
        "tri_stage (fairseq), linear (HF warmup+decay), constant, cosine (fairseq's, data2vec 2.0)",
    ),
    (
        "optimisation",
        "--warmup-steps",
        {"type": int},
        "warm-up updates (default: from --phase-ratio, or 10%% for linear)",
    ),
    ("optimisation", "--hold-steps", {"type": int}, "tri_stage hold updates (default: from --phase-ratio)"),
    ("optimisation", "--decay-steps", {"type": int}, "tri_stage decay updates (default: from --phase-ratio)"),
    ("optimisation", "--phase-ratio", {}, "tri_stage phases as fractions of --steps"),
    ("optimisation", "--init-lr-scale", {"type": float}, "tri_stage start lr / peak"),
    ("optimisation", "--final-lr-scale", {"type": float}, "tri_stage end lr / peak"),
    ("optimisation", "--adam-b1", {"type": float}, "(adam_betas)"),
    ("optimisation", "--adam-b2", {"type": float}, "(adam_betas)"),
    ("optimisation", "--adam-eps", {"type": float}, None),
    ("optimisation", "--weight-decay", {"type": float}, "AdamW decoupled weight decay, as fairseq's adam"),
    ("optimisation", "--clip-norm", {"type": float}, "clip gradients to this global norm; 0: off"),
    ("optimisation", "--grad-accum", {"type": int}, "split each batch into K sequential micro-batches (update_freq)"),
    (
        "optimisation",
        "--freeze-feature-encoder",
        {"action": _BOOL},
        "keep the conv feature encoder fixed (feature_grad_mult 0)",
    ),
    (
        "compute",
        "--precision",
        {"choices": ("highest", "default", "bf16")},
        "compute precision (flax_d2v.precision): highest = fp32 with HIGHEST matmul/conv precision, default = fp32 at "
        "the platform's default (TF32 on GPU; the default unless --bf16), bf16 = bfloat16 compute, fp32 params",
    ),
    ("compute", "--bf16", {"action": _BOOL}, "same as --precision bf16 (params and the pretraining teacher stay fp32)"),
    ("compute", "--remat", {}, "rematerialisation policy of the layers: none, nothing_saveable, dots_saveable, ..."),
    ("compute", "--scan-layers", {"action": _BOOL}, "nn.scan over the layers (faster compile, params stacked)"),
    ("data", "--min-seconds", {"type": float}, "drop shorter clips (fairseq's pretraining: 2.0)"),
    ("data", "--max-seconds", {"type": float}, "drop longer clips"),
    ("data", "--num-workers", {"type": int}, "audio decoding threads"),
    (
        "scale-out",
        "--mesh",
        {},
        "device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, tensor; -1 takes the rest); default data=<all devices>",
    ),
    ("scale-out", "--pmap", {"action": _BOOL}, "run the step under jax.pmap (replicated params, pmean'd gradients)"),
    ("scale-out", "--coordinator", {}, "HOST:PORT of process 0 (jax.distributed)"),
    ("scale-out", "--num-processes", {"type": int}, None),
    ("scale-out", "--process-id", {"type": int}, None),
)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_common_arguments(
    parser: argparse.ArgumentParser,
    defaults: Mapping[str, Any],
    *,
    groups: Mapping[str, Any] | None = None,
    settings_file: bool = False,
) -> dict[str, Any]:
    """Register the shared flags; returns the argument groups by key ("run", "optimisation", ...).

    `defaults`: `COMMON_DEFAULTS` plus the command's recipe (the table in the module docstring);
    a shared key absent from it is a required flag. `groups`: groups the command already made (its own flags first);
    the others are created here, in `GROUP_TITLES` order. `settings_file`: the command resolves
    defaults itself (a `--config` settings file may fill any flag), so every flag defaults to
    `argparse.SUPPRESS` and stays absent from the namespace unless given.
    """
    out = dict(groups or {})
    for key, title in GROUP_TITLES.items():
        if key not in out:
            out[key] = parser.add_argument_group(title)
    for group, flag, kwargs, help_text in FLAGS:
        key = flag[2:].replace("-", "_")
        value = defaults.get(key)
        if value is not None:  # "... (note)" -> "... (note; default X)"
            shown = f"default {_shown(value)}"
            if not help_text:
                help_text = shown
            elif help_text.endswith(")"):
                help_text = f"{help_text[:-1]}; {shown})"
            else:
                help_text = f"{help_text} ({shown})"
        if settings_file:
            kw = {"default": argparse.SUPPRESS}
        elif key in defaults:
            kw = {"default": defaults[key]}
        else:
            kw = {"required": True}
        out[group].add_argument(flag, help=help_text, **kw, **kwargs)
    return out


# ------------------------------------------------------------------------------ from settings to parts
def init_distributed(cfg: Mapping[str, Any]) -> None:
    """`jax.distributed.initialize` from the scale-out settings; call it before anything touches a device."""
    from flax_d2v.train import sharding as S

    S.initialize_distributed(cfg["coordinator"], cfg["num_processes"], cfg["process_id"])


def check_sizes(cfg: Mapping[str, Any]) -> None:
    for k in ("steps", "batch_size"):
        if int(cfg[k]) < 1:
            raise D2VError(f"--{k.replace('_', '-')}: must be >= 1, got {cfg[k]}")


def make_mesh(cfg: Mapping[str, Any]) -> tuple[Any, int]:
    """(mesh, data-parallel size); `--batch-size` must split evenly over devices and micro-batches."""
    import jax

    from flax_d2v.train import sharding as S

    check_sizes(cfg)
    mesh = S.make_mesh(None if cfg["pmap"] else cfg["mesh"])
    dp = jax.device_count() if cfg["pmap"] else S.data_parallel_size(mesh)
    batch_size, accum = int(cfg["batch_size"]), int(cfg["grad_accum"])
    if batch_size % (dp * accum):
        raise D2VError(
            f"--batch-size: {batch_size} must be divisible by the data-parallel size {dp} x --grad-accum {accum}"
        )
    return mesh, dp


def train_loader(cfg: Mapping[str, Any], manifest: Any, vocab: dict[str, int] | None) -> Any:
    """The shuffled, repeating training `BatchLoader` of this process (its share of the global batch)."""
    import jax

    from flax_d2v.train.loader import BatchLoader
    from flax_d2v.train.loop import log

    loader = BatchLoader(
        manifest,
        batch_size=int(cfg["batch_size"]),
        vocab=vocab,
        seed=int(cfg["seed"]),
        min_seconds=cfg["min_seconds"],
        max_seconds=cfg["max_seconds"],
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_workers=int(cfg["num_workers"]),
    )
    log(f"train data: {json.dumps(loader.summary())}")
    return loader


def make_schedule_and_optimizer(
    cfg: Mapping[str, Any], params: Any, *, freeze_transformer_steps: int = 0, freeze_base_model: bool = False
) -> tuple[Any, Any]:
    """(lr schedule, optax chain) from the optimisation settings; see `train/state.py` for the groups."""
    from flax_d2v.train.schedules import make_schedule
    from flax_d2v.train.state import make_optimizer

    phase = tuple(float(x) for x in str(cfg["phase_ratio"]).split(","))
    schedule = make_schedule(
        cfg["lr_schedule"],
        float(cfg["learning_rate"]),
        int(cfg["steps"]),
        warmup_steps=cfg["warmup_steps"],
        hold_steps=cfg["hold_steps"],
        decay_steps=cfg["decay_steps"],
        phase_ratio=phase,
        init_lr_scale=float(cfg["init_lr_scale"]),
        final_lr_scale=float(cfg["final_lr_scale"]),
    )
    tx = make_optimizer(
        params,
        schedule,
        b1=float(cfg["adam_b1"]),
        b2=float(cfg["adam_b2"]),
        eps=float(cfg["adam_eps"]),
        weight_decay=float(cfg["weight_decay"]),
        clip_norm=float(cfg["clip_norm"]),
        freeze_feature_encoder=bool(cfg["freeze_feature_encoder"]),
        freeze_transformer_steps=int(freeze_transformer_steps),
        freeze_base_model=bool(freeze_base_model),
    )
    return schedule, tx


def module_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The model's compute keywords (`Data2VecAudioModel` / `...ForCTC`) from the compute settings."""
    from flax_d2v.precision import resolve

    policy = resolve(cfg.get("precision") or ("bf16" if cfg["bf16"] else "default"))
    return {
        **policy.module_kwargs(),
        "remat_policy": cfg["remat"],
        "scan_layers": bool(cfg["scan_layers"]),
        "freeze_feature_encoder": bool(cfg["freeze_feature_encoder"]),
    }


def loop_config(
    cfg: Mapping[str, Any], *, meta: dict[str, Any], eval_every: int = 0, plot_curves: tuple[str, ...] = ("loss",)
) -> Any:
    """The `LoopConfig` of the run in `cfg["out"]`; `meta` is stored in every checkpoint."""
    from flax_d2v.train.loop import LoopConfig

    return LoopConfig(
        out_dir=str(cfg["out"]),
        steps=int(cfg["steps"]),
        grad_accum=int(cfg["grad_accum"]),
        log_every=int(cfg["log_every"]),
        eval_every=int(eval_every),
        save_every=int(cfg["save_every"]),
        keep=int(cfg["keep"]),
        async_checkpoint=bool(cfg["async_checkpoint"]),
        tensorboard=bool(cfg["tensorboard"]),
        use_pmap=bool(cfg["pmap"]),
        progress=bool(cfg["progress"]),
        plot_curves=tuple(plot_curves),
        meta=meta,
    )


# Settings that shape the saved state or the order of the data: a resume with other values is refused
# (`Trainer._check_meta`). Clipping counts only as on/off: its norm can change, its optimizer state cannot.
RESUME_KEYS = ("batch_size", "seed", "min_seconds", "max_seconds", "scan_layers", "freeze_feature_encoder", "clip_norm")
ON_OFF_KEYS = ("clip_norm",)


def resume_settings(cfg: Mapping[str, Any], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """{flag: resolved value} of `RESUME_KEYS` + `extra`, stored in every checkpoint's meta."""
    out: dict[str, Any] = {}
    for key in RESUME_KEYS + tuple(extra):
        value = cfg.get(key)
        flag = "--" + key.replace("_", "-")
        out[flag] = {"on": bool(value), "value": value} if key in ON_OFF_KEYS else value
    return out


def save_settings(path: Path, cfg: Mapping[str, Any]) -> None:
    """The resolved settings of a run (None values left out), written atomically."""
    from flax_d2v.fileio import atomic_write_text

    atomic_write_text(
        path, json.dumps({k: v for k, v in cfg.items() if v is not None}, indent=2, sort_keys=True) + "\n"
    )


# ------------------------------------------------------------------------------ params
def graft(fresh: dict, loaded: dict | None) -> tuple[dict, list[str], list[str]]:
    """`fresh` with every entry of `loaded` whose path and shape match; (params, new keys, dropped keys)."""
    import numpy as np

    from flax_d2v.params import flatten, unflatten

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


def stacked(cfg: Mapping[str, Any], tree: dict | None) -> dict | None:
    """Per-layer params (as checkpoints hold them) in the layout of the model: stacked under --scan-layers."""
    if tree is None or not cfg["scan_layers"]:
        return tree
    from flax_d2v.params import stack_layers

    return stack_layers(tree)


def host(tree: Any) -> Any:
    """Global (possibly sharded, multi-host) arrays -> numpy on every process."""
    import jax
    import numpy as np

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)
