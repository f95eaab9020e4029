"""flax-d2v: data2vec-audio in JAX/Flax.

import flax_d2v
module, params = flax_d2v.from_pretrained(path)   # HF dir, our Flax dir, fairseq .pt, or hub id; any head
out = module.apply({"params": params}, input_values, attention_mask=None, output_hidden_states=False)
"""

from __future__ import annotations

import sys as _sys

from flax_d2v.api.pretrained import from_pretrained
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


from flax_d2v.api import classify as _classify_module  # noqa: E402
from flax_d2v.api import pretrained as _pretrained_module  # noqa: E402
from flax_d2v.api import teacher as _teacher_module  # noqa: E402
from flax_d2v.api import transcribe as _transcribe_module  # noqa: E402
from flax_d2v.api import verify as _verify_module  # noqa: E402
from flax_d2v.api import verify2 as _verify2_module  # noqa: E402
from flax_d2v.api.classify import classify  # noqa: E402
from flax_d2v.api.transcribe import transcribe  # noqa: E402

# The api layer moved into flax_d2v/api/ (ARCHITECTURE.md: one folder per layer). Imports that users
# already have keep working: each old module path names the moved module. `flax_d2v.transcribe` and
# `flax_d2v.classify` stay the functions as attributes; `import flax_d2v.transcribe` / `from
# flax_d2v.transcribe import Transcriber` find the module through sys.modules.
MOVED_MODULES = {
    "flax_d2v.pretrained": _pretrained_module,
    "flax_d2v.teacher": _teacher_module,
    "flax_d2v.transcribe": _transcribe_module,
    "flax_d2v.classify": _classify_module,
    "flax_d2v.convert.verify": _verify_module,
    "flax_d2v.convert.verify2": _verify2_module,
}
for _old, _module in MOVED_MODULES.items():
    _sys.modules.setdefault(_old, _module)
