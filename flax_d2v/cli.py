"""The `d2v` command: one subcommand per module in `flax_d2v.commands`.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`. Errors in the
user's input are raised as `D2VError` and printed here as one line (no traceback), with exit
status 2 for bad usage and the command's own status otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from flax_d2v import compile_cache
from flax_d2v.errors import D2VError

# name -> (module under flax_d2v.commands, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "build a base checkpoint locally, convert it, verify it on the bundled clip"),
    "convert": ("convert", "convert HF / fairseq checkpoints to Flax, or Flax back to HF (--to hf)"),
    "verify": ("verify", "layer-by-layer parity report: Flax against PyTorch on real audio"),
    "embed": ("embed", "hidden states of any layer as .npz"),
    "transcribe": ("transcribe", "CTC transcription of audio files"),
    "classify": ("classify", "audio / frame classification of audio files (label and score per file)"),
    "similarity": ("similarity", "cosine similarity of two recordings' x-vectors"),
    "finetune": ("finetune", "fine-tuning: CTC from transcripts, audio classification or x-vectors (--task)"),
    "pretrain": ("pretrain", "data2vec pretraining (masked student, EMA teacher)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2v", description="data2vec-audio in JAX/Flax")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(f"flax_d2v.commands.{module_name}")
        except ModuleNotFoundError as e:
            if e.name != f"flax_d2v.commands.{module_name}":
                raise
            continue  # subcommand not built in this version
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().split("\n")[0])
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    compile_cache.enable()  # a second run reads its compiled programs back (flax_d2v/compile_cache.py)
    try:
        return int(args._run(args) or 0)
    except D2VError as e:
        print(f"d2v {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"d2v {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
