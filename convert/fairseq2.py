"""fairseq data2vec 2.0 (audio) checkpoints <-> flax-d2v, both ways, by one key table.

Read (`load_fairseq2`, reached through `convert.fairseq.load_fairseq` when `cfg.model._name` is
`data2vec_multi`, or a `wav2vec_ctc` whose `w2v_args.model` is):

- pretrained: the student (`modality_encoders.AUDIO.*`, `blocks.*`), the EMA teacher `_ema` (a plain
  dict keyed like the student: positional conv, `alibi_scale`, context encoder, blocks; with
  `ema_encoder_only=True` only the blocks, keyed `N.*`) and the decoder (`modality_encoders.AUDIO.decoder.*`)
  -> params, aux {"ema": teacher tree, "decoder": decoder tree};
- CTC: `w2v_encoder.w2v_model.*` + `w2v_encoder.proj` (-> `lm_head`), the architecture from
  `cfg.model.w2v_args.model`, the vocabulary as for 1.0 (`--dict`, `dict.ltr.txt`, `task_state`).

Write (`export_fairseq2`, `d2v convert DIR out.pt --to fairseq`): the same keys back, `_ema` and
the decoder for pretrained models, `cfg` (the original one from `fairseq_cfg.json` when the directory
came from fairseq, else one built from the config) and, for CTC with a vocabulary, `task_state`
holding a fairseq `Dictionary`. fairseq -> Flax -> fairseq is bit-identical (transposes only).

The one table is `key_rows(config)`: (fairseq key, Flax path, transform) for every parameter.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flax_d2v.checkpoint import load_flax, load_flax_aux
from flax_d2v.convert.fairseq_common import (
    FAIRSEQ_CFG_FILE,
    FAIRSEQ_NORMALIZE_EPS,
    FairseqCheckpoint,
    _find_symbols,
    _jsonable,
    _plain,
    hf_vocab,
    parse_conv_layers,
)
from flax_d2v.convert.hf import tensor_to_numpy
from flax_d2v.convert.keys import to_flax_array, to_hf_array
from flax_d2v.data2vec2 import Data2Vec2Config, Data2Vec2ForCTC, Data2Vec2Model, Decoder1d
from flax_d2v.errors import D2VError
from flax_d2v.fileio import atomic_write_bytes, read_json_object
from flax_d2v.heads import detect
from flax_d2v.modeling import param_shapes
from flax_d2v.params import flatten, unflatten
from flax_d2v.paths import as_path, localize
from flax_d2v.processor import preprocessor_config

AUDIO = "modality_encoders.AUDIO."
CTC_PREFIX = "w2v_encoder.w2v_model."
HEAD = ("w2v_encoder.proj.weight", "lm_head/kernel", "linear"), ("w2v_encoder.proj.bias", "lm_head/bias", "copy")
EMA_KEY = "_ema"
MODEL_NAME = "data2vec_multi"
DEFAULT_SPEC = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"

_BLOCK = (
    ("norm1.weight", "norm1/scale", "copy"),
    ("norm1.bias", "norm1/bias", "copy"),
    ("attn.qkv.weight", "attn/qkv/kernel", "linear"),
    ("attn.qkv.bias", "attn/qkv/bias", "copy"),
    ("attn.proj.weight", "attn/proj/kernel", "linear"),
    ("attn.proj.bias", "attn/proj/bias", "copy"),
    ("norm2.weight", "norm2/scale", "copy"),
    ("norm2.bias", "norm2/bias", "copy"),
    ("mlp.fc1.weight", "mlp/fc1/kernel", "linear"),
    ("mlp.fc1.bias", "mlp/fc1/bias", "copy"),
    ("mlp.fc2.weight", "mlp/fc2/kernel", "linear"),
    ("mlp.fc2.bias", "mlp/fc2/bias", "copy"),
)


# ------------------------------------------------------------------------------------ the table
def key_rows(config: Any, part: str = "model") -> list[tuple[str, str, str]]:
    """(fairseq key, Flax path, transform) rows. part: "model" (the student), "teacher" (what `_ema`
    holds: no conv extractor / project_features), "decoder" (the pretraining decoder, Flax paths relative
    to the decoder tree)."""
    c = config
    if part == "decoder":
        rows = []
        for i in range(c.decoder_layers):
            rows += [
                (f"{AUDIO}decoder.blocks.{i}.0.weight", f"blocks_{i}/kernel", "conv"),
                (f"{AUDIO}decoder.blocks.{i}.0.bias", f"blocks_{i}/bias", "copy"),
            ]
        return rows + [
            (f"{AUDIO}decoder.proj.weight", "proj/kernel", "linear"),
            (f"{AUDIO}decoder.proj.bias", "proj/bias", "copy"),
        ]
    rows: list[tuple[str, str, str]] = []
    if part == "model":
        for i in range(c.num_feat_extract_layers):
            fe = f"{AUDIO}local_encoder.conv_layers.{i}."
            rows.append((fe + "0.weight", f"feature_extractor/conv_layers_{i}/conv/kernel", "conv"))
            if c.conv_bias:
                rows.append((fe + "0.bias", f"feature_extractor/conv_layers_{i}/conv/bias", "copy"))
            rows += [
                (fe + "2.1.weight", f"feature_extractor/conv_layers_{i}/layer_norm/scale", "copy"),
                (fe + "2.1.bias", f"feature_extractor/conv_layers_{i}/layer_norm/bias", "copy"),
            ]
        rows += [
            (f"{AUDIO}project_features.1.weight", "project_features/layer_norm/scale", "copy"),
            (f"{AUDIO}project_features.1.bias", "project_features/layer_norm/bias", "copy"),
            (f"{AUDIO}project_features.2.weight", "project_features/linear/kernel", "linear"),
            (f"{AUDIO}project_features.2.bias", "project_features/linear/bias", "copy"),
        ]
    for i in range(c.num_conv_pos_embeddings):  # index 0 of the Sequential is a TransposeLast
        rows += [
            (
                f"{AUDIO}relative_positional_encoder.{i + 1}.0.weight",
                f"relative_positional_encoder/layers_{i}/conv/kernel",
                "conv",
            ),
            (
                f"{AUDIO}relative_positional_encoder.{i + 1}.0.bias",
                f"relative_positional_encoder/layers_{i}/conv/bias",
                "copy",
            ),
        ]
    if c.use_alibi:
        rows.append((f"{AUDIO}alibi_scale", "alibi_scale", "alibi"))
    rows += [
        (f"{AUDIO}context_encoder.norm.weight", "context_encoder/norm/scale", "copy"),
        (f"{AUDIO}context_encoder.norm.bias", "context_encoder/norm/bias", "copy"),
    ]
    for i in range(c.prenet_depth):
        rows += [(f"{AUDIO}context_encoder.blocks.{i}.{f}", f"context_encoder/blocks_{i}/{p}", k) for f, p, k in _BLOCK]
    for i in range(c.num_hidden_layers):
        rows += [(f"blocks.{i}.{f}", f"blocks_{i}/{p}", k) for f, p, k in _BLOCK]
    return rows


def to_flax(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "alibi":  # fairseq (layers or 1, 1, heads or 1, 1, 1) -> (layers or 1, heads or 1)
        return np.ascontiguousarray(value.reshape(value.shape[0], value.shape[2]))
    return to_flax_array(value, kind)


def to_fairseq(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "alibi":
        return np.ascontiguousarray(value.reshape(value.shape[0], 1, value.shape[1], 1, 1))
    return to_hf_array(value, kind)


def _read(
    state: Mapping[str, Any],
    rows: list[tuple[str, str, str]],
    shapes: Mapping[str, Any],
    source: str,
    where: str = "",
    strip: str = "",
) -> dict[str, Any]:
    """Flax tree from `state` by `rows`: every row present with its shape; no key left over."""
    out: dict[str, np.ndarray] = {}
    for fkey, path, kind in rows:
        key = fkey[len(strip) :] if strip and fkey.startswith(strip) else fkey
        if key not in state:
            raise D2VError(f"{source}: missing key {where}{key!r}")
        arr = to_flax(tensor_to_numpy(state[key], where + key, source), kind).astype(np.float32)
        want = tuple(shapes[path].shape)
        if arr.shape != want:
            raise D2VError(
                f"{source}: key {where}{key!r} has shape {tuple(np.shape(state[key]))}, expected "
                f"{tuple(to_fairseq(np.empty(want, np.int8), kind).shape)} from the checkpoint's config"
            )
        out[path] = arr
    known = {(r[0][len(strip) :] if strip and r[0].startswith(strip) else r[0]) for r in rows}
    extra = sorted(set(state) - known)
    if extra:
        raise D2VError(f"{source}: unexpected key {where}{extra[0]!r}: not a data2vec 2.0 audio parameter")
    return unflatten(out)


def _write(tree: Mapping[str, Any], rows: list[tuple[str, str, str]], strip: str = "") -> dict[str, np.ndarray]:
    flat = flatten(tree)
    out = {}
    for fkey, path, kind in rows:
        key = fkey[len(strip) :] if strip and fkey.startswith(strip) else fkey
        if path not in flat:
            raise D2VError(f"Flax parameter {path!r} missing: cannot write fairseq key {key!r}")
        out[key] = to_fairseq(np.asarray(flat[path]), kind)
    return out


# ------------------------------------------------------------------------------------ config
def model_settings(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Architecture fields of a `data2vec_multi` cfg.model with Data2VecMultiConfig / D2vAudioConfig defaults."""
    audio = dict((model_cfg.get("modalities") or {}).get("audio") or {})
    dec = audio.get("decoder", {}) or {}
    return {
        "embed_dim": int(model_cfg.get("embed_dim", 768)),
        "depth": int(model_cfg.get("depth", 8)),
        "num_heads": int(model_cfg.get("num_heads", 12)),
        "mlp_ratio": float(model_cfg.get("mlp_ratio", 4)),
        "norm_eps": float(model_cfg.get("norm_eps", 1e-6)),
        "feature_encoder_spec": audio.get("feature_encoder_spec", DEFAULT_SPEC),
        "conv_pos_width": int(audio.get("conv_pos_width", 95)),
        "conv_pos_depth": int(audio.get("conv_pos_depth", 5)),
        "conv_pos_groups": int(audio.get("conv_pos_groups", 16)),
        "prenet_depth": int(audio.get("prenet_depth", 4)),
        "use_alibi_encoder": bool(audio.get("use_alibi_encoder", False)),
        "alibi_scale": float(audio.get("alibi_scale", 1.0)),
        "learned_alibi_scale_per_head": bool(audio.get("learned_alibi_scale_per_head", False)),
        "learned_alibi_scale_per_layer": bool(audio.get("learned_alibi_scale_per_layer", False)),
        "decoder": None
        if "decoder" in audio and audio["decoder"] is None
        else {
            "decoder_dim": int(dec.get("decoder_dim", 384)),
            "decoder_groups": int(dec.get("decoder_groups", 16)),
            "decoder_kernel": int(dec.get("decoder_kernel", 5)),
            "decoder_layers": int(dec.get("decoder_layers", 5)),
            "input_dropout": float(dec.get("input_dropout", 0.1)),
        },
    }


def is_data2vec2(ckpt: Mapping[str, Any]) -> bool:
    cfg = _plain(ckpt.get("cfg"))
    model = _plain(cfg.get("model"))
    if model.get("_name") == MODEL_NAME:
        return True
    w2v = _plain(model.get("w2v_args")) if model.get("w2v_args") is not None else {}
    return _plain(w2v.get("model")).get("_name") == MODEL_NAME


def config_from_model_cfg(arch: Mapping[str, Any], train: Mapping[str, Any] | None, source: str, where: str):
    """Data2Vec2Config of a `data2vec_multi` cfg.model; `train` the fine-tune's own cfg.model (CTC), else None."""
    s = model_settings(arch)
    audio = dict((arch.get("modalities") or {}).get("audio") or {})
    for key, bad, why in (
        ("layer_norm_first", True, "pre-LN blocks"),
        ("num_extra_tokens", None, "extra tokens"),
        ("learned_alibi", True, "a learned ALiBi table"),
        ("conv_pos_pre_ln", True, "a LayerNorm before the positional conv"),
        ("extractor_mode", None, "a group-norm conv extractor"),
    ):
        value = arch.get(key) if key == "layer_norm_first" else audio.get(key)
        if (
            (bad is None and key == "num_extra_tokens" and int(value or 0) > 0)
            or (bad is None and key == "extractor_mode" and value not in (None, "layer_norm"))
            or (bad is True and bool(value))
        ):
            raise D2VError(
                f"{source}: {where}.{'' if key == 'layer_norm_first' else 'modalities.audio.'}{key} is "
                f"{value!r}: {why} is not supported (the data2vec 2.0 audio models have none)"
            )
    conv = parse_conv_layers(s["feature_encoder_spec"], f"{source}: {where}.modalities.audio.feature_encoder_spec")
    dec = s["decoder"] or {}
    fields: dict[str, Any] = dict(
        hidden_size=s["embed_dim"],
        num_hidden_layers=s["depth"],
        num_attention_heads=s["num_heads"],
        intermediate_size=int(s["embed_dim"] * s["mlp_ratio"]),
        layer_norm_eps=s["norm_eps"],
        conv_dim=[c[0] for c in conv],
        conv_kernel=[c[1] for c in conv],
        conv_stride=[c[2] for c in conv],
        conv_bias=False,
        num_conv_pos_embedding_groups=s["conv_pos_groups"],
        conv_pos_kernel_size=max(3, s["conv_pos_width"] // s["conv_pos_depth"]),
        num_conv_pos_embeddings=s["conv_pos_depth"],
        prenet_depth=s["prenet_depth"],
        use_alibi=s["use_alibi_encoder"],
        alibi_scale_per_head=s["learned_alibi_scale_per_head"],
        alibi_scale_per_layer=s["learned_alibi_scale_per_layer"],
        hidden_dropout=float(arch.get("encoder_dropout", 0.1)),
        attention_dropout=float(arch.get("attention_dropout", 0.1)),
        activation_dropout=float(arch.get("activation_dropout", 0.0)),
        post_mlp_dropout=float(arch.get("post_mlp_drop", 0.1)),
        layerdrop=float(arch.get("layerdrop", 0.0)),
        feat_proj_dropout=float(arch.get("dropout_input", 0.0)),
        prenet_dropout=float(audio.get("prenet_dropout", 0.0)),
        prenet_layerdrop=float(audio.get("prenet_layerdrop", 0.0)),
        mask_noise_std=float(audio.get("mask_noise_std", 0.01)),
    )
    if dec:
        fields.update(
            decoder_dim=dec["decoder_dim"],
            decoder_groups=dec["decoder_groups"],
            decoder_kernel=dec["decoder_kernel"],
            decoder_layers=dec["decoder_layers"],
            decoder_input_dropout=dec["input_dropout"],
        )
    if train is not None:  # Wav2VecEncoder's arg_overrides: the fine-tune's dropouts and masking
        d = float(train.get("dropout", 0.0))
        on = bool(train.get("apply_mask", False))
        fields.update(
            hidden_dropout=d,
            post_mlp_dropout=d,
            prenet_dropout=d,
            attention_dropout=float(train.get("attention_dropout", 0.0)),
            activation_dropout=float(train.get("activation_dropout", 0.0)),
            layerdrop=float(train.get("layerdrop", 0.0)),
            prenet_layerdrop=float(train.get("layerdrop", 0.0)),
            feat_proj_dropout=float(train.get("dropout_input", 0.0)),
            final_dropout=float(train.get("final_dropout", 0.0)),
            mask_time_prob=float(train.get("mask_prob", 0.5)) if on else 0.0,
            mask_time_length=int(train.get("mask_length", 10)),
            mask_time_min_masks=1,
            mask_feature_prob=float(train.get("mask_channel_prob", 0.0)) if on else 0.0,
            mask_feature_length=int(train.get("mask_channel_length", 10)),
            mask_feature_min_masks=0,
        )
    try:
        return Data2Vec2Config(**fields)
    except TypeError as e:
        raise D2VError(f"{source}: bad {where} ({e})") from None


# ------------------------------------------------------------------------------------ the pretraining objective
# cfg.model keys (and cfg.model.modalities.audio keys) that `d2v pretrain --arch data2vec2` takes as settings
# of the same name, with their type: a run from the checkpoint continues its objective.
OBJECTIVE_KEYS: dict[str, type] = {
    "clone_batch": int,
    "average_top_k_layers": int,
    "instance_norm_target_layer": bool,
    "ema_decay": float,
    "ema_end_decay": float,
    "ema_anneal_end_step": int,
    "ema_encoder_only": bool,
    "loss_beta": float,
    "loss_scale": float,
}
AUDIO_OBJECTIVE_KEYS: dict[str, type] = {
    "mask_prob": float,
    "mask_prob_adjust": float,
    "mask_length": int,
    "inverse_mask": bool,
    "mask_dropout": float,
}


def _inactive(value: Any, ours: Any) -> bool:
    return value is None or value == ours


# cfg.model options of both data2vec versions that normalise the teacher's targets otherwise than our objectives
# (instance norm of each layer, `instance_norm_target_layer`): implemented only when off.
TARGET_OPTIONS = ("layer_norm_target_layer", "layer_norm_targets", "instance_norm_targets", "batch_norm_target_layer")

# (where, key, is the value one we implement?) for fairseq options with no setting here; each is checked only
# when the cfg has the key. "model" is cfg.model, "audio" cfg.model.modalities.audio, "decoder" its decoder.
UNSUPPORTED_OPTIONS: tuple[tuple[str, str, Any], ...] = (
    *(("model", k, lambda v, _m, _a: not v) for k in (*TARGET_OPTIONS, "end_of_block_targets")),
    *(
        (where, k, lambda v, _m, _a: not float(v or 0))
        for where in ("model", "audio")
        for k in ("start_drop_path_rate", "end_drop_path_rate")
    ),
    # fairseq's alibi_scale is a frozen buffer then; here it is always trained
    ("audio", "learned_alibi_scale", lambda v, _m, a: bool(v) or not a.get("use_alibi_encoder", False)),
    # fairseq draws each batch's mask_prob in [mask_prob_min, mask_prob) when 0 <= mask_prob_min < mask_prob
    ("audio", "mask_prob_min", lambda v, _m, a: v is None or not 0 <= float(v) < float(a.get("mask_prob", 0.7))),
    ("audio", "keep_masked_pct", lambda v, _m, _a: not float(v or 0)),
    ("audio", "ema_local_encoder", lambda v, _m, _a: not v),
    ("audio", "add_masks", lambda v, _m, _a: not v),
    ("audio", "remove_masks", lambda v, _m, _a: not v),
    ("audio", "encoder_zero_mask", lambda v, _m, _a: v is None or bool(v)),
    ("audio", "mask_channel_prob", lambda v, _m, _a: not float(v or 0)),
    ("audio", "local_grad_mult", lambda v, _m, _a: v is None or float(v) == 1.0),
    ("model", "cls_loss", lambda v, _m, _a: not float(v or 0)),
    ("model", "recon_loss", lambda v, _m, _a: not float(v or 0)),
    ("model", "d2v_loss", lambda v, _m, _a: v is None or float(v) == 1.0),
    ("model", "shared_decoder", lambda v, _m, _a: v is None),
    # `Decoder1d` has no positions, always its residuals and one projection
    ("decoder", "add_positions_masked", lambda v, _m, _a: not v),
    ("decoder", "add_positions_all", lambda v, _m, _a: not v),
    ("decoder", "decoder_residual", lambda v, _m, _a: v is None or bool(v)),
    ("decoder", "projection_layers", lambda v, _m, _a: v is None or int(v) == 1),
)
_PREFIX = {
    "model": "cfg.model.",
    "audio": "cfg.model.modalities.audio.",
    "decoder": "cfg.model.modalities.audio.decoder.",
}


def unsupported_options(
    model_cfg: Mapping[str, Any], options: tuple[tuple[str, str, Any], ...] = UNSUPPORTED_OPTIONS
) -> list[str]:
    """["cfg.model.layer_norm_targets = True", ...]: the pretraining options of a data2vec_multi cfg.model
    whose value `d2v pretrain --arch data2vec2` does not implement (fairseq's defaults are all implemented).
    `options`: another table of the same form (`d2v verify --objective`'s for a 1.0 cfg.model)."""
    model = _plain(model_cfg)
    audio = _plain(_plain(model.get("modalities")).get("audio"))
    parts = {"model": model, "audio": audio, "decoder": _plain(audio.get("decoder"))}
    out = []
    for where, key, ok in options:
        part = parts[where]
        if key in part and not ok(part[key], model, audio):
            out.append(f"{_PREFIX[where]}{key} = {part[key]!r}")
    return out


def pretraining_settings(cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The `d2v pretrain` settings a 2.0 pretraining checkpoint's whole `cfg` gives: its objective
    (`OBJECTIVE_KEYS`, `AUDIO_OBJECTIVE_KEYS`: keys the cfg has), `clip_norm` and, from a composite optimizer
    (fairseq's `weight_decay_scale 0` groups), `weight_decay_exempt`. An option whose value is not implemented
    here (`unsupported_options`) is one `D2VError` naming it."""
    cfg = _plain(cfg)
    model = _plain(cfg.get("model"))
    audio = _plain(_plain(model.get("modalities")).get("audio"))
    bad = unsupported_options(model)
    if bad:
        raise D2VError(
            f"{source}: {bad[0]}: d2v pretrain --arch data2vec2 does not implement it, so the run would not "
            "continue this checkpoint's objective (fine-tuning or converting it is fine)"
        )
    out: dict[str, Any] = {}
    for part, keys, prefix in (
        (model, OBJECTIVE_KEYS, "cfg.model."),
        (audio, AUDIO_OBJECTIVE_KEYS, "cfg.model.modalities.audio."),
    ):
        for key, kind in keys.items():
            value = part.get(key)
            if value is None:
                continue
            if key == "ema_anneal_end_step" and isinstance(value, str):  # an unresolved ${optimization.max_update}
                value = _plain(cfg.get("optimization")).get("max_update")
                if value is None:
                    continue
            try:
                out[key] = kind(value) if kind is not bool or isinstance(value, bool) else _bool(value)
            except (TypeError, ValueError):
                raise D2VError(f"{source}: {prefix}{key} is {value!r}, expected a {kind.__name__}") from None
    optimization, optimizer = _plain(cfg.get("optimization")), _plain(cfg.get("optimizer"))
    if optimization.get("clip_norm") is not None:
        out["clip_norm"] = float(optimization["clip_norm"])
    if optimizer.get("_name"):
        out["weight_decay_exempt"] = optimizer["_name"] == "composite"
    return out


def _bool(value: Any) -> bool:
    if str(value).lower() in ("true", "1"):
        return True
    if str(value).lower() in ("false", "0"):
        return False
    raise ValueError(value)


# ------------------------------------------------------------------------------------ reading
def load_fairseq2(path: str | os.PathLike, ckpt: Mapping[str, Any], dict_path: str | os.PathLike | None = None):
    """A `FairseqCheckpoint` (see `convert.fairseq`) of a data2vec 2.0 audio `.pt` already read safely."""
    source = os.fspath(path)
    state = dict(ckpt["model"])
    cfg = _plain(ckpt.get("cfg"))
    model_cfg, task = _plain(cfg.get("model")), _plain(cfg.get("task"))
    is_ctc = any(k.startswith("w2v_encoder.") for k in state)
    notes: list[str] = []
    if is_ctc:
        w2v = _plain(model_cfg.get("w2v_args"))
        arch, where = _plain(w2v.get("model")), "cfg.model.w2v_args.model"
        config = config_from_model_cfg(arch, model_cfg, source, where)
        normalize = task.get("normalize", model_cfg.get("normalize", True))
    else:
        arch, where = model_cfg, "cfg.model"
        config = config_from_model_cfg(arch, None, source, where)
        normalize = task.get("normalize", True)
    ema = state.pop(EMA_KEY, None)
    aux: dict[str, Any] = {}
    if is_ctc:
        head = {k: state.pop(k) for k in [r[0] for r in HEAD] if k in state}
        if "w2v_encoder.proj.weight" not in head:
            raise D2VError(f"{source}: missing key 'w2v_encoder.proj.weight' (the CTC head)")
        config = config.replace(vocab_size=int(head["w2v_encoder.proj.weight"].shape[0]))
        module = Data2Vec2ForCTC(config)
        shapes = flatten(param_shapes(module))
        enc_shapes = {p[len("data2vec_audio/") :]: v for p, v in shapes.items() if p.startswith("data2vec_audio/")}
        inner = {k[len(CTC_PREFIX) :]: v for k, v in state.items() if k.startswith(CTC_PREFIX)}
        other = sorted(k for k in state if not k.startswith(CTC_PREFIX))
        if other:
            raise D2VError(f"{source}: unexpected key {other[0]!r}: not a data2vec 2.0 CTC parameter")
        enc = _read(inner, key_rows(config), enc_shapes, source, CTC_PREFIX)
        params = {
            "data2vec_audio": enc,
            **_read(
                head,
                list(HEAD),
                {"lm_head/kernel": shapes["lm_head/kernel"], "lm_head/bias": shapes["lm_head/bias"]},
                source,
            ),
        }
    else:
        module = Data2Vec2Model(config)
        shapes = flatten(param_shapes(module))
        dec_rows = key_rows(config, "decoder")
        dec_state = {k: state.pop(k) for k in list(state) if k.startswith(AUDIO + "decoder.")}
        if dec_state:
            dec_shapes = flatten(init_decoder_shapes(config))
            aux["decoder"] = _read(dec_state, dec_rows, dec_shapes, source)
        else:
            notes.append(f"{source}: no decoder ({AUDIO}decoder.*): pretraining would start a new one")
        params = _read(state, key_rows(config), shapes, source)
        bad = unsupported_options(arch)
        if bad:
            notes.append(
                f"{source}: {', '.join(bad)}: not implemented by d2v pretrain, which refuses to continue "
                "pretraining from this checkpoint (the model converts as fairseq computes it)"
            )
        if ema is not None:
            aux["ema"] = _ema_tree(ema, params, config, shapes, source, notes)
        else:
            notes.append(f"{source}: no EMA teacher ({EMA_KEY}) in the checkpoint; pretraining would start a new one")
    vocab = None
    if is_ctc:
        symbols, where_v = _find_symbols(Path(source), dict_path, ckpt)
        if symbols is None:
            notes.append(f"{source}: no dictionary found (pass --dict dict.ltr.txt): no vocab.json written")
        elif len(symbols) != config.vocab_size:
            raise D2VError(f"{where_v}: has {len(symbols)} symbols but w2v_encoder.proj has {config.vocab_size} rows")
        else:
            vocab = hf_vocab(symbols, where_v)
            config = config.replace(
                pad_token_id=vocab["<pad>"],
                bos_token_id=vocab["<s>"],
                eos_token_id=vocab.get("</s>", config.eos_token_id),
            )
    preprocessor = {**preprocessor_config(do_normalize=bool(normalize)), "normalize_eps": FAIRSEQ_NORMALIZE_EPS}
    history = ckpt.get("optimizer_history") or []
    updates = history[-1].get("num_updates") if history and isinstance(history[-1], Mapping) else None
    saved = {"source": os.path.basename(source), "num_updates": _jsonable(updates), "cfg": _jsonable(ckpt.get("cfg"))}
    return FairseqCheckpoint(config, is_ctc, params, aux, preprocessor, vocab, notes, saved)


def init_decoder_shapes(config: Any) -> Any:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    boxed = jax.eval_shape(
        lambda r: Decoder1d(config).init(r, jnp.zeros((1, 16, config.hidden_size)))["params"], jax.random.PRNGKey(0)
    )
    return nn.meta.unbox(boxed)


def _ema_tree(
    ema: Any, params: Mapping[str, Any], config: Any, shapes: Mapping[str, Any], source: str, notes: list[str]
) -> dict[str, Any]:
    """The teacher: `_ema` read by the teacher rows (or, ema_encoder_only, by the block rows alone)."""
    if not isinstance(ema, Mapping):
        raise D2VError(f"{source}: {EMA_KEY} is a {type(ema).__name__}, expected a dict of tensors")
    ema = dict(ema)
    rows = key_rows(config, "teacher")
    if ema and all(k.split(".", 1)[0].isdigit() for k in ema):  # ema_encoder_only: EMAModule(model.blocks)
        ema = {f"blocks.{k}": v for k, v in ema.items()}
        block_rows = [r for r in rows if r[0].startswith("blocks.")]
        tree = _read(ema, block_rows, shapes, source, f"{EMA_KEY}.")
        flat = flatten(tree)
        for _, path, _ in rows:
            flat.setdefault(path, np.asarray(flatten(params)[path], np.float32))
        notes.append(
            f"{source}: the EMA teacher covers the blocks only (ema_encoder_only); its positional conv, "
            "alibi_scale and context encoder are the student's"
        )
        return unflatten(flat)
    return _read(ema, rows, shapes, source, f"{EMA_KEY}.")


# ------------------------------------------------------------------------------------ writing
def conv_spec(config: Any) -> str:
    """fairseq's spelling of the conv stack, runs of equal layers folded: "[(512, 10, 5)] + [(512, 3, 2)] * 4"."""
    runs: list[list[Any]] = []
    for t in zip(config.conv_dim, config.conv_kernel, config.conv_stride, strict=True):
        if runs and runs[-1][0] == t:
            runs[-1][1] += 1
        else:
            runs.append([t, 1])
    return " + ".join(f"[{t}]" + (f" * {n}" if n > 1 else "") for t, n in runs)


def default_cfg(config: Any) -> dict[str, Any]:
    """A `data2vec_multi` cfg (base_audio_only_task.yaml's, with this model's architecture)."""
    return {
        "_name": MODEL_NAME,
        "loss_beta": 0.0,
        "loss_scale": None,
        "depth": config.num_hidden_layers,
        "embed_dim": config.hidden_size,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": config.intermediate_size / config.hidden_size,
        "norm_eps": config.layer_norm_eps,
        "norm_affine": True,
        "layer_norm_first": False,
        "encoder_dropout": config.hidden_dropout,
        "post_mlp_drop": config.post_mlp_dropout,
        "attention_dropout": config.attention_dropout,
        "activation_dropout": config.activation_dropout,
        "dropout_input": config.feat_proj_dropout,
        "layerdrop": config.layerdrop,
        "clone_batch": 8,
        "ema_decay": 0.999,
        "ema_end_decay": 0.99999,
        "ema_anneal_end_step": 75000,
        "ema_encoder_only": False,
        "average_top_k_layers": min(8, config.num_hidden_layers),
        "instance_norm_target_layer": True,
        "layer_norm_target_layer": False,
        "layer_norm_targets": False,
        "supported_modality": "AUDIO",
        "modalities": {
            "audio": {
                "type": "AUDIO",
                "extractor_mode": "layer_norm",
                "feature_encoder_spec": conv_spec(config),
                "conv_pos_width": config.conv_pos_kernel_size * config.num_conv_pos_embeddings,
                "conv_pos_depth": config.num_conv_pos_embeddings,
                "conv_pos_groups": config.num_conv_pos_embedding_groups,
                "prenet_depth": config.prenet_depth,
                "prenet_dropout": config.prenet_dropout,
                "prenet_layerdrop": config.prenet_layerdrop,
                "mask_prob": 0.5,
                "mask_prob_adjust": 0.05,
                "inverse_mask": False,
                "mask_length": 5,
                "mask_noise_std": config.mask_noise_std,
                "mask_dropout": 0.0,
                "add_masks": False,
                "ema_local_encoder": False,
                "use_alibi_encoder": config.use_alibi,
                "learned_alibi_scale": True,
                "learned_alibi_scale_per_head": config.alibi_scale_per_head,
                "learned_alibi_scale_per_layer": config.alibi_scale_per_layer,
                "num_extra_tokens": 0,
                "decoder": {
                    "decoder_dim": config.decoder_dim,
                    "decoder_groups": config.decoder_groups,
                    "decoder_kernel": config.decoder_kernel,
                    "decoder_layers": config.decoder_layers,
                    "input_dropout": config.decoder_input_dropout,
                },
            }
        },
    }


def fairseq_state(config: Any, params: Mapping[str, Any], aux: Mapping[str, Any] | None) -> dict[str, Any]:
    """fairseq's `model` state dict (numpy arrays) of a 2.0 model (CTC: wrapped; pretrained: `_ema`, decoder)."""
    aux = aux or {}
    if "lm_head" in params:
        state = {CTC_PREFIX + k: v for k, v in _write(params["data2vec_audio"], key_rows(config)).items()}
        state.update(_write(params, list(HEAD)))
        return state
    state = _write(params, key_rows(config))
    if "decoder" in aux:
        state.update(_write(aux["decoder"], key_rows(config, "decoder")))
    if "ema" in aux:
        state[EMA_KEY] = _write(aux["ema"], key_rows(config, "teacher"))
    return state


def export_fairseq2(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False) -> list[str]:
    """Write a fairseq `.pt` from a flax-d2v 2.0 directory (what `d2v convert DIR out.pt --to fairseq` does)."""
    import json

    import torch

    src, dst = Path(localize(src)), as_path(dst)  # a URL source: its local copy; a URL destination: one upload
    if dst.exists() and not overwrite:
        raise D2VError(f"{dst}: exists (pass --overwrite to replace it)")
    config, params = load_flax(src)
    if not isinstance(config, Data2Vec2Config):
        raise D2VError(
            f"{src}: --to fairseq writes data2vec 2.0 models; this directory holds a 1.0 model (export it with --to hf)"
        )
    head = detect(params).architecture
    if head not in ("Data2VecAudioModel", "Data2VecAudioForCTC"):  # fairseq's data2vec 2.0 has no such head
        raise D2VError(
            f"{src}: a data2vec 2.0 model with the {head} head has no fairseq form "
            "(fairseq's data2vec 2.0 is the bare encoder or CTC)"
        )
    aux = load_flax_aux(src) or {}
    is_ctc = "lm_head" in params
    notes: list[str] = []
    saved = (
        json.loads((src / FAIRSEQ_CFG_FILE).read_text(encoding="utf-8")) if (src / FAIRSEQ_CFG_FILE).is_file() else {}
    )
    cfg = saved.get("cfg") if isinstance(saved.get("cfg"), dict) else None
    if cfg is None:
        model = default_cfg(config)
        if is_ctc:
            model = {
                "_name": "wav2vec_ctc",
                "apply_mask": config.mask_time_prob > 0,
                "mask_prob": config.mask_time_prob,
                "mask_length": config.mask_time_length,
                "mask_channel_prob": config.mask_feature_prob,
                "mask_channel_length": config.mask_feature_length,
                "dropout": config.hidden_dropout,
                "attention_dropout": config.attention_dropout,
                "activation_dropout": config.activation_dropout,
                "layerdrop": config.layerdrop,
                "final_dropout": config.final_dropout,
                "normalize": True,
                "w2v_args": {"model": model, "task": {"_name": "audio_pretraining", "normalize": True}},
            }
        cfg = {
            "_name": None,
            "model": model,
            "task": {"_name": "audio_finetuning" if is_ctc else "audio_pretraining", "normalize": True},
        }
        notes.append(f"{dst}: no fairseq_cfg.json in {src}: cfg built from config.json (base_audio_only_task defaults)")
    state = {
        k: (
            torch.from_numpy(np.ascontiguousarray(v))
            if not isinstance(v, dict)
            else {kk: torch.from_numpy(np.ascontiguousarray(vv)) for kk, vv in v.items()}
        )
        for k, v in fairseq_state(config, params, aux).items()
    }
    ckpt: dict[str, Any] = {
        "cfg": cfg,
        "args": None,
        "model": state,
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "CtcCriterion" if is_ctc else "ModelCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {},
                "num_updates": int(saved.get("num_updates") or 0),
            }
        ],
        "task_state": {},
        "extra_state": {},
        "last_optimizer_state": None,
    }
    vocab_file = src / "vocab.json"
    if is_ctc and vocab_file.is_file():
        vocab = read_json_object(vocab_file)
        symbols = [s for s, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        if "<s>" in vocab and "<pad>" in vocab:  # undo hf_vocab's swap: fairseq's blank <s> is row 0
            i, j = vocab["<s>"], vocab["<pad>"]
            symbols[i], symbols[j] = "<pad>", "<s>"
        ckpt["task_state"] = {"target_dictionary": make_dictionary(symbols)}
    import io

    buf = io.BytesIO()
    with _fairseq_dictionary_module():
        torch.save(ckpt, buf)
    atomic_write_bytes(dst, buf.getvalue())
    return notes


class _FairseqDictionary:
    """Pickles as `fairseq.data.dictionary.Dictionary` (attributes only), what fairseq's task_state holds."""


def make_dictionary(symbols: list[str]) -> Any:
    d = _FairseqDictionary()
    d.__dict__.update(
        bos_word="<s>",
        unk_word="<unk>",
        pad_word="<pad>",
        eos_word="</s>",
        symbols=list(symbols),
        count=[1] * len(symbols),
        indices={s: i for i, s in enumerate(symbols)},
        bos_index=symbols.index("<s>") if "<s>" in symbols else 0,
        pad_index=symbols.index("<pad>") if "<pad>" in symbols else 1,
        eos_index=symbols.index("</s>") if "</s>" in symbols else 2,
        unk_index=symbols.index("<unk>") if "<unk>" in symbols else 3,
        nspecial=4,
    )
    return d


class _fairseq_dictionary_module:
    """While pickling: `_FairseqDictionary` is found as `fairseq.data.dictionary.Dictionary` (no fairseq needed)."""

    def __enter__(self):
        import sys
        import types

        self.added = [n for n in ("fairseq", "fairseq.data", "fairseq.data.dictionary") if n not in sys.modules]
        for n in self.added:
            sys.modules[n] = types.ModuleType(n)
        self.cls_state = (_FairseqDictionary.__module__, _FairseqDictionary.__qualname__, _FairseqDictionary.__name__)
        _FairseqDictionary.__module__ = "fairseq.data.dictionary"
        _FairseqDictionary.__qualname__ = _FairseqDictionary.__name__ = "Dictionary"
        self.prev = getattr(sys.modules["fairseq.data.dictionary"], "Dictionary", None)
        if self.added:
            sys.modules["fairseq.data.dictionary"].Dictionary = _FairseqDictionary
        return self

    def __exit__(self, *exc):
        import sys

        _FairseqDictionary.__module__, _FairseqDictionary.__qualname__, _FairseqDictionary.__name__ = self.cls_state
        for n in self.added:
            del sys.modules[n]
        return False
