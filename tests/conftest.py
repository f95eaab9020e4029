"""Shared fixtures: where the real speech lives, and small transformers checkpoints on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_speech_dir() -> Path | None:
    """../shared/speech beside the checkout, or $D2V_SHARED_SPEECH."""
    env = os.environ.get("D2V_SHARED_SPEECH")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "speech", REPO / "shared" / "speech"]
    return next((c for c in candidates if (c / "transcripts.tsv").is_file()), None)


@pytest.fixture(scope="session")
def speech_dir() -> Path:
    d = find_speech_dir()
    if d is None:
        pytest.skip("../shared/speech not found (set D2V_SHARED_SPEECH)")
    return d


def tiny_hf_kwargs(**overrides):
    """A small transformers Data2VecAudioConfig: same structure as base, few narrow layers."""
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              conv_dim=(32,) * 7, num_conv_pos_embedding_groups=4, conv_pos_kernel_size=5,
              num_conv_pos_embeddings=2, vocab_size=32)
    kw.update(overrides)
    return kw


def perturb_layer_norms(model, seed: int = 0) -> None:
    """Move every LayerNorm (and zero-initialised bias) away from identity so parity tests see them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))

