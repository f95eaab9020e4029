"""What a run writes about itself: `RUN/metrics.jsonl`, optional TensorBoard, the end-of-run plot, WER/CER.

`metrics.jsonl` has one JSON object per line: training rows (`step`, `loss`, `lr`, `grad_norm`,
`steps_per_s`, `audio_s_per_s`, plus the objective's own metrics) every `--log-every` updates,
averaged over the updates since the previous row, and eval rows (`step`, `wer`, `cer`, ...).
Only process 0 writes. Each line is flushed as it is written; a resumed run first drops the
rows past the step it resumes from (and a line torn by a kill), so the file always describes one
consistent history. In a bucket, where nothing can be appended, the file is rewritten whole at
each checkpoint (`MetricsWriter.sync`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from flax_d2v.errors import D2VError
from flax_d2v.fileio import atomic_write_bytes, atomic_write_text
from flax_d2v.paths import AnyPath, as_path, is_url, reporting


def _clean(v: Any) -> Any:
    v = float(v) if not isinstance(v, (int, str, bool)) else v
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no inf/nan
    return v


class MetricsWriter:
    """`metrics.jsonl` (+ TensorBoard) on process 0; a no-op elsewhere.

    On disk each row is appended and flushed as it comes. An object store (`RUN` a `gs://` URL)
    cannot append: the rows are kept in memory and the whole object is rewritten by `sync()`, which
    the loop calls after each checkpoint save and at the end; a preempted run thus loses at most the
    rows since its last checkpoint, and the resumed run drops the rows past its step
    (`truncate_after`) before continuing, so no row is written twice. TensorBoard's event files are
    written to a local directory and copied to `RUN/tensorboard/` by the same `sync()`.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = False) -> None:
        self.path = as_path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.remote = is_url(run_dir)
        self._rows: list[str] | None = None  # remote: the history, loaded on first use
        self._tb = None
        self._tb_local: str | None = None
        if enabled and tensorboard:
            try:  # TensorFlow's own summary writer; the `tensorboard` package is only needed to view them
                import tensorflow as tf
                from tensorflow.core.framework import summary_pb2
            except ImportError:
                raise D2VError("--tensorboard: needs tensorflow (pip install tensorflow-cpu)") from None
            self._tf = tf
            # what tensorboard's `summary.scalar` writes: a float32 scalar tensor tagged for the scalars plugin
            self._scalar_metadata = summary_pb2.SummaryMetadata()
            self._scalar_metadata.plugin_data.plugin_name = "scalars"
            self._tb_dir = as_path(run_dir) / "tensorboard"
            if self.remote:
                self._tb_local = tempfile.mkdtemp(prefix="d2v-tensorboard-")
            self._tb = tf.summary.create_file_writer(self._tb_local or str(self._tb_dir))

    def _history(self) -> list[str]:
        if self._rows is None:
            with reporting(self.path):
                text = self.path.read_bytes().decode("utf-8") if self.path.exists() else ""
            self._rows = [line for line in text.splitlines() if _parse(line) is not None]
        return self._rows

    def truncate_after(self, step: int) -> None:
        """Drop rows with `step` > `step` (a resumed run rewrites that part of the history)."""
        if not self.enabled:
            return
        if self.remote:
            rows = self._history()
            kept = [line for line in rows if _parse(line).get("step", 0) <= step]
            if len(kept) != len(rows):
                self._rows = kept
                self.sync()
            return
        if not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [json.dumps(r) for r in map(_parse, rows) if r is not None and r.get("step", 0) <= step]
        if len(kept) != len(rows):
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: _clean(v) for k, v in row.items()}
        if self.remote:
            self._history().append(json.dumps(row))
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
        if self._tb is not None:
            step = int(row["step"])
            with self._tb.as_default():
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self._tf.summary.write(
                            k, self._tf.constant(float(v), self._tf.float32), step=step, metadata=self._scalar_metadata
                        )
            self._tb.flush()

    def sync(self) -> None:
        """Remote run: the whole history as one object (and the event files copied); on disk: nothing to do."""
        if not (self.enabled and self.remote):
            return
        atomic_write_text(self.path, "".join(line + "\n" for line in self._history()))
        if self._tb_local is not None:
            self._tb.flush()
            for name in sorted(os.listdir(self._tb_local)):
                with open(os.path.join(self._tb_local, name), "rb") as f:
                    atomic_write_bytes(self._tb_dir / name, f.read())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        self.sync()
        if self._tb_local is not None:
            shutil.rmtree(self._tb_local, ignore_errors=True)
            self._tb_local = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of `metrics.jsonl` (or of `RUN/metrics.jsonl` for a run directory), file or URL."""
    path = as_path(path)
    with reporting(path):
        if path.is_dir():
            path = path / "metrics.jsonl"
        text = path.read_bytes().decode("utf-8")
    return [r for r in map(_parse, text.splitlines()) if r is not None]


def _parse(line: str) -> dict[str, Any] | None:
    """A row, or None for a blank line or the torn last line of a killed process."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


EMPTY_REFERENCE = "<empty>"  # what an empty reference is scored as: jiwer refuses empty references


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus WER and CER (jiwer: edit operations summed over all utterances / reference length)."""
    import jiwer

    refs = [r if r.strip() else EMPTY_REFERENCE for r in references]
    hyps = list(hypotheses)
    return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps))}


def equal_error_rate(scores: Sequence[float], same: Sequence[bool]) -> float:
    """Speaker-verification EER of trials scored `scores` (higher: more alike), `same` when both sides are
    one speaker: at the threshold where the false-acceptance rate (other-speaker trials scored at or
    above it) and the false-rejection rate (same-speaker trials below it) are closest, their mean.
    NaN without trials of both kinds."""
    s, y = np.asarray(scores, np.float64), np.asarray(same, bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"equal_error_rate: {s.shape} scores for {y.shape} labels")
    if y.all() or not y.any():
        return float("nan")
    thresholds = np.unique(s)
    far = (s[~y][None, :] >= thresholds[:, None]).mean(axis=1)
    frr = (s[y][None, :] < thresholds[:, None]).mean(axis=1)
    k = int(np.argmin(np.abs(far - frr)))
    return float((far[k] + frr[k]) / 2)


def plot_history(
    rows: Sequence[dict[str, Any]],
    out_png: str | os.PathLike,
    title: str = "",
    curves: Sequence[str] = ("loss",),
    eval_curves: Sequence[str] = ("wer", "cer"),
) -> AnyPath | None:
    """Loss (log scale) and eval error rates against step, one PNG (atomic). None if nothing to plot."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k in r for k in eval_curves)]
    extra = [c for c in curves if c != "loss" and any(c in r for r in train)]
    panels = 1 + bool(evals) + bool(extra)
    if not train and not evals:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    ys = [r["loss"] for r in train if isinstance(r["loss"], (int, float))]
    ax.plot([r["step"] for r in train if isinstance(r["loss"], (int, float))], ys, lw=1.2)
    if ys and min(ys) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    i = 1
    if extra:
        for c in extra:
            axes[0, i].plot([r["step"] for r in train if c in r], [r[c] for r in train if c in r], label=c)
        axes[0, i].set_xlabel("step")
        axes[0, i].legend()
        axes[0, i].grid(alpha=0.3)
        i += 1
    if evals:
        for c in eval_curves:
            pts = [(r["step"], r[c]) for r in evals if c in r]
            if pts:
                axes[0, i].plot(*zip(*pts, strict=True), marker="o", label=c.upper())
        axes[0, i].set_xlabel("step")
        axes[0, i].set_ylabel("error rate")
        axes[0, i].legend()
        axes[0, i].grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
    return as_path(out_png)
