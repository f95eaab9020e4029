"""The EMA teacher of a pretraining checkpoint as a runnable model (`from_pretrained(path, teacher=True)`).

fairseq keeps the teacher beside the student: 1.0's `_ema` is the transformer encoder (positional conv,
LayerNorm, layers), 2.0's the positional conv, `alibi_scale`, context encoder and blocks. Neither has its
own conv feature extractor or feature projection: the teacher reads the student's. So the teacher's
params are the student's with those subtrees replaced, and run in the student's module class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flax_d2v.checkpoint import load_flax_aux
from flax_d2v.convert.fairseq import load_fairseq
from flax_d2v.data2vec2 import Data2Vec2Config
from flax_d2v.errors import D2VError


def load_aux(resolved: str) -> dict[str, Any]:
    """The pretraining extras (`ema`, `final_proj`, `decoder`) of a flax-d2v directory or a fairseq `.pt`."""
    p = Path(resolved)
    if p.is_dir():
        return load_flax_aux(p) or {}
    if p.suffix == ".pt":
        return dict(load_fairseq(p).aux or {})
    return {}


def teacher_params(config: Any, is_ctc: bool, params: dict[str, Any], resolved: str) -> dict[str, Any]:
    if is_ctc:
        raise D2VError(f"{resolved}: a fine-tuned (CTC) checkpoint has no EMA teacher; pass a pretraining checkpoint")
    ema = load_aux(resolved).get("ema")
    if ema is None:
        raise D2VError(f"{resolved}: no EMA teacher in this checkpoint (fairseq `_ema`, flax-d2v flax_aux.safetensors)")
    if isinstance(config, Data2Vec2Config):
        return {**params, **ema}  # ema: relative_positional_encoder, alibi_scale, context_encoder, blocks_N
    return {**params, "encoder": ema}
