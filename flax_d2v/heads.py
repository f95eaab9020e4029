"""Every head transformers' data2vec-audio family has, and the one registry that says which is which.

Modules (names, parameters and arithmetic as transformers' `modeling_data2vec_audio.py`; the
encoder is nested under `data2vec_audio` as there):

- `Data2VecAudioForSequenceClassification`: optional weighted sum of all hidden states
  (`use_weighted_layer_sum`: `layer_weights`, softmaxed), `projector` (hidden -> `classifier_proj_size`),
  mean over the real (unpadded) frames, `classifier` -> `logits` (batch, num_labels).
- `Data2VecAudioForAudioFrameClassification`: optional weighted sum, per-frame `classifier` ->
  `logits` (batch, frames, num_labels).
- `Data2VecAudioForXVector`: optional weighted sum, `projector`, the TDNN stack (`tdnn.N`: a
  dilated Conv1d stored as a Linear, ReLU), mean + (unbiased) std statistics pooling over the real
  frames, `feature_extractor` -> `embeddings` (the x-vector), `classifier` -> `logits`, and the
  AM-softmax objective's `objective.weight` (used by `am_softmax_loss`, scale 30 and margin 0.4 as
  transformers' `AMSoftmaxLoss`).
- `Data2VecAudioForCTC` and `Data2VecAudioModel` live in `flax_d2v.modeling`; the adapter
  (`add_adapter`) is part of `Data2VecAudioModel`, so it serves the bare model, CTC and x-vectors.

All heads are called as `Data2VecAudioModel` (input values, attention mask, output_hidden_states, and
the keyword options `flax_d2v.modeling.ForwardOptions`, forwarded to the encoder) and take
`freeze_base_model` (transformers' `freeze_base_model()`): no gradient reaches the encoder (and the
optimizer freezes its parameters, see `flax_d2v.train.state`); the head, `layer_weights` included,
still trains. Each head's `base_model` is the encoder class: data2vec 2.0's heads
(`flax_d2v.data2vec2.MODULES_V2`) are these classes on 2.0's encoder, under the same registry entries.

`REGISTRY` maps transformers' `architectures` names to a `HeadSpec`: the module class, the
head's rows of the key table (`flax_d2v.convert.keys` adds them to the encoder's rows), its
output fields, the training objective and the command that serves it. Adding a head means a
module here and a row in `REGISTRY`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any, ClassVar, Unpack

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_d2v.config import Data2VecAudioConfig
from flax_d2v.errors import D2VError
from flax_d2v.modeling import (
    Data2VecAudioForCTC,
    Data2VecAudioModel,
    Data2VecAudioOutput,
    Dtype,
    ForwardOptions,
    _dense,
    feat_extract_output_lengths,
)
from flax_d2v.precision import matmul_precision

Array = jax.Array

# transformers' AMSoftmaxLoss(input_dim, num_labels, scale=30.0, margin=0.4): the values it is built with.
AM_SOFTMAX_SCALE = 30.0
AM_SOFTMAX_MARGIN = 0.4


def num_labels(config: Data2VecAudioConfig) -> int:
    """transformers' `config.num_labels`: len(id2label), else `num_labels`, else its default 2."""
    id2label = config.extra.get("id2label")
    if id2label:
        return len(id2label)
    return int(config.extra.get("num_labels") or 2)


def id2label(config: Data2VecAudioConfig) -> dict[int, str]:
    """Label names by id (transformers' default `LABEL_i` when the config has none)."""
    raw = config.extra.get("id2label") or {}
    names = {int(k): str(v) for k, v in raw.items()}
    return {i: names.get(i, f"LABEL_{i}") for i in range(num_labels(config))}


def with_labels(config: Data2VecAudioConfig, labels: Iterable[str]) -> Data2VecAudioConfig:
    """`config` with `id2label`/`label2id` for `labels` (ids in the given order), as transformers writes them."""
    labels = list(labels)
    extra = dict(config.extra)
    extra.pop("num_labels", None)
    extra["id2label"] = {str(i): name for i, name in enumerate(labels)}
    extra["label2id"] = {name: i for i, name in enumerate(labels)}
    return config.replace(extra=extra)


def _base(module: nn.Module) -> nn.Module:
    return module.base_model(
        module.config,
        module.dtype,
        module.remat_policy,
        module.scan_layers,
        module.freeze_feature_encoder,
        module.precision,
        name="data2vec_audio",
    )


def _with_precision(call: Any) -> Any:
    """Trace a head's `__call__` (its own projector/classifier/TDNN too) at the module's precision."""

    @functools.wraps(call)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        with matmul_precision(self.precision):
            return call(self, *args, **kwargs)

    return wrapped


def _run_base(
    module: nn.Module,
    input_values: Array,
    attention_mask: Array | None,
    output_hidden_states: bool,
    options: ForwardOptions,
    padding_invariant: bool,
) -> tuple[Data2VecAudioOutput, Array]:
    """The encoder's output and the hidden state the head reads (weighted layer sum or the last).

    `padding_invariant` goes on to an encoder that takes it (data2vec 2.0); 1.0's encoder is made
    padding-invariant from outside (`flax_d2v.modeling.apply_padding_invariant`)."""
    c = module.config
    if padding_invariant and getattr(module.base_model, "takes_padding_invariant", False):
        options = {**options, "padding_invariant": True}
    out = _base(module)(input_values, attention_mask, output_hidden_states or c.use_weighted_layer_sum, **options)
    # freeze_base_model stops the gradient at the encoder's outputs, before the weighted sum: as
    # transformers' freeze_base_model() (data2vec_audio.* only), `layer_weights` keep training
    frozen = jax.lax.stop_gradient if module.freeze_base_model else (lambda x: x)
    if c.use_weighted_layer_sum:
        n = c.num_hidden_layers + 1  # transformer layers + the encoder input
        weights = module.param(
            "layer_weights", nn.with_logical_partitioning(nn.initializers.constant(1.0 / n), (None,)), (n,)
        )
        norm = jax.nn.softmax(weights.astype(jnp.float32))
        h = sum(norm[i] * frozen(out.hidden_states[i]) for i in range(n))
        if not output_hidden_states:
            out = out.replace(hidden_states=None)
    else:
        h = frozen(out.last_hidden_state)
    return out, h


def _no_adapter(config: Data2VecAudioConfig, name: str) -> None:
    if config.add_adapter:
        raise D2VError(f"config: {name} does not support the adapter (add_adapter=True), as in transformers")


class _Head(nn.Module):
    """Fields every head shares (those of `Data2VecAudioForCTC`, plus `freeze_base_model`).

    `base_model` is the encoder class, nested as `data2vec_audio` (data2vec 2.0's heads in
    `flax_d2v.data2vec2` are these classes with 2.0's encoder). Every head takes `padding_invariant`
    (see `flax_d2v.modeling.apply_padding_invariant`).
    """

    config: Data2VecAudioConfig
    dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = False
    freeze_feature_encoder: bool = False
    freeze_base_model: bool = False
    precision: str = "highest"  # matmul/conv precision, see flax_d2v.precision

    base_model: ClassVar[type[nn.Module]] = Data2VecAudioModel
    takes_padding_invariant: ClassVar[bool] = True


class Data2VecAudioForSequenceClassification(_Head):
    """One label per clip: `logits` (batch, num_labels), mean-pooled over real frames."""

    @nn.compact
    @_with_precision
    def __call__(
        self,
        input_values: Array,
        attention_mask: Array | None = None,
        output_hidden_states: bool = False,
        padding_invariant: bool = False,
        **options: Unpack[ForwardOptions],
    ) -> Data2VecAudioOutput:
        c = self.config
        _no_adapter(c, "Data2VecAudioForSequenceClassification")
        out, h = _run_base(self, input_values, attention_mask, output_hidden_states, options, padding_invariant)
        h = _dense(c.classifier_proj_size, ("embed", "vocab"), self.dtype, "projector")(h).astype(jnp.float32)
        if out.frame_mask is None:
            pooled = h.mean(axis=1)
        else:
            m = out.frame_mask[..., None]
            pooled = jnp.where(m, h, 0.0).sum(axis=1) / m.sum(axis=1)
        logits = _dense(num_labels(c), (None, "vocab"), self.dtype, "classifier")(pooled)
        return out.replace(logits=logits.astype(jnp.float32))


class Data2VecAudioForAudioFrameClassification(_Head):
    """One label per frame: `logits` (batch, frames, num_labels); padded frames are undefined."""

    @nn.compact
    @_with_precision
    def __call__(
        self,
        input_values: Array,
        attention_mask: Array | None = None,
        output_hidden_states: bool = False,
        padding_invariant: bool = False,
        **options: Unpack[ForwardOptions],
    ) -> Data2VecAudioOutput:
        c = self.config
        _no_adapter(c, "Data2VecAudioForAudioFrameClassification")
        out, h = _run_base(self, input_values, attention_mask, output_hidden_states, options, padding_invariant)
        logits = _dense(num_labels(c), ("embed", "vocab"), self.dtype, "classifier")(h)
        return out.replace(logits=logits.astype(jnp.float32))


class _LinearParams(nn.Module):
    """A torch Linear's parameters (Flax layout: kernel (in, out)) without applying them."""

    in_features: int
    out_features: int

    @nn.compact
    def __call__(self) -> tuple[Array, Array]:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None)),
            (self.in_features, self.out_features),
        )
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (self.out_features,))
        return kernel, bias


class TDNNLayer(nn.Module):
    """`tdnn.N`: transformers keeps a Linear(in * kernel, out) named `kernel` and runs it as a dilated
    Conv1d (valid padding), then ReLU. Its Flax kernel (kernel * in, out) reshapes to the conv's
    (width, in, out) directly."""

    config: Data2VecAudioConfig
    layer_id: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c, i = self.config, self.layer_id
        in_dim = c.tdnn_dim[i - 1] if i > 0 else c.tdnn_dim[0]
        out_dim, k = c.tdnn_dim[i], c.tdnn_kernel[i]
        kernel, bias = _LinearParams(in_dim * k, out_dim, name="kernel")()
        w = kernel.reshape(k, in_dim, out_dim).astype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            w,
            window_strides=(1,),
            padding="VALID",
            rhs_dilation=(c.tdnn_dilation[i],),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        return jax.nn.relu(y + bias.astype(self.dtype))


def tdnn_output_lengths(config: Data2VecAudioConfig, frames: Any, dilated: bool = False) -> Any:
    """Frames left after the TDNN stack: as transformers' `_get_tdnn_output_lengths`, which ignores the
    dilation (so it counts a few frames that read past the real ones), or with it (`dilated`: the
    frames of the valid dilated convolution, exactly those of the clip run alone)."""
    for k, d in zip(config.tdnn_kernel, config.tdnn_dilation, strict=True):
        frames = frames - (k - 1) * (d if dilated else 1)
    return frames


class _AMSoftmaxWeight(nn.Module):
    """`objective.weight` (xvector_output_dim, num_labels), normal(0, 1) as transformers initialises it."""

    shape: tuple[int, int]

    @nn.compact
    def __call__(self) -> Array:
        return self.param("weight", nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, None)), self.shape)


class Data2VecAudioForXVector(_Head):
    """Speaker embeddings: `embeddings` (batch, xvector_output_dim) and `logits` (batch, xvector_output_dim)."""

    @nn.compact
    @_with_precision
    def __call__(
        self,
        input_values: Array,
        attention_mask: Array | None = None,
        output_hidden_states: bool = False,
        padding_invariant: bool = False,
        **options: Unpack[ForwardOptions],
    ) -> Data2VecAudioOutput:
        c = self.config
        if c.add_adapter and c.output_hidden_size != c.hidden_size and not c.use_weighted_layer_sum:
            raise D2VError(
                f"config: Data2VecAudioForXVector with the adapter needs output_hidden_size == hidden_size "
                f"(got {c.output_hidden_size} and {c.hidden_size}): transformers' projector reads hidden_size features"
            )
        out, h = _run_base(self, input_values, attention_mask, output_hidden_states, options, padding_invariant)
        h = _dense(c.tdnn_dim[0], ("embed", "vocab"), self.dtype, "projector")(h)
        for i in range(len(c.tdnn_dim)):
            h = TDNNLayer(c, i, self.dtype, name=f"tdnn_{i}")(h)
        h = h.astype(jnp.float32)
        t = h.shape[1]
        if attention_mask is None:
            lengths = jnp.full((h.shape[0],), t)
        else:
            # transformers counts the adapter's frames even when the weighted sum reads the encoder's
            adapter = not (padding_invariant and c.use_weighted_layer_sum)
            frames = feat_extract_output_lengths(c, attention_mask.astype(jnp.int32).sum(-1), add_adapter=adapter)
            # transformers slices `[:length]`: a length past the end (its formula ignores the dilation) is all
            # frames. Padding-invariant: only the frames the clip alone has, none that read the padding.
            lengths = jnp.minimum(tdnn_output_lengths(c, frames, dilated=padding_invariant), t)
        m = (jnp.arange(t)[None, :] < lengths[:, None])[..., None]
        n = lengths[:, None].astype(jnp.float32)
        mean = jnp.where(m, h, 0.0).sum(axis=1) / n
        var = jnp.where(m, (h - mean[:, None, :]) ** 2, 0.0).sum(axis=1) / (n - 1.0)  # torch.std: unbiased
        stats = jnp.concatenate([mean, jnp.sqrt(var)], axis=-1)
        embeddings = _dense(c.xvector_output_dim, (None, "vocab"), self.dtype, "feature_extractor")(stats)
        logits = _dense(c.xvector_output_dim, (None, "vocab"), self.dtype, "classifier")(embeddings)
        _AMSoftmaxWeight((c.xvector_output_dim, num_labels(c)), name="objective")()
        return out.replace(logits=logits.astype(jnp.float32), embeddings=embeddings.astype(jnp.float32))


def am_softmax_logits(
    logits: Array, weight: Array, labels: Array, scale: float = AM_SOFTMAX_SCALE, margin: float = AM_SOFTMAX_MARGIN
) -> Array:
    """transformers' `AMSoftmaxLoss` before its cross-entropy: scale * (cos - margin on the true class)."""

    def normalize(x: Array, axis: int) -> Array:  # torch.nn.functional.normalize (eps 1e-12)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)

    cos = normalize(logits.astype(jnp.float32), 1) @ normalize(weight.astype(jnp.float32), 0)
    onehot = jax.nn.one_hot(labels, weight.shape[1], dtype=bool)
    return scale * jnp.where(onehot, cos - margin, cos)


def am_softmax_loss(
    logits: Array, weight: Array, labels: Array, scale: float = AM_SOFTMAX_SCALE, margin: float = AM_SOFTMAX_MARGIN
) -> Array:
    """Per-example AM-softmax cross-entropy (transformers averages it over the batch)."""
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(
        am_softmax_logits(logits, weight, labels, scale, margin), labels
    )


# ------------------------------------------------------------------------------------------ registry
Row = tuple[str, str, str]  # (HF key template, Flax path template, transform), as convert/keys.py
_LAYER_WEIGHTS: tuple[Row, ...] = (("layer_weights", "layer_weights", "copy"),)


def _linear(hf: str, flax: str) -> tuple[Row, Row]:
    return (f"{hf}.weight", f"{flax}/kernel", "linear"), (f"{hf}.bias", f"{flax}/bias", "copy")


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """One architecture: what builds it, its checkpoint keys, what it outputs and what uses it.

    Truth-testing a spec is an error: code written for the old `is_ctc` boolean (`if is_ctc:`)
    fails loudly instead of treating every head as CTC.
    """

    architecture: str  # transformers' class name (config.json "architectures"), = our class name
    module: type[nn.Module]
    key_rows: tuple[Row, ...]  # the head's rows of the key table (top level, beside `data2vec_audio`)
    signature: tuple[str, ...]  # top-level Flax names that only this head (and more specific ones) has
    outputs: tuple[str, ...]  # Data2VecAudioOutput fields the head adds
    objective: str | None  # `d2v finetune --task` that trains it
    command: str | None  # the command that serves it

    def __bool__(self) -> bool:
        raise TypeError("a HeadSpec is not a boolean: test `spec.architecture` (the old is_ctc flag is gone)")

    @property
    def is_base(self) -> bool:
        return self.module is Data2VecAudioModel

    def build(self, config: Data2VecAudioConfig, **module_kwargs: Any) -> nn.Module:
        if self.module in (Data2VecAudioModel, Data2VecAudioForCTC):
            if module_kwargs.pop("freeze_base_model", False):
                raise D2VError(f"freeze_base_model: {self.architecture} has no classification head")
        return self.module(config, **module_kwargs)


REGISTRY: dict[str, HeadSpec] = {
    spec.architecture: spec
    for spec in (
        HeadSpec("Data2VecAudioModel", Data2VecAudioModel, (), (), ("last_hidden_state",), "data2vec", "embed"),
        HeadSpec(
            "Data2VecAudioForCTC",
            Data2VecAudioForCTC,
            _linear("lm_head", "lm_head"),
            ("lm_head",),
            ("logits",),
            "ctc",
            "transcribe",
        ),
        HeadSpec(
            "Data2VecAudioForSequenceClassification",
            Data2VecAudioForSequenceClassification,
            _LAYER_WEIGHTS + _linear("projector", "projector") + _linear("classifier", "classifier"),
            ("projector", "classifier"),
            ("logits",),
            "audio-classification",
            "classify",
        ),
        HeadSpec(
            "Data2VecAudioForAudioFrameClassification",
            Data2VecAudioForAudioFrameClassification,
            _LAYER_WEIGHTS + _linear("classifier", "classifier"),
            ("classifier",),
            ("logits",),
            None,
            "classify --frames",
        ),
        HeadSpec(
            "Data2VecAudioForXVector",
            Data2VecAudioForXVector,
            _LAYER_WEIGHTS
            + _linear("projector", "projector")
            + _linear("tdnn.{n}.kernel", "tdnn_{n}/kernel")
            + _linear("feature_extractor", "feature_extractor")
            + _linear("classifier", "classifier")
            + (("objective.weight", "objective/weight", "copy"),),
            ("projector", "classifier", "tdnn_0"),
            ("logits", "embeddings"),
            "xvector",
            "embed --xvector / similarity",
        ),
    )
}
BASE = REGISTRY["Data2VecAudioModel"]
BASE_PREFIX = "data2vec_audio"  # where every head nests the encoder (HF `data2vec_audio.`, Flax `data2vec_audio/`)


def head_key_rows() -> tuple[Row, ...]:
    """Every head's key-table rows, each once (heads share `classifier`, `projector`, `layer_weights`)."""
    return tuple(dict.fromkeys(row for spec in REGISTRY.values() for row in spec.key_rows))


def get_spec(architecture: str | HeadSpec) -> HeadSpec:
    if isinstance(architecture, HeadSpec):
        return architecture
    if architecture not in REGISTRY:
        raise D2VError(f"architecture {architecture!r} is not supported; choose one of {sorted(REGISTRY)}")
    return REGISTRY[architecture]


def detect(top_level_names: Iterable[str]) -> HeadSpec:
    """The head whose signature the parameters' top-level names hold (most specific first)."""
    names = set(top_level_names)
    for spec in sorted(REGISTRY.values(), key=lambda s: -len(s.signature)):
        if spec.signature and all(n in names for n in spec.signature):
            return spec
    return BASE


def spec_of(module: nn.Module) -> HeadSpec:
    for spec in REGISTRY.values():
        if type(module) is spec.module:
            return spec
    raise D2VError(f"{type(module).__name__} is not a registered data2vec-audio architecture")
