"""THE key table between transformers' PyTorch state dict and our Flax parameter tree.

One table, used in both directions (`hf_to_flax_key` and `flax_to_hf_key`), so an import and an
export can never disagree. Each row is (HF key template, Flax path template, transform):
`{n}` is a list index (PyTorch `layers.3` is Flax `layers_3`), `{proj}` one of q/k/v/out.

Transforms are exact permutations of axes, so HF -> Flax -> HF is bit-identical:
- ``linear``: torch Linear weight (out, in) <-> Flax Dense kernel (in, out);
- ``conv``:   torch Conv1d weight (out, in/groups, k) <-> Flax Conv kernel (k, in/groups, out);
- ``copy``:   biases, LayerNorm weight (Flax ``scale``) and bias, ``masked_spec_embed``.

Every head nests the encoder under ``data2vec_audio`` in both layouts. The encoder's rows
(with the adapter's) are `KEY_TABLE`; each head's rows (``lm_head``, ``classifier``, ``tdnn.N``...)
come from the head registry (`flax_d2v.heads.REGISTRY`) and match only at the top level.
"""

from __future__ import annotations

import re

import numpy as np

from flax_d2v.heads import head_key_rows

# The param-tree helpers live in `flax_d2v.params` (core); re-exported here only because existing tests
# reach them as `keys.flatten(...)`, `keys.stack_layers(...)`. New code imports them from flax_d2v.params.
from flax_d2v.params import flatten, is_scanned, stack_layers, unflatten, unstack_layers  # noqa: F401

CTC_PREFIX_HF = "data2vec_audio."
CTC_PREFIX_FLAX = "data2vec_audio/"

# (HF template, Flax template, transform)
KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    ("masked_spec_embed", "masked_spec_embed", "copy"),
    ("feature_extractor.conv_layers.{n}.conv.weight", "feature_extractor/conv_layers_{n}/conv/kernel", "conv"),
    ("feature_extractor.conv_layers.{n}.conv.bias", "feature_extractor/conv_layers_{n}/conv/bias", "copy"),
    (
        "feature_extractor.conv_layers.{n}.layer_norm.weight",
        "feature_extractor/conv_layers_{n}/layer_norm/scale",
        "copy",
    ),
    ("feature_extractor.conv_layers.{n}.layer_norm.bias", "feature_extractor/conv_layers_{n}/layer_norm/bias", "copy"),
    ("feature_projection.layer_norm.weight", "feature_projection/layer_norm/scale", "copy"),
    ("feature_projection.layer_norm.bias", "feature_projection/layer_norm/bias", "copy"),
    ("feature_projection.projection.weight", "feature_projection/projection/kernel", "linear"),
    ("feature_projection.projection.bias", "feature_projection/projection/bias", "copy"),
    ("encoder.pos_conv_embed.layers.{n}.conv.weight", "encoder/pos_conv_embed/layers_{n}/conv/kernel", "conv"),
    ("encoder.pos_conv_embed.layers.{n}.conv.bias", "encoder/pos_conv_embed/layers_{n}/conv/bias", "copy"),
    ("encoder.layer_norm.weight", "encoder/layer_norm/scale", "copy"),
    ("encoder.layer_norm.bias", "encoder/layer_norm/bias", "copy"),
    ("encoder.layers.{n}.attention.{proj}_proj.weight", "encoder/layers_{n}/attention/{proj}_proj/kernel", "linear"),
    ("encoder.layers.{n}.attention.{proj}_proj.bias", "encoder/layers_{n}/attention/{proj}_proj/bias", "copy"),
    ("encoder.layers.{n}.layer_norm.weight", "encoder/layers_{n}/layer_norm/scale", "copy"),
    ("encoder.layers.{n}.layer_norm.bias", "encoder/layers_{n}/layer_norm/bias", "copy"),
    (
        "encoder.layers.{n}.feed_forward.intermediate_dense.weight",
        "encoder/layers_{n}/feed_forward/intermediate_dense/kernel",
        "linear",
    ),
    (
        "encoder.layers.{n}.feed_forward.intermediate_dense.bias",
        "encoder/layers_{n}/feed_forward/intermediate_dense/bias",
        "copy",
    ),
    (
        "encoder.layers.{n}.feed_forward.output_dense.weight",
        "encoder/layers_{n}/feed_forward/output_dense/kernel",
        "linear",
    ),
    ("encoder.layers.{n}.feed_forward.output_dense.bias", "encoder/layers_{n}/feed_forward/output_dense/bias", "copy"),
    ("encoder.layers.{n}.final_layer_norm.weight", "encoder/layers_{n}/final_layer_norm/scale", "copy"),
    ("encoder.layers.{n}.final_layer_norm.bias", "encoder/layers_{n}/final_layer_norm/bias", "copy"),
    ("adapter.proj.weight", "adapter/proj/kernel", "linear"),
    ("adapter.proj.bias", "adapter/proj/bias", "copy"),
    ("adapter.proj_layer_norm.weight", "adapter/proj_layer_norm/scale", "copy"),
    ("adapter.proj_layer_norm.bias", "adapter/proj_layer_norm/bias", "copy"),
    ("adapter.layers.{n}.conv.weight", "adapter/layers_{n}/conv/kernel", "conv"),
    ("adapter.layers.{n}.conv.bias", "adapter/layers_{n}/conv/bias", "copy"),
)

_PLACEHOLDERS = {"n": r"(?P<n>\d+)", "proj": r"(?P<proj>q|k|v|out)"}


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{\w+\})", template)
    regex = "".join(_PLACEHOLDERS[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(f"^{regex}$")


HEAD_KEY_TABLE: tuple[tuple[str, str, str], ...] = head_key_rows()
# (compiled template, other side's template, transform, is a head row)
_HF_RULES = [
    (_compile(hf), flax, kind, head)
    for table, head in ((KEY_TABLE, False), (HEAD_KEY_TABLE, True))
    for hf, flax, kind in table
]
_FLAX_RULES = [
    (_compile(flax), hf, kind, head)
    for table, head in ((KEY_TABLE, False), (HEAD_KEY_TABLE, True))
    for hf, flax, kind in table
]


def _split_prefix(key: str, prefix: str) -> tuple[str, str]:
    return (prefix, key[len(prefix) :]) if key.startswith(prefix) else ("", key)


def hf_to_flax_key(key: str) -> tuple[str, str] | None:
    """(Flax path, transform) for an HF state-dict key, or None if the table has no row for it."""
    prefix, rest = _split_prefix(key, CTC_PREFIX_HF)
    for regex, template, kind, head in _HF_RULES:
        m = regex.match(rest)
        if m and not (prefix and head):
            return (CTC_PREFIX_FLAX if prefix else "") + template.format(**m.groupdict()), kind
    return None


def flax_to_hf_key(path: str) -> tuple[str, str] | None:
    """(HF key, transform) for a Flax path, or None if the table has no row for it."""
    prefix, rest = _split_prefix(path, CTC_PREFIX_FLAX)
    for regex, template, kind, head in _FLAX_RULES:
        m = regex.match(rest)
        if m and not (prefix and head):
            return (CTC_PREFIX_HF if prefix else "") + template.format(**m.groupdict()), kind
    return None


def to_flax_array(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(value.T)
    if kind == "conv":
        return np.ascontiguousarray(value.transpose(2, 1, 0))
    return np.ascontiguousarray(value)


def to_hf_array(value: np.ndarray, kind: str) -> np.ndarray:
    # Both permutations are their own inverse.
    return to_flax_array(value, kind)
