"""Hugging Face `datasets` splits as manifests (train/hf_datasets.py) and `d2v evaluate`.

The real speech (../shared/speech: 16 kHz clips, 8 and 11.025 kHz ones, one stereo) is written as
a `datasets.Dataset` with an `Audio` column three ways: `save_to_disk`, parquet files, and a
dataset repository laid out as on the hub (`data/{split}-*.parquet`, read as `hf:DIR:SPLIT`
through `datasets.load_dataset`). Each must give the batches a TSV of the same clips gives.
Nothing here touches the network; the datasets cache is a temporary directory.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from flax_d2v import cli
from flax_d2v.commands.evaluate import TSV_COLUMNS
from flax_d2v.errors import D2VError
from flax_d2v.train.classification import read_label_column
from flax_d2v.train.loader import BatchLoader
from flax_d2v.train.manifests import read_manifest
from flax_d2v.train.metrics import read_metrics

datasets = pytest.importorskip("datasets")

EVAL_CLIPS = ("cards_001", "cards_003", "cards_004", "cards_002")  # short: two Transcriber buckets, fast compiles


def _rows(speech_dir: Path, names=None) -> list[dict]:
    lines = (speech_dir / "transcripts.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]
    if names is not None:
        by_name = {Path(r["path"]).stem: r for r in rows}
        rows = [by_name[n] for n in names]
    return rows


def write_forms(speech_dir: Path, root: Path, names=None) -> dict[str, str]:
    """The same clips as a TSV, a save_to_disk directory, parquet files and a hub-style repository."""
    rows = _rows(speech_dir, names)
    ds = datasets.Dataset.from_dict(
        {
            "audio": [{"bytes": (speech_dir / r["path"]).read_bytes(), "path": Path(r["path"]).name} for r in rows],
            "sentence": [r["text"] for r in rows],
            "speaker": [r["speaker"] for r in rows],
        }
    ).cast_column("audio", datasets.Audio())
    root.mkdir(parents=True, exist_ok=True)
    ds.save_to_disk(str(root / "disk"))
    (root / "pq" / "data").mkdir(parents=True)
    ds.to_parquet(str(root / "pq" / "data" / "train-00000-of-00001.parquet"))
    ds.select(range(2)).to_parquet(str(root / "pq" / "data" / "test-00000-of-00001.parquet"))
    tsv = root / "clips.tsv"
    tsv.write_text(
        "path\ttext\tspeaker\n" + "".join(f"{speech_dir / r['path']}\t{r['text']}\t{r['speaker']}\n" for r in rows)
    )
    return {
        "tsv": str(tsv),
        "disk": str(root / "disk"),
        "parquet": str(root / "pq" / "data" / "train-*.parquet"),
        "hub": f"hf:{root / 'pq'}:train",
    }


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """datasets' cache (parquet conversions, our length caches) in a temporary directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_cache"))
        yield datasets.config.HF_DATASETS_CACHE


@pytest.fixture(scope="module")
def forms(speech_dir, hf_cache, tmp_path_factory):
    return write_forms(speech_dir, tmp_path_factory.mktemp("forms"))


def _batches(manifest, **kw) -> list[dict]:
    loader = BatchLoader(manifest, batch_size=4, seed=3, num_workers=1, **kw)
    it = iter(loader)
    out = [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(2 * loader.batches_per_epoch)]
    loader.close()
    return out


def test_batches_equal_those_of_a_tsv_and_resume_exactly(forms):
    """Two shuffled epochs (resampled, downmixed clips included) and a resume mid-epoch, array for array."""
    tsv = read_manifest(forms["tsv"])
    reference = _batches(tsv)
    for form in ("disk", "parquet", "hub"):
        m = read_manifest(forms[form])
        assert len(m) == len(tsv) == 17 and m.texts == tsv.texts  # the `sentence` column, found by default
        np.testing.assert_array_equal(m.lengths(), tsv.lengths())
        got = _batches(m)
        assert len(got) == len(reference)
        for a, b in zip(reference, got, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{form}: {key}")
    # resume: a loader restored to the state after batch 3 gives batch 4 onwards
    first = BatchLoader(read_manifest(forms["disk"]), batch_size=4, seed=3, num_workers=1)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state()
    first.close()
    resumed = BatchLoader(read_manifest(forms["parquet"]), batch_size=4, seed=3, num_workers=1)
    resumed.restore(state)
    it = iter(resumed)
    for expected in reference[3:5]:
        batch = next(it)
        for key in expected:
            np.testing.assert_array_equal(expected[key], np.asarray(batch[key]))
    resumed.close()


def test_lengths_read_once_and_reader_opens_lazily_after_pickling(forms, monkeypatch):
    first = read_manifest(forms["disk"])
    import soundfile

    def no_header(*a, **k):
        raise AssertionError("lengths were read again instead of from the cache")

    monkeypatch.setattr(soundfile, "info", no_header)
    again = read_manifest(forms["disk"])  # the cache in datasets' cache directory: no header read
    np.testing.assert_array_equal(again.lengths(), first.lengths())
    assert again.texts == first.texts
    monkeypatch.undo()

    reader = pickle.loads(pickle.dumps(first._reader))  # as a loader worker process receives it
    assert reader._view is None
    for i in (0, 15):  # a 16 kHz clip and the 11.025 kHz stereo one
        np.testing.assert_array_equal(reader(i), first.load(i))
    assert reader._view is not None


def test_labels_and_columns(forms):
    assert read_label_column(forms["disk"], "speaker") == read_label_column(forms["tsv"], "speaker")
    m = read_manifest(forms["parquet"], text_column="speaker")
    assert m.texts[0] == "arctic_awb"
    assert read_manifest(forms["disk"], require_text=True).texts[1].startswith("He turned sharply")


def test_bad_input_is_one_line(forms, tmp_path, monkeypatch):
    disk = forms["disk"]
    with pytest.raises(D2VError, match=r"no column 'wave' \(columns: audio, sentence, speaker\).*--audio-column"):
        read_manifest(disk, audio_column="wave")
    with pytest.raises(D2VError, match=r"no column 'words' \(columns: audio, sentence, speaker\).*--text-column"):
        read_manifest(disk, text_column="words")
    with pytest.raises(D2VError, match=r"not an Audio column"):
        read_manifest(disk, audio_column="speaker")
    with pytest.raises(D2VError, match=r"no column 'genre' \(columns: audio, sentence, speaker\).*--label-column"):
        read_label_column(disk, "genre")
    no_text = datasets.load_from_disk(disk).remove_columns(["sentence"])
    no_text.save_to_disk(str(tmp_path / "no_text"))
    with pytest.raises(D2VError, match=r"no transcript column \(none of text, sentence.*--text-column"):
        read_manifest(str(tmp_path / "no_text"), require_text=True)
    # splits: a DatasetDict directory, one that does not exist in it, one the hub-style repository lacks
    datasets.DatasetDict({"train": no_text, "test": no_text}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(D2VError, match=r"a DatasetDict with splits test, train; name one"):
        read_manifest(str(tmp_path / "dd"))
    with pytest.raises(D2VError, match=r"no split 'validation' in .*dd \(splits: test, train\)"):
        read_manifest(str(tmp_path / "dd" / "validation"))
    assert len(read_manifest(str(tmp_path / "dd" / "test"))) == 17
    with pytest.raises(D2VError, match=r":validation: cannot open the dataset \(ValueError: Unknown split"):
        read_manifest(forms["hub"].replace(":train", ":validation"))
    with pytest.raises(D2VError, match=r"expected hf:NAME\[:CONFIG\]:SPLIT"):
        read_manifest("hf:librispeech_asr")
    with pytest.raises(D2VError, match=r"no parquet files match"):
        read_manifest(str(tmp_path / "nothing-*.parquet"))
    # an undecodable row is named by its index
    rows = datasets.load_from_disk(disk).cast_column("audio", datasets.Audio(decode=False)).to_list()
    rows[5]["audio"] = {"bytes": b"RIFF but not really a wave file", "path": "broken.wav"}
    broken = datasets.Dataset.from_list(rows).cast_column("audio", datasets.Audio())
    broken.save_to_disk(str(tmp_path / "broken"))
    with pytest.raises(D2VError, match=r"broken\[5\]: not audio that soundfile can read"):
        read_manifest(str(tmp_path / "broken"))
    # the hub while offline: one line saying so
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(D2VError, match=r"hf:librispeech_asr:clean:train.100: cannot load 'librispeech_asr' .*offline"):
        read_manifest("hf:librispeech_asr:clean:train.100")
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        assert cli.main(["evaluate", "tiny-model", "--data", "hf:librispeech_asr:clean:test"]) == 1
    assert out.getvalue().count("\n") == 1 and "offline" in out.getvalue()


def _evaluate_cli(model: str, data: str, results: Path, *extra: str) -> tuple[str, list[list[str]]]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(
            ["evaluate", model, "--data", data, "--batch-size", "4", "--out", str(results), "--no-progress", *extra]
        )
    assert code == 0
    lines = results.read_text().splitlines()
    assert lines[0].split("\t") == list(TSV_COLUMNS)
    return stdout.getvalue(), [line.split("\t") for line in lines[1:]]


def _check_report(printed: str, table: list[list[str]], metrics: dict) -> None:
    """The printed WER/CER are `metrics`', and the TSV's per-utterance edits add up to them."""
    assert f"WER        {100 * metrics['wer']:.2f}%" in printed and f"CER        {100 * metrics['cer']:.2f}%" in printed
    assert "normalize  upper-letters:" in printed
    assert len(table) == len(EVAL_CLIPS) and table[0][2] == "TEN OF CLUBS"
    words, errors = sum(int(r[4]) for r in table), sum(int(r[5]) for r in table)
    chars, char_errors = sum(int(r[6]) for r in table), sum(int(r[7]) for r in table)
    assert errors / words == pytest.approx(metrics["wer"], rel=1e-12)
    assert char_errors / chars == pytest.approx(metrics["cer"], rel=1e-12)


def test_evaluate_equals_finetune_eval(speech_dir, hf_cache, tmp_path):
    """`d2v finetune`'s eval function and `d2v evaluate` on the same weights and clips (parquet, TSV,
    hf:DIR:SPLIT) give the same WER and CER (a random tiny model: its transcripts are nonsense, but
    the same nonsense)."""
    from types import SimpleNamespace

    from flax_d2v import Data2VecAudioForCTC, init_params, tiny_config
    from flax_d2v.checkpoint import save_flax
    from flax_d2v.processor import save_tokenizer_files
    from flax_d2v.train.ctc import CTCObjective
    from flax_d2v.train.finetune_run import make_eval_fn
    from flax_d2v.train.vocab import build_vocab

    forms = write_forms(speech_dir, tmp_path / "four", EVAL_CLIPS)
    manifest = read_manifest(forms["parquet"], require_text=True)
    vocab = build_vocab(manifest.texts)
    module = Data2VecAudioForCTC(tiny_config(vocab_size=len(vocab)))
    params = init_params(module, 0)
    save_tokenizer_files(tmp_path / "files", vocab)
    model = save_flax(tmp_path / "model", module.config, params, files_from=tmp_path / "files")
    metrics = make_eval_fn(CTCObjective(module), manifest, vocab, batch_size=4)(SimpleNamespace(params=params))
    assert metrics["eval_clips"] == len(EVAL_CLIPS) and 0 < metrics["cer"]
    for data in (forms["parquet"], forms["tsv"], forms["hub"]):
        _check_report(*_evaluate_cli(str(model), data, tmp_path / "results.tsv"), metrics)

    # with an n-gram LM: finetune's --eval-lm numbers (wer_lm, cer_lm) are `d2v evaluate --lm`'s
    pytest.importorskip("flashlight.lib.text")
    from test_lm_decode import bigram_arpa

    from flax_d2v.ctc_decode import CTCTokenizer
    from flax_d2v.lm_decode import decoder_for
    from flax_d2v.train.vocab import normalize_transcript

    arpa = tmp_path / "words.arpa"
    bigram_arpa([normalize_transcript(t).split() for t in manifest.texts], arpa)
    lm = decoder_for(CTCTokenizer.from_vocab(vocab), len(vocab), lm=str(arpa), word_score=2.0)
    with_lm = make_eval_fn(CTCObjective(module), manifest, vocab, 4, lm)(SimpleNamespace(params=params))
    printed, table = _evaluate_cli(
        str(model), forms["parquet"], tmp_path / "results.tsv", "--lm", str(arpa), "--word-score", "2"
    )
    assert "beam search, width 100, LM" in printed
    _check_report(printed, table, {"wer": with_lm["wer_lm"], "cer": with_lm["cer_lm"]})


@pytest.mark.slow
def test_finetune_from_disk_then_evaluate(speech_dir, hf_cache, tmp_path):
    """A whole `d2v finetune` from a save_to_disk split with eval on parquet files; `d2v evaluate RUN/hf`
    on those parquet files reports its last eval WER/CER."""
    from flax_d2v.commands.finetune import resolve
    from flax_d2v.train import finetune

    forms = write_forms(speech_dir, tmp_path / "four", EVAL_CLIPS)
    run = tmp_path / "run"
    finetune(
        resolve(
            dict(
                train=forms["disk"],
                eval=forms["parquet"],
                model="tiny",
                out=str(run),
                steps=1,
                batch_size=4,
                learning_rate=1e-3,
                num_buckets=1,
                progress=False,
                log_every=1,
            )
        )
    )
    logged = [r for r in read_metrics(run) if "wer" in r][-1]
    _check_report(*_evaluate_cli(str(run / "hf"), forms["parquet"], tmp_path / "results.tsv"), logged)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["disk", "parquet", "hub"])
def test_pretrain_and_classify_from_each_form(form, forms, tmp_path):
    """data2vec pretraining, and audio classification with labels from the dataset's `speaker` column."""
    from flax_d2v.commands.finetune import resolve as resolve_finetune
    from flax_d2v.commands.pretrain import resolve as resolve_pretrain
    from flax_d2v.train import finetune, pretrain

    common = dict(train=forms[form], steps=2, batch_size=2, progress=False, log_every=1, max_seconds=4.0)
    pretrain(
        resolve_pretrain(dict(common, preset="tiny", out=str(tmp_path / "pt"), min_seconds=1.0, average_top_k_layers=2))
    )
    rows = [r for r in read_metrics(tmp_path / "pt") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    finetune(
        resolve_finetune(
            dict(
                common,
                model="tiny",
                out=str(tmp_path / "cls"),
                task="audio-classification",
                label_column="speaker",
                learning_rate=1e-3,
                export_hf=False,
            )
        )
    )
    rows = [r for r in read_metrics(tmp_path / "cls") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["parquet", "hub"])
def test_finetune_from_each_form(form, forms, tmp_path):
    from flax_d2v.commands.finetune import resolve
    from flax_d2v.train import finetune

    result = finetune(
        resolve(
            dict(
                train=forms[form],
                model="tiny",
                out=str(tmp_path / "run"),
                steps=2,
                batch_size=4,
                learning_rate=1e-3,
                max_seconds=4.0,
                progress=False,
                log_every=1,
                export_hf=False,
            )
        )
    )
    assert int(result.state.step) == 2
    shutil.rmtree(tmp_path / "run")
