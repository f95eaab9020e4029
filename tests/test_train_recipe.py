"""Training follows its recipe (issue 14): one schedule clock, what `--dropout` sets, resume checks, pmap dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# The received rate is recovered from an fp32 update (-lr * wd * p with p = 1): a few ulps.
RATE_RTOL = 1e-5


def _received_rates(freeze_transformer_steps: int, steps: int):
    """The learning rate each group gets at every update: with zero gradients Adam's step is 0, so the
    update is AdamW's decoupled decay alone, -lr * weight_decay * param, and param = 1 gives lr back."""
    from flax_d2v.train.schedules import make_schedule
    from flax_d2v.train.state import make_optimizer

    wd = 0.5
    schedule = make_schedule("tri_stage", 1.0, steps)
    # the CTC model's layout: the encoder nested under `data2vec_audio`, the head beside it
    params = {"data2vec_audio": {"w": jnp.ones((3,))}, "lm_head": {"w": jnp.ones((3,))}}
    tx = make_optimizer(
        params,
        schedule,
        weight_decay=wd,
        freeze_feature_encoder=False,
        freeze_transformer_steps=freeze_transformer_steps,
    )
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(lambda s: tx.update(zeros, s, params))
    rates = {"encoder": [], "lm_head": []}
    for _ in range(steps):
        updates, state = update(state)
        for k, key in (("encoder", "data2vec_audio"), ("lm_head", "lm_head")):
            rates[k].append(float(-updates[key]["w"][0]) / wd)
    return schedule, rates


def test_delayed_transformer_follows_the_global_schedule():
    """fairseq's `freeze_finetune_updates`: one lr scheduler for the whole model, so when the
    transformer starts learning at update K+1 it gets the rate of update K+1, not a new warm-up."""
    steps, k = 20, 10
    schedule, rates = _received_rates(k, steps)
    want = [float(schedule(n)) for n in range(steps)]  # update n+1 uses the schedule at count n
    np.testing.assert_allclose(rates["lm_head"], want, rtol=RATE_RTOL)
    assert rates["encoder"][:k] == [0.0] * k  # frozen for the first K updates
    for update in (k + 1, k + 2, steps):  # updates K+1 (its first), K+2 and the last
        np.testing.assert_allclose(rates["encoder"][update - 1], want[update - 1], rtol=RATE_RTOL, err_msg=update)
    np.testing.assert_allclose(rates["encoder"][k:], want[k:], rtol=RATE_RTOL)
    assert rates["encoder"][-1] < 0.1 * max(want)  # in the decay phase at the end, as the head


def test_finetune_dropout_flag_sets_layerdrop_too():
    """`--dropout P` "sets all of the dropouts below", LayerDrop included (tiny and base keep 0.1 otherwise);
    a specific flag given with it still wins."""
    from flax_d2v.commands.finetune import resolve
    from flax_d2v.config import preset
    from flax_d2v.train.finetune_run import training_config

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "A": 5}
    base = dict(train="a.tsv", model="tiny", out="o", steps=1, batch_size=1, learning_rate=1e-4)
    assert preset("tiny").layerdrop > 0
    config = training_config(preset("tiny"), resolve({**base, "dropout": 0.0}), vocab)
    for key in (
        "hidden_dropout",
        "attention_dropout",
        "activation_dropout",
        "feat_proj_dropout",
        "final_dropout",
        "layerdrop",
    ):
        assert getattr(config, key) == 0.0, key
    config = training_config(preset("tiny"), resolve({**base, "dropout": 0.0, "layerdrop": 0.05}), vocab)
    assert config.layerdrop == 0.05 and config.hidden_dropout == 0.0


def _run_pytest_with_speech_dir(tmp_path, env_extra: dict):
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    (tmp_path / "conftest.py").write_text(  # the project's conftest under another module name
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('d2v_conftest', {str(tests / 'conftest.py')!r})\n"
        "mod = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(mod)\nspeech_dir = mod.speech_dir\n"
    )
    (tmp_path / "test_needs_speech.py").write_text("def test_x(speech_dir):\n    assert speech_dir.is_dir()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "D2V_SHARED_SPEECH")}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )


def test_missing_speech_fails_under_ci_and_skips_otherwise(tmp_path):
    missing = str(tmp_path / "no-speech-here")
    proc = _run_pytest_with_speech_dir(tmp_path, {"CI": "true", "D2V_SHARED_SPEECH": missing})
    assert proc.returncode == 1, proc.stdout
    assert "1 failed" in proc.stdout or "1 error" in proc.stdout, proc.stdout
    assert f"{missing}: no transcripts.tsv" in proc.stdout
    proc = _run_pytest_with_speech_dir(tmp_path, {"D2V_SHARED_SPEECH": missing})
    assert proc.returncode == 0 and "1 skipped" in proc.stdout, proc.stdout


# ------------------------------------------------------------------------------------------ resume checks
def _tiny_finetune(manifest, out, **kw):
    from flax_d2v.commands.finetune import resolve

    base = dict(
        train=str(manifest),
        model="tiny",
        out=str(out),
        steps=1,
        batch_size=2,
        learning_rate=1e-4,
        log_every=1,
        progress=False,
        export_hf=False,
        num_workers=0,  # in this process (worker processes: test_loader_workers, test_resume)
        async_checkpoint=False,
    )
    base.update(kw)
    return resolve(base)


def test_resume_with_other_shape_or_order_settings_is_refused_in_one_line(tmp_path, capsys):
    from synth_speech import write_corpus

    from flax_d2v.cli import main
    from flax_d2v.errors import D2VError
    from flax_d2v.train import finetune

    manifest = write_corpus(tmp_path / "data", 4)
    run = tmp_path / "run"
    finetune(_tiny_finetune(manifest, run))
    with pytest.raises(D2VError, match=r"started with --scan-layers off, this command gives on") as e:
        finetune(_tiny_finetune(manifest, run, steps=2, scan_layers=True))
    assert "\n" not in str(e.value)
    with pytest.raises(D2VError, match=r"started with --batch-size 2, this command gives 4"):
        finetune(_tiny_finetune(manifest, run, steps=2, batch_size=4))
    with pytest.raises(D2VError, match=r"--clip-norm 0.0, this command gives 1.0"):
        finetune(_tiny_finetune(manifest, run, steps=2, clip_norm=1.0))
    # the command line: one line on stderr, exit 1, no traceback
    code = main(
        [
            "finetune",
            "--train",
            str(manifest),
            "--model",
            "tiny",
            "--out",
            str(run),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--learning-rate",
            "1e-4",
            "--scan-layers",
            "--no-progress",
            "--no-export-hf",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line][0].count("--scan-layers") == 2
    # the same settings resume
    result = finetune(_tiny_finetune(manifest, run, steps=2))
    assert result.step == 2 and not result.stopped


# ------------------------------------------------------------------------------------------ eval = transcribe
def test_eval_transcripts_are_d2v_transcribes_for_long_clips_too(tmp_path):
    """Fine-tuning's eval and `d2v transcribe` (which chunks clips over 20 s with strides) give the same
    text for a 26 s clip and a short one, on a model whose outputs vary from frame to frame."""
    import soundfile as sf
    from synth_speech import write_corpus

    import flax_d2v
    from flax_d2v.config import tiny_config
    from flax_d2v.modeling import Data2VecAudioForCTC, init_params
    from flax_d2v.train import vocab as V
    from flax_d2v.train.ctc import CTCObjective
    from flax_d2v.train.finetune_run import make_eval_fn
    from flax_d2v.train.manifests import read_manifest
    from flax_d2v.train.state import TrainState

    short = write_corpus(tmp_path / "data", 3, seconds=2.0)
    rng = np.random.default_rng(0)
    waves = [sf.read(line.split("\t")[0], dtype="float32")[0] for line in short.read_text().splitlines()[1:]]
    long_wave = np.concatenate([waves[i % 3] * rng.uniform(0.5, 2.0) for i in range(13)])  # 26 s
    sf.write(tmp_path / "long.wav", long_wave, 16000, subtype="FLOAT")
    manifest_path = tmp_path / "eval.tsv"
    manifest_path.write_text(short.read_text() + f"{tmp_path / 'long.wav'}\tgo forward ten meters\n")
    manifest = read_manifest(manifest_path, require_text=True)
    vocab = V.build_vocab(manifest.texts)
    module = Data2VecAudioForCTC(tiny_config(vocab_size=len(vocab)))
    params = init_params(module, 0)
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 30.0  # a random model that says something,
    for layer in ("layers_0", "layers_1"):  # with attention strong enough that a chunk's context shows in its text
        attention = params["data2vec_audio"]["encoder"][layer]["attention"]
        for name in ("v_proj", "out_proj"):
            attention[name]["kernel"] = attention[name]["kernel"] * 10.0
    eval_fn = make_eval_fn(CTCObjective(module), manifest, vocab, batch_size=2)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=None, extra={}, rng=jax.random.PRNGKey(0))
    metrics = eval_fn(state)
    assert metrics["eval_clips"] == 4
    ours = flax_d2v.transcribe((module, params), [str(p) for p in manifest.paths], vocab=vocab, progress=False)
    assert len({t.text for t in ours}) > 1 and len(ours[-1].text) > 20  # not a constant output
    assert [eval_fn.hypotheses[i] for i in range(4)] == [t.text for t in ours]
    refs = [V.normalize_transcript(t) for t in manifest.texts]
    from flax_d2v.train.metrics import error_rates

    assert metrics["wer"] == error_rates(refs, [t.text for t in ours])["wer"]


# ------------------------------------------------------------------------------------------ model settings read
def test_fairseq_normalize_eps_is_read_by_transcribe(tmp_path, monkeypatch):
    """`d2v convert x.pt` records fairseq's normalisation eps (1e-5); `d2v transcribe` normalises with it
    (and with transformers' 1e-7 for a model whose preprocessor_config.json does not say)."""
    pytest.importorskip("torch")
    import importlib

    import fairseq_fixtures as F

    from flax_d2v.audio import FAIRSEQ_NORM_EPS, HF_NORM_EPS
    from flax_d2v.convert import fairseq as fs
    from flax_d2v.processor import read_preprocessor_config

    pt = F.save_checkpoint(F.checkpoint(F.hf_model(True), True, task_dictionary=True), tmp_path / "ft.pt")
    fs.convert_fairseq(pt, tmp_path / "conv")
    T = importlib.import_module("flax_d2v.api.transcribe")  # the module (the package exports a function of that name)
    assert read_preprocessor_config(tmp_path / "conv").normalize_eps == FAIRSEQ_NORM_EPS
    seen = []
    real = T.pad_batch
    monkeypatch.setattr(T, "pad_batch", lambda *a, **kw: seen.append(kw.get("eps")) or real(*a, **kw))
    quiet = (1e-4 * np.random.default_rng(0).normal(size=16000)).astype(np.float32)
    T.transcribe(str(tmp_path / "conv"), [quiet], progress=False)
    assert seen == [FAIRSEQ_NORM_EPS]
    (tmp_path / "conv" / "preprocessor_config.json").write_text('{"do_normalize": true}')
    T.transcribe(str(tmp_path / "conv"), [quiet], progress=False)
    assert seen[-1] == HF_NORM_EPS


def test_apply_spec_augment_false_turns_masking_off(tmp_path):
    """transformers' `apply_spec_augment: false` (config.json): no SpecAugment in fine-tuning, though the
    mask rates and `masked_spec_embed` are there; a mask rate given to `d2v finetune` turns it back on."""
    import json

    from flax_d2v.commands.finetune import resolve
    from flax_d2v.config import Data2VecAudioConfig, tiny_config
    from flax_d2v.modeling import Data2VecAudioForCTC, init_params
    from flax_d2v.train.ctc import CTCObjective
    from flax_d2v.train.finetune_run import training_config

    path = tmp_path / "config.json"
    off = dict(
        json.loads(tiny_config().to_json_string()),
        apply_spec_augment=False,
        mask_time_prob=0.5,
        mask_time_length=2,
        mask_feature_prob=0.5,
        mask_feature_length=4,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        vocab_size=8,
    )
    path.write_text(json.dumps(off))
    config = Data2VecAudioConfig.from_json_file(path)
    assert config.apply_spec_augment is False and config.has_masked_spec_embed
    assert json.loads(config.to_json_string())["apply_spec_augment"] is False  # written back as read
    module = Data2VecAudioForCTC(config)
    params = init_params(module, 0)
    x = np.random.default_rng(0).normal(size=(2, 8000)).astype(np.float32)
    batch = {"input_values": x, "attention_mask": np.ones_like(x, np.int32), "index": np.arange(2)}
    assert CTCObjective(module).masks(batch, jax.random.PRNGKey(0)) == (None, None)
    clean = module.apply({"params": params}, x).logits
    train = module.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)}).logits
    np.testing.assert_array_equal(np.asarray(train), np.asarray(clean))  # no dropout, and no masks drawn
    on = Data2VecAudioForCTC(config.replace(apply_spec_augment=True))
    masked = on.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)}).logits
    assert not np.allclose(np.asarray(masked), np.asarray(clean))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "A": 5}
    base = dict(train="a.tsv", model="tiny", out="o", steps=1, batch_size=1, learning_rate=1e-4)
    assert training_config(config, resolve(base), vocab).apply_spec_augment is False
    assert training_config(config, resolve({**base, "mask_time_prob": 0.3}), vocab).apply_spec_augment is True


# ------------------------------------------------------------------------------------------ pretraining data
def test_pretraining_crops_to_the_shortest_clip_and_drops_clips_under_2s():
    """fairseq's collater crops a batch to its shortest clip; ours to within 0.1 s of it (one XLA program
    per 0.1 s), never down to a bucket rung (up to 20% less audio). base_librispeech drops clips < 2 s."""
    import argparse

    from flax_d2v.commands import pretrain as P
    from flax_d2v.train.data2vec_objective import crop_width
    from flax_d2v.train.planning import bucket_ladder

    ladder = bucket_ladder(32000, 250000)
    for shortest in (32000, 39999, 41000, 123457, 249999):
        lengths = np.array([shortest, shortest + 5000, 250000])
        width = crop_width(lengths)
        assert shortest - 1600 < width <= shortest, (shortest, width)
        assert width % 1600 == 0
    assert crop_width(np.array([1000, 5000])) == 1000  # under 0.1 s: the clip's own length
    assert ladder[ladder <= 39999][-1] < 39999 - 1600  # what a bucket rung would have thrown away

    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    args = parser.parse_args(
        ["--train", "x.tsv", "--out", "o", "--steps", "1", "--batch-size", "1", "--config", "tiny"]
    )
    assert args.min_seconds == 2.0
    from flax_d2v.train.recipes import FINETUNE_DEFAULTS as DEFAULTS

    assert DEFAULTS["min_seconds"] is None  # fine-tuning keeps every clip, as fairseq's fine-tuning
