"""`d2v verify` for data2vec 2.0: the Flax model against fairseq's own model, or its PyTorch rendering.

There is no transformers class for 2.0. When `import fairseq` works, the reference is fairseq's
`Data2VecMultiModel` (or its `wav2vec_ctc` wrapper) loaded from a fairseq `.pt` of the same weights
with `checkpoint_utils.load_model_ensemble_and_task`; otherwise it is
`flax_d2v.convert.fairseq2_reference`, written from fairseq's code, loading the fairseq state dict by
fairseq's key names. The report says which one ran. Stages: the local features (conv extractor and
`project_features`), the context encoder's blocks, every block's output, and the CTC logits.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flax_d2v.api.pretrained import from_pretrained
from flax_d2v.checkpoint import load_flax
from flax_d2v.convert.fairseq import convert_fairseq
from flax_d2v.convert.fairseq2 import CTC_PREFIX, default_cfg, export_fairseq2, fairseq_state, is_data2vec2
from flax_d2v.convert.fairseq_common import read_fairseq_file
from flax_d2v.convert.parity import TOLERANCES, parity_rows, parity_setup
from flax_d2v.data2vec2 import MODEL_TYPE_V2
from flax_d2v.errors import D2VError
from flax_d2v.fileio import read_json_object
from flax_d2v.processor import read_preprocessor_config


def _flax_dir(src: str, tmp: str) -> str:
    if Path(src).is_dir():
        return src

    out = os.path.join(tmp, "flax")
    convert_fairseq(src, out)
    return out


def _fairseq_reference(pt: str):
    """fairseq's own model from `pt`, or None when fairseq is not importable."""
    try:
        import fairseq  # noqa: F401
        from fairseq import checkpoint_utils
    except ImportError:
        return None
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([pt])
    return models[0].eval()


def _run_fairseq(model, values: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
    import torch

    pm = None if mask is None else torch.from_numpy(mask == 0)
    x = torch.from_numpy(values)
    with torch.no_grad():
        if hasattr(model, "w2v_encoder"):
            enc = model.w2v_encoder
            res = enc.w2v_model.extract_features(source=x, padding_mask=pm, mode="AUDIO", mask=False)
            out = {"last_hidden_state": res["x"].double().numpy(), "logits": enc.proj(res["x"]).double().numpy()}
        else:
            res = model.extract_features(x, mode="AUDIO", padding_mask=pm, mask=False)
            out = {"last_hidden_state": res["x"].double().numpy()}
        for i, lr in enumerate(res["layer_results"]):
            out[f"layer_results[{i}]"] = lr.double().numpy()
    return out


def _run_reference(ref, proj, values: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
    import torch

    pm = None if mask is None else torch.from_numpy(mask == 0)
    res = ref.extract_features(torch.from_numpy(values), pm)
    out = {"local_features": res["local_features"].double().numpy()}
    for i, h in enumerate(res["prenet_states"]):
        out[f"prenet[{i}]"] = h.double().numpy()
    for i, h in enumerate(res["hidden_states"]):
        out[f"hidden_states[{i}]"] = h.double().numpy()
    for i, h in enumerate(res["layer_results"]):
        out[f"layer_results[{i}]"] = h.double().numpy()
    out["last_hidden_state"] = res["x"].double().numpy()
    if proj is not None:
        w, b = proj
        out["logits"] = (res["x"] @ w.T + b).double().numpy()
    return out


def _run_flax(module, params, values: np.ndarray, mask: np.ndarray | None) -> tuple[dict[str, np.ndarray], Any]:
    import jax

    @jax.jit
    def fwd(p, x, m):
        return module.apply({"params": p}, x, m, output_hidden_states=True, output_layer_results=True)

    o = fwd(params, values, mask)
    out = {"local_features": np.asarray(o.extract_features), "last_hidden_state": np.asarray(o.last_hidden_state)}
    for i, h in enumerate(o.prenet_states):
        out[f"prenet[{i}]"] = np.asarray(h)
    for i, h in enumerate(o.hidden_states):
        out[f"hidden_states[{i}]"] = np.asarray(h)
    for i, h in enumerate(o.layer_results):
        out[f"layer_results[{i}]"] = np.asarray(h)
    if o.logits is not None:
        out["logits"] = np.asarray(o.logits)
    return out, None if o.frame_mask is None else np.asarray(o.frame_mask)


def is_v2_source(src: str) -> bool:
    """Whether `src` (a flax-d2v directory or a fairseq `.pt`) holds a data2vec 2.0 model."""
    p = Path(src)
    if p.is_dir() and (p / "config.json").is_file():
        return read_json_object(p / "config.json").get("model_type") == MODEL_TYPE_V2
    if p.is_file() and p.suffix == ".pt":
        return is_data2vec2(read_fairseq_file(p))
    return False


def verify_v2(src: str, audio: Sequence[str] = (), batch: bool = True, precision: str = "highest") -> tuple[list, dict]:
    """Rows and facts as `api.verify.verify` returns them, for a data2vec 2.0 model.

    `precision` is the Flax side's policy (`flax_d2v.precision`), judged against
    `convert.parity.TOLERANCES`; the reference runs in fp32 with TF32 off.
    """
    try:
        import torch
    except ImportError:
        raise D2VError("d2v verify needs PyTorch: pip install 'flax-d2v[torch]'") from None
    import jax

    policy, files, waves = parity_setup(precision, audio)
    tolerance = TOLERANCES[policy.name]
    with tempfile.TemporaryDirectory() as tmp:
        fdir = _flax_dir(src, tmp)
        pre = read_preprocessor_config(fdir)
        module, params = from_pretrained(fdir, precision=policy.name)
        config, flat_params = load_flax(fdir)
        pt = src if Path(src).is_file() else os.path.join(tmp, "model.pt")
        if pt != src:
            export_fairseq2(fdir, pt)
        fs_model = _fairseq_reference(pt)
        if fs_model is not None:
            reference = "fairseq (its own Data2VecMultiModel, fp32)"
            run_ref = lambda v, m: _run_fairseq(fs_model, v, m)  # noqa: E731
        else:
            # deferred: a PyTorch rendering of fairseq's model, importable only with torch installed
            from flax_d2v.convert import fairseq2_reference as R

            ckpt = read_fairseq_file(pt)
            cfg = ckpt["cfg"]["model"]
            arch = cfg["w2v_args"]["model"] if "w2v_args" in cfg else cfg
            state = {k: torch.as_tensor(v) for k, v in fairseq_state(config, flat_params, None).items()}
            proj = None
            if "lm_head" in flat_params:
                proj = (state.pop("w2v_encoder.proj.weight"), state.pop("w2v_encoder.proj.bias"))
                state = {k[len(CTC_PREFIX) :]: v for k, v in state.items()}
            arch = arch or default_cfg(config)
            mods = dict(arch.get("modalities") or {})  # the encoder only: no pretraining decoder in the reference
            arch = {**arch, "modalities": {**mods, "audio": {**dict(mods.get("audio") or {}), "decoder": None}}}
            ref = R.build(arch, state)
            reference = (
                "flax_d2v.convert.fairseq2_reference (PyTorch rendering of fairseq's code, fp32; "
                "fairseq is not importable)"
            )
            run_ref = lambda v, m: _run_reference(ref, proj, v, m)  # noqa: E731
        run_flax = lambda v, m: _run_flax(module, params, v, m)  # noqa: E731
        rows = parity_rows(files, waves, batch, pre.do_normalize, tolerance, run_ref, run_flax)
    facts = {
        "model": src,
        "audio": files,
        "reference": reference,
        "tolerance": tolerance,
        "precision": policy.name,
        "flax": f"Flax precision={policy.name} ({policy.description}) on {jax.devices()[0].platform}",
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
    }
    return rows, facts
