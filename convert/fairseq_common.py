"""What the data2vec 1.0 (`fairseq.py`) and 2.0 (`fairseq2.py`) converters share: the `.pt` itself.

Reading a fairseq checkpoint without running its code (`read_fairseq_file`: `torch.load(weights_only=True)`
with a short allow-list, see `fairseq.py`'s docstring), its `conv_feature_layers` spec without `eval`,
its dictionary as transformers' `vocab.json`, and the `FairseqCheckpoint` both converters return.
A module of its own so that `fairseq.py` (which hands 2.0 checkpoints to `fairseq2.py`) and
`fairseq2.py` (which uses these readers) import one way.
"""

from __future__ import annotations

import argparse
import ast
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from flax_d2v.config import Data2VecAudioConfig
from flax_d2v.convert.hf import load_torch_file
from flax_d2v.errors import D2VError

FAIRSEQ_NORMALIZE_EPS = 1e-5  # torch.nn.functional.layer_norm's default, used by fairseq's audio datasets
FAIRSEQ_CFG_FILE = "fairseq_cfg.json"  # the checkpoint's cfg (and update count) as JSON, for provenance/resuming


# ------------------------------------------------------------------------------------ safe reading
class DictionaryState:
    """Inert stand-in for a pickled `fairseq.data.dictionary.Dictionary`: only its attributes.

    The unpickler creates it with `object.__new__` and fills `__dict__` (symbols, indices,
    bos/pad/eos/unk words and indices); none of fairseq's code exists or runs.
    """

    symbols: list[str]


def _allowed_globals() -> list[Any]:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core -> numpy._core
    scalar, reconstruct = core.multiarray.scalar, core.multiarray._reconstruct
    allowed: list[Any] = [
        argparse.Namespace,
        (DictionaryState, "fairseq.data.dictionary.Dictionary"),
        np.ndarray,
        np.dtype,
    ]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # pickles from numpy 1.x and 2.x
        allowed += [(scalar, f"{mod}.scalar"), (reconstruct, f"{mod}._reconstruct")]
    allowed += [
        (type(np.dtype(t)), f"numpy.dtypes.{type(np.dtype(t)).__name__}")
        for t in ("f2", "f4", "f8", "i4", "i8", "u1", "b1")
    ]
    return allowed


def read_fairseq_file(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict of a fairseq `.pt`, unpickled with `weights_only=True` and the allow-list."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise D2VError(f"{path}: reading a fairseq .pt needs PyTorch (pip install 'flax-d2v[torch]')") from None
    ckpt = load_torch_file(path, _allowed_globals())
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), Mapping):
        raise D2VError(f"{path}: not a fairseq checkpoint (expected a dict with a 'model' state dict)")
    return ckpt


MAX_CONV_LAYERS = 64


def parse_conv_layers(spec: str, source: str = "conv_feature_layers") -> list[tuple[int, int, int]]:
    """fairseq's `conv_feature_layers` string, e.g. "[(512, 10, 5)] + [(512, 3, 2)] * 4", without eval.

    Only literal ints, lists and tuples, `+` and `*` are accepted, so the string can never run code.
    """

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add) and type(a) is type(b):
                return a + b
            if isinstance(node.op, ast.Mult):
                seq, n = (a, b) if isinstance(b, int) else (b, a)
                if isinstance(n, int) and (isinstance(seq, int) or 0 <= n <= MAX_CONV_LAYERS):
                    return seq * n
        raise D2VError(f"{source}: {spec!r} is not a literal list of (dim, kernel, stride) tuples")

    try:
        tree = ast.parse(str(spec).strip(), mode="eval")
    except SyntaxError:
        raise D2VError(f"{source}: {spec!r} is not a literal list of (dim, kernel, stride) tuples") from None
    layers = ev(tree)
    ok = (
        isinstance(layers, list)
        and 0 < len(layers) <= MAX_CONV_LAYERS
        and all(isinstance(t, tuple) and len(t) == 3 and all(isinstance(v, int) and v > 0 for v in t) for t in layers)
    )
    if not ok:
        raise D2VError(f"{source}: {spec!r} must be a list of (dim, kernel, stride) tuples of positive ints")
    return layers


def _plain(obj: Any) -> dict[str, Any]:
    """A cfg section (a dict, an old checkpoint's `argparse.Namespace`, or None) as a plain dict."""
    if obj is None:
        return {}
    if isinstance(obj, argparse.Namespace):
        return dict(vars(obj))
    if isinstance(obj, Mapping):
        return dict(obj)
    raise D2VError(f"config: expected a dict or argparse.Namespace, found {type(obj).__name__}")


# ------------------------------------------------------------------------------------ vocabulary
def read_dictionary(path: str | os.PathLike) -> list[str]:
    """Symbols of a fairseq `dict.*.txt` in fairseq's order: `<s> <pad> </s> <unk>`, then the file's lines."""
    symbols = ["<s>", "<pad>", "</s>", "<unk>"]
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise D2VError(f"{path}: cannot read the dictionary ({e})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.rstrip().rsplit(" ", 1)
        overwrite = len(parts) == 2 and parts[1] == "#fairseq:overwrite"
        if overwrite:
            parts = parts[0].rsplit(" ", 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise D2VError(f"{path}:{i}: expected 'SYMBOL COUNT', found {line!r}")
        if parts[0] in symbols and not overwrite:
            raise D2VError(f"{path}:{i}: duplicate symbol {parts[0]!r}")
        if parts[0] not in symbols:
            symbols.append(parts[0])
    return symbols


def hf_vocab(symbols: list[str], source: str) -> dict[str, int]:
    """transformers' vocab.json from fairseq symbols: `<s>` and `<pad>` swap ids, rows stay where they are.

    fairseq's CTC blank is `<s>` (row 0 of `w2v_encoder.proj`); transformers' is `pad_token_id`. Like
    transformers' wav2vec2/data2vec converters, the labels are swapped and the head's rows are not.
    """
    vocab = {s: i for i, s in enumerate(symbols)}
    if len(vocab) != len(symbols):
        raise D2VError(f"{source}: the dictionary has duplicate symbols")
    if "<s>" not in vocab or "<pad>" not in vocab:
        raise D2VError(f"{source}: the dictionary has no '<s>'/'<pad>' symbols")
    vocab["<s>"], vocab["<pad>"] = vocab["<pad>"], vocab["<s>"]
    return dict(sorted(vocab.items(), key=lambda kv: kv[1]))


def _find_symbols(
    pt_path: Path, dict_path: str | os.PathLike | None, ckpt: Mapping[str, Any]
) -> tuple[list[str] | None, str]:
    if dict_path is not None:
        return read_dictionary(dict_path), str(dict_path)
    beside = pt_path.parent / "dict.ltr.txt"
    if beside.is_file():
        return read_dictionary(beside), str(beside)
    state = ckpt.get("task_state")
    d = state.get("target_dictionary") if isinstance(state, Mapping) else None
    if isinstance(d, DictionaryState) and isinstance(getattr(d, "symbols", None), list):
        return [str(s) for s in d.symbols], f"{pt_path}: task_state.target_dictionary"
    return None, ""


# ------------------------------------------------------------------------------------ result
class FairseqCheckpoint(NamedTuple):
    """What a fairseq `.pt` holds, in flax-d2v terms. `[:3]` is `(config, is_ctc, params)`."""

    config: Data2VecAudioConfig
    is_ctc: bool
    params: dict[str, Any]
    aux: dict[str, Any]  # {"final_proj": {"kernel", "bias"}, "ema": <encoder subtree>} (pretrained only)
    preprocessor: dict[str, Any]  # preprocessor_config.json
    vocab: dict[str, int] | None  # HF vocab.json (CTC with a dictionary), else None
    notes: list[str]  # one line each: what was dropped or filled in
    cfg: dict[str, Any]  # the checkpoint's cfg/args and update count, JSON-safe (fairseq_cfg.json)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    return repr(obj)
