"""Fine-tuning the classification heads: `d2v finetune --task audio-classification | xvector`.

- `audio-classification` trains `Data2VecAudioForSequenceClassification` with cross-entropy on
  its logits (transformers' loss); `xvector` trains `Data2VecAudioForXVector` with the AM-softmax
  objective (scale 30, margin 0.4, transformers' `AMSoftmaxLoss`) on its logits and
  `objective.weight`.
- Labels come from a column of the TSV manifest or `datasets` split (`label` by default): names are
  sorted and numbered, and written into the model config as `id2label` / `label2id` (so `RUN/hf` is what
  transformers' `pipeline("audio-classification")` reads).
- The loss is summed over the real examples and weighted by their count (the loop's contract,
  `objective.py`); SpecAugment masks are drawn per example as for CTC.
- Eval: accuracy over the eval manifest, through the padding-invariant forward `d2v classify` uses;
  x-vectors also `eer`, the speaker-verification equal error rate over every pair of eval clips
  (cosine of their x-vectors, as `d2v similarity`; same label = same speaker), what x-vectors are for.

Everything else (meshes, resume, bf16, schedules, checkpoints) is the same loop as CTC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_d2v.errors import D2VError
from flax_d2v.heads import REGISTRY, am_softmax_logits, am_softmax_loss
from flax_d2v.modeling import apply_padding_invariant
from flax_d2v.paths import as_path
from flax_d2v.train import hf_datasets, sharding, shards
from flax_d2v.train.ctc import CTCObjective
from flax_d2v.train.loader import BatchLoader
from flax_d2v.train.manifests import read_lines, tsv_rows
from flax_d2v.train.metrics import equal_error_rate
from flax_d2v.train.objective import Batch, NoExtra, train_forward

PyTree = Any
# task -> the architecture it trains, from the head registry (the objectives this module implements)
TASKS = {s.objective: s.architecture for s in REGISTRY.values() if s.objective in ("audio-classification", "xvector")}


def read_label_column(manifest_path: str | Path, column: str) -> list[str]:
    """The `column` of a TSV manifest or a `datasets` split, one entry per clip in manifest order."""
    if hf_datasets.is_dataset_spec(str(manifest_path)):
        return hf_datasets.read_labels(str(manifest_path), column)
    path = as_path(manifest_path)
    if shards.is_shard_dir(path):  # `d2v prepare` kept the TSV's columns in its index
        columns = shards.read_index(path).get("columns") or {}
        if column not in columns:
            raise D2VError(f"{path}: no {column!r} column among the prepared columns ({', '.join(columns)})")
        return list(columns[column])
    if not path.is_file():
        raise D2VError(f"{path}: no such manifest file")
    lines = read_lines(path)
    header = lines[0].split("\t") if lines else []
    if column not in header:
        raise D2VError(
            f"{path}: no {column!r} column in the header (found: {', '.join(header)}); "
            "classification needs a TSV with 'path' and a label column (--label-column)"
        )
    col = header.index(column)
    out = []
    for lineno, fields in tsv_rows(path, lines):
        if not fields[col].strip():
            raise D2VError(f"{path}:{lineno}: column {column!r} is empty")
        out.append(fields[col].strip())
    return out


def label_ids(labels: list[str], label2id: dict[str, int], where: str) -> np.ndarray:
    unknown = sorted(set(labels) - set(label2id))
    if unknown:
        raise D2VError(
            f"{where}: label(s) {', '.join(map(repr, unknown[:5]))} are not among the training labels "
            f"({', '.join(sorted(label2id))})"
        )
    return np.asarray([label2id[x] for x in labels], np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class ClassificationObjective(NoExtra):
    """Cross-entropy (sequence classification) or AM-softmax (x-vectors) on one label per clip.

    `labels[i]` is the class id of manifest position i; a batch's rows find theirs by `batch["index"]`
    (filler rows, index -1, are left out), so the data loader carries no labels for it.
    """

    module: nn.Module
    labels: np.ndarray
    am_softmax: bool = False
    name: str = "classification"
    # No labels travel through the data loader: `labels` is looked up by `batch["index"]` in `loss`.
    label_encoder: ClassVar[None] = None

    def masks(self, batch: Batch, rng: jax.Array) -> tuple[jax.Array | None, jax.Array | None]:
        return CTCObjective.masks(self, batch, rng)  # SpecAugment from the module config, per example

    def _scores(self, params: PyTree, logits: jax.Array, y: jax.Array, margin: bool) -> jax.Array:
        if not self.am_softmax:
            return logits
        w = params["objective"]["weight"]
        return am_softmax_logits(logits, w, y) if margin else am_softmax_logits(logits, w, y, margin=0.0)

    def loss(
        self, params: PyTree, extra: PyTree, batch: Batch, rng: jax.Array, step: jax.Array
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        time_mask, feature_mask = self.masks(batch, rng)
        out = train_forward(self.module, params, batch, rng, time_mask, feature_mask)
        index = batch["index"]
        valid = (index >= 0) & (batch["attention_mask"].sum(-1) > 0)
        y = jnp.asarray(self.labels)[jnp.maximum(index, 0)]
        if self.am_softmax:
            per = am_softmax_loss(out.logits, params["objective"]["weight"], y)
        else:
            per = optax.softmax_cross_entropy_with_integer_labels(out.logits.astype(jnp.float32), y)
        correct = (jnp.argmax(self._scores(params, out.logits, y, False), -1) == y) & valid
        n = valid.sum()
        metrics = {"train_accuracy": correct.sum() / jnp.maximum(n, 1)}
        return jnp.where(valid, per, 0.0).sum(), n.astype(jnp.float32), metrics

    def outputs(self, params: PyTree, batch: Batch) -> tuple[jax.Array, jax.Array | None]:
        """(class ids (B,), x-vectors (B, D) or None), deterministic, through the padding-invariant forward
        (as `d2v classify` and `d2v embed --xvector`)."""
        out = apply_padding_invariant(self.module, params, batch["input_values"], batch["attention_mask"])
        zeros = jnp.zeros(out.logits.shape[0], jnp.int32)
        ids = jnp.argmax(self._scores(params, out.logits, zeros, False), -1).astype(jnp.int32)
        return ids, out.embeddings

    def predict(self, params: PyTree, batch: Batch) -> jax.Array:
        """Class ids (B,), deterministic, through the padding-invariant forward (as `d2v classify`)."""
        return self.outputs(params, batch)[0]


def verification_eer(embeddings: list[np.ndarray], speakers: list[Any]) -> float:
    """The EER of every pair of `embeddings` as a verification trial: cosine-scored, same speaker or not."""
    unit = [e / max(float(np.linalg.norm(e)), 1e-8) for e in embeddings]  # cosine, as `d2v similarity`
    scores, same = [], []
    for a in range(len(unit)):
        for b in range(a + 1, len(unit)):
            scores.append(float(unit[a] @ unit[b]))
            same.append(speakers[a] == speakers[b])
    return equal_error_rate(scores, same)


def make_accuracy_eval_fn(
    objective: ClassificationObjective, trainer: Any, loader: BatchLoader, eval_labels: np.ndarray
) -> Callable[[Any], dict[str, float]]:
    """eval_fn(state) -> {"accuracy", "eval_clips"} over the whole eval manifest, and "eer" for x-vectors
    (`flax_d2v.train.metrics.equal_error_rate` over every pair of eval clips; NaN without a speaker
    of two clips and two speakers)."""

    def predict(params, batch):
        ids, embeddings = objective.outputs(params, batch)
        return ids, batch["index"], embeddings

    jitted = jax.jit(
        predict,
        in_shardings=(trainer.state_shardings.params, sharding.batch_sharding(trainer.mesh)),
        out_shardings=sharding.replicated(trainer.mesh),
    )

    def eval_fn(state: Any) -> dict[str, float]:
        loader.restore({"epoch": 0, "batch_in_epoch": 0})
        preds: dict[int, int] = {}
        vectors: dict[int, np.ndarray] = {}
        for batch in loader:
            arrays = {k: np.asarray(batch[k]) for k in ("input_values", "attention_mask", "index")}
            arrays["index"] = arrays["index"].astype(np.int32)
            ids, index, emb = jitted(state.params, sharding.shard_batch(arrays, trainer.mesh))
            ids, index = np.asarray(ids), np.asarray(index)
            for row, (i, p) in enumerate(zip(index, ids, strict=True)):
                if i >= 0:
                    preds[int(i)] = int(p)
                    if emb is not None:
                        vectors[int(i)] = np.asarray(emb[row], np.float64)
        order = sorted(preds)
        correct = sum(preds[i] == int(eval_labels[i]) for i in order)
        metrics = {"accuracy": correct / max(len(order), 1), "eval_clips": len(order)}
        if objective.am_softmax:
            metrics["eer"] = verification_eer([vectors[i] for i in order], [int(eval_labels[i]) for i in order])
        return metrics

    return eval_fn
