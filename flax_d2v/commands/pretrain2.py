"""`d2v pretrain --arch data2vec2`: data2vec 2.0 pretraining with fairseq's `v2/base_audio_only_task.yaml`.

    d2v pretrain --arch data2vec2 --train clips.tsv --out runs/v2 --steps 400000 --batch-size 8 --config base
    d2v pretrain --arch data2vec2 --train clips.tsv --out runs/v2b --steps 1000 --batch-size 8 --model base_libri.pt

Same loop, mesh, checkpoints and resume as 1.0 (`commands/pretrain.py` parses the flags). Flags left at
their 1.0 defaults take the 2.0 recipe's (`V2_RECIPE`): lr 7.5e-4, cosine schedule with 2%% warm-up (the
yaml's 8000 of 400000 updates), EMA 0.999 -> 0.99999 over 75000 updates, mask_prob 0.5, mask_length 5.
`--model` takes a fairseq 2.0 `.pt` or a flax-d2v 2.0 directory; its EMA teacher and decoder are
used when present. Batches are always cropped to their shortest clip (fairseq pretrains unpadded).
Writes `RUN/flax` (student, with `flax_aux.safetensors`: teacher `ema` and `decoder`) at the end;
`d2v convert RUN/flax out.pt --to fairseq` gives fairseq users the checkpoint, `d2v finetune --model
RUN/flax` fine-tunes it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from flax_d2v.errors import D2VError
from flax_d2v.train import run_common as R

# flag -> (1.0 default in commands/pretrain.py, data2vec 2.0 default from base_audio_only_task.yaml)
V2_RECIPE: dict[str, tuple[Any, Any]] = {
    "learning_rate": (5e-4, 7.5e-4),
    "lr_schedule": ("tri_stage", "cosine"),
    "ema_end_decay": (0.9999, 0.99999),
    "ema_anneal_end_step": (30000, 75000),
    "mask_prob": (0.65, 0.5),
    "mask_length": (10, 5),
}
WARMUP_FRACTION = 8000 / 400000  # warmup_updates / max_update of the yaml


def v2_settings(cfg: dict) -> dict:
    out = dict(cfg)
    for key, (v1, v2) in V2_RECIPE.items():
        if out.get(key) == v1:
            out[key] = v2
    if out.get("lr_schedule") == "cosine" and out.get("warmup_steps") is None:
        out["warmup_steps"] = max(1, round(WARMUP_FRACTION * int(out["steps"])))
    if not out.get("crop", True):
        raise D2VError("--no-crop: data2vec 2.0 pretraining runs on unpadded (cropped) batches, as fairseq's")
    return out


def objective_config(cfg: dict) -> Any:
    from flax_d2v.train.pretrain2 import Data2Vec2PretrainConfig

    names = {f.name for f in dataclasses.fields(Data2Vec2PretrainConfig)}
    return Data2Vec2PretrainConfig(**{k: cfg[k] for k in names if cfg.get(k) is not None})


def load_init(cfg: dict) -> tuple[Any, dict | None, dict, str, int]:
    """(2.0 config, model params or None, aux {"ema"?, "decoder"?}, description, teacher's update count)."""
    from flax_d2v.data2vec2 import PRESETS_V2, Data2Vec2Config

    if cfg.get("config"):
        name = str(cfg["config"])
        if name in PRESETS_V2 and not Path(name).exists():
            return PRESETS_V2[name](), None, {}, f"random init, data2vec 2.0 preset {name}", 0
        if not Path(name).is_file():
            raise D2VError(f"--config: {name} is neither a preset ({'|'.join(PRESETS_V2)}) nor a config.json file")
        return Data2Vec2Config.from_json_file(name), None, {}, f"random init, {name}", 0
    from flax_d2v.pretrained import load_any
    from flax_d2v.teacher import load_aux

    path = Path(cfg["model"])
    config, spec, params, resolved = load_any(path)
    is_ctc = spec.architecture == "Data2VecAudioForCTC"
    if not isinstance(config, Data2Vec2Config):
        raise D2VError(
            f"--model {path}: a data2vec 1.0 model; --arch data2vec2 needs a 2.0 checkpoint "
            "(or --config for a random init)"
        )
    aux = {} if is_ctc else load_aux(resolved)
    if is_ctc:
        params = params["data2vec_audio"]
    seen = 0
    if "ema" in aux:
        fcfg = (Path(resolved) / "fairseq_cfg.json") if Path(resolved).is_dir() else None
        if fcfg is not None and fcfg.is_file():
            seen = int(json.loads(fcfg.read_text(encoding="utf-8")).get("num_updates") or 0)
        elif Path(resolved).suffix == ".pt":
            from flax_d2v.convert.fairseq import load_fairseq

            seen = int(load_fairseq(resolved).cfg.get("num_updates") or 0)
    parts = ["student"] + [k for k in ("ema", "decoder") if k in aux]
    return config, params, aux, f"{path} ({', '.join(parts)})", seen


def pretrain_v2(cfg: dict) -> Any:
    """The `--arch data2vec2` run (also used by tests): returns the loop's `FitResult`."""
    import jax
    import numpy as np

    from flax_d2v.commands.pretrain import regularisation
    from flax_d2v.data2vec2 import Data2Vec2Model
    from flax_d2v.modeling import init_params, logical_axes
    from flax_d2v.train.loop import PMAP_AXIS, Trainer, log
    from flax_d2v.train.manifests import read_manifest
    from flax_d2v.train.pretrain import CroppedBatches
    from flax_d2v.train.pretrain2 import Data2Vec2Objective

    cfg = v2_settings(cfg)
    run_dir = Path(cfg["out"])
    seed = int(cfg["seed"])
    mesh, _ = R.make_mesh(cfg)
    base_config, loaded, aux, source, teacher_updates = load_init(cfg)
    if cfg.get("ema_start_update") is None:
        cfg = {**cfg, "ema_start_update": teacher_updates}
    config = base_config.replace(**regularisation(cfg))
    module = Data2Vec2Model(config, **R.module_options(cfg))
    objective = Data2Vec2Objective(module, objective_config(cfg), axis_name=PMAP_AXIS if cfg["pmap"] else None)
    model_params, new_keys, _ = R.graft(init_params(module, seed), loaded)
    params = objective.init_params(model_params, jax.random.fold_in(jax.random.PRNGKey(seed), 1), aux.get("decoder"))
    log(f"init: {source}" + (f"; new tensors: {', '.join(new_keys)}" if loaded is not None and new_keys else ""))
    loader = R.train_loader(cfg, read_manifest(cfg["train"], require_text=False), None)
    batches = CroppedBatches(loader, seed)
    schedule, tx = R.make_schedule_and_optimizer(cfg, params)
    loop_cfg = R.loop_config(
        cfg,
        plot_curves=("loss", "target_var", "pred_var"),
        meta={"objective": objective.name, "model_config": json.loads(config.to_json_string())},
    )
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        R.save_settings(run_dir / "pretrain_config.json", cfg)
    trainer = Trainer(objective, tx, schedule, mesh, objective.params_logical_axes(logical_axes(module)), loop_cfg)
    state, data_state, start = trainer.start(params, seed)
    if data_state:
        batches.restore(data_state)
    elif start == 0 and "ema" in aux:  # a fresh run from a checkpoint that has its teacher
        teacher = jax.tree.map(lambda x: np.asarray(x, np.float32), aux["ema"])
        state = state.replace(extra={"teacher": trainer.put(teacher, trainer.state_shardings.extra["teacher"])})
        log("teacher: the checkpoint's EMA teacher")
    try:
        result = trainer.fit(state, batches, start, data_state=batches.state)
    finally:
        batches.close()
    trainer.finish(title=f"d2v pretrain --arch data2vec2 {run_dir.name}")
    if not result.stopped and cfg["export_hf"]:
        export(run_dir, config, R.host(result.state.params), R.host(result.state.extra))
    return result


def export(run_dir: Path, config: Any, params: Any, extra: Any) -> None:
    """RUN/flax: the student, with the teacher (`ema`) and the decoder in `flax_aux.safetensors`."""
    import jax

    from flax_d2v.checkpoint import save_flax
    from flax_d2v.processor import preprocessor_config
    from flax_d2v.train.loop import log

    if jax.process_index() != 0:
        return
    pre = json.dumps({**preprocessor_config(do_normalize=True), "normalize_eps": 1e-5}, indent=2) + "\n"
    save_flax(
        run_dir / "flax",
        config,
        params["model"],
        aux={"ema": extra["teacher"], "decoder": params["decoder"]},
        extra_files={"preprocessor_config.json": pre},
        overwrite=True,
    )
    log(
        f"wrote {run_dir / 'flax'} (data2vec 2.0 student, teacher and decoder; "
        f"`d2v convert {run_dir / 'flax'} out.pt --to fairseq` for fairseq)"
    )
