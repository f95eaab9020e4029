"""Fine-tuning (CTC, audio classification, x-vectors): checkpoints, metrics.jsonl, and an HF model in RUN/hf.

    d2v finetune --train train.tsv --eval dev.tsv --model facebook-base-dir --out runs/ft \
        --steps 20000 --batch-size 8 --learning-rate 5e-5 --seed 0 [--mesh data=2,fsdp=4]
    d2v finetune --task audio-classification --train clips.tsv --eval dev.tsv --model base-dir --out runs/cls ...
    d2v finetune --task xvector --train clips.tsv --label-column speaker --model base-dir --out runs/xv ...

`--task audio-classification | xvector` reads a TSV with `path` and a label column, trains
`Data2VecAudioForSequenceClassification` (cross-entropy) or `...ForXVector` (AM-softmax), evaluates
accuracy, and writes the labels as `id2label`/`label2id` (see `flax_d2v.train.classification`).

Every setting of the recipe (`flax_d2v.train.recipes.FinetuneConfig`) is a flag; `--config run.json`
reads the same keys (flag names, `-` or `_`) from a JSON object, and flags given on the command line
win. The resolved settings are written to `RUN/finetune_config.json`. Running the same command again
with the same `--out` resumes from the latest checkpoint in `RUN/checkpoints`. The run itself is
`flax_d2v.train.finetune`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from flax_d2v import train
from flax_d2v.commands.flags import add_settings_arguments, settings_from_args
from flax_d2v.train.recipes import FinetuneConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_settings_arguments(p, FinetuneConfig)


def resolve(args: argparse.Namespace | Mapping[str, Any]) -> FinetuneConfig:
    """Defaults < --config file < command-line flags, validated."""
    return settings_from_args(args, FinetuneConfig)


def run(args: argparse.Namespace) -> int:
    train.finetune(resolve(args))
    return 0
