"""d2v verify SRC: layer-by-layer parity report, Flax against transformers' PyTorch model, on real audio.

Exit status 1 when any stage is outside the tolerance (`flax_d2v.api.verify.PARITY_RTOL`).
`d2v verify CKPT.pt --objective REF.npz`: one pretraining step against fairseq's own loss, targets,
predictions and gradients (`flax_d2v.train.verify_objective`), exit 1 outside its tolerances.
`--train`: fine-tuning steps instead, `d2v finetune`'s against transformers + torch.optim.AdamW
(`flax_d2v.train.verify_train`), exit status 1 outside its tolerances.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from flax_d2v.api.verify import format_table, markdown_report, plot_errors, verify
from flax_d2v.errors import D2VError
from flax_d2v.fileio import atomic_write_bytes, atomic_write_text
from flax_d2v.paths import as_path, localize
from flax_d2v.precision import add_argument as add_precision_argument
from flax_d2v.train import verify_objective
from flax_d2v.train import verify_train as vt


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
        default=None,
        help="PyTorch reference precision (default float32; with --train float64: the exact step, since an fp32 "
        "step of a ReLU x-vector head is itself up to 5e-4 off it)",
    )
    p.add_argument("--no-batch", action="store_true", help="skip the padded-batch case")
    p.add_argument(
        "--objective",
        default=None,
        metavar="REF.npz",
        help="check one pretraining step (loss, targets, predictions, every gradient) of SRC, a fairseq "
        "data2vec 1.0/2.0 .pt (or .pt.xz), against fairseq's own numbers in REF.npz",
    )
    train = p.add_argument_group("training parity (--train)")
    train.add_argument(
        "--train",
        action="store_true",
        help="compare fine-tuning steps: d2v finetune's step against transformers + torch.optim.AdamW",
    )
    train.add_argument("--steps", type=int, default=None, help="updates to compare (default 20)")
    train.add_argument(
        "--manifest",
        default=None,
        metavar="TRAIN.tsv",
        help="training clips with labels (TSV path + text, or path + --label-column; or a fairseq manifest); "
        "default: --audio with drawn labels",
    )
    train.add_argument(
        "--label-column", default=None, help="the manifest's label column (classification, x-vectors; default label)"
    )
    add_precision_argument(
        p,
        "highest",
        "like with like: the reference is fp32 with TF32 off; default or bf16 "
        "show what training computes, against their own measured tolerance",
    )


def run(args: argparse.Namespace) -> int:
    if args.objective is not None:
        return run_objective(args)
    if getattr(args, "train", False):
        return run_train(args)
    for flag in ("steps", "manifest", "label_column"):
        if getattr(args, flag, None) is not None:
            raise D2VError(f"--{flag.replace('_', '-')}: only with --train")
    src = localize(args.src)  # a bucket URL: its local copy (transformers loads local directories)
    dtype = args.reference_dtype or "float32"
    rows, facts = verify(src, args.audio, dtype, batch=not args.no_batch, precision=args.precision)
    ok = all(r.passed for r in rows)
    print(format_table(rows))
    print(
        f"\n{'PASS' if ok else 'FAIL'}: {sum(r.passed for r in rows)}/{len(rows)} stages within "
        f"{facts['tolerance']:g} of the reference's largest magnitude\n  flax: {facts['flax']}\n"
        f"  reference: {facts['reference']}"
    )
    if args.report:
        report = as_path(args.report)
        png = report.with_suffix(".png")
        report.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        plot_errors(rows, buf)
        atomic_write_bytes(png, buf.getvalue())
        atomic_write_text(report, markdown_report(rows, facts, png.name))
        print(f"report: {report} (plot: {png})")
    return 0 if ok else 1


def run_objective(args: argparse.Namespace) -> int:
    """`--objective`: the table of `flax_d2v.train.verify_objective`; exit 1 outside its tolerances."""
    if args.audio or args.report or args.no_batch or args.reference_dtype:
        raise D2VError(
            "--objective: --audio, --report, --no-batch and --reference-dtype do not apply "
            "(the reference holds the batch and fairseq's numbers)"
        )
    rows, facts = verify_objective.verify_objective(args.src, args.objective)
    checked = [r for r in rows if r.tolerance is not None]
    ok = all(r.passed for r in checked)
    print(verify_objective.format_table(rows))
    print(
        f"\n{'PASS' if ok else 'FAIL'}: {sum(r.passed for r in checked)}/{len(checked)} checks "
        f"({facts['model']}, {facts['parameters']} gradients; worst gradient error {facts['worst_grad']:.2e}, "
        f"loss {facts['loss_rel']:.2e} relative)\n  ours: {facts['checkpoint']}\n  fairseq: {facts['reference']}"
    )
    return 0 if ok else 1


def run_train(args: argparse.Namespace) -> int:
    """`d2v verify MODEL --train`: the training parity report (`flax_d2v.train.verify_train`)."""
    result = vt.verify_train(
        args.src,
        steps=vt.DEFAULT_STEPS if args.steps is None else args.steps,
        audio=args.audio,
        manifest=args.manifest,
        label_column=args.label_column,
        precision=args.precision,
        reference_dtype=args.reference_dtype or vt.REFERENCE_DTYPE,
    )
    print(vt.format_table(result))
    print(vt.format_losses(result))
    for line in result.failures():
        print(f"FAIL {line}")
    print(f"\n{vt.summary(result)}\n  flax: {result.facts['flax']}\n  reference: {result.facts['reference']}")
    if args.report:
        report = Path(args.report)
        png = report.with_suffix(".png")
        report.parent.mkdir(parents=True, exist_ok=True)
        vt.plot(result, png)
        atomic_write_text(report, vt.markdown_report(result, png.name))
        print(f"report: {report} (plot: {png})")
    return 0 if result.passed else 1
