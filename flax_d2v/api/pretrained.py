"""`from_pretrained`: one entry point for every checkpoint a user may hold.

    module, params = flax_d2v.from_pretrained(path)

`path` is a flax-d2v directory (`flax_model.safetensors`), a transformers directory
(`model.safetensors` or `pytorch_model.bin`), a fairseq `.pt` file, or a hub id such as
`facebook/data2vec-audio-base-960h` (downloaded with `huggingface_hub`; fails with a clear message
when offline). The module is the checkpoint's head, looked up in `flax_d2v.heads.REGISTRY`
(`Data2VecAudioModel`, `...ForCTC`, `...ForSequenceClassification`, `...ForAudioFrameClassification`,
`...ForXVector`). Module options (`dtype`, `scan_layers`, `remat_policy`,
`freeze_feature_encoder`, and `freeze_base_model` for the classification heads) are passed through;
with `scan_layers=True` the params come stacked.

`load_model` is the same loading for `Transcriber` and `Classifier`: a path or a `(module, params)` tuple,
with the model directory and its `preprocessor_config.json` settings that inference needs beside them.
This module is the api layer (ARCHITECTURE.md): it reads every format, so it sits above `convert`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from flax_d2v.api.teacher import teacher_params
from flax_d2v.checkpoint import is_flax_dir, load_flax
from flax_d2v.config import Data2VecAudioConfig
from flax_d2v.convert import fairseq
from flax_d2v.convert.hf import is_hf_dir, load_hf
from flax_d2v.data2vec2 import Data2Vec2Config, build_module_v2
from flax_d2v.errors import D2VError
from flax_d2v.heads import REGISTRY, HeadSpec, detect, get_spec
from flax_d2v.params import stack_layers
from flax_d2v.paths import localize
from flax_d2v.precision import resolve
from flax_d2v.processor import PreprocessorConfig, read_preprocessor_config
from flax_d2v.types import PyTree

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["config.json", "*.safetensors", "*.json", "pytorch_model.bin", "*.txt", "language_model/*"]


def build_module(config: Data2VecAudioConfig, head: HeadSpec | str, **module_kwargs: Any) -> nn.Module:
    """The module of `head` (a `HeadSpec` or a transformers architecture name) for `config`."""
    spec = get_spec(head)
    if isinstance(config, Data2Vec2Config):
        return build_module_v2(config, spec.architecture, **module_kwargs)
    return spec.build(config, **module_kwargs)


def load_any(path: str | os.PathLike) -> tuple[Data2VecAudioConfig, HeadSpec, dict[str, Any], str]:
    """(config, head spec, unscanned params, resolved local directory or file) for any supported source.

    A URL (`gs://bucket/model`) is downloaded first (`paths.localize`): safetensors memory-maps and
    torch opens local files only."""
    p = Path(localize(path))
    if p.is_dir():
        if is_flax_dir(p):
            config, params = load_flax(p)
            return config, detect(params), params, str(p)
        if is_hf_dir(p):
            config, spec, params = load_hf(p)
            return config, spec, params, str(p)
        if not (p / "config.json").is_file():
            raise D2VError(f"{p}: config.json not found (not a flax-d2v or transformers model directory)")
        raise D2VError(
            f"{p}: no weights found (expected flax_model.safetensors, model.safetensors or pytorch_model.bin)"
        )
    if p.is_file():
        if p.suffix == ".pt":
            config, is_ctc, params = fairseq.load_fairseq(p)[:3]
            return config, REGISTRY["Data2VecAudioForCTC" if is_ctc else "Data2VecAudioModel"], params, str(p)
        raise D2VError(f"{p}: expected a model directory or a fairseq .pt file")
    if HUB_ID.match(str(path)) and not str(path).startswith((".", "/")):
        return load_any(download_from_hub(str(path)))
    raise D2VError(f"{path}: no such file or directory")


def download_from_hub(repo_id: str) -> str:
    """Local snapshot of a hub repo; a clear error when the hub cannot be reached."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise D2VError(
            f"{repo_id}: looks like a hub id, but huggingface_hub is not installed "
            "(pip install huggingface_hub), or pass a local directory"
        ) from None
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except Exception as e:  # noqa: BLE001 - any network/auth failure gets the same advice
        raise D2VError(
            f"{repo_id}: could not download from the Hugging Face hub ({type(e).__name__}); "
            "are you offline? Download the model elsewhere and pass its directory"
        ) from None


def precision_kwargs(precision: str | None, dtype: Any = None) -> dict[str, Any]:
    """Module `dtype` and `precision` from a policy name (`flax_d2v.precision`).

    `precision=None` keeps the older `dtype=` spelling working: bfloat16 means the `bf16` policy,
    anything else `highest`. A policy and a contradicting dtype together are refused.
    """
    if precision is None:
        precision = "bf16" if dtype is not None and jnp.dtype(dtype) == jnp.bfloat16 else "highest"
    policy = resolve(precision)
    if dtype is not None and jnp.dtype(dtype) != jnp.dtype(policy.dtype):
        raise D2VError(
            f"dtype={jnp.dtype(dtype).name} contradicts precision={policy.name!r} "
            f"(which computes in {jnp.dtype(policy.dtype).name}); pass one of them"
        )
    return policy.module_kwargs()


class LoadedModel(NamedTuple):
    """A model ready to run and where it came from: what `load_model` returns."""

    module: nn.Module
    params: PyTree
    where: str  # the resolved local directory or file (a hub id's snapshot), or "model" for (module, params)
    model_dir: Path | None  # the directory holding its processor files; None for a (module, params) tuple
    preprocessor: PreprocessorConfig  # its preprocessor_config.json, or the defaults


def load_model(model_or_path: Any, precision: str | None = None) -> LoadedModel:
    """The model of `d2v transcribe`/`classify` (`Transcriber`, `Classifier`): a path (any format
    `load_any` reads, or a hub id) or an already built `(module, params)` tuple.

    `precision` is a `flax_d2v.precision` policy for a loaded module; None leaves the module's defaults.
    A tuple comes back as it is, with no model directory and the default preprocessor settings.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        config, spec, params, where = load_any(model_or_path)
        module = build_module(config, spec, **(precision_kwargs(precision) if precision is not None else {}))
        model_dir = Path(where) if Path(where).is_dir() else Path(where).parent
        return LoadedModel(module, params, where, model_dir, read_preprocessor_config(model_dir))
    try:
        module, params = model_or_path
    except (TypeError, ValueError):
        raise D2VError("model: expected a path or a (module, params) tuple") from None
    return LoadedModel(module, params, "model", None, PreprocessorConfig())


def from_pretrained(
    path: str | os.PathLike,
    *,
    precision: str | None = None,
    dtype: Any = None,
    scan_layers: bool = False,
    remat_policy: str = "none",
    freeze_feature_encoder: bool = False,
    teacher: bool = False,
    **head_kwargs: Any,
) -> tuple[nn.Module, PyTree]:
    """(module, params) ready for `module.apply({"params": params}, input_values, ...)`.

    `precision` is a `flax_d2v.precision` policy: "highest" (the default: float32 with HIGHEST
    matmul/conv precision, the numbers PyTorch's fp32 gives), "default" (float32 at the platform's
    default precision: TF32 on GPUs, bf16 passes on TPUs) or "bf16". It is a field of the module,
    so the result never depends on the global `jax_default_matmul_precision` flag.

    `head_kwargs`: `freeze_base_model=True` for the classification and x-vector heads.
    `teacher=True`: the pretraining checkpoint's EMA teacher instead of the student, as a runnable model
    (its own encoder over the student's conv feature extractor and feature projection), 1.0 and 2.0.
    """
    config, spec, params, resolved = load_any(path)
    if teacher:
        params = teacher_params(config, spec.architecture == "Data2VecAudioForCTC", params, resolved)
    module = build_module(
        config,
        spec,
        **precision_kwargs(precision, dtype),
        scan_layers=scan_layers,
        remat_policy=remat_policy,
        freeze_feature_encoder=freeze_feature_encoder,
        **head_kwargs,
    )
    if scan_layers:
        params = stack_layers(params)
    return module, params
