"""fairseq data2vec-audio checkpoints (`.pt`) -> flax-d2v, read without running any of their code.

    ckpt = load_fairseq("audio_base_ls.pt")            # (config, is_ctc, params, aux, preprocessor, vocab, notes)
    convert_fairseq("audio_base_ls_960h.pt", "out/")   # a flax-d2v directory (what `d2v convert` writes)

Two kinds of checkpoint are read:

- pretrained (`cfg.model._name == "data2vec_audio"`): the encoder, plus what pretraining needs to
  resume, kept in the checkpoint's `flax_aux.safetensors`: `final_proj` (the student's regression
  head) and `_ema` (the EMA teacher's fp32 encoder, stored by fairseq's `EMAModule.fp32_params` as
  a nested dict keyed like `TransformerEncoder.state_dict()`). The teacher comes out in the layout of
  the student's `encoder` subtree, which is what `flax_d2v.train.data2vec_objective` keeps as its teacher;
- fine-tuned CTC (`cfg.model._name == "wav2vec_ctc"`): the same encoder under
  `w2v_encoder.w2v_model.`, the head `w2v_encoder.proj` (-> `lm_head`), the pretraining
  architecture in `cfg.model.w2v_args`. Its vocabulary is fairseq's `Dictionary` (`--dict`, else a
  `dict.ltr.txt` beside the `.pt`, else the dictionary the checkpoint's `task_state` holds).

Keys go fairseq -> transformers through `FAIRSEQ_KEY_TABLE` (the inverse of transformers'
`convert_data2vec_audio_original_pytorch_checkpoint_to_pytorch.py`), then through the one
HF <-> Flax table of `keys.py`, so every parameter is the same float32 number in all three layouts.
Older checkpoints that carry `args` (an `argparse.Namespace`) instead of `cfg` are read the same way.

Safety: the file is read by `torch.load(weights_only=True)`, whose unpickler refuses every global
that is not allow-listed. The allow-list adds only plain data types real fairseq checkpoints hold:
`argparse.Namespace` (old `args`), NumPy scalars/arrays/dtypes (logged metrics in `extra_state`),
and fairseq's `Dictionary`, mapped by name to `DictionaryState`, an inert attribute holder (no
fairseq code is imported or run). Anything else (`os.system`, `builtins.eval`, `omegaconf` objects
of pre-2021 checkpoints, ...) is refused with a `D2VError` naming the file and the global.

Config: the architecture comes from `cfg.model` (`w2v_args` for a fine-tune), dropout and LayerDrop
from the checkpoint's own training run, SpecAugment (`mask_time_*`, `mask_feature_*`) from a fine-tune's
`mask_prob`/`mask_channel_prob` (a pretrained model's `mask_prob` is the data2vec objective's, so its
config keeps transformers' defaults). The whole cfg and the update count are kept in `fairseq_cfg.json`.

Audio normalisation: fairseq's `task.normalize` becomes `do_normalize` in
`preprocessor_config.json`; fairseq normalises with `F.layer_norm` (eps 1e-5) where transformers
uses eps 1e-7, so the file also records `"normalize_eps": 1e-05` (transformers ignores the key).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from flax_d2v.checkpoint import FLAX_AUX, load_flax_aux, save_flax
from flax_d2v.config import Data2VecAudioConfig
from flax_d2v.convert.fairseq2 import is_data2vec2, load_fairseq2
from flax_d2v.convert.fairseq_common import (
    FAIRSEQ_CFG_FILE,
    FAIRSEQ_NORMALIZE_EPS,
    DictionaryState,
    FairseqCheckpoint,
    _find_symbols,
    _jsonable,
    _plain,
    hf_vocab,
    parse_conv_layers,
    read_dictionary,
    read_fairseq_file,
)
from flax_d2v.convert.hf import state_dict_to_flax, tensor_to_numpy
from flax_d2v.convert.keys import flax_to_hf_key, hf_to_flax_key, to_flax_array, to_hf_array
from flax_d2v.errors import D2VError
from flax_d2v.modeling import Data2VecAudioForCTC, Data2VecAudioModel, param_shapes
from flax_d2v.params import flatten, unflatten
from flax_d2v.processor import preprocessor_config, save_tokenizer_files

CTC_PREFIX_FAIRSEQ = "w2v_encoder.w2v_model."

# (fairseq template, transformers template). `{n}` a layer index, `{proj}` q/k/v/out, `{p}` weight/bias.
# The feature extractor's conv block is Sequential(conv, Dropout, Sequential(TransposeLast, LayerNorm,
# TransposeLast), GELU) in fairseq's layer_norm mode, hence `.0` and `.2.1`; each positional conv block
# is Sequential(Conv1d, SamePad, TransposeLast, LayerNorm(no affine), TransposeLast, GELU), hence `.0`.
FAIRSEQ_KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("feature_extractor.conv_layers.{n}.0.{p}", "feature_extractor.conv_layers.{n}.conv.{p}"),
    ("feature_extractor.conv_layers.{n}.2.1.{p}", "feature_extractor.conv_layers.{n}.layer_norm.{p}"),
    ("layer_norm.{p}", "feature_projection.layer_norm.{p}"),
    ("post_extract_proj.{p}", "feature_projection.projection.{p}"),
    ("mask_emb", "masked_spec_embed"),
    ("encoder.pos_conv.{n}.0.{p}", "encoder.pos_conv_embed.layers.{n}.conv.{p}"),
    ("encoder.layer_norm.{p}", "encoder.layer_norm.{p}"),
    ("encoder.layers.{n}.self_attn.{proj}_proj.{p}", "encoder.layers.{n}.attention.{proj}_proj.{p}"),
    ("encoder.layers.{n}.self_attn_layer_norm.{p}", "encoder.layers.{n}.layer_norm.{p}"),
    ("encoder.layers.{n}.fc1.{p}", "encoder.layers.{n}.feed_forward.intermediate_dense.{p}"),
    ("encoder.layers.{n}.fc2.{p}", "encoder.layers.{n}.feed_forward.output_dense.{p}"),
    ("encoder.layers.{n}.final_layer_norm.{p}", "encoder.layers.{n}.final_layer_norm.{p}"),
)
# The CTC head sits outside the wrapped encoder in both layouts.
HEAD_ROW = ("w2v_encoder.proj.{p}", "lm_head.{p}")
# Pretraining-only parameters (not part of any transformers model); older checkpoints spell final_proj.0.
FINAL_PROJ_KEYS = re.compile(r"^final_proj\.(?:0\.)?(?P<p>weight|bias)$")
EMA_KEY = "_ema"

_PLACEHOLDERS = {"n": r"(?P<n>\d+)", "proj": r"(?P<proj>q|k|v|out)", "p": r"(?P<p>weight|bias)"}


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{\w+\})", template)
    return re.compile("^" + "".join(_PLACEHOLDERS[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts) + "$")


_TO_HF = [(_compile(fs), hf) for fs, hf in FAIRSEQ_KEY_TABLE]
_TO_FS = [(_compile(hf), fs) for fs, hf in FAIRSEQ_KEY_TABLE]


def fairseq_to_hf_key(key: str) -> str | None:
    """transformers key of a fairseq model key (pretrained or `w2v_encoder.`-wrapped), or None."""
    m = _compile(HEAD_ROW[0]).match(key)
    if m:
        return HEAD_ROW[1].format(**m.groupdict())
    prefix = "data2vec_audio." if key.startswith(CTC_PREFIX_FAIRSEQ) else ""
    rest = key[len(CTC_PREFIX_FAIRSEQ) :] if prefix else key
    for regex, template in _TO_HF:
        m = regex.match(rest)
        if m:
            return prefix + template.format(**m.groupdict())
    return None


def hf_to_fairseq_key(key: str) -> str | None:
    """fairseq key of a transformers key (`data2vec_audio.`-prefixed keys go under `w2v_encoder.`)."""
    m = _compile(HEAD_ROW[1]).match(key)
    if m:
        return HEAD_ROW[0].format(**m.groupdict())
    prefix = CTC_PREFIX_FAIRSEQ if key.startswith("data2vec_audio.") else ""
    rest = key[len("data2vec_audio.") :] if prefix else key
    for regex, template in _TO_FS:
        m = regex.match(rest)
        if m:
            return prefix + template.format(**m.groupdict())
    return None


# ------------------------------------------------------------------------------------ architecture
# fairseq's Wav2Vec2Config defaults, for keys an (older) checkpoint does not spell out.
W2V2_DEFAULTS: dict[str, Any] = {
    "extractor_mode": "default",
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_type": "transformer",
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "dropout_input": 0.0,
    "layer_norm_first": False,
    "conv_bias": False,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "pos_conv_depth": 1,
    "conv_feature_layers": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
    "mask_prob": 0.65,
    "mask_length": 10,
    "mask_channel_prob": 0.0,
    "mask_channel_length": 10,
}


def _sections(cfg_or_args: Any, is_args: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model section, task section): `cfg.model`/`cfg.task`, or the flat `args` Namespace for both."""
    d = _plain(cfg_or_args)
    return (d, d) if is_args or "model" not in d else (_plain(d.get("model")), _plain(d.get("task")))


def _model_name(model: Mapping[str, Any]) -> str | None:
    return model.get("_name") or model.get("arch")


def config_from_fairseq(ckpt: Mapping[str, Any], is_ctc: bool, source: str) -> tuple[Data2VecAudioConfig, bool]:
    """(config, the task's `normalize` flag) of a checkpoint; anything that is not data2vec-audio is refused."""
    is_args = ckpt.get("cfg") is None
    if is_args and ckpt.get("args") is None:
        raise D2VError(f"{source}: has neither 'cfg' nor 'args': cannot tell the architecture")
    model, task = _sections(ckpt.get("args") if is_args else ckpt["cfg"], is_args)
    train = model  # where dropout/masking settings of this checkpoint's own training live
    if is_ctc:
        if model.get("w2v_args") is None:
            raise D2VError(f"{source}: fine-tuned checkpoint without w2v_args (the pretraining config)")
        w2v_is_args = isinstance(model["w2v_args"], argparse.Namespace)
        arch, w2v_task = _sections(model["w2v_args"], w2v_is_args)
        normalize = task.get("normalize", model.get("normalize", w2v_task.get("normalize", False)))
    else:
        arch, normalize = model, task.get("normalize", model.get("normalize", False))
    name = _model_name(arch)
    if name is not None and name != "data2vec_audio":
        raise D2VError(
            f"{source}: model is {name!r}; only data2vec_audio checkpoints (and their wav2vec_ctc "
            "fine-tunes) are supported"
        )
    a = {**W2V2_DEFAULTS, **{k: v for k, v in arch.items() if v is not None}}
    t = {**a, **{k: v for k, v in train.items() if v is not None}} if is_ctc else a
    where = "cfg.model.w2v_args.model" if is_ctc else "cfg.model"
    for key, want in (
        ("extractor_mode", "layer_norm"),
        ("layer_norm_first", False),
        ("layer_type", "transformer"),
        ("activation_fn", "gelu"),
    ):
        if a.get(key, want) != want:
            raise D2VError(f"{source}: {where}.{key} is {a.get(key)!r}; data2vec-audio needs {want!r}")
    depth = int(a["pos_conv_depth"])
    if depth < 2 or a.get("conv_pos_batch_norm"):
        raise D2VError(
            f"{source}: {where}.pos_conv_depth is {depth}: a single weight-normalised positional conv "
            "is wav2vec 2.0's, not data2vec-audio's (pos_conv_depth > 1)"
        )
    conv = parse_conv_layers(a["conv_feature_layers"], f"{source}: {where}.conv_feature_layers")
    fields: dict[str, Any] = dict(
        hidden_size=int(a["encoder_embed_dim"]),
        num_hidden_layers=int(a["encoder_layers"]),
        num_attention_heads=int(a["encoder_attention_heads"]),
        intermediate_size=int(a["encoder_ffn_embed_dim"]),
        conv_dim=[c[0] for c in conv],
        conv_kernel=[c[1] for c in conv],
        conv_stride=[c[2] for c in conv],
        conv_bias=bool(a["conv_bias"]),
        num_conv_pos_embedding_groups=int(a["conv_pos_groups"]),
        conv_pos_kernel_size=max(3, int(a["conv_pos"]) // depth),
        num_conv_pos_embeddings=depth,
        hidden_dropout=float(t["dropout"]),
        attention_dropout=float(t["attention_dropout"]),
        activation_dropout=float(t["activation_dropout"]),
        feat_proj_dropout=float(t["dropout_input"]),
        layerdrop=float(t.get("layerdrop", t["encoder_layerdrop"]) if is_ctc else t["encoder_layerdrop"]),
    )
    if is_ctc:
        # A fine-tune's mask_prob/mask_channel_prob are its SpecAugment: transformers' mask_time_*/mask_feature_*.
        # (A pretrained model's mask_prob is the data2vec objective's mask, which flax_d2v.train.data2vec_objective
        # configures itself; its config keeps transformers' SpecAugment defaults, as the hub's data2vec-audio-base.)
        on = bool(t.get("apply_mask", True))
        fields.update(
            mask_time_prob=float(t["mask_prob"]) if on else 0.0,
            mask_time_length=int(t["mask_length"]),
            mask_time_min_masks=1,  # data2vec_audio.apply_mask: compute_mask_indices(..., min_masks=1)
            mask_feature_prob=float(t["mask_channel_prob"]) if on else 0.0,
            mask_feature_length=int(t["mask_channel_length"]),
            mask_feature_min_masks=0,
        )
        if t.get("final_dropout") is not None:
            fields["final_dropout"] = float(t["final_dropout"])
    return Data2VecAudioConfig(**fields), bool(normalize)


# ------------------------------------------------------------------------------------ conversion
def _ema_tree(
    ema: Mapping[str, Any], student_encoder: Mapping[str, Any], source: str, notes: list[str]
) -> dict[str, Any] | None:
    """fairseq's `_ema` (keys of `TransformerEncoder.state_dict()`) as a Flax tree shaped like `encoder`."""
    if any(k.startswith(("encoder.", "feature_extractor.")) for k in ema):
        notes.append(
            f"{source}: the EMA teacher covers the whole model (ema_transformer_only=False); "
            "flax-d2v's teacher is the encoder only, so it was left out"
        )
        return None
    want = flatten(student_encoder)
    out: dict[str, np.ndarray] = {}
    for key, value in ema.items():
        hf = fairseq_to_hf_key(f"encoder.{key}")
        mapped = hf_to_flax_key(hf) if hf else None
        if mapped is None or not mapped[0].startswith("encoder/") or mapped[0][len("encoder/") :] not in want:
            raise D2VError(f"{source}: unexpected key {EMA_KEY}.{key!r} in the EMA teacher")
        path, kind = mapped[0][len("encoder/") :], mapped[1]
        arr = tensor_to_numpy(value, f"{EMA_KEY}.{key}", source)
        if to_flax_array(arr, kind).shape != want[path].shape:
            raise D2VError(
                f"{source}: {EMA_KEY}.{key!r} has shape {tuple(arr.shape)}, expected "
                f"{tuple(to_hf_array(np.asarray(want[path]), kind).shape)}"
            )
        out[path] = to_flax_array(arr, kind).astype(np.float32)
    missing = sorted(set(want) - set(out))
    if missing:
        only_pos = all(p.startswith("pos_conv_embed/") for p in missing)
        if not only_pos:
            raise D2VError(f"{source}: the EMA teacher lacks {len(missing)} encoder parameter(s), e.g. {missing[0]!r}")
        # fairseq's ema_layers_only copies the positional conv from the student at every step.
        out.update({p: np.asarray(want[p], np.float32) for p in missing})
        notes.append(f"{source}: the EMA teacher has no positional conv; the student's was copied in")
    return unflatten(out)


def load_fairseq(path: str | os.PathLike, dict_path: str | os.PathLike | None = None) -> FairseqCheckpoint:
    """Read a fairseq data2vec-audio `.pt` (pretrained or CTC fine-tuned) without running its code."""
    source = os.fspath(path)
    ckpt = read_fairseq_file(path)

    if is_data2vec2(ckpt):  # data2vec 2.0 (data2vec_multi) has its own key table
        return load_fairseq2(path, ckpt, dict_path)
    model_state = dict(ckpt["model"])
    is_ctc = any(k.startswith("w2v_encoder.") for k in model_state)
    config, normalize = config_from_fairseq(ckpt, is_ctc, source)
    notes: list[str] = []

    aux: dict[str, Any] = {}
    final_proj: dict[str, np.ndarray] = {}
    ema = model_state.pop(EMA_KEY, None)
    state: dict[str, np.ndarray] = {}
    for key, value in model_state.items():
        m = FINAL_PROJ_KEYS.match(key)
        if m and not is_ctc:
            arr = tensor_to_numpy(value, key, source)
            final_proj["kernel" if m["p"] == "weight" else "bias"] = np.ascontiguousarray(
                arr.T if arr.ndim == 2 else arr
            )
            continue
        hf = fairseq_to_hf_key(key)
        if hf is None or (is_ctc and not hf.startswith(("data2vec_audio.", "lm_head."))):
            raise D2VError(f"{source}: unexpected key {key!r}: not a data2vec-audio parameter")
        state[hf] = tensor_to_numpy(value, key, source)
    if is_ctc:
        config = (
            config.replace(vocab_size=int(state["lm_head.weight"].shape[0])) if "lm_head.weight" in state else config
        )
    mask_emb = "data2vec_audio.masked_spec_embed" if is_ctc else "masked_spec_embed"
    if mask_emb in state and not config.has_masked_spec_embed:
        del state[mask_emb]  # transformers has no masked_spec_embed when no masking is configured
        notes.append(f"{source}: mask_emb left out: the checkpoint's config applies no masking (mask_prob 0)")

    module = (Data2VecAudioForCTC if is_ctc else Data2VecAudioModel)(config)
    expected = {}
    for fpath, shape in flatten(param_shapes(module)).items():
        hf_key, kind = flax_to_hf_key(fpath)
        expected[hf_key] = to_hf_array(np.empty(shape.shape, np.int8), kind).shape
    for hf_key in state:
        if hf_key not in expected:
            raise D2VError(
                f"{source}: unexpected key {hf_to_fairseq_key(hf_key)!r}: the checkpoint's config has no such parameter"
            )
    for hf_key, want in expected.items():
        fs_key = hf_to_fairseq_key(hf_key)
        if hf_key not in state:
            raise D2VError(f"{source}: missing key {fs_key!r}")
        if tuple(state[hf_key].shape) != tuple(want):
            raise D2VError(
                f"{source}: key {fs_key!r} has shape {tuple(state[hf_key].shape)}, expected {tuple(want)} "
                "from the checkpoint's config"
            )
    _, params = state_dict_to_flax(state, config, source)

    if final_proj:
        h = config.hidden_size
        if set(final_proj) != {"kernel", "bias"} or final_proj["kernel"].shape != (h, h):
            raise D2VError(f"{source}: final_proj must be a {h}x{h} Linear with bias")
        aux["final_proj"] = {k: v.astype(np.float32) for k, v in final_proj.items()}
    if ema is not None and not is_ctc:
        if not isinstance(ema, Mapping):
            raise D2VError(f"{source}: {EMA_KEY} is a {type(ema).__name__}, expected a dict of tensors")
        tree = _ema_tree(ema, params["encoder"], source, notes)
        if tree is not None:
            aux["ema"] = tree
    elif not is_ctc:
        notes.append(f"{source}: no EMA teacher ({EMA_KEY}) in the checkpoint; pretraining would start a new one")

    vocab = None
    if is_ctc:
        symbols, where = _find_symbols(Path(source), dict_path, ckpt)
        if symbols is None:
            notes.append(f"{source}: no dictionary found (pass --dict dict.ltr.txt): no vocab.json written")
        elif len(symbols) != config.vocab_size:
            raise D2VError(f"{where}: has {len(symbols)} symbols but w2v_encoder.proj has {config.vocab_size} rows")
        else:
            vocab = hf_vocab(symbols, where)
            config = config.replace(
                pad_token_id=vocab["<pad>"],
                bos_token_id=vocab["<s>"],
                eos_token_id=vocab.get("</s>", config.eos_token_id),
            )

    preprocessor = {**preprocessor_config(do_normalize=normalize), "normalize_eps": FAIRSEQ_NORMALIZE_EPS}
    history = ckpt.get("optimizer_history") or []
    updates = history[-1].get("num_updates") if history and isinstance(history[-1], Mapping) else None
    cfg = {
        "source": os.path.basename(source),
        "num_updates": _jsonable(updates),
        "cfg": _jsonable(ckpt.get("cfg") if ckpt.get("cfg") is not None else ckpt.get("args")),
    }
    return FairseqCheckpoint(config, is_ctc, params, aux, preprocessor, vocab, notes, cfg)


class ConvertResult(NamedTuple):
    dst: Path
    notes: list[str]  # one line each, for the caller to print


def convert_fairseq(
    pt_path: str | os.PathLike,
    dst: str | os.PathLike,
    dict_path: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> ConvertResult:
    """Write a flax-d2v directory from a fairseq `.pt` (what `d2v convert checkpoint.pt DST` does).

    The directory holds config.json, flax_model.safetensors, flax_aux.safetensors (final_proj and the
    EMA teacher, pretrained checkpoints), preprocessor_config.json, fairseq_cfg.json and, for CTC
    checkpoints with a dictionary, vocab.json/tokenizer_config.json/special_tokens_map.json.
    """
    ck = load_fairseq(pt_path, dict_path)
    with tempfile.TemporaryDirectory(prefix="d2v-fairseq-") as staging:
        if ck.vocab is not None:
            save_tokenizer_files(staging, ck.vocab)
        Path(staging, "preprocessor_config.json").write_text(
            json.dumps(ck.preprocessor, indent=2) + "\n", encoding="utf-8"
        )
        out = save_flax(
            dst,
            ck.config,
            ck.params,
            aux=ck.aux or None,
            files_from=staging,
            extra_files={FAIRSEQ_CFG_FILE: json.dumps(ck.cfg, indent=2, sort_keys=True) + "\n"},
            overwrite=overwrite,
        )
    return ConvertResult(out, list(ck.notes))


def aux_note(model_dir: str | os.PathLike) -> str | None:
    """The line to print when a transformers export leaves a directory's pretraining state behind."""
    if not (Path(model_dir) / FLAX_AUX).is_file():
        return None
    names = sorted(load_flax_aux(model_dir) or {})
    what = " and ".join({"final_proj": "final_proj", "ema": "the EMA teacher"}.get(n, n) for n in names)
    return (
        f"note: {model_dir}: {what} ({FLAX_AUX}) are pretraining state with no transformers counterpart; "
        "left out of the export (keep the flax-d2v directory to resume pretraining)"
    )


__all__ = [
    "FAIRSEQ_KEY_TABLE",
    "ConvertResult",
    "DictionaryState",
    "FairseqCheckpoint",
    "aux_note",
    "config_from_fairseq",
    "convert_fairseq",
    "fairseq_to_hf_key",
    "hf_to_fairseq_key",
    "hf_vocab",
    "load_fairseq",
    "parse_conv_layers",
    "read_dictionary",
    "read_fairseq_file",
]
