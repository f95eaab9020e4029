"""Parameter-tree utilities: the pure pytree helpers every layer uses on our Flax params.

Core (no project imports beyond the standard library and NumPy), so the checkpoint reader, the
converters, `from_pretrained` and training all share them without importing `convert`:

- `flatten` / `unflatten`: nested dicts <-> flat "a/b/c" keys (the safetensors layout);
- `stack_layers` / `unstack_layers` / `is_scanned`: the per-layer (`encoder/layers_N/...`) layout that
  checkpoints hold <-> the scanned layout (`encoder/layers/layer/...`, leading axis N) that
  `scan_layers=True` modules use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b": x} -> {"a": {"b": x}}."""
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


# ---------------------------------------------------------------- scanned layout
_LAYER_RE = re.compile(r"^(?P<pre>(?:data2vec_audio/)?encoder/)layers_(?P<n>\d+)/(?P<rest>.*)$")
_SCANNED_RE = re.compile(r"^(?P<pre>(?:data2vec_audio/)?encoder/)layers/layer/(?P<rest>.*)$")


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """Unscanned (`encoder/layers_N/...`) -> scanned (`encoder/layers/layer/...`, leading axis N)."""
    flat = flatten(params)
    out: dict[str, Any] = {}
    groups: dict[str, dict[int, Any]] = {}
    for path, v in flat.items():
        m = _LAYER_RE.match(path)
        if m:
            groups.setdefault(f"{m['pre']}layers/layer/{m['rest']}", {})[int(m["n"])] = v
        else:
            out[path] = v
    for path, by_index in groups.items():
        out[path] = np.stack([np.asarray(by_index[i]) for i in range(len(by_index))])
    return unflatten(out)


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """Scanned -> unscanned (inverse of `stack_layers`)."""
    out: dict[str, Any] = {}
    for path, v in flatten(params).items():
        m = _SCANNED_RE.match(path)
        if m:
            for i in range(v.shape[0]):
                out[f"{m['pre']}layers_{i}/{m['rest']}"] = np.asarray(v[i])
        else:
            out[path] = v
    return unflatten(out)


def is_scanned(params: Mapping[str, Any]) -> bool:
    return any(_SCANNED_RE.match(p) for p in flatten(params))
