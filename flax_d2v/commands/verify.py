"""d2v verify SRC: layer-by-layer parity report, Flax against transformers' PyTorch model, on real audio.

Exit status 1 when any stage is outside the tolerance (`flax_d2v.api.verify.PARITY_RTOL`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flax_d2v.api.verify import format_table, markdown_report, plot_errors, verify
from flax_d2v.fileio import atomic_write_text
from flax_d2v.precision import add_argument as add_precision_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="HF model dir, flax-d2v dir, or fairseq .pt")
    p.add_argument(
        "--audio",
        nargs="+",
        default=[],
        metavar="FILE",
        help="audio files (default: the bundled LibriVox clip); several make the padded batch",
    )
    p.add_argument(
        "--report",
        default=None,
        metavar="REPORT.md",
        help="write a Markdown report and a PNG plot of error by layer (REPORT.png) beside it",
    )
    p.add_argument(
        "--reference-dtype",
        choices=["float32", "float64"],
        default="float32",
        help="PyTorch reference precision (default float32)",
    )
    p.add_argument("--no-batch", action="store_true", help="skip the padded-batch case")
    add_precision_argument(
        p,
        "highest",
        "like with like: the reference is fp32 with TF32 off; default or bf16 "
        "show what training computes, against their own measured tolerance",
    )


def run(args: argparse.Namespace) -> int:
    rows, facts = verify(args.src, args.audio, args.reference_dtype, batch=not args.no_batch, precision=args.precision)
    ok = all(r.passed for r in rows)
    print(format_table(rows))
    print(
        f"\n{'PASS' if ok else 'FAIL'}: {sum(r.passed for r in rows)}/{len(rows)} stages within "
        f"{facts['tolerance']:g} of the reference's largest magnitude\n  flax: {facts['flax']}\n"
        f"  reference: {facts['reference']}"
    )
    if args.report:
        report = Path(args.report)
        png = report.with_suffix(".png")
        report.parent.mkdir(parents=True, exist_ok=True)
        plot_errors(rows, png)
        atomic_write_text(report, markdown_report(rows, facts, png.name))
        print(f"report: {report} (plot: {png})")
    return 0 if ok else 1
