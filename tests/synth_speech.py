"""Small synthetic corpora for training-loop tests that need no real speech: equal-length clips
(one bucket, so one compiled step) with short transcripts, written as 16 kHz WAV + a TSV manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = ("ten", "of", "clubs", "go", "forward", "seven", "hearts", "feels", "like")


def write_corpus(directory: Path, clips: int, seconds: float = 0.5, seed: int = 0, text: bool = True) -> Path:
    """`clips` noisy harmonic clips of `seconds` each in `directory`; returns the manifest (path[, text])."""
    import soundfile as sf

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    rows = []
    for i in range(clips):
        f0 = 100 + 25 * i
        wave = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) / k for k in range(1, 5))
        wave = (0.2 * wave + 0.05 * rng.normal(size=n)).astype(np.float32)
        path = directory / f"clip{i:03d}.wav"
        sf.write(path, wave, 16000, subtype="FLOAT")
        words = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 2))
        rows.append(f"{path}\t{words}" if text else str(path))
    manifest = directory / "clips.tsv"
    manifest.write_text(("path\ttext\n" if text else "path\n") + "\n".join(rows) + "\n")
    return manifest
