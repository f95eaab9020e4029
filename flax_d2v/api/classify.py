"""Audio classification, frame classification and speaker embeddings with the data2vec-audio heads.

    results = flax_d2v.classify("my-classifier", ["a.wav", "b.flac"], top_k=3)   # [Classification]
    from flax_d2v.api.classify import Classifier
    embeddings = Classifier("my-xvector-model").embed(["a.wav"])        # x-vectors, .embedding each

Inputs are read, bucketed and batched as `flax_d2v.transcribe` does (the same audio loader,
resampling and bad-file handling, the same geometric length buckets and power-of-two batch rows,
and the same padding-invariant forward, so a clip's result does not depend on its batch-mates).
Clips are not chunked: a clip-level label needs the whole clip, as transformers'
audio-classification pipeline feeds it. Scores are the softmax of the logits, labels come from
the config's `id2label`. An x-vector model's labels are the speakers it was trained on: the
softmax of its AM-softmax scores (scale x cosine to each class weight, no margin).

x-vectors: a clip's embedding is the clip's alone, unpadded, to float32 noise, whatever it is
batched with: the padding-invariant forward zeroes what the adapter's convs would read past the
clip, and the statistics pooling takes only the TDNN frames that read real frames (transformers'
batched pooling, which `apply` keeps for parity, counts a few that read the padding).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_d2v.api.pretrained import load_model
from flax_d2v.api.transcribe import DEFAULT_BATCH_SIZE, batch_rows, bucket_length, load_input
from flax_d2v.audio import SAMPLE_RATE, Warn, pad_batch, print_note
from flax_d2v.errors import D2VError
from flax_d2v.heads import (
    Data2VecAudioForAudioFrameClassification,
    Data2VecAudioForSequenceClassification,
    Data2VecAudioForXVector,
    am_softmax_logits,
    id2label,
)
from flax_d2v.modeling import apply_padding_invariant
from flax_d2v.types import PyTree

CLASSIFIERS = (
    Data2VecAudioForSequenceClassification,
    Data2VecAudioForAudioFrameClassification,
    Data2VecAudioForXVector,
)


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of frames with the same best label: [start, end) seconds, mean probability of the label."""

    start: float
    end: float
    label: str
    score: float


@dataclasses.dataclass(frozen=True)
class Classification:
    """One input's result; `error` is set (and the rest empty) when the input could not be used.

    labels: the top-k (label, score) pairs, best first (sequence classification, x-vector models);
    segments: frame classification; embedding: the x-vector (x-vector models).
    """

    path: str
    labels: tuple[tuple[str, float], ...] = ()
    seconds: float = 0.0
    segments: tuple[Segment, ...] | None = None
    embedding: np.ndarray | None = None
    error: str | None = None

    @property
    def label(self) -> str | None:
        return self.labels[0][0] if self.labels else None

    @property
    def score(self) -> float | None:
        return self.labels[0][1] if self.labels else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "seconds": round(self.seconds, 4)}
        if self.labels:
            out["labels"] = [{"label": k, "score": round(s, 6)} for k, s in self.labels]
        if self.segments is not None:
            out["segments"] = [
                {"start": round(g.start, 4), "end": round(g.end, 4), "label": g.label, "score": round(g.score, 6)}
                for g in self.segments
            ]
        if self.error is not None:
            out["error"] = self.error
        return out


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(
    module: Any, params: PyTree, input_values: jax.Array, attention_mask: jax.Array
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    out = apply_padding_invariant(module, params, input_values, attention_mask)
    logits = out.logits
    if isinstance(module, Data2VecAudioForXVector):  # transformers' logits here are a 512-d projection
        w = params["objective"]["weight"]
        logits = am_softmax_logits(logits, w, jnp.zeros(logits.shape[0], jnp.int32), margin=0.0)
    return jax.nn.softmax(logits, axis=-1), out.embeddings, out.logits_frame_mask


def frame_segments(probs: np.ndarray, labels: dict[int, str], seconds_per_frame: float) -> tuple[Segment, ...]:
    """Runs of equal argmax label over (frames, num_labels) probabilities, time-stamped."""
    best = probs.argmax(-1)
    out, start = [], 0
    for t in range(1, len(best) + 1):
        if t == len(best) or best[t] != best[start]:
            k = int(best[start])
            out.append(
                Segment(start * seconds_per_frame, t * seconds_per_frame, labels[k], float(probs[start:t, k].mean()))
            )
            start = t
    return tuple(out)


class Classifier:
    """A classification / frame-classification / x-vector model with its compiled forward passes cached."""

    def __init__(
        self,
        model_or_path: Any,
        do_normalize: bool | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        top_k: int = 1,
        precision: str | None = None,
    ):
        """`precision`: a `flax_d2v.precision` policy for a model loaded from a path (None: "highest");
        a `(module, params)` tuple keeps its module's own. Audio is normalised with the model's
        `preprocessor_config.json` (`do_normalize`, and the `normalize_eps` of a fairseq conversion)."""
        module, params, where, _, preprocessor = load_model(model_or_path, precision=precision)
        if not isinstance(module, CLASSIFIERS):
            raise D2VError(
                f"{where}: a {type(module).__name__} has no classification or x-vector head "
                "(expected Data2VecAudioForSequenceClassification, ...ForAudioFrameClassification or "
                "...ForXVector)"
            )
        if batch_size < 1:
            raise D2VError(f"--batch-size: must be >= 1, got {batch_size}")
        if top_k < 1:
            raise D2VError(f"--top-k: must be >= 1, got {top_k}")
        self.module, self.where = module, where
        self.params = jax.device_put(params)
        self.config = module.config
        self.labels = id2label(self.config)
        self.do_normalize = preprocessor.do_normalize if do_normalize is None else bool(do_normalize)
        self.normalize_eps = preprocessor.normalize_eps  # 1e-5 for a model converted from fairseq
        self.batch_size, self.top_k = int(batch_size), int(top_k)
        self.shapes: set[tuple[int, int]] = set()

    @property
    def is_frames(self) -> bool:
        return isinstance(self.module, Data2VecAudioForAudioFrameClassification)

    @property
    def is_xvector(self) -> bool:
        return isinstance(self.module, Data2VecAudioForXVector)

    def _run(self, loaded: list[tuple[str, np.ndarray | None, str | None]]) -> list[Classification]:
        align = self.config.inputs_to_logits_ratio
        by_bucket: dict[int, list[int]] = {}
        for i, (_, audio, _) in enumerate(loaded):
            if audio is not None:
                by_bucket.setdefault(bucket_length(len(audio), align), []).append(i)
        results: dict[int, Classification] = {}
        frame_s = align / SAMPLE_RATE
        for bucket in sorted(by_bucket):
            group = by_bucket[bucket]
            for b in range(0, len(group), self.batch_size):
                items = group[b : b + self.batch_size]
                rows = batch_rows(len(items), self.batch_size)
                x, mask = pad_batch(
                    [loaded[i][1] for i in items],
                    self.do_normalize,
                    pad_to=bucket,
                    batch_to=rows,
                    eps=self.normalize_eps,
                )
                self.shapes.add((rows, bucket))
                probs, emb, fmask = _forward(self.module, self.params, x, mask)
                probs = np.asarray(probs)
                for row, i in enumerate(items):
                    name, audio, _ = loaded[i]
                    seconds = len(audio) / SAMPLE_RATE
                    if self.is_frames:
                        n = int(np.asarray(fmask)[row].sum())
                        results[i] = Classification(
                            name, (), seconds, frame_segments(probs[row, :n], self.labels, frame_s)
                        )
                        continue
                    order = np.argsort(-probs[row], kind="stable")[: self.top_k]
                    labels = tuple((self.labels[int(k)], float(probs[row, k])) for k in order)
                    embedding = np.asarray(emb[row], np.float32) if emb is not None else None
                    results[i] = Classification(name, labels, seconds, None, embedding)
        return [
            results[i] if audio is not None else Classification(name, error=error)
            for i, (name, audio, error) in enumerate(loaded)
        ]

    def iter(
        self, files_or_arrays: Iterable[Any], strict_audio: bool = False, warn: Warn = print_note, pool_size: int = 256
    ) -> Iterator[Classification]:
        """Results in input order, `pool_size` inputs at a time. Bad inputs are reported through `warn`."""
        items = list(files_or_arrays)
        for start in range(0, len(items), pool_size):
            loaded = []
            for idx, item in enumerate(items[start : start + pool_size], start=start):
                name, audio, error = load_input(idx, item, strict_audio, warn)
                if error is not None:
                    warn(f"error: {error}")
                loaded.append((name, audio, error))
            yield from self._run(loaded)

    def __call__(
        self, files_or_arrays: Iterable[Any], strict_audio: bool = False, warn: Warn = print_note
    ) -> list[Classification]:
        return list(self.iter(files_or_arrays, strict_audio=strict_audio, warn=warn))

    def embed(
        self, files_or_arrays: Iterable[Any], strict_audio: bool = False, warn: Warn = print_note
    ) -> list[Classification]:
        """x-vectors (`Classification.embedding`) of the inputs; the model must be an x-vector model."""
        if not self.is_xvector:
            raise D2VError(
                f"{self.where}: not an x-vector model (Data2VecAudioForXVector); it is a {type(self.module).__name__}"
            )
        return self(files_or_arrays, strict_audio=strict_audio, warn=warn)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity (torch.nn.functional.cosine_similarity's eps 1e-8)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-8))


def classify(
    model_or_path: Any,
    files_or_arrays: Iterable[Any] | str | os.PathLike | np.ndarray,
    *,
    top_k: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    do_normalize: bool | None = None,
    strict_audio: bool = False,
    warn: Warn = print_note,
) -> list[Classification]:
    """Classify files or waveforms; one `Classification` per input, in order.

    model_or_path: a checkpoint path (anything `flax_d2v.from_pretrained` reads) of a
        sequence-classification, frame-classification or x-vector model, or a `(module, params)` tuple.
    files_or_arrays: paths, 16 kHz float arrays, or `(array, sample_rate)` tuples; one alone is accepted too.
    top_k: the best k labels with their softmax scores (frame classification: segments instead).
    """
    if isinstance(files_or_arrays, (str, os.PathLike, np.ndarray)):
        files_or_arrays = [files_or_arrays]
    return Classifier(model_or_path, do_normalize=do_normalize, batch_size=batch_size, top_k=top_k)(
        files_or_arrays, strict_audio=strict_audio, warn=warn
    )


__all__: Sequence[str] = ("Classification", "Classifier", "Segment", "classify", "cosine", "frame_segments")
