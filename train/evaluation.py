"""WER and CER of a CTC model over a whole split: what `d2v finetune`'s eval and `d2v evaluate` share.

    runner = Transcriber("RUN/hf", batch_size=8)               # d2v transcribe's batching and chunking
    result = evaluate(runner, read_manifest("dev.tsv", require_text=True))
    result.metrics                                             # {"wer", "cer", "eval_clips"}
    result.utterances[0]                                       # reference, hypothesis, errors of one clip

One path for both, so the WER `d2v evaluate RUN/hf --data SPLIT` prints is the number `d2v
finetune --eval SPLIT` logged for the same weights:

- the clips kept are `eval_positions` (every clip with a transcript that the encoder gives a frame);
- they are read through the manifest `SLICE_CLIPS` at a time and transcribed by a
  `flax_d2v.api.transcribe.Transcriber` (its length buckets, its chunking with strides for clips over
  its chunk length, its padding-invariant forward, greedy or with its beam search / n-gram LM);
- references and hypotheses go through the same `NORMALIZATIONS` entry, `upper-letters` by
  default: `train/vocab.py`'s `normalize_transcript`, the rule `d2v finetune` trains on;
- corpus WER/CER are `metrics.error_rates` (jiwer: edits summed over all utterances / reference
  words or characters), and each utterance's edits are counted the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from flax_d2v.audio import SAMPLE_RATE
from flax_d2v.errors import D2VError
from flax_d2v.train.manifests import Manifest
from flax_d2v.train.metrics import EMPTY_REFERENCE, error_rates
from flax_d2v.train.planning import select_examples
from flax_d2v.train.vocab import normalize_transcript

SLICE_CLIPS = 256  # clips read per Transcriber call: bounds host memory on long eval sets

# name -> (function, what it does): applied to references and hypotheses alike before scoring.
NORMALIZATIONS: dict[str, tuple[Callable[[str], str], str]] = {
    "upper-letters": (
        normalize_transcript,
        "NFKC, typographic apostrophes to ', upper case, letters, digits and ' kept, anything else a word "
        "break (train/vocab.py: what d2v finetune trains on)",
    ),
    "lower-letters": (
        lambda text: normalize_transcript(text).lower(),
        "as upper-letters, then lower case",
    ),
    "none": (lambda text: text, "none: texts compared as they are"),
}
DEFAULT_NORMALIZATION = "upper-letters"


def normalizer(name: str) -> Callable[[str], str]:
    if name not in NORMALIZATIONS:
        raise D2VError(f"--normalize: {name!r} is not one of {', '.join(NORMALIZATIONS)}")
    return NORMALIZATIONS[name][0]


def eval_positions(manifest: Manifest) -> list[int]:
    """Manifest positions evaluated: clips with a transcript, long enough for one encoder frame."""
    return [int(i) for i in select_examples(manifest, None, None, True)[0]]


def transcribe_manifest(
    runner: Any, manifest: Manifest, positions: Sequence[int], on_slice: Callable[[int], None] | None = None
) -> dict[int, str]:
    """{position: hypothesis} for `positions`, `SLICE_CLIPS` clips per `runner` call; a clip that
    cannot be read stops the evaluation with its name (`on_slice(clips done)` after each slice)."""
    hyps: dict[int, str] = {}
    for s in range(0, len(positions), SLICE_CLIPS):
        chunk = list(positions[s : s + SLICE_CLIPS])
        results = runner([manifest.load(i) for i in chunk], progress=False)
        for i, r in zip(chunk, results, strict=True):
            if r.error:
                raise D2VError(f"{manifest.paths[i]}: {r.error}")
            hyps[i] = r.text
        if on_slice is not None:
            on_slice(len(chunk))
    return hyps


def corpus_rates(references: Sequence[str], hypotheses: Sequence[str], normalize: str = DEFAULT_NORMALIZATION):
    """{"wer", "cer"} over all utterances, both sides normalised by `normalize`."""
    norm = normalizer(normalize)
    return error_rates([norm(r) for r in references], [norm(h) for h in hypotheses])


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One evaluated clip: normalised texts and its edit counts (jiwer's, as the corpus rates)."""

    index: int
    path: str
    reference: str
    hypothesis: str
    words: int
    word_errors: int
    chars: int
    char_errors: int


def utterance(index: int, path: str, reference: str, hypothesis: str) -> Utterance:
    """Edits of one normalised pair; an empty reference counts as `metrics.EMPTY_REFERENCE`, as in the rates."""
    import jiwer

    ref = reference if reference.strip() else EMPTY_REFERENCE
    w = jiwer.process_words(ref, hypothesis)
    c = jiwer.process_characters(ref, hypothesis)
    return Utterance(
        index,
        path,
        reference,
        hypothesis,
        w.hits + w.substitutions + w.deletions,
        w.substitutions + w.deletions + w.insertions,
        c.hits + c.substitutions + c.deletions,
        c.substitutions + c.deletions + c.insertions,
    )


@dataclasses.dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]  # wer, cer, eval_clips
    utterances: list[Utterance]
    normalize: str
    seconds: float  # audio evaluated


def evaluate(
    runner: Any,
    manifest: Manifest,
    normalize: str = DEFAULT_NORMALIZATION,
    on_slice: Callable[[int], None] | None = None,
) -> Evaluation:
    """WER/CER of `runner` (a `Transcriber`) over every evaluated clip of `manifest`, with each utterance's edits."""
    norm = normalizer(normalize)
    positions = eval_positions(manifest)
    hyps = transcribe_manifest(runner, manifest, positions, on_slice)
    refs = [manifest.texts[i] or "" for i in positions]
    hyp_list = [hyps[i] for i in positions]
    metrics = {**corpus_rates(refs, hyp_list, normalize), "eval_clips": len(positions)}
    pairs = zip(positions, refs, hyp_list, strict=True)
    rows = [utterance(i, manifest.paths[i], norm(r), norm(h)) for i, r, h in pairs]
    seconds = float(np.asarray(manifest.lengths())[positions].sum()) / SAMPLE_RATE if positions else 0.0
    return Evaluation(metrics, rows, normalize, seconds)
