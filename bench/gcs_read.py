"""Audio read rate from a bucket against local files: does reading `gs://` clips starve training?

    python bench/gcs_read.py [--repeats 3] [--json gcs_read.json]

Reads the same clips (`../shared/speech/16k`, or `$D2V_SHARED_SPEECH`) through `flax_d2v.audio.load_audio`
from local files and from `gs://bucket/...` objects served by `gcp-storage-emulator` (a real GCS JSON
API server, in its own process, on localhost: `tests/gcs_emulator.py`), and reports audio seconds
decoded per second of wall time and the bytes per second read, for each. On localhost the bucket's
cost is the HTTP round trip and the copies through gcsfs, not a network; a real bucket adds its
latency per object. Figures on a loaded machine say only whether a path is grossly slow.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def speech_clips() -> list[Path]:
    root = Path(os.environ.get("D2V_SHARED_SPEECH") or REPO.parent / "shared" / "speech")
    clips = sorted((root / "16k").glob("*.wav"))
    if not clips:
        sys.exit(f"{root}/16k: no clips (set D2V_SHARED_SPEECH)")
    return clips


def read_all(names: list[str]) -> tuple[float, float]:
    """(seconds of audio, wall seconds) to load every clip once."""
    from flax_d2v.audio import SAMPLE_RATE, load_audio

    t0 = time.perf_counter()
    total = sum(len(load_audio(n)) for n in names) / SAMPLE_RATE
    return total, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from gcs_emulator import Bucket, client_env

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "gcs_emulator.py"), str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout.readline().strip() == "ready"
        env = client_env(port)
        os.environ.update(env)  # before gcsfs is imported (flax_d2v imports it only on the first URL)
        bucket = Bucket(env)
        clips = speech_clips()
        urls = [bucket.put(f"bench/{c.name}", c.read_bytes()) for c in clips]
        nbytes = sum(c.stat().st_size for c in clips)
        read_all(urls[:1] + [str(clips[0])])  # warm-up: imports, the gcsfs session
        report: dict = {"clips": len(clips), "bytes": nbytes}
        for name, names in (("local", [str(c) for c in clips]), ("gcs_emulator", urls)):
            runs = [read_all(names) for _ in range(args.repeats)]
            audio = runs[0][0]
            best = min(w for _, w in runs)
            report[name] = {
                "audio_s": round(audio, 3),
                "best_wall_s": round(best, 4),
                "audio_s_per_s": round(audio / best, 1),
                "mb_per_s": round(nbytes / best / 1e6, 2),
            }
            print(
                f"{name:13s} {audio:.1f} s of audio in {best:.3f} s: {audio / best:.0f} audio s/s, "
                f"{nbytes / best / 1e6:.1f} MB/s"
            )
        report["bucket_over_local"] = round(report["gcs_emulator"]["best_wall_s"] / report["local"]["best_wall_s"], 2)
    finally:
        server.terminate()
        server.wait(timeout=30)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
