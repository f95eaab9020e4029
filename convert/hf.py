"""transformers checkpoints <-> Flax parameters, through the one key table in `keys.py`.

Reads an HF directory (`config.json` + `model.safetensors`, a sharded `.safetensors` index, or a
legacy `pytorch_model.bin` loaded with `torch.load(weights_only=True)`), checks every key and
shape against the Flax model that the config describes, and writes HF directories back that
`transformers` loads with no missing, unexpected or mismatched keys.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flax_d2v.checkpoint import jax_to_numpy, read_safetensors
from flax_d2v.config import Data2VecAudioConfig
from flax_d2v.convert.keys import CTC_PREFIX_HF, flax_to_hf_key, hf_to_flax_key, to_flax_array, to_hf_array
from flax_d2v.errors import D2VError
from flax_d2v.fileio import atomic_dir
from flax_d2v.heads import BASE, detect
from flax_d2v.modeling import param_shapes
from flax_d2v.params import flatten, is_scanned, unflatten, unstack_layers
from flax_d2v.paths import AnyPath, as_path, localize
from flax_d2v.processor import PROCESSOR_FILES, copy_processor_files, save_preprocessor_config
from flax_d2v.types import PyTree

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"


def is_hf_dir(path: str | os.PathLike) -> bool:
    p = as_path(path)
    return any((p / n).is_file() for n in (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_BIN_INDEX))


def _refusal_reason(message: str) -> str:
    """The useful part of torch's weights_only refusal: which global the pickle wanted."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    if m and m.group(1).startswith("omegaconf."):
        return (
            f"its config is pickled as {m.group(1)!r} objects (fairseq before March 2021), which are not "
            "loaded; re-save it with a fairseq that stores cfg as a plain dict"
        )
    if m:
        return f"it asks for the global {m.group(1)!r}, which is not plain checkpoint data"
    lines = [ln.strip() for ln in message.splitlines() if re.search(r"[Uu]nsupported|unrecognized|blocked", ln)]
    return lines[0] if lines else "it holds objects other than tensors and plain containers"


def load_torch_file(path: str | os.PathLike, allowed_globals: Sequence[Any] = ()) -> Any:
    """A torch pickle read with `weights_only=True`: plain tensors and containers only, no code runs.

    `allowed_globals` extends torch's allow-list (`torch.serialization.safe_globals`), e.g. the
    plain types a fairseq checkpoint holds. A pickle asking for anything else is refused with a
    one-line `D2VError` naming the file and the global.
    """
    try:
        import torch
    except ImportError:
        raise D2VError(
            f"{path}: reading a PyTorch .bin/.pt file needs PyTorch (pip install 'flax-d2v[torch]')"
        ) from None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise D2VError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path) and "GLOBAL" not in str(e):  # not torch's format at all: garbage
            raise D2VError(f"{path}: not a readable PyTorch file (truncated or corrupt?)") from None
        raise D2VError(f"{path}: refused to load: {_refusal_reason(str(e))}; nothing in it was run") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise D2VError(f"{path}: not a readable PyTorch file (truncated or corrupt?): {msg}") from None


def tensor_to_numpy(value: Any, key: str, source: str) -> np.ndarray:
    """A loaded tensor as a NumPy array; fp16/bf16/fp64 become fp32 (exact for the half formats)."""
    if isinstance(value, np.ndarray):
        return value
    import torch  # load_torch_file already needed it

    if not isinstance(value, torch.Tensor):
        raise D2VError(f"{source}: key {key!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    if value.is_floating_point() and value.dtype != torch.float32:
        value = value.float()
    return value.numpy()


def read_hf_state_dict(model_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
    """(state dict as numpy arrays, the file it came from) of an HF model directory."""
    d = Path(model_dir)
    if (d / SAFETENSORS).is_file():
        return read_safetensors(d / SAFETENSORS), str(d / SAFETENSORS)
    for index_name, reader in ((SAFETENSORS_INDEX, read_safetensors), (PYTORCH_BIN_INDEX, None)):
        if (d / index_name).is_file():
            try:
                index = json.loads((d / index_name).read_text(encoding="utf-8"))
                shards = sorted(set(index["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise D2VError(f"{d / index_name}: not a valid weight index ({e})") from None
            state: dict[str, np.ndarray] = {}
            for shard in shards:
                part = reader(d / shard) if reader else load_torch_file(d / shard)
                state.update({k: tensor_to_numpy(v, k, str(d / shard)) for k, v in part.items()})
            return state, str(d / index_name)
    if (d / PYTORCH_BIN).is_file():
        raw = load_torch_file(d / PYTORCH_BIN)
        if not isinstance(raw, dict):
            raise D2VError(f"{d / PYTORCH_BIN}: expected a state dict, found {type(raw).__name__}")
        return {k: tensor_to_numpy(v, k, str(d / PYTORCH_BIN)) for k, v in raw.items()}, str(d / PYTORCH_BIN)
    raise D2VError(f"{d}: no model weights found (expected {SAFETENSORS} or {PYTORCH_BIN})")


def state_dict_to_flax(
    state: dict[str, np.ndarray], config: Data2VecAudioConfig, source: str
) -> tuple[Any, dict[str, Any]]:
    """(head spec, Flax params) from an HF state dict; every key and shape checked against the config.

    The head is told by the keys (`flax_d2v.heads.detect`): `lm_head` is CTC, `tdnn.0` x-vectors,
    `projector` + `classifier` sequence classification, `classifier` alone frame classification.
    """
    top = {p.split("/")[0] for p in (m[0] for m in map(hf_to_flax_key, state) if m is not None)}
    spec = detect(top)
    if spec is BASE and state and all(k.startswith(CTC_PREFIX_HF) for k in state):
        state = {k[len(CTC_PREFIX_HF) :]: v for k, v in state.items()}  # encoder saved from a wrapper model
    try:
        module = spec.build(config)
        expected = flatten(param_shapes(module))
    except ValueError as e:  # a config the head cannot be built with (e.g. the adapter on a classifier)
        raise D2VError(f"{source}: {spec.architecture}: {e}") from None
    params: dict[str, np.ndarray] = {}
    for key, value in state.items():
        mapped = hf_to_flax_key(key)
        if mapped is None:
            raise D2VError(f"{source}: unexpected key {key!r}: not a data2vec-audio parameter")
        path, kind = mapped
        if path not in expected:
            raise D2VError(
                f"{source}: unexpected key {key!r}: the model in config.json ({spec.architecture}) "
                "has no such parameter"
            )
        want_hf = to_hf_array(np.empty(expected[path].shape, np.int8), kind).shape
        if tuple(value.shape) != tuple(want_hf):
            raise D2VError(
                f"{source}: key {key!r} has shape {tuple(value.shape)}, expected {tuple(want_hf)} from config.json"
            )
        arr = to_flax_array(value, kind)
        params[path] = arr if arr.dtype == np.float32 else arr.astype(np.float32)
    missing = sorted(set(expected) - set(params))
    if missing:
        hf_key = flax_to_hf_key(missing[0])
        name = hf_key[0] if hf_key else missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise D2VError(f"{source}: missing key {name!r}{more}")
    return spec, unflatten(params)


def load_hf(model_dir: str | os.PathLike) -> tuple[Data2VecAudioConfig, Any, dict[str, Any]]:
    """(config, head spec, params) of an HF data2vec-audio directory (a URL: its local copy)."""
    d = Path(localize(model_dir))
    config = Data2VecAudioConfig.from_json_file(d / "config.json")
    state, source = read_hf_state_dict(d)
    spec, params = state_dict_to_flax(state, config, source)
    return config, spec, params


def flax_to_state_dict(params: PyTree) -> dict[str, np.ndarray]:
    """HF state dict (numpy, HF layouts) from Flax params (scanned or not)."""
    params = jax_to_numpy(params)
    if is_scanned(params):
        params = unstack_layers(params)
    state = {}
    for path, value in flatten(params).items():
        mapped = flax_to_hf_key(path)
        if mapped is None:
            raise D2VError(f"Flax parameter {path!r} has no transformers counterpart")
        key, kind = mapped
        state[key] = to_hf_array(np.asarray(value), kind)
    return state


def hf_config_dict(config: Data2VecAudioConfig, architecture: str) -> dict[str, Any]:
    out = config.to_dict()
    out["architectures"] = [architecture]
    return out


def save_hf(
    dst: str | os.PathLike,
    config: Data2VecAudioConfig,
    params: PyTree,
    *,
    files_from: str | os.PathLike | None = None,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
) -> AnyPath:
    """Write an HF directory (config.json, model.safetensors, preprocessor_config.json, vocab files).

    `files_from`: a directory whose processor/tokenizer files are copied; a default
    `preprocessor_config.json` (HF normalisation on) is written when none is given.
    """
    from safetensors.numpy import save_file

    state = flax_to_state_dict(params)
    architecture = detect(params).architecture  # the top-level names tell the head
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        save_file(
            {k: np.ascontiguousarray(v) for k, v in state.items()},
            os.fspath(tmp / SAFETENSORS),
            metadata={"format": "pt"},
        )
        config_text = json.dumps(hf_config_dict(config, architecture), indent=2, sort_keys=True) + "\n"
        (tmp / "config.json").write_text(config_text, encoding="utf-8")
        if files_from is not None:
            copy_processor_files(files_from, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if not (tmp / "preprocessor_config.json").exists():
            save_preprocessor_config(tmp)
    return as_path(dst)


__all__ = [
    "PROCESSOR_FILES",
    "flax_to_state_dict",
    "is_hf_dir",
    "load_hf",
    "load_torch_file",
    "read_hf_state_dict",
    "save_hf",
    "state_dict_to_flax",
    "tensor_to_numpy",
]
