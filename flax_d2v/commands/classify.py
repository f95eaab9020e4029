"""Audio classification of files: one `path<TAB>label<TAB>score` line per file (or JSON lines).

Labels come from the model's `id2label`, scores are softmax probabilities. `--top-k K` prints the K
best labels of each file, one line each, best first. A frame-classification model needs `--frames`,
which prints `path<TAB>start<TAB>end<TAB>label<TAB>score` for each run of frames with the same best
label (times in seconds). Audio is read as `d2v transcribe` reads it; bad files are reported on
stderr, one line each, the others are still classified and the exit status is 1 at the end.
"""

from __future__ import annotations

import argparse
import json
import sys

from flax_d2v.api.classify import Classifier
from flax_d2v.api.transcribe import DEFAULT_BATCH_SIZE
from flax_d2v.errors import D2VError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="audio files (WAV, FLAC, Ogg, ...)")
    parser.add_argument(
        "--model",
        required=True,
        metavar="M",
        help="a sequence-classification, frame-classification or x-vector checkpoint "
        "(flax-d2v or transformers directory, or hub id)",
    )
    parser.add_argument("--top-k", type=int, default=1, help="labels per file, best first (default: %(default)s)")
    parser.add_argument(
        "--json",
        action="store_true",
        help='print JSON lines {"path", "seconds", "labels": [{"label", "score"}]} '
        '(with --frames: "segments": [{"start", "end", "label", "score"}])',
    )
    parser.add_argument(
        "--frames", action="store_true", help="frame classification: time-stamped segments of equal labels"
    )
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="clips per forward pass (default: %(default)s)"
    )
    parser.add_argument(
        "--strict-audio",
        action="store_true",
        help="refuse files that are not 16 kHz mono instead of resampling / averaging them",
    )


def run(args: argparse.Namespace) -> int:
    def warn(message: str) -> None:
        print(f"d2v classify: {message}", file=sys.stderr, flush=True)

    runner = Classifier(args.model, batch_size=args.batch_size, top_k=args.top_k)
    if runner.is_frames and not args.frames:
        raise D2VError(f"{args.model}: a frame-classification model: add --frames for its time-stamped segments")
    if args.frames and not runner.is_frames:
        raise D2VError(
            f"--frames: {args.model} is a {type(runner.module).__name__}, not a frame-classification "
            "model (Data2VecAudioForAudioFrameClassification)"
        )
    failed = 0
    for r in runner.iter(args.files, strict_audio=args.strict_audio, warn=warn):
        if r.error is not None:
            failed += 1
            continue
        if args.json:
            print(json.dumps(r.to_json(), ensure_ascii=False), flush=True)
        elif args.frames:
            for g in r.segments or ():
                print(f"{r.path}\t{g.start:.2f}\t{g.end:.2f}\t{g.label}\t{g.score:.4f}", flush=True)
        else:
            for label, score in r.labels:
                print(f"{r.path}\t{label}\t{score:.4f}", flush=True)
    return 1 if failed else 0
