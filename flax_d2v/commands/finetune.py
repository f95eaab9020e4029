"""CTC fine-tuning from transcribed audio: checkpoints, metrics.jsonl, and an HF model in RUN/hf.

    d2v finetune --train train.tsv --eval dev.tsv --model facebook-base-dir --out runs/ft \
        --steps 20000 --batch-size 8 --learning-rate 5e-5 --seed 0 [--mesh data=2,fsdp=4]

Every hyper-parameter is a flag; `--config FILE` reads the same keys (flag names, `-` or `_`)
from a JSON object, and flags given on the command line win. The resolved settings are written
to `RUN/finetune_config.json`. Running the same command again with the same `--out` resumes from
the latest checkpoint in `RUN/checkpoints`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from flax_d2v.errors import D2VError

# name -> (default, help). None as default means "the init model's config value".
DEFAULTS: dict[str, Any] = {
    "eval": None, "vocab": None, "save_every": 1000, "seed": 0,
    # optimisation
    "lr_schedule": "tri_stage", "warmup_steps": None, "hold_steps": None, "decay_steps": None,
    "phase_ratio": "0.1,0.4,0.5", "init_lr_scale": 0.01, "final_lr_scale": 0.05,
    "adam_b1": 0.9, "adam_b2": 0.98, "adam_eps": 1e-8, "weight_decay": 0.0, "clip_norm": 0.0, "grad_accum": 1,
    "freeze_feature_encoder": True, "freeze_transformer_steps": 0,
    # regularisation (None: keep the init model's config)
    "dropout": None, "hidden_dropout": None, "attention_dropout": None, "activation_dropout": None,
    "feat_proj_dropout": None, "final_dropout": None, "layerdrop": None,
    "mask_time_prob": None, "mask_time_length": None, "mask_time_min_masks": None,
    "mask_feature_prob": None, "mask_feature_length": None, "mask_feature_min_masks": None,
    # loss
    "ctc_reduction": "mean", "ctc_zero_infinity": True,
    # compute
    "bf16": False, "remat": "none", "scan_layers": False,
    # data
    "min_seconds": None, "max_seconds": None, "eval_batch_size": None, "num_workers": 4,
    # run
    "log_every": 10, "eval_every": 0, "keep": 3, "tensorboard": False, "progress": True, "export_hf": True,
    "async_checkpoint": True,
    # scale-out
    "mesh": None, "pmap": False, "coordinator": None, "num_processes": None, "process_id": None,
}
REQUIRED = ("train", "model", "out", "steps", "batch_size", "learning_rate")
BOOL_KEYS = {k for k, v in DEFAULTS.items() if isinstance(v, bool)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # unset flags stay absent, so a --config file can fill them
    a = lambda *names, **kw: p.add_argument(*names, default=S, **kw)
    a("--config", help="JSON file with any of these settings (keys: flag names); flags win")
    g = p.add_argument_group("run")
    g.add_argument("--train", default=S, help="training manifest: TSV (path, text), fairseq .tsv(+.ltr/.wrd), "
                                              "or tfds:NAME/SPLIT")
    g.add_argument("--eval", default=S, help="evaluation manifest (WER/CER every --eval-every steps and at the end)")
    g.add_argument("--model", default=S, help="init: an HF or flax-d2v model dir, a fairseq .pt, or a preset "
                                               "tiny|base|large for random init")
    g.add_argument("--out", default=S, help="run directory (resumes when it holds checkpoints)")
    g.add_argument("--steps", type=int, default=S, help="number of optimizer updates")
    g.add_argument("--batch-size", type=int, default=S, help="clips per update (global, all devices and hosts)")
    g.add_argument("--learning-rate", type=float, default=S, help="peak learning rate")
    g.add_argument("--seed", type=int, default=S, help="seed of init, data order, dropout and masks (default 0)")
    g.add_argument("--vocab", default=S, help="vocab.json to use (default: the init model's, else built "
                                               "from the training transcripts)")
    g.add_argument("--save-every", type=int, default=S, help="checkpoint every K updates (default 1000)")
    g.add_argument("--keep", type=int, default=S, help="checkpoints kept besides the best by WER (default 3)")
    g.add_argument("--log-every", type=int, default=S, help="metrics.jsonl row every K updates (default 10)")
    g.add_argument("--eval-every", type=int, default=S, help="eval every K updates; 0: only at the end (default)")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=S, help="also write TensorBoard")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=S, help="progress bar (default on)")
    g.add_argument("--export-hf", action=argparse.BooleanOptionalAction, default=S,
                   help="write RUN/hf at the end (default on)")
    g.add_argument("--async-checkpoint", action=argparse.BooleanOptionalAction, default=S,
                   help="write checkpoints in the background (default on)")
    g = p.add_argument_group("optimisation (fairseq names in brackets)")
    g.add_argument("--lr-schedule", choices=("tri_stage", "linear", "constant"), default=S,
                   help="tri_stage (fairseq, default), linear (HF warmup+decay), constant")
    g.add_argument("--warmup-steps", type=int, default=S, help="warm-up updates (default: from --phase-ratio, "
                                                                "or 10%% for linear)")
    g.add_argument("--hold-steps", type=int, default=S, help="tri_stage hold updates")
    g.add_argument("--decay-steps", type=int, default=S, help="tri_stage decay updates")
    g.add_argument("--phase-ratio", default=S, help="tri_stage phases as fractions of --steps (default 0.1,0.4,0.5)")
    g.add_argument("--init-lr-scale", type=float, default=S, help="tri_stage start lr / peak (default 0.01)")
    g.add_argument("--final-lr-scale", type=float, default=S, help="tri_stage end lr / peak (default 0.05)")
    g.add_argument("--adam-b1", type=float, default=S, help="(adam_betas) default 0.9")
    g.add_argument("--adam-b2", type=float, default=S, help="(adam_betas) default 0.98")
    g.add_argument("--adam-eps", type=float, default=S, help="default 1e-8")
    g.add_argument("--weight-decay", type=float, default=S, help="AdamW decoupled weight decay (default 0)")
    g.add_argument("--clip-norm", type=float, default=S, help="clip gradients to this global norm; 0 off (default)")
    g.add_argument("--grad-accum", type=int, default=S, help="split each batch into K sequential micro-batches "
                                                              "(update_freq; default 1)")
    g.add_argument("--freeze-feature-encoder", action=argparse.BooleanOptionalAction, default=S,
                   help="keep the conv feature encoder fixed (feature_grad_mult 0; default on)")
    g.add_argument("--freeze-transformer-steps", type=int, default=S,
                   help="train only lm_head for the first K updates (freeze_finetune_updates; default 0)")
    g = p.add_argument_group("regularisation (HF config names; default: the init model's config)")
    g.add_argument("--dropout", type=float, default=S, help="sets all of the dropouts below at once")
    for name in ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout", "final_dropout",
                 "layerdrop", "mask_time_prob", "mask_feature_prob"):
        g.add_argument("--" + name.replace("_", "-"), type=float, default=S)
    for name in ("mask_time_length", "mask_time_min_masks", "mask_feature_length", "mask_feature_min_masks"):
        g.add_argument("--" + name.replace("_", "-"), type=int, default=S)
    g = p.add_argument_group("loss")
    g.add_argument("--ctc-reduction", choices=("mean", "sum", "token", "sentence"), default=S,
                   help="mean (HF, default), sum (HF), token (fairseq sentence_avg false), "
                        "sentence (fairseq sentence_avg true)")
    g.add_argument("--ctc-zero-infinity", action=argparse.BooleanOptionalAction, default=S,
                   help="impossible alignments give 0 loss (default on)")
    g = p.add_argument_group("compute")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=S, help="bfloat16 compute, fp32 params")
    g.add_argument("--remat", default=S, help="rematerialisation policy of the layers: none (default), "
                                              "nothing_saveable, dots_saveable, ...")
    g.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=S,
                   help="nn.scan over the layers (faster compile, params stacked)")
    g = p.add_argument_group("data")
    g.add_argument("--min-seconds", type=float, default=S, help="drop shorter clips")
    g.add_argument("--max-seconds", type=float, default=S, help="drop longer clips")
    g.add_argument("--eval-batch-size", type=int, default=S, help="default: --batch-size")
    g.add_argument("--num-workers", type=int, default=S, help="audio decoding threads (default 4)")
    g = p.add_argument_group("scale-out")
    g.add_argument("--mesh", default=S, help="device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, tensor; -1 takes "
                                             "the rest); default data=<all devices>")
    g.add_argument("--pmap", action=argparse.BooleanOptionalAction, default=S,
                   help="run the step under jax.pmap (replicated params, pmean'd gradients)")
    g.add_argument("--coordinator", default=S, help="HOST:PORT of process 0 (jax.distributed)")
    g.add_argument("--num-processes", type=int, default=S)
    g.add_argument("--process-id", type=int, default=S)


def resolve(args: argparse.Namespace | dict) -> dict[str, Any]:
    """Defaults < --config file < command-line flags; names normalised to underscores."""
    given = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
    given = {k: v for k, v in given.items() if not k.startswith("_") and k != "command"}
    cfg: dict[str, Any] = dict(DEFAULTS)
    path = given.pop("config", None)
    if path:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise D2VError(f"{path}: no such config file") from None
        except json.JSONDecodeError as e:
            raise D2VError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise D2VError(f"{path}: expected a JSON object of settings")
        for k, v in data.items():
            key = k.replace("-", "_")
            if key not in DEFAULTS and key not in REQUIRED:
                raise D2VError(f"{path}: unknown key {k!r}")
            cfg[key] = v
    cfg.update(given)
    missing = [k for k in REQUIRED if cfg.get(k) is None]
    if missing:
        raise D2VError("missing required setting(s): " + ", ".join("--" + k.replace("_", "-") for k in missing))
    for k in ("steps", "batch_size"):
        if int(cfg[k]) < 1:
            raise D2VError(f"--{k.replace('_', '-')}: must be >= 1, got {cfg[k]}")
    return cfg


DROPOUT_KEYS = ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout", "final_dropout")
CONFIG_KEYS = DROPOUT_KEYS + ("layerdrop", "mask_time_prob", "mask_time_length", "mask_time_min_masks",
                              "mask_feature_prob", "mask_feature_length", "mask_feature_min_masks")
PRESETS = ("tiny", "base", "large")


def run(args: argparse.Namespace) -> int:
    cfg = resolve(args)
    from flax_d2v.train import sharding as S

    S.initialize_distributed(cfg["coordinator"], cfg["num_processes"], cfg["process_id"])  # before any device use
    finetune(cfg)
    return 0


# ------------------------------------------------------------------------------------------ pieces
def _write_json_atomic(path: Path, obj: Any) -> None:
    from flax_d2v.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def choose_vocab(cfg: dict, texts: list[str], init_dir: Path | None, run_dir: Path) -> tuple[dict[str, int], str]:
    """--vocab, else the run's own vocab.json (resume), else the init model's, else built from `texts`."""
    from flax_d2v.train import vocab as V

    if cfg["vocab"]:
        return V.load_vocab(cfg["vocab"]), str(cfg["vocab"])
    if (run_dir / "vocab.json").is_file():
        return V.load_vocab(run_dir / "vocab.json"), str(run_dir / "vocab.json")
    if init_dir is not None and (init_dir / "vocab.json").is_file():
        return V.load_vocab(init_dir / "vocab.json"), str(init_dir / "vocab.json")
    return V.build_vocab(texts), "the training transcripts"


def training_config(base: Any, cfg: dict, vocab: dict[str, int]) -> Any:
    """The init model's config with this run's vocabulary and regularisation (HF semantics)."""
    over: dict[str, Any] = {}
    if cfg["dropout"] is not None:
        over.update({k: float(cfg["dropout"]) for k in DROPOUT_KEYS})
    over.update({k: cfg[k] for k in CONFIG_KEYS if cfg.get(k) is not None})
    over.update(vocab_size=len(vocab), pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"],
                eos_token_id=vocab["</s>"], ctc_zero_infinity=bool(cfg["ctc_zero_infinity"]),
                ctc_loss_reduction="sum" if cfg["ctc_reduction"] == "sum" else "mean")
    return base.replace(**over)


def graft(fresh: dict, loaded: dict | None) -> tuple[dict, list[str], list[str]]:
    """`fresh` with every entry of `loaded` whose path and shape match; (params, new keys, dropped keys)."""
    import numpy as np

    from flax_d2v.convert.keys import flatten, unflatten

    f = flatten(fresh)
    if loaded is None:
        return fresh, [], []
    l_flat = flatten(loaded)
    out, new = {}, []
    for k, v in f.items():
        if k in l_flat and tuple(np.shape(l_flat[k])) == tuple(v.shape):
            out[k] = np.asarray(l_flat[k], dtype=np.float32)
        else:
            out[k] = np.asarray(v)
            new.append(k)
    dropped = [k for k in l_flat if k not in f or tuple(np.shape(l_flat[k])) != tuple(f[k].shape)]
    return unflatten(out), new, dropped


def load_init(cfg: dict) -> tuple[Any, dict | None, Path | None]:
    """(config, CTC-layout params or None for random init, the init directory if any)."""
    from flax_d2v.config import preset

    name = str(cfg["model"])
    if name in PRESETS and not Path(name).exists():
        return preset(name), None, None
    from flax_d2v.pretrained import load_any

    config, is_ctc, params, where = load_any(name)
    if not is_ctc:
        params = {"data2vec_audio": params}
    return config, params, Path(where) if Path(where).is_dir() else None


def _host(tree: Any) -> Any:
    """Global (possibly sharded, multi-host) arrays -> numpy on every process."""
    import jax
    import numpy as np

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def make_eval_fn(objective: Any, trainer: Any, loader: Any, manifest: Any, vocab: dict[str, int]):
    """eval_fn(state) -> {"wer", "cer", "eval_clips"}: greedy CTC over the whole eval manifest."""
    import jax
    import numpy as np

    from flax_d2v.train import sharding as S
    from flax_d2v.train import vocab as V
    from flax_d2v.train.ctc import greedy_decode
    from flax_d2v.train.metrics import error_rates

    def predict(params, batch):
        ids, lengths = objective.predict(params, batch)
        return ids, lengths, batch["index"]

    jitted = jax.jit(predict, in_shardings=(trainer.state_shardings.params, S.batch_sharding(trainer.mesh)),
                     out_shardings=S.replicated(trainer.mesh))

    def eval_fn(state: Any) -> dict[str, float]:
        loader.restore({"epoch": 0, "batch_in_epoch": 0})
        hyps: dict[int, str] = {}
        for batch in loader:
            arrays = {k: np.asarray(batch[k]) for k in ("input_values", "attention_mask", "index")}
            arrays["index"] = arrays["index"].astype(np.int32)
            ids, lengths, index = jitted(state.params, S.shard_batch(arrays, trainer.mesh))
            ids, lengths, index = np.asarray(ids), np.asarray(lengths), np.asarray(index)
            for i, text in zip(index, greedy_decode(ids, lengths, vocab), strict=True):
                if i >= 0:
                    hyps[int(i)] = text
        order = sorted(hyps)
        refs = [V.normalize_transcript(manifest.texts[i] or "") for i in order]
        return {**error_rates(refs, [hyps[i] for i in order]), "eval_clips": len(order)}

    return eval_fn


def export_hf(run_dir: Path, config: Any, params: Any, vocab: dict[str, int]) -> Path | None:
    """RUN/hf: transformers' Data2VecAudioForCTC + Wav2Vec2Processor files, written atomically."""
    import jax

    from flax_d2v.convert.hf import save_hf
    from flax_d2v.train import vocab as V

    host = _host(params)
    if jax.process_index() != 0:
        return None
    with tempfile.TemporaryDirectory(prefix=".hf-files-", dir=run_dir) as files:
        V.save_tokenizer_files(files, vocab)
        V.save_preprocessor_config(files)
        return save_hf(run_dir / "hf", config, host, files_from=files, overwrite=True)


# ------------------------------------------------------------------------------------------ the run
def finetune(cfg: dict) -> Any:
    """The whole command as a function (also used by tests): returns the loop's `FitResult`."""
    import jax
    import jax.numpy as jnp

    from flax_d2v.modeling import Data2VecAudioForCTC, init_params, logical_axes
    from flax_d2v.train import data as D
    from flax_d2v.train import sharding as S
    from flax_d2v.train.ctc import CTCObjective
    from flax_d2v.train.loop import LoopConfig, Trainer, log
    from flax_d2v.train.schedules import make_schedule
    from flax_d2v.train.state import make_optimizer

    run_dir = Path(cfg["out"])
    is_main = jax.process_index() == 0
    steps, batch_size = int(cfg["steps"]), int(cfg["batch_size"])
    mesh = S.make_mesh(None if cfg["pmap"] else cfg["mesh"])
    dp = jax.device_count() if cfg["pmap"] else S.data_parallel_size(mesh)
    accum = int(cfg["grad_accum"])
    if batch_size % (dp * accum):
        raise D2VError(f"--batch-size: {batch_size} must be divisible by the data-parallel size {dp} "
                       f"x --grad-accum {accum}")

    manifest = D.read_manifest(cfg["train"], require_text=True)
    base_config, loaded, init_dir = load_init(cfg)
    vocab, vocab_source = choose_vocab(cfg, manifest.texts, init_dir, run_dir)
    config = training_config(base_config, cfg, vocab)
    dtype = jnp.bfloat16 if cfg["bf16"] else jnp.float32
    module = Data2VecAudioForCTC(config, dtype=dtype, remat_policy=cfg["remat"], scan_layers=bool(cfg["scan_layers"]),
                                 freeze_feature_encoder=bool(cfg["freeze_feature_encoder"]))
    if loaded is not None and cfg["scan_layers"]:
        from flax_d2v.convert.keys import stack_layers

        loaded = stack_layers(loaded)
    fresh = init_params(module, int(cfg["seed"]))
    params, new_keys, dropped = graft(fresh, loaded)
    if loaded is not None:
        log(f"init from {cfg['model']}: {len(new_keys)} new tensors" + (f" ({', '.join(new_keys[:4])}"
            f"{', ...' if len(new_keys) > 4 else ''})" if new_keys else "")
            + (f", {len(dropped)} unused ({', '.join(dropped[:4])})" if dropped else ""))
    else:
        log(f"random init: preset {cfg['model']}")
    log(f"vocab: {len(vocab)} symbols from {vocab_source}")

    pc, pi = jax.process_count(), jax.process_index()
    loader = D.BatchLoader(manifest, batch_size=batch_size, vocab=vocab, seed=int(cfg["seed"]),
                           min_seconds=cfg["min_seconds"], max_seconds=cfg["max_seconds"],
                           process_index=pi, process_count=pc, num_workers=int(cfg["num_workers"]))
    log(f"train data: {json.dumps(loader.summary())}")
    eval_loader = eval_manifest = None
    if cfg["eval"]:
        eval_manifest = D.read_manifest(cfg["eval"], require_text=True)
        eval_bs = int(cfg["eval_batch_size"] or batch_size)
        if eval_bs % dp:
            raise D2VError(f"--eval-batch-size: {eval_bs} must be divisible by the data-parallel size {dp}")
        eval_loader = D.BatchLoader(eval_manifest, batch_size=eval_bs, vocab=None, require_text=True,
                                    shuffle=False, repeat=False, drop_remainder=False, process_index=pi,
                                    process_count=pc, num_workers=int(cfg["num_workers"]))

    phase = tuple(float(x) for x in str(cfg["phase_ratio"]).split(","))
    schedule = make_schedule(cfg["lr_schedule"], float(cfg["learning_rate"]), steps,
                             warmup_steps=cfg["warmup_steps"], hold_steps=cfg["hold_steps"],
                             decay_steps=cfg["decay_steps"], phase_ratio=phase,
                             init_lr_scale=float(cfg["init_lr_scale"]), final_lr_scale=float(cfg["final_lr_scale"]))
    tx = make_optimizer(params, schedule, b1=float(cfg["adam_b1"]), b2=float(cfg["adam_b2"]),
                        eps=float(cfg["adam_eps"]), weight_decay=float(cfg["weight_decay"]),
                        clip_norm=float(cfg["clip_norm"]), freeze_feature_encoder=bool(cfg["freeze_feature_encoder"]),
                        freeze_transformer_steps=int(cfg["freeze_transformer_steps"]))
    objective = CTCObjective(module, reduction=cfg["ctc_reduction"], zero_infinity=bool(cfg["ctc_zero_infinity"]),
                             mask_time_prob=config.mask_time_prob, mask_time_length=config.mask_time_length,
                             mask_time_min_masks=config.mask_time_min_masks,
                             mask_feature_prob=config.mask_feature_prob,
                             mask_feature_length=config.mask_feature_length,
                             mask_feature_min_masks=config.mask_feature_min_masks)
    loop_cfg = LoopConfig(out_dir=str(run_dir), steps=steps, grad_accum=accum, log_every=int(cfg["log_every"]),
                          eval_every=int(cfg["eval_every"]), save_every=int(cfg["save_every"]), keep=int(cfg["keep"]),
                          async_checkpoint=bool(cfg["async_checkpoint"]), tensorboard=bool(cfg["tensorboard"]),
                          use_pmap=bool(cfg["pmap"]), progress=bool(cfg["progress"]),
                          meta={"objective": "ctc", "model_config": json.loads(config.to_json_string())})
    if is_main:
        from flax_d2v.train import vocab as V

        run_dir.mkdir(parents=True, exist_ok=True)
        V.save_tokenizer_files(run_dir, vocab)  # RUN/vocab.json: a resumed run keeps its ids
        _write_json_atomic(run_dir / "finetune_config.json", {k: v for k, v in cfg.items() if v is not None})
    trainer = Trainer(objective, tx, schedule, mesh, logical_axes(module), loop_cfg)
    state, data_state, start = trainer.start(params, int(cfg["seed"]))
    if data_state:
        loader.restore(data_state)
    eval_fn = None
    if eval_loader is not None:
        eval_fn = make_eval_fn(objective, trainer, eval_loader, eval_manifest, vocab)
    try:
        result = trainer.fit(state, loader, start, eval_fn=eval_fn, data_state=loader.state)
    finally:
        loader.close()
        if eval_loader is not None:
            eval_loader.close()
    trainer.finish(title=f"d2v finetune {run_dir.name}")
    if not result.stopped and cfg["export_hf"]:
        where = export_hf(run_dir, config, result.state.params, vocab)
        if where is not None:
            log(f"wrote {where} (transformers Data2VecAudioForCTC + Wav2Vec2Processor)")
    return result
