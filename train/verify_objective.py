"""`d2v verify CKPT.pt --objective REF.npz`: one pretraining step of ours against fairseq's own numbers.

A reference (the format of `shared/fairseq-objective/`, see its README) holds one masked pretraining
step that fairseq's model and criterion computed on a checkpoint, dropout off: the batch, fairseq's
masks (2.0: with its clone rows and the mask-token noise it drew), the loss, `sample_size`, the
teacher targets, the student predictions and a fingerprint of every student parameter's gradient
under fairseq's name. This runs **the objective `d2v pretrain` runs** (`Data2VecObjective` for
`data2vec_audio`, `Data2Vec2Objective` for `data2vec_multi`), built from the checkpoint's cfg with
fairseq's behaviour on a padded batch (1.0: `instance_norm_over_padding`), on the converted checkpoint,
the reference's masks and noise injected through the objectives' test arguments, and compares.
A cfg field the checkpoint leaves out takes fairseq's dataclass default (`Data2VecAudioConfig`,
`Data2VecMultiConfig`, `D2vAudioConfig`); a target or loss option our objective lacks is refused. A 2.0
cfg is read as `d2v pretrain` reads it (`convert.fairseq2.pretraining_settings`, `unsupported_options`).

Gradients are of the criterion's unnormalised loss: our `loss` returns (sum, sample_size), the sum
being fairseq's loss, so its gradient is differentiated directly (the loop divides later, as fairseq's
trainer does). Each gradient goes to fairseq's name and layout through the converters' key tables
(`convert.fairseq`: Flax -> transformers -> fairseq; `convert.fairseq2.key_rows`), and every name of
the reference must be matched: one missing on either side fails the check.
"""

from __future__ import annotations

import dataclasses
import json
import lzma
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_d2v.convert.fairseq import FairseqCheckpoint, hf_to_fairseq_key, load_fairseq
from flax_d2v.convert.fairseq2 import (
    AUDIO_OBJECTIVE_KEYS,
    OBJECTIVE_KEYS,
    TARGET_OPTIONS,
    key_rows,
    pretraining_settings,
    to_fairseq,
    unsupported_options,
)
from flax_d2v.convert.keys import flax_to_hf_key, to_hf_array
from flax_d2v.data2vec2 import Data2Vec2Config, Data2Vec2Model
from flax_d2v.errors import D2VError
from flax_d2v.modeling import Data2VecAudioModel
from flax_d2v.params import flatten
from flax_d2v.train.data2vec2_objective import Data2Vec2Objective, Data2Vec2PretrainConfig
from flax_d2v.train.data2vec_objective import Data2VecObjective, Data2VecPretrainConfig

# The contract of issue 22 (fp32 on both sides). Measured on the two shared references (CPU, fp32):
# loss 0 (1.0) and 1.3e-7 (2.0) relative, targets/predictions <= 1e-6 of their largest magnitude,
# worst gradient fingerprint error ~1e-6 (see README); one flipped mask bit moves the loss by 1e-2.
LOSS_RTOL = 1e-5  # loss and sample_size, relative
OUTPUT_RTOL = 1e-5  # targets and predictions: max |ours - fairseq| / max |fairseq|
GRAD_TOL = 1e-4  # the shared README's fingerprint check: rms(p - p_ref) <= tol * max(max|g_ref|, tol * G)
FINGERPRINT_PROJECTIONS = 8

MODEL_V1, MODEL_V2 = "data2vec_audio", "data2vec_multi"

# The 1.0 cfg.model options our `Data2VecObjective` implements only off (the form of
# `convert.fairseq2.UNSUPPORTED_OPTIONS`, which is 2.0's, read by the same `unsupported_options`).
UNSUPPORTED_OPTIONS_V1: tuple[tuple[str, str, Any], ...] = (
    *(("model", k, lambda v, _m, _a: not v) for k in (*TARGET_OPTIONS, "group_norm_target_layer")),
    ("model", "feature_grad_mult", lambda v, _m, _a: v is None or float(v) == 1.0),  # a scaled conv gradient
)
# fairseq's dataclass defaults (Data2VecMultiConfig, D2vAudioConfig) of the 2.0 objective's settings, for the
# keys a cfg leaves out (`pretraining_settings` gives those it has)
FAIRSEQ_DEFAULTS_V2: dict[str, Any] = dict(
    clone_batch=1,
    mask_prob=0.7,
    mask_prob_adjust=0.0,
    mask_length=5,
    inverse_mask=False,
    mask_dropout=0.0,
    average_top_k_layers=8,
    instance_norm_target_layer=False,
    ema_decay=0.999,
    ema_end_decay=0.9999,
    loss_beta=0.0,
    loss_scale=None,
)


# ------------------------------------------------------------------------------------ the reference
@dataclasses.dataclass
class Reference:
    """One `REF.npz` (see `shared/fairseq-objective/README.md` for every array)."""

    path: str
    model: str  # MODEL_V1 or MODEL_V2
    arrays: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]  # fairseq name -> fingerprint [|g|, max|g|, sum g, p1..p8]
    shapes: dict[str, tuple[int, ...]]
    meta: dict[str, Any]


REQUIRED = ("source", "padding_mask", "mask", "loss", "sample_size", "pred", "targets_full")


def read_reference(path: str | os.PathLike) -> Reference:
    """The arrays of a reference `.npz`, read without unpickling (`allow_pickle=False`)."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise D2VError(f"{source}: no such file")
    try:
        with np.load(source, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise D2VError(f"{source}: not a readable .npz reference ({str(e).splitlines()[0]})") from None
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise D2VError(f"{source}: missing array {missing[0]!r} (not an objective reference)")
    meta: dict[str, Any] = {}
    if "meta_json" in arrays:
        try:
            meta = json.loads(str(arrays.pop("meta_json")))
        except json.JSONDecodeError:
            raise D2VError(f"{source}: meta_json is not JSON") from None
    model = meta.get("model") or (MODEL_V2 if "mask_noise" in arrays else MODEL_V1)
    if model not in (MODEL_V1, MODEL_V2):
        raise D2VError(f"{source}: meta_json.model is {model!r}; expected {MODEL_V1!r} or {MODEL_V2!r}")
    if model == MODEL_V2 and "mask_noise" not in arrays:
        raise D2VError(f"{source}: a data2vec 2.0 reference needs 'mask_noise' (the decoder's mask tokens)")
    grads, shapes = {}, {}
    for key in list(arrays):
        if key.startswith("gradfp/"):
            name = key[len("gradfp/") :]
            fp = np.asarray(arrays.pop(key), np.float64)
            if fp.shape != (3 + FINGERPRINT_PROJECTIONS,):
                raise D2VError(f"{source}: {key} has shape {fp.shape}, expected ({3 + FINGERPRINT_PROJECTIONS},)")
            grads[name] = fp
    for key in list(arrays):
        if key.startswith("gradshape/"):
            shapes[key[len("gradshape/") :]] = tuple(int(v) for v in arrays.pop(key))
    if not grads:
        raise D2VError(f"{source}: no gradient fingerprints (gradfp/<name>)")
    if set(shapes) != set(grads):
        raise D2VError(f"{source}: gradfp/ and gradshape/ name different parameters")
    return Reference(source, model, arrays, grads, shapes, meta)


def fingerprint(name: str, grad: np.ndarray) -> np.ndarray:
    """The README's fingerprint of a gradient in fairseq's layout: [|g|, max|g|, sum g, R @ g / sqrt(n)]."""
    g = np.asarray(grad, np.float64).ravel()
    r = np.random.default_rng(zlib.crc32(name.encode("utf-8"))).standard_normal((FINGERPRINT_PROJECTIONS, g.size))
    return np.concatenate([[np.linalg.norm(g), np.abs(g).max(), g.sum()], r @ g / np.sqrt(g.size)])


# ------------------------------------------------------------------------------------ the checkpoint
def load_checkpoint(path: str | os.PathLike) -> FairseqCheckpoint:
    """A fairseq `.pt`, or an xz-compressed `.pt.xz` (decompressed to a temporary file first)."""
    source = os.fspath(path)
    if os.path.isdir(source):
        raise D2VError(
            f"{source}: a directory; --objective needs the fairseq .pt (or .pt.xz) the reference was made from"
        )
    if not source.endswith(".xz"):
        return load_fairseq(source)
    if not os.path.isfile(source):
        raise D2VError(f"{source}: no such file")
    with tempfile.TemporaryDirectory(prefix="d2v-objective-") as tmp:
        plain = os.path.join(tmp, Path(source).name[: -len(".xz")])
        try:
            with lzma.open(source) as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except lzma.LZMAError as e:
            raise D2VError(f"{source}: not a readable .xz file ({e})") from None
        ck = load_fairseq(plain)
    return ck


def _model_cfg(ck: FairseqCheckpoint, source: str) -> dict[str, Any]:
    cfg = (ck.cfg or {}).get("cfg") or {}
    model = cfg.get("model") if isinstance(cfg, Mapping) else None
    if not isinstance(model, Mapping):
        raise D2VError(f"{source}: no cfg.model (the objective's settings come from it)")
    return dict(model)


def _anneal_end(step: Any, m: Mapping[str, Any]) -> int:
    """`ema_anneal_end_step` (fairseq's default: `optimization.max_update`, copied into cfg.model.max_update)."""
    return max(1, int(step or m.get("max_update") or 1))


def _refuse(source: str, unsupported: list[str]) -> None:
    """One line naming the first option `unsupported_options` found."""
    if unsupported:
        raise D2VError(f"{source}: {unsupported[0]}: not implemented by our objective, so the step cannot be checked")


def objective_v1(ck: FairseqCheckpoint, source: str) -> tuple[Data2VecObjective, dict, dict]:
    """(objective, params, extra) of a `data2vec_audio` checkpoint, settings from its cfg.model."""
    m = _model_cfg(ck, source)
    _refuse(source, unsupported_options(m, UNSUPPORTED_OPTIONS_V1))
    if "final_proj" not in ck.aux or "ema" not in ck.aux:
        raise D2VError(f"{source}: needs final_proj and the EMA teacher (_ema) to run the objective")
    config = Data2VecPretrainConfig(
        ema_decay=float(m.get("ema_decay", 0.999)),
        ema_end_decay=float(m.get("ema_end_decay", 0.9999)),
        ema_anneal_end_step=_anneal_end(m.get("ema_anneal_end_step"), m),
        ema_layers_only=bool(m.get("ema_layers_only", True)),
        average_top_k_layers=int(m.get("average_top_k_layers", 8)),
        instance_norm_target_layer=bool(m.get("instance_norm_target_layer", False)),
        instance_norm_over_padding=True,  # fairseq's statistics include the padded frames
        mask_prob=float(m.get("mask_prob", 0.65)),
        mask_length=int(m.get("mask_length", 10)),
        require_same_masks=bool(m.get("require_same_masks", True)),
        loss_beta=float(m.get("loss_beta", 0.0)),
        loss_scale=None if m.get("loss_scale") is None else float(m["loss_scale"]),
        min_target_var=float(m.get("min_target_var", 0.1)),
        min_pred_var=float(m.get("min_pred_var", 0.01)),
        ema_start_update=int((ck.cfg or {}).get("num_updates") or 0),
    )
    obj = Data2VecObjective(Data2VecAudioModel(ck.config, precision="highest"), config)
    params = obj.init_params(ck.params, jax.random.PRNGKey(0), ck.aux["final_proj"])
    return obj, params, {"encoder": ck.aux["ema"]}


def objective_v2(ck: FairseqCheckpoint, source: str) -> tuple[Data2Vec2Objective, dict, dict]:
    """(objective, params, extra) of a `data2vec_multi` (audio) checkpoint: the options `d2v pretrain` refuses
    are refused, the settings are those `d2v pretrain` takes from the checkpoint (`pretraining_settings`),
    fairseq's defaults for the rest. (min_target_var, min_pred_var: the collapse guard's, not the step's.)"""
    m = _model_cfg(ck, source)
    _refuse(source, unsupported_options(m))
    settings = pretraining_settings((ck.cfg or {}).get("cfg") or {}, source)
    if "decoder" not in ck.aux or "ema" not in ck.aux:
        raise D2VError(f"{source}: needs the decoder and the EMA teacher (_ema) to run the objective")
    taken = {k: settings[k] for k in (*OBJECTIVE_KEYS, *AUDIO_OBJECTIVE_KEYS) if k in settings}
    taken["ema_anneal_end_step"] = _anneal_end(settings.get("ema_anneal_end_step"), m)
    taken["ema_start_update"] = int((ck.cfg or {}).get("num_updates") or 0)
    config = Data2Vec2PretrainConfig(**{**FAIRSEQ_DEFAULTS_V2, **taken})
    obj = Data2Vec2Objective(Data2Vec2Model(ck.config, precision="highest"), config)
    params = obj.init_params(ck.params, jax.random.PRNGKey(0), ck.aux["decoder"])
    return obj, params, {"teacher": ck.aux["ema"]}


# ------------------------------------------------------------------------------------ names
def fairseq_grads_v1(grads: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our 1.0 gradient tree in fairseq's names and layouts: Flax -> transformers (`keys.py`) ->
    fairseq (`FAIRSEQ_KEY_TABLE`); `final_proj` as the converter reads it (weight = kernel transposed)."""
    out: dict[str, np.ndarray] = {}
    for path, g in flatten(grads["model"]).items():
        hf = flax_to_hf_key(path)
        name = hf_to_fairseq_key(hf[0]) if hf else None
        if name is None:
            raise D2VError(f"our parameter {path!r} has no fairseq name in the key tables")
        out[name] = to_hf_array(np.asarray(g), hf[1])
    out["final_proj.weight"] = np.ascontiguousarray(np.asarray(grads["final_proj"]["kernel"]).T)
    out["final_proj.bias"] = np.asarray(grads["final_proj"]["bias"])
    return out


def fairseq_grads_v2(grads: Mapping[str, Any], config: Data2Vec2Config) -> dict[str, np.ndarray]:
    """Our 2.0 gradient tree in fairseq's names and layouts, by `convert.fairseq2.key_rows`."""
    out: dict[str, np.ndarray] = {}
    for part, tree in (("model", grads["model"]), ("decoder", grads["decoder"])):
        flat = flatten(tree)
        rows = key_rows(config, part)
        left = set(flat) - {path for _, path, _ in rows}
        if left:
            raise D2VError(f"our parameter {part}/{sorted(left)[0]} has no row in convert.fairseq2.key_rows")
        for name, path, kind in rows:
            out[name] = to_fairseq(np.asarray(flat[path]), kind)
    return out


# ------------------------------------------------------------------------------------ the run
@dataclasses.dataclass
class Row:
    """One line of the table: `error` against `tolerance` (None: shown, not checked)."""

    what: str
    ours: str
    fairseq: str
    error: float
    tolerance: float | None

    @property
    def passed(self) -> bool:
        return self.tolerance is None or bool(np.isfinite(self.error) and self.error <= self.tolerance)


def run_step(ref: Reference, ck: FairseqCheckpoint, source: str) -> dict[str, Any]:
    """Our objective on the reference's batch, masks and noise: loss, sample_size, metrics, the
    predictions and targets at the masked frames (row-major), the (B, T, D) targets and the
    gradients of the unnormalised loss in fairseq's names."""
    a = ref.arrays
    is_v2 = ref.model == MODEL_V2
    if is_v2 != isinstance(ck.config, Data2Vec2Config):
        kind = "data2vec 2.0" if isinstance(ck.config, Data2Vec2Config) else "data2vec 1.0"
        raise D2VError(f"{ref.path}: a {ref.model} reference, but {source} is a {kind} checkpoint")
    obj, params, extra = (objective_v2 if is_v2 else objective_v1)(ck, source)
    batch = {
        "input_values": np.asarray(a["source"], np.float32),
        "attention_mask": (~np.asarray(a["padding_mask"], bool)).astype(np.int32),
        "index": np.arange(a["source"].shape[0], dtype=np.int32),
    }
    mask = np.asarray(a["mask"], bool)
    if is_v2:
        noise = np.asarray(a["mask_noise"], np.float32)

        def loss(p: Any) -> Any:
            return obj.loss(p, extra, batch, jax.random.PRNGKey(0), jnp.asarray(0), mask, noise, True, outputs=True)
    else:

        def loss(p: Any) -> Any:
            return obj.loss(p, extra, batch, jax.random.PRNGKey(0), jnp.asarray(0), mask, True, outputs=True)

    def fn(p: Any) -> Any:
        total, weight, metrics = loss(p)
        return total, (weight, metrics)

    (total, (weight, metrics)), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
    pred, targets = np.asarray(metrics.pop("pred")), np.asarray(metrics.pop("targets"))
    if is_v2:
        c = obj.config.clone_batch
        targets_full = targets.reshape(-1, c, *targets.shape[1:])[:, 0]
        named = fairseq_grads_v2(jax.device_get(grads), ck.config)
    else:
        targets_full = targets
        named = fairseq_grads_v1(jax.device_get(grads))
    return {
        "loss": float(total),
        "sample_size": float(weight),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "pred": pred[mask],
        "targets": targets[mask],
        "targets_full": targets_full,
        "grads": named,
    }


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return math.inf
    return float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-30))


def compare(ref: Reference, ours: dict[str, Any]) -> list[Row]:
    """The table's rows (see the module docstring and the tolerances above)."""
    a = ref.arrays
    rows = []
    for what, key in (("loss", "loss"), ("sample_size", "sample_size")):
        want = float(a[key])
        rows.append(
            Row(what, f"{ours[key]:.7g}", f"{want:.7g}", abs(ours[key] - want) / max(abs(want), 1e-30), LOSS_RTOL)
        )
    for what, got, want in (
        ("targets (all frames)", ours["targets_full"], a["targets_full"]),
        ("predictions (masked)", ours["pred"], a["pred"]),
    ):
        rows.append(Row(what, f"{np.shape(got)}", f"{np.shape(want)}", _rel(got, want), OUTPUT_RTOL))
    for key in ("target_var", "pred_var"):
        if key in a and key in ours["metrics"]:
            got, want = ours["metrics"][key], float(a[key])
            rows.append(Row(key, f"{got:.7g}", f"{want:.7g}", abs(got - want) / max(abs(want), 1e-30), None))
    big = max(float(fp[1]) for fp in ref.grads.values())
    for name in sorted(set(ref.grads) | set(ours["grads"]), key=lambda n: (n not in ref.grads, n)):
        if name not in ours["grads"]:
            rows.append(Row(f"grad {name}", "missing", "present", math.inf, GRAD_TOL))
            continue
        if name not in ref.grads:
            rows.append(Row(f"grad {name}", "present", "missing", math.inf, GRAD_TOL))
            continue
        g = ours["grads"][name]
        if tuple(g.shape) != ref.shapes[name]:
            rows.append(Row(f"grad {name}", f"shape {g.shape}", f"shape {ref.shapes[name]}", math.inf, GRAD_TOL))
            continue
        fp, fp_ref = fingerprint(name, g), ref.grads[name]
        rms = float(np.sqrt(np.mean((fp[3:] - fp_ref[3:]) ** 2)))
        scale = max(float(fp_ref[1]), GRAD_TOL * big)
        rows.append(Row(f"grad {name}", f"|g| {fp[0]:.4e}", f"|g| {fp_ref[0]:.4e}", rms / scale, GRAD_TOL))
    return rows


def verify_objective(ckpt: str | os.PathLike, reference: str | os.PathLike) -> tuple[list[Row], dict[str, Any]]:
    """(rows, facts) of `d2v verify CKPT --objective REF`."""
    ref = read_reference(reference)
    ck = load_checkpoint(ckpt)
    ours = run_step(ref, ck, os.fspath(ckpt))
    rows = compare(ref, ours)
    grads = [r for r in rows if r.what.startswith("grad ")]
    facts = {
        "model": ref.model,
        "reference": ref.path,
        "checkpoint": os.fspath(ckpt),
        "parameters": len(grads),
        "worst_grad": max((r.error for r in grads), default=math.nan),
        "loss_rel": rows[0].error,
    }
    return rows, facts


def format_table(rows: list[Row]) -> str:
    """The printed table: each quantity, ours and fairseq's, the error and its tolerance."""
    w = max(len(r.what) for r in rows)
    lines = [f"{'quantity':<{w}}  {'ours':>16}  {'fairseq':>16}  {'error':>10}  {'tolerance':>9}  ok"]
    for r in rows:
        tol = "-" if r.tolerance is None else f"{r.tolerance:.0e}"
        ok = "" if r.tolerance is None else ("ok" if r.passed else "FAIL")
        lines.append(f"{r.what:<{w}}  {r.ours:>16}  {r.fairseq:>16}  {r.error:>10.3e}  {tol:>9}  {ok}")
    return "\n".join(lines)
