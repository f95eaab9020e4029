"""CTC fine-tuning: the loss (optax's recursion) with fairseq's and transformers' reductions, and greedy decoding.

Loss. `ctc_loss` (optax's recursion and numbers, unrolled for accelerators) gives each
example's negative log-likelihood `-log p(labels | audio)` from the logits (it applies
`log_softmax` itself, in float32), with the `<pad>` id (0) as the blank, as transformers'
`Data2VecAudioForCTC` and fairseq's `ctc` criterion do. The reduction
(`--ctc-reduction`) says what one update's loss is:

- `mean` (default; transformers `ctc_loss_reduction="mean"`, = `torch.nn.functional.ctc_loss(...,
  reduction="mean")`): each example's loss divided by its target length, averaged over examples.
- `token` (fairseq `ctc` criterion, `sentence_avg false`): the sum over examples divided by the
  number of target tokens in the batch.
- `sentence` (fairseq `ctc` criterion, `sentence_avg true`, as its wav2vec 2.0 / data2vec
  fine-tuning recipes set): the sum over examples divided by the number of examples.
- `sum` (transformers `ctc_loss_reduction="sum"`): the sum over examples. Exact on one `jit`
  (any mesh); under `--pmap` or `--grad-accum K` it is the mean over the devices / micro-batches
  of their sums (a constant factor, which Adam does not see but gradient clipping does).

Impossible alignments. An example whose frames cannot hold its labels (fewer frames than labels
plus repeated neighbours, which need a blank between them) has probability 0: torch returns
`inf` there. optax returns a large finite number instead (its `log_epsilon` floor, about 1e5
per frame). With `--ctc-zero-infinity` (default, as fairseq's recipes and transformers'
`ctc_zero_infinity=True`) such examples contribute 0 loss and 0 gradient, detected exactly
from the lengths, not from the value; without it they keep optax's large finite loss (not
`inf`, so training does not produce NaNs, but the loss is dominated by them). Either way the
fraction of such examples is logged as `ctc_impossible`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_d2v.ctc_decode import CTCTokenizer
from flax_d2v.masking import per_example_mask_indices
from flax_d2v.modeling import apply_padding_invariant, feat_extract_output_lengths
from flax_d2v.train.objective import Batch, NoExtra, example_keys, train_forward
from flax_d2v.train.vocab import TranscriptLabels

PyTree = Any
REDUCTIONS = ("mean", "sum", "token", "sentence")
IGNORE_ID = -100  # label padding, as transformers' data collators


def ctc_needed_frames(labels: jax.Array, label_paddings: jax.Array) -> jax.Array:
    """Frames needed to emit `labels`: their count plus one blank between each repeated pair."""
    valid = label_paddings < 0.5
    repeats = (labels[:, 1:] == labels[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    return valid.sum(-1) + repeats.sum(-1)


# Frames advanced per loop iteration of the CTC recursion. The recursion is sequential over frames;
# on a GPU each iteration of a plain `lax.scan` is several tiny kernels (optax's stacks every
# step's alphas too), which made it ~30 ms of a 210 ms base train step at 64 x 10 s on an H100
# (bench/README.md). Unrolled, XLA fuses the steps of one iteration into few kernels.
CTC_UNROLL = 16  # on accelerators; on CPU the loop costs nothing per iteration and unrolling only lengthens compiles
LOG_EPSILON = -1e5  # optax.ctc_loss's floor for log(0): the same numbers as optax


def ctc_loss(
    logits: jax.Array,
    logit_paddings: jax.Array,
    labels: jax.Array,
    label_paddings: jax.Array,
    blank_id: int = 0,
    unroll: int | None = None,
) -> jax.Array:
    """Per-example CTC negative log-likelihood, `optax.ctc_loss`'s arguments and numbers.

    The same forward (alpha) recursion in log space as optax (tests compare the two and PyTorch),
    written for speed on accelerators: the emission log-probs are gathered rather than multiplied
    by a (B, N, K) one-hot, only the final alphas are kept rather than every frame's, and the scan
    is unrolled `unroll` frames at a time (default `CTC_UNROLL` on GPU/TPU, 1 on CPU).
    """
    if unroll is None:
        unroll = 1 if jax.default_backend() == "cpu" else CTC_UNROLL
    logits = logits.astype(jnp.float32)
    b, _, _ = logits.shape
    n = labels.shape[1]
    logprobs = jax.nn.log_softmax(logits)
    labellens = n - jnp.sum(label_paddings, axis=1).astype(jnp.int32)
    repeat = jnp.pad((labels[:, :-1] == labels[:, 1:]).astype(jnp.float32), ((0, 0), (0, 1)))
    logprobs_phi = jnp.transpose(logprobs[:, :, blank_id], (1, 0))[..., None]  # (T, B, 1)
    emit = jnp.take_along_axis(logprobs, jnp.broadcast_to(labels[:, None, :], (b, logits.shape[1], n)), axis=2)
    emit = jnp.transpose(emit, (1, 0, 2))  # (T, B, N)
    phi0 = jnp.full((b, n + 1), LOG_EPSILON, jnp.float32).at[:, 0].set(0.0)
    emit0 = jnp.full((b, n), LOG_EPSILON, jnp.float32)

    def update_phi(phi: jax.Array, added: jax.Array) -> jax.Array:
        return jnp.concatenate([phi[:, :1], jnp.logaddexp(phi[:, 1:], added)], axis=-1)

    def step(carry, x):
        prev_phi, prev_emit = carry
        logprob_emit, logprob_phi, pad = x
        phi = update_phi(prev_phi, prev_emit + LOG_EPSILON * repeat)
        next_emit = jnp.logaddexp(phi[:, :-1] + logprob_emit, prev_emit + logprob_emit)
        next_phi = update_phi(phi + logprob_phi, prev_emit + logprob_phi + LOG_EPSILON * (1.0 - repeat))
        pad = pad[:, None]
        return (pad * prev_phi + (1.0 - pad) * next_phi, pad * prev_emit + (1.0 - pad) * next_emit), None

    (phi, emit_last), _ = jax.lax.scan(
        step, (phi0, emit0), (emit, logprobs_phi, logit_paddings.T), unroll=max(1, min(unroll, logits.shape[1]))
    )
    last = update_phi(phi, emit_last)
    return -jnp.take_along_axis(last, labellens[:, None], axis=1)[:, 0]


def ctc_loss_per_example(
    logits: jax.Array, frame_lengths: jax.Array, labels: jax.Array, blank_id: int = 0, zero_infinity: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss (B,), label lengths (B,), impossible (B,) bool) for logits (B,T,V) and labels (B,L) padded <0."""
    t = logits.shape[1]
    logit_paddings = (jnp.arange(t)[None, :] >= frame_lengths[:, None]).astype(jnp.float32)
    label_paddings = (labels < 0).astype(jnp.float32)
    safe_labels = jnp.where(labels < 0, 0, labels)
    loss = ctc_loss(logits, logit_paddings, safe_labels, label_paddings, blank_id=blank_id)
    impossible = ctc_needed_frames(safe_labels, label_paddings) > frame_lengths
    if zero_infinity:
        loss = jnp.where(impossible, 0.0, loss)
    label_lengths = (labels >= 0).sum(-1)
    return loss, label_lengths, impossible


def reduce_ctc(
    loss: jax.Array, label_lengths: jax.Array, valid: jax.Array, reduction: str
) -> tuple[jax.Array, jax.Array]:
    """(sum, weight) for the loop: loss = sum over all shards / weight over all shards."""
    loss = jnp.where(valid, loss, 0.0)
    if reduction == "token":
        return loss.sum(), jnp.where(valid, label_lengths, 0).sum().astype(jnp.float32)
    if reduction == "mean":
        return (loss / jnp.maximum(label_lengths, 1)).sum(), valid.sum().astype(jnp.float32)
    if reduction == "sentence":
        return loss.sum(), valid.sum().astype(jnp.float32)
    if reduction == "sum":
        return loss.sum(), jnp.ones((), jnp.float32)
    raise ValueError(f"unknown CTC reduction {reduction!r}; choose one of {REDUCTIONS}")


@dataclasses.dataclass(frozen=True)
class CTCObjective(NoExtra):
    """CTC on `Data2VecAudioForCTC`, with SpecAugment masks drawn per example (see `objective.py`).

    Masks follow the module config's SpecAugment fields (`mask_time_prob`, `mask_time_length`,
    `mask_time_min_masks`, `mask_feature_*`, the one place those facts live), drawn with
    `per_example_mask_indices` from `fold_in(step_key, index)`, and are passed to the model, so
    they do not depend on the device layout.

    `vocab` (the run's character vocabulary) gives `label_encoder`, what the data loader encodes
    transcripts with (`BatchLoader(labels=objective.label_encoder)`); the loss reads the result
    from `batch["labels"]`.
    """

    module: nn.Module
    reduction: str = "mean"
    zero_infinity: bool = True
    name: str = "ctc"
    vocab: Mapping[str, int] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"unknown CTC reduction {self.reduction!r}; choose one of {REDUCTIONS}")

    @property
    def label_encoder(self) -> TranscriptLabels | None:
        """Transcript -> character ids of `vocab` (a `source.LabelEncoder`); None without a vocabulary."""
        return None if self.vocab is None else TranscriptLabels(self.vocab)

    @property
    def blank_id(self) -> int:
        pad = self.module.config.pad_token_id
        return 0 if pad is None else int(pad)

    def masks(self, batch: Batch, rng: jax.Array) -> tuple[jax.Array | None, jax.Array | None]:
        config = self.module.config
        num_frames = int(feat_extract_output_lengths(config, batch["input_values"].shape[1]))
        lengths = feat_extract_output_lengths(config, batch["attention_mask"].astype(jnp.int32).sum(-1))
        time = feature = None
        if not config.apply_spec_augment:  # transformers: `apply_spec_augment: false` turns SpecAugment off
            return time, feature
        if config.mask_time_prob > 0:
            keys = example_keys(jax.random.fold_in(rng, 1), batch["index"])
            time = per_example_mask_indices(
                keys, num_frames, config.mask_time_prob, config.mask_time_length, config.mask_time_min_masks, lengths
            )
        if config.mask_feature_prob > 0:
            keys = example_keys(jax.random.fold_in(rng, 2), batch["index"])
            feature = per_example_mask_indices(
                keys,
                config.hidden_size,
                config.mask_feature_prob,
                config.mask_feature_length,
                config.mask_feature_min_masks,
            )
        return time, feature

    def loss(
        self, params: PyTree, extra: PyTree, batch: Batch, rng: jax.Array, step: jax.Array
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        time_mask, feature_mask = self.masks(batch, rng)

        out = train_forward(self.module, params, batch, rng, time_mask, feature_mask)
        frame_lengths = out.logits_frame_mask.sum(-1)  # after the adapter's strided convs, if any
        per_example, label_lengths, impossible = ctc_loss_per_example(
            out.logits, frame_lengths, batch["labels"], self.blank_id, self.zero_infinity
        )
        valid = batch["attention_mask"].sum(-1) > 0  # all-padding rows fill a short last batch
        total, weight = reduce_ctc(per_example, label_lengths, valid, self.reduction)
        metrics = {"ctc_impossible": (impossible & valid).sum() / jnp.maximum(valid.sum(), 1)}
        return total, weight, metrics

    def predict(self, params: PyTree, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """Greedy CTC ids (B, T) and frame lengths (B,), deterministic (eval).

        Through the same padding-invariant forward as `d2v transcribe`, so eval WER is what a user
        transcribing those clips gets, whatever batch they were padded into.
        """
        out = apply_padding_invariant(self.module, params, batch["input_values"], batch["attention_mask"])
        return jnp.argmax(out.logits, -1).astype(jnp.int32), out.logits_frame_mask.sum(-1).astype(jnp.int32)


def greedy_decode(ids: np.ndarray, lengths: np.ndarray, vocab: dict[str, int]) -> list[str]:
    """Best-path CTC text of each row's first `lengths[i]` frame ids.

    Through `flax_d2v.ctc_decode.CTCTokenizer` (transformers' `Wav2Vec2CTCTokenizer.decode` rules), the
    decoder `d2v transcribe` uses, so eval WER is computed on exactly what users will get.
    """
    tokenizer = CTCTokenizer.from_vocab(vocab)
    return [tokenizer.decode(row[: int(n)]) for row, n in zip(np.asarray(ids), np.asarray(lengths), strict=True)]
