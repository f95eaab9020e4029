"""WER and CER of a CTC model over a whole split (TSV, fairseq, tfds or a `datasets` split).

    d2v evaluate facebook/data2vec-audio-base-960h --data hf:librispeech_asr:clean:test --out results.tsv
    d2v evaluate RUN/hf --data dev.tsv --lm 4-gram.arpa --batch-size 8

The clips are transcribed as `d2v transcribe` does (the same flags: batching, chunking, greedy or
beam search with an n-gram LM) and scored as `d2v finetune --eval` scores them
(`flax_d2v.train.evaluation`): references and hypotheses normalised alike (`--normalize`, by
default the rule `d2v finetune` trains on), corpus WER/CER = edits summed over all utterances /
reference words or characters. The summary goes to stdout; `--out` writes one TSV row per utterance
(reference, hypothesis, their edit counts), atomically.
"""

from __future__ import annotations

import argparse
import sys

from flax_d2v.audio import SAMPLE_RATE
from flax_d2v.commands.transcribe import add_decoding_arguments, make_transcriber
from flax_d2v.fileio import atomic_write_text
from flax_d2v.train import evaluation
from flax_d2v.train.hf_datasets import TEXT_COLUMNS
from flax_d2v.train.manifests import read_manifest

TSV_COLUMNS = ("index", "path", "reference", "hypothesis", "words", "word_errors", "chars", "char_errors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="CTC model: flax-d2v or transformers directory, hub id, .pt")
    parser.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help="the split: TSV (path, text), fairseq .tsv(+.ltr/.wrd), tfds:NAME/SPLIT, hf:NAME[:CONFIG]:SPLIT, "
        "a save_to_disk directory, or parquet files",
    )
    parser.add_argument("--out", metavar="TSV", help="per-utterance results: " + ", ".join(TSV_COLUMNS))
    parser.add_argument(
        "--normalize",
        choices=tuple(evaluation.NORMALIZATIONS),
        default=evaluation.DEFAULT_NORMALIZATION,
        help="text normalisation of references and hypotheses (default: %(default)s, what d2v finetune trains on)",
    )
    parser.add_argument("--audio-column", default="audio", help="Audio column of a datasets split (default: audio)")
    parser.add_argument(
        "--text-column",
        default=None,
        help=f"transcript column of a datasets split (default: the first of {', '.join(TEXT_COLUMNS)})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_decoding_arguments(parser)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.1f} s"


def _cell(text: str) -> str:
    return " ".join(text.split())  # one TSV field: no tabs or newlines


def run(args: argparse.Namespace) -> int:
    def warn(message: str) -> None:
        print(f"d2v evaluate: {message}", file=sys.stderr, flush=True)

    manifest = read_manifest(args.data, require_text=True, audio_column=args.audio_column, text_column=args.text_column)
    runner = make_transcriber(args.model, args, warn)
    clips = len(evaluation.eval_positions(manifest))
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=clips, unit="clip", desc="evaluate", disable=None, leave=False)
    try:
        result = evaluation.evaluate(runner, manifest, args.normalize, on_slice=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    rows = result.utterances
    words, word_errors = sum(u.words for u in rows), sum(u.word_errors for u in rows)
    chars, char_errors = sum(u.chars for u in rows), sum(u.char_errors for u in rows)
    beam = runner.beam
    decoding = "greedy" if beam is None else f"beam search, width {runner.beam_width}"
    if beam is not None and beam.lm_path is not None:
        decoding += f", LM {beam.lm_path} (lm_weight {beam.lm_weight:g}, word_score {beam.word_score:g})"
    chunk_s = runner.plan.chunk_len / SAMPLE_RATE
    chunking = f"clips over {chunk_s:g} s in chunks" if runner.plan.chunk_len else "no chunking"
    skipped = len(manifest) - clips
    lines = [
        ("model", str(args.model)),
        (
            "data",
            f"{args.data}: {clips} utterances, {_duration(result.seconds)} of audio"
            + (f" ({skipped} clips without a transcript or too short left out)" if skipped else ""),
        ),
        ("decoding", f"{decoding}; batch size {runner.batch_size}, {chunking}"),
        ("normalize", f"{args.normalize}: {evaluation.NORMALIZATIONS[args.normalize][1]}"),
        ("WER", f"{100 * result.metrics['wer']:.2f}%  ({word_errors} errors / {words} words)"),
        ("CER", f"{100 * result.metrics['cer']:.2f}%  ({char_errors} errors / {chars} characters)"),
    ]
    for key, value in lines:
        print(f"{key:<10} {value}")
    if args.out:
        body = "".join(
            "\t".join(
                str(v)
                for v in (u.index, u.path, _cell(u.reference), _cell(u.hypothesis))
                + (u.words, u.word_errors, u.chars, u.char_errors)
            )
            + "\n"
            for u in rows
        )
        atomic_write_text(args.out, "\t".join(TSV_COLUMNS) + "\n" + body)
        print(f"{'wrote':<10} {args.out} ({len(rows)} utterances)")
    return 0
