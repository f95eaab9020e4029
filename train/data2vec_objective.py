"""data2vec-audio pretraining: a masked student regresses an EMA teacher's averaged layer outputs.

This is fairseq's `examples/data2vec/models/data2vec_audio.py` (commit 3d262bb) as an `Objective`
for the one training loop (`flax_d2v.train.objective`). What it computes, per step:

1. Span masks over the frames (fairseq's `compute_mask_indices`, static spans, no overlap
   prevention, `min_masks=1`, `require_same_masks`: `flax_d2v.masking.data2vec_mask_indices`), drawn
   per example from `fold_in(step_key, example_index)` so they do not depend on how the batch is laid out.
2. Student: the model with dropout and LayerDrop, the masked frames of the projected features
   replaced by `masked_spec_embed` (fairseq's `mask_emb`), last hidden state through
   `final_proj` (a hidden->hidden Dense beside the model's params).
3. Teacher: the EMA copy of the encoder (`extra["encoder"]`) on the *unmasked* projected
   features of the student's own feature extractor/projection (fairseq's `ema_transformer_only`),
   deterministic, no gradient. Targets: the FFN outputs of its top K layers (before dropout,
   residual and `final_layer_norm`), each instance-normalised over time per channel, averaged.
4. Loss on masked frames only: squared error (`loss_beta` 0) or smooth L1 summed over channels,
   times `1/sqrt(hidden)` (or `loss_scale`); returned as (sum, number of masked frames), which is
   fairseq's (loss, sample_size) -- the loop divides.
5. After the optimizer step: teacher <- d * teacher + (1 - d) * student for the layers and the
   encoder LayerNorm, with `d` annealed linearly from `ema_decay` to `ema_end_decay` over
   `ema_anneal_end_step` updates; the positional convolution is copied (fairseq's
   `ema_layers_only`).

Params are `{"model": <Data2VecAudioModel params>, "final_proj": {"kernel", "bias"}}`: the model's
tree is untouched, so the student exports to transformers as it is.

Two places where padding or the device layout could make this differ from fairseq:
- Padding. fairseq's pretraining batches are cropped to the shortest clip (`enable_padding`
  false), so nothing is padded; `d2v pretrain` does the same by default (`CroppedBatches`).
  With padded batches (`--no-crop`) the target statistics are taken over real frames only
  (fairseq with `enable_padding` normalises over the padded frames too:
  `instance_norm_over_padding=True` is that formula verbatim, and what `d2v verify --objective`
  checks against fairseq's own step). Either way padding still leaks
  into the last real frames through the stacked positional convolutions (as in fairseq and
  transformers), which is why cropping is the default.
- `require_same_masks` trims every row to the smallest mask count *of the batch the loss sees*
  (under `jit` the global batch; under `pmap` the min is taken over the `axis_name` devices too).
  fairseq takes it per GPU and per forward, i.e. it depends on the device layout; ours doesn't,
  except under gradient accumulation, where the group is the micro-batch as in fairseq.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from flax_d2v.audio import SAMPLE_RATE
from flax_d2v.errors import D2VError
from flax_d2v.masking import data2vec_mask_indices
from flax_d2v.modeling import Data2VecAudioModel, feat_extract_output_lengths
from flax_d2v.train.objective import Batch, PyTree, apply_per_example, example_keys

# `F.instance_norm`'s default eps.
INSTANCE_NORM_EPS = 1e-5
# fairseq's `compute_var`: sqrt(var + 1e-6).
VAR_EPS = 1e-6
# Streams folded into the step key so masks and dropout never share random numbers.
MASK_STREAM, DROPOUT_STREAM = 0, 1
# Parameters of the encoder copied from the student instead of averaged (fairseq `ema_layers_only`).
EMA_COPY_KEYS = ("pos_conv_embed",)


@dataclasses.dataclass(frozen=True)
class Data2VecPretrainConfig:
    """The objective's hyperparameters; defaults are fairseq's `audio/pretraining/base_librispeech.yaml`."""

    ema_decay: float = 0.999
    ema_end_decay: float = 0.9999
    ema_anneal_end_step: int = 30000
    ema_layers_only: bool = True  # copy the positional conv instead of averaging it
    average_top_k_layers: int = 8
    instance_norm_target_layer: bool = True
    instance_norm_over_padding: bool = False  # True: fairseq's formula verbatim (see module docstring)
    mask_prob: float = 0.65
    mask_length: int = 10
    min_masks: int = 1  # hard-coded in fairseq's `apply_mask`
    require_same_masks: bool = True
    loss_beta: float = 0.0  # 0: squared error; > 0: smooth L1 with this beta
    loss_scale: float | None = None  # None: 1 / sqrt(hidden_size)
    min_target_var: float = 0.1
    min_pred_var: float = 0.01
    guard_after: int = 5000  # the collapse guards act once more than this many updates are done
    # Updates the teacher had already seen before this run's step 0 (a continued fairseq run): the
    # decay schedule goes on from there instead of restarting at `ema_decay`.
    ema_start_update: int = 0

    def validate(self, num_hidden_layers: int) -> None:
        if not 1 <= self.average_top_k_layers <= num_hidden_layers:
            raise D2VError(
                f"--average-top-k-layers: {self.average_top_k_layers} is not in [1, {num_hidden_layers}] "
                f"(the model has {num_hidden_layers} layers)"
            )
        if not 0.0 < self.mask_prob < 1.0:
            raise D2VError(f"--mask-prob: {self.mask_prob} is not in (0, 1)")
        if self.mask_length < 1:
            raise D2VError(f"--mask-length: {self.mask_length} must be at least 1")
        if not 0.0 <= self.ema_decay <= 1.0 or not 0.0 <= self.ema_end_decay <= 1.0:
            raise D2VError(f"--ema-decay/--ema-end-decay: {self.ema_decay}/{self.ema_end_decay} must be in [0, 1]")
        if self.ema_anneal_end_step < 1:
            raise D2VError(f"--ema-anneal-end-step: {self.ema_anneal_end_step} must be at least 1")
        if self.ema_start_update < 0:
            raise D2VError(f"--ema-start-update: {self.ema_start_update} must be >= 0")
        if self.loss_beta < 0:
            raise D2VError(f"--loss-beta: {self.loss_beta} must be >= 0")


# ----------------------------------------------------------------------------------------------
# Pieces of the loss


def instance_norm_time(y: jax.Array, frame_mask: jax.Array | None = None, eps: float = INSTANCE_NORM_EPS) -> jax.Array:
    """`F.instance_norm` of (B, T, C) over T per (example, channel): biased variance, no affine.

    With `frame_mask` (B, T) the statistics come from real frames only.
    """
    y = y.astype(jnp.float32)
    if frame_mask is None:
        mean = y.mean(axis=1, keepdims=True)
        var = jnp.square(y - mean).mean(axis=1, keepdims=True)
    else:
        w = frame_mask[..., None].astype(jnp.float32)
        n = jnp.maximum(w.sum(axis=1, keepdims=True), 1.0)
        mean = (y * w).sum(axis=1, keepdims=True) / n
        var = (jnp.square(y - mean) * w).sum(axis=1, keepdims=True) / n
    return (y - mean) * jax.lax.rsqrt(var + eps)


def regression_loss(pred: jax.Array, target: jax.Array, beta: float) -> jax.Array:
    """Per-frame loss summed over channels: `F.mse_loss` (beta 0) or `F.smooth_l1_loss(beta=beta)`."""
    d = pred.astype(jnp.float32) - target.astype(jnp.float32)
    if beta == 0:
        per = jnp.square(d)
    else:
        a = jnp.abs(d)
        per = jnp.where(a < beta, 0.5 * jnp.square(d) / beta, a - 0.5 * beta)
    return per.sum(-1)


def masked_std(y: jax.Array, mask: jax.Array, axis_name: str | None = None) -> jax.Array:
    """fairseq's `compute_var` over the masked frames: mean over channels of sqrt(unbiased var + 1e-6)."""
    w = mask[..., None].astype(jnp.float32)
    y = y.astype(jnp.float32)
    psum = (lambda v: jax.lax.psum(v, axis_name)) if axis_name is not None else (lambda v: v)
    n = psum(w.sum(axis=(0, 1)))
    mean = psum((y * w).sum(axis=(0, 1))) / jnp.maximum(n, 1.0)
    var = psum((jnp.square(y - mean) * w).sum(axis=(0, 1))) / jnp.maximum(n - 1.0, 1.0)
    return jnp.sqrt(var + VAR_EPS).mean()


def ema_decay_at(config: Data2VecPretrainConfig, num_updates: jax.Array | int) -> jax.Array:
    """The decay fairseq's `set_num_updates(num_updates)` uses: linear from `ema_decay` at 0 to
    `ema_end_decay` at `ema_anneal_end_step`, constant after."""
    n = jnp.asarray(num_updates, jnp.float32)
    start, end = config.ema_decay, config.ema_end_decay
    if start == end:
        return jnp.asarray(start, jnp.float32)
    annealed = end - (end - start) * (1.0 - n / config.ema_anneal_end_step)
    return jnp.where(n >= config.ema_anneal_end_step, end, annealed).astype(jnp.float32)


def ema_update(
    teacher: PyTree, student: PyTree, decay: jax.Array, copy_keys: tuple[str, ...] = EMA_COPY_KEYS
) -> PyTree:
    """fairseq's `EMAModule.step` on an encoder tree: average in fp32, copy the subtrees named in
    `copy_keys`; a decay of 1 leaves the teacher as it is (fairseq skips the step)."""
    decay = jnp.asarray(decay, jnp.float32)

    def one(path: tuple[Any, ...], t: jax.Array, s: jax.Array) -> jax.Array:
        names = {getattr(p, "key", None) for p in path}
        s32 = s.astype(jnp.float32)
        new = s32 if names & set(copy_keys) else decay * t + (1.0 - decay) * s32
        return jnp.where(decay < 1.0, new, t).astype(t.dtype)

    return jax.tree_util.tree_map_with_path(one, teacher, student)


# ----------------------------------------------------------------------------------------------
# Forward passes through the model's public steps (one feature extractor run for both)


def _student_forward(
    m: Data2VecAudioModel,
    input_values: jax.Array,
    attention_mask: jax.Array | None,
    mask_time_indices: jax.Array,
    deterministic: bool,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """`Data2VecAudioModel.__call__` with `mask_time_indices` and no channel masks (fairseq
    pretrains without them), composed of the same public steps, also returning the unmasked,
    pre-dropout projected features (the teacher's input) and the frame mask. The time mask is
    always applied (`apply_time_mask`): `config.apply_spec_augment` switches fine-tuning's
    SpecAugment, not pretraining's masks."""
    features = m.encode_features(input_values, attention_mask, deterministic=deterministic)
    h = m.apply_time_mask(features.hidden_states, mask_time_indices)
    out = m.encode(h, features.frame_mask, deterministic=deterministic)
    return out.last_hidden_state, features.projected, features.frame_mask


def _teacher_layer_results(
    m: Data2VecAudioModel, features: jax.Array, frame_mask: jax.Array | None
) -> tuple[jax.Array, ...]:
    return m.encode(features, frame_mask, output_layer_results=True).layer_results


def init_final_proj(rng: jax.Array, hidden_size: int) -> dict[str, jax.Array]:
    """`torch.nn.Linear`'s default init (fairseq leaves `final_proj` at it): U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(hidden_size)
    k, b = jax.random.split(rng)
    return {
        "kernel": jax.random.uniform(k, (hidden_size, hidden_size), jnp.float32, -bound, bound),
        "bias": jax.random.uniform(b, (hidden_size,), jnp.float32, -bound, bound),
    }


def final_proj_logical_axes() -> dict[str, PartitionSpec]:
    return {"kernel": PartitionSpec("embed", None), "bias": PartitionSpec(None)}


class EmaTeacher:
    """What both data2vec objectives share: the construction checks, the EMA teacher they keep in
    `TrainState.extra` (`{teacher_key: an fp32 copy of teacher_of(student)}`, moved towards the student
    after every update with the decay `ema_decay_at` gives, offset by `ema_start_update` so a resumed
    fairseq run continues its curve), the metrics every step reports and the collapse guard.

    A subclass names its bare encoder (`module_type`, `title` for the error), `teacher_key` and
    `teacher_of` (which subtree of the student the teacher mirrors) and may keep some entries copied
    instead of averaged (`ema_copy_keys`) or check the module further (`check_module`).
    """

    module_type: type
    title: str
    teacher_key: str
    config: Any

    def __init__(self, module: Any, config: Any, axis_name: str | None = None) -> None:
        if not isinstance(module, self.module_type):
            raise D2VError(f"{self.title} needs the bare {self.module_type.__name__}, got {type(module).__name__}")
        self.check_module(module)
        config.validate(module.config.num_hidden_layers)
        self.module, self.config, self.axis_name = module, config, axis_name

    def check_module(self, module: Any) -> None:
        """Further requirements on the module (after its type, before the config's own checks)."""

    def teacher_of(self, model: PyTree) -> PyTree:
        raise NotImplementedError

    def ema_copy_keys(self) -> tuple[str, ...]:
        return ()

    def init_extra(self, params: PyTree) -> PyTree:
        """The teacher starts as a copy of the student's subtree (fairseq's `make_ema_teacher`), in fp32."""
        teacher = jax.tree.map(lambda x: jnp.array(x, jnp.float32), self.teacher_of(params["model"]))
        return {self.teacher_key: teacher}

    def extra_logical_axes(self, params_axes: PyTree) -> PyTree:
        return {self.teacher_key: self.teacher_of(params_axes["model"])}

    def ema_decay(self, num_updates: jax.Array | int) -> jax.Array:
        """The decay after `num_updates` updates of this run (offset by `ema_start_update`)."""
        return ema_decay_at(self.config, jnp.asarray(num_updates) + self.config.ema_start_update)

    def update_extra(self, extra: PyTree, new_params: PyTree, step: jax.Array) -> PyTree:
        """EMA step after update number `step + 1` (`step` = updates done before it, `TrainState.step`)."""
        decay = self.ema_decay(jnp.asarray(step) + 1)
        k = self.teacher_key
        return {k: ema_update(extra[k], self.teacher_of(new_params["model"]), decay, self.ema_copy_keys())}

    def step_metrics(
        self, targets: jax.Array, pred: jax.Array, counted: jax.Array, step: jax.Array, outputs: bool, **more: Any
    ) -> dict[str, jax.Array]:
        """The metrics of a step: the spread of the targets and predictions over the `counted` frames (what
        the collapse guard reads), this update's EMA decay, `more`; with `outputs` the predictions `pred`
        and targets `targets` themselves."""
        metrics = {
            "target_var": masked_std(targets, counted, self.axis_name),
            "pred_var": masked_std(jax.lax.stop_gradient(pred), counted, self.axis_name),
            "ema_decay": self.ema_decay(jnp.asarray(step) + 1),
            **more,
        }
        if outputs:
            metrics.update(pred=pred, targets=targets)
        return metrics

    def check(self, metrics: dict[str, Any], step: int) -> None:
        """fairseq's collapse guards, host side after a logged step: raise once past `guard_after` updates."""
        check_collapse(metrics, step, self.config)


class Data2VecObjective(EmaTeacher):
    """data2vec-audio pretraining as an `Objective` (see the module docstring).

    `module` is the bare `Data2VecAudioModel` (any dtype / remat / scan setting); its config must
    have `masked_spec_embed` (mask_time_prob or mask_feature_prob > 0, as every HF data2vec config).
    `axis_name`: the `pmap` axis, when the loop runs the loss under `pmap`.
    """

    name = "data2vec"
    module_type = Data2VecAudioModel
    title = "data2vec pretraining"

    def __init__(
        self,
        module: Data2VecAudioModel,
        config: Data2VecPretrainConfig = Data2VecPretrainConfig(),
        axis_name: str | None = None,
    ) -> None:
        super().__init__(module, config, axis_name)

    def check_module(self, module: Data2VecAudioModel) -> None:
        if not module.config.has_masked_spec_embed:
            raise D2VError(
                "config.json: mask_time_prob and mask_feature_prob are both 0, so the model has no "
                "masked_spec_embed (the mask embedding pretraining needs); set mask_time_prob > 0"
            )

    # -- state -------------------------------------------------------------------------------

    def init_params(self, model_params: PyTree, rng: jax.Array, final_proj: PyTree | None = None) -> PyTree:
        """The trained tree: the model's params and a fresh (or given) `final_proj`."""
        h = self.module.config.hidden_size
        fp = init_final_proj(rng, h) if final_proj is None else final_proj
        if fp["kernel"].shape != (h, h) or fp["bias"].shape != (h,):
            raise D2VError(f"final_proj: shapes {fp['kernel'].shape}/{fp['bias'].shape} do not match hidden_size {h}")
        return {"model": model_params, "final_proj": fp}

    def params_logical_axes(self, model_axes: PyTree) -> PyTree:
        return {"model": model_axes, "final_proj": final_proj_logical_axes()}

    teacher_key = "encoder"  # extra = {"encoder": the teacher's encoder}, as fairseq's EMA holds it

    def teacher_of(self, model: PyTree) -> PyTree:
        """The teacher is the student's `encoder` (the conv features are the student's own)."""
        return model["encoder"]

    def ema_copy_keys(self) -> tuple[str, ...]:
        return EMA_COPY_KEYS if self.config.ema_layers_only else ()

    # -- the loss ----------------------------------------------------------------------------

    def masks(self, batch: Batch, rng: jax.Array) -> jax.Array:
        """(B, frames) time masks of this step, from the step key and each example's global index."""
        c = self.config
        num_frames = int(feat_extract_output_lengths(self.module.config, batch["input_values"].shape[1]))
        am = batch.get("attention_mask")
        samples = (
            jnp.full(batch["input_values"].shape[:1], batch["input_values"].shape[1])
            if am is None
            else jnp.asarray(am).astype(jnp.int32).sum(-1)
        )
        lengths = jnp.maximum(feat_extract_output_lengths(self.module.config, samples), 0)
        keys = example_keys(jax.random.fold_in(rng, MASK_STREAM), jnp.asarray(batch["index"]))
        return data2vec_mask_indices(
            keys, lengths, num_frames, c.mask_prob, c.mask_length, c.min_masks, c.require_same_masks, self.axis_name
        )

    def loss(
        self,
        params: PyTree,
        extra: PyTree,
        batch: Batch,
        rng: jax.Array,
        step: jax.Array,
        mask_time_indices: jax.Array | None = None,
        deterministic: bool = False,
        outputs: bool = False,
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """(sum of per-masked-frame losses, number of masked frames, metrics). `mask_time_indices`,
        `deterministic` and `outputs` are for tests and `d2v verify --objective` (fixed masks, no
        dropout; `outputs` adds the (B, T, D) predictions `pred` and targets `targets` to the metrics)."""
        c = self.config
        if mask_time_indices is None:
            mask_time_indices = self.masks(batch, rng)
        input_values = jnp.asarray(batch["input_values"])
        am = batch.get("attention_mask")
        am = None if am is None else jnp.asarray(am)

        def student(rngs, values, mask, time):
            return self.module.apply(
                {"params": params["model"]}, values, mask, time, deterministic, method=_student_forward, rngs=rngs
            )

        if deterministic:
            x, clean, frame_mask = student({}, input_values, am, mask_time_indices)
        else:  # dropout per example (objective.py): the same bits on any layout, pmap included
            x, clean, frame_mask = apply_per_example(
                student, jax.random.fold_in(rng, DROPOUT_STREAM), batch["index"], input_values, am, mask_time_indices
            )
        teacher_params = {**params["model"], "encoder": extra["encoder"]}
        results = self.module.apply(
            {"params": jax.lax.stop_gradient(teacher_params)},
            jax.lax.stop_gradient(clean),
            frame_mask,
            method=_teacher_layer_results,
        )
        targets = [r.astype(jnp.float32) for r in results[-c.average_top_k_layers :]]
        if c.instance_norm_target_layer:
            norm_mask = None if c.instance_norm_over_padding else frame_mask
            targets = [instance_norm_time(t, norm_mask) for t in targets]
        y = jax.lax.stop_gradient(sum(targets) / len(targets))

        fp = params["final_proj"]
        pred = x.astype(jnp.float32) @ fp["kernel"].astype(jnp.float32) + fp["bias"].astype(jnp.float32)
        scale = c.loss_scale if c.loss_scale is not None else 1.0 / math.sqrt(pred.shape[-1])
        per_frame = regression_loss(pred, y, c.loss_beta) * scale
        m = mask_time_indices.astype(jnp.float32)
        loss_sum = (per_frame * m).sum()
        weight = m.sum()
        real = jnp.ones_like(m).sum() if frame_mask is None else frame_mask.sum().astype(jnp.float32)
        metrics = self.step_metrics(
            y, pred, mask_time_indices, step, outputs, masked_frac=weight / jnp.maximum(real, 1.0)
        )
        return loss_sum, weight, metrics


def check_collapse(metrics: dict[str, Any], step: int, config: Data2VecPretrainConfig) -> None:
    """Raise `D2VError` when target_var / pred_var fell under their floors after `guard_after` updates."""
    if step <= config.guard_after:
        return
    for key, floor, what in (
        ("target_var", config.min_target_var, "teacher targets"),
        ("pred_var", config.min_pred_var, "student predictions"),
    ):
        if key in metrics and float(metrics[key]) < floor:
            raise D2VError(
                f"{key}: {float(metrics[key]):.4g} < {floor} at update {step}: the {what} have "
                f"collapsed to a constant (representation collapse); stopping as fairseq does. "
                f"Lower the learning rate, raise --ema-decay or check the data"
            )


# ----------------------------------------------------------------------------------------------
# fairseq's pretraining batches: cropped to the shortest clip, not padded


# Crop widths are multiples of 0.1 s: at most 0.1 s per clip less than fairseq's exact crop to the
# shortest clip, while XLA sees one program per 0.1 s of shortest-clip length (not one per sample).
CROP_MULTIPLE = 1600


def crop_width(lengths: np.ndarray, multiple: int = CROP_MULTIPLE) -> int:
    """The common length of a cropped batch: fairseq's `min(sizes)` (its `RawAudioDataset.collater`
    with `pad: false`), rounded down to `multiple` samples; a batch whose shortest clip is under
    one `multiple` keeps that clip's length."""
    shortest = int(np.min(lengths))
    return max(shortest // multiple * multiple, min(shortest, multiple))


def crop_batch(batch: dict[str, np.ndarray], width: int, seed: int, position: tuple[int, int]) -> dict[str, np.ndarray]:
    """fairseq's `RawAudioDataset.collater` without padding: each clip (already normalised over
    its whole length) cropped to `width` samples at a random offset, a function of (seed, data
    position, example index) only. A clip shorter than `width` (a resampling rounding) keeps a
    padded tail; filler rows (index -1) stay empty."""
    values, mask, index = batch["input_values"], batch["attention_mask"], batch["index"]
    out_v = np.zeros((values.shape[0], width), np.float32)
    out_m = np.zeros((values.shape[0], width), np.int32)
    for r in range(values.shape[0]):
        n = int(mask[r].sum())
        if index[r] < 0 or n == 0:
            continue
        rng = np.random.default_rng([seed, position[0], position[1], int(index[r])])
        start = int(rng.integers(0, max(n - width, 0) + 1))
        take = min(width, n)
        out_v[r, :take] = values[r, start : start + take]
        out_m[r, :take] = 1
    seconds = out_m.sum(-1).astype(np.float32) / SAMPLE_RATE
    return {**batch, "input_values": out_v, "attention_mask": out_m, "seconds": seconds}


class CroppedBatches:
    """A `BatchLoader` whose batches are cropped to their shortest clip (fairseq's pretraining
    default, `enable_padding: false`). The width comes from the *global* batch's declared
    lengths (the loader's plan), so every process crops to the same shape. A `source.DataSource`:
    delegates `state`/`restore`/`close` so checkpoints record the loader's position as usual."""

    def __init__(self, loader: Any, seed: int) -> None:
        self.loader, self.seed = loader, seed

    def __iter__(self) -> CroppedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, b = self.loader.state()["epoch"], self.loader.state()["batch_in_epoch"]
        batch = next(self.loader)
        _, positions = self.loader.plan(epoch)[b]
        lengths = self.loader.manifest.num_samples[positions[positions >= 0]]
        width = crop_width(lengths)
        return crop_batch(batch, width, self.seed, (epoch, b))

    def state(self) -> dict[str, int]:
        return self.loader.state()

    def restore(self, state: dict[str, int]) -> None:
        self.loader.restore(state)

    def close(self) -> None:
        self.loader.close()
