"""Fine-tuning (CTC, audio classification, x-vectors): checkpoints, metrics.jsonl, and an HF model in RUN/hf.

    d2v finetune --train train.tsv --eval dev.tsv --model facebook-base-dir --out runs/ft \
        --steps 20000 --batch-size 8 --learning-rate 5e-5 --seed 0 [--mesh data=2,fsdp=4]
    d2v finetune --task audio-classification --train clips.tsv --eval dev.tsv --model base-dir --out runs/cls ...
    d2v finetune --task xvector --train clips.tsv --label-column speaker --model base-dir --out runs/xv ...

`--task audio-classification | xvector` reads a TSV with `path` and a label column, trains
`Data2VecAudioForSequenceClassification` (cross-entropy) or `...ForXVector` (AM-softmax), evaluates
accuracy, and writes the labels as `id2label`/`label2id` (see `flax_d2v.train.classification`).

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

from flax_d2v.config import PRESETS, preset
from flax_d2v.errors import D2VError
from flax_d2v.fileio import read_json
from flax_d2v.train import run_common as R

# The fine-tuning recipe (fairseq base_960h): where its defaults differ from pretraining's.
RECIPE: dict[str, Any] = {
    "phase_ratio": "0.1,0.4,0.5",
    "final_lr_scale": 0.05,
    "adam_eps": 1e-8,
    "weight_decay": 0.0,
    "freeze_feature_encoder": True,
}
# Every setting's default; None means "the init model's config value" for the regularisation keys.
DEFAULTS: dict[str, Any] = {
    **R.COMMON_DEFAULTS,
    **RECIPE,
    "eval": None,
    "vocab": None,
    "eval_every": 0,
    "export_hf": True,
    "freeze_transformer_steps": 0,
    "eval_batch_size": None,
    "task": "ctc",
    "label_column": "label",
    "freeze_base_model": False,
    "eval_lm": None,
    "eval_lexicon": None,
    "eval_lm_weight": None,
    "eval_word_score": None,
    "eval_beam_width": 0,
    # regularisation (None: keep the init model's config)
    "dropout": None,
    "hidden_dropout": None,
    "attention_dropout": None,
    "activation_dropout": None,
    "feat_proj_dropout": None,
    "final_dropout": None,
    "layerdrop": None,
    "mask_time_prob": None,
    "mask_time_length": None,
    "mask_time_min_masks": None,
    "mask_feature_prob": None,
    "mask_feature_length": None,
    "mask_feature_min_masks": None,
    # loss
    "ctc_reduction": "mean",
    "ctc_zero_infinity": True,
}
REQUIRED = ("train", "model", "out", "steps", "batch_size", "learning_rate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # unset flags stay absent, so a --config file can fill them
    p.add_argument("--config", default=S, help="JSON file with any of these settings (keys: flag names); flags win")
    g = p.add_argument_group("run")
    g.add_argument(
        "--train", default=S, help="training manifest: TSV (path, text), fairseq .tsv(+.ltr/.wrd), or tfds:NAME/SPLIT"
    )
    g.add_argument("--eval", default=S, help="evaluation manifest (WER/CER every --eval-every steps and at the end)")
    g.add_argument(
        "--model",
        default=S,
        help="init: an HF or flax-d2v model dir, a fairseq .pt, or a preset "
        "tiny|base|large or a transformers config.json for random init",
    )
    g.add_argument(
        "--task",
        choices=("ctc", "audio-classification", "xvector"),
        default=S,
        help="ctc (default): transcripts; audio-classification / xvector: one label per clip",
    )
    g.add_argument(
        "--label-column",
        default=S,
        help="the TSV column holding each clip's label (--task audio-classification/xvector; default: label)",
    )
    g.add_argument("--out", default=S, help="run directory (resumes when it holds checkpoints)")
    groups = R.add_common_arguments(p, DEFAULTS, groups={"run": g}, settings_file=True)
    g.add_argument(
        "--vocab",
        default=S,
        help="vocab.json to use (default: the init model's, else built from the training transcripts)",
    )
    g.add_argument("--eval-every", type=int, default=S, help="eval every K updates; 0: only at the end (default)")
    g.add_argument(
        "--export-hf", action=argparse.BooleanOptionalAction, default=S, help="write RUN/hf at the end (default on)"
    )
    groups["optimisation"].add_argument(
        "--freeze-transformer-steps",
        type=int,
        default=S,
        help="train only the head (lm_head, classifier, ...) for the first K updates (freeze_finetune_updates; "
        "default 0)",
    )
    groups["optimisation"].add_argument(
        "--freeze-base-model",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="train only the classification / x-vector head (transformers' freeze_base_model; default off)",
    )
    groups["data"].add_argument("--eval-batch-size", type=int, default=S, help="default: --batch-size")
    g = p.add_argument_group("eval with an n-gram LM (pip install 'flax-d2v[lm]'; as d2v transcribe --lm)")
    g.add_argument(
        "--eval-lm",
        default=S,
        metavar="LM",
        help="KenLM file: eval also reports wer_lm/cer_lm, beam search with it, beside greedy wer/cer",
    )
    g.add_argument("--eval-lexicon", default=S, metavar="FILE", help="word list for --eval-lm (default: its unigrams)")
    g.add_argument("--eval-lm-weight", type=float, default=S, help="as d2v transcribe --lm-weight (default 2)")
    g.add_argument("--eval-word-score", type=float, default=S, help="as d2v transcribe --word-score (default -1)")
    g.add_argument("--eval-beam-width", type=int, default=S, help="as d2v transcribe --beam-width (default 100)")
    g = p.add_argument_group("regularisation (HF config names; default: the init model's config)")
    g.add_argument(
        "--dropout",
        type=float,
        default=S,
        help="sets all of the dropouts below at once, --layerdrop included; a flag below wins",
    )
    for name in (
        "hidden_dropout",
        "attention_dropout",
        "activation_dropout",
        "feat_proj_dropout",
        "final_dropout",
        "layerdrop",
        "mask_time_prob",
        "mask_feature_prob",
    ):
        g.add_argument("--" + name.replace("_", "-"), type=float, default=S)
    for name in ("mask_time_length", "mask_time_min_masks", "mask_feature_length", "mask_feature_min_masks"):
        g.add_argument("--" + name.replace("_", "-"), type=int, default=S)
    g = p.add_argument_group("loss")
    g.add_argument(
        "--ctc-reduction",
        choices=("mean", "sum", "token", "sentence"),
        default=S,
        help="mean (HF, default), sum (HF), token (fairseq sentence_avg false), sentence (fairseq sentence_avg true)",
    )
    g.add_argument(
        "--ctc-zero-infinity",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="impossible alignments give 0 loss (default on)",
    )


def resolve(args: argparse.Namespace | dict) -> dict[str, Any]:
    """Defaults < --config file < command-line flags; names normalised to underscores."""
    given = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
    given = {k: v for k, v in given.items() if not k.startswith("_") and k != "command"}
    cfg: dict[str, Any] = dict(DEFAULTS)
    path = given.pop("config", None)
    if path:
        data = read_json(path)
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
    R.check_sizes(cfg)
    return cfg


DROPOUT_KEYS = ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout", "final_dropout")
CONFIG_KEYS = DROPOUT_KEYS + (
    "layerdrop",
    "mask_time_prob",
    "mask_time_length",
    "mask_time_min_masks",
    "mask_feature_prob",
    "mask_feature_length",
    "mask_feature_min_masks",
)


def run(args: argparse.Namespace) -> int:
    cfg = resolve(args)
    R.init_distributed(cfg)
    if cfg["task"] != "ctc":
        finetune_classifier(cfg)
    else:
        finetune(cfg)
    return 0


# ------------------------------------------------------------------------------------------ pieces
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
    if cfg["dropout"] is not None:  # every dropout, LayerDrop included (the flag's help says so)
        over.update({k: float(cfg["dropout"]) for k in DROPOUT_KEYS + ("layerdrop",)})
    over.update({k: cfg[k] for k in CONFIG_KEYS if cfg.get(k) is not None})
    if not base.apply_spec_augment and any(cfg.get(k) for k in ("mask_time_prob", "mask_feature_prob")):
        over["apply_spec_augment"] = True  # a mask rate asked for on the command line means SpecAugment on
    over.update(
        vocab_size=len(vocab),
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        ctc_zero_infinity=bool(cfg["ctc_zero_infinity"]),
        ctc_loss_reduction="sum" if cfg["ctc_reduction"] == "sum" else "mean",
    )
    config = base.replace(**over)
    if hasattr(config, "post_mlp_dropout"):  # data2vec 2.0: fairseq's Wav2VecEncoder sets these from the same cfg
        config = config.replace(
            post_mlp_dropout=config.hidden_dropout,
            prenet_dropout=config.hidden_dropout,
            prenet_layerdrop=config.layerdrop,
        )
    return config


def load_init(cfg: dict) -> tuple[Any, dict | None, Path | None]:
    """(config, CTC-layout params or None for random init, the init directory if any)."""
    name = str(cfg["model"])
    if name in PRESETS and not Path(name).exists():
        return preset(name), None, None
    if name.endswith(".json") and Path(name).is_file():  # a transformers config.json: random init
        from flax_d2v.config import Data2VecAudioConfig

        return Data2VecAudioConfig.from_json_file(name), None, None
    from flax_d2v.pretrained import load_any

    config, spec, params, where = load_any(name)
    if spec.is_base:
        params = {"data2vec_audio": params}
    return config, params, Path(where) if Path(where).is_dir() else None


def make_eval_fn(objective: Any, manifest: Any, vocab: dict[str, int], batch_size: int, lm_decoder: Any = None):
    """eval_fn(state) -> {"wer", "cer", "eval_clips"}: `d2v transcribe` over the whole eval manifest.

    Through `flax_d2v.transcribe.Transcriber` itself (greedy, its default chunking with strides for
    clips over 20 s, its padding-invariant forward), so the logged WER is what a user transcribing
    those clips with `d2v transcribe --model RUN/hf` gets, for clips of any length. Clips are read
    through the manifest (files or tfds records) a slice at a time, so memory stays bounded.
    `eval_fn.hypotheses` holds the last eval's {manifest position: text}.

    With `lm_decoder` (a `flax_d2v.lm_decode` beam search decoder) also "wer_lm" and "cer_lm": the
    same clips through a Transcriber that decodes with the n-gram, as `d2v transcribe --lm` does
    (a second forward pass over the eval set).
    """
    import jax

    from flax_d2v.train import vocab as V
    from flax_d2v.train.metrics import error_rates
    from flax_d2v.train.planning import select_examples
    from flax_d2v.transcribe import Transcriber

    positions = [int(i) for i in select_examples(manifest, None, None, True)[0]]
    slice_clips = 256  # clips read per Transcriber call: bounds host memory on long eval sets

    def transcripts(runner: Any) -> dict[int, str]:
        hyps: dict[int, str] = {}
        for s in range(0, len(positions), slice_clips):
            chunk = positions[s : s + slice_clips]
            results = runner([manifest.load(i) for i in chunk], progress=False)
            for i, r in zip(chunk, results, strict=True):
                if r.error:
                    raise D2VError(f"{manifest.paths[i]}: {r.error}")
                hyps[i] = r.text
        return hyps

    def eval_fn(state: Any) -> dict[str, float]:
        # one process: the (possibly sharded) global params as they are; several: a full host copy on each
        params = state.params if jax.process_count() == 1 else R.host(state.params)
        runner = Transcriber((objective.module, params), vocab=vocab, batch_size=batch_size)
        hyps = transcripts(runner)
        eval_fn.hypotheses = hyps
        refs = [V.normalize_transcript(manifest.texts[i] or "") for i in positions]
        metrics = {**error_rates(refs, [hyps[i] for i in positions]), "eval_clips": len(positions)}
        if lm_decoder is not None:
            runner.beam, runner.beam_width = lm_decoder, lm_decoder.beam_width
            with_lm = transcripts(runner)
            lm_rates = error_rates(refs, [with_lm[i] for i in positions])
            metrics.update(wer_lm=lm_rates["wer"], cer_lm=lm_rates["cer"])
        return metrics

    eval_fn.hypotheses = {}
    return eval_fn


def eval_lm_decoder(cfg: dict, vocab: dict[str, int], num_logits: int) -> Any:
    """The --eval-lm beam search decoder (built before training, so a bad LM fails at once), or None."""
    if not cfg.get("eval_lm"):
        if cfg.get("eval_lexicon"):
            raise D2VError("--eval-lexicon needs --eval-lm")
        return None
    if not cfg.get("eval"):
        raise D2VError("--eval-lm needs --eval (the manifest to decode)")
    from flax_d2v.ctc_decode import CTCTokenizer
    from flax_d2v.lm_decode import decoder_for
    from flax_d2v.train.loop import log

    return decoder_for(
        CTCTokenizer.from_vocab(vocab),
        num_logits,
        beam_width=int(cfg.get("eval_beam_width") or 0),
        lm=cfg["eval_lm"],
        lexicon=cfg.get("eval_lexicon"),
        lm_weight=cfg.get("eval_lm_weight"),
        word_score=cfg.get("eval_word_score"),
        warn=log,
    )


def export_hf(run_dir: Path, config: Any, params: Any, vocab: dict[str, int]) -> Path | None:
    """RUN/hf: transformers' Data2VecAudioForCTC + Wav2Vec2Processor files, written atomically."""
    import jax

    from flax_d2v.convert.hf import save_hf
    from flax_d2v.train import vocab as V

    host = R.host(params)
    if jax.process_index() != 0:
        return None
    with tempfile.TemporaryDirectory(prefix=".hf-files-", dir=run_dir) as files:
        V.save_tokenizer_files(files, vocab)
        V.save_preprocessor_config(files)
        return save_hf(run_dir / "hf", config, host, files_from=files, overwrite=True)


def export_flax(run_dir: Path, config: Any, params: Any, vocab: dict[str, int]) -> Path | None:
    """RUN/flax: a flax-d2v directory with the tokenizer and preprocessor files (data2vec 2.0 models)."""
    import jax

    from flax_d2v.checkpoint import save_flax
    from flax_d2v.train import vocab as V

    host = R.host(params)
    if jax.process_index() != 0:
        return None
    with tempfile.TemporaryDirectory(prefix=".flax-files-", dir=run_dir) as files:
        V.save_tokenizer_files(files, vocab)
        V.save_preprocessor_config(files)
        return save_flax(run_dir / "flax", config, host, files_from=files, overwrite=True)


# ------------------------------------------------------------------------------------------ the run
def finetune(cfg: dict) -> Any:
    """The whole command as a function (also used by tests): returns the loop's `FitResult`."""
    import jax

    from flax_d2v.modeling import init_params, logical_axes
    from flax_d2v.train import vocab as V
    from flax_d2v.train.ctc import CTCObjective
    from flax_d2v.train.loop import Trainer, log
    from flax_d2v.train.manifests import read_manifest

    run_dir = Path(cfg["out"])
    mesh, _ = R.make_mesh(cfg)

    manifest = read_manifest(cfg["train"], require_text=True)
    base_config, loaded, init_dir = load_init(cfg)
    vocab, vocab_source = choose_vocab(cfg, manifest.texts, init_dir, run_dir)
    config = training_config(base_config, cfg, vocab)
    from flax_d2v.pretrained import build_module  # Data2VecAudioForCTC, or data2vec 2.0's Data2Vec2ForCTC

    module = build_module(config, "Data2VecAudioForCTC", **R.module_options(cfg))
    params, new_keys, dropped = R.graft(init_params(module, int(cfg["seed"])), R.stacked(cfg, loaded))
    if loaded is not None:
        log(
            f"init from {cfg['model']}: {len(new_keys)} new tensors"
            + (f" ({', '.join(new_keys[:4])}{', ...' if len(new_keys) > 4 else ''})" if new_keys else "")
            + (f", {len(dropped)} unused ({', '.join(dropped[:4])})" if dropped else "")
        )
    else:
        log(f"random init: preset {cfg['model']}")
    log(f"vocab: {len(vocab)} symbols from {vocab_source}")

    lm_decoder = eval_lm_decoder(cfg, vocab, config.vocab_size)
    loader = R.train_loader(cfg, manifest, vocab)
    eval_manifest = None
    eval_bs = int(cfg["eval_batch_size"] or cfg["batch_size"])
    if cfg["eval"]:
        eval_manifest = read_manifest(cfg["eval"], require_text=True)
        if eval_bs < 1:
            raise D2VError(f"--eval-batch-size: must be >= 1, got {eval_bs}")

    schedule, tx = R.make_schedule_and_optimizer(
        cfg, params, freeze_transformer_steps=int(cfg["freeze_transformer_steps"])
    )
    objective = CTCObjective(module, reduction=cfg["ctc_reduction"], zero_infinity=bool(cfg["ctc_zero_infinity"]))
    loop_cfg = R.loop_config(
        cfg,
        eval_every=int(cfg["eval_every"]),
        meta={
            "objective": "ctc",
            "model_config": json.loads(config.to_json_string()),
            "settings": R.resume_settings(cfg, ("freeze_transformer_steps",)),
        },
    )
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        V.save_tokenizer_files(run_dir, vocab)  # RUN/vocab.json: a resumed run keeps its ids
        R.save_settings(run_dir / "finetune_config.json", cfg)
    trainer = Trainer(objective, tx, schedule, mesh, logical_axes(module), loop_cfg)
    state, data_state, start = trainer.start(params, int(cfg["seed"]))
    if data_state:
        loader.restore(data_state)
    eval_fn = None
    if eval_manifest is not None:
        eval_fn = make_eval_fn(objective, eval_manifest, vocab, eval_bs, lm_decoder)
    try:
        result = trainer.fit(state, loader, start, eval_fn=eval_fn, data_state=loader.state)
    finally:
        loader.close()
    trainer.finish(title=f"d2v finetune {run_dir.name}")
    if not result.stopped and cfg["export_hf"] and getattr(module, "is_data2vec2", False):
        where = export_flax(run_dir, config, result.state.params, vocab)  # no transformers class for 2.0
        if where is not None:
            log(f"wrote {where} (flax-d2v data2vec 2.0 CTC; `d2v convert {where} out.pt --to fairseq` for fairseq)")
    elif not result.stopped and cfg["export_hf"]:
        where = export_hf(run_dir, config, result.state.params, vocab)
        if where is not None:
            log(f"wrote {where} (transformers Data2VecAudioForCTC + Wav2Vec2Processor)")
    return result


# ------------------------------------------------------------------------------------------ classification
def finetune_classifier(cfg: dict) -> Any:
    """`--task audio-classification | xvector` as a function (also used by tests): the loop's `FitResult`."""
    import jax

    from flax_d2v.heads import REGISTRY, with_labels
    from flax_d2v.modeling import init_params, logical_axes
    from flax_d2v.train import classification as C
    from flax_d2v.train import vocab as V
    from flax_d2v.train.loader import BatchLoader
    from flax_d2v.train.loop import Trainer, log
    from flax_d2v.train.manifests import read_manifest

    task = cfg["task"]
    if task not in C.TASKS:
        raise D2VError(f"--task: {task!r} is not a classification task; choose one of {sorted(C.TASKS)}")
    run_dir = Path(cfg["out"])
    mesh, dp = R.make_mesh(cfg)
    manifest = read_manifest(cfg["train"])
    names = C.read_label_column(cfg["train"], cfg["label_column"])
    labels = sorted(set(names))
    if len(labels) < 2:
        raise D2VError(
            f"{cfg['train']}: column {cfg['label_column']!r} has {len(labels)} distinct label(s); "
            "classification needs at least 2"
        )
    label2id = {name: i for i, name in enumerate(labels)}
    train_ids = C.label_ids(names, label2id, str(cfg["train"]))

    base_config, loaded, _ = load_init(cfg)
    over = {k: cfg[k] for k in CONFIG_KEYS if cfg.get(k) is not None}
    if cfg["dropout"] is not None:
        over.update({k: float(cfg["dropout"]) for k in DROPOUT_KEYS})
    config = with_labels(base_config.replace(**over), labels)
    spec = REGISTRY[C.TASKS[task]]
    module = spec.build(config, **R.module_options(cfg), freeze_base_model=bool(cfg["freeze_base_model"]))
    params, new_keys, dropped = R.graft(init_params(module, int(cfg["seed"])), R.stacked(cfg, loaded))
    if loaded is not None:
        log(
            f"init from {cfg['model']}: {len(new_keys)} new tensors ({', '.join(new_keys[:4])}"
            f"{', ...' if len(new_keys) > 4 else ''})" + (f", {len(dropped)} unused" if dropped else "")
        )
    else:
        log(f"random init: {cfg['model']}")
    log(
        f"{spec.architecture}: {len(labels)} labels from column {cfg['label_column']!r}: "
        + ", ".join(labels[:8])
        + (", ..." if len(labels) > 8 else "")
    )

    loader = R.train_loader(cfg, manifest, None)
    eval_loader = eval_fn = None
    if cfg["eval"]:
        eval_manifest = read_manifest(cfg["eval"])
        eval_ids = C.label_ids(C.read_label_column(cfg["eval"], cfg["label_column"]), label2id, str(cfg["eval"]))
        eval_bs = int(cfg["eval_batch_size"] or cfg["batch_size"])
        if eval_bs % dp:
            raise D2VError(f"--eval-batch-size: {eval_bs} must be divisible by the data-parallel size {dp}")
        eval_loader = BatchLoader(
            eval_manifest,
            batch_size=eval_bs,
            vocab=None,
            shuffle=False,
            repeat=False,
            drop_remainder=False,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_workers=int(cfg["num_workers"]),
        )
    schedule, tx = R.make_schedule_and_optimizer(
        cfg,
        params,
        freeze_transformer_steps=int(cfg["freeze_transformer_steps"]),
        freeze_base_model=bool(cfg["freeze_base_model"]),
    )
    objective = C.ClassificationObjective(module, train_ids, am_softmax=task == "xvector", name=task)
    loop_cfg = R.loop_config(
        cfg,
        eval_every=int(cfg["eval_every"]),
        meta={"objective": task, "model_config": json.loads(config.to_json_string())},
    )
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        R.save_settings(run_dir / "finetune_config.json", cfg)
    trainer = Trainer(objective, tx, schedule, mesh, logical_axes(module), loop_cfg)
    state, data_state, start = trainer.start(params, int(cfg["seed"]))
    if data_state:
        loader.restore(data_state)
    if eval_loader is not None:
        eval_fn = C.make_accuracy_eval_fn(objective, trainer, eval_loader, eval_ids)
    try:
        result = trainer.fit(state, loader, start, eval_fn=eval_fn, data_state=loader.state)
    finally:
        loader.close()
        if eval_loader is not None:
            eval_loader.close()
    trainer.finish(title=f"d2v finetune {run_dir.name}")
    if not result.stopped and cfg["export_hf"]:
        from flax_d2v.convert.hf import save_hf

        host = R.host(result.state.params)
        if jax.process_index() == 0:
            with tempfile.TemporaryDirectory(prefix=".hf-files-", dir=run_dir) as files:
                V.save_preprocessor_config(files)
                save_hf(run_dir / "hf", config, host, files_from=files, overwrite=True)
            log(f"wrote {run_dir / 'hf'} (transformers {spec.architecture}, id2label of {len(labels)} labels)")
    return result
