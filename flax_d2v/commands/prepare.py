"""Pack a manifest's clips into ArrayRecord shards plus an index, for `--train OUT_DIR` / `--eval OUT_DIR`.

    d2v prepare train.tsv data/train [--shards N] [--format flac|pcm16] [--strict]
    d2v finetune --train data/train --eval data/dev ...          # reads the shards instead of the files

MANIFEST is anything `--train` takes (TSV, fairseq NAME.tsv with .ltr/.wrd, `tfds:NAME/SPLIT`).
Each clip is resampled to 16 kHz and stored as 16-bit PCM (`pcm16`, the default: read back with no
decoding) or FLAC (about half the bytes, a cheap decode), with its transcript, its other TSV
columns and its length. A clip that does not load is named in one line and skipped (`--strict`:
refused, nothing written). OUT_DIR appears only when complete. See `flax_d2v.train.prepare`.
"""

from __future__ import annotations

import argparse
import json

from flax_d2v.train.prepare import prepare
from flax_d2v.train.shards import AUDIO_FORMATS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", metavar="MANIFEST", help="TSV, fairseq manifest or tfds:NAME/SPLIT")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the shard directory to write (must not exist, or be empty)")
    p.add_argument("--shards", type=int, default=None, help="number of shards (default: one per 2048 clips)")
    p.add_argument("--format", choices=AUDIO_FORMATS, default="pcm16", help="audio in the records (default pcm16)")
    p.add_argument("--strict", action="store_true", help="refuse a clip that does not load instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists (once the new one is done)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    report = prepare(
        args.manifest,
        args.out_dir,
        shards=args.shards,
        audio=args.format,
        strict=args.strict,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    print(json.dumps({"out": args.out_dir, **report}))
    return 0
