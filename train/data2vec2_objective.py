"""data2vec 2.0 (audio) pretraining as an `Objective`: fairseq's `Data2VecMultiModel.forward` with
`base_audio_only_task.yaml`.

Per step, for a batch of B clips cropped to one length (fairseq pretrains unpadded):

1. Local features once: conv extractor + `project_features` (N = B * clone_batch rows share them).
2. Masks: `clone_batch` per clip, each fairseq's `compute_block_mask_1d` (`flax_d2v.masking.block_mask_1d`;
   what the dataset precomputes with `precompute_mask_config`): span centres drawn uniformly
   (`int(T * (p + mask_prob_adjust) / mask_length * (1 + mask_dropout))` of them), spans of
   `mask_length` frames around them clipped to the clip, then exactly `int(T * p)` masked frames
   (masked frames dropped, or frames added, uniformly at random); `inverse_mask` flips it
   (p = 1 - mask_prob then). The masked count, hence the kept count K, depends on T only: shapes
   are static under `jit`.
3. Student (dropout, LayerDrop on): the clone-repeated local features with masked frames zeroed go
   through the positional conv; only the K kept frames (features + positions) go through the context
   encoder and the blocks, with the ALiBi bias of their positions (MAE-style).
4. Decoder: the encoder output (input dropout), N(0, mask_noise_std) tokens at the masked positions,
   back in time order, through `Decoder1d`.
5. Teacher (EMA, deterministic, no gradient): the *unmasked* local features through its own positional
   conv, alibi_scale, context encoder and blocks; targets = mean over the top K blocks of each block's
   FFN output instance-normalised over time; repeated for the clones.
6. Loss on masked frames: squared error summed over channels times 1/sqrt(D) (`loss_beta` 0,
   `loss_scale` None); returned as (sum, number of masked frames) = fairseq's (loss, sample_size).
7. After the optimizer step: EMA of the whole teacher (`ema_encoder_only: false`), decay annealed linearly
   from `ema_decay` to `ema_end_decay` over `ema_anneal_end_step` updates. With `ema_encoder_only: true`
   (fairseq's default) the EMA covers the blocks only, and step 5 runs the student's positional conv,
   alibi_scale and context encoder (in training mode, as fairseq) before the EMA blocks.

One deliberate difference: fairseq's dataset draws each clip's masks at the clip's full length and the
collater then crops them at an offset independent of the audio's crop, so a cropped row's masked count
varies and the first row's count sets how many frames every row keeps (`make_maskinfo`). Here masks are
drawn for the cropped length, so every row has exactly `int(T * mask_prob)` masked frames (the rule's
intent, and what static shapes need).

Padded rows (a clip shorter than its crop; a padded batch given to `loss` directly, as `d2v verify
--objective` does with fairseq's own step) are fairseq's: padded frames are never zeroed; they are masked
as attention keys in the student (the padding mask gathered to the kept frames) and in the teacher; the
instance norm of the targets runs over all T frames, padded ones included; the decoder sees all T frames
with no padding mask. Unlike fairseq, a mask on a padded frame (or a filler row) is not counted.

Params `{"model": <Data2Vec2Model params>, "decoder": <Decoder1d params>}`; extra `{"teacher": ...}`, the
model's tree without `feature_extractor` and `project_features` (the teacher shares the student's).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_d2v.data2vec2 import Data2Vec2Model, Decoder1d
from flax_d2v.errors import D2VError
from flax_d2v.masking import block_mask_1d
from flax_d2v.modeling import feat_extract_output_lengths, real_frames
from flax_d2v.precision import matmul_precision
from flax_d2v.train.data2vec_objective import (
    EmaTeacher,
    instance_norm_time,
    regression_loss,
)
from flax_d2v.train.objective import Batch, PyTree, batch_key, example_keys

MASK_STREAM, DROPOUT_STREAM, NOISE_STREAM = 0, 1, 2
LOCAL_KEYS = ("feature_extractor", "project_features")  # the student's, shared by the teacher


@dataclasses.dataclass(frozen=True)
class Data2Vec2PretrainConfig:
    """The objective's hyperparameters; defaults are fairseq's `v2/base_audio_only_task.yaml`."""

    clone_batch: int = 8
    mask_prob: float = 0.5
    mask_prob_adjust: float = 0.05
    mask_length: int = 5
    inverse_mask: bool = False
    mask_dropout: float = 0.0
    average_top_k_layers: int = 8
    instance_norm_target_layer: bool = True
    ema_decay: float = 0.999
    ema_end_decay: float = 0.99999
    ema_anneal_end_step: int = 75000
    ema_start_update: int = 0
    ema_encoder_only: bool = False  # fairseq's: EMA of the blocks only (see `_teacher_encoder_only`)
    loss_beta: float = 0.0
    loss_scale: float | None = None
    min_target_var: float = 0.1
    min_pred_var: float = 0.01
    guard_after: int = 5000

    def validate(self, num_hidden_layers: int) -> None:
        if not 1 <= self.average_top_k_layers <= num_hidden_layers:
            raise D2VError(f"--average-top-k-layers: {self.average_top_k_layers} is not in [1, {num_hidden_layers}]")
        if self.clone_batch < 1:
            raise D2VError(f"--clone-batch: {self.clone_batch} must be at least 1")
        if not 0.0 < self.mask_prob < 1.0:
            raise D2VError(f"--mask-prob: {self.mask_prob} is not in (0, 1)")
        if self.mask_length < 1:
            raise D2VError(f"--mask-length: {self.mask_length} must be at least 1")
        if self.ema_anneal_end_step < 1:
            raise D2VError(f"--ema-anneal-end-step: {self.ema_anneal_end_step} must be at least 1")
        if self.loss_beta < 0:
            raise D2VError(f"--loss-beta: {self.loss_beta} must be >= 0")

    def masked_count(self, num_frames: int) -> int:
        """Masked frames per clone of a T-frame clip (compute_block_mask_1d with require_same_masks)."""
        p = 1.0 - self.mask_prob if self.inverse_mask else self.mask_prob
        n = int(num_frames * p)
        return num_frames - n if self.inverse_mask else n


# ---------------------------------------------------------------------------------------------- masks
def clone_masks(keys: jax.Array, num_frames: int, config: Data2Vec2PretrainConfig) -> jax.Array:
    """(B * clone_batch, T) masks: `clone_batch` rows per example key, clones of one clip adjacent
    (fairseq's `repeat_interleave` order)."""
    c = config
    clone_keys = jax.vmap(lambda k: jax.random.split(k, c.clone_batch))(keys).reshape(-1, *keys.shape[1:])

    def fn(k: jax.Array) -> jax.Array:
        return block_mask_1d(
            k, num_frames, c.mask_prob, c.mask_length, c.mask_prob_adjust, c.inverse_mask, c.mask_dropout
        )

    return jax.vmap(fn)(clone_keys)


# ---------------------------------------------------------------------------------------------- model pieces
def _teacher(m: Data2Vec2Model, local: jax.Array, frame_mask: jax.Array | None) -> list[jax.Array]:
    """The teacher's layer results: padded frames are key-masked, never zeroed (fairseq)."""
    return m.contextualize(local, frame_mask, True)[2]


def kept_count(mask: Any, rows: int, num_frames: int, noise: Any, config: Data2Vec2PretrainConfig) -> int:
    """K, the frames every row keeps, for a given (B * clone_batch, T) mask; a mask that does not fit is
    refused in one line (an out-of-range gather would otherwise fill the loss with NaN).

    A concrete mask (NumPy, or a JAX array outside a trace) sets K itself, as fairseq's `make_maskinfo`
    does (`T - mask[0].sum()`): every row must mask the same number of frames. A traced mask cannot be
    counted, so K is the config's (`masked_count`), and a `mask_noise` must have its shape.
    """
    shape = tuple(np.shape(mask))
    if shape != (rows, num_frames):
        raise D2VError(f"mask: shape {shape}, expected (batch * clone_batch, frames) = ({rows}, {num_frames})")
    if isinstance(mask, jax.core.Tracer):
        k = num_frames - config.masked_count(num_frames)
    else:
        counts = np.asarray(mask).astype(bool).sum(axis=1)
        if np.any(counts != counts[0]):
            raise D2VError(
                f"mask: rows mask {sorted(set(counts.tolist()))} frames; data2vec 2.0 needs the same "
                "number of masked frames in every row (fairseq's make_maskinfo keeps T - mask[0].sum())"
            )
        k = num_frames - int(counts[0])
        if k < 1:
            raise D2VError(f"mask: masks all {num_frames} frames of every row; at least one must be kept")
    if noise is not None:
        want = (rows, num_frames - k)
        if tuple(np.shape(noise))[:2] != want:
            raise D2VError(
                f"mask_noise: shape {tuple(np.shape(noise))}, expected {want + (np.shape(noise)[-1],)} "
                f"(one vector per masked frame; a traced mask must mask the config's "
                f"{config.masked_count(num_frames)} frames per row)"
            )
    return k


def _teacher_encoder_only(
    m: Data2Vec2Model, local: jax.Array, frame_mask: jax.Array | None, deterministic: bool
) -> list[jax.Array]:
    """fairseq's teacher with `ema_encoder_only`: the *student's* `contextualized_features(mask=False)`
    (positional conv, alibi_scale, context encoder, in training mode: its dropout and prenet LayerDrop act
    unless `deterministic`) under no_grad, then the EMA blocks, deterministic; no `dropout_input`. Padded
    frames are key-masked, never zeroed, as in the full teacher."""
    c = m.config
    with matmul_precision(m.precision):
        x = local + m.positions(local, frame_mask, False)
        biases = m.biases(x.shape[1], None, frame_mask)
        x, _ = m.context_encoder(x, biases[: c.prenet_depth], deterministic)
        results = []
        for i, blk in enumerate(m.blocks):
            x, t = blk(x, biases[c.prenet_depth + i], True)
            results.append(t)
        return results


def teacher_subtree(model_params: PyTree) -> PyTree:
    return {k: v for k, v in model_params.items() if k not in LOCAL_KEYS}


def block_subtree(model_params: PyTree) -> PyTree:
    """What fairseq's EMA holds with `ema_encoder_only`: `model.blocks`."""
    return {k: v for k, v in model_params.items() if k.startswith("blocks_")}


class Data2Vec2Objective(EmaTeacher):
    """data2vec 2.0 pretraining (see the module docstring). `module`: the bare `Data2Vec2Model`."""

    name = "data2vec2"
    module_type = Data2Vec2Model
    title = "data2vec 2.0 pretraining"

    def __init__(
        self,
        module: Data2Vec2Model,
        config: Data2Vec2PretrainConfig = Data2Vec2PretrainConfig(),
        axis_name: str | None = None,
    ) -> None:
        super().__init__(module, config, axis_name)
        self.decoder = Decoder1d(module.config, module.dtype)

    # -- state -------------------------------------------------------------------------------
    def init_params(self, model_params: PyTree, rng: jax.Array, decoder: PyTree | None = None) -> PyTree:
        if decoder is None:
            x = jnp.zeros((1, 16, self.module.config.hidden_size), jnp.float32)
            decoder = nn.meta.unbox(self.decoder.init(rng, x)["params"])
        return {"model": model_params, "decoder": decoder}

    def decoder_logical_axes(self) -> PyTree:
        boxed = jax.eval_shape(
            lambda r: self.decoder.init(r, jnp.zeros((1, 16, self.module.config.hidden_size)))["params"],
            jax.random.PRNGKey(0),
        )
        return nn.get_partition_spec(boxed)

    def params_logical_axes(self, model_axes: PyTree) -> PyTree:
        return {"model": model_axes, "decoder": self.decoder_logical_axes()}

    teacher_key = "teacher"  # extra = {"teacher": the student without its local encoder}

    def teacher_of(self, model: PyTree) -> PyTree:
        return block_subtree(model) if self.config.ema_encoder_only else teacher_subtree(model)

    # -- the loss ----------------------------------------------------------------------------
    def masks(self, batch: Batch, rng: jax.Array) -> jax.Array:
        num_frames = int(feat_extract_output_lengths(self.module.config, batch["input_values"].shape[1]))
        keys = example_keys(jax.random.fold_in(rng, MASK_STREAM), jnp.asarray(batch["index"]))
        return clone_masks(keys, num_frames, self.config)

    def targets(
        self,
        params: PyTree,
        extra: PyTree,
        local: jax.Array,
        frame_mask: jax.Array | None = None,
        rng: jax.Array | None = None,
        deterministic: bool = False,
    ) -> jax.Array:
        """(B, T, D) targets: the teacher on the unmasked local features, padded keys masked; each layer
        instance-normalised over all T frames, padded ones included (fairseq's `make_targets`). With
        `ema_encoder_only` the teacher is the student with the EMA blocks, its context encoder's dropout
        drawn from `rng` (none when `deterministic` or no `rng`)."""
        c = self.config
        if c.ema_encoder_only:
            teacher = {**params["model"], **extra["teacher"]}
            quiet = deterministic or rng is None
            results = self.module.apply(
                {"params": jax.lax.stop_gradient(teacher)},
                jax.lax.stop_gradient(local),
                frame_mask,
                quiet,
                method=_teacher_encoder_only,
                rngs={} if quiet else {"dropout": rng},
            )
        else:
            teacher = {**{k: params["model"][k] for k in LOCAL_KEYS}, **extra["teacher"]}
            results = self.module.apply(
                {"params": jax.lax.stop_gradient(teacher)}, jax.lax.stop_gradient(local), frame_mask, method=_teacher
            )
        layers = [r.astype(jnp.float32) for r in results[-c.average_top_k_layers :]]
        if c.instance_norm_target_layer:
            layers = [instance_norm_time(t) for t in layers]
        return jax.lax.stop_gradient(sum(layers) / len(layers))

    def loss(self, *args: Any, **kwargs: Any) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """`_loss` traced under the module's matmul/conv precision (`flax_d2v.precision`): the student,
        teacher and decoder applies below all run at it."""
        with matmul_precision(self.module.precision):
            return self._loss(*args, **kwargs)

    def _loss(
        self,
        params: PyTree,
        extra: PyTree,
        batch: Batch,
        rng: jax.Array,
        step: jax.Array,
        mask: jax.Array | None = None,
        mask_noise: jax.Array | None = None,
        deterministic: bool = False,
        outputs: bool = False,
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """(sum of per-masked-frame losses, number of masked frames, metrics). `mask` (B*clone, T),
        `mask_noise` (B*clone, T - K, D), `deterministic` and `outputs` are for tests and `d2v verify
        --objective`: a concrete `mask` sets K (`kept_count`); `outputs` adds the decoder output
        `pred` and the targets `targets`, both (B*clone, T, D), to the metrics."""
        c, mc = self.config, self.module.config
        input_values = jnp.asarray(batch["input_values"])
        am = batch.get("attention_mask")
        b, d = input_values.shape[0], mc.hidden_size
        t = int(feat_extract_output_lengths(mc, input_values.shape[1]))
        n = b * c.clone_batch
        if am is None:
            frame_mask = None
            real = jnp.ones((n, t), bool)
        else:  # fairseq's convert_padding_mask: padded frames key-masked, never zeroed
            frame_mask = real_frames(mc, jnp.asarray(am), t)
            real = jnp.repeat(frame_mask, c.clone_batch, axis=0)
        if mask is None:
            mask = self.masks(batch, rng)
            k = t - c.masked_count(t)
        else:
            k = kept_count(mask, n, t, mask_noise, c)
            mask = jnp.asarray(mask).astype(bool)
        local = self.module.apply({"params": params["model"]}, input_values, method=Data2Vec2Model.local_features)
        ids_shuffle = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)
        ids_restore = jnp.argsort(ids_shuffle, axis=1, stable=True)
        keep = ids_shuffle[:, :k]
        drop_key = batch_key(jax.random.fold_in(rng, DROPOUT_STREAM), batch)
        rngs = {} if deterministic else {"dropout": drop_key}
        local_n = jnp.repeat(local, c.clone_batch, axis=0)
        x = self.module.apply(
            {"params": params["model"]},
            local_n,
            mask,
            keep,
            deterministic,
            None if frame_mask is None else real,
            method=Data2Vec2Model.encode_masked,
            rngs=rngs,
        )
        if not deterministic and mc.decoder_input_dropout > 0:
            x = _dropout(jax.random.fold_in(drop_key, 1), x, mc.decoder_input_dropout)
        if mask_noise is None:
            noise_key = batch_key(jax.random.fold_in(rng, NOISE_STREAM), batch)
            mask_noise = mc.mask_noise_std * jax.random.normal(noise_key, (n, t - k, d), jnp.float32)
        full = jnp.take_along_axis(
            jnp.concatenate([x, jnp.asarray(mask_noise).astype(x.dtype)], axis=1), ids_restore[..., None], axis=1
        )
        # The decoder sees all T frames with no padding mask (fairseq's decoder_input and Decoder1d).
        pred = self.decoder.apply({"params": params["decoder"]}, full).astype(jnp.float32)
        y = self.targets(params, extra, local, frame_mask, jax.random.fold_in(drop_key, 2), deterministic)
        y = jnp.repeat(y, c.clone_batch, axis=0)
        scale = c.loss_scale if c.loss_scale is not None else 1.0 / math.sqrt(d)
        counted = mask & real  # a mask on a padded frame (or a filler row) is no target
        w = counted.astype(jnp.float32)
        loss_sum = (regression_loss(pred, y, c.loss_beta) * scale * w).sum()
        weight = w.sum()
        metrics = self.step_metrics(y, pred, counted, step, outputs, masked_pct=jnp.asarray(1.0 - k / t, jnp.float32))
        return loss_sum, weight, metrics


def _dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))
