"""d2v similarity A.wav B.wav --model M: the cosine similarity of two recordings' x-vectors.

M is an x-vector model (transformers' `Data2VecAudioForXVector`). Prints one number in [-1, 1];
higher means more alike (the same speaker, for a speaker-verification model).
"""

from __future__ import annotations

import argparse

from flax_d2v.api.classify import Classifier, cosine
from flax_d2v.errors import D2VError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A", help="first audio file")
    p.add_argument("b", metavar="B", help="second audio file")
    p.add_argument("--model", required=True, metavar="M", help="x-vector checkpoint (flax-d2v or transformers dir)")
    p.add_argument("--strict-audio", action="store_true", help="refuse audio that is not 16 kHz mono")


def run(args: argparse.Namespace) -> int:
    errors: list[str] = []
    # one clip per batch: each embedding is the clip's alone
    a, b = Classifier(args.model, batch_size=1).embed(
        [args.a, args.b], strict_audio=args.strict_audio, warn=errors.append
    )
    for r in (a, b):
        if r.error is not None:
            raise D2VError(r.error)
    print(f"{cosine(a.embedding, b.embedding):.6f}")
    return 0
