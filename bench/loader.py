"""Input pipeline throughput: audio seconds decoded, resampled, normalised, bucketed and padded per second.

    python bench/loader.py                          # workers 1 and all cores, 30 s of timing each
    python bench/loader.py --workers 1,4,16 --batches 200 --json results/loader.json

The real training loader (`flax_d2v.train.loader.BatchLoader`, the one `d2v finetune` runs) over
`../shared/speech/transcripts.tsv` repeated to a long epoch (all 17 files: 16 kHz, 11.025 kHz and
8 kHz, mono and stereo, so decoding and resampling are both in the figure), with CTC labels. The
loader's file cache is not involved: every batch reads its files again (the page cache keeps them
in memory, as for a local dataset that fits in RAM). The figure to compare with the train step's
appetite is audio seconds per second; per worker it is that divided by the worker count.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

from flax_d2v.train import vocab as V  # noqa: E402
from flax_d2v.train.loader import BatchLoader  # noqa: E402
from flax_d2v.train.manifests import Manifest, read_manifest  # noqa: E402


def repeated_manifest(copies: int) -> Manifest:
    m = read_manifest(str(C.find_speech_dir() / "transcripts.tsv"))
    m.lengths()
    texts = None if m.texts is None else [t or "" for t in m.texts] * copies
    return Manifest(m.source + f" x{copies}", list(m.paths) * copies, texts, np.tile(m.num_samples, copies))


def measure(manifest: Manifest, workers: int, batch_size: int, batches: int, warmup: int) -> dict[str, Any]:
    vocab = V.build_vocab([t for t in manifest.texts if t])
    loader = BatchLoader(
        manifest, batch_size=batch_size, vocab=vocab, seed=0, num_workers=workers, max_seconds=20.0, prefetch=4
    )
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    audio = padded = 0.0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        audio += float(np.asarray(b["seconds"]).sum())
        padded += b["input_values"].size / C.SAMPLE_RATE
    dt = time.perf_counter() - t0
    loader.close()
    return {
        "workers": workers,
        "batch_size": batch_size,
        "batches": batches,
        "seconds": dt,
        "audio_s_per_s": audio / dt,
        "audio_s_per_s_per_worker": audio / dt / workers,
        "padded_fraction": 1 - audio / padded,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default=f"1,{os.cpu_count()}", help="comma list of worker counts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--copies", type=int, default=200, help="times the 17 files are repeated in the epoch")
    p.add_argument("--target", type=float, default=None, help="audio s/s the train step needs (printed beside)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    manifest = repeated_manifest(args.copies)
    rows = [measure(manifest, int(w), args.batch_size, args.batches, args.warmup) for w in args.workers.split(",")]
    result = {
        "benchmark": "loader",
        "machine": C.machine_info(),
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "target_audio_s_per_s": args.target,
    }
    table = C.markdown_table(
        ["workers", "audio s / s", "per worker", "padding", "target"],
        [
            [
                r["workers"],
                f"{r['audio_s_per_s']:.0f}",
                f"{r['audio_s_per_s_per_worker']:.0f}",
                f"{100 * r['padded_fraction']:.0f}%",
                f"{args.target:.0f}" if args.target else "-",
            ]
            for r in rows
        ],
    )
    print(table, file=sys.stderr)
    if args.json:
        C.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
