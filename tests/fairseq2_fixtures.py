"""Fixture builders: fairseq-layout data2vec 2.0 (audio) checkpoints from the PyTorch rendering of fairseq's model.

`flax_d2v.convert.fairseq2_reference` renders fairseq's `Data2VecMultiModel` (audio) with fairseq's module
names, so its `state_dict()` is fairseq's; a checkpoint is then built as fairseq's `Trainer.state_dict()`
writes one: `cfg` (a plain dict), `model` (with `_ema`, the EMA teacher's fp32 params, and the decoder for
pretrained models; `w2v_encoder.w2v_model.*` + `w2v_encoder.proj` for CTC), `optimizer_history`,
`extra_state` and `task_state` (a CTC model's `Dictionary`).

Layouts keep the real head counts and block structure (base: 12 heads, no prenet; large: 16 heads,
prenet blocks) at narrow widths, so the tests run in seconds on CPU.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
from fairseq_fixtures import FAIRSEQ_SPECIALS, LTR_SYMBOLS, FairseqDictionary, save_checkpoint  # noqa: F401

SPEC = "[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32,2,2)] + [(32,2,2)]"
LAYOUTS = {
    # base_audio_only_task.yaml's structure: 12 heads, prenet_depth 0, 5 positional conv blocks
    "base": dict(embed_dim=48, depth=3, num_heads=12, prenet_depth=0, conv_pos_groups=4, conv_pos_width=25),
    # large_audio_only_task.yaml's: 16 heads, prenet blocks before the main blocks
    "large": dict(embed_dim=64, depth=2, num_heads=16, prenet_depth=2, conv_pos_groups=4, conv_pos_width=25),
    # base_audio_only_task.yaml at full size (slow tests): 768 wide, 12 blocks, the 512-channel conv stack
    "base-full": dict(
        embed_dim=768,
        depth=12,
        num_heads=12,
        prenet_depth=0,
        conv_pos_groups=16,
        conv_pos_width=95,
        feature_encoder_spec="[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
    ),
}


def model_cfg(layout: str = "base", **overrides) -> dict:
    """cfg.model of a data2vec_multi audio pretraining run (base_audio_only_task.yaml, narrowed)."""
    lay = dict(LAYOUTS[layout])
    audio = {
        "type": "AUDIO",
        "feature_encoder_spec": lay.pop("feature_encoder_spec", SPEC),
        "conv_pos_depth": 5,
        "conv_pos_width": lay.pop("conv_pos_width"),
        "conv_pos_groups": lay.pop("conv_pos_groups"),
        "prenet_depth": lay.pop("prenet_depth"),
        "mask_prob": 0.5,
        "mask_prob_adjust": 0.05,
        "inverse_mask": False,
        "mask_length": 5,
        "mask_noise_std": 0.01,
        "mask_dropout": 0.0,
        "add_masks": False,
        "ema_local_encoder": False,
        "use_alibi_encoder": True,
        "prenet_layerdrop": 0.05,
        "prenet_dropout": 0.1,
        "learned_alibi_scale": True,
        "learned_alibi_scale_per_head": True,
        "decoder": {
            "input_dropout": 0.1,
            "decoder_dim": 32,
            "decoder_groups": 4,
            "decoder_kernel": 7,
            "decoder_layers": 4,
        },
    }
    cfg = {
        "_name": "data2vec_multi",
        "loss_beta": 0.0,
        "loss_scale": None,
        "clone_batch": 8,
        "ema_decay": 0.999,
        "ema_end_decay": 0.99999,
        "ema_anneal_end_step": 75000,
        "ema_encoder_only": False,
        "average_top_k_layers": 2,
        "instance_norm_target_layer": True,
        "layer_norm_target_layer": False,
        "layer_norm_targets": False,
        "layerdrop": 0.05,
        "norm_eps": 1e-5,
        "supported_modality": "AUDIO",
        "mlp_ratio": 4.0,
        **lay,
        "modalities": {"audio": audio},
    }
    for k, v in overrides.items():
        if k in audio:
            audio[k] = v
        else:
            cfg[k] = v
    return cfg


def pretrain_cfg(layout: str = "base", **overrides) -> dict:
    return {
        "_name": None,
        "common": {"fp16": True, "seed": 1},
        "task": {
            "_name": "audio_pretraining",
            "data": "/data/librispeech",
            "normalize": True,
            "max_sample_size": 320000,
            "min_sample_size": 32000,
            "precompute_mask_config": {},
        },
        "criterion": {"_name": "model", "log_keys": ["ema_decay", "target_var", "pred_var"]},
        "optimization": {"max_update": 400000, "lr": [0.00075]},
        "optimizer": {"_name": "adam", "adam_betas": [0.9, 0.98], "adam_eps": 1e-06, "weight_decay": 0.01},
        "lr_scheduler": {"_name": "cosine", "warmup_updates": 8000},
        "model": model_cfg(layout, **overrides),
    }


def finetune_cfg(layout: str = "base", **overrides) -> dict:
    model = {
        "_name": "wav2vec_ctc",
        "w2v_path": "/ckpt/base_libri.pt",
        "apply_mask": True,
        "mask_prob": 0.65,
        "mask_length": 10,
        "mask_channel_prob": 0.25,
        "mask_channel_length": 64,
        "layerdrop": 0.1,
        "activation_dropout": 0.1,
        "feature_grad_mult": 0.0,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "final_dropout": 0.0,
        "normalize": True,
        "w2v_args": pretrain_cfg(layout, **overrides),
    }
    return {
        "_name": None,
        "common": {"fp16": True, "seed": 1},
        "task": {"_name": "audio_finetuning", "data": "/data/librispeech", "normalize": True, "labels": "ltr"},
        "criterion": {"_name": "ctc", "zero_infinity": True},
        "optimization": {"max_update": 320000},
        "model": model,
    }


def perturb(model, seed: int, negative_head: int = 3):
    """Non-trivial LayerNorms, biases and alibi_scale (one head's scale negative, so the clamp at 0 matters)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alibi_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
                p[:, :, negative_head] = -0.7
            elif p.ndim == 1:
                base = (
                    1.0
                    if ("norm" in name or ".2.1." in name or "project_features.1" in name) and name.endswith("weight")
                    else 0.0
                )
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model


def reference_models(layout: str = "base", seed: int = 0, **overrides):
    """(cfg.model, student, EMA teacher) as PyTorch reference models with perturbed parameters."""
    import torch

    from flax_d2v.convert import fairseq2_reference as R

    cfg = model_cfg(layout, **overrides)
    torch.manual_seed(seed)
    student = perturb(R.build(cfg), seed)
    teacher = R.build(cfg, teacher=True)
    state = {k: v for k, v in student.state_dict().items() if k in teacher.state_dict()}
    g = torch.Generator().manual_seed(seed + 7)
    teacher.load_state_dict({k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in state.items()})
    with torch.no_grad():  # keep the teacher's negative head negative
        teacher.modality_encoders["AUDIO"].alibi_scale[:, :, 3] = -0.4
    return cfg, student, teacher


def pretrained_checkpoint(layout: str = "base", seed: int = 0, ema: bool = True, **overrides):
    """(checkpoint dict, student, teacher) of a fairseq data2vec 2.0 pretraining run."""
    cfg, student, teacher = reference_models(layout, seed, **overrides)
    state = OrderedDict((k, v.detach().clone()) for k, v in student.state_dict().items())
    if ema:
        state["_ema"] = OrderedDict((k, v.detach().clone().float()) for k, v in teacher.state_dict().items())
    full = pretrain_cfg(layout, **overrides)
    full["model"] = cfg
    ckpt = {
        "cfg": full,
        "args": None,
        "model": state,
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "ModelCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": None},
                "num_updates": 4321,
            }
        ],
        "task_state": {},
        "extra_state": {"metrics": {}, "previous_training_time": 12.5, "best": np.array([0.5])},
        "last_optimizer_state": None,
    }
    return ckpt, student, teacher


def ctc_checkpoint(layout: str = "base", seed: int = 0, task_dictionary: bool = True, **overrides):
    """(checkpoint dict, encoder reference model, proj weight, proj bias) of a fine-tuned wav2vec_ctc on 2.0."""
    import torch

    cfg, student, _ = reference_models(layout, seed, **overrides)
    d = cfg["embed_dim"]
    vocab = len(FAIRSEQ_SPECIALS) + len(LTR_SYMBOLS)
    g = torch.Generator().manual_seed(seed + 11)
    w, b = torch.randn(vocab, d, generator=g) / d**0.5, 0.1 * torch.randn(vocab, generator=g)
    state = OrderedDict(
        (f"w2v_encoder.w2v_model.{k}", v.detach().clone())
        for k, v in student.state_dict().items()
        if ".decoder." not in k
    )
    state["w2v_encoder.proj.weight"], state["w2v_encoder.proj.bias"] = w, b
    full = finetune_cfg(layout, **overrides)
    ckpt = {
        "cfg": full,
        "args": None,
        "model": state,
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "CtcCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {},
                "num_updates": 20000,
            }
        ],
        "task_state": {"target_dictionary": FairseqDictionary(FAIRSEQ_SPECIALS + LTR_SYMBOLS)}
        if task_dictionary
        else {},
        "extra_state": {},
        "last_optimizer_state": None,
    }
    return ckpt, student, w, b


def clone(ckpt):
    return copy.deepcopy(ckpt)
