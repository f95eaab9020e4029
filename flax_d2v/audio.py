"""The one audio loader: any file soundfile reads, turned into what the model expects.

data2vec-audio sees 16 kHz mono float32 waveforms, normalised per utterance. Users have
recordings at other rates, in stereo, in FLAC or Ogg, and sometimes broken. Every entry point
(`embed`, `transcribe`, `verify`, the training pipelines) reads audio through `load_audio` so
that they all resample the same way (soxr, band-limited, very high quality), average channels
the same way, and fail with the same one-line `D2VError` naming the file.

Normalisation mirrors the two references exactly:
- transformers' `Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm`: `(x - mean) / sqrt(var + 1e-7)`
  over the real samples, computed in float32, padding set to 0.0 afterwards;
- fairseq's `F.layer_norm(wav, wav.shape)` (`normalize=True` in the task config): the same
  formula with eps 1e-5 (`normalize(x, eps=FAIRSEQ_NORM_EPS)`).
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import sys
from collections.abc import Callable, Sequence

import numpy as np

from flax_d2v import paths
from flax_d2v.errors import D2VError

SAMPLE_RATE = 16000
HF_NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm
FAIRSEQ_NORM_EPS = 1e-5  # torch.nn.functional.layer_norm default, used by fairseq's audio dataset
RESAMPLE_QUALITY = "VHQ"  # soxr's very-high-quality band-limited filter

Warn = Callable[[str], None]


def print_note(message: str) -> None:
    """The default `warn`: one line on stderr, so stdout stays clean for transcripts/JSON."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- loading
def load_audio(
    path: str | os.PathLike, target_sr: int = SAMPLE_RATE, strict: bool = False, warn: Warn = print_note
) -> np.ndarray:
    """Read `path` (a file, or an object URL such as `gs://bucket/clip.flac`) as a float32 mono waveform
    at `target_sr`.

    Anything libsndfile reads (WAV, FLAC, Ogg/Vorbis, ...; integer or float PCM) is accepted.
    Another sample rate is resampled with soxr and several channels are averaged, each with a
    one-line note through `warn`; `strict=True` refuses both instead. A missing, empty,
    non-audio or truncated file, or one holding NaN/inf samples, raises `D2VError` naming it.
    """
    import soundfile as sf

    name = os.fspath(path)
    if paths.is_url(name):  # an object: its bytes in memory (soundfile reads file objects, not URLs)
        blob = paths.read_bytes(name)
        size, source = len(blob), io.BytesIO(blob)
    else:
        if not os.path.exists(name):
            raise D2VError(f"{name}: no such file")
        if os.path.isdir(name):
            raise D2VError(f"{name}: is a directory, not an audio file")
        try:
            size = os.path.getsize(name)
        except OSError as e:
            raise D2VError(f"{name}: cannot read ({e.strerror or e})") from None
        source = name
    if size == 0:
        raise D2VError(f"{name}: empty file (0 bytes)")
    _check_wav_not_truncated(name, size, source)
    if isinstance(source, io.BytesIO):
        source.seek(0)
    try:
        with sf.SoundFile(source) as f:
            sample_rate, declared = f.samplerate, f.frames
            data = f.read(dtype="float32")  # (frames,) for mono: no copy on the way to the model
    except sf.LibsndfileError as e:
        reason = str(getattr(e, "error_string", "") or e).strip().rstrip(".")
        if "Format not recognised" in reason or "unknown format" in reason.lower():
            raise D2VError(f"{name}: not an audio file that soundfile can read ({reason})") from None
        raise D2VError(f"{name}: unreadable or truncated audio ({reason})") from None
    except (RuntimeError, OSError, ValueError) as e:
        raise D2VError(f"{name}: unreadable audio ({e})") from None
    if 0 < declared < 2**62 and data.shape[0] < declared:
        raise D2VError(f"{name}: truncated (header declares {declared} frames, only {data.shape[0]} could be read)")
    return prepare_audio(data, sample_rate, name=name, target_sr=target_sr, strict=strict, warn=warn)


def prepare_audio(
    x: np.ndarray,
    sample_rate: int,
    name: str = "<array>",
    target_sr: int = SAMPLE_RATE,
    strict: bool = False,
    warn: Warn = print_note,
) -> np.ndarray:
    """An in-memory waveform through the same checks as a file: mono, `target_sr`, finite, float32.

    `x` is (samples,) or (samples, channels) as soundfile returns it; integer PCM is scaled to
    [-1, 1) by its type's range.
    """
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.signedinteger):
        x = x.astype(np.float32) / np.float32(-np.iinfo(x.dtype).min)
    elif not np.issubdtype(x.dtype, np.floating):
        raise D2VError(f"{name}: audio must be float or signed integer PCM, got dtype {x.dtype}")
    if x.ndim not in (1, 2):
        raise D2VError(f"{name}: audio must be (samples,) or (samples, channels), got shape {x.shape}")
    if x.size == 0:
        raise D2VError(f"{name}: contains no audio samples")
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise D2VError(f"{name}: contains {bad} NaN or infinite sample(s)")
    if x.ndim == 2:
        if x.shape[1] > 1:
            if strict:
                raise D2VError(f"{name}: has {x.shape[1]} channels, expected mono (strict audio)")
            warn(f"note: {name}: {x.shape[1]} channels averaged to mono")
            x = x.mean(axis=1, dtype=np.float64)
        else:
            x = x[:, 0]
    if int(sample_rate) != target_sr:
        if strict:
            raise D2VError(f"{name}: sample rate is {sample_rate} Hz, expected {target_sr} Hz (strict audio)")
        warn(f"note: {name}: resampled {sample_rate} Hz -> {target_sr} Hz (soxr {RESAMPLE_QUALITY})")
        x = resample(x, int(sample_rate), target_sr)
        if x.size == 0:
            raise D2VError(f"{name}: too short to resample ({sample_rate} Hz)")
    return np.ascontiguousarray(x, dtype=np.float32)


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling of a mono waveform (soxr, very high quality)."""
    import soxr

    if sr_in <= 0:
        raise D2VError(f"sample rate must be positive, got {sr_in}")
    if sr_in == sr_out:
        return np.asarray(x, np.float32)
    return soxr.resample(np.asarray(x, np.float32), sr_in, sr_out, quality=RESAMPLE_QUALITY).astype(np.float32)


def _check_wav_not_truncated(name: str, size: int, source: str | io.BytesIO) -> None:
    """libsndfile silently shortens a cut-off WAV; compare the `data` chunk size with the file size.

    A writer that streams (size unknown up front) leaves 0 or 0xFFFFFFFF in the header: such a
    file is not called truncated.
    """
    try:
        with contextlib.nullcontext(source) if isinstance(source, io.BytesIO) else open(source, "rb") as f:
            f.seek(0)
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return
            offset = 12
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    return  # no data chunk: libsndfile reports it
                chunk_id, chunk_size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                offset += 8
                if chunk_id == b"data":
                    available = size - offset
                    if chunk_size not in (0, 0xFFFFFFFF) and chunk_size > available:
                        raise D2VError(
                            f"{name}: truncated (header declares {chunk_size} bytes of audio, "
                            f"the file holds {available})"
                        )
                    return
                offset += chunk_size + (chunk_size & 1)
                f.seek(offset)
    except OSError as e:
        raise D2VError(f"{name}: cannot read ({e.strerror or e})") from None


# ---------------------------------------------------------------------------------------- features
def normalize(x: np.ndarray, eps: float = HF_NORM_EPS) -> np.ndarray:
    """Zero mean, unit variance over the whole array, in float32 like transformers.

    `eps=HF_NORM_EPS` (1e-7) is `Wav2Vec2FeatureExtractor`; `eps=FAIRSEQ_NORM_EPS` (1e-5) is
    fairseq's `F.layer_norm(wav, wav.shape)`.
    """
    x = np.asarray(x, np.float32)
    return (x - x.mean()) / np.sqrt(x.var() + np.float32(eps))


def pad_batch(
    arrays: Sequence[np.ndarray],
    do_normalize: bool = True,
    pad_to: int | None = None,
    batch_to: int | None = None,
    padding_value: float = 0.0,
    eps: float = HF_NORM_EPS,
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad waveforms into `(input_values, attention_mask)` like `Wav2Vec2FeatureExtractor`.

    Each waveform is normalised over its own real samples (so padding never shifts its mean or
    variance) and the padding is `padding_value` after normalisation. `pad_to` fixes the length
    (at least the longest input) and `batch_to` adds all-padding rows, so callers can keep the
    set of array shapes, and thus XLA programs, small.
    """
    if not arrays:
        raise ValueError("pad_batch needs at least one waveform")
    longest = max(len(a) for a in arrays)
    length = longest if pad_to is None else pad_to
    if length < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest waveform ({longest})")
    rows = len(arrays) if batch_to is None else batch_to
    if rows < len(arrays):
        raise ValueError(f"batch_to={batch_to} is smaller than the number of waveforms ({len(arrays)})")
    values = np.full((rows, length), padding_value, np.float32)
    mask = np.zeros((rows, length), np.int32)
    for i, a in enumerate(arrays):
        a = np.asarray(a, np.float32)
        values[i, : len(a)] = normalize(a, eps) if do_normalize else a
        mask[i, : len(a)] = 1
    return values, mask
