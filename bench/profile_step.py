"""Where a train step's time goes: a `jax.profiler` trace of the CTC step, summarised on the spot.

    python bench/profile_step.py --batch 64 --seconds 10 --dtype bfloat16 --scan-layers

Runs the same step as `bench/train.py` (base, conv encoder frozen, AdamW), traces a few steps,
and reads the trace back with `jax.profiler.ProfileData` (no TensorBoard needed, so it works on a
machine with no network): device time per kernel, grouped by kernel name and by the XLA op that
launched it, and the share of the step the device was busy (the rest is launch overhead or host
work). The trace itself is kept under `--trace-dir` for TensorBoard / Perfetto.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import time
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import train as T  # noqa: E402
from flax_d2v.train import vocab as V  # noqa: E402


def _stat(event: Any, name: str) -> Any:
    for k, v in event.stats:
        if k == name:
            return v
    return None


def summarise(xplane: str, steps: int, top: int = 25) -> dict[str, Any]:
    from jax._src.profiler import ProfileData

    data = ProfileData.from_file(xplane)
    by_kernel: collections.Counter = collections.Counter()
    by_op: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    busy = 0.0
    span = [np.inf, -np.inf]
    planes = [p for p in data.planes if p.name.startswith("/device:")]
    for plane in planes[:1]:
        for line in plane.lines:
            if "Stream" not in line.name and plane.name.startswith("/device:GPU"):
                continue
            for e in line.events:
                d = e.duration_ns / 1e6
                by_kernel[e.name[:90]] += d
                count[e.name[:90]] += 1
                op = _stat(e, "hlo_op") or _stat(e, "tf_op") or "?"
                by_op[str(op)[:60]] += d
                busy += d
                span[0] = min(span[0], e.start_ns)
                span[1] = max(span[1], e.start_ns + e.duration_ns)
    wall_ms = (span[1] - span[0]) / 1e6 if busy else 0.0
    return {
        "device_plane": planes[0].name if planes else None,
        "busy_ms_per_step": busy / steps,
        "span_ms_per_step": wall_ms / steps,
        "kernels": [(k, v / steps, count[k] // steps) for k, v in by_kernel.most_common(top)],
        "ops": [(k, v / steps) for k, v in by_op.most_common(top)],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="base")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ablate", default="", help="as bench/train.py --ablate (all at once)")
    p.add_argument("--trace-dir", default="/tmp/d2v-trace")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    clips = C.load_clips()
    x, texts = C.speech_batch(clips, args.batch, args.seconds)
    vocab = V.build_vocab(texts)
    overrides = {
        "layerdrop": 0.0,
        "ctc_loss_reduction": "sum",
        "vocab_size": max(32, len(vocab)),
        "pad_token_id": V.PAD_ID,
    }
    with C.hf_checkpoint(args.size, ctc=True, **overrides) as path:
        module, params = T.flax_module(path, args.dtype, args.scan_layers)
    labels = T.encode_labels(texts, vocab, max_len=x.shape[1] // 640)  # half the frames (320 samples each)
    side = T.flax_side(module, params, x, labels, ablate=frozenset(a for a in args.ablate.split(",") if a))
    for _ in range(2):
        side["call"]()
    t0 = time.perf_counter()
    with jax.profiler.trace(args.trace_dir):
        for _ in range(args.steps):
            side["call"]()
    wall = (time.perf_counter() - t0) / args.steps
    xplane = sorted(glob.glob(os.path.join(args.trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)[
        -1
    ]
    s = summarise(xplane, args.steps)
    s.update(
        wall_ms_per_step=1000 * wall,
        compile_s=side["compile_s"],
        batch=args.batch,
        seconds=args.seconds,
        dtype=args.dtype,
        scan_layers=args.scan_layers,
    )
    print(
        f"step wall {1000 * wall:.1f} ms, device busy {s['busy_ms_per_step']:.1f} ms "
        f"({s['device_plane']}), compile {side['compile_s']:.1f} s",
        file=sys.stderr,
    )
    print(
        C.markdown_table(["kernel", "ms/step", "launches/step"], [[k, f"{v:.2f}", n] for k, v, n in s["kernels"]]),
        file=sys.stderr,
    )
    print(C.markdown_table(["XLA op", "ms/step"], [[k, f"{v:.2f}"] for k, v in s["ops"]]), file=sys.stderr)
    if args.json:
        C.write_json(args.json, s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
