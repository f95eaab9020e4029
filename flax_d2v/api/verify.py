"""Layer-by-layer parity: the Flax model against transformers' PyTorch model on real audio.

Both models get the same weights (an HF directory is loaded by both; a flax-d2v directory or a
fairseq `.pt` is exported to a temporary HF directory first) and the same preprocessed audio:
one utterance, and a right-padded batch of utterances of different lengths. For every stage
(conv feature extractor, feature projection, each hidden state, the adapter's output when there is
one, and the head's outputs: logits, and x-vector embeddings) the report gives the
max and mean absolute error, the max error relative to the reference's largest magnitude, and
the cosine similarity, against a named tolerance. Padded frames are left out of the comparison:
their values are not defined by either model.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flax_d2v.api.pretrained import from_pretrained, load_any
from flax_d2v.api.verify2 import is_v2_source, verify_v2
from flax_d2v.convert.hf import is_hf_dir, save_hf
from flax_d2v.convert.parity import (  # noqa: F401 - default_clip: re-exported (d2v demo)
    PARITY_RTOL,
    TOLERANCES,
    StageError,
    default_clip,
    parity_rows,
    parity_setup,
    torch_device,
)
from flax_d2v.errors import D2VError
from flax_d2v.processor import read_preprocessor_config


def _torch_model(hf_dir: str, dtype: str):
    import transformers

    spec = load_any(hf_dir)[1]  # the head its keys say, as `from_pretrained` builds on the Flax side
    cls = getattr(transformers, spec.architecture)
    model = cls.from_pretrained(hf_dir, attn_implementation="eager").eval()
    if dtype == "float64":
        model = model.double()
    return model.to(torch_device())


def _run_torch(model, values: np.ndarray, mask: np.ndarray | None, dtype: str) -> dict[str, np.ndarray]:
    import torch

    base = getattr(model, "data2vec_audio", model)
    captured: dict[str, np.ndarray] = {}
    hooks = [
        base.feature_extractor.register_forward_hook(
            lambda m, i, o: captured.__setitem__("feature_extractor", o.transpose(1, 2).double().cpu().numpy())
        ),
        base.feature_projection.register_forward_hook(
            lambda m, i, o: captured.__setitem__("feature_projection", o[0].double().cpu().numpy())
        ),
    ]
    if getattr(base, "adapter", None) is not None:
        hooks.append(
            base.adapter.register_forward_hook(
                lambda m, i, o: captured.__setitem__("last_hidden_state", o.double().cpu().numpy())
            )
        )
    device = next(model.parameters()).device
    try:
        x = torch.from_numpy(values).to(device=device, dtype=torch.float64 if dtype == "float64" else torch.float32)
        m = None if mask is None else torch.from_numpy(mask).long().to(device)
        with torch.no_grad():  # not torch.set_grad_enabled(False): that would leak into the caller's process
            out = model(x, attention_mask=m, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    for i, h in enumerate(out.hidden_states):
        captured[f"hidden_states[{i}]"] = h.double().cpu().numpy()
    for field in ("logits", "embeddings"):
        if getattr(out, field, None) is not None:
            captured[field] = getattr(out, field).double().cpu().numpy()
    return captured


def flax_forward(module):
    """The jitted forward `verify` runs: every hidden state and the intermediates it reports.

    A function of its own so that `tests/test_precision.py` can lower exactly this program and
    read the precision of its matmuls and convolutions from the StableHLO.
    """
    import jax

    @jax.jit
    def fwd(p, x, m):
        return module.apply(
            {"params": p}, x, m, output_hidden_states=True, capture_intermediates=True, mutable=["intermediates"]
        )

    return fwd


def _run_flax(
    module, params, values: np.ndarray, mask: np.ndarray | None
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    import jax.numpy as jnp

    out, state = flax_forward(module)(params, jnp.asarray(values), None if mask is None else jnp.asarray(mask))
    inter = state["intermediates"]
    base = inter.get("data2vec_audio", inter)
    result = {
        "feature_extractor": np.asarray(base["feature_extractor"]["__call__"][0]),
        "feature_projection": np.asarray(base["feature_projection"]["__call__"][0][0]),
    }
    for i, h in enumerate(out.hidden_states):
        result[f"hidden_states[{i}]"] = np.asarray(h)
    for field in ("last_hidden_state", "logits", "embeddings"):
        if getattr(out, field) is not None:
            result[field] = np.asarray(getattr(out, field))
    masks = {
        "encoder": None if out.frame_mask is None else np.asarray(out.frame_mask),
        "output": None if out.logits_frame_mask is None else np.asarray(out.logits_frame_mask),
    }
    return result, masks


def _stage_mask(stage: str, value: np.ndarray, masks: dict) -> np.ndarray | None:
    """Valid frames of a stage: the encoder's, the adapter's for its output and per-frame logits, none
    for pooled outputs (a clip's logits or embeddings)."""
    if stage in ("feature_extractor", "feature_projection") or stage.startswith("hidden_states"):
        return masks["encoder"]
    if value.ndim == 3:
        return masks["output"]
    return None


def _hf_dir_for(src: str, tmp: str) -> str:
    """A directory transformers can load with the same weights as `src`."""
    if Path(src).is_dir() and is_hf_dir(src):
        return src
    config, _, params, _ = load_any(src)
    out = os.path.join(tmp, "hf")
    save_hf(out, config, params, files_from=src if Path(src).is_dir() else None)
    return out


def verify(
    src: str,
    audio: Sequence[str] = (),
    reference_dtype: str = "float32",
    batch: bool = True,
    precision: str = "highest",
) -> tuple[list[StageError], dict]:
    """Run both models on the clips; (rows of the report, facts about the run).

    `precision` is the Flax side's policy (`flax_d2v.precision`); the reference is always PyTorch
    at full precision (TF32 off) in `reference_dtype`, on the GPU when torch has one, and each
    stage is judged against `TOLERANCES[precision]`.
    """
    if is_v2_source(src):  # data2vec 2.0: fairseq, or its PyTorch rendering (no transformers class)
        return verify_v2(src, audio, batch, precision=precision)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise D2VError("d2v verify needs PyTorch and transformers: pip install 'flax-d2v[torch]'") from None
    import jax

    policy, files, waves = parity_setup(precision, audio)
    tolerance = TOLERANCES[policy.name]
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = _hf_dir_for(src, tmp)
        pre = read_preprocessor_config(hf_dir)
        module, params = from_pretrained(hf_dir, precision=policy.name)
        model = _torch_model(hf_dir, reference_dtype)
        rows = parity_rows(
            files,
            waves,
            batch,
            pre.do_normalize,
            tolerance,
            lambda values, mask: _run_torch(model, values, mask, reference_dtype),
            lambda values, mask: _run_flax(module, params, values, mask),
            _stage_mask,
        )
    device = jax.devices()[0]
    facts = {
        "model": src,
        "architecture": type(module).__name__,
        "audio": files,
        "reference": f"transformers PyTorch ({reference_dtype}, TF32 off, eager attention) on {torch_device()}",
        "flax": f"Flax precision={policy.name} ({policy.description}) on {device.platform} "
        f"({getattr(device, 'device_kind', device.platform)})",
        "precision": policy.name,
        "tolerance": tolerance,
        "layers": module.config.num_hidden_layers,
        "hidden_size": module.config.hidden_size,
    }
    return rows, facts


def format_table(rows: Sequence[StageError]) -> str:
    header = (
        "| case | stage | max abs err | mean abs err | max rel err | cosine | result |\n|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.stage} | {r.max_abs:.3e} | {r.mean_abs:.3e} | {r.rel:.3e} | "
            f"{r.cosine:.9f} | {'pass' if r.passed else 'FAIL'} |"
        )
    return "\n".join(lines)


def markdown_report(rows: Sequence[StageError], facts: dict, plot_name: str | None) -> str:
    ok = all(r.passed for r in rows)
    parts = [
        "# data2vec-audio parity report: Flax vs PyTorch\n",
        f"- model: `{facts['model']}` ({facts.get('architecture', 'data2vec-audio')}, {facts['layers']} layers, "
        f"hidden {facts['hidden_size']})",
        f"- reference: {facts['reference']}",
        f"- flax: {facts.get('flax', 'Flax')}",
        "- audio: " + ", ".join(f"`{a}`" for a in facts["audio"]),
        f"- tolerance: max abs error <= {facts['tolerance']:g} x the reference's largest magnitude "
        f"(TOLERANCES[{facts.get('precision', 'highest')!r}]), valid frames only",
        f"- result: **{'PASS' if ok else 'FAIL'}** "
        f"({sum(r.passed for r in rows)}/{len(rows)} stages within tolerance)\n",
        format_table(rows),
    ]
    if plot_name:
        parts.append(f"\n![error by layer]({plot_name})")
    return "\n".join(parts) + "\n"


def plot_errors(rows: Sequence[StageError], path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for case in dict.fromkeys(r.case for r in rows):
        sel = [r for r in rows if r.case == case]
        ax.semilogy(range(len(sel)), [max(r.rel, 1e-12) for r in sel], marker="o", label=case)
        ax.set_xticks(range(len(sel)), [r.stage.replace("hidden_states", "h") for r in sel], rotation=60, fontsize=8)
    tol = rows[0].tolerance if rows else PARITY_RTOL
    ax.axhline(tol, color="red", linestyle="--", label=f"tolerance {tol:g}")
    ax.set_ylabel("max |flax - torch| / max |torch|")
    ax.set_title("Flax vs PyTorch error by stage")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
