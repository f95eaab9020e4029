"""Training: the fine-tuning and pretraining recipes and their runs.

    from flax_d2v import train
    train.finetune(train.FinetuneConfig(train="train.tsv", model="base-dir", out="runs/ft",
                                        steps=20000, batch_size=8, learning_rate=5e-5))
    train.pretrain(train.PretrainConfig(train="clips.tsv", preset="base", out="runs/pt",
                                        steps=400000, batch_size=64))

The recipes (`recipes.py`) are typed dataclasses; `d2v finetune` and `d2v pretrain` are argparse in
front of these two functions, which also take a plain mapping of settings. The runs themselves are
`finetune_run.py` and `pretrain_run.py` (on `run_common.py` and `loop.py`); the objectives they
train are `objective.py` (CTC), `classification.py`, `data2vec_objective.py` (data2vec 1.0) and
`data2vec2_objective.py` (2.0). Importing `flax_d2v.train` loads the training stack; inference
(`flax_d2v.transcribe`, `classify`, `from_pretrained`) never imports it.
"""

from __future__ import annotations

from flax_d2v.train.finetune_run import finetune
from flax_d2v.train.pretrain_run import pretrain
from flax_d2v.train.recipes import FinetuneConfig, PretrainConfig

__all__ = ["FinetuneConfig", "PretrainConfig", "finetune", "pretrain"]
