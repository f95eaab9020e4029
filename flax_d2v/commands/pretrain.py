"""data2vec pretraining: a masked student regresses its EMA teacher; checkpoints, metrics.jsonl, RUN/hf.

    d2v pretrain --train clips.tsv --out runs/pt --steps 400000 --batch-size 64 --config base
    d2v pretrain --train clips.tsv --out runs/pt2 --steps 1000 --batch-size 8 --model runs/pt/flax

Defaults are fairseq's `examples/data2vec/config/audio/pretraining/base_librispeech.yaml`. The
manifest needs only a `path` column. Start from scratch (`--config tiny|base|large` or a
config.json), from an HF or flax-d2v model (`--model DIR`: the teacher starts as a copy of the
student, `final_proj` fresh), or from a fairseq pretrained `.pt` / a flax-d2v dir with
`flax_aux.safetensors` (teacher and `final_proj` taken from it). Running the same command again
with the same `--out` resumes from the latest checkpoint in `RUN/checkpoints`.

Writes `RUN/metrics.jsonl` (step, loss, lr, grad_norm, ema_decay, target_var, pred_var, ...),
`RUN/training_curves.png`, `RUN/hf/` (the student as a transformers `Data2VecAudioModel`, ready
for `d2v finetune --model RUN/hf`) and `RUN/flax/` (student + `flax_aux.safetensors` with the
teacher and `final_proj`, to continue pretraining from).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from flax_d2v.config import PRESETS
from flax_d2v.errors import D2VError
from flax_d2v.train import run_common as R

# The pretraining recipe (fairseq base_librispeech): where its defaults differ from fine-tuning's.
RECIPE = {
    "learning_rate": 5e-4,
    "phase_ratio": "0.03,0.9,0.07",
    "final_lr_scale": 0.01,
    "adam_eps": 1e-6,
    "weight_decay": 0.01,
    "freeze_feature_encoder": False,
    "min_seconds": 2.0,
}  # min_sample_size 32000
# fairseq base_librispeech.yaml (+ Wav2Vec2Config defaults it leaves alone), in HF config names.
REGULARISATION = {
    "hidden_dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "feat_proj_dropout": 0.0,
    "layerdrop": 0.05,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    bool_flag = argparse.BooleanOptionalAction
    g = p.add_argument_group("run")
    g.add_argument("--train", required=True, help="manifest: TSV with a `path` column, fairseq .tsv, tfds:NAME/SPLIT")
    g.add_argument("--out", required=True, help="run directory (resumes when it holds checkpoints)")
    init = g.add_mutually_exclusive_group(required=True)
    init.add_argument("--model", help="init from an HF or flax-d2v model dir, or a fairseq pretrained .pt")
    init.add_argument("--config", help="random init: a preset (tiny|base|large) or a transformers config.json")
    groups = R.add_common_arguments(p, {**R.COMMON_DEFAULTS, **RECIPE}, groups={"run": g})
    g.add_argument("--export-hf", action=bool_flag, default=True, help="write RUN/hf and RUN/flax at the end")
    g.add_argument(
        "--arch",
        choices=["data2vec", "data2vec2"],
        default="data2vec",
        help="data2vec (1.0, base_librispeech.yaml) or data2vec2 (2.0, v2/base_audio_only_task.yaml: "
        "flags left at their 1.0 defaults take 2.0's; see flax_d2v/commands/pretrain2.py)",
    )
    groups["data"].add_argument(
        "--crop",
        action=bool_flag,
        default=True,
        help="crop each batch to its shortest clip, random offsets, no padding (fairseq's pretraining)",
    )
    g = p.add_argument_group("data2vec objective (fairseq names)")
    g.add_argument("--ema-decay", type=float, default=0.999, help="teacher EMA decay at the start")
    g.add_argument("--ema-end-decay", type=float, default=0.9999, help="teacher EMA decay after the anneal")
    g.add_argument("--ema-anneal-end-step", type=int, default=30000, help="updates over which the decay anneals")
    g.add_argument(
        "--ema-start-update",
        type=int,
        default=None,
        help="updates the teacher has already seen, so the decay schedule continues (default: the "
        "fairseq checkpoint's num_updates when --model brings its EMA teacher, else 0)",
    )
    g.add_argument(
        "--ema-layers-only",
        action=bool_flag,
        default=True,
        help="copy the positional conv into the teacher instead of averaging it",
    )
    g.add_argument("--average-top-k-layers", type=int, default=8, help="teacher layers averaged into the target")
    g.add_argument(
        "--instance-norm-target-layer",
        action=bool_flag,
        default=True,
        help="instance-normalise each target layer over time",
    )
    g.add_argument(
        "--instance-norm-over-padding",
        action=bool_flag,
        default=False,
        help="include padded frames in the target statistics (fairseq verbatim; only matters with --no-crop)",
    )
    g.add_argument("--mask-prob", type=float, default=0.65, help="span-start rate: ~49%% of frames end up masked")
    g.add_argument("--mask-length", type=int, default=10, help="frames per masked span")
    g.add_argument(
        "--require-same-masks", action=bool_flag, default=True, help="trim every row to the batch's smallest mask count"
    )
    g.add_argument("--clone-batch", type=int, default=8, help="2.0: masked copies of each clip (clone_batch)")
    g.add_argument("--mask-prob-adjust", type=float, default=0.05, help="2.0: extra span centres (mask_prob_adjust)")
    g.add_argument("--inverse-mask", action=bool_flag, default=False, help="2.0: mask_prob is the kept fraction")
    g.add_argument("--mask-dropout", type=float, default=0.0, help="2.0: extra span centres (mask_dropout)")
    g.add_argument("--loss-beta", type=float, default=0.0, help="0: squared error; >0: smooth L1 with this beta")
    g.add_argument("--loss-scale", type=float, default=None, help="loss scale (default 1/sqrt(hidden size))")
    g.add_argument("--min-target-var", type=float, default=0.1, help="stop when target_var falls below")
    g.add_argument("--min-pred-var", type=float, default=0.01, help="stop when pred_var falls below")
    g.add_argument("--guard-after", type=int, default=5000, help="the two guards act after this many updates")
    g = p.add_argument_group("regularisation of the student (HF config names; defaults: fairseq base)")
    g.add_argument("--dropout", type=float, default=None, help="hidden, attention and activation dropout at once")
    for name, value in REGULARISATION.items():
        g.add_argument("--" + name.replace("_", "-"), type=float, default=None, help=f"default {value}")


def run(args: argparse.Namespace) -> int:
    cfg = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    R.init_distributed(cfg)
    pretrain(cfg)
    return 0


def objective_config(cfg: dict) -> Any:
    from flax_d2v.train.pretrain import Data2VecPretrainConfig

    names = {f.name for f in dataclasses.fields(Data2VecPretrainConfig)}
    return Data2VecPretrainConfig(**{k: cfg[k] for k in names if k in cfg})


def regularisation(cfg: dict) -> dict[str, float]:
    over = dict(REGULARISATION)
    if cfg.get("dropout") is not None:
        over.update(hidden_dropout=cfg["dropout"], attention_dropout=cfg["dropout"], activation_dropout=cfg["dropout"])
    over.update({k: cfg[k] for k in REGULARISATION if cfg.get(k) is not None})
    return over


def load_init(cfg: dict) -> tuple[Any, dict | None, dict, str, int]:
    """(model config, encoder params or None (random init), aux {"final_proj"?, "ema"?}, description,
    updates the checkpoint's teacher has seen (fairseq's `num_updates`; 0 when unknown or no teacher)).

    The hook for pretrained starting points: anything `flax_d2v.pretrained.load_any` reads gives
    the student; a fairseq `.pt` (`flax_d2v.convert.fairseq.load_fairseq`) or a flax-d2v dir with
    `flax_aux.safetensors` also gives the teacher (`ema`) and `final_proj`.
    """
    from flax_d2v.config import Data2VecAudioConfig, preset

    if cfg.get("config"):
        name = str(cfg["config"])
        if name in PRESETS and not Path(name).exists():
            return preset(name), None, {}, f"random init, preset {name}", 0
        if not Path(name).is_file():
            raise D2VError(f"--config: {name} is neither a preset ({'|'.join(PRESETS)}) nor a config.json file")
        return Data2VecAudioConfig.from_json_file(name), None, {}, f"random init, {name}", 0
    from flax_d2v.pretrained import load_any

    path = Path(cfg["model"])
    aux: dict = {}
    fairseq_cfg: dict = {}
    if path.is_file() and path.suffix == ".pt":
        from flax_d2v.convert.fairseq import load_fairseq

        ck = load_fairseq(path)
        config, has_head, params, aux, fairseq_cfg = ck.config, ck.is_ctc, ck.params, dict(ck.aux or {}), ck.cfg or {}
    else:
        config, spec, params, _ = load_any(path)
        has_head = not spec.is_base
        from flax_d2v.checkpoint import is_flax_dir, load_flax_aux
        from flax_d2v.fileio import read_json_object

        if path.is_dir() and is_flax_dir(path):
            aux = dict(load_flax_aux(path) or {})
            if (path / "fairseq_cfg.json").is_file():  # converted by `d2v convert x.pt`
                fairseq_cfg = read_json_object(path / "fairseq_cfg.json")
    if has_head:
        params = params["data2vec_audio"]  # a fine-tuned model: its encoder, the head left out
    parts = ["student"] + [k for k in ("final_proj", "ema") if k in aux]
    seen = int(fairseq_cfg.get("num_updates") or 0) if "ema" in aux else 0
    return config, params, aux, f"{path} ({', '.join(parts)})", seen


def pretrain(cfg: dict) -> Any:
    """The whole command as a function (also used by tests): returns the loop's `FitResult`."""
    if cfg.get("arch") == "data2vec2":
        from flax_d2v.commands.pretrain2 import pretrain_v2

        return pretrain_v2(cfg)
    import jax
    import numpy as np

    from flax_d2v.modeling import Data2VecAudioModel, init_params, logical_axes
    from flax_d2v.train.loop import PMAP_AXIS, Trainer, log
    from flax_d2v.train.manifests import read_manifest
    from flax_d2v.train.pretrain import CroppedBatches, Data2VecObjective

    run_dir = Path(cfg["out"])
    seed = int(cfg["seed"])
    mesh, _ = R.make_mesh(cfg)

    base_config, loaded, aux, source, teacher_updates = load_init(cfg)
    if cfg.get("ema_start_update") is None:
        cfg = {**cfg, "ema_start_update": teacher_updates}
    config = base_config.replace(**regularisation(cfg))
    if not config.has_masked_spec_embed:  # the mask embedding pretraining needs; HF's default rate
        config = config.replace(mask_time_prob=0.05)
    if not config.apply_spec_augment:  # the objective's span masks are the point of pretraining
        config = config.replace(apply_spec_augment=True)
    module = Data2VecAudioModel(config, **R.module_options(cfg))
    objective = Data2VecObjective(module, objective_config(cfg), axis_name=PMAP_AXIS if cfg["pmap"] else None)
    model_params, new_keys, _ = R.graft(init_params(module, seed), R.stacked(cfg, loaded))
    final_proj = aux.get("final_proj")
    params = objective.init_params(model_params, jax.random.fold_in(jax.random.PRNGKey(seed), 1), final_proj)
    log(f"init: {source}" + (f"; new tensors: {', '.join(new_keys)}" if loaded is not None and new_keys else ""))

    loader = R.train_loader(cfg, read_manifest(cfg["train"], require_text=False), None)
    batches = CroppedBatches(loader, seed) if cfg["crop"] else loader

    schedule, tx = R.make_schedule_and_optimizer(cfg, params)
    loop_cfg = R.loop_config(
        cfg,
        plot_curves=("loss", "target_var", "pred_var"),
        meta={
            "objective": objective.name,
            "model_config": json.loads(config.to_json_string()),
            "settings": R.resume_settings(cfg, ("crop",)),
        },
    )
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        R.save_settings(run_dir / "pretrain_config.json", cfg)
    trainer = Trainer(objective, tx, schedule, mesh, objective.params_logical_axes(logical_axes(module)), loop_cfg)
    state, data_state, start = trainer.start(params, seed)
    if data_state:
        batches.restore(data_state)
    elif start == 0 and "ema" in aux:  # a fresh run from a checkpoint that has its teacher
        teacher = R.stacked(cfg, {"encoder": aux["ema"]})["encoder"]
        teacher = jax.tree.map(lambda x: np.asarray(x, np.float32), teacher)
        state = state.replace(extra={"encoder": trainer.put(teacher, trainer.state_shardings.extra["encoder"])})
        log("teacher: the checkpoint's EMA encoder")
    try:
        result = trainer.fit(state, batches, start, data_state=batches.state)
    finally:
        batches.close()
    trainer.finish(title=f"d2v pretrain {run_dir.name}")
    if not result.stopped and cfg["export_hf"]:
        export(run_dir, config, R.host(result.state.params), R.host(result.state.extra))
    return result


def export(run_dir: Path, config: Any, params: Any, extra: Any) -> None:
    """RUN/hf (transformers Data2VecAudioModel) and RUN/flax (student + teacher and final_proj aux)."""
    import jax

    from flax_d2v.checkpoint import save_flax
    from flax_d2v.convert.hf import save_hf
    from flax_d2v.params import is_scanned, unstack_layers
    from flax_d2v.train.loop import log

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
