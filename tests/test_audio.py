"""The audio loader: formats, resampling against an exact reference tone, channels, bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from flax_d2v.audio import (
    FAIRSEQ_NORM_EPS,
    HF_NORM_EPS,
    load_audio,
    normalize,
    pad_batch,
    prepare_audio,
)
from flax_d2v.errors import D2VError
from flax_d2v.processor import read_preprocessor_config

SR = 16000
TONE_HZ = 440.0
TONE_AMP = 0.5
# Largest sample error against the exact 16 kHz tone, away from the ends: soxr VHQ itself is
# accurate to ~3e-8 here (float32 rounding); a 16-bit file adds quantisation noise (~4e-5 after
# resampling). Any aliasing, gain or delay error would be orders of magnitude larger.
TONE_MAX_ERR = {"FLOAT": 1e-6, "PCM_16": 1e-4}
RMS_REL_TOL = 1e-4  # level within 0.01% (~0.001 dB); measured <= 2e-6
FREQ_TOL_HZ = 0.05  # spectral peak location, with parabolic interpolation over a 2 s window
EDGE_S = 0.05  # filter start-up/tail at the ends of the clip, excluded from the comparison


def tone(rate: int, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return TONE_AMP * np.sin(2 * np.pi * TONE_HZ * t)


def peak_frequency(x: np.ndarray, rate: int) -> float:
    """Spectral peak with parabolic interpolation of the log-magnitude (sub-bin accuracy)."""
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    k = int(np.argmax(spec))
    a, b, c = np.log(spec[k - 1 : k + 2])
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * rate / len(x)


@pytest.mark.parametrize("rate", [8000, 11025, 44100, 48000])
@pytest.mark.parametrize("subtype", ["FLOAT", "PCM_16"])
def test_resampled_tone_keeps_frequency_level_and_phase(tmp_path, rate, subtype):
    path = tmp_path / f"tone_{rate}.wav"
    sf.write(path, tone(rate), rate, subtype=subtype)
    notes: list[str] = []
    x = load_audio(path, warn=notes.append)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 2 * SR) <= 1
    assert len(notes) == 1 and str(path) in notes[0] and f"{rate} Hz -> 16000 Hz" in notes[0]
    reference = tone(SR)[: len(x)]  # the same tone sampled at 16 kHz: the exact answer
    edge = int(EDGE_S * SR)
    inner, ref = x[edge:-edge], reference[edge:-edge]
    assert np.max(np.abs(inner - ref)) < TONE_MAX_ERR[subtype]
    assert np.sqrt(np.mean(inner**2)) == pytest.approx(TONE_AMP / np.sqrt(2), rel=RMS_REL_TOL)
    assert peak_frequency(x, SR) == pytest.approx(TONE_HZ, abs=FREQ_TOL_HZ)


def test_16k_mono_is_read_as_is_without_note(tmp_path):
    x = tone(SR).astype(np.float32)
    sf.write(tmp_path / "a.wav", x, SR, subtype="FLOAT")
    notes: list[str] = []
    np.testing.assert_array_equal(load_audio(tmp_path / "a.wav", warn=notes.append), x)
    assert notes == []


@pytest.mark.parametrize(
    "fmt,subtype,tol",
    [
        ("FLAC", "PCM_16", 1 / 32768),
        ("FLAC", "PCM_24", 1 / 2**23),
        ("WAV", "PCM_32", 1 / 2**31),
        ("OGG", "VORBIS", 0.05),
    ],
)
def test_formats_and_integer_pcm(tmp_path, fmt, subtype, tol):
    x = tone(SR).astype(np.float32)
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, x, SR, format=fmt, subtype=subtype)
    y = load_audio(path)
    assert len(y) == len(x)
    assert np.max(np.abs(y - x)) <= tol  # Vorbis is lossy: only a coarse bound


def test_stereo_is_averaged_with_a_note_and_strict_refuses(tmp_path):
    left = tone(SR)
    right = 0.25 * np.cos(2 * np.pi * 1000.0 * np.arange(2 * SR) / SR)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), SR, subtype="FLOAT")
    notes: list[str] = []
    x = load_audio(path, warn=notes.append)
    np.testing.assert_allclose(x, ((left.astype(np.float32) + right.astype(np.float32)) / 2), atol=1e-7)
    assert len(notes) == 1 and "2 channels averaged to mono" in notes[0] and str(path) in notes[0]
    with pytest.raises(D2VError, match="channels") as e:
        load_audio(path, strict=True)
    assert str(path) in str(e.value)


def test_strict_refuses_other_rates(tmp_path):
    path = tmp_path / "a8k.wav"
    sf.write(path, tone(8000), 8000)
    with pytest.raises(D2VError, match="8000 Hz") as e:
        load_audio(path, strict=True)
    assert str(path) in str(e.value)


def test_shared_other_rates(speech_dir):
    """The real 8 kHz / 11.025 kHz / stereo recordings: resampled, averaged, same duration."""
    for path in sorted((speech_dir / "other_rates").glob("*.wav")):
        info = sf.info(path)
        notes: list[str] = []
        x = load_audio(path, warn=notes.append)
        assert abs(len(x) / SR - info.duration) < 1e-3
        assert any("resampled" in n for n in notes)
        assert any("averaged" in n for n in notes) == (info.channels > 1)
        assert np.isfinite(x).all() and 0 < np.abs(x).max() <= 1.0 + 1e-3


# ---------------------------------------------------------------------------------------- bad files
def _write_truncated_wav(path):
    sf.write(path, tone(SR), SR, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_truncated_flac(path):
    sf.write(path, tone(SR), SR, format="FLAC")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_nan(path):
    x = tone(SR).astype(np.float32)
    x[100] = np.nan
    sf.write(path, x, SR, subtype="FLOAT")


def _write_inf(path):
    x = tone(SR).astype(np.float32)
    x[7] = np.inf
    sf.write(path, x, SR, subtype="FLOAT")


BAD_FILES = {
    "missing": (lambda p: None, "no such file"),
    "empty": (lambda p: p.write_bytes(b""), "empty file"),
    "not_audio": (lambda p: p.write_text("this is a text file, not audio\n" * 20), "not an audio file"),
    "header_only": (lambda p: p.write_bytes(b"RIFF\x24\x7d\x00\x00WAVEfmt "), "unreadable or truncated"),
    "truncated_wav": (_write_truncated_wav, "truncated"),
    "truncated_flac": (_write_truncated_flac, "truncated"),
    "no_samples": (lambda p: sf.write(p, np.zeros(0, np.float32), SR), "no audio samples"),
    "nan": (_write_nan, "NaN or infinite"),
    "inf": (_write_inf, "NaN or infinite"),
    "directory": (lambda p: p.mkdir(), "directory"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_message_names_the_file(tmp_path, kind):
    make, expected = BAD_FILES[kind]
    path = tmp_path / f"{kind}.{'flac' if 'flac' in kind else 'wav'}"
    make(path)
    with pytest.raises(D2VError) as e:
        load_audio(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and expected in message
    assert "\n" not in message


def test_arrays_go_through_the_same_checks():
    with pytest.raises(D2VError, match=r"^clip: contains 1 NaN"):
        prepare_audio(np.array([0.0, np.nan, 0.1], np.float32), SR, name="clip")
    with pytest.raises(D2VError, match="^clip: contains no audio"):
        prepare_audio(np.zeros(0, np.float32), SR, name="clip")
    pcm = (tone(SR) * 32767).astype(np.int16)
    np.testing.assert_allclose(prepare_audio(pcm, SR), tone(SR), atol=2 / 32768)


# ---------------------------------------------------------------------------------------- features
def test_normalize_and_pad_batch_match_transformers_feature_extractor():
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(0)
    clips = [(rng.standard_normal(n) * s + m).astype(np.float32) for n, s, m in [(5000, 0.3, 0.1), (3210, 2.0, -1.0)]]
    fe = transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    ref = fe(clips, sampling_rate=SR, padding=True, return_attention_mask=True, return_tensors="np")
    values, mask = pad_batch(clips)
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    np.testing.assert_array_equal(values, ref["input_values"])  # same float32 arithmetic: bit-identical
    values, mask = pad_batch(clips, pad_to=6400, batch_to=4)
    assert values.shape == (4, 6400) and mask[2:].sum() == 0 and (values[1, 3210:] == 0).all()
    np.testing.assert_array_equal(values[:2, :5000], ref["input_values"])
    raw, _ = pad_batch(clips, do_normalize=False)
    np.testing.assert_array_equal(raw[1, :3210], clips[1])


def test_fairseq_normalisation_is_layer_norm_eps_1e5():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal(4000).astype(np.float32) * 1e-3  # small: eps matters
    ref = torch.nn.functional.layer_norm(torch.from_numpy(x), x.shape).numpy()
    np.testing.assert_allclose(normalize(x, eps=FAIRSEQ_NORM_EPS), ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(normalize(x, eps=HF_NORM_EPS), ref, rtol=1e-3)


def test_read_preprocessor_config(tmp_path):
    cfg = read_preprocessor_config(tmp_path)
    assert cfg.do_normalize and cfg.return_attention_mask
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"do_normalize": False, "return_attention_mask": False, "sampling_rate": 16000})
    )
    cfg = read_preprocessor_config(tmp_path)
    assert not cfg.do_normalize and not cfg.return_attention_mask
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(D2VError, match="preprocessor_config.json"):
        read_preprocessor_config(tmp_path)
