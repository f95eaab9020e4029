"""flax-d2v: data2vec-audio in JAX/Flax.

import flax_d2v
module, params = flax_d2v.from_pretrained(path)   # HF dir, our Flax dir, fairseq .pt, or hub id; any head
out = module.apply({"params": params}, input_values, attention_mask=None, output_hidden_states=False)
"""

from __future__ import annotations

from flax_d2v.config import Data2VecAudioConfig, base_config, large_config, preset, tiny_config
from flax_d2v.errors import D2VError
from flax_d2v.heads import (
    Data2VecAudioForAudioFrameClassification,
    Data2VecAudioForSequenceClassification,
    Data2VecAudioForXVector,
)
from flax_d2v.modeling import (
    Data2VecAudioForCTC,
    Data2VecAudioModel,
    Data2VecAudioOutput,
    feat_extract_output_lengths,
    init_params,
)
from flax_d2v.pretrained import from_pretrained

__version__ = "0.1.0"

__all__ = [
    "D2VError",
    "Data2VecAudioConfig",
    "Data2VecAudioForAudioFrameClassification",
    "Data2VecAudioForCTC",
    "Data2VecAudioForSequenceClassification",
    "Data2VecAudioForXVector",
    "Data2VecAudioModel",
    "Data2VecAudioOutput",
    "base_config",
    "classify",
    "feat_extract_output_lengths",
    "from_pretrained",
    "init_params",
    "large_config",
    "preset",
    "tiny_config",
    "transcribe",
]


# Bound last and eagerly: the submodule `flax_d2v.transcribe` shares the name, and an eager import
# keeps `flax_d2v.transcribe` the function (a later `import flax_d2v.transcribe` does not rebind it).
from flax_d2v.classify import classify  # noqa: E402  (the same, for `flax_d2v.classify`)
from flax_d2v.transcribe import transcribe  # noqa: E402
