"""Training: the fine-tuning and pretraining recipes and their runs.

    from flax_d2v import train
    train.finetune(train.FinetuneConfig(train="train.tsv", model="base-dir", out="runs/ft",
                                        steps=20000, batch_size=8, learning_rate=5e-5))
    train.pretrain(train.PretrainConfig(train="clips.tsv", preset="base", out="runs/pt",
                                        steps=400000, batch_size=64))

The recipes (`recipes.py`) are typed dataclasses; `d2v finetune` and `d2v pretrain` are argparse in
front of these two functions, which also take a plain mapping of settings. The runs themselves
(`finetune_run.py`, `pretrain_run.py`, on `run_common.py`, `loop.py`) load when a run starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Imported before `pretrain` is defined below: the objective's submodule `flax_d2v.train.pretrain` shares the
# entry point's name, and a submodule imported later would rebind the package attribute (as in flax_d2v/__init__).
import flax_d2v.train.pretrain  # noqa: F401
from flax_d2v.train.recipes import FinetuneConfig, PretrainConfig

__all__ = ["FinetuneConfig", "PretrainConfig", "finetune", "pretrain"]


def finetune(cfg: FinetuneConfig | Mapping[str, Any]) -> Any:
    """Fine-tune (CTC, audio classification or x-vectors, by `cfg.task`); returns the loop's `FitResult`."""
    from flax_d2v.train.finetune_run import run  # the training stack loads when a run starts

    return run(cfg)


def pretrain(cfg: PretrainConfig | Mapping[str, Any]) -> Any:
    """data2vec 1.0 or 2.0 pretraining (by `cfg.arch`); returns the loop's `FitResult`."""
    from flax_d2v.train.pretrain_run import pretrain as run

    return run(cfg)
