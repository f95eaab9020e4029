"""CTC transcription of any number of recordings of any length.

    results = flax_d2v.transcribe("my-ctc-model", ["a.wav", "b.flac"])   # [Transcription(path, text, ...)]

Three things keep this fast and bounded in memory:

- *Chunking with strides*, exactly as transformers' ASR pipeline (`chunk_length_s`,
  `stride_length_s`): a recording longer than one chunk is cut into overlapping chunks, each
  normalised on its own; the logits of each chunk's stride regions are dropped, the rest are
  concatenated and decoded once, so no word is dropped or doubled at a seam and memory does not
  grow with the recording's length.
- *Length buckets*: every chunk is right-padded to one of a fixed set of lengths (a geometric grid
  of ratio sqrt(2) from 1 s, capped at the chunk length) and batches to a power-of-two number of
  rows, so XLA compiles a handful of programs, not one per file. The forward is
  `modeling.apply_padding_invariant`: the attention mask keeps padding out of attention and the
  positional conv stack re-zeroes it between its layers, so a padded clip's logits are the clip's
  alone (transformers' own batched inference lets padding touch the last few frames).
- *Normalisation* as the model's `preprocessor_config.json` says: `do_normalize`, and its
  `normalize_eps` when `d2v convert` recorded fairseq's 1e-5 (transformers' 1e-7 otherwise).
- *A bounded pool*: files are read, run and decoded in pools of about `POOL_SECONDS` of audio, and
  results come back in input order as each pool finishes (`iter_transcribe` streams them).

Bad inputs never stop the run: each is reported once through `warn` and comes back with
`error` set.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_d2v.api.pretrained import load_model
from flax_d2v.audio import SAMPLE_RATE, Warn, load_audio, pad_batch, prepare_audio, print_note
from flax_d2v.ctc_decode import CTCTokenizer
from flax_d2v.data2vec2 import Data2Vec2ForCTC
from flax_d2v.errors import D2VError
from flax_d2v.lm_decode import decoder_for
from flax_d2v.modeling import Data2VecAudioForCTC, apply_padding_invariant, feat_extract_output_lengths
from flax_d2v.types import PyTree

DEFAULT_BATCH_SIZE = 4  # x 20 s chunks: base-size activations ~1.7 GB on CPU (8 would need ~3.4 GB)
DEFAULT_CHUNK_LENGTH_S = 20.0  # ample context per chunk; memory per batch grows with batch_size x chunk length
STRIDE_FRACTION = 1 / 6  # default stride on each side = chunk_length_s / 6, as transformers' pipeline
POOL_SECONDS = 1800.0  # audio read ahead before running (bounds host memory for many files)
BUCKET_BASE_S = 1.0  # the shortest padded length
BUCKET_GROWTH = math.sqrt(2.0)  # <= 41% padding, about ten lengths from 1 s to 20 s
# Transcription computes at the platform default (TF32 on GPU): argmax-robust and the fast path.
DEFAULT_PRECISION = "default"


@dataclasses.dataclass(frozen=True)
class WordTiming:
    word: str
    start: float  # seconds
    end: float


@dataclasses.dataclass(frozen=True)
class Transcription:
    """One input's result; `error` is set (and `text` empty) when the input could not be used."""

    path: str
    text: str
    seconds: float
    words: tuple[WordTiming, ...] | None = None
    error: str | None = None

    def to_json(self, timestamps: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "text": self.text, "seconds": round(self.seconds, 4)}
        if timestamps:
            out["words"] = [
                {"word": w.word, "start": round(w.start, 4), "end": round(w.end, 4)} for w in (self.words or ())
            ]
        if self.error is not None:
            out["error"] = self.error
        return out


# ---------------------------------------------------------------------------------------- chunking
@dataclasses.dataclass(frozen=True)
class Piece:
    """Samples [start, end) of one input, with the stride samples whose logits are dropped."""

    item: int
    index: int
    start: int
    end: int
    stride_left: int
    stride_right: int

    def keep(self, config: Any) -> slice:
        """Frames to keep: transformers' `rescale_stride` arithmetic, clipped to the real frames."""
        n = self.end - self.start
        ratio = config.inputs_to_logits_ratio
        token_n = int(round(n / ratio))
        left = int(round(self.stride_left / n * token_n))
        right = int(round(self.stride_right / n * token_n))
        real = max(int(feat_extract_output_lengths(config, n)), 0)
        return slice(left, max(left, min(token_n - right, real)))


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """Chunk and stride lengths in samples, aligned to the model's frame hop (0 = no chunking)."""

    chunk_len: int
    stride_left: int
    stride_right: int

    @classmethod
    def from_seconds(
        cls, chunk_length_s: float | None, stride_length_s: float | Sequence[float] | None, align: int
    ) -> ChunkPlan:
        if not chunk_length_s:
            return cls(0, 0, 0)
        if chunk_length_s < 0:
            raise D2VError(f"--chunk-length-s: must be >= 0, got {chunk_length_s}")
        if stride_length_s is None:
            stride_length_s = chunk_length_s * STRIDE_FRACTION
        left_s, right_s = (
            (stride_length_s, stride_length_s) if isinstance(stride_length_s, (int, float)) else tuple(stride_length_s)
        )
        to_samples = lambda s: int(round(s * SAMPLE_RATE / align) * align)
        plan = cls(to_samples(chunk_length_s), to_samples(left_s), to_samples(right_s))
        # The conv stack cannot make a chunk's last frame (its window runs past the chunk), so
        # without a right stride of at least one frame that frame would be lost at every seam.
        if plan.stride_left < 0 or plan.stride_right < align or plan.chunk_len <= plan.stride_left + plan.stride_right:
            raise D2VError(
                f"--stride-length-s: strides ({left_s}, {right_s}) s must be >= 0 on the left, "
                f">= {align / SAMPLE_RATE} s on the right, and leave room in a {chunk_length_s} s chunk"
            )
        return plan

    def pieces(self, item: int, n: int) -> list[Piece]:
        """transformers' `chunk_iter`: overlapping chunks; no stride at the outer edges."""
        if not self.chunk_len or n <= self.chunk_len:
            return [Piece(item, 0, 0, n, 0, 0)]
        step = self.chunk_len - self.stride_left - self.stride_right
        out = []
        for start in range(0, n, step):
            end = min(start + self.chunk_len, n)
            left = 0 if start == 0 else self.stride_left
            is_last = start + self.chunk_len >= n
            if end - start > left:
                out.append(Piece(item, len(out), start, end, left, 0 if is_last else self.stride_right))
            if is_last:
                break
        return out


def bucket_length(n: int, align: int, cap: int = 0) -> int:
    """The padded length for `n` samples: the smallest grid length >= n (never above `cap` if set)."""
    if cap and n <= cap:
        grid = _bucket_grid(align, cap)
        return next(b for b in grid if b >= n)
    k = max(0, math.ceil(math.log(max(n, 1) / (BUCKET_BASE_S * SAMPLE_RATE), BUCKET_GROWTH) - 1e-9))
    return _round_up(int(math.ceil(BUCKET_BASE_S * SAMPLE_RATE * BUCKET_GROWTH**k)), align)


@functools.lru_cache(maxsize=16)
def _bucket_grid(align: int, cap: int) -> tuple[int, ...]:
    grid, k = [], 0
    while True:
        b = _round_up(int(math.ceil(BUCKET_BASE_S * SAMPLE_RATE * BUCKET_GROWTH**k)), align)
        if b >= cap:
            return tuple(grid) + (cap,)
        grid.append(b)
        k += 1


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def batch_rows(n: int, batch_size: int) -> int:
    """Rows of a padded batch holding `n` pieces: a power of two, or `batch_size` itself."""
    return min(batch_size, 1 << max(0, (n - 1).bit_length()))


# ---------------------------------------------------------------------------------------- the model
@functools.partial(jax.jit, static_argnums=(0, 4))
def _ctc_forward(
    module: Data2VecAudioForCTC, params: PyTree, input_values: jax.Array, attention_mask: jax.Array, log_probs: bool
) -> jax.Array:
    """Per-frame argmax ids (greedy) or log-probabilities (beam search); one program per shape."""
    logits = apply_padding_invariant(module, params, input_values, attention_mask).logits
    return jax.nn.log_softmax(logits, axis=-1) if log_probs else jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _tokenizer_from(vocab: Any, where: str) -> CTCTokenizer:
    if isinstance(vocab, CTCTokenizer):
        return vocab
    if isinstance(vocab, dict):
        return CTCTokenizer.from_vocab(vocab)
    if vocab is None:
        raise D2VError(f"{where}: a (module, params) model needs vocab= (a vocab.json, its directory, or a dict)")
    p = Path(vocab)
    return (
        CTCTokenizer.from_dir(p)
        if p.is_dir()
        else CTCTokenizer.from_files(p, p.parent / "tokenizer_config.json", p.parent / "special_tokens_map.json")
    )


def load_input(idx: int, item: Any, strict: bool, warn: Warn) -> tuple[str, np.ndarray | None, str | None]:
    """(name, 16 kHz mono audio or None, error or None) for one input of `transcribe`/`classify`:
    a path, a 16 kHz array, or an `(array, sample_rate)` tuple. A bad input is an error string, not
    an exception, so one bad file never stops a batch."""
    if isinstance(item, tuple) and len(item) == 2 and not isinstance(item[0], (str, os.PathLike)):
        array, rate, name = item[0], int(item[1]), f"array[{idx}]"
    elif isinstance(item, (str, os.PathLike)):
        name = os.fspath(item)
        try:
            return name, load_audio(name, strict=strict, warn=warn), None
        except D2VError as e:
            return name, None, str(e)
    else:
        array, rate, name = item, SAMPLE_RATE, f"array[{idx}]"
    try:
        return name, prepare_audio(array, rate, name=name, strict=strict, warn=warn), None
    except D2VError as e:
        return name, None, str(e)


class Transcriber:
    """A CTC model, its tokenizer and its input settings, with compiled forward passes cached.

    Build it once and call `__call__`/`iter` many times: XLA programs are reused across calls.
    """

    def __init__(
        self,
        model_or_path: Any,
        vocab: Any = None,
        do_normalize: bool | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        chunk_length_s: float | None = DEFAULT_CHUNK_LENGTH_S,
        stride_length_s: float | Sequence[float] | None = None,
        beam_width: int = 0,
        lm: str | os.PathLike | bool | None = None,
        skip_special_tokens: bool = False,
        *,
        lexicon: str | os.PathLike | None = None,
        lexicon_free: bool | None = None,
        lm_weight: float | None = None,
        word_score: float | None = None,
        warn: Warn = print_note,
        precision: str = DEFAULT_PRECISION,
    ):
        # `where` is the local directory or file (a hub id's snapshot holds vocab.json too)
        module, params, where, model_dir, preprocessor = load_model(model_or_path, precision=precision)
        if vocab is None and model_dir is not None:
            tokenizer = CTCTokenizer.from_dir(model_dir)
        else:
            tokenizer = _tokenizer_from(vocab, where)
        if not isinstance(module, (Data2VecAudioForCTC, Data2Vec2ForCTC)):
            raise D2VError(f"{where}: not a CTC model (no lm_head); transcription needs a fine-tuned checkpoint")
        if module.config.add_adapter:  # chunk seams and frame times assume the conv encoder's 320-sample hop
            raise D2VError(f"{where}: CTC models with an adapter (add_adapter=True) are not supported by transcribe")
        if batch_size < 1:
            raise D2VError(f"--batch-size: must be >= 1, got {batch_size}")
        self.module, self.tokenizer = module, tokenizer
        self.params = jax.device_put(params)  # once, not on every batch
        self.config = module.config
        self.do_normalize = preprocessor.do_normalize if do_normalize is None else bool(do_normalize)
        self.normalize_eps = preprocessor.normalize_eps  # 1e-5 for a model converted from fairseq
        self.batch_size = int(batch_size)
        self.plan = ChunkPlan.from_seconds(chunk_length_s, stride_length_s, self.config.inputs_to_logits_ratio)
        self.beam = decoder_for(
            tokenizer,
            self.config.vocab_size,
            beam_width=beam_width,
            lm=lm,
            model_dir=model_dir,
            lexicon=lexicon,
            lexicon_free=lexicon_free,
            lm_weight=lm_weight,
            word_score=word_score,
            warn=warn,
        )
        self.beam_width = self.beam.beam_width if self.beam is not None else 0
        self.skip_special_tokens = skip_special_tokens
        self.shapes: set[tuple[int, int]] = set()  # padded (rows, samples) shapes run so far

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _expected_seconds(item: Any) -> float:
        """Duration from the header only (for the progress bar); 0 when unknown."""
        if isinstance(item, (str, os.PathLike)):
            try:
                import soundfile as sf

                return float(sf.info(os.fspath(item)).duration)
            except Exception:  # noqa: BLE001 - the real read reports the problem
                return 0.0
        array = item[0] if isinstance(item, tuple) else item
        rate = item[1] if isinstance(item, tuple) else SAMPLE_RATE
        return len(np.asarray(array)) / float(rate)

    # ------------------------------------------------------------------ running
    def _run_pool(
        self, pool: list[tuple[str, np.ndarray | None, str | None]], tick: Callable[[float], None]
    ) -> list[Transcription]:
        pieces = [
            p for i, (_, audio, _) in enumerate(pool) if audio is not None for p in self.plan.pieces(i, len(audio))
        ]
        outputs: dict[tuple[int, int], np.ndarray] = {}
        align = self.config.inputs_to_logits_ratio
        by_bucket: dict[int, list[Piece]] = {}
        for p in pieces:
            by_bucket.setdefault(bucket_length(p.end - p.start, align, self.plan.chunk_len), []).append(p)
        for bucket in sorted(by_bucket):
            group = by_bucket[bucket]
            for b in range(0, len(group), self.batch_size):
                batch = group[b : b + self.batch_size]
                rows = batch_rows(len(batch), self.batch_size)
                x, mask = pad_batch(
                    [pool[p.item][1][p.start : p.end] for p in batch],
                    self.do_normalize,
                    pad_to=bucket,
                    batch_to=rows,
                    eps=self.normalize_eps,
                )
                self.shapes.add((rows, bucket))
                out = np.asarray(_ctc_forward(self.module, self.params, x, mask, self.beam is not None))
                for row, p in enumerate(batch):
                    outputs[(p.item, p.index)] = out[row, p.keep(self.config)]
                tick(sum(p.end - p.start - p.stride_left - p.stride_right for p in batch) / SAMPLE_RATE)
        results = []
        for i, (name, audio, error) in enumerate(pool):
            if audio is None:
                results.append(Transcription(name, "", 0.0, None, error))
                continue
            parts = [outputs.pop((i, k)) for k in range(len(self.plan.pieces(i, len(audio))))]
            results.append(self._decode(name, np.concatenate(parts, axis=0), len(audio) / SAMPLE_RATE))
        return results

    def _decode(self, name: str, frames: np.ndarray, seconds: float) -> Transcription:
        if self.beam is not None:
            text, offsets = self.beam.decode(frames, self.skip_special_tokens)
        else:
            text, offsets = self.tokenizer.decode(frames, self.skip_special_tokens, output_word_offsets=True)
        ratio = self.config.inputs_to_logits_ratio
        words = tuple(WordTiming(w.word, *w.times(ratio, SAMPLE_RATE)) for w in offsets)
        return Transcription(name, text, seconds, words)

    def iter(
        self, files_or_arrays: Iterable[Any], strict_audio: bool = False, warn: Warn = print_note, progress: bool = True
    ) -> Iterator[Transcription]:
        """Results in input order, a pool at a time. Bad inputs are reported through `warn`."""
        items = list(files_or_arrays)
        start = time.perf_counter()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            total = sum(self._expected_seconds(it) for it in items)
            bar = tqdm(
                total=round(total, 1),
                unit="audio s",
                desc="transcribe",
                disable=None,
                leave=False,
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} audio s [{elapsed}<{remaining}]",
            )

        def note(message: str) -> None:
            if bar is not None and not bar.disable:
                with bar.external_write_mode():
                    warn(message)
            else:
                warn(message)

        tick = (lambda s: bar.update(s)) if bar is not None else (lambda s: None)
        done_audio, done_files, failed = 0.0, 0, 0
        pool: list[tuple[str, np.ndarray | None, str | None]] = []
        pooled = 0
        try:
            for idx, item in enumerate(items):
                name, audio, error = load_input(idx, item, strict_audio, note)
                if error is not None:
                    note(f"error: {error}")
                pool.append((name, audio, error))
                pooled += 0 if audio is None else len(audio)
                if pooled >= POOL_SECONDS * SAMPLE_RATE or idx == len(items) - 1:
                    for r in self._run_pool(pool, tick):
                        done_audio += r.seconds
                        done_files += r.error is None
                        failed += r.error is not None
                        yield r
                    pool, pooled = [], 0
        finally:
            if bar is not None:
                bar.close()
        if progress:
            wall = time.perf_counter() - start
            warn(
                f"transcribed {done_files} file(s), {done_audio:.1f} s of audio in {wall:.1f} s: "
                f"{done_audio / max(wall, 1e-9):.1f} audio s/s; {len(self.shapes)} padded shape(s) compiled"
                + (f"; {failed} failed" if failed else "")
            )

    def __call__(
        self, files_or_arrays: Iterable[Any], strict_audio: bool = False, warn: Warn = print_note, progress: bool = True
    ) -> list[Transcription]:
        return list(self.iter(files_or_arrays, strict_audio=strict_audio, warn=warn, progress=progress))


def transcribe(
    model_or_path: Any,
    files_or_arrays: Iterable[Any] | str | os.PathLike | np.ndarray,
    *,
    vocab: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    chunk_length_s: float | None = DEFAULT_CHUNK_LENGTH_S,
    stride_length_s: float | Sequence[float] | None = None,
    beam_width: int = 0,
    lm: str | os.PathLike | bool | None = None,
    strict_audio: bool = False,
    do_normalize: bool | None = None,
    skip_special_tokens: bool = False,
    progress: bool = True,
    warn: Warn = print_note,
    lexicon: str | os.PathLike | None = None,
    lexicon_free: bool | None = None,
    lm_weight: float | None = None,
    word_score: float | None = None,
    precision: str = DEFAULT_PRECISION,
) -> list[Transcription]:
    """Transcribe files or waveforms with a CTC model; one `Transcription` per input, in order.

    model_or_path: a checkpoint path (anything `flax_d2v.from_pretrained` reads, with `vocab.json`
        beside it) or a `(module, params)` tuple plus `vocab` (a vocab.json path, its directory,
        a token->id dict, or a `CTCTokenizer`).
    files_or_arrays: paths (any format soundfile reads), 16 kHz float arrays, or
        `(array, sample_rate)` tuples; a single path or array is accepted too.
    chunk_length_s / stride_length_s: recordings longer than `chunk_length_s` (default 20 s; 0 or
        None = never chunk) are cut into chunks overlapping by `stride_length_s` on each side
        (default chunk_length_s / 6; a pair gives (left, right)).
    beam_width: 0 or 1 = greedy (= `Wav2Vec2CTCTokenizer.decode` of the argmax ids) unless an LM is
        used (then 100 by default); > 1 = beam search (flashlight-text: `pip install 'flax-d2v[lm]'`).
    lm: a KenLM n-gram (.arpa, .arpa.gz, .bin) fused word by word; None = the model directory's own
        (transformers' `language_model/`) if it has one; False = none. See `flax_d2v.lm_decode`.
    lexicon: the words the beams may spell (one per line; default the LM's unigrams);
        lexicon_free: an LM over the model's characters (None: detected from an ARPA file).
    lm_weight / word_score: score = CTC log-prob + lm_weight * log10 LM prob + word_score per word
        (default 2 and -1, fairseq's LibriSpeech 4-gram setting; a transformers directory's alpha/beta).
    skip_special_tokens: as in `Wav2Vec2CTCTokenizer.decode` (default False, like transformers' ASR
        pipeline: note that True also drops the blank before repeats are merged).
    do_normalize: zero-mean unit-variance input; default from preprocessor_config.json, else True.
    progress: a tqdm bar on stderr (only on a terminal) and a throughput line at the end.
    precision: a `flax_d2v.precision` policy for a model loaded from a path (default "default":
        float32 at the platform's default matmul precision, TF32 on GPUs: the argmax of CTC logits
        does not move with 1e-3 relative errors, and it is the fast path). A `(module, params)`
        tuple keeps its module's own setting.
    """
    if isinstance(files_or_arrays, (str, os.PathLike, np.ndarray)):
        files_or_arrays = [files_or_arrays]
    runner = Transcriber(
        model_or_path,
        vocab=vocab,
        do_normalize=do_normalize,
        batch_size=batch_size,
        chunk_length_s=chunk_length_s,
        stride_length_s=stride_length_s,
        beam_width=beam_width,
        lm=lm,
        skip_special_tokens=skip_special_tokens,
        lexicon=lexicon,
        lexicon_free=lexicon_free,
        lm_weight=lm_weight,
        word_score=word_score,
        warn=warn,
        precision=precision,
    )
    return runner(files_or_arrays, strict_audio=strict_audio, warn=warn, progress=progress)
