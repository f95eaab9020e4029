"""Input pipeline throughput: audio seconds loaded, resampled, normalised, bucketed and padded per second.

    python bench/loader.py                                  # workers 1, 2, 4; from files and from shards
    python bench/loader.py --workers 1,4,16 --batches 200 --sources shards --json results/loader.json

The real training loader (`flax_d2v.train.loader.BatchLoader` on grain, the one `d2v finetune`
runs) with CTC labels, over `../shared/speech/transcripts.tsv` repeated to a long epoch (all 17
clips: 16 kHz, 11.025 kHz and 8 kHz, mono and stereo), read two ways:
- `files`: every batch decodes its files again (the page cache keeps them in memory, as for a
  local dataset that fits in RAM) and resamples the 11.025 and 8 kHz ones;
- `shards`: the same clips packed once by `d2v prepare` (pcm16, already 16 kHz): no decoding.

`workers` are grain worker processes (0: in this process, with threads). The figure to compare
with the train step's appetite is audio seconds per second. On a shared machine it says little;
the CPU time of this process and its workers per audio second (`cpu_s_per_audio_s`) does not
depend on what else runs there. Memory: the peak RSS (VmHWM) of each worker process and of this
one, read from /proc at the end of a measurement (Linux).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

from flax_d2v.train import vocab as V  # noqa: E402
from flax_d2v.train.loader import BatchLoader  # noqa: E402
from flax_d2v.train.manifests import Manifest, read_manifest  # noqa: E402
from flax_d2v.train.prepare import prepare  # noqa: E402


class Repeat:
    """Reader of a manifest repeated `copies` times: clip i is clip i mod n of the base (picklable)."""

    def __init__(self, base: Manifest) -> None:
        self.base, self.n = base, len(base)

    def __call__(self, i: int) -> np.ndarray:
        return self.base.load(i % self.n)


def repeated(m: Manifest, copies: int, by_reader: bool) -> Manifest:
    m.lengths()
    texts = None if m.texts is None else [t or "" for t in m.texts] * copies
    lengths = np.tile(m.num_samples, copies)
    reader = Repeat(m) if by_reader else None
    return Manifest(m.source + f" x{copies}", list(m.paths) * copies, texts, lengths, reader=reader)


def peak_rss_mib(pid: int | str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (/proc/PID/stat), 0.0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pids() -> list[int]:
    """This process's grain worker processes (multiprocessing's spawned children)."""
    pids: list[int] = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(x) for x in f.read().split()]
    except OSError:
        return []
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    out.append(pid)
        except OSError:
            continue
    return out


def measure(
    manifest: Manifest, source: str, workers: int, batch_size: int, batches: int, warmup: int
) -> dict[str, Any]:
    vocab = V.build_vocab([t for t in manifest.texts if t])
    loader = BatchLoader(
        manifest, batch_size=batch_size, vocab=vocab, seed=0, num_workers=workers, max_seconds=20.0, prefetch=2
    )
    t_start = time.perf_counter()
    for _ in range(warmup):  # includes spawning the workers
        next(loader)
    startup = time.perf_counter() - t_start
    audio = padded = 0.0
    pids = worker_pids()
    main0 = time.process_time()
    cpu0 = main0 + sum(cpu_seconds(p) for p in pids)
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(loader)
        audio += float(np.asarray(b["seconds"]).sum())
        padded += b["input_values"].size / C.SAMPLE_RATE
    dt = time.perf_counter() - t0
    main_cpu = time.process_time() - main0
    cpu = main_cpu + sum(cpu_seconds(p) for p in pids) - (cpu0 - main0)
    rss = [peak_rss_mib(p) for p in worker_pids()]
    rss = [r for r in rss if r is not None]
    loader.close()
    return {
        "source": source,
        "workers": workers,
        "batch_size": batch_size,
        "batches": batches,
        "seconds": dt,
        "startup_seconds": startup,
        "audio_s_per_s": audio / dt,
        "audio_s_per_s_per_worker": audio / dt / max(workers, 1),
        "padded_fraction": 1 - audio / padded,
        # CPU of this process and its workers per second of audio: what a machine's cores can feed,
        # independent of what else runs on it (at N free cores: N / cpu_s_per_audio_s audio s/s)
        "cpu_s_per_audio_s": cpu / audio,
        "main_cpu_s_per_audio_s": main_cpu / audio,  # this process alone: its share bounds the throughput
        "peak_rss_mib_per_worker": max(rss) if rss else None,
        "peak_rss_mib_main": peak_rss_mib(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2,4", help="comma list of worker process counts (0: in this process)")
    p.add_argument("--sources", default="files,shards", help="files, shards or both")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--copies", type=int, default=200, help="times the 17 clips are repeated in the epoch")
    p.add_argument("--target", type=float, default=None, help="audio s/s the train step needs (printed beside)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    files = read_manifest(str(C.find_speech_dir() / "transcripts.tsv"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="d2v-bench-shards-") as tmp:
        sources = {}
        for source in args.sources.split(","):
            if source == "files":
                sources[source] = repeated(files, args.copies, by_reader=False)
            elif source == "shards":
                prepare(files.source, os.path.join(tmp, "shards"), progress=False)
                sources[source] = repeated(read_manifest(os.path.join(tmp, "shards")), args.copies, by_reader=True)
            else:
                p.error(f"--sources: unknown source {source!r} (files, shards)")
        for source, manifest in sources.items():
            for w in args.workers.split(","):
                rows.append(measure(manifest, source, int(w), args.batch_size, args.batches, args.warmup))
                print(f"{source} {w} workers: {rows[-1]['audio_s_per_s']:.0f} audio s/s", file=sys.stderr, flush=True)
    result = {
        "benchmark": "loader",
        "machine": C.machine_info(),
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "target_audio_s_per_s": args.target,
    }
    mib = lambda x: "-" if x is None else f"{x:.0f} MiB"  # noqa: E731
    table = C.markdown_table(
        [
            "source",
            "workers",
            "audio s/s",
            "per worker",
            "CPU ms / audio s (main)",
            "padding",
            "peak RSS / worker",
            "RSS",
        ],
        [
            [
                r["source"],
                r["workers"],
                f"{r['audio_s_per_s']:.0f}",
                f"{r['audio_s_per_s_per_worker']:.0f}",
                f"{1000 * r['cpu_s_per_audio_s']:.3f} ({1000 * r['main_cpu_s_per_audio_s']:.3f})",
                f"{100 * r['padded_fraction']:.0f}%",
                mib(r["peak_rss_mib_per_worker"]),
                mib(r["peak_rss_mib_main"]),
            ]
            for r in rows
        ],
    )
    print(table + (f"\ntarget: {args.target:.0f} audio s/s" if args.target else ""), file=sys.stderr)
    if args.json:
        C.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
