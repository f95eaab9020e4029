"""The fine-tuning run: CTC (`finetune`), audio classification and x-vectors (`finetune_classifier`).

`flax_d2v.train.finetune(cfg)` runs a `FinetuneConfig` (`train/recipes.py`) end to end: the init
model and vocabulary, the module with this run's regularisation, the loader, the optimiser, the
`Trainer` (resumes from RUN/checkpoints), evaluation (WER/CER through `d2v transcribe`'s own
`Transcriber`, or accuracy) and the export to RUN/hf. `d2v finetune` is argparse in front of it.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from flax_d2v import processor
from flax_d2v.api.pretrained import build_module, load_any
from flax_d2v.api.transcribe import Transcriber
from flax_d2v.checkpoint import save_flax
from flax_d2v.config import PRESETS, Data2VecAudioConfig, preset
from flax_d2v.convert.hf import save_hf
from flax_d2v.ctc_decode import CTCTokenizer
from flax_d2v.errors import D2VError
from flax_d2v.heads import REGISTRY, with_labels
from flax_d2v.lm_decode import decoder_for
from flax_d2v.modeling import init_params, logical_axes
from flax_d2v.paths import AnyPath, is_url, localize
from flax_d2v.train import classification, evaluation
from flax_d2v.train import run_common as common
from flax_d2v.train import vocab as vocabulary
from flax_d2v.train.ctc import CTCObjective
from flax_d2v.train.loop import Trainer, log
from flax_d2v.train.manifests import read_manifest
from flax_d2v.train.recipes import FinetuneConfig

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


def finetune(cfg: FinetuneConfig | Mapping[str, Any]) -> Any:
    """`d2v finetune` as a function: the `--task` of `cfg` trained end to end; the loop's `FitResult`."""
    cfg = as_config(cfg)
    common.init_distributed(cfg)
    return finetune_ctc(cfg) if cfg.task == "ctc" else finetune_classifier(cfg)


def as_config(cfg: FinetuneConfig | Mapping[str, Any]) -> FinetuneConfig:
    """A `FinetuneConfig`, or a mapping of its settings (validated; an unknown key is one `D2VError`)."""
    return FinetuneConfig.from_settings(cfg).validate()


# ------------------------------------------------------------------------------------------ pieces
def choose_vocab(
    cfg: FinetuneConfig, texts: list[str], init_dir: Path | None, run_dir: AnyPath
) -> tuple[dict[str, int], str]:
    """--vocab, else the run's own vocab.json (resume), else the init model's, else built from `texts`."""
    if cfg.vocab:
        return processor.load_vocab(cfg.vocab), str(cfg.vocab)
    if (run_dir / "vocab.json").is_file():
        return processor.load_vocab(run_dir / "vocab.json"), str(run_dir / "vocab.json")
    if init_dir is not None and (init_dir / "vocab.json").is_file():
        return processor.load_vocab(init_dir / "vocab.json"), str(init_dir / "vocab.json")
    return vocabulary.build_vocab(texts), "the training transcripts"


def training_config(base: Any, cfg: FinetuneConfig, vocab: dict[str, int]) -> Any:
    """The init model's config with this run's vocabulary and regularisation (HF semantics)."""
    return regularised_config(
        base,
        cfg,
        vocab_size=len(vocab),
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        ctc_zero_infinity=bool(cfg.ctc_zero_infinity),
        ctc_loss_reduction="sum" if cfg.ctc_reduction == "sum" else "mean",
    )


def regularised_config(base: Any, cfg: FinetuneConfig, **fields: Any) -> Any:
    """The init model's config with this run's regularisation flags (one meaning for every --task) and `fields`."""
    over: dict[str, Any] = {}
    if cfg.dropout is not None:  # every dropout, LayerDrop included (the flag's help says so)
        over.update({k: float(cfg.dropout) for k in DROPOUT_KEYS + ("layerdrop",)})
    over.update({k: getattr(cfg, k) for k in CONFIG_KEYS if getattr(cfg, k) is not None})  # a specific flag wins
    if not base.apply_spec_augment and any(getattr(cfg, k) for k in ("mask_time_prob", "mask_feature_prob")):
        over["apply_spec_augment"] = True  # a mask rate asked for on the command line means SpecAugment on
    config = base.replace(**over, **fields)
    if hasattr(config, "post_mlp_dropout"):  # data2vec 2.0: fairseq's Wav2VecEncoder sets these from the same cfg
        config = config.replace(
            post_mlp_dropout=config.hidden_dropout,
            prenet_dropout=config.hidden_dropout,
            prenet_layerdrop=config.layerdrop,
        )
    return config


def local_dir(run_dir: AnyPath) -> str | None:
    """Where scratch files of an export go: beside it on disk, the system's temp directory for a bucket."""
    return None if is_url(run_dir) else str(run_dir)


def load_init(cfg: FinetuneConfig) -> tuple[Any, dict | None, Path | None]:
    """(config, CTC-layout params or None for random init, the init directory if any)."""
    name = cfg.init_model
    if cfg.preset is not None or (name in PRESETS and not Path(name).exists()):
        return preset(name), None, None
    if is_url(name) and name.endswith(".json"):  # a config.json in a bucket
        name = localize(name)
    if name.endswith(".json") and Path(name).is_file():  # a transformers config.json: random init
        return Data2VecAudioConfig.from_json_file(name), None, None

    config, spec, params, where = load_any(name)
    if spec.is_base:
        params = {"data2vec_audio": params}
    return config, params, Path(where) if Path(where).is_dir() else None


def make_eval_fn(objective: Any, manifest: Any, vocab: dict[str, int], batch_size: int, lm_decoder: Any = None):
    """eval_fn(state) -> {"wer", "cer", "eval_clips"}: `d2v transcribe` over the whole eval manifest.

    Through `flax_d2v.api.transcribe.Transcriber` itself (greedy, its default chunking with strides for
    clips over 20 s, its padding-invariant forward), so the logged WER is what a user transcribing
    those clips with `d2v transcribe --model RUN/hf` gets, for clips of any length, and what
    `d2v evaluate RUN/hf --data MANIFEST` reports: both are `train/evaluation.py` (clips read a
    slice at a time, references and hypotheses normalised as the training transcripts).
    `eval_fn.hypotheses` holds the last eval's {manifest position: text}.

    With `lm_decoder` (a `flax_d2v.lm_decode` beam search decoder) also "wer_lm" and "cer_lm": the
    same clips through a Transcriber that decodes with the n-gram, as `d2v transcribe --lm` does
    (a second forward pass over the eval set).
    """

    positions = evaluation.eval_positions(manifest)

    def eval_fn(state: Any) -> dict[str, float]:
        # one process: the (possibly sharded) global params as they are; several: a full host copy on each
        params = state.params if jax.process_count() == 1 else common.host(state.params)
        runner = Transcriber((objective.module, params), vocab=vocab, batch_size=batch_size)
        hyps = evaluation.transcribe_manifest(runner, manifest, positions)
        eval_fn.hypotheses = hyps
        refs = [manifest.texts[i] or "" for i in positions]
        metrics = {**evaluation.corpus_rates(refs, [hyps[i] for i in positions]), "eval_clips": len(positions)}
        if lm_decoder is not None:
            runner.beam, runner.beam_width = lm_decoder, lm_decoder.beam_width
            with_lm = evaluation.transcribe_manifest(runner, manifest, positions)
            lm_rates = evaluation.corpus_rates(refs, [with_lm[i] for i in positions])
            metrics.update(wer_lm=lm_rates["wer"], cer_lm=lm_rates["cer"])
        return metrics

    eval_fn.hypotheses = {}
    return eval_fn


def eval_lm_decoder(cfg: FinetuneConfig, vocab: dict[str, int], num_logits: int) -> Any:
    """The --eval-lm beam search decoder (built before training, so a bad LM fails at once), or None."""
    if not cfg.eval_lm:
        if cfg.eval_lexicon:
            raise D2VError("--eval-lexicon needs --eval-lm")
        return None
    if not cfg.eval:
        raise D2VError("--eval-lm needs --eval (the manifest to decode)")

    return decoder_for(
        CTCTokenizer.from_vocab(vocab),
        num_logits,
        beam_width=int(cfg.eval_beam_width or 0),
        lm=cfg.eval_lm,
        lexicon=cfg.eval_lexicon,
        lm_weight=cfg.eval_lm_weight,
        word_score=cfg.eval_word_score,
        warn=log,
    )


def export_model(run_dir: AnyPath, config: Any, params: Any, vocab: dict[str, int], to: str = "hf") -> AnyPath | None:
    """RUN/hf (transformers' Data2VecAudioForCTC, `to="hf"`) or RUN/flax (a flax-d2v directory: data2vec
    2.0, which has no transformers class), with the Wav2Vec2Processor files, written atomically."""
    save = {"hf": save_hf, "flax": save_flax}[to]
    host = common.host(params)
    if jax.process_index() != 0:
        return None
    with tempfile.TemporaryDirectory(prefix=f".{to}-files-", dir=local_dir(run_dir)) as files:
        processor.save_tokenizer_files(files, vocab)
        processor.save_preprocessor_config(files)
        return save(run_dir / to, config, host, files_from=files, overwrite=True)


# ------------------------------------------------------------------------------------------ what a run trains
@dataclasses.dataclass
class FinetuneParts:
    """What a fine-tuning run trains, as `finetune_ctc` / `finetune_classifier` build it: the training
    config, the module, the initial params, the objective, the schedule and the optax chain.

    Built in one place so that `d2v verify --train` (`train/verify_train.py`) steps exactly what
    `d2v finetune` steps, not a copy of it.
    """

    config: Any
    module: Any
    params: Any
    objective: Any
    schedule: Any
    tx: Any
    manifest: Any
    vocab: dict[str, int] | None = None  # CTC: the character vocabulary
    labels: list[str] | None = None  # classification: the label names, in id order


def schedule_and_optimizer(cfg: FinetuneConfig, params: Any) -> tuple[Any, Any]:
    """(lr schedule, optax chain) of a fine-tuning run (`--freeze-base-model` counts for the classifiers only)."""
    return common.make_schedule_and_optimizer(
        cfg,
        params,
        freeze_transformer_steps=int(cfg.freeze_transformer_steps),
        freeze_base_model=bool(cfg.freeze_base_model) and cfg.task != "ctc",
    )


def ctc_parts(cfg: FinetuneConfig, run_dir: Path) -> FinetuneParts:
    """The CTC run's parts: init model, vocabulary, training config, module, params, optimizer, objective."""
    manifest = read_manifest(cfg.train, require_text=True, audio_column=cfg.audio_column, text_column=cfg.text_column)
    base_config, loaded, init_dir = load_init(cfg)
    vocab, vocab_source = choose_vocab(cfg, manifest.texts, init_dir, run_dir)
    config = training_config(base_config, cfg, vocab)

    module = build_module(config, "Data2VecAudioForCTC", **common.module_options(cfg))
    params, new_keys, dropped = common.graft(init_params(module, int(cfg.seed)), common.stacked(cfg, loaded))
    if loaded is not None:
        log(
            f"init from {cfg.init_model}: {len(new_keys)} new tensors"
            + (f" ({', '.join(new_keys[:4])}{', ...' if len(new_keys) > 4 else ''})" if new_keys else "")
            + (f", {len(dropped)} unused ({', '.join(dropped[:4])})" if dropped else "")
        )
    else:
        log(f"random init: preset {cfg.init_model}")
    log(f"vocab: {len(vocab)} symbols from {vocab_source}")
    schedule, tx = schedule_and_optimizer(cfg, params)
    objective = CTCObjective(module, reduction=cfg.ctc_reduction, zero_infinity=bool(cfg.ctc_zero_infinity))
    return FinetuneParts(config, module, params, objective, schedule, tx, manifest, vocab=vocab)


def classifier_parts(cfg: FinetuneConfig) -> FinetuneParts:
    """The classification / x-vector run's parts: labels from the manifest's column, then as `ctc_parts`."""
    task = cfg.task
    if task not in classification.TASKS:
        raise D2VError(f"--task: {task!r} is not a classification task; choose one of {sorted(classification.TASKS)}")
    manifest = read_manifest(cfg.train, audio_column=cfg.audio_column, text_column=cfg.text_column)
    names = classification.read_label_column(cfg.train, cfg.label_column)
    labels = sorted(set(names))
    if len(labels) < 2:
        raise D2VError(
            f"{cfg.train}: column {cfg.label_column!r} has {len(labels)} distinct label(s); "
            "classification needs at least 2"
        )
    label2id = {name: i for i, name in enumerate(labels)}
    train_ids = classification.label_ids(names, label2id, str(cfg.train))

    base_config, loaded, _ = load_init(cfg)
    config = with_labels(regularised_config(base_config, cfg), labels)
    spec = REGISTRY[classification.TASKS[task]]
    # the head on the init model's own encoder (data2vec 2.0's for a 2.0 checkpoint)
    module = build_module(config, spec, **common.module_options(cfg), freeze_base_model=bool(cfg.freeze_base_model))
    params, new_keys, dropped = common.graft(init_params(module, int(cfg.seed)), common.stacked(cfg, loaded))
    if loaded is not None:
        log(
            f"init from {cfg.init_model}: {len(new_keys)} new tensors ({', '.join(new_keys[:4])}"
            f"{', ...' if len(new_keys) > 4 else ''})" + (f", {len(dropped)} unused" if dropped else "")
        )
    else:
        log(f"random init: {cfg.init_model}")
    log(
        f"{spec.architecture}: {len(labels)} labels from column {cfg.label_column!r}: "
        + ", ".join(labels[:8])
        + (", ..." if len(labels) > 8 else "")
    )
    schedule, tx = schedule_and_optimizer(cfg, params)
    objective = classification.ClassificationObjective(module, train_ids, am_softmax=task == "xvector", name=task)
    return FinetuneParts(config, module, params, objective, schedule, tx, manifest, labels=labels)


# ------------------------------------------------------------------------------------------ the run
def finetune_ctc(cfg: FinetuneConfig | Mapping[str, Any]) -> Any:
    """CTC fine-tuning end to end: returns the loop's `FitResult`."""
    cfg = as_config(cfg)
    run_dir = common.run_dir(cfg)
    mesh, _ = common.make_mesh(cfg)

    parts = ctc_parts(cfg, run_dir)
    config, module, params, vocab = parts.config, parts.module, parts.params, parts.vocab
    schedule, tx, objective, manifest = parts.schedule, parts.tx, parts.objective, parts.manifest

    lm_decoder = eval_lm_decoder(cfg, vocab, config.vocab_size)
    loader = common.train_loader(cfg, manifest, vocab)
    eval_manifest = None
    eval_bs = int(cfg.eval_batch_size or cfg.batch_size)
    if cfg.eval:
        eval_manifest = read_manifest(
            cfg.eval, require_text=True, audio_column=cfg.audio_column, text_column=cfg.text_column
        )
        if eval_bs < 1:
            raise D2VError(f"--eval-batch-size: must be >= 1, got {eval_bs}")

    loop_cfg = common.loop_config(
        cfg,
        eval_every=int(cfg.eval_every),
        meta={
            "objective": "ctc",
            "model_config": json.loads(config.to_json_string()),
            "settings": common.resume_settings(cfg, ("freeze_transformer_steps",)),
        },
    )
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        processor.save_tokenizer_files(run_dir, vocab)  # RUN/vocab.json: a resumed run keeps its ids
        common.save_settings(run_dir / "finetune_config.json", cfg)
    trainer = Trainer(objective, tx, schedule, mesh, logical_axes(module), loop_cfg)
    state, data_state, start = trainer.start(params, int(cfg.seed))
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
    if not result.stopped and cfg.export_hf and getattr(module, "is_data2vec2", False):
        where = export_model(run_dir, config, result.state.params, vocab, to="flax")  # no transformers class for 2.0
        if where is not None:
            log(f"wrote {where} (flax-d2v data2vec 2.0 CTC; `d2v convert {where} out.pt --to fairseq` for fairseq)")
    elif not result.stopped and cfg.export_hf:
        where = export_model(run_dir, config, result.state.params, vocab, to="hf")
        if where is not None:
            log(f"wrote {where} (transformers Data2VecAudioForCTC + Wav2Vec2Processor)")
    return result


# ------------------------------------------------------------------------------------------ classification
def finetune_classifier(cfg: FinetuneConfig | Mapping[str, Any]) -> Any:
    """`--task audio-classification | xvector` end to end: returns the loop's `FitResult`."""
    cfg = as_config(cfg)
    task = cfg.task
    run_dir = common.run_dir(cfg)
    mesh, dp = common.make_mesh(cfg)
    parts = classifier_parts(cfg)
    config, module, params, labels = parts.config, parts.module, parts.params, parts.labels
    schedule, tx, objective, manifest = parts.schedule, parts.tx, parts.objective, parts.manifest
    label2id = {name: i for i, name in enumerate(labels)}

    loader = common.train_loader(cfg, manifest, None)
    eval_loader = eval_fn = None
    if cfg.eval:
        eval_manifest = read_manifest(cfg.eval, audio_column=cfg.audio_column, text_column=cfg.text_column)
        eval_ids = classification.label_ids(
            classification.read_label_column(cfg.eval, cfg.label_column), label2id, str(cfg.eval)
        )
        eval_bs = int(cfg.eval_batch_size or cfg.batch_size)
        if eval_bs % dp:
            raise D2VError(f"--eval-batch-size: {eval_bs} must be divisible by the data-parallel size {dp}")
        eval_loader = common.train_loader(cfg, eval_manifest, None, eval_batch_size=eval_bs)
    loop_cfg = common.loop_config(
        cfg,
        eval_every=int(cfg.eval_every),
        meta={
            "objective": task,
            "model_config": json.loads(config.to_json_string()),
            "settings": common.resume_settings(cfg, ("freeze_transformer_steps", "freeze_base_model")),
        },
    )
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        common.save_settings(run_dir / "finetune_config.json", cfg)
    trainer = Trainer(objective, tx, schedule, mesh, logical_axes(module), loop_cfg)
    state, data_state, start = trainer.start(params, int(cfg.seed))
    if data_state:
        loader.restore(data_state)
    if eval_loader is not None:
        eval_fn = classification.make_accuracy_eval_fn(objective, trainer, eval_loader, eval_ids)
    try:
        result = trainer.fit(state, loader, start, eval_fn=eval_fn, data_state=loader.state)
    finally:
        loader.close()
        if eval_loader is not None:
            eval_loader.close()
    trainer.finish(title=f"d2v finetune {run_dir.name}")
    if not result.stopped and cfg.export_hf:
        host = common.host(result.state.params)
        v2 = getattr(module, "is_data2vec2", False)  # no transformers class for 2.0: a flax-d2v directory
        to, save = ("flax", save_flax) if v2 else ("hf", save_hf)
        if jax.process_index() == 0:
            with tempfile.TemporaryDirectory(prefix=f".{to}-files-", dir=local_dir(run_dir)) as files:
                processor.save_preprocessor_config(files)
                save(run_dir / to, config, host, files_from=files, overwrite=True)
            kind = f"flax-d2v data2vec 2.0 {type(module).__name__}" if v2 else f"transformers {type(module).__name__}"
            log(f"wrote {run_dir / to} ({kind}, id2label of {len(labels)} labels)")
    return result
