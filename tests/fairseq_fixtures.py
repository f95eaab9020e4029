"""Fixture builders: fairseq-layout data2vec-audio checkpoints made from transformers models.

A checkpoint is built the way fairseq's `Trainer.state_dict()` writes one: `cfg` (a plain dict, as
`OmegaConf.to_container` leaves it) or legacy `args` (an `argparse.Namespace`), `model` (the state
dict, with `final_proj` and the EMA teacher `_ema` for pretrained models), `optimizer_history`,
`extra_state` (logged metrics holding NumPy scalars), `last_optimizer_state` and `task_state`
(a fine-tuned model's `Dictionary`), then saved with `torch.save`.

`transformers_reference_key` re-implements the key-naming rules of transformers'
`convert_data2vec_audio_original_pytorch_checkpoint_to_pytorch.py` (its `MAPPING`,
`load_conv_layer`, `load_pos_conv_layer`) as an independent oracle for `convert/fairseq.py`'s table.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np

from flax_d2v.commands.demo import BASE_960H_VOCAB

# LibriSpeech's dict.ltr.txt order (by frequency); with the 4 specials: 32 symbols = vocab_size.
LTR_SYMBOLS = BASE_960H_VOCAB[4:]  # base-960h's vocab.json without its 4 specials: the same order
FAIRSEQ_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


# ------------------------------------------------------------------------------ the oracle
_TRANSFORMERS_MAPPING = {
    "post_extract_proj": "feature_projection.projection",
    "models.0.layer_norm": "feature_projection.layer_norm",
    "self_attn.k_proj": "encoder.layers.*.attention.k_proj",
    "self_attn.v_proj": "encoder.layers.*.attention.v_proj",
    "self_attn.q_proj": "encoder.layers.*.attention.q_proj",
    "self_attn.out_proj": "encoder.layers.*.attention.out_proj",
    "self_attn_layer_norm": "encoder.layers.*.layer_norm",
    "fc1": "encoder.layers.*.feed_forward.intermediate_dense",
    "fc2": "encoder.layers.*.feed_forward.output_dense",
    "final_layer_norm": "encoder.layers.*.final_layer_norm",
    "encoder.layer_norm": "encoder.layer_norm",
    "w2v_model.layer_norm": "feature_projection.layer_norm",
    "w2v_encoder.proj": "lm_head",
    "mask_emb": "masked_spec_embed",
}


def transformers_reference_key(name: str, is_headless: bool) -> list[str]:
    """Every HF key transformers' converter would write the fairseq parameter `name` to (0, 1 or more)."""
    prefix = "" if is_headless else "data2vec_audio."
    if "conv_layers" in name:
        rest = name.split("conv_layers.")[-1]
        items = rest.split(".")
        layer_type = {0: "conv", 2: "layer_norm"}.get(int(items[1]))
        return (
            [f"{prefix}feature_extractor.conv_layers.{int(items[0])}.{layer_type}.{rest.split('.')[-1]}"]
            if layer_type
            else []
        )
    if "pos_conv" in name:
        rest = name.split("pos_conv.")[-1]
        items = rest.split(".")
        return (
            [f"{prefix}encoder.pos_conv_embed.layers.{int(items[0])}.conv.{rest.split('.')[-1]}"]
            if int(items[1]) == 0
            else []
        )
    hits = []
    for key, mapped in _TRANSFORMERS_MAPPING.items():
        if not is_headless and mapped != "lm_head":
            mapped = "data2vec_audio." + mapped
        if key in name or key.split("w2v_model.")[-1] == name.split(".")[0]:
            if "*" in mapped:
                mapped = mapped.replace("*", name.split(key)[0].split(".")[-2])
            weight_type = "bias" if "bias" in name else "weight" if "weight" in name else None
            hits.append(mapped + (f".{weight_type}" if weight_type else ""))
    return hits


# ------------------------------------------------------------------------------ models and configs
def hf_model(ctc: bool, seed: int = 0, **overrides):
    """A tiny transformers model with random weights and non-trivial LayerNorms/biases."""
    import torch
    import transformers
    from conftest import perturb_layer_norms, tiny_hf_kwargs

    torch.manual_seed(seed)
    cls = transformers.Data2VecAudioForCTC if ctc else transformers.Data2VecAudioModel
    model = cls(transformers.Data2VecAudioConfig(**tiny_hf_kwargs(**overrides))).eval()
    perturb_layer_norms(model, seed)
    return model


def conv_feature_layers(config) -> str:
    """fairseq's spelling, runs of equal layers folded: "[(512, 10, 5)] + [(512, 3, 2)] * 4 + ..."."""
    layers = list(zip(config.conv_dim, config.conv_kernel, config.conv_stride, strict=True))
    runs: list[list] = []
    for t in layers:
        if runs and runs[-1][0] == t:
            runs[-1][1] += 1
        else:
            runs.append([t, 1])
    return " + ".join(f"[{t}]" + (f" * {n}" if n > 1 else "") for t, n in runs)


def pretrain_model_cfg(config, **overrides) -> dict:
    """cfg.model of a data2vec_audio pretraining run (base_librispeech.yaml) for a transformers config."""
    cfg = {
        "_name": "data2vec_audio",
        "extractor_mode": "layer_norm",
        "encoder_layers": config.num_hidden_layers,
        "encoder_embed_dim": config.hidden_size,
        "encoder_ffn_embed_dim": config.intermediate_size,
        "encoder_attention_heads": config.num_attention_heads,
        "activation_fn": "gelu",
        "layer_type": "transformer",
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.05,
        "dropout_input": 0.0,
        "dropout_features": 0.0,
        "final_dim": 0,
        "layer_norm_first": False,
        "conv_feature_layers": conv_feature_layers(config),
        "conv_bias": bool(config.conv_bias),
        "logit_temp": 0.1,
        "quantize_targets": False,
        "feature_grad_mult": 1.0,
        "mask_length": 10,
        "mask_prob": 0.65,
        "mask_selection": "static",
        "mask_other": 0.0,
        "no_mask_overlap": False,
        "mask_min_space": 1,
        "require_same_masks": True,
        "mask_dropout": 0.0,
        "mask_channel_length": 10,
        "mask_channel_prob": 0.0,
        "mask_channel_before": False,
        "conv_pos": config.conv_pos_kernel_size * config.num_conv_pos_embeddings,
        "conv_pos_groups": config.num_conv_pos_embedding_groups,
        "pos_conv_depth": config.num_conv_pos_embeddings,
        "latent_temp": [2.0, 0.5, 0.999995],
        "max_positions": 100000,
        "checkpoint_activations": False,
        "required_seq_len_multiple": 2,
        "crop_seq_to_multiple": 1,
        "loss_beta": 0.0,
        "loss_scale": None,
        "average_top_k_layers": 8,
        "instance_norm_target_layer": True,
        "ema_decay": 0.999,
        "ema_end_decay": 0.9999,
        "ema_anneal_end_step": 30000,
        "ema_transformer_only": True,
        "ema_layers_only": True,
        "max_update": 400000,
        "min_target_var": 0.1,
        "min_pred_var": 0.01,
    }
    cfg.update(overrides)
    return cfg


def pretrain_cfg(config, normalize: bool = True, **model_overrides) -> dict:
    return {
        "_name": None,
        "common": {"fp16": True, "log_format": "json", "log_interval": 200, "seed": 1},
        "checkpoint": {"save_interval_updates": 25000, "no_epoch_checkpoints": True},
        "task": {
            "_name": "audio_pretraining",
            "data": "/data/librispeech",
            "normalize": normalize,
            "max_sample_size": 320000,
            "min_sample_size": 32000,
            "sample_rate": 16000,
            "labels": None,
        },
        "criterion": {"_name": "model", "log_keys": ["ema_decay", "target_var", "pred_var"]},
        "optimization": {"max_update": 400000, "lr": [0.0005], "update_freq": [1]},
        "optimizer": {"_name": "adam", "adam_betas": "(0.9,0.98)", "adam_eps": 1e-06, "weight_decay": 0.01},
        "lr_scheduler": {"_name": "tri_stage", "phase_ratio": [0.03, 0.9, 0.07]},
        "model": pretrain_model_cfg(config, **model_overrides),
    }


def finetune_cfg(config, normalize: bool = True, **model_overrides) -> dict:
    model = {
        "_name": "wav2vec_ctc",
        "w2v_path": "/ckpt/audio_base_ls.pt",
        "no_pretrained_weights": False,
        "dropout_input": 0.0,
        "final_dropout": 0.0,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.1,
        "apply_mask": True,
        "mask_length": 10,
        "mask_prob": 0.5,
        "mask_selection": "static",
        "mask_channel_length": 64,
        "mask_channel_prob": 0.1,
        "freeze_finetune_updates": 0,
        "feature_grad_mult": 0.0,
        "layerdrop": 0.05,
        "normalize": normalize,
        "data": "/data/librispeech",
        "w2v_args": pretrain_cfg(config, normalize=normalize),
    }
    model.update(model_overrides)
    return {
        "_name": None,
        "common": {"fp16": True, "log_format": "json", "seed": 1},
        "task": {"_name": "audio_finetuning", "data": "/data/librispeech", "normalize": normalize, "labels": "ltr"},
        "criterion": {"_name": "ctc", "zero_infinity": True},
        "optimization": {"max_update": 320000, "lr": [3e-05]},
        "model": model,
    }


def as_args(cfg: dict) -> argparse.Namespace:
    """The legacy flat `args` Namespace a cfg dict stood for (task + model fields, arch = model name)."""
    flat = {**cfg.get("task", {}), **cfg["model"]}
    flat["arch"] = flat.pop("_name")
    flat["task"] = cfg.get("task", {}).get("_name")
    if isinstance(flat.get("w2v_args"), dict):
        flat["w2v_args"] = as_args(flat["w2v_args"])
    return argparse.Namespace(**flat)


# ------------------------------------------------------------------------------ state dicts
def fairseq_state(model, ctc: bool, seed: int = 0, ema: bool = True) -> dict:
    """fairseq `model` state dict from a transformers model (through the inverted table)."""
    import torch

    from flax_d2v.convert.fairseq import hf_to_fairseq_key

    state = OrderedDict()
    for k, v in model.state_dict().items():
        fk = hf_to_fairseq_key(k)
        assert fk is not None, k
        state[fk] = v.detach().clone()
    if not ctc:
        g = torch.Generator().manual_seed(seed + 100)
        h = model.config.hidden_size
        state["final_proj.weight"] = torch.randn(h, h, generator=g) / h**0.5
        state["final_proj.bias"] = 0.1 * torch.randn(h, generator=g)
        if ema:  # EMAModule.fp32_params: the encoder's state dict, keys relative to the encoder
            state["_ema"] = OrderedDict(
                (k[len("encoder.") :], (v + 0.01 * torch.randn(v.shape, generator=g)).float())
                for k, v in state.items()
                if k.startswith("encoder.")
            )
    return state


class FairseqDictionary:
    """Pickles as `fairseq.data.dictionary.Dictionary` (the class a fine-tuned task_state holds)."""

    def __init__(self, symbols):
        self.bos_word, self.unk_word, self.pad_word, self.eos_word = "<s>", "<unk>", "<pad>", "</s>"
        self.symbols = list(symbols)
        self.count = [1] * len(symbols)
        self.indices = {s: i for i, s in enumerate(symbols)}
        self.bos_index, self.pad_index, self.eos_index, self.unk_index = 0, 1, 2, 3
        self.nspecial = 4


FairseqDictionary.__module__ = "fairseq.data.dictionary"
FairseqDictionary.__qualname__ = FairseqDictionary.__name__ = "Dictionary"


@contextlib.contextmanager
def fake_fairseq_modules():
    """Make `fairseq.data.dictionary.Dictionary` importable for pickle while saving a fixture."""
    names = ["fairseq", "fairseq.data", "fairseq.data.dictionary"]
    added = [n for n in names if n not in sys.modules]
    for n in added:
        sys.modules[n] = types.ModuleType(n)
    sys.modules["fairseq.data.dictionary"].Dictionary = FairseqDictionary
    try:
        yield
    finally:
        for n in added:
            del sys.modules[n]


def checkpoint(
    model,
    ctc: bool,
    style: str = "cfg",
    seed: int = 0,
    task_dictionary: bool = False,
    normalize: bool = True,
    ema: bool = True,
    **model_overrides,
) -> dict:
    """A whole fairseq checkpoint dict, as `Trainer.state_dict()` makes it."""
    import torch

    cfg = (finetune_cfg if ctc else pretrain_cfg)(model.config, normalize=normalize, **model_overrides)
    metrics = OrderedDict(
        train=[
            ("loss", 0, "AverageMeter", {"val": np.float64(1.25), "sum": np.float64(2.5), "count": 2, "round": 3}),
            ("wps", 90, "TimeMeter", {"init": 0, "n": np.float32(3.0), "round": 1}),
        ]
    )
    ckpt = {
        "args": as_args(cfg) if style == "args" else None,
        "cfg": cfg if style == "cfg" else None,
        "model": fairseq_state(model, ctc, seed, ema),
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "CtcCriterion" if ctc else "ModelCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": 0.5},
                "num_updates": 1234,
            }
        ],
        "task_state": {"target_dictionary": FairseqDictionary(FAIRSEQ_SPECIALS + LTR_SYMBOLS)}
        if task_dictionary
        else {},
        "extra_state": {
            "metrics": metrics,
            "previous_training_time": 3600.5,
            "train_iterator": {"epoch": 3, "iterations_in_epoch": 17, "shuffle": True},
            "best": np.array([0.5, 0.25]),
        },
        "last_optimizer_state": {
            "state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
            "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.98), "eps": 1e-6, "params": [0]}],
        },
    }
    return ckpt


def save_checkpoint(ckpt: dict, path: Path) -> Path:
    import torch

    with fake_fairseq_modules():
        torch.save(ckpt, path)
    return path


def write_dict_ltr(path: Path, symbols=tuple(LTR_SYMBOLS)) -> Path:
    """A fairseq dict.ltr.txt ("SYMBOL COUNT" per line, specials implicit)."""
    path.write_text("".join(f"{s} {1000 - i}\n" for i, s in enumerate(symbols)), encoding="utf-8")
    return path
