"""Shared fixtures: where the real speech lives, and small transformers checkpoints on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The peak RSS of a subprocess, as a Python expression its script evaluates (bytes; Linux): VmHWM, the peak of its
# own memory map. Not `getrusage(RUSAGE_SELF).ru_maxrss`: exec folds the forking process's peak into it, so a child
# of a pytest process that once held 10 GiB reports 10 GiB (seen: a 3.7 GiB `d2v convert` measured 10.3).
PEAK_RSS_EXPR = "int(next(x for x in open('/proc/self/status') if x.startswith('VmHWM')).split()[1]) * 1024"

# Commands run in-process turn on JAX's persistent compilation cache (flax_d2v/compile_cache.py);
# the suite keeps its compiles in memory and writes nothing under the user's home.
os.environ.setdefault("D2V_COMPILATION_CACHE", "off")


def find_speech_dir() -> Path | None:
    """$D2V_SHARED_SPEECH when set (and then only it), else ../shared/speech beside the checkout."""
    env = os.environ.get("D2V_SHARED_SPEECH")
    candidates = [Path(env)] if env else [REPO.parent / "shared" / "speech", REPO / "shared" / "speech"]
    return next((c for c in candidates if (c / "transcripts.tsv").is_file()), None)


def under_ci() -> bool:
    """`CI` set to a true value (GitHub Actions, GitLab and most CI services set CI=true)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


@pytest.fixture(scope="session")
def speech_dir() -> Path:
    """The real recordings. Missing: a skip on a developer's machine, a failure under CI, where a
    silently skipped parity or resume test would pass a run that checked nothing."""
    d = find_speech_dir()
    if d is None:
        where = os.environ.get("D2V_SHARED_SPEECH") or str(REPO.parent / "shared" / "speech")
        message = f"{where}: no transcripts.tsv (the real speech; set D2V_SHARED_SPEECH)"
        if under_ci():
            pytest.fail(f"{message}; CI is set, so the tests that need it fail instead of skipping", pytrace=False)
        pytest.skip(message)
    return d


def tiny_hf_kwargs(**overrides):
    """A small transformers Data2VecAudioConfig: same structure as base, few narrow layers."""
    kw = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        conv_dim=(32,) * 7,
        num_conv_pos_embedding_groups=4,
        conv_pos_kernel_size=5,
        num_conv_pos_embeddings=2,
        vocab_size=32,
    )
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
