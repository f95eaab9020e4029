"""data2vec-audio in `flax.linen`, module for module the layout of transformers' PyTorch model.

Module names follow the checkpoint (`feature_extractor.conv_layers.N`, `feature_projection`,
`encoder.pos_conv_embed.layers.N`, `encoder.layer_norm`, `encoder.layers.N`, `masked_spec_embed`,
`lm_head`) so a key in an error message points at the code that owns it. Flax spells list
indices `conv_layers_0`; `flax_d2v.convert.keys` is the one table between the two spellings.

Parity details that matter (each checked by tests against transformers):
- exact (erf) GELU everywhere (`jax.nn.gelu` defaults to the tanh approximation);
- the positional embedding is `num_conv_pos_embeddings` stacked grouped convolutions, each
  followed by an affine-free LayerNorm and GELU (no weight norm, unlike wav2vec2);
- padded frames are zeroed once, right before the positional convolution;
- post-LN transformer layers (attention, residual, LayerNorm, FFN, residual, LayerNorm).

Sharding is not declared here: parameters and activations carry *logical* axis names
(`embed`, `mlp`, `heads`, ...) that `flax_d2v.train.sharding` maps onto a device mesh.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar, TypedDict, Unpack

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from flax_d2v.config import Data2VecAudioConfig
from flax_d2v.masking import spec_augment
from flax_d2v.precision import matmul_precision

Array = jax.Array
Dtype = Any

# torch.nn.LayerNorm's default eps: used where transformers builds LayerNorm without config eps.
TORCH_LAYER_NORM_EPS = 1e-5
_SQRT_HALF = 0.7071067811865476
REMAT_POLICIES = (
    "none",
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
)


def gelu(x: Array) -> Array:
    """Exact GELU, as `torch.nn.functional.gelu` (transformers' "gelu"): x/2 (1 + erf(x/sqrt 2)).

    Written with `lax.erf`, torch's own formula, rather than `jax.nn.gelu(approximate=False)`,
    which goes through `erfc`: XLA's CPU `erfc` expansion is markedly slower, and this runs over
    every conv-encoder activation (512 channels x 3,200 frames per second of audio in layer 0).
    """
    return x * 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))


@flax.struct.dataclass
class Data2VecAudioOutput:
    """What `apply` returns. Fields not asked for are None.

    hidden_states: as transformers, [0] is the encoder input after the positional convolution
    and `encoder.layer_norm`, [i] the output of layer i. layer_results: for each layer the FFN
    output before dropout, residual and `final_layer_norm` (data2vec's teacher targets).
    """

    last_hidden_state: Array
    extract_features: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
    layer_results: tuple[Array, ...] | None = None
    logits: Array | None = None
    frame_mask: Array | None = None
    mask_time_indices: Array | None = None
    # Heads (flax_d2v.heads): x-vector speaker embeddings; the mask of `last_hidden_state`'s frames
    # when the adapter shortened them (`frame_mask` stays the encoder's, for `hidden_states`).
    embeddings: Array | None = None
    output_frame_mask: Array | None = None

    @property
    def logits_frame_mask(self) -> Array | None:
        """Real frames of `last_hidden_state` (and of per-frame logits): after the adapter, if any."""
        return self.output_frame_mask if self.output_frame_mask is not None else self.frame_mask


def feat_extract_output_lengths(config: Data2VecAudioConfig, input_lengths: Any, add_adapter: bool = False) -> Any:
    """Frames the conv feature encoder makes from `input_lengths` samples (ints or arrays).

    `add_adapter=True` (and `config.add_adapter`): the frames after the adapter's strided convs too,
    as transformers' `_get_feat_extract_output_lengths` (kernel 1 there: its padding 1 and kernel 3
    give the same count).
    """
    for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
        input_lengths = (input_lengths - kernel) // stride + 1
    if add_adapter and config.add_adapter:
        for _ in range(config.num_adapter_layers):
            input_lengths = (input_lengths - 1) // config.adapter_stride + 1
    return input_lengths


def real_frames(
    config: Data2VecAudioConfig, attention_mask: Array | None, num_frames: int, add_adapter: bool = False
) -> Array | None:
    """(batch, num_frames) True on the frames made from real samples of `attention_mask` (batch, samples)
    (right padding); None without a mask. `add_adapter`: the frames after the adapter (as
    `feat_extract_output_lengths`)."""
    if attention_mask is None:
        return None
    lengths = feat_extract_output_lengths(config, attention_mask.astype(jnp.int32).sum(-1), add_adapter)
    return jnp.arange(num_frames)[None, :] < lengths[:, None]


def _dense(features: int, axes: tuple[str, str], dtype: Dtype, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        use_bias=use_bias,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


def _conv(features: int, kernel_size: int, axis: str | None, dtype: Dtype, name: str, **options: Any) -> nn.Conv:
    """A 1-d `nn.Conv` (batch, frames, channels) as every conv here is built: He-normal kernel, zero bias,
    the output channels on logical axis `axis`; `options` are nn.Conv's (strides, padding, groups, bias)."""
    return nn.Conv(
        features,
        kernel_size=(kernel_size,),
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.he_normal(), ("conv_width", None, axis)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis,)),
        name=name,
        **options,
    )


def _layer_norm(eps: float, axis_name: str, dtype: Dtype, name: str, affine: bool = True) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        use_scale=affine,
        use_bias=affine,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis_name,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis_name,)),
        name=name,
    )


class ConvLayer(nn.Module):
    """`feature_extractor.conv_layers.N`: Conv1d, LayerNorm over channels, GELU."""

    config: Data2VecAudioConfig
    layer_id: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        i = self.layer_id
        options = dict(strides=(c.conv_stride[i],), padding="VALID", use_bias=c.conv_bias)
        x = _conv(c.conv_dim[i], c.conv_kernel[i], "conv_dim", self.dtype, "conv", **options)(x)
        x = _layer_norm(TORCH_LAYER_NORM_EPS, "conv_dim", self.dtype, "layer_norm")(x)
        return gelu(x)


class FeatureEncoder(nn.Module):
    """`feature_extractor`: raw waveform (batch, samples) to features (batch, frames, conv_dim[-1])."""

    config: Data2VecAudioConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_values: Array) -> Array:
        x = input_values[..., None].astype(self.dtype)
        for i in range(self.config.num_feat_extract_layers):
            x = ConvLayer(self.config, i, self.dtype, name=f"conv_layers_{i}")(x)
        return x


class FeatureProjection(nn.Module):
    """`feature_projection`: LayerNorm, Linear to hidden_size, dropout.

    Returns (projection after dropout, the LayerNorm's output, projection before dropout).
    """

    config: Data2VecAudioConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> tuple[Array, Array, Array]:
        c = self.config
        normed = _layer_norm(c.layer_norm_eps, "conv_dim", self.dtype, "layer_norm")(x)
        projected = _dense(c.hidden_size, ("conv_dim", "embed"), self.dtype, "projection")(normed)
        h = nn.Dropout(c.feat_proj_dropout)(projected, deterministic=deterministic)
        return h, normed, projected


class PositionalConvLayer(nn.Module):
    """`encoder.pos_conv_embed.layers.N`: grouped Conv1d ("same" length), affine-free LayerNorm, GELU."""

    config: Data2VecAudioConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        k = c.conv_pos_kernel_size
        length = x.shape[1]
        groups = c.num_conv_pos_embedding_groups
        x = _conv(
            c.hidden_size, k, "embed", self.dtype, "conv", padding=[(k // 2, k // 2)], feature_group_count=groups
        )(x)
        x = x[:, :length]  # an even kernel makes one frame too many (transformers' PadLayer)
        x = _layer_norm(TORCH_LAYER_NORM_EPS, "embed", self.dtype, "layer_norm", affine=False)(x)
        return gelu(x)


class PositionalConvEmbedding(nn.Module):
    """`encoder.pos_conv_embed`: the stack of positional conv layers."""

    config: Data2VecAudioConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(self.config.num_conv_pos_embeddings):
            x = PositionalConvLayer(self.config, self.dtype, name=f"layers_{i}")(x)
        return x


# cuDNN's fused attention takes sequence lengths in multiples of this (its backward refuses odd
# lengths; 64 is its tile): q, k and v are zero-padded up to it and the padded keys masked out.
FUSED_ATTENTION_MULTIPLE = 64


def fused_attention(
    q: Array, k: Array, v: Array, attention_bias: Array | None, implementation: str | None = None
) -> Array | None:
    """cuDNN's fused (flash) attention for bf16/fp16 on a GPU, else None (the caller's XLA path).

    Why: the explicit path materialises (batch, heads, T, T) fp32 scores and probabilities in HBM,
    the largest tensors of the step at 10 s of audio, and training saves them for the backward
    pass; the fused kernel keeps them on chip. cuDNN only takes half-precision inputs, so fp32
    (parity, `highest`) always uses the explicit path, and so does the CPU. The key padding bias
    becomes per-row key lengths (right padding), which is what the bias encodes; the softmax is
    accumulated in fp32 by cuDNN, as on the explicit path. Only with dropout off on the attention
    probabilities (cuDNN's dropout draws its own bits): fairseq's fine-tuning recipes use 0.
    `implementation="xla"` runs the same padding and masking through XLA (tests, on any machine).
    """
    if implementation is None:
        if q.dtype not in (jnp.bfloat16, jnp.float16) or jax.default_backend() != "gpu":
            return None
        implementation = "cudnn"
    b, t = q.shape[:2]
    if attention_bias is None:
        kv_lengths = jnp.full((b,), t, jnp.int32)
    else:
        kv_lengths = (attention_bias[:, 0, 0, :] == 0).sum(-1).astype(jnp.int32)
    padded = -(-t // FUSED_ATTENTION_MULTIPLE) * FUSED_ATTENTION_MULTIPLE
    if padded != t:
        q, k, v = (jnp.pad(a, ((0, 0), (0, padded - t), (0, 0), (0, 0))) for a in (q, k, v))
    try:
        # q is already scaled by head_dim**-0.5 (transformers' order of operations)
        out = jax.nn.dot_product_attention(
            q, k, v, key_value_seq_lengths=kv_lengths, scale=1.0, implementation=implementation
        )
    except Exception:  # noqa: BLE001 - an unsupported shape or cuDNN version: the explicit path computes it
        return None
    return out[:, :t]


def _attend(
    q: Array, k: Array, v: Array, bias: Array | None, dropout: float, deterministic: bool, dtype: Dtype
) -> Array:
    """The explicit attention of both encoders, (batch, T, heads, head_dim) from (batch, T, heads, head_dim)
    q (already scaled), k, v: fp32 logits plus `bias`, softmax, dropout on the probabilities (an
    `nn.Dropout` of the calling module), the weighted sum. Call it from a module's compact method."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if bias is not None:
        scores = scores + bias
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    weights = nn.Dropout(dropout)(weights, deterministic=deterministic)
    # Head-major output, then one small transpose: asking for "bqhd" directly makes XLA's CPU
    # layout assignment transpose the whole (heads, T, T) probability matrix instead (2x slower
    # attention at 30 s of audio).
    return jnp.einsum("bhqk,bkhd->bhqd", weights, v).transpose(0, 2, 1, 3)


class Attention(nn.Module):
    """`encoder.layers.N.attention`: multi-head self-attention with a key padding bias."""

    config: Data2VecAudioConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, attention_bias: Array | None, deterministic: bool = True) -> Array:
        c = self.config
        heads = c.num_attention_heads
        head_dim = c.hidden_size // heads
        b, t, _ = x.shape

        def proj(name: str) -> Array:
            y = _dense(c.hidden_size, ("embed", "heads"), self.dtype, name)(x)
            return y.reshape(b, t, heads, head_dim)

        # The query is scaled, not the (heads, T, T) scores: T/head_dim times less work, and transformers'
        # order of operations (its q_proj output is multiplied by head_dim**-0.5).
        q, k, v = proj("q_proj") * (head_dim**-0.5), proj("k_proj"), proj("v_proj")
        dropout_on = not deterministic and c.attention_dropout > 0.0
        out = None if dropout_on else fused_attention(q, k, v, attention_bias)
        if out is None:
            out = _attend(q, k, v, attention_bias, c.attention_dropout, deterministic, self.dtype)
        out = out.reshape(b, t, c.hidden_size)
        return _dense(c.hidden_size, ("heads", "embed"), self.dtype, "out_proj")(out)


class FeedForward(nn.Module):
    """`encoder.layers.N.feed_forward`: Linear, GELU, dropout, Linear (output dropout is the caller's)."""

    config: Data2VecAudioConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        c = self.config
        x = _dense(c.intermediate_size, ("embed", "mlp"), self.dtype, "intermediate_dense")(x)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_mlp"))
        x = gelu(x)
        x = nn.Dropout(c.activation_dropout)(x, deterministic=deterministic)
        return _dense(c.hidden_size, ("mlp", "embed"), self.dtype, "output_dense")(x)


class EncoderLayer(nn.Module):
    """`encoder.layers.N`: post-LN transformer layer, with LayerDrop when training.

    Returns the new hidden state and the FFN output before dropout/residual/LayerNorm (fairseq's
    `layer_result`, the data2vec target).
    """

    config: Data2VecAudioConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, attention_bias: Array | None, deterministic: bool = True) -> tuple[Array, Array]:
        c = self.config
        residual = x
        h = Attention(c, self.dtype, name="attention")(x, attention_bias, deterministic)
        h = nn.Dropout(c.hidden_dropout)(h, deterministic=deterministic)
        h = _layer_norm(c.layer_norm_eps, "embed", self.dtype, "layer_norm")(residual + h)
        ffn = FeedForward(c, self.dtype, name="feed_forward")(h, deterministic)
        out = h + nn.Dropout(c.hidden_dropout)(ffn, deterministic=deterministic)
        out = _layer_norm(c.layer_norm_eps, "embed", self.dtype, "final_layer_norm")(out)
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_embed"))
        if not deterministic and c.layerdrop > 0.0:
            # a "layerdrop" rng, when given, decides for the whole batch while "dropout" varies per example
            key = self.make_rng("layerdrop") if self.has_rng("layerdrop") else self.make_rng("dropout")
            skip = jax.random.uniform(key, ()) < c.layerdrop
            out = jnp.where(skip, x, out)
        return out, ffn


def _remat(cls: type[nn.Module], policy: str) -> type[nn.Module]:
    if policy == "none":
        return cls
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose one of {REMAT_POLICIES}")
    # argument 3 of __call__ (counting self) is `deterministic`, a Python bool
    return nn.remat(cls, policy=getattr(jax.checkpoint_policies, policy), static_argnums=(3,))


class _ScanStep(nn.Module):
    """One `nn.scan` iteration: the layer under the name `layer`, collecting what was asked for."""

    config: Data2VecAudioConfig
    dtype: Dtype
    deterministic: bool
    remat_policy: str
    collect_hidden: bool
    collect_results: bool

    @nn.compact
    def __call__(self, x: Array, attention_bias: Array | None) -> tuple[Array, tuple[Array | None, Array | None]]:
        layer = _remat(EncoderLayer, self.remat_policy)(self.config, self.dtype, name="layer")
        x, result = layer(x, attention_bias, self.deterministic)
        return x, (x if self.collect_hidden else None, result if self.collect_results else None)


class Encoder(nn.Module):
    """`encoder`: zero padding, positional conv, LayerNorm, dropout, the layers."""

    config: Data2VecAudioConfig
    dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        frame_mask: Array | None = None,
        *,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        output_layer_results: bool = False,
    ) -> tuple[Array, tuple[Array, ...] | None, tuple[Array, ...] | None]:
        c = self.config
        attention_bias = None
        if frame_mask is not None:
            x = jnp.where(frame_mask[..., None], x, 0.0)
            attention_bias = jnp.where(frame_mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
        x = x + PositionalConvEmbedding(c, self.dtype, name="pos_conv_embed")(x)
        x = _layer_norm(c.layer_norm_eps, "embed", self.dtype, "layer_norm")(x)
        x = nn.Dropout(c.hidden_dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        hidden_states = [x]
        if self.scan_layers:
            scan = nn.scan(
                _ScanStep,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True, "layerdrop": True},
                in_axes=(nn.broadcast,),
                length=c.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, (hs, rs) = scan(
                c,
                self.dtype,
                deterministic,
                self.remat_policy,
                output_hidden_states,
                output_layer_results,
                name="layers",
            )(x, attention_bias)
            hidden_states += list(hs) if output_hidden_states else []
            results = list(rs) if output_layer_results else []
        else:
            layer_cls = _remat(EncoderLayer, self.remat_policy)
            results = []
            for i in range(c.num_hidden_layers):
                x, r = layer_cls(c, self.dtype, name=f"layers_{i}")(x, attention_bias, deterministic)
                hidden_states.append(x)
                results.append(r)
        return (
            x,
            tuple(hidden_states) if output_hidden_states else None,
            tuple(results) if output_layer_results else None,
        )


class AdapterLayer(nn.Module):
    """`adapter.layers.N`: strided Conv1d to twice the width (padding 1), then GLU over channels."""

    config: Data2VecAudioConfig
    dtype: Dtype = jnp.float32
    layer_id: int = 0  # its place in the stack: the padding-invariant forward counts its input frames by it

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        width, stride = c.adapter_kernel_size, (c.adapter_stride,)
        x = _conv(2 * c.output_hidden_size, width, "embed", self.dtype, "conv", strides=stride, padding=[(1, 1)])(x)
        a, b = jnp.split(x, 2, axis=-1)
        return a * jax.nn.sigmoid(b)


class Adapter(nn.Module):
    """`adapter` (config `add_adapter`): optional `proj` + `proj_layer_norm` to `output_hidden_size`,
    then `num_adapter_layers` strided conv+GLU layers, each skipped with probability `layerdrop` when
    training (as transformers)."""

    config: Data2VecAudioConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        c = self.config
        if c.output_hidden_size != c.hidden_size:
            x = _dense(c.output_hidden_size, ("embed", "mlp"), self.dtype, "proj")(x)
            x = _layer_norm(TORCH_LAYER_NORM_EPS, "embed", self.dtype, "proj_layer_norm")(x)
        for i in range(c.num_adapter_layers):
            y = AdapterLayer(c, self.dtype, i, name=f"layers_{i}")(x)
            if not deterministic and c.layerdrop > 0.0:
                skip = jax.random.uniform(self.make_rng("dropout"), ()) < c.layerdrop
                # only where a skipped layer keeps the shape (stride 1): transformers' skip of a
                # strided layer changes the number of frames, which a jitted step cannot
                y = jnp.where(skip, x, y) if y.shape == x.shape else y
            x = y
        return x


class ForwardOptions(TypedDict, total=False):
    """The keyword-only options of `Data2VecAudioModel.__call__` (defaults there), which every model
    wrapping it (CTC, the heads, data2vec 2.0) takes too and forwards: written once here."""

    deterministic: bool
    mask_time_indices: Array | None
    mask_feature_indices: Array | None
    output_layer_results: bool


@flax.struct.dataclass
class FeatureEncoding:
    """What `Data2VecAudioModel.encode_features` / `project_features` return."""

    hidden_states: Array  # projected features after `feat_proj_dropout`: the input of masking and the encoder
    projected: Array  # the same before dropout (fairseq's `pre_encoder_features`, data2vec's teacher input)
    extract_features: Array  # the conv features after `feature_projection.layer_norm` (transformers' name)
    frame_mask: Array | None = None  # (batch, frames): True on real frames; None without an attention mask


class EncoderModule(nn.Module):
    """The constructor fields of every encoder model (1.0's, 2.0's and the CTC model around either), in
    this positional order: the CTC model hands them to its base model positionally."""

    config: Data2VecAudioConfig
    dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = False
    freeze_feature_encoder: bool = False
    precision: str = "highest"  # matmul/conv precision, see flax_d2v.precision


class Data2VecAudioModel(EncoderModule):
    """The bare encoder (transformers' `Data2VecAudioModel`).

    Call: `module.apply({"params": p}, input_values, attention_mask=None, output_hidden_states=False)`.
    `input_values` is (batch, samples) normalised audio; `attention_mask` (batch, samples) marks
    real samples (1) against right padding (0). Deterministic unless `deterministic=False` and a
    `"dropout"` rng is given; then dropout, LayerDrop and SpecAugment (unless masks are passed in)
    are on.

    `__call__` is these public steps in order, each callable alone with `apply(..., method=...)`
    (data2vec pretraining runs them separately to share one feature-extractor run between student
    and teacher): `encode_features` (`conv_features`, then `project_features`), `mask_hidden_states`
    (SpecAugment; its time mask is `apply_time_mask`, the learned `masked_spec_embed`), `encode`
    (the transformer encoder), then the adapter when configured. Each traces at the module's matmul precision.
    """

    def setup(self) -> None:
        c = self.config
        self.feature_extractor = FeatureEncoder(c, self.dtype)
        self.feature_projection = FeatureProjection(c, self.dtype)
        if c.has_masked_spec_embed:
            self.masked_spec_embed = self.param(
                "masked_spec_embed",
                nn.with_logical_partitioning(nn.initializers.uniform(1.0), ("embed",)),
                (c.hidden_size,),
            )
        self.encoder = Encoder(c, self.dtype, self.remat_policy, self.scan_layers)
        if c.add_adapter:
            self.adapter = Adapter(c, self.dtype)

    def frame_mask(self, attention_mask: Array | None, num_frames: int) -> Array | None:
        """(batch, num_frames) True on the frames made from real samples; None without a mask."""
        return real_frames(self.config, attention_mask, num_frames)

    def conv_features(self, input_values: Array) -> Array:
        """The conv `feature_extractor`: (batch, samples) audio to (batch, frames, conv_dim[-1]);
        no gradient flows back through it with `freeze_feature_encoder`."""
        with matmul_precision(self.precision):
            features = self.feature_extractor(input_values)
        return jax.lax.stop_gradient(features) if self.freeze_feature_encoder else features

    def project_features(
        self, features: Array, frame_mask: Array | None = None, *, deterministic: bool = True
    ) -> FeatureEncoding:
        """`feature_projection` on conv features (batch, frames, conv_dim[-1]); `frame_mask` is passed through."""
        with matmul_precision(self.precision):
            h, normed, projected = self.feature_projection(features, deterministic)
        return FeatureEncoding(hidden_states=h, projected=projected, extract_features=normed, frame_mask=frame_mask)

    def encode_features(
        self, input_values: Array, attention_mask: Array | None = None, *, deterministic: bool = True
    ) -> FeatureEncoding:
        """`conv_features`, the frame mask and `project_features`: the encoder's input."""
        features = self.conv_features(input_values)
        frame_mask = self.frame_mask(attention_mask, features.shape[1])
        return self.project_features(features, frame_mask, deterministic=deterministic)

    def apply_time_mask(self, hidden_states: Array, mask_time_indices: Array) -> Array:
        """Frames where `mask_time_indices` (batch, frames) is True replaced by `masked_spec_embed`
        (fairseq's `mask_emb`), unconditionally: data2vec pretraining's masking."""
        if not self.config.has_masked_spec_embed:
            raise ValueError(
                "mask_time_indices given but the config has no masked_spec_embed "
                "(mask_time_prob and mask_feature_prob are both 0)"
            )
        embed = self.masked_spec_embed.astype(hidden_states.dtype)
        return jnp.where(mask_time_indices[..., None], embed, hidden_states)

    def mask_hidden_states(
        self,
        hidden_states: Array,
        frame_mask: Array | None = None,
        *,
        mask_time_indices: Array | None = None,
        mask_feature_indices: Array | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, Array | None]:
        """SpecAugment, as transformers' `_mask_hidden_states`: (masked states, the time mask used).

        Nothing at all when `config.apply_spec_augment` is off, even for masks passed in. Masks
        passed in are applied; when training (`deterministic=False`) the missing ones are drawn with
        the `"dropout"` rng when their probability is > 0 (`flax_d2v.masking.spec_augment`, 2.0's too).
        Time-masked frames get `masked_spec_embed`, masked channels 0.
        """
        if not self.config.apply_spec_augment:
            return hidden_states, None
        masks = (mask_time_indices, mask_feature_indices)
        return spec_augment(self, hidden_states, frame_mask, *masks, deterministic, self.apply_time_mask)

    def encode(
        self,
        hidden_states: Array,
        frame_mask: Array | None = None,
        *,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        output_layer_results: bool = False,
    ) -> Data2VecAudioOutput:
        """The transformer `encoder` on projected (and masked) features: padded frames zeroed,
        positional conv, LayerNorm, dropout, the layers. Fills `last_hidden_state`, `frame_mask` and
        what was asked for of `hidden_states` / `layer_results` (no adapter: that is `__call__`'s)."""
        with matmul_precision(self.precision):
            last, hidden_states, layer_results = self.encoder(
                hidden_states,
                frame_mask,
                deterministic=deterministic,
                output_hidden_states=output_hidden_states,
                output_layer_results=output_layer_results,
            )
        return Data2VecAudioOutput(
            last_hidden_state=last, hidden_states=hidden_states, layer_results=layer_results, frame_mask=frame_mask
        )

    def __call__(
        self,
        input_values: Array,
        attention_mask: Array | None = None,
        output_hidden_states: bool = False,
        *,
        deterministic: bool = True,
        mask_time_indices: Array | None = None,
        mask_feature_indices: Array | None = None,
        output_layer_results: bool = False,
    ) -> Data2VecAudioOutput:
        with matmul_precision(self.precision):
            features = self.encode_features(input_values, attention_mask, deterministic=deterministic)
            h, mask_time_indices = self.mask_hidden_states(
                features.hidden_states,
                features.frame_mask,
                mask_time_indices=mask_time_indices,
                mask_feature_indices=mask_feature_indices,
                deterministic=deterministic,
            )
            out = self.encode(
                h,
                features.frame_mask,
                deterministic=deterministic,
                output_hidden_states=output_hidden_states,
                output_layer_results=output_layer_results,
            )
            last, output_frame_mask = out.last_hidden_state, None
            if self.config.add_adapter:
                last = self.adapter(last, deterministic)
                output_frame_mask = real_frames(self.config, attention_mask, last.shape[1], add_adapter=True)
        return out.replace(
            last_hidden_state=last,
            extract_features=features.extract_features,
            mask_time_indices=mask_time_indices,
            output_frame_mask=output_frame_mask,
        )


class Data2VecAudioForCTC(EncoderModule):
    """The encoder with `lm_head` for CTC (transformers' `Data2VecAudioForCTC`); adds `logits`.

    Called as its `base_model` (same positional arguments and keyword options, `ForwardOptions`),
    which it nests as `data2vec_audio`; data2vec 2.0's CTC model is this class with 2.0's encoder.
    """

    base_model: ClassVar[type[nn.Module]] = Data2VecAudioModel

    @nn.compact
    def __call__(
        self,
        input_values: Array,
        attention_mask: Array | None = None,
        output_hidden_states: bool = False,
        **options: Unpack[ForwardOptions],
    ) -> Data2VecAudioOutput:
        c = self.config
        with matmul_precision(self.precision):
            out = self.base_model(
                c,
                self.dtype,
                self.remat_policy,
                self.scan_layers,
                self.freeze_feature_encoder,
                self.precision,
                name="data2vec_audio",
            )(input_values, attention_mask, output_hidden_states, **options)
            deterministic = options.get("deterministic", True)
            h = nn.Dropout(c.final_dropout)(out.last_hidden_state, deterministic=deterministic)
            logits = _dense(c.vocab_size, ("embed", "vocab"), self.dtype, "lm_head")(h)  # width: output_hidden_size
        return out.replace(logits=logits.astype(jnp.float32))


def apply_padding_invariant(
    module: nn.Module, params: Any, input_values: jax.Array, attention_mask: jax.Array
) -> Data2VecAudioOutput:
    """Outputs of a right-padded batch that equal each row's outputs run alone, unpadded.

    For inference (`d2v transcribe`, fine-tuning's eval); training and parity use the plain
    `apply`, which matches transformers.

    transformers and fairseq zero the padded frames once, before the positional conv stack; from
    its second layer on, the conv sees non-zero values in the padding and carries them into the
    last frames of the utterance (and through attention, slightly, into all of them), so a clip's
    transcript would depend on the bucket it was padded to and on its batch-mates. Zeroing the
    padded frames after every positional conv layer makes each layer see exactly the zero
    padding it sees on the unpadded clip, so bucketing changes nothing. The adapter's strided convs
    (padding 1) read one frame past a clip's end in the same way: their inputs are zeroed past each
    layer's real frames.

    Modules with a `padding_invariant` keyword (`takes_padding_invariant`: data2vec 2.0, the heads)
    get `padding_invariant=True`: 2.0 never zeroes padded frames itself, and the x-vector head then
    pools only the TDNN frames that read real frames (those the clip alone has).
    """
    c = module.config
    frames = feat_extract_output_lengths(c, attention_mask.astype(jnp.int32).sum(-1))

    def zero_past(x: Array, n: Array) -> Array:
        real = jnp.arange(x.shape[1])[None, :] < n[:, None]
        return jnp.where(real[..., None], x, jnp.zeros((), x.dtype))

    def zero_padded_frames(
        next_fun: Callable[..., Any], args: Any, kwargs: Any, context: nn.module.InterceptorContext
    ) -> Any:
        if isinstance(context.module, AdapterLayer) and context.method_name == "__call__":
            n = frames
            for _ in range(context.module.layer_id):  # this layer's input frames, as feat_extract_output_lengths
                n = (n - 1) // c.adapter_stride + 1
            args = (zero_past(args[0], n), *args[1:])
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, PositionalConvLayer) and context.method_name == "__call__":
            out = zero_past(out, frames)
        return out

    extra = {"padding_invariant": True} if getattr(module, "takes_padding_invariant", False) else {}
    with nn.intercept_methods(zero_padded_frames):
        return module.apply({"params": params}, input_values, attention_mask, **extra)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(module: nn.Module, rng: Array, num_samples: int) -> Any:
    return module.init(rng, jnp.zeros((1, num_samples), jnp.float32))["params"]


def init_params(module: nn.Module, rng: Array | int = 0, num_samples: int = 16000) -> Any:
    """Random parameters (unboxed: plain arrays) for `module`."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    return nn.meta.unbox(_init(module, rng, num_samples))


def param_shapes(module: nn.Module, num_samples: int = 16000) -> Any:
    """Parameter shapes/dtypes without allocating (the tree a checkpoint must match)."""
    boxed = jax.eval_shape(
        lambda r: module.init(r, jnp.zeros((1, num_samples), jnp.float32))["params"], jax.random.PRNGKey(0)
    )
    return nn.meta.unbox(boxed)


def logical_axes(module: nn.Module, num_samples: int = 16000) -> Any:
    """The logical axis names of every parameter, as a tree of `PartitionSpec`s."""
    boxed = jax.eval_shape(
        lambda r: module.init(r, jnp.zeros((1, num_samples), jnp.float32))["params"], jax.random.PRNGKey(0)
    )
    return nn.get_partition_spec(boxed)
