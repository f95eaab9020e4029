"""The pretraining run: data2vec 1.0 (`base_librispeech.yaml`) and 2.0 (`v2/base_audio_only_task.yaml`).

`flax_d2v.train.pretrain(cfg)` runs a `PretrainConfig` (`train/recipes.py`) end to end. The two
architectures differ in what they start from and build (`_data2vec` / `_data2vec2` give a `Plan`:
the model config, module, objective, initial params, the checkpoint's teacher and the export);
the rest of the run is one orchestration (`_run`): mesh, cropped batches, optimiser, `Trainer`
(resumes from RUN/checkpoints), the checkpoint's EMA teacher on a fresh start, fit, export.

Starting points: a preset or a transformers config.json (random init), an HF or flax-d2v model
directory (the teacher starts as a copy of the student), a fairseq pretrained `.pt` or a flax-d2v
directory with `flax_aux.safetensors` (teacher and `final_proj` / decoder taken from it).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flax_d2v.api.pretrained import load_any
from flax_d2v.api.teacher import load_aux
from flax_d2v.checkpoint import is_flax_dir, load_flax_aux, save_flax
from flax_d2v.config import PRESETS, Data2VecAudioConfig
from flax_d2v.convert.fairseq import load_fairseq
from flax_d2v.convert.fairseq2 import pretraining_settings
from flax_d2v.convert.hf import save_hf
from flax_d2v.data2vec2 import PRESETS_V2, Data2Vec2Config, Data2Vec2Model
from flax_d2v.errors import D2VError
from flax_d2v.fileio import read_json_object
from flax_d2v.modeling import Data2VecAudioModel, init_params, logical_axes
from flax_d2v.params import is_scanned, unstack_layers
from flax_d2v.paths import is_url, localize
from flax_d2v.processor import preprocessor_config
from flax_d2v.train import run_common as common
from flax_d2v.train.data2vec2_objective import Data2Vec2Objective, Data2Vec2PretrainConfig, teacher_subtree
from flax_d2v.train.data2vec_objective import CroppedBatches, Data2VecObjective, Data2VecPretrainConfig
from flax_d2v.train.loop import PMAP_AXIS, Trainer, log
from flax_d2v.train.manifests import read_manifest
from flax_d2v.train.recipes import V2_LARGE_DEFAULTS, V2_LARGE_WARMUP_FRACTION, PretrainConfig


@dataclasses.dataclass
class Plan:
    """What an architecture brings to the shared run."""

    cfg: PretrainConfig  # with ema_start_update resolved from the checkpoint
    config: Any  # the student's model config
    module: Any
    objective: Any
    params: Any  # {"model": ..., plus the objective's own (final_proj / decoder)}
    teacher: Any  # the checkpoint's EMA teacher in the model's layout, or None
    teacher_key: str  # where the teacher lives in `TrainState.extra`
    resume_keys: tuple[str, ...] | None  # extra settings a resume must repeat (None: no settings check)
    title: str
    export: Callable[[Path, Any, Any, Any], None]


def as_config(cfg: PretrainConfig | Mapping[str, Any]) -> PretrainConfig:
    """A validated `PretrainConfig` with the architecture's defaults filled in (`PretrainConfig.resolved`)."""
    return PretrainConfig.from_settings(cfg).validate().resolved()


def pretrain(cfg: PretrainConfig | Mapping[str, Any]) -> Any:
    """`d2v pretrain` as a function: the run end to end; returns the loop's `FitResult`.

    2.0 resolves its defaults once the starting point is read (`resolve_v2`: its checkpoint's cfg, its size)."""
    cfg = PretrainConfig.from_settings(cfg).validate()
    common.init_distributed(cfg)
    plan = _data2vec2(cfg) if cfg.arch == "data2vec2" else _data2vec(cfg.resolved())
    return _run(plan)


# ------------------------------------------------------------------------------ the shared run
def _run(plan: Plan) -> Any:
    cfg = plan.cfg
    run_dir = common.run_dir(cfg)
    seed = int(cfg.seed)
    mesh, _ = common.make_mesh(cfg)
    loader = common.train_loader(
        cfg,
        read_manifest(cfg.train, require_text=False, audio_column=cfg.audio_column, text_column=cfg.text_column),
        None,
    )
    batches = CroppedBatches(loader, seed) if cfg.crop else loader
    schedule, tx = common.make_schedule_and_optimizer(cfg, plan.params)
    meta = {"objective": plan.objective.name, "model_config": json.loads(plan.config.to_json_string())}
    if plan.resume_keys is not None:
        meta["settings"] = common.resume_settings(cfg, plan.resume_keys)
    loop_cfg = common.loop_config(cfg, plot_curves=("loss", "target_var", "pred_var"), meta=meta)
    common.start_run(cfg, "pretrain_config.json")
    axes = plan.objective.params_logical_axes(logical_axes(plan.module))
    trainer = Trainer(plan.objective, tx, schedule, mesh, axes, loop_cfg)
    state, data_state, start = trainer.start(plan.params, seed)
    if data_state:
        batches.restore(data_state)
    elif start == 0 and plan.teacher is not None:  # a fresh run from a checkpoint that has its teacher
        teacher = jax.tree.map(lambda x: np.asarray(x, np.float32), plan.teacher)
        where = trainer.state_shardings.extra[plan.teacher_key]
        state = state.replace(extra={plan.teacher_key: trainer.put(teacher, where)})
        log(f"teacher: the checkpoint's EMA {plan.teacher_key}")
    try:
        result = trainer.fit(state, batches, start, data_state=batches.state)
    finally:
        batches.close()
    trainer.finish(title=f"{plan.title} {run_dir.name}")
    if not result.stopped and cfg.export_hf:
        plan.export(run_dir, plan.config, common.host(result.state.params), common.host(result.state.extra))
    return result


def _with_teacher_updates(cfg: PretrainConfig, seen: int) -> PretrainConfig:
    return cfg.replace(ema_start_update=seen) if cfg.ema_start_update is None else cfg


def _objective_settings(cls: type, cfg: PretrainConfig) -> Any:
    """The objective's dataclass from the recipe's settings of the same names (unset ones: its defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: getattr(cfg, k) for k in names if getattr(cfg, k, None) is not None})


def _random_init(cfg: PretrainConfig, presets: Mapping[str, Any], config_cls: Any) -> tuple[Any, str] | None:
    """(config, description) when the run starts from scratch: --preset, or --model naming a preset or config.json."""
    name = cfg.init_model
    if cfg.preset is not None or (name in presets and not Path(name).exists()):  # (a URL is never a preset)
        if name not in presets:
            raise D2VError(f"--preset: {name!r} is not one of {'|'.join(presets)}")
        kind = "data2vec 2.0 preset" if config_cls is Data2Vec2Config else "preset"
        return presets[name](), f"random init, {kind} {name}"
    if name.endswith(".json") and (is_url(name) or Path(name).is_file()):  # a transformers / flax-d2v config.json
        return config_cls.from_json_file(localize(name)), f"random init, {name}"
    return None


# ------------------------------------------------------------------------------ data2vec 1.0
def load_init(cfg: PretrainConfig | Mapping[str, Any]) -> tuple[Any, dict | None, dict, str, int]:
    """(model config, encoder params or None (random init), aux {"final_proj"?, "ema"?}, description,
    updates the checkpoint's teacher has seen (fairseq's `num_updates`; 0 when unknown or no teacher)).

    The hook for pretrained starting points: anything `flax_d2v.api.pretrained.load_any` reads gives
    the student; a fairseq `.pt` (`flax_d2v.convert.fairseq.load_fairseq`) or a flax-d2v dir with
    `flax_aux.safetensors` also gives the teacher (`ema`) and `final_proj`.
    """
    cfg = PretrainConfig.from_settings(cfg)
    scratch = _random_init(cfg, PRESETS, Data2VecAudioConfig)
    if scratch is not None:
        return scratch[0], None, {}, scratch[1], 0
    path = Path(localize(cfg.init_model))  # a URL: its local copy
    aux: dict = {}
    fairseq_cfg: dict = {}
    if path.is_file() and path.suffix == ".pt":
        ck = load_fairseq(path)
        config, has_head, params, aux, fairseq_cfg = ck.config, ck.is_ctc, ck.params, dict(ck.aux or {}), ck.cfg or {}
    else:
        config, spec, params, _ = load_any(path)
        has_head = not spec.is_base
        if path.is_dir() and is_flax_dir(path):
            aux = dict(load_flax_aux(path) or {})
            if (path / "fairseq_cfg.json").is_file():  # converted by `d2v convert x.pt`
                fairseq_cfg = read_json_object(path / "fairseq_cfg.json")
    if has_head:
        params = params["data2vec_audio"]  # a fine-tuned model: its encoder, the head left out
    parts = ["student"] + [k for k in ("final_proj", "ema") if k in aux]
    seen = int(fairseq_cfg.get("num_updates") or 0) if "ema" in aux else 0
    return config, params, aux, f"{path} ({', '.join(parts)})", seen


def _data2vec(cfg: PretrainConfig) -> Plan:
    seed = int(cfg.seed)
    base_config, loaded, aux, source, teacher_updates = load_init(cfg)
    cfg = _with_teacher_updates(cfg, teacher_updates)
    config = base_config.replace(**cfg.regularisation())
    if not config.has_masked_spec_embed:  # the mask embedding pretraining needs; HF's default rate
        config = config.replace(mask_time_prob=0.05)
    if not config.apply_spec_augment:  # the objective's span masks are the point of pretraining
        config = config.replace(apply_spec_augment=True)
    module = Data2VecAudioModel(config, **common.module_options(cfg))
    objective = Data2VecObjective(
        module, _objective_settings(Data2VecPretrainConfig, cfg), axis_name=PMAP_AXIS if cfg.pmap else None
    )
    model_params, new_keys, _ = common.graft(init_params(module, seed), common.stacked(cfg, loaded))
    params = objective.init_params(model_params, jax.random.fold_in(jax.random.PRNGKey(seed), 1), aux.get("final_proj"))
    log(f"init: {source}" + (f"; new tensors: {', '.join(new_keys)}" if loaded is not None and new_keys else ""))
    teacher = common.stacked(cfg, {"encoder": aux["ema"]})["encoder"] if "ema" in aux else None
    return Plan(cfg, config, module, objective, params, teacher, "encoder", ("crop",), "d2v pretrain", export)


def export(run_dir: Path, config: Any, params: Any, extra: Any) -> None:
    """RUN/hf (transformers Data2VecAudioModel) and RUN/flax (student + teacher and final_proj aux)."""
    if jax.process_index() != 0:
        return
    teacher = extra["encoder"]
    if is_scanned({"encoder": teacher}):
        teacher = unstack_layers({"encoder": teacher})["encoder"]
    save_hf(run_dir / "hf", config, params["model"], overwrite=True)
    save_flax(
        run_dir / "flax",
        config,
        params["model"],
        aux={"final_proj": params["final_proj"], "ema": teacher},
        overwrite=True,
    )
    log(f"wrote {run_dir / 'hf'} (transformers Data2VecAudioModel) and {run_dir / 'flax'} (with teacher, final_proj)")


# ------------------------------------------------------------------------------ data2vec 2.0
def load_init_v2(cfg: PretrainConfig | Mapping[str, Any]) -> tuple[Any, dict | None, dict, str, int]:
    """(2.0 config, model params or None, aux {"ema"?, "decoder"?}, description, teacher's update count)."""
    config, params, aux, source, seen, _ = _load_init_v2(PretrainConfig.from_settings(cfg))
    return config, params, aux, source, seen


def _load_init_v2(cfg: PretrainConfig) -> tuple[Any, dict | None, dict, str, int, dict]:
    """`load_init_v2` and the checkpoint's fairseq cfg (`fairseq_cfg.json`'s "cfg"; {} when none)."""
    scratch = _random_init(cfg, PRESETS_V2, Data2Vec2Config)
    if scratch is not None:
        return scratch[0], None, {}, scratch[1], 0, {}
    path = Path(localize(cfg.init_model))  # a URL: its local copy
    config, spec, params, resolved = load_any(path)
    is_ctc = spec.architecture == "Data2VecAudioForCTC"
    if not isinstance(config, Data2Vec2Config):
        raise D2VError(
            f"--model {path}: a data2vec 1.0 model; --arch data2vec2 needs a 2.0 checkpoint "
            "(or --preset for a random init)"
        )
    aux = {} if is_ctc else load_aux(resolved)
    if is_ctc:
        params = params["data2vec_audio"]
    saved: dict = {}
    if not is_ctc:  # a fine-tune's cfg is not a pretraining objective
        fcfg = (Path(resolved) / "fairseq_cfg.json") if Path(resolved).is_dir() else None
        if fcfg is not None and fcfg.is_file():
            saved = json.loads(fcfg.read_text(encoding="utf-8"))
        elif Path(resolved).suffix == ".pt":
            saved = load_fairseq(resolved).cfg or {}
    seen = int(saved.get("num_updates") or 0) if "ema" in aux else 0
    parts = ["student"] + [k for k in ("ema", "decoder") if k in aux]
    fairseq_cfg = saved.get("cfg") if isinstance(saved.get("cfg"), dict) else {}
    return config, params, aux, f"{path} ({', '.join(parts)})", seen, fairseq_cfg


def is_large_v2(config: Any) -> bool:
    """Whether a 2.0 model has large_audio_only_task.yaml's layout (1024 wide, 16 blocks, 8 prenet blocks)."""
    return (config.hidden_size, config.num_hidden_layers, config.prenet_depth) == (1024, 16, 8)


def resolve_v2(
    cfg: PretrainConfig, config: Any, fairseq_cfg: Mapping[str, Any] | None, source: str = "--model"
) -> tuple[PretrainConfig, list[str]]:
    """(the 2.0 run's settings, log lines): a flag given wins over the checkpoint's cfg (`fairseq_cfg`, its
    objective, `clip_norm`, composite optimizer: `convert.fairseq2.pretraining_settings`), which wins over
    the size's yaml (`V2_LARGE_DEFAULTS` for a large model), which wins over `ARCH_DEFAULTS`."""
    defaults: dict[str, Any] = {}
    lines: list[str] = []
    if is_large_v2(config):
        defaults.update(V2_LARGE_DEFAULTS, warmup_fraction=V2_LARGE_WARMUP_FRACTION)
        lines.append("recipe: v2/large_audio_only_task.yaml (a large model)")
    if fairseq_cfg:
        from_ckpt = pretraining_settings(fairseq_cfg, source)
        defaults.update(from_ckpt)
        shown = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
        taken = {k: v for k, v in from_ckpt.items() if getattr(cfg, k) is None}
        over = {k: v for k, v in from_ckpt.items() if getattr(cfg, k) is not None and getattr(cfg, k) != v}
        if taken:
            lines.append(
                "settings from the checkpoint's cfg: " + ", ".join(f"{k} {shown(v)}" for k, v in taken.items())
            )
        if over:
            lines.append(
                "settings given, over the checkpoint's cfg: "
                + ", ".join(
                    f"--{k.replace('_', '-')} {shown(getattr(cfg, k))} (checkpoint: {shown(v)})"
                    for k, v in over.items()
                )
            )
    return cfg.resolved(defaults), lines


def _data2vec2(cfg: PretrainConfig) -> Plan:
    seed = int(cfg.seed)
    base_config, loaded, aux, source, teacher_updates, fairseq_cfg = _load_init_v2(cfg)
    cfg, lines = resolve_v2(cfg, base_config, fairseq_cfg, str(cfg.init_model))
    for line in lines:
        log(line)
    cfg = _with_teacher_updates(cfg, teacher_updates)
    config = base_config.replace(**cfg.regularisation())
    module = Data2Vec2Model(config, **common.module_options(cfg))
    objective = Data2Vec2Objective(
        module, _objective_settings(Data2Vec2PretrainConfig, cfg), axis_name=PMAP_AXIS if cfg.pmap else None
    )
    model_params, new_keys, _ = common.graft(init_params(module, seed), loaded)
    params = objective.init_params(model_params, jax.random.fold_in(jax.random.PRNGKey(seed), 1), aux.get("decoder"))
    log(f"init: {source}" + (f"; new tensors: {', '.join(new_keys)}" if loaded is not None and new_keys else ""))
    teacher = objective.teacher_of(aux["ema"]) if "ema" in aux else None
    title = "d2v pretrain --arch data2vec2"
    return Plan(cfg, config, module, objective, params, teacher, "teacher", V2_RESUME_KEYS, title, export_v2)


# what a 2.0 resume must repeat beside `run_common.RESUME_KEYS` (1.0: crop): the teacher's and the optimizer
# state's shapes change with these
V2_RESUME_KEYS = ("crop", "ema_encoder_only", "weight_decay_exempt")


def export_v2(run_dir: Path, config: Any, params: Any, extra: Any) -> None:
    """RUN/flax: the student, with the teacher (`ema`) and the decoder in `flax_aux.safetensors`."""
    if jax.process_index() != 0:
        return
    pre = json.dumps({**preprocessor_config(do_normalize=True), "normalize_eps": 1e-5}, indent=2) + "\n"
    # the teacher as it computes: with ema_encoder_only its blocks over the student's other parts
    teacher = {**teacher_subtree(params["model"]), **extra["teacher"]}
    save_flax(
        run_dir / "flax",
        config,
        params["model"],
        aux={"ema": teacher, "decoder": params["decoder"]},
        extra_files={"preprocessor_config.json": pre},
        overwrite=True,
    )
    log(
        f"wrote {run_dir / 'flax'} (data2vec 2.0 student, teacher and decoder; "
        f"`d2v convert {run_dir / 'flax'} out.pt --to fairseq` for fairseq)"
    )
