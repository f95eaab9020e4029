"""data2vec 2.0 (audio) in `flax.linen`: fairseq's `Data2VecMultiModel` with the audio modality encoder.

fairseq: `examples/data2vec/models/data2vec2.py`, `modalities/{base,audio,modules}.py`. The forward:

    waveform -> feature_extractor (1.0's conv stack, no conv bias)
             -> project_features (LayerNorm, torch eps 1e-5, over conv channels; Linear)
             -> x + relative_positional_encoder(x) (1.0's 5-block grouped-conv stack, one residual)
             -> context_encoder (LayerNorm with norm_eps, dropout, `prenet_depth` blocks)
             -> `depth` AltBlocks -> output (no final LayerNorm, no extra tokens)

- AltBlock, post-LN (`layer_norm_first=False`, every audio config): x = norm1(x + attn(x)),
  t = fc2(gelu(fc1(x))), x = norm2(x + t); `t` is the layer result (the teacher's target).
- Attention: one fused `qkv` Linear (q, k, v, each head-major), queries scaled by head_dim**-0.5,
  ALiBi bias added to the logits in fp32, padded keys at -inf.
- ALiBi: `-|i-j| * slope_h * max(alibi_scale_h, 0)`; slopes as fairseq's `get_alibi` (incl. its rule
  for head counts that are not powers of two); `alibi_scale` a learned parameter per head
  (`alibi_scale_per_layer`: one row per block, prenet blocks first).
- Padded frames are never zeroed (fairseq's batched output depends on padding); `padding_invariant=True`
  zeroes them before and after every positional conv layer so a clip's output does not depend on its
  batch (what `d2v transcribe` and fine-tuning's eval use).

Flax names follow 1.0 where the role is the same (`feature_extractor`, `lm_head`, the CTC wrapper
`data2vec_audio`) and fairseq elsewhere; `flax_d2v.convert.fairseq2` is the one key table.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from flax_d2v.config import Data2VecAudioConfig
from flax_d2v.errors import D2VError
from flax_d2v.fileio import read_json_object
from flax_d2v.heads import (
    Data2VecAudioForAudioFrameClassification,
    Data2VecAudioForSequenceClassification,
    Data2VecAudioForXVector,
    get_spec,
)
from flax_d2v.masking import spec_augment
from flax_d2v.modeling import (
    TORCH_LAYER_NORM_EPS,
    Data2VecAudioForCTC,
    EncoderModule,
    FeatureEncoder,
    ForwardOptions,
    PositionalConvEmbedding,
    _attend,
    _conv,
    _dense,
    _layer_norm,
    _remat,
    gelu,
    real_frames,
)
from flax_d2v.precision import matmul_precision

Array = jax.Array
Dtype = Any
MODEL_TYPE_V2 = "data2vec2-audio"


@dataclasses.dataclass(frozen=True)
class Data2Vec2Config(Data2VecAudioConfig):
    """data2vec 2.0 audio: 1.0's HF-named fields (conv stack, widths, dropouts, CTC/SpecAugment) plus 2.0's.

    fairseq spelling -> field: embed_dim -> hidden_size, depth -> num_hidden_layers, num_heads ->
    num_attention_heads, mlp_ratio * embed_dim -> intermediate_size, norm_eps -> layer_norm_eps,
    encoder_dropout -> hidden_dropout (attention output), post_mlp_drop -> post_mlp_dropout,
    modalities.audio.{conv_pos_depth, conv_pos_groups, max(3, conv_pos_width // conv_pos_depth)} ->
    num_conv_pos_embeddings, num_conv_pos_embedding_groups, conv_pos_kernel_size; decoder.* -> decoder_*.
    Defaults are fairseq's `base_audio_only_task.yaml`.
    """

    hidden_dropout: float = 0.1
    activation_dropout: float = 0.0
    layerdrop: float = 0.05
    mask_time_prob: float = 0.0
    prenet_depth: int = 0
    prenet_dropout: float = 0.1
    prenet_layerdrop: float = 0.05
    post_mlp_dropout: float = 0.1
    use_alibi: bool = True
    alibi_scale_per_head: bool = True
    alibi_scale_per_layer: bool = False
    mask_noise_std: float = 0.01
    decoder_dim: int = 384
    decoder_groups: int = 16
    decoder_kernel: int = 7
    decoder_layers: int = 4
    decoder_input_dropout: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decoder_dim % self.decoder_groups or self.hidden_size % self.decoder_groups:
            raise D2VError(
                f"config: decoder_groups {self.decoder_groups} must divide decoder_dim {self.decoder_dim} "
                f"and hidden_size {self.hidden_size}"
            )

    def __hash__(self) -> int:
        return hash(self.to_json_string())

    @property
    def has_masked_spec_embed(self) -> bool:
        return False  # 2.0 masks with noise (fairseq's mask_noise_std), never a learned embedding

    @property
    def num_alibi_scales(self) -> int:
        return self.prenet_depth + self.num_hidden_layers if self.alibi_scale_per_layer else 1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Data2Vec2Config:
        if data.get("model_type", MODEL_TYPE_V2) != MODEL_TYPE_V2:
            raise D2VError(f"config: model_type is {data.get('model_type')!r}, expected {MODEL_TYPE_V2!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {
            k: v
            for k, v in data.items()
            if k not in names and k not in ("extra", "model_type", "num_feat_extract_layers")
        }
        extra.update(data.get("extra", {}))
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["model_type"] = MODEL_TYPE_V2
        return out

    @classmethod
    def from_json_file(cls, path: Any) -> Data2Vec2Config:
        try:
            return cls.from_dict(read_json_object(path))
        except TypeError as e:
            raise D2VError(f"{path}: bad config field ({e})") from None


def tiny_config_v2(**overrides: Any) -> Data2Vec2Config:
    """Small 2.0 configuration for tests and demos (same structure, narrow)."""
    values = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        conv_dim=(32,) * 7,
        num_conv_pos_embedding_groups=4,
        conv_pos_kernel_size=5,
        num_conv_pos_embeddings=2,
        decoder_dim=32,
        decoder_groups=4,
        decoder_kernel=3,
        decoder_layers=2,
    )
    values.update(overrides)
    return Data2Vec2Config(**values)


def large_config_v2(**overrides: Any) -> Data2Vec2Config:
    """large_audio_only_task.yaml: 1024 wide, 16 blocks after 8 prenet blocks, 16 heads, decoder 768."""
    values = dict(
        hidden_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        intermediate_size=4096,
        prenet_depth=8,
        layerdrop=0.0,
        prenet_layerdrop=0.0,
        decoder_dim=768,
    )
    values.update(overrides)
    return Data2Vec2Config(**values)


PRESETS_V2 = {"base": Data2Vec2Config, "large": large_config_v2, "tiny": tiny_config_v2}


def read_config(path: Any) -> Data2VecAudioConfig:
    """config.json of a flax-d2v directory: `Data2Vec2Config` for model_type "data2vec2-audio", else 1.0's."""
    if os.path.isfile(path) and read_json_object(path).get("model_type") == MODEL_TYPE_V2:
        return Data2Vec2Config.from_json_file(path)
    return Data2VecAudioConfig.from_json_file(path)


# ----------------------------------------------------------------------------------------- ALiBi
def alibi_slopes(heads: int) -> list[float]:
    """fairseq's `get_alibi.get_slopes`, literally (a power of two, else the interleaving workaround)."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_2(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


def alibi_bias(num_frames: int, heads: int) -> Array:
    """(heads, T, T) fp32 `slope_h * -|i - j|`, rounded as fairseq's float32 torch code rounds it."""
    slopes = jnp.asarray(np.asarray(alibi_slopes(heads), np.float32))
    pos = jnp.arange(num_frames)
    dist = -jnp.abs(pos[None, :] - pos[:, None]).astype(jnp.float32)
    return slopes[:, None, None] * dist[None]


# ----------------------------------------------------------------------------------------- output
@flax.struct.dataclass
class Data2Vec2Output:
    """What `apply` returns (fields not asked for are None).

    hidden_states: [0] the context encoder's output (input of the first main block), [i] block i's output.
    prenet_states: the context encoder's blocks' outputs (large: 8). layer_results: each main block's FFN
    output before the residual and norm2 (the teacher's targets).
    """

    last_hidden_state: Array
    extract_features: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
    layer_results: tuple[Array, ...] | None = None
    prenet_states: tuple[Array, ...] | None = None
    logits: Array | None = None
    frame_mask: Array | None = None
    mask_time_indices: Array | None = None
    embeddings: Array | None = None  # the x-vector head's (as 1.0's output)

    @property
    def logits_frame_mask(self) -> Array | None:
        """Real frames of the logits (as 1.0's output; 2.0 has no adapter, so the encoder's frames)."""
        return self.frame_mask


# ----------------------------------------------------------------------------------------- modules
class ProjectFeatures(nn.Module):
    """`project_features`: LayerNorm over conv channels (torch's default eps), then Linear to hidden_size."""

    config: Data2Vec2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = _layer_norm(TORCH_LAYER_NORM_EPS, "conv_dim", self.dtype, "layer_norm")(x)
        return _dense(self.config.hidden_size, ("conv_dim", "embed"), self.dtype, "linear")(x)


class AltAttention(nn.Module):
    """`attn`: fused qkv, ALiBi and key padding in the fp32 logits, `proj`."""

    config: Data2Vec2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array | None, deterministic: bool = True) -> Array:
        c = self.config
        heads = c.num_attention_heads
        head_dim = c.hidden_size // heads
        b, t, _ = x.shape
        qkv = _dense(3 * c.hidden_size, ("embed", "heads"), self.dtype, "qkv")(x).reshape(b, t, 3, heads, head_dim)
        q, k, v = qkv[:, :, 0] * (head_dim**-0.5), qkv[:, :, 1], qkv[:, :, 2]
        out = _attend(q, k, v, bias, c.attention_dropout, deterministic, self.dtype).reshape(b, t, c.hidden_size)
        out = _dense(c.hidden_size, ("heads", "embed"), self.dtype, "proj")(out)
        return nn.Dropout(c.hidden_dropout)(out, deterministic=deterministic)


class Mlp(nn.Module):
    """timm's `Mlp` (`mlp`): fc1, GELU, dropout, fc2, dropout (both `activation_dropout`)."""

    config: Data2Vec2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        c = self.config
        x = _dense(c.intermediate_size, ("embed", "mlp"), self.dtype, "fc1")(x)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_mlp"))
        x = nn.Dropout(c.activation_dropout)(gelu(x), deterministic=deterministic)
        x = _dense(c.hidden_size, ("mlp", "embed"), self.dtype, "fc2")(x)
        return nn.Dropout(c.activation_dropout)(x, deterministic=deterministic)


class AltBlock(nn.Module):
    """`blocks.N` (post-LN): (new x, layer result t = the MLP output)."""

    config: Data2Vec2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array | None, deterministic: bool = True) -> tuple[Array, Array]:
        c = self.config
        x = x + AltAttention(c, self.dtype, name="attn")(x, bias, deterministic)
        r = x = _layer_norm(c.layer_norm_eps, "embed", self.dtype, "norm1")(x)
        t = Mlp(c, self.dtype, name="mlp")(x, deterministic)
        x = r + nn.Dropout(c.post_mlp_dropout)(t, deterministic=deterministic)
        x = _layer_norm(c.layer_norm_eps, "embed", self.dtype, "norm2")(x)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, t


class ContextEncoder(nn.Module):
    """`context_encoder` (fairseq's BlockEncoder): LayerNorm(norm_eps), dropout, the prenet blocks."""

    config: Data2Vec2Config
    dtype: Dtype = jnp.float32
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, x: Array, biases: list[Array | None], deterministic: bool = True) -> tuple[Array, list[Array]]:
        c = self.config
        x = _layer_norm(c.layer_norm_eps, "embed", self.dtype, "norm")(x)
        x = nn.Dropout(c.prenet_dropout)(x, deterministic=deterministic)
        states = []
        for i in range(c.prenet_depth):
            y, _ = _remat(AltBlock, self.remat_policy)(c, self.dtype, name=f"blocks_{i}")(x, biases[i], deterministic)
            x = _layerdrop(self, y, x, c.prenet_layerdrop, deterministic)
            states.append(x)
        return x, states


def _layerdrop(mod: nn.Module, new: Array, old: Array, rate: float, deterministic: bool) -> Array:
    if deterministic or rate <= 0.0:
        return new
    skip = jax.random.uniform(mod.make_rng("dropout"), ()) < rate
    return jnp.where(skip, old, new)


class Data2Vec2Model(EncoderModule):
    """The data2vec 2.0 audio encoder (fairseq's `extract_features`; no pretraining modules).

    Call: `module.apply({"params": p}, input_values, attention_mask=None, output_hidden_states=False)`,
    as the 1.0 model, with its keyword options and `padding_invariant`. `__call__` is the public steps
    `local_features`, `mask_hidden_states` and `contextualize`; pretraining calls `local_features` once
    and shares it between the student (`encode_masked`) and the teacher (`contextualize`). The entry
    points trace at the module's matmul precision.
    """

    config: Data2Vec2Config  # the fields and their order are `EncoderModule`'s

    is_data2vec2 = True
    takes_padding_invariant = True  # see flax_d2v.modeling.apply_padding_invariant

    def setup(self) -> None:
        c = self.config
        if self.scan_layers:
            raise D2VError("data2vec 2.0: scan_layers is not supported (use remat_policy to save memory)")
        self.feature_extractor = FeatureEncoder(c, self.dtype)
        self.project_features = ProjectFeatures(c, self.dtype)
        self.relative_positional_encoder = PositionalConvEmbedding(c, self.dtype)
        if c.use_alibi:
            self.alibi_scale = self.param(
                "alibi_scale",
                nn.with_logical_partitioning(nn.initializers.ones, (None, None)),
                (c.num_alibi_scales, c.num_attention_heads if c.alibi_scale_per_head else 1),
            )
        self.context_encoder = ContextEncoder(c, self.dtype, self.remat_policy)
        block = _remat(AltBlock, self.remat_policy)
        self.blocks = [block(c, self.dtype, name=f"blocks_{i}") for i in range(c.num_hidden_layers)]
        self.dropout_input = nn.Dropout(c.feat_proj_dropout)  # fairseq's dropout_input

    # ------------------------------------------------------------------ pieces
    def frame_mask(self, attention_mask: Array | None, num_frames: int) -> Array | None:
        return real_frames(self.config, attention_mask, num_frames)

    def local_features(self, input_values: Array) -> Array:
        """Conv feature extractor and `project_features` (fairseq's `local_features`)."""
        with matmul_precision(self.precision):
            features = self.feature_extractor(input_values)
            if self.freeze_feature_encoder:
                features = jax.lax.stop_gradient(features)
            return self.project_features(features)

    def biases(self, num_frames: int, keep: Array | None = None, frame_mask: Array | None = None) -> list[Array | None]:
        """One attention bias per block (prenet first): scaled ALiBi, gathered to `keep`, plus key padding."""
        c = self.config
        n = c.prenet_depth + c.num_hidden_layers
        if not c.use_alibi:
            out: list[Array | None] = [None] * n
        else:
            if keep is None:
                base = alibi_bias(num_frames, c.num_attention_heads)[None]  # (1, H, T, T)
            else:  # masked_alibi: the rows and columns of the kept frames (the same float32 products)
                slopes = jnp.asarray(np.asarray(alibi_slopes(c.num_attention_heads), np.float32))
                dist = -jnp.abs(keep[:, :, None] - keep[:, None, :]).astype(jnp.float32)
                base = slopes[None, :, None, None] * dist[:, None]
            scale = jnp.maximum(self.alibi_scale, 0.0).astype(jnp.float32)  # clamp_min(0)
            scaled = [base * scale[i][None, :, None, None] for i in range(scale.shape[0])]
            out = [scaled[i if len(scaled) > 1 else 0] for i in range(n)]
        if frame_mask is not None:  # fairseq's -inf, as the finite minimum: all-padding filler rows stay finite
            pad = jnp.where(frame_mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)[:, None, None, :]
            out = [pad if b is None else b + pad for b in out]
        return out

    def positions(self, x: Array, frame_mask: Array | None, padding_invariant: bool) -> Array:
        if padding_invariant and frame_mask is not None:
            x = jnp.where(frame_mask[..., None], x, jnp.zeros((), x.dtype))
        return self.relative_positional_encoder(x)

    def encode(
        self, x: Array, biases: list[Array | None], deterministic: bool = True, collect: bool = False
    ) -> tuple[Array, list[Array], list[Array], list[Array]]:
        """context_encoder and the blocks on `x` (already with positions): (x, hidden, results, prenet)."""
        c = self.config
        x, prenet = self.context_encoder(x, biases[: c.prenet_depth], deterministic)
        x = self.dropout_input(x, deterministic=deterministic)
        hidden, results = [x], []
        for i, blk in enumerate(self.blocks):
            y, t = blk(x, biases[c.prenet_depth + i], deterministic)
            x = _layerdrop(self, y, x, c.layerdrop, deterministic)
            hidden.append(x)
            results.append(t)
        return x, hidden, results, prenet

    def encode_masked(
        self,
        local: Array,
        mask: Array,
        keep: Array,
        deterministic: bool = True,
        frame_mask: Array | None = None,
    ) -> Array:
        """The student of pretraining: fairseq's `contextualized_features(mask=True, remove_masked=True)` and
        the blocks, on clone-batched local features (N, T, D). The masked frames are zeroed for the positional
        conv (`apply_mask`, encoder_zero_mask; padded frames are not); only the kept frames `keep` (N, K) go
        through the blocks, with the ALiBi bias of their original positions and, with `frame_mask` (N, T),
        fairseq's key padding gathered to the kept frames (`gather_unmasked_mask`)."""
        with matmul_precision(self.precision):
            pos = self.relative_positional_encoder(jnp.where(mask[..., None], jnp.zeros((), local.dtype), local))
            take = lambda a: jnp.take_along_axis(a, keep[..., None], axis=1)  # noqa: E731
            x = take(local) + take(pos)
            kept_frames = None if frame_mask is None else jnp.take_along_axis(frame_mask, keep, axis=1)
            return self.encode(x, self.biases(local.shape[1], keep, kept_frames), deterministic)[0]

    def contextualize(
        self, x: Array, frame_mask: Array | None = None, deterministic: bool = True, padding_invariant: bool = False
    ) -> tuple[Array, list[Array], list[Array], list[Array]]:
        """fairseq's `contextualized_features(mask=False)` and the blocks (the teacher's whole forward)."""
        with matmul_precision(self.precision):
            x = x + self.positions(x, frame_mask, padding_invariant)
            return self.encode(x, self.biases(x.shape[1], None, frame_mask), deterministic)

    def mask_hidden_states(
        self,
        hidden_states: Array,
        frame_mask: Array | None = None,
        *,
        mask_time_indices: Array | None = None,
        mask_feature_indices: Array | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, Array | None]:
        """Fine-tuning's masking (fairseq `apply_mask`, encoder_zero_mask off): N(0, mask_noise_std) noise
        in masked frames, zeroed channels; (masked states, the time mask used). As 1.0's method of the
        name: masks passed in are applied, missing ones drawn when training (transformers' counting rule)."""

        def add_noise(h: Array, mask: Array) -> Array:
            noise = self.config.mask_noise_std * jax.random.normal(self.make_rng("dropout"), h.shape, jnp.float32)
            return jnp.where(mask[..., None], noise.astype(h.dtype), h)

        masks = (mask_time_indices, mask_feature_indices)
        return spec_augment(self, hidden_states, frame_mask, *masks, deterministic, add_noise)

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
        padding_invariant: bool = False,
    ) -> Data2Vec2Output:
        with matmul_precision(self.precision):
            local = self.local_features(input_values)
            frame_mask = self.frame_mask(attention_mask, local.shape[1])
            h, mask_time_indices = self.mask_hidden_states(
                local,
                frame_mask,
                mask_time_indices=mask_time_indices,
                mask_feature_indices=mask_feature_indices,
                deterministic=deterministic,
            )
            x, hidden, results, prenet = self.contextualize(h, frame_mask, deterministic, padding_invariant)
        return Data2Vec2Output(
            last_hidden_state=x,
            extract_features=local,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            prenet_states=tuple(prenet) if output_hidden_states else None,
            layer_results=tuple(results) if output_layer_results else None,
            frame_mask=frame_mask,
            mask_time_indices=mask_time_indices,
        )


class ForwardOptionsV2(ForwardOptions, total=False):
    """`Data2Vec2Model.__call__`'s keyword-only options: 1.0's and `padding_invariant`."""

    padding_invariant: bool


class Data2Vec2ForCTC(Data2VecAudioForCTC):
    """The encoder (`data2vec_audio`, fairseq's `w2v_encoder.w2v_model`) and `lm_head` (`w2v_encoder.proj`):
    1.0's CTC model around `Data2Vec2Model` (called as it, keyword options `ForwardOptionsV2`)."""

    base_model: ClassVar[type[nn.Module]] = Data2Vec2Model
    is_data2vec2 = True
    takes_padding_invariant = True


class Decoder1d(nn.Module):
    """The pretraining decoder (`modality_encoders.AUDIO.decoder`): grouped convs, affine-free LN, GELU,
    residuals, `proj`.

    Input and output (batch, frames, hidden_size); the first block has no residual (its width changes).
    """

    config: Data2Vec2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        k = c.decoder_kernel
        length = x.shape[1]
        residual = x
        for i in range(c.decoder_layers):
            same = dict(padding=[(k // 2, k // 2)], feature_group_count=c.decoder_groups)
            y = _conv(c.decoder_dim, k, None, self.dtype, f"blocks_{i}", **same)(x)[:, :length]
            y = gelu(_layer_norm(TORCH_LAYER_NORM_EPS, "decoder", self.dtype, f"norm_{i}", affine=False)(y))
            x = y + residual if residual.shape[-1] == y.shape[-1] else y
            residual = x
        return _dense(c.hidden_size, (None, "embed"), self.dtype, "proj")(x)


def init_decoder(config: Data2Vec2Config, rng: Array | int = 0, num_frames: int = 49) -> Any:
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    dec = Decoder1d(config)
    return nn.meta.unbox(dec.init(rng, jnp.zeros((1, num_frames, config.hidden_size)))["params"])


class Data2Vec2ForSequenceClassification(Data2VecAudioForSequenceClassification):
    """1.0's classification head (`flax_d2v.heads`) on the 2.0 encoder, nested as `data2vec_audio`."""

    base_model: ClassVar[type[nn.Module]] = Data2Vec2Model
    is_data2vec2 = True


class Data2Vec2ForAudioFrameClassification(Data2VecAudioForAudioFrameClassification):
    """1.0's frame-classification head on the 2.0 encoder."""

    base_model: ClassVar[type[nn.Module]] = Data2Vec2Model
    is_data2vec2 = True


class Data2Vec2ForXVector(Data2VecAudioForXVector):
    """1.0's x-vector head on the 2.0 encoder."""

    base_model: ClassVar[type[nn.Module]] = Data2Vec2Model
    is_data2vec2 = True


# The 2.0 module of each head in `flax_d2v.heads.REGISTRY` (keyed by its architecture name there: the
# key rows, detection and objectives are the registry's; only the encoder differs).
MODULES_V2: dict[str, type[nn.Module]] = {
    "Data2VecAudioModel": Data2Vec2Model,
    "Data2VecAudioForCTC": Data2Vec2ForCTC,
    "Data2VecAudioForSequenceClassification": Data2Vec2ForSequenceClassification,
    "Data2VecAudioForAudioFrameClassification": Data2Vec2ForAudioFrameClassification,
    "Data2VecAudioForXVector": Data2Vec2ForXVector,
}


def build_module_v2(config: Data2Vec2Config, architecture: str, **kwargs: Any) -> nn.Module:
    """The 2.0 module of the registry's `architecture` (a transformers class name) for `config`."""
    spec = get_spec(architecture)
    if spec.architecture not in MODULES_V2:
        raise D2VError(f"architecture {spec.architecture!r}: no data2vec 2.0 module")
    if spec.architecture in ("Data2VecAudioModel", "Data2VecAudioForCTC") and kwargs.pop("freeze_base_model", False):
        raise D2VError(f"freeze_base_model: {spec.architecture} has no classification head")
    return MODULES_V2[spec.architecture](config, **kwargs)
