"""`d2v finetune`: overfitting one batch, RUN/hf in transformers, optimizer groups, schedules.

Preemption and resume are tested in tests/test_resume.py (SIGTERM at an arbitrary update, kill -9 during a
checkpoint write, exact losses), settings checked on resume in tests/test_train_recipe.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_d2v.commands.finetune import resolve
from flax_d2v.errors import D2VError
from flax_d2v.train import finetune
from flax_d2v.train.metrics import read_metrics

OVERFIT_CLIPS = ("cards_001", "goforward", "cards_003", "forever")
# The bar: loss to <= 5% of its first value and CER <= 0.1 within 400 updates.
OVERFIT_LOSS_RATIO = 0.05
OVERFIT_MAX_CER = 0.1


def write_manifest(speech_dir: Path, names, path: Path) -> Path:
    rows = {}
    for line in (speech_dir / "transcripts.tsv").read_text().splitlines()[1:]:
        cols = line.split("\t")
        rows[Path(cols[0]).stem] = (str(speech_dir / cols[0]), cols[5])
    path.write_text("path\ttext\n" + "".join(f"{rows[n][0]}\t{rows[n][1]}\n" for n in names))
    return path


def overfit_settings(manifest: Path, out: Path, steps: int, **kw) -> dict:
    base = dict(
        train=str(manifest),
        eval=str(manifest),
        model="tiny",
        out=str(out),
        steps=steps,
        batch_size=4,
        learning_rate=1e-3,
        seed=0,
        lr_schedule="constant",
        dropout=0.0,
        mask_time_prob=0.0,
        log_every=1,
        eval_every=0,
        save_every=1000,
        progress=False,
    )
    base.update(kw)
    return resolve(base)


@pytest.fixture(scope="module")
def overfit_run(speech_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overfit")
    manifest = write_manifest(speech_dir, OVERFIT_CLIPS, tmp / "four.tsv")
    result = finetune(overfit_settings(manifest, tmp / "run", steps=400))
    return tmp / "run", result


def test_overfit_one_batch(overfit_run):
    run, result = overfit_run
    rows = read_metrics(run)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "cer" in r]
    assert [r["step"] for r in train] == list(range(1, 401))
    for key in ("step", "loss", "lr", "grad_norm", "steps_per_s", "audio_s_per_s"):
        assert key in train[0]
    first, last = train[0]["loss"], train[-1]["loss"]
    assert last <= OVERFIT_LOSS_RATIO * first, (first, last)
    assert evals[-1]["step"] == 400 and evals[-1]["cer"] <= OVERFIT_MAX_CER, evals[-1]
    assert result.last_eval["cer"] == evals[-1]["cer"]
    assert (run / "training_curves.png").stat().st_size > 1000
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [400]


def test_hf_export_loads_in_transformers(overfit_run, speech_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import soundfile as sf

    import flax_d2v
    from flax_d2v.train import vocab as V
    from flax_d2v.train.metrics import error_rates

    run, _ = overfit_run
    hf = run / "hf"
    for name in (
        "config.json",
        "model.safetensors",
        "vocab.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
    ):
        assert (hf / name).is_file(), name
    model = transformers.Data2VecAudioForCTC.from_pretrained(hf).eval()
    processor = transformers.Wav2Vec2Processor.from_pretrained(hf)
    module, params = flax_d2v.from_pretrained(str(hf))
    vocab = V.load_vocab(hf)
    refs, hf_texts = [], []
    for name in OVERFIT_CLIPS:
        wave, _ = sf.read(speech_dir / "16k" / f"{name}.wav", dtype="float32")
        inputs = processor(wave, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        text = processor.batch_decode(logits.argmax(-1))[0]
        ours = module.apply({"params": params}, jnp.asarray(inputs["input_values"].numpy())).logits
        assert V.decode(np.asarray(ours)[0].argmax(-1), vocab) == text  # the Flax model reads RUN/hf the same way
        hf_texts.append(text)
    # `d2v transcribe --model RUN/hf` (its Python entry point) gives transformers' transcripts
    ours = flax_d2v.transcribe(str(hf), [str(speech_dir / "16k" / f"{n}.wav") for n in OVERFIT_CLIPS], progress=False)
    assert [t.text for t in ours] == hf_texts
    for line in (speech_dir / "transcripts.tsv").read_text().splitlines()[1:]:
        cols = line.split("\t")
        if Path(cols[0]).stem in OVERFIT_CLIPS:
            refs.append((Path(cols[0]).stem, V.normalize_transcript(cols[5])))
    refs = [dict(refs)[n] for n in OVERFIT_CLIPS]
    # unpadded clips (transformers) vs length-bucketed padding in training: data2vec's stacked positional
    # convolutions see the padding, so a few characters may differ; the bar stays the issue's.
    assert error_rates(refs, hf_texts)["cer"] <= OVERFIT_MAX_CER


# ----------------------------------------------------------------------------------- fast unit checks
def test_config_file_and_flags(tmp_path):
    cfg_file = tmp_path / "ft.json"
    cfg_file.write_text(
        json.dumps(
            {
                "train": "a.tsv",
                "model": "tiny",
                "out": "o",
                "steps": 5,
                "batch-size": 2,
                "learning_rate": 1e-4,
                "mask_time_prob": 0.3,
            }
        )
    )
    cfg = resolve({"config": str(cfg_file), "learning_rate": 5e-4})
    assert cfg["learning_rate"] == 5e-4 and cfg["mask_time_prob"] == 0.3 and cfg["batch_size"] == 2
    assert cfg["freeze_feature_encoder"] is True  # fairseq feature_grad_mult 0 by default
    cfg_file.write_text(json.dumps({"learning_rat": 1}))
    with pytest.raises(D2VError, match="unknown key 'learning_rat'"):
        resolve({"config": str(cfg_file)})
    with pytest.raises(D2VError, match="--train"):
        resolve({"model": "tiny"})


def test_tri_stage_matches_fairseq_formula():
    from flax_d2v.train.schedules import make_schedule

    peak, total = 3e-5, 1000
    sched = make_schedule("tri_stage", peak, total)  # phases 0.1/0.4/0.5, init 0.01, final 0.05
    init, final = 0.01 * peak, 0.05 * peak

    def fairseq(n):  # fairseq/optim/lr_scheduler/tri_stage_lr_scheduler.py
        w, h, d = 100, 400, 500
        if n < w:
            return init + (peak - init) / w * n
        if n < w + h:
            return peak
        if n <= w + h + d:
            return peak * math.exp(math.log(final / peak) / d * (n - w - h))
        return final

    for n in (0, 1, 50, 99, 100, 300, 499, 500, 750, 1000, 1200):
        np.testing.assert_allclose(float(sched(n)), fairseq(n), rtol=1e-5)
    lin = make_schedule("linear", 1.0, 100, warmup_steps=10)
    assert float(lin(5)) == pytest.approx(0.5) and float(lin(55)) == pytest.approx(0.5) and float(lin(100)) == 0.0


def _tiny_ctc(freeze_transformer_steps=0, grad_accum=1):
    from flax_d2v.config import tiny_config
    from flax_d2v.modeling import Data2VecAudioForCTC, init_params
    from flax_d2v.train.ctc import CTCObjective
    from flax_d2v.train.loop import make_train_step
    from flax_d2v.train.schedules import constant
    from flax_d2v.train.state import create_state, make_optimizer

    config = tiny_config(
        vocab_size=8,
        mask_time_prob=0.3,
        mask_time_length=2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
    )
    module = Data2VecAudioForCTC(config, freeze_feature_encoder=True)
    params = init_params(module, 0)
    sched = constant(1e-3)
    tx = make_optimizer(params, sched, freeze_feature_encoder=True, freeze_transformer_steps=freeze_transformer_steps)
    objective = CTCObjective(module)  # SpecAugment settings from the config above
    state = create_state(params, tx, {}, jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(objective, tx, sched, grad_accum))
    rng = np.random.default_rng(0)
    batch = {
        "input_values": rng.normal(size=(4, 8000)).astype(np.float32),
        "attention_mask": np.ones((4, 8000), np.int32),
        "index": np.arange(4, dtype=np.int32),
        "labels": rng.integers(1, 8, size=(4, 5)).astype(np.int32),
    }
    batch["attention_mask"][1, 6000:] = 0
    batch["labels"][2, 3:] = -100
    return state, step, batch


def _changed(a, b):
    from flax import traverse_util

    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    return {"/".join(k) for k in fa if not np.array_equal(np.asarray(fa[k]), np.asarray(fb[k]))}


def test_frozen_groups():
    state, step, batch = _tiny_ctc(freeze_transformer_steps=2)
    p0 = jax.device_get(state.params)
    for _ in range(2):
        state, _ = step(state, batch)
    changed = _changed(p0, jax.device_get(state.params))
    assert changed and all(k.startswith("lm_head") for k in changed)  # only the head in the first K updates
    p2 = jax.device_get(state.params)
    state, _ = step(state, batch)
    changed = _changed(p2, jax.device_get(state.params))
    assert any("encoder" in k for k in changed)
    assert not any("feature_extractor" in k for k in changed)  # feature encoder frozen throughout


def test_grad_accumulation_equals_one_big_batch():
    s1, step1, batch = _tiny_ctc(grad_accum=1)
    s2, step2, _ = _tiny_ctc(grad_accum=2)
    s1, m1 = step1(s1, batch)
    s2, m2 = step2(s2, batch)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-4)


def test_finetune_help_lists_the_contract_flags():
    out = subprocess.run(
        [sys.executable, "-m", "flax_d2v.cli", "finetune", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    ).stdout
    for flag in (
        "--train",
        "--eval",
        "--model",
        "--out",
        "--steps",
        "--batch-size",
        "--learning-rate",
        "--seed",
        "--save-every",
        "--dropout",
        "--vocab",
        "--mask-time-prob",
        "--mask-feature-length",
        "--layerdrop",
        "--bf16",
        "--remat",
        "--scan-layers",
        "--grad-accum",
        "--clip-norm",
        "--freeze-feature-encoder",
        "--freeze-transformer-steps",
        "--mesh",
        "--pmap",
        "--coordinator",
        "--config",
        "--keep",
        "--tensorboard",
        "--eval-every",
        "--log-every",
    ):
        assert flag in out, flag


def test_compute_options_and_scanned_export(speech_dir, tmp_path):
    """bf16 + scan + remat + grad accumulation + tri-stage + clipping + a delayed transformer, exported to HF."""
    manifest = write_manifest(speech_dir, OVERFIT_CLIPS, tmp_path / "four.tsv")
    run = tmp_path / "run"
    result = finetune(
        resolve(
            dict(
                train=str(manifest),
                eval=str(manifest),
                model="tiny",
                out=str(run),
                steps=4,
                batch_size=4,
                learning_rate=1e-3,
                bf16=True,
                scan_layers=True,
                remat="dots_saveable",
                grad_accum=2,
                clip_norm=1.0,
                freeze_transformer_steps=1,
                mask_time_prob=0.1,
                mask_time_length=2,
                mask_feature_prob=0.1,
                mask_feature_length=4,
                layerdrop=0.1,
                log_every=2,
                eval_every=2,
                progress=False,
            )
        )
    )
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert [r["step"] for r in rows if "wer" in r] == [2, 4]
    layer = result.state.params["data2vec_audio"]["encoder"]["layers"]["layer"]
    assert layer["attention"]["q_proj"]["kernel"].ndim == 3  # stacked by nn.scan
    config = json.loads((run / "hf" / "config.json").read_text())
    assert (
        config["mask_time_prob"] == 0.1
        and config["vocab_size"] == 26
        and config["architectures"] == ["Data2VecAudioForCTC"]
    )
    from safetensors.numpy import load_file

    keys = load_file(run / "hf" / "model.safetensors")
    assert "data2vec_audio.encoder.layers.1.attention.q_proj.weight" in keys and "lm_head.weight" in keys


def test_init_from_hf_model_without_head(speech_dir, tmp_path):
    """An HF Data2VecAudioModel (pretrained, no lm_head) gets a fresh head for the run's vocab; the rest loads."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from conftest import tiny_hf_kwargs

    torch.manual_seed(0)
    hf = transformers.Data2VecAudioModel(transformers.Data2VecAudioConfig(**tiny_hf_kwargs()))
    hf.save_pretrained(tmp_path / "pretrained")
    manifest = write_manifest(speech_dir, OVERFIT_CLIPS, tmp_path / "four.tsv")
    result = finetune(
        resolve(
            dict(
                train=str(manifest),
                model=str(tmp_path / "pretrained"),
                out=str(tmp_path / "run"),
                steps=2,
                batch_size=4,
                learning_rate=1e-4,
                log_every=1,
                progress=False,
                export_hf=False,
            )
        )
    )
    params = jax.device_get(result.state.params)
    assert params["lm_head"]["kernel"].shape == (64, 26)
    conv = hf.feature_extractor.conv_layers[0].conv.weight.detach().numpy()  # frozen: still the loaded weights
    ours = params["data2vec_audio"]["feature_extractor"]["conv_layers_0"]["conv"]["kernel"]
    np.testing.assert_array_equal(np.transpose(ours, (2, 1, 0)), conv)


def test_checkpoints_keep_latest_and_best_by_wer(tmp_path):
    from flax_d2v.train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "ck", keep=2, keep_best=1)
    wers = {2: 0.5, 4: 0.8}
    for step in range(1, 6):
        state = {"w": jnp.full((3,), float(step)), "step": jnp.asarray(step)}
        metrics = {"wer": wers[step]} if step in wers else None
        ckpt.save(step, state, {"epoch": 0, "batch_in_epoch": step}, {"objective": "test"}, metrics=metrics)
        ckpt.wait()
    assert ckpt.all_steps() == [2, 4, 5]  # the last two, and step 2: the best WER
    abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    state, data, meta = ckpt.restore(2, abstract)
    assert float(state["w"][0]) == 2.0 and data == {"epoch": 0, "batch_in_epoch": 2} and meta["objective"] == "test"
    ckpt.close()
