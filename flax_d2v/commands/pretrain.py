"""data2vec pretraining: a masked student regresses its EMA teacher; checkpoints, metrics.jsonl, RUN/hf.

    d2v pretrain --train clips.tsv --out runs/pt --steps 400000 --batch-size 64 --preset base
    d2v pretrain --train clips.tsv --out runs/pt2 --steps 1000 --batch-size 8 --model runs/pt/flax

Defaults are fairseq's `examples/data2vec/config/audio/pretraining/base_librispeech.yaml`. The
manifest needs only a `path` column. Start from scratch (`--preset tiny|base|large`, or `--model`
a config.json), from an HF or flax-d2v model (`--model DIR`: the teacher starts as a copy of the
student, `final_proj` fresh), or from a fairseq pretrained `.pt` / a flax-d2v dir with
`flax_aux.safetensors` (teacher and `final_proj` taken from it). Running the same command again
with the same `--out` resumes from the latest checkpoint in `RUN/checkpoints`.

Writes `RUN/metrics.jsonl` (step, loss, lr, grad_norm, ema_decay, target_var, pred_var, ...),
`RUN/training_curves.png`, `RUN/hf/` (the student as a transformers `Data2VecAudioModel`, ready
for `d2v finetune --model RUN/hf`) and `RUN/flax/` (student + `flax_aux.safetensors` with the
teacher and `final_proj`, to continue pretraining from).

`--arch data2vec2` pretrains data2vec 2.0 and writes `RUN/flax`. Settings left unset take the starting
checkpoint's fairseq cfg (its objective, `clip_norm`, composite optimizer), then fairseq's yaml for the model's
size (`v2/large_audio_only_task.yaml` or `v2/base_audio_only_task.yaml`: `flax_d2v.train.recipes`); the run logs
which came from the checkpoint and which flags overrode it. The other architecture's settings are refused.

Every setting of the recipe (`flax_d2v.train.recipes.PretrainConfig`) is a flag; `--config run.json`
reads the same keys from a JSON object (flags given on the command line win), as for `d2v finetune`.
`--config tiny` or `--config model-config.json` (the model, as before) still works, with a note.
The run itself is `flax_d2v.train.pretrain` (`train/pretrain_run.py`).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from flax_d2v import train
from flax_d2v.commands.flags import add_settings_arguments, settings_from_args
from flax_d2v.train.recipes import PretrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_settings_arguments(p, PretrainConfig)


def resolve(args: argparse.Namespace | Mapping[str, Any]) -> PretrainConfig:
    """Defaults < --config file < command-line flags, validated (the architecture's defaults not yet filled)."""
    return settings_from_args(args, PretrainConfig)


def run(args: argparse.Namespace) -> int:
    train.pretrain(resolve(args))
    return 0
