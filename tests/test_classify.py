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


def train(task: str, speech_dir: Path, tmp: Path):
    from flax_d2v.commands.finetune import resolve
    from flax_d2v.train.finetune_run import finetune_classifier

    manifest, files, speakers = speaker_manifest(speech_dir, tmp / "speakers.tsv")
    config = flax_d2v.tiny_config(
        classifier_proj_size=32,
        tdnn_dim=(64, 64, 128),
        tdnn_kernel=(5, 3, 1),
        tdnn_dilation=(1, 2, 1),
        xvector_output_dim=32,
    )
    (tmp / "config.json").write_text(config.to_json_string())
    result = finetune_classifier(
        resolve(
            dict(
                task=task,
                train=str(manifest),
                eval=str(manifest),
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
        )
    )
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


@pytest.mark.slow
def test_xvector_training_separates_speakers(speech_dir, tmp_path, capsys):
    from flax_d2v.api.classify import Classifier, cosine

    result, files, speakers = train("xvector", speech_dir, tmp_path)
    hf = tmp_path / "run" / "hf"
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["Data2VecAudioForXVector"]
    emb = [r.embedding for r in Classifier(str(hf), batch_size=1).embed(files)]
    same, diff = [], []
    for i in range(len(files)):
        for j in range(i + 1, len(files)):
            (same if speakers[i] == speakers[j] else diff).append(cosine(emb[i], emb[j]))
    assert np.mean(same) > np.mean(diff), (np.mean(same), np.mean(diff))
    # d2v embed --xvector and d2v similarity agree with the API
    assert main(["embed", "--xvector", "--model", str(hf), "--out", str(tmp_path / "a.npz"), files[0]]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "a.npz")["xvector"], emb[0], rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert main(["similarity", files[0], files[1], "--model", str(hf)]) == 0
    assert abs(float(capsys.readouterr().out) - cosine(emb[0], emb[1])) < 1e-5


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
