"""The `d2v` command: one subcommand per module in `flax_d2v.commands`.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`. Errors in the
user's input are raised as `D2VError` and printed here as one line (no traceback), with exit
status 2 for bad usage and the command's own status otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
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
    "evaluate": ("evaluate", "WER and CER of a CTC model over a whole split (TSV, fairseq, tfds, datasets)"),
    "classify": ("classify", "audio / frame classification of audio files (label and score per file)"),
    "similarity": ("similarity", "cosine similarity of two recordings' x-vectors"),
    "finetune": ("finetune", "fine-tuning: CTC from transcripts, audio classification or x-vectors (--task)"),
    "pretrain": ("pretrain", "data2vec pretraining (masked student, EMA teacher)"),
    "prepare": ("prepare", "pack a manifest's clips into ArrayRecord shards for --train / --eval"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `d2v` parser; only the subcommand named in `argv` imports its module (and its flags), so
    `d2v --help` and each command start without loading the others (the training stack included)."""
    words = sys.argv[1:] if argv is None else argv
    chosen = next((w for w in words if not w.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="d2v", description="data2vec-audio in JAX/Flax")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if importlib.util.find_spec(f"flax_d2v.commands.{module_name}") is None:
            continue  # subcommand not built in this version
        if name != chosen:
            sub.add_parser(name, help=help_text, description=help_text)
            continue
        module = importlib.import_module(f"flax_d2v.commands.{module_name}")
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().split("\n")[0])
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
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
