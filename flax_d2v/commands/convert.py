"""d2v convert SRC DST [--to hf]: transformers / fairseq checkpoints to Flax, and Flax back to transformers.

SRC is an HF directory (config.json + model.safetensors or pytorch_model.bin), a fairseq `.pt`,
or (with --to hf) a flax-d2v directory. DST must be empty or absent unless --overwrite; it is
built in a temporary directory and renamed at the end, so it is never half-written. Either may be
a bucket URL (`gs://bucket/model`): SRC is downloaded, DST uploaded with its weights file last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flax_d2v.checkpoint import is_flax_dir, load_flax, save_flax
from flax_d2v.convert.fairseq import aux_note, convert_fairseq
from flax_d2v.convert.fairseq2 import export_fairseq2
from flax_d2v.convert.hf import is_hf_dir, load_hf, save_hf
from flax_d2v.errors import D2VError
from flax_d2v.heads import detect
from flax_d2v.paths import is_url, localize


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="HF model dir, fairseq .pt, or (with --to hf) flax-d2v dir")
    p.add_argument("dst", help="output directory")
    p.add_argument(
        "--to",
        choices=["flax", "hf", "fairseq"],
        default="flax",
        help="output format (default: flax; fairseq: a data2vec 2.0 directory back to a fairseq .pt)",
    )
    p.add_argument(
        "--dict",
        dest="dict_path",
        default=None,
        help="fairseq dict.ltr.txt for a fine-tuned .pt (default: the one beside the .pt)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")


def run(args: argparse.Namespace) -> int:
    if is_url(args.src):  # a bucket URL: read from a local copy (SRC and DST may both be URLs)
        src = Path(localize(args.src))
    else:
        src = Path(args.src)
    if not src.exists():
        raise D2VError(f"{src}: no such file or directory")
    if args.dict_path is not None:
        args.dict_path = localize(args.dict_path)
    if args.to == "flax":
        if src.is_file() and src.suffix == ".pt":
            result = convert_fairseq(src, args.dst, dict_path=args.dict_path, overwrite=args.overwrite)
            for note in result.notes:
                print(note, file=sys.stderr)
        elif src.is_dir() and is_hf_dir(src):
            config, _, params = load_hf(src)
            save_flax(args.dst, config, params, files_from=src, overwrite=args.overwrite)
        elif src.is_dir() and is_flax_dir(src):
            raise D2VError(f"{src}: already a flax-d2v directory (use --to hf to export it)")
        else:
            raise D2VError(
                f"{src}: not a transformers model directory or fairseq .pt "
                "(expected config.json with model.safetensors or pytorch_model.bin)"
            )

        config, params = load_flax(args.dst)  # read back what was written (a URL: downloaded again)
        kind = detect(params).architecture
        if type(config).__name__ == "Data2Vec2Config":  # data2vec 2.0: its own classes, CTC or bare
            kind = "Data2Vec2ForCTC" if "lm_head" in params else "Data2Vec2Model"
        print(f"wrote flax-d2v checkpoint ({kind}) to {args.dst}")
        return 0
    if not (src.is_dir() and is_flax_dir(src)):
        raise D2VError(f"{src}: --to {args.to} needs a flax-d2v directory (with flax_model.safetensors)")
    if args.to == "fairseq":
        for note in export_fairseq2(src, args.dst, overwrite=args.overwrite):
            print(note, file=sys.stderr)
        print(f"wrote fairseq checkpoint to {args.dst}")
        return 0
    config, params = load_flax(src)
    if type(config).__name__ == "Data2Vec2Config":
        raise D2VError(f"{src}: data2vec 2.0 has no transformers class; export it with --to fairseq")
    save_hf(args.dst, config, params, files_from=src, overwrite=args.overwrite)

    note = aux_note(src)
    if note:
        print(note, file=sys.stderr)
    print(f"wrote transformers checkpoint to {args.dst}")
    return 0
