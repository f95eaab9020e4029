"""The flax-d2v checkpoint directory: what `d2v convert` writes and `from_pretrained` reads.

Layout (all files plain data; nothing is unpickled):

    config.json              HF-format config (same keys as transformers writes)
    flax_model.safetensors   the parameters, flat keys joined by "/" ("encoder/layers_0/...")
                             in the unscanned layout, float32
    flax_aux.safetensors     optional: what pretraining needs beyond the encoder
                             ("final_proj/...", "ema/..." the EMA teacher)
    preprocessor_config.json, vocab.json, tokenizer_config.json, special_tokens_map.json
                             copied as they came (the HF processor files), when present

Safetensors rather than msgpack: the same tensors can be memory-mapped, listed and checked key
by key, and the reader needs no Python object deserialisation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from flax_d2v.config import Data2VecAudioConfig
from flax_d2v.data2vec2 import read_config  # a 1.0 or a 2.0 (model_type "data2vec2-audio") config
from flax_d2v.errors import D2VError
from flax_d2v.fileio import atomic_dir
from flax_d2v.params import flatten, is_scanned, unflatten, unstack_layers
from flax_d2v.paths import AnyPath, as_path, localize
from flax_d2v.processor import copy_processor_files
from flax_d2v.types import PyTree

FLAX_WEIGHTS = "flax_model.safetensors"
FLAX_AUX = "flax_aux.safetensors"
CONFIG = "config.json"


def write_safetensors(path: Path, tree: PyTree) -> None:
    from safetensors.numpy import save_file

    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten(tree).items()}
    save_file(flat, os.fspath(path), metadata={"format": "flax-d2v"})


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file, with a one-line error naming the file if it is bad."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise D2VError(f"{path}: file not found")
    try:
        with safe_open(path, framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as e:
        raise D2VError(f"{path}: not a valid safetensors file (truncated or corrupt?): {e}") from None
    except TypeError as e:  # e.g. bfloat16, which NumPy cannot hold
        raise D2VError(f"{path}: unsupported tensor dtype for NumPy: {e}") from None


def save_flax(
    dst: str | os.PathLike,
    config: Data2VecAudioConfig,
    params: PyTree,
    *,
    aux: dict[str, Any] | None = None,
    files_from: str | os.PathLike | None = None,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
) -> AnyPath:
    """Write a flax-d2v checkpoint directory atomically (temporary dir, then rename; a URL: `fileio.atomic_dir`)."""
    params = jax_to_numpy(params)
    if is_scanned(params):
        params = unstack_layers(params)
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        (tmp / CONFIG).write_text(config.to_json_string(), encoding="utf-8")
        write_safetensors(tmp / FLAX_WEIGHTS, params)
        if aux:
            write_safetensors(tmp / FLAX_AUX, jax_to_numpy(aux))
        if files_from is not None:
            copy_processor_files(files_from, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return as_path(dst)


def load_flax(src: str | os.PathLike) -> tuple[Data2VecAudioConfig, dict[str, Any]]:
    """(config, params) of a flax-d2v checkpoint directory (a URL: its local copy)."""
    src = Path(localize(src))
    config = read_config(src / CONFIG)
    params = unflatten(read_safetensors(src / FLAX_WEIGHTS))
    return config, params


def load_flax_aux(src: str | os.PathLike) -> dict[str, Any] | None:
    """The pretraining extras (`final_proj`, `ema`) of a flax-d2v directory, or None."""
    path = Path(localize(src)) / FLAX_AUX
    return unflatten(read_safetensors(path)) if path.is_file() else None


def is_flax_dir(path: str | os.PathLike) -> bool:
    return (as_path(path) / FLAX_WEIGHTS).is_file()


def jax_to_numpy(tree: PyTree) -> PyTree:
    """Host copies of a (possibly sharded) parameter tree, as nested dicts of numpy arrays."""
    import jax

    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), dict(tree) if tree is not None else tree)
