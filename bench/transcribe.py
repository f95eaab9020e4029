"""Long-recording transcription: `d2v transcribe`'s Transcriber against transformers' ASR pipeline.

    python bench/transcribe.py                       # 120 s of real speech, base CTC, random weights
    python bench/transcribe.py --minutes 5 --json results/transcribe.json

One long WAV made of the real clips in ../shared/speech/16k end to end, one base-size CTC
checkpoint in the transformers format (random weights, the demo's vocabulary), both sides with
their documented long-audio settings: chunks of 20 s, batch 4 (transformers' pipeline with
`chunk_length_s=20, batch_size=4`; flax-d2v's defaults are the same). Wall time from a cold start
of the call, compile time included (each side is built first; the pipeline's first call also
warms up). Reported as audio seconds per second; the precision of each side is named.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402


def long_recording(seconds: float) -> np.ndarray:
    clips = [c for c, _ in C.load_clips()]
    joined = np.concatenate(clips)
    reps = int(np.ceil(seconds * C.SAMPLE_RATE / len(joined)))
    return np.tile(joined, reps)[: int(seconds * C.SAMPLE_RATE)].astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--precision", default="default", help="flax-d2v precision policy (d2v transcribe's default)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument(
        "--compilation-cache",
        default=None,
        metavar="DIR",
        help="JAX's persistent compilation cache as `d2v` uses it: run twice with one DIR to time a second invocation",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import jax

    from flax_d2v.api.pretrained import load_any
    from flax_d2v.api.transcribe import Transcriber
    from flax_d2v.checkpoint import save_flax
    from flax_d2v.commands.demo import build_base_checkpoint

    cache_entries = None
    if args.compilation_cache:
        from flax_d2v import compile_cache

        cache = Path(args.compilation_cache)
        cache_entries = sum(1 for f in cache.rglob("*") if f.is_file()) if cache.is_dir() else 0
        compile_cache.enable(cache)
    result: dict[str, Any] = {
        "benchmark": "transcribe",
        "machine": C.machine_info(),
        "seconds": args.seconds,
        "flax_precision": args.precision,
        "backend": jax.default_backend(),
        # None: no persistent cache; 0: a first invocation filling it; > 0: a later one reading it
        "compilation_cache_entries_at_start": cache_entries,
    }
    with tempfile.TemporaryDirectory(prefix="d2v-bench-asr-") as tmp:
        hf_dir = build_base_checkpoint(Path(tmp) / "hf", seed=0)
        config, _, params, _ = load_any(hf_dir)
        save_flax(Path(tmp) / "flax", config, params, files_from=str(hf_dir))
        wav = Path(tmp) / "long.wav"
        audio = long_recording(args.seconds)
        sf.write(wav, audio, C.SAMPLE_RATE)

        t0 = time.perf_counter()
        runner = Transcriber(
            str(Path(tmp) / "flax"), batch_size=args.batch_size, chunk_length_s=20.0, precision=args.precision
        )
        flax_text = runner([str(wav)], progress=False)[0].text
        flax_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        runner([str(wav)], progress=False)
        flax_warm_s = time.perf_counter() - t0
        result["flax"] = {
            "cold_s": flax_s,
            "warm_s": flax_warm_s,
            "audio_s_per_s": args.seconds / flax_s,
            "warm_audio_s_per_s": args.seconds / flax_warm_s,
        }
        if not args.no_torch:
            import torch
            import transformers

            device = 0 if torch.cuda.is_available() and jax.default_backend() == "gpu" else -1
            t0 = time.perf_counter()
            pipe = transformers.pipeline("automatic-speech-recognition", model=str(hf_dir), device=device)
            # the array, not the path: the pipeline decodes files with an ffmpeg binary (not needed here)
            pt_text = pipe(
                {"raw": audio, "sampling_rate": C.SAMPLE_RATE}, chunk_length_s=20, batch_size=args.batch_size
            )["text"]
            pt_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            pipe({"raw": audio, "sampling_rate": C.SAMPLE_RATE}, chunk_length_s=20, batch_size=args.batch_size)
            pt_warm_s = time.perf_counter() - t0
            result["pytorch_pipeline"] = {
                "cold_s": pt_s,
                "warm_s": pt_warm_s,
                "audio_s_per_s": args.seconds / pt_s,
                "warm_audio_s_per_s": args.seconds / pt_warm_s,
                "device": "cuda" if device == 0 else "cpu",
            }
            result["speedup_cold"] = pt_s / flax_s
            result["speedup_warm"] = pt_warm_s / flax_warm_s
            result["same_text"] = flax_text == pt_text
    rows = [
        [
            "flax-d2v Transcriber",
            f"{result['flax']['audio_s_per_s']:.1f}",
            f"{result['flax']['warm_audio_s_per_s']:.1f}",
        ]
    ]
    if "pytorch_pipeline" in result:
        t = result["pytorch_pipeline"]
        rows.append(["transformers pipeline", f"{t['audio_s_per_s']:.1f}", f"{t['warm_audio_s_per_s']:.1f}"])
        rows.append(["ratio (flax / pipeline)", f"{result['speedup_cold']:.2f}", f"{result['speedup_warm']:.2f}"])
    print(C.markdown_table(["side", "audio s/s (cold, compile incl.)", "audio s/s (warm)"], rows), file=sys.stderr)
    if args.json:
        C.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
