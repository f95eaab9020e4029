"""Model configuration: a dataclass whose fields mirror transformers' `Data2VecAudioConfig`.

The field names and defaults are exactly the ones of `transformers`' configuration, so a
`config.json` written by `save_pretrained` reads into this class and is written back with the
same keys. Keys we do not model (``architectures``, ``id2label``, ...) are kept in ``extra`` and
written back unchanged, so a round trip through this project loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from flax_d2v.errors import D2VError
from flax_d2v.fileio import read_json_object

MODEL_TYPE = "data2vec-audio"


@dataclasses.dataclass(frozen=True)
class Data2VecAudioConfig:
    """Architecture and regularisation hyper-parameters (HF field names, HF defaults)."""

    vocab_size: int = 32
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    activation_dropout: float = 0.1
    attention_dropout: float = 0.1
    feat_proj_dropout: float = 0.0
    final_dropout: float = 0.1
    layerdrop: float = 0.1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    feat_extract_activation: str = "gelu"
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embedding_groups: int = 16
    conv_pos_kernel_size: int = 19
    num_conv_pos_embeddings: int = 5
    apply_spec_augment: bool = True  # False: no SpecAugment at all, masks given or drawn (transformers)
    mask_time_prob: float = 0.05
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    mask_feature_min_masks: int = 0
    ctc_loss_reduction: str = "sum"
    ctc_zero_infinity: bool = False
    use_weighted_layer_sum: bool = False
    classifier_proj_size: int = 256
    tdnn_dim: tuple[int, ...] = (512, 512, 512, 512, 1500)
    tdnn_kernel: tuple[int, ...] = (5, 3, 3, 1, 1)
    tdnn_dilation: tuple[int, ...] = (1, 2, 3, 1, 1)
    xvector_output_dim: int = 512
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    add_adapter: bool = False
    adapter_kernel_size: int = 3
    adapter_stride: int = 2
    num_adapter_layers: int = 3
    output_hidden_size: int | None = None
    # Keys of config.json that are not architecture fields (architectures, id2label, ...).
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("conv_dim", "conv_stride", "conv_kernel", "tdnn_dim", "tdnn_kernel", "tdnn_dilation"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.output_hidden_size is None:
            object.__setattr__(self, "output_hidden_size", self.hidden_size)
        if not (len(self.conv_dim) == len(self.conv_stride) == len(self.conv_kernel)):
            raise D2VError(
                "config: conv_dim, conv_stride and conv_kernel must have the same length, got "
                f"{len(self.conv_dim)}, {len(self.conv_stride)}, {len(self.conv_kernel)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise D2VError(
                f"config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise D2VError(
                f"config: hidden_size {self.hidden_size} is not divisible by "
                f"num_conv_pos_embedding_groups {self.num_conv_pos_embedding_groups}"
            )
        for act in (self.hidden_act, self.feat_extract_activation):
            if act != "gelu":
                raise D2VError(f"config: activation {act!r} is not supported (data2vec-audio uses 'gelu')")

    def __hash__(self) -> int:
        # Frozen and hashable so a config can be a static argument of `jax.jit` and a field of
        # a linen Module; `extra` (a dict) takes part through its JSON text.
        return hash(self.to_json_string())

    # ------------------------------------------------------------------ derived facts
    @property
    def num_feat_extract_layers(self) -> int:
        return len(self.conv_dim)

    @property
    def inputs_to_logits_ratio(self) -> int:
        return math.prod(self.conv_stride)

    @property
    def has_masked_spec_embed(self) -> bool:
        """transformers creates `masked_spec_embed` only when some masking is configured."""
        return self.mask_time_prob > 0.0 or self.mask_feature_prob > 0.0

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Data2VecAudioConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "extra"}
        extra.update(data.get("extra", {}))
        model_type = data.get("model_type", MODEL_TYPE)
        if model_type not in (MODEL_TYPE, "wav2vec2"):
            raise D2VError(f"config: model_type is {model_type!r}, expected {MODEL_TYPE!r}")
        # Our own marker for "this is a Flax checkpoint" must not leak into an HF export.
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["model_type"] = MODEL_TYPE
        out["num_feat_extract_layers"] = self.num_feat_extract_layers
        return dict(sorted(out.items()))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> Data2VecAudioConfig:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise D2VError(f"{path}: file not found (a model directory needs config.json)")
        data = read_json_object(path)
        try:
            return cls.from_dict(data)
        except TypeError as e:
            raise D2VError(f"{path}: bad config field ({e})") from None

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def replace(self, **changes: Any) -> Data2VecAudioConfig:
        return dataclasses.replace(self, **changes)


def base_config(**overrides: Any) -> Data2VecAudioConfig:
    """facebook/data2vec-audio-base(-960h): 12 layers, hidden 768, 12 heads, FFN 3072."""
    return Data2VecAudioConfig(**overrides)


def large_config(**overrides: Any) -> Data2VecAudioConfig:
    """facebook/data2vec-audio-large(-960h): 24 layers, hidden 1024, 16 heads, FFN 4096."""
    values = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    values.update(overrides)
    return Data2VecAudioConfig(**values)


def tiny_config(**overrides: Any) -> Data2VecAudioConfig:
    """A small configuration for tests and demos: same structure, few and narrow layers."""
    values = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        conv_dim=(32, 32, 32, 32, 32, 32, 32),
        num_conv_pos_embedding_groups=4,
        conv_pos_kernel_size=5,
        num_conv_pos_embeddings=2,
    )
    values.update(overrides)
    return Data2VecAudioConfig(**values)


PRESETS = {"base": base_config, "large": large_config, "tiny": tiny_config}


def preset(name: str, **overrides: Any) -> Data2VecAudioConfig:
    if name not in PRESETS:
        raise D2VError(f"unknown config preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
