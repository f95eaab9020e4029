"""The one table `bench/gpu_check.sh` prints last: every figure of the GPU check, read from its outputs.

    python bench/gpu_summary.py OUT_DIR

Reads the JSON files the benchmarks wrote (`infer-*.json`, `train-*.json`, `loader.json`,
`transcribe.json`, `pretrain-*.json`) and the logs of `d2v demo` / `d2v verify`, and prints one Markdown table with
the target beside each figure. Missing pieces (a stage that failed or was not run) show as such.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

PASS_LINE = re.compile(r"(PASS|FAIL): (\d+)/(\d+) stages within ([0-9.e+-]+)")


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _log_result(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "not run"
    m = PASS_LINE.findall(text)
    if not m:
        return "no result (see " + path.name + ")"
    verdict, ok, n, tol = m[-1]
    return f"{verdict} {ok}/{n} within {tol}"


PRETRAIN_NAMES = {"data2vec": "data2vec 1.0 update (EMA teacher)", "data2vec2": "data2vec 2.0 update (clones, decoder)"}
NO_PYTORCH = {
    "data2vec": "transformers has no 1.0 pretraining objective",
    "data2vec2": "2.0's objective is fairseq's only",
}


def pretrain_rows(r: dict[str, Any] | None) -> list[list[str]]:
    """`bench/pretrain_v2.py`'s figures: each objective's update time and MFU, 2.0's time against 1.0's."""
    if r is None:
        return []
    rows = []
    peak = r["matmul_peak"]["gflops"] / 1000
    for arch, c in r["cases"].items():
        clones = f", clone {r['clone_batch']}" if arch == "data2vec2" else ""
        fig = (
            f"Flax {1000 * c['median_s']:.0f} ms, {100 * c['fraction_of_matmul_peak']:.0f}% MFU of {peak:.3g} TFLOP/s, "
            f"compile {c['compile_s']:.1f} s; no PyTorch side ({NO_PYTORCH[arch]})"
        )
        target = ">= 35% MFU at 64 x 10 s" if arch == "data2vec" else "MFU reported; time against 1.0's"
        label = f"{PRETRAIN_NAMES[arch]} {r['batch']} x {r['seconds']:g} s {r['dtype']}{clones}"
        rows.append([label, fig, target])
    if "v2_over_v1_time" in r:
        rows.append(
            [
                f"data2vec 2.0 / 1.0 time per update, same audio ({r['batch']} x {r['seconds']:g} s)",
                f"{r['v2_over_v1_time']:.2f}",
                "reported",
            ]
        )
    return rows


def rows(out: Path) -> list[list[str]]:
    table: list[list[str]] = []
    table.append(["d2v demo (precision highest)", _log_result(out / "demo.log"), "PASS 32/32"])
    for p in ("default", "bf16"):
        table.append([f"d2v verify --precision {p}", _log_result(out / f"verify-{p}.log"), "PASS vs its tolerance"])
    for dtype in ("float32", "bfloat16"):
        r = _json(out / f"infer-{dtype}.json")
        if r is None:
            table.append([f"forward {dtype}", "not run", ""])
            continue
        peak = r["matmul_peak"]["gflops"] / 1000
        for c in r["cases"]:
            f, t, tc = c["flax"], c.get("pytorch"), c.get("pytorch_compile")
            fig = f"Flax {1000 * f['median_s']:.1f} ms"
            if t:
                fig += f", PT eager {1000 * t['median_s']:.1f} ms ({c['speedup_flax_over_pytorch']:.2f}x)"
            if tc:
                fig += f", PT compile {1000 * tc['median_s']:.1f} ms ({c['speedup_flax_over_pytorch_compile']:.2f}x)"
            fig += f"; {100 * f['fraction_of_matmul_peak']:.0f}% of {peak:.3g} TFLOP/s"
            target = ">= 1.5x eager, >= 1x compile" if dtype == "bfloat16" else ""
            if dtype == "bfloat16" and c["batch"] == 1 and c["seconds"] == 10:
                target += ", < 8 ms"
            table.append([f"forward {c['batch']} x {c['seconds']:g} s {dtype}", fig, target])
    for path in sorted(out.glob("train-*.json")):
        r = _json(path)
        if r is None:
            continue
        f, t = r["flax"], r.get("pytorch")
        peak = r["matmul_peak"]["gflops"] / 1000
        fig = (
            f"Flax {1000 * f['median_s']:.0f} ms, {100 * f['fraction_of_matmul_peak']:.0f}% MFU of {peak:.3g} "
            f"TFLOP/s, compile {f['compile_s']:.1f} s"
        )
        if t:
            fig += f"; PT eager {1000 * t['median_s']:.0f} ms ({r['speedup_flax_over_pytorch']:.2f}x)"
        big = r["batch"] >= 64
        target = (">= 45% MFU" if big else ">= 25% MFU") + ", compile < 10 s"
        layout = "scan" if f.get("scan_layers") else "unrolled layers"
        prng = r.get("prng") or "threefry2x32"
        label = f"train step {r['batch']} x {r['seconds']:g} s {r['dtype']} ({layout}, {prng})"
        table.append([label, fig, target])
        for a in r.get("ablations", []):
            table.append(
                [
                    f"  ablation {a['ablation']}",
                    f"{1000 * a['median_s']:.0f} ms (saves {100 * a['saves_fraction']:.0f}%)",
                    "",
                ]
            )
    for path in sorted(out.glob("pretrain-*.json")):
        table += pretrain_rows(_json(path))
    r = _json(out / "loader.json")
    if r is not None:
        for source in sorted({x.get("source", "files") for x in r["rows"]}):
            rows = [x for x in r["rows"] if x.get("source", "files") == source]
            best = max(rows, key=lambda x: x["audio_s_per_s"])
            one = min(rows, key=lambda x: x["workers"])
            rss = best.get("peak_rss_mib_per_worker")
            table.append(
                [
                    f"input pipeline, {source}",
                    f"{best['audio_s_per_s']:.0f} audio s/s with {best['workers']} workers "
                    f"({one['audio_s_per_s_per_worker']:.0f} per worker alone"
                    + (f"; peak RSS {rss:.0f} MiB per worker)" if rss else ")"),
                    f">= {r.get('target_audio_s_per_s') or 9000:.0f} audio s/s",
                ]
            )
    for name, what in (("transcribe.json", "first run"), ("transcribe-cached.json", "second run, compile cache")):
        r = _json(out / name)
        if r is None:
            continue
        fig = f"Flax {r['flax']['audio_s_per_s']:.0f} audio s/s (cold)"
        if "pytorch_pipeline" in r:
            fig += (
                f", pipeline {r['pytorch_pipeline']['audio_s_per_s']:.0f} ({r['speedup_cold']:.2f}x; warm "
                f"{r['speedup_warm']:.2f}x)"
            )
        table.append([f"transcribe {r['seconds']:.0f} s ({what})", fig, ">= 2x the pipeline"])
    return table


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "bench/results-gpu")
    gpu = (out / "gpu.csv").read_text().strip().splitlines()[-1] if (out / "gpu.csv").is_file() else "?"
    print(f"\n## GPU check: {gpu}\n")
    lines = ["| figure | measured | target |", "|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(out)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
