"""CTC transcription of audio files: one `path<TAB>transcript` line per file (or JSON lines).

Any format soundfile reads, at any sample rate (resampled to 16 kHz with soxr), mono or not
(averaged), of any length (chunked with overlapping strides). Bad files are reported on stderr,
one line each; the others are still transcribed and the exit status is 1 at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from flax_d2v.api.transcribe import DEFAULT_BATCH_SIZE, DEFAULT_CHUNK_LENGTH_S, DEFAULT_PRECISION, Transcriber
from flax_d2v.errors import D2VError
from flax_d2v.precision import add_argument as add_precision_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="audio files (WAV, FLAC, Ogg, ...)")
    parser.add_argument(
        "--model",
        required=True,
        metavar="M",
        help="CTC checkpoint: flax-d2v or transformers directory (with vocab.json), or hub id",
    )
    parser.add_argument(
        "--json", action="store_true", help='print JSON lines {"path", "text", "seconds"} instead of path<TAB>text'
    )
    parser.add_argument(
        "--timestamps",
        action="store_true",
        help='add "words": [{"word", "start", "end"}] in seconds, from CTC frame offsets (implies --json)',
    )
    parser.add_argument(
        "--strict-audio",
        action="store_true",
        help="refuse files that are not 16 kHz mono instead of resampling / averaging them",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or throughput line on stderr")
    add_decoding_arguments(parser)


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Batching, chunking, decoding (greedy, beam, n-gram LM) and precision: `d2v transcribe`'s, shared
    with `d2v evaluate` so that a WER it reports is of the transcripts `d2v transcribe` gives."""
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="chunks per forward pass (default: %(default)s)"
    )
    parser.add_argument(
        "--chunk-length-s",
        type=float,
        default=DEFAULT_CHUNK_LENGTH_S,
        help="recordings longer than this many seconds are cut into overlapping chunks; 0 = never "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--stride-length-s",
        type=float,
        default=None,
        help="overlap on each side of a chunk whose logits are dropped "
        "(default: chunk length / 6, as transformers' ASR pipeline)",
    )
    parser.add_argument(
        "--beam-width",
        type=int,
        default=0,
        metavar="N",
        help="0 or 1: greedy decoding (= Wav2Vec2CTCTokenizer.decode) unless an LM is used; > 1: "
        "beam search (flashlight-text: pip install 'flax-d2v[lm]'; default with an LM: 100)",
    )
    lm = parser.add_argument_group("n-gram language model (pip install 'flax-d2v[lm]')")
    lm.add_argument(
        "--lm",
        default=None,
        metavar="LM",
        help="KenLM n-gram (.arpa, .arpa.gz or KenLM .bin) fused word by word into the beam search "
        "(default: the model directory's language_model/, as transformers' Wav2Vec2ProcessorWithLM)",
    )
    lm.add_argument("--no-lm", action="store_true", help="ignore the model directory's language_model/")
    lm.add_argument(
        "--lexicon",
        default=None,
        metavar="FILE",
        help="words the beams may spell, one per line (default: the LM's unigrams)",
    )
    lm.add_argument(
        "--lexicon-free",
        action="store_true",
        default=None,
        help="the LM is over the model's characters ('|' = word break), not words "
        "(detected automatically for an ARPA file)",
    )
    lm.add_argument(
        "--lm-weight",
        type=float,
        default=None,
        metavar="A",
        help="score = CTC log-prob + A * log10 LM prob + B per word (default A=2, or a model's alpha x ln 10)",
    )
    lm.add_argument(
        "--word-score", type=float, default=None, metavar="B", help="B above (default -1, or a model's beta)"
    )
    parser.add_argument(
        "--skip-special-tokens",
        action="store_true",
        help="drop <s>, </s>, <unk> like decode(skip_special_tokens=True) (this also drops the "
        "blank before repeats merge, as transformers does)",
    )
    add_precision_argument(parser, DEFAULT_PRECISION, "TF32 on GPU; CTC argmax does not move with it")


def make_transcriber(model: str, args: argparse.Namespace, warn: Callable[[str], None]) -> Transcriber:
    """The `Transcriber` of `add_decoding_arguments`' flags."""
    if args.no_lm and args.lm:
        raise D2VError("--lm and --no-lm: give one or the other")
    return Transcriber(
        model,
        batch_size=args.batch_size,
        chunk_length_s=args.chunk_length_s,
        stride_length_s=args.stride_length_s,
        beam_width=args.beam_width,
        lm=False if args.no_lm else args.lm,
        skip_special_tokens=args.skip_special_tokens,
        lexicon=args.lexicon,
        lexicon_free=args.lexicon_free,
        lm_weight=args.lm_weight,
        word_score=args.word_score,
        warn=warn,
        precision=args.precision,
    )


def run(args: argparse.Namespace) -> int:
    def warn(message: str) -> None:
        print(f"d2v transcribe: {message}", file=sys.stderr, flush=True)

    as_json = args.json or args.timestamps
    runner = make_transcriber(args.model, args, warn)
    failed = 0
    for result in runner.iter(args.files, strict_audio=args.strict_audio, warn=warn, progress=not args.no_progress):
        if result.error is not None:
            failed += 1
            continue
        if as_json:
            line = json.dumps(result.to_json(timestamps=args.timestamps), ensure_ascii=False)
        else:
            line = f"{result.path}\t{result.text}"
        print(line, flush=True)
    return 1 if failed else 0
