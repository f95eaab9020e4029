"""Speaker identification and x-vectors fine-tuned from random init on real speech, served by
`d2v classify`, `d2v embed --xvector` and `d2v similarity`, and read back by transformers.

The 14 16 kHz clips of ../shared/speech (6 speakers, the `speaker` column of transcripts.tsv) are
both the training and the eval set: the claim is that the head, its objective and the loop can fit
them (training accuracy 1.0) and that what RUN/hf holds is what transformers' pipeline reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import flax_d2v
from flax_d2v.cli import main

# A tiny model with small heads; whole-set batches and a constant lr make the fit steady.
STEPS = 200
LEARNING_RATE = 2e-3


def speaker_manifest(speech_dir: Path, path: Path) -> tuple[Path, list[str], list[str]]:
    rows = [line.split("\t") for line in (speech_dir / "transcripts.tsv").read_text().splitlines()[1:]]
    rows = [r for r in rows if r[0].startswith("16k/")]
    files, speakers = [str(speech_dir / r[0]) for r in rows], [r[4] for r in rows]
    path.write_text("path\tlabel\n" + "".join(f"{f}\t{s}\n" for f, s in zip(files, speakers, strict=True)))
    return path, files, speakers


def train(task: str, speech_dir: Path, tmp: Path, *, config: dict | None = None, **settings):
    """Train `task` on the 14 clips (or `settings["train"]`), evaluated on the training manifest (or
    `settings["eval"]`); `config`: changes to the tiny model's config."""
    from flax_d2v.commands.finetune import resolve
    from flax_d2v.train.finetune_run import finetune_classifier

    manifest, files, speakers = speaker_manifest(speech_dir, tmp / "speakers.tsv")
    model = flax_d2v.tiny_config(
        **{
            "classifier_proj_size": 32,
            "tdnn_dim": (64, 64, 128),
            "tdnn_kernel": (5, 3, 1),
            "tdnn_dilation": (1, 2, 1),
            "xvector_output_dim": 32,
            **(config or {}),
        }
    )
    (tmp / "config.json").write_text(model.to_json_string())
    base = dict(
        task=task,
        train=str(manifest),
        eval=str(settings.get("train", manifest)),
        model=str(tmp / "config.json"),
        out=str(tmp / "run"),
        steps=STEPS,
        batch_size=14,
        learning_rate=LEARNING_RATE,
        seed=0,
        lr_schedule="constant",
        freeze_feature_encoder=False,
        dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
        log_every=10,
        save_every=10_000,
        progress=False,
    )
    result = finetune_classifier(resolve({**base, **settings}))
    return result, files, speakers


@pytest.fixture(scope="module")
def speaker_id(speech_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speaker-id")
    result, files, speakers = train("audio-classification", speech_dir, tmp)
    return tmp / "run", result, files, speakers


@pytest.mark.slow
def test_speaker_id_reaches_training_accuracy_one(speaker_id):
    run, result, _, speakers = speaker_id
    assert result.last_eval["accuracy"] == 1.0, result.last_eval
    config = json.loads((run / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Data2VecAudioForSequenceClassification"]
    assert sorted(config["label2id"]) == sorted(set(speakers)) and len(config["id2label"]) == 6


@pytest.mark.slow
def test_pipeline_on_run_hf_gives_the_labels_of_d2v_classify(speaker_id, capsys):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    run, _, files, speakers = speaker_id
    model, info = transformers.Data2VecAudioForSequenceClassification.from_pretrained(
        run / "hf", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    import soundfile as sf

    pipe = transformers.pipeline("audio-classification", model=str(run / "hf"))
    # the pipeline reads paths through ffmpeg, which this machine lacks: hand it the 16 kHz samples
    theirs = [pipe({"raw": sf.read(f, dtype="float32")[0], "sampling_rate": 16000}, top_k=1)[0]["label"] for f in files]
    assert main(["classify", "--model", str(run / "hf"), *files]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [p for p, _, _ in lines] == files
    ours = [label for _, label, _ in lines]
    assert ours == theirs
    assert ours == speakers
    # the Python API says the same, with --top-k scores in order
    top = flax_d2v.classify(str(run / "hf"), files[:2], top_k=3)
    assert [r.label for r in top] == speakers[:2]
    assert all(len(r.labels) == 3 and r.labels[0][1] >= r.labels[1][1] >= r.labels[2][1] for r in top)


HELD_OUT = 0.4  # x-vector verification: the last 40% of every clip is held out, in pieces of about 1 s
# The x-vector recipe: the weighted layer sum (the lower layers carry more of the speaker), dropout and
# SpecAugment against the memorising of 29 training pieces. Held-out EER measured (CPU) at steps
# 100/200/300/400: 0.19/0.32/0.28/0.30, untrained 0.34; without the weighted sum and regularisation
# (lr 2e-3) training did not lower it.
XVECTOR_CONFIG = {"use_weighted_layer_sum": True}
XVECTOR_RECIPE = dict(
    steps=300, batch_size=16, learning_rate=5e-4, dropout=0.1, layerdrop=0.0, mask_time_prob=0.05, eval_every=100
)


def verification_split(speech_dir: Path, tmp: Path) -> tuple[Path, Path, list[str], list[str]]:
    """(train manifest, held-out manifest, held-out files, their speakers): the first 60% of each clip is
    trained on and the rest makes the verification trials, both cut into pieces of about a second, so
    every held-out piece is of a speaker the model was trained on, and no piece's audio was."""
    import soundfile as sf

    rows = [line.split("\t") for line in (speech_dir / "transcripts.tsv").read_text().splitlines()[1:]]
    rows = [r for r in rows if r[0].startswith("16k/")]
    (tmp / "train").mkdir(exist_ok=True)
    (tmp / "held").mkdir(exist_ok=True)
    train_rows, held_rows = [], []
    for rel, speaker in ((r[0], r[4]) for r in rows):
        wave, rate = sf.read(speech_dir / rel, dtype="float32")
        cut = int(len(wave) * (1 - HELD_OUT))
        for part, rows_of_part, audio in (("train", train_rows, wave[:cut]), ("held", held_rows, wave[cut:])):
            for k, piece in enumerate(np.array_split(audio, max(1, round(len(audio) / rate)))):
                path = tmp / part / f"{Path(rel).stem}_{k}.wav"
                sf.write(path, piece, rate)
                rows_of_part.append((str(path), speaker))
    manifests = []
    for name, part in (("train.tsv", train_rows), ("held.tsv", held_rows)):
        (tmp / name).write_text("path\tlabel\n" + "".join(f"{f}\t{s}\n" for f, s in part))
        manifests.append(tmp / name)
    return manifests[0], manifests[1], [f for f, _ in held_rows], [s for _, s in held_rows]


@pytest.mark.slow
def test_xvector_training_lowers_the_verification_eer_on_held_out_speech(speech_dir, tmp_path, capsys):
    """What training buys an x-vector model: a lower speaker-verification EER on held-out speech of the
    speakers it was trained on than the same model untrained (random weights already score
    same-speaker pairs a little higher, so "same above different" alone proves nothing)."""
    from flax_d2v.api.classify import Classifier, cosine
    from flax_d2v.heads import Data2VecAudioForXVector, with_labels
    from flax_d2v.modeling import init_params
    from flax_d2v.train.classification import verification_eer

    train_tsv, held_tsv, held, speakers = verification_split(speech_dir, tmp_path)
    assert len(held) >= 16 and len(set(speakers)) == 6
    result, _, _ = train(
        "xvector",
        speech_dir,
        tmp_path,
        config=XVECTOR_CONFIG,
        **XVECTOR_RECIPE,
        train=str(train_tsv),
        eval=str(held_tsv),
    )
    hf = tmp_path / "run" / "hf"
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["Data2VecAudioForXVector"]
    trained = [r.embedding for r in Classifier(str(hf)).embed(held)]
    eer = verification_eer(trained, speakers)
    config = flax_d2v.Data2VecAudioConfig.from_json_file(hf / "config.json")
    untrained_model = Data2VecAudioForXVector(with_labels(config, sorted(set(speakers))))
    untrained = [r.embedding for r in Classifier((untrained_model, init_params(untrained_model, 0))).embed(held)]
    untrained_eer = verification_eer(untrained, speakers)
    print(f"held-out verification EER: trained {eer:.4f}, untrained {untrained_eer:.4f} ({len(held)} pieces)")
    assert eer < untrained_eer, (eer, untrained_eer)
    assert result.last_eval["eer"] == pytest.approx(eer, abs=1e-9)  # the run's eval is what d2v embed gives
    # d2v embed --xvector and d2v similarity agree with the API
    assert main(["embed", "--xvector", "--model", str(hf), "--out", str(tmp_path / "a.npz"), held[0]]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "a.npz")["xvector"], trained[0], rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert main(["similarity", held[0], held[1], "--model", str(hf)]) == 0
    assert abs(float(capsys.readouterr().out) - cosine(trained[0], trained[1])) < 1e-5


def test_equal_error_rate_on_hand_counted_trials():
    from flax_d2v.train.metrics import equal_error_rate

    assert equal_error_rate([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 0.0
    assert equal_error_rate([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 1.0
    # at 0.6 one of three other-speaker trials is accepted (0.6) and one of three same-speaker ones rejected (0.3)
    same, other = [0.9, 0.7, 0.3], [0.6, 0.2, 0.1]
    assert equal_error_rate(same + other, [True] * 3 + [False] * 3) == pytest.approx(1 / 3)
    assert np.isnan(equal_error_rate([0.5, 0.4], [True, True]))


def test_classify_cli_contract(tmp_path, capsys, speech_dir):
    """Random tiny classifiers: output formats, --top-k, --json, --frames, bad files, wrong model kinds."""
    from flax_d2v.convert.hf import save_hf
    from flax_d2v.heads import (
        Data2VecAudioForAudioFrameClassification,
        Data2VecAudioForSequenceClassification,
        with_labels,
    )
    from flax_d2v.modeling import init_params

    config = with_labels(flax_d2v.tiny_config(classifier_proj_size=16), ["no", "yes", "maybe"])
    seq = tmp_path / "seq"
    save_hf(seq, config, init_params(Data2VecAudioForSequenceClassification(config), 0))
    frames = tmp_path / "frames"
    save_hf(frames, config, init_params(Data2VecAudioForAudioFrameClassification(config), 0))
    clips = [str(speech_dir / "16k" / n) for n in ("cards_001.wav", "goforward.wav")]
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")

    assert main(["classify", "--model", str(seq), "--top-k", "2", clips[0], str(bad), clips[1]]) == 1
    out = capsys.readouterr()
    lines = [line.split("\t") for line in out.out.splitlines()]
    assert [p for p, _, _ in lines] == [clips[0], clips[0], clips[1], clips[1]]
    assert all(label in ("no", "yes", "maybe") and 0 <= float(s) <= 1 for _, label, s in lines)
    assert str(bad) in out.err and "Traceback" not in out.err

    assert main(["classify", "--model", str(seq), "--json", clips[0]]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["path"] == clips[0] and len(row["labels"]) == 1

    assert main(["classify", "--model", str(frames), "--frames", clips[1]]) == 0
    segs = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    starts, ends = [float(s[1]) for s in segs], [float(s[2]) for s in segs]
    assert starts[0] == 0.0 and starts[1:] == ends[:-1] and abs(ends[-1] - 2.78) < 0.05
    assert all(s[0] == clips[1] and s[3] in ("no", "yes", "maybe") for s in segs)

    assert main(["classify", "--model", str(frames), clips[1]]) == 1
    assert "--frames" in capsys.readouterr().err
    assert main(["classify", "--model", str(seq), "--frames", clips[1]]) == 1
    assert "not a frame-classification model" in capsys.readouterr().err
    assert main(["similarity", clips[0], clips[1], "--model", str(seq)]) == 1
    assert "not an x-vector model" in capsys.readouterr().err


def test_finetune_classification_bad_manifests_get_one_line(tmp_path, capsys, speech_dir):
    clip = speech_dir / "16k" / "cards_001.wav"
    no_label = tmp_path / "no_label.tsv"
    no_label.write_text(f"path\ttext\n{clip}\thello\n")
    common = [
        "finetune",
        "--task",
        "audio-classification",
        "--model",
        "tiny",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--learning-rate",
        "1e-3",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    assert main([*common, "--train", str(no_label)]) == 1
    err = capsys.readouterr().err
    assert "no 'label' column" in err and str(no_label) in err and "Traceback" not in err
    one = tmp_path / "one.tsv"
    one.write_text(f"path\tlabel\n{clip}\ta\n{clip}\ta\n")
    assert main([*common, "--train", str(one)]) == 1
    assert "at least 2" in capsys.readouterr().err
    train_tsv, dev = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    train_tsv.write_text(f"path\tlabel\n{clip}\ta\n{clip}\tb\n")
    dev.write_text(f"path\tlabel\n{clip}\tc\n")
    assert main([*common, "--train", str(train_tsv), "--eval", str(dev)]) == 1
    err = capsys.readouterr().err
    assert "'c'" in err and "not among the training labels" in err


# A clip's x-vector batched and padded vs run alone: what float32 leaves between two XLA programs of
# different shapes. Measured on the tiny x-vector models below (CPU): 3.3e-7 and 4.2e-7 of the largest
# value, without and with the adapter; before the fix 1.4e-2 and 5.1e-2 (the pooling counted TDNN
# frames that read the padding; the adapter's convs read it too). About 10x the measured noise:
XVECTOR_PADDING_RTOL = 5e-6
NORMALIZE_EPS = 1e-2  # vs the clips' variance of ~1e-2: moves their x-vectors by ~2e-3 of the largest value (measured)
# bf16 against float32 x-vectors of a tiny model: cosine 0.99998 measured (CPU); a bound well under it
BF16_COSINE = 0.999
PADDED_CLIPS = ("librivox_0880.wav", "slt_arctic_a0009.wav", "cards_005.wav")  # one bucket, 0.5 to 1 s of padding


SLOW = pytest.mark.slow


@pytest.mark.parametrize("encoder", ["1.0", pytest.param("1.0 + adapter", marks=SLOW), pytest.param("2.0", marks=SLOW)])
def test_xvector_of_a_padded_clip_is_the_clip_alone(speech_dir, tmp_path, encoder):
    """`Classifier.embed` pads clips to their bucket and batches them; each embedding must be the clip's
    alone, unpadded (as `d2v embed --xvector` and `d2v similarity` promise), with the dilated TDNN that
    reads past a clip's last frame, with the adapter's strided convs in front of it, and on data2vec
    2.0's encoder; preprocessed as the model's preprocessor_config.json says, at `--precision`."""
    import jax
    import jax.numpy as jnp

    from flax_d2v.api.classify import Classifier, cosine
    from flax_d2v.audio import load_audio, normalize
    from flax_d2v.checkpoint import save_flax
    from flax_d2v.data2vec2 import Data2Vec2ForXVector, tiny_config_v2
    from flax_d2v.heads import Data2VecAudioForXVector
    from flax_d2v.modeling import init_params

    head = dict(tdnn_dim=(32, 32, 48), tdnn_kernel=(5, 3, 1), tdnn_dilation=(1, 2, 1), xvector_output_dim=24)
    if encoder == "2.0":
        module = Data2Vec2ForXVector(tiny_config_v2(**head))
    else:
        adapter = dict(add_adapter=True, num_adapter_layers=2, output_hidden_size=64) if "adapter" in encoder else {}
        module = Data2VecAudioForXVector(flax_d2v.tiny_config(**head, **adapter))
    # head weights well above the 0.02 init, so that the embeddings depend on the audio (tests/test_heads.py)
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p * 20.0 if path[0].key != "data2vec_audio" and p.ndim == 2 else p, init_params(module, 0)
    )
    # a model directory whose preprocessor_config.json records an eps far from transformers' 1e-7 (a
    # fairseq conversion records 1e-5): the clips must be normalised with it
    model = tmp_path / "xvector"
    pre = json.dumps({"do_normalize": True, "normalize_eps": NORMALIZE_EPS})
    save_flax(model, module.config, params, extra_files={"preprocessor_config.json": pre})
    files = [str(speech_dir / "16k" / name) for name in PADDED_CLIPS]
    runner = Classifier(str(model), batch_size=4)
    batched = np.stack([r.embedding for r in runner.embed(files)])
    assert runner.shapes == {(4, 64320)}  # one padded batch of the three clips and a filler row
    alone_fn = jax.jit(lambda x: module.apply({"params": params}, x).embeddings[0])
    alone = np.stack([np.asarray(alone_fn(jnp.asarray(normalize(load_audio(f), NORMALIZE_EPS)[None]))) for f in files])
    scale = np.abs(alone).max()
    assert np.abs(alone - alone.mean(0)).max() > 1e3 * XVECTOR_PADDING_RTOL * scale  # the clips differ
    np.testing.assert_allclose(batched, alone, rtol=0, atol=XVECTOR_PADDING_RTOL * scale)
    if encoder != "1.0":
        return
    # `d2v embed --xvector --precision bf16` computes in bf16: far from float32, yet the same embedding
    assert (
        main(
            [
                "embed",
                "--xvector",
                "--precision",
                "bf16",
                "--model",
                str(model),
                "--out",
                str(tmp_path / "a.npz"),
                files[0],
            ]
        )
        == 0
    )
    bf16 = np.load(tmp_path / "a.npz")["xvector"]
    assert np.abs(bf16 - alone[0]).max() > 1e3 * XVECTOR_PADDING_RTOL * scale
    assert cosine(bf16, alone[0]) > BF16_COSINE


def _two_speakers(speech_dir: Path, path: Path) -> Path:
    clips = [speech_dir / "16k" / name for name in ("cards_001.wav", "cards_003.wav")]
    path.write_text("path\tlabel\n" + "".join(f"{c}\t{s}\n" for c, s in zip(clips, ("a", "b"), strict=True)))
    return path


def _one_step(manifest: Path, out: Path, model: str = "tiny", **kw):
    from flax_d2v.commands.finetune import resolve

    settings = dict(
        task="xvector",
        train=str(manifest),
        model=model,
        out=str(out),
        steps=1,
        batch_size=2,
        learning_rate=1e-3,
        log_every=1,
        progress=False,
        num_workers=1,
        async_checkpoint=False,
    )
    return resolve({**settings, **kw})


def test_xvector_run_from_a_data2vec2_checkpoint_keeps_its_encoder_dropout_and_resume_rules(speech_dir, tmp_path):
    """`finetune --task xvector --model <data2vec 2.0 dir>`: the head is built on the checkpoint's own
    encoder (every encoder tensor carried, only the head's new) and RUN/flax is a 2.0 x-vector model.
    The same run checks two rules every task shares with CTC: `--dropout` means what its help says
    (all dropouts and LayerDrop; a specific flag wins), and a resume with another --batch-size or
    --seed is refused in one line."""
    import jax

    from flax_d2v.checkpoint import load_flax, save_flax
    from flax_d2v.convert.fairseq2 import export_fairseq2
    from flax_d2v.data2vec2 import Data2Vec2Config, Data2Vec2Model, tiny_config_v2
    from flax_d2v.errors import D2VError
    from flax_d2v.modeling import init_params
    from flax_d2v.params import flatten
    from flax_d2v.train import finetune

    config = tiny_config_v2(tdnn_dim=(32, 48), tdnn_kernel=(3, 1), tdnn_dilation=(2, 1), xvector_output_dim=16)
    assert config.layerdrop > 0 and config.hidden_dropout > 0
    # noise on every tensor: none of the checkpoint's equals what a fresh init would give
    rng = np.random.default_rng(0)
    encoder = jax.tree.map(
        lambda p: np.asarray(p) + rng.normal(0.0, 0.1, np.shape(p)).astype(np.float32),
        init_params(Data2Vec2Model(config), 0),
    )
    save_flax(tmp_path / "v2", config, encoder)
    manifest = _two_speakers(speech_dir, tmp_path / "speakers.tsv")
    run, lr = tmp_path / "run", 1e-3
    finetune(
        _one_step(manifest, run, model=str(tmp_path / "v2"), learning_rate=lr, dropout=0.0, attention_dropout=0.05)
    )
    saved_config, saved = load_flax(run / "flax")
    assert isinstance(saved_config, Data2Vec2Config) and not (run / "hf").exists()
    flat, want = flatten(saved), flatten(encoder)
    carried = {k.removeprefix("data2vec_audio/"): v for k, v in flat.items() if k.startswith("data2vec_audio/")}
    assert set(carried) == set(want)
    for k, v in want.items():  # one Adam update moves a parameter by less than the learning rate
        assert np.abs(carried[k] - v).max() <= lr, k
    assert {k.split("/")[0] for k in flat if not k.startswith("data2vec_audio/")} == {
        "projector",
        *(f"tdnn_{i}" for i in range(len(config.tdnn_dim))),
        "feature_extractor",
        "classifier",
        "objective",
    }
    module, _ = flax_d2v.from_pretrained(run / "flax")
    assert type(module).__name__ == "Data2Vec2ForXVector"
    with pytest.raises(D2VError, match=r"Data2VecAudioForXVector head has no fairseq form"):
        export_fairseq2(run / "flax", tmp_path / "x.pt")
    # --dropout: every dropout and LayerDrop (2.0's post-MLP and prenet ones follow, as for CTC)
    assert saved_config.layerdrop == 0.0 and saved_config.hidden_dropout == 0.0 and saved_config.final_dropout == 0.0
    assert saved_config.post_mlp_dropout == 0.0 and saved_config.prenet_layerdrop == 0.0
    assert saved_config.attention_dropout == 0.05  # the specific flag wins over --dropout
    # resume: the same rule as CTC
    same = dict(model=str(tmp_path / "v2"), learning_rate=lr, dropout=0.0, attention_dropout=0.05, steps=2)
    with pytest.raises(D2VError, match=r"started with --batch-size 2, this command gives 1") as e:
        finetune(_one_step(manifest, run, **same, batch_size=1))
    assert "\n" not in str(e.value)
    with pytest.raises(D2VError, match=r"started with --seed 0, this command gives 1"):
        finetune(_one_step(manifest, run, **same, seed=1))
